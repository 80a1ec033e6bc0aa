//! The `ersm` command line's options: one struct per subcommand, the
//! options `run`, `bench` and `eval` share flattened into each.

use crate::ersm::DeviceChoice;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Sparse CNN inference with Energy-Regularized Spatial Masking, beside the dense baseline.
#[derive(Parser)]
#[command(name = "ersm", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// The main job: ERSM on a camera or video stream, the dense baseline beside it.
    Run(RunArgs),
    /// Time ERSM and the dense baseline side by side on bundled images.
    Bench(BenchArgs),
    /// Show where the network is cut, the prefix and suffix ops, and suffix cost.
    Inspect(InspectArgs),
    /// Measure the claims behind ERSM on images and video frames.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Draw one image with its energy heat map and kept tokens outlined.
    Mask(MaskArgs),
}

/// The options `run`, `bench` and `eval` share: the model and where and
/// how it runs.
#[derive(clap::Args, Clone)]
pub struct PipelineArgs {
    /// Model package folder (manifest.json + ONNX). Default: the bundled model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Where the energy layer runs: cpu, cuda (fails without a usable GPU), or
    /// auto (CUDA when available, else CPU).
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// Re-run a frame densely when the sparse result is unsure (top-1 margin
    /// below the package's `fallback.margin`).
    #[arg(long)]
    pub fallback: bool,
    /// Frames are a stream: every energy layer keeps the tokens around the
    /// faces found in the frame before, at the package's stream settings
    /// (manifest `track`; a detector).
    #[arg(long)]
    pub track: bool,
    /// Worker threads for the prefix, the sparse suffix and the dense
    /// baseline [1–1024]. Default: every core this process may use.
    #[arg(long, value_parser = within(1usize, 1024))]
    pub threads: Option<usize>,
    /// A detector package's input, WxH (multiples of 32, at most 4096 a
    /// side): frames are stretched to it. Default: `run` takes the source's
    /// resolution rounded up to multiples of 32 when it knows it (a video, a
    /// camera, a single image); otherwise, and for `bench` and `eval`, the
    /// package's size.
    #[arg(long, value_name = "WxH", value_parser = input_size)]
    pub input_size: Option<(usize, usize)>,
}

/// Parses `--input-size`: `WxH`.
fn input_size(s: &str) -> Result<(usize, usize), String> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("'{s}' is not WxH (e.g. 1280x736)"))?;
    let side = within(32usize, 4096);
    Ok((side(w)?, side(h)?))
}

#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// An image file or a folder of PNG/JPEG images. Default: the bundled photos.
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Frames to time per mode (images are cycled) [1–1000000].
    #[arg(long, default_value_t = 40, value_parser = within(1usize, 1_000_000))]
    pub frames: usize,
    /// Untimed frames per mode first (caches, allocator) [0–10000].
    #[arg(long, default_value_t = 3, value_parser = within(0usize, 10_000))]
    pub warmup: usize,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write every timed frame's kept tokens and ERSM and dense logits, one
    /// JSON record per line (to compare builds, e.g. aarch64 against x86_64).
    #[arg(long)]
    pub dump: Option<PathBuf>,
    /// Plot the latency distributions (ERSM vs dense per stage, ideal speedup
    /// marked) to this SVG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// After the benchmark, time each stage and each kind of sparse suffix op
    /// on the same frames and print where the time goes.
    #[arg(long)]
    pub profile: bool,
}

/// `--device` values.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
    Auto,
}

impl From<DeviceArg> for DeviceChoice {
    fn from(d: DeviceArg) -> DeviceChoice {
        match d {
            DeviceArg::Cpu => DeviceChoice::Cpu,
            DeviceArg::Cuda => DeviceChoice::Cuda,
            DeviceArg::Auto => DeviceChoice::Auto,
        }
    }
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// Source URI: v4l2:///dev/video0, csi://0, rtsp://host/path, file://PATH or
    /// a bare path (video, image, folder of images), raw://-?w=W&h=H (rgb24 on
    /// stdin). Default: the bundled clip.
    #[arg(long, short = 's')]
    pub source: Option<String>,
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Run the dense baseline on the same frames (alternating the order), or not.
    #[arg(long, value_enum, default_value_t = CompareArg::Dense)]
    pub compare: CompareArg,
    /// Requested capture width (cameras) or output width (ffmpeg sources);
    /// 0 lets the source choose [0–16384].
    #[arg(long, default_value_t = 0, value_parser = within(0usize, 16_384))]
    pub input_width: usize,
    /// Requested capture height; 0 lets the source choose [0–16384].
    #[arg(long, default_value_t = 0, value_parser = within(0usize, 16_384))]
    pub input_height: usize,
    /// Requested camera frame rate; 0 lets the camera choose [0–1000].
    #[arg(long, default_value_t = 0.0, value_parser = within(0.0f64, 1000.0))]
    pub input_fps: f64,
    /// Replay files and folders from the start when they end.
    #[arg(long = "loop")]
    pub looping: bool,
    /// Re-open a live source that fails, ends or stalls (no frame for
    /// --stall-timeout), once a second, until it is back; the run then ends
    /// only on Ctrl-C or --max-frames.
    #[arg(long)]
    pub reconnect: bool,
    /// Drop the oldest queued frame when inference falls behind, for files too
    /// (live sources always do).
    #[arg(long)]
    pub drop_frames: bool,
    /// Frames the capture queue holds [1–1024].
    #[arg(long, default_value_t = 4, value_parser = within(1usize, 1024))]
    pub queue: usize,
    /// Stop after this many frames [1–10^12].
    #[arg(long, value_parser = within(1usize, 1_000_000_000_000))]
    pub max_frames: Option<usize>,
    /// Frames at the start left out of the latency percentiles [0–100000].
    #[arg(long, default_value_t = 2, value_parser = within(0usize, 100_000))]
    pub warmup: usize,
    /// Seconds without a frame after which the source counts as stalled [0.1–86400].
    #[arg(long, default_value_t = 10.0, value_parser = within(0.1f64, 86_400.0))]
    pub stall_timeout: f64,
    /// Write one JSON record per frame to this file.
    #[arg(long)]
    pub jsonl: Option<PathBuf>,
    /// Write every frame's kept tokens and raw answers (logits, or faces),
    /// one JSON record per line, as `bench --dump` does.
    #[arg(long)]
    pub dump: Option<PathBuf>,
    /// Write overlays (energy heat map, kept tokens outlined): a folder gets a
    /// PNG sequence; a .mp4/.mkv/.avi/.mjpeg file a video (needs ffmpeg).
    #[arg(long)]
    pub overlay: Option<PathBuf>,
    /// Stream the overlay while the run goes on; may be given more than once.
    /// http://[HOST]:PORT serves a viewer page, /stream.mjpg, /metrics
    /// (Prometheus) and /status (JSON) on 127.0.0.1 unless another address
    /// is given (@ or 0.0.0.0: every interface); rtp://HOST:PORT and
    /// rtsp://HOST:PORT/PATH stream H.264 through ffmpeg; a file or folder is
    /// written like --overlay.
    #[arg(long, value_name = "URI")]
    pub output: Vec<String>,
    /// A face detector's package: cover every face on every output (--overlay,
    /// --output) with a blur, a mosaic or a solid box, instead of the heat map.
    #[arg(long, value_name = "STYLE")]
    pub anonymize: Option<crate::faces::Cover>,
    /// With --anonymize: keep a face covered for this many frames after it was
    /// last seen, against flicker [0–1000].
    #[arg(long, default_value_t = 3, value_parser = within(0usize, 1000))]
    pub hold: usize,
}

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Delete tokens progressively (by energy, by feature magnitude, at random)
    /// and record agreement with dense and the dense class's probability.
    Deletion(DeletionArgs),
    /// Keep ratio per image: how sparsity follows the content.
    Sparsity(EvalArgs),
    /// Paste grey, black and photo-patch occluders over a grid of positions
    /// and sizes; compare ERSM and dense prediction changes.
    Occlusion(OcclusionArgs),
}

#[derive(clap::Args)]
pub struct OcclusionArgs {
    #[command(flatten)]
    pub common: EvalArgs,
    /// Occluder sides as fractions of the network's crop [each 0.01–1].
    #[arg(long, value_delimiter = ',', default_value = "0.15,0.3", value_parser = within(0.01f64, 1.0))]
    pub sizes: Vec<f64>,
    /// Positions per axis (grid × grid over the crop) [1–32].
    #[arg(long, default_value_t = 3, value_parser = within(1usize, 32))]
    pub grid: usize,
}

#[derive(clap::Args)]
pub struct EvalArgs {
    /// An image, a folder of PNG/JPEG images or a video file; repeat the flag
    /// for several. Default: the bundled photos.
    #[arg(long)]
    pub images: Vec<PathBuf>,
    /// Of a video, evaluate every Nth frame, the first included [1–100000].
    #[arg(long, default_value_t = 10, value_parser = within(1usize, 100_000))]
    pub every: usize,
    /// Folder for the CSV, JSON and SVG results.
    #[arg(long, default_value = "eval")]
    pub out: PathBuf,
    // Deletion forces its own token sets and ignores --fallback.
    #[command(flatten)]
    pub pipeline: PipelineArgs,
}

#[derive(clap::Args)]
pub struct DeletionArgs {
    #[command(flatten)]
    pub common: EvalArgs,
    /// Fraction of tokens deleted per step [0.01–0.5].
    #[arg(long, default_value_t = 0.1, value_parser = within(0.01f64, 0.5))]
    pub step: f64,
    /// Random orders averaged [1–1000].
    #[arg(long, default_value_t = 3, value_parser = within(1u64, 1000))]
    pub seeds: u64,
}

#[derive(clap::Args)]
pub struct MaskArgs {
    /// The image (PNG or JPEG).
    pub image: PathBuf,
    /// Output PNG.
    #[arg(long)]
    pub out: PathBuf,
    /// Model package folder. Default: the bundled model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Where the energy layer runs.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
}

/// `--compare` values.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CompareArg {
    Dense,
    None,
}

#[derive(clap::Args)]
pub struct InspectArgs {
    /// Model package folder (manifest.json + ONNX). Default: the bundled model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Keep ratio at which to estimate the sparse suffix cost [0.001–1].
    #[arg(long, default_value_t = 0.5, value_parser = within(0.001f64, 1.0))]
    pub keep: f64,
}

/// A clap value parser for a number in `[lo, hi]` (NaN and infinities refused):
/// every numeric option is bounded, and its range is in its help.
pub fn within<T>(lo: T, hi: T) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy + Send + Sync + 'static,
    T::Err: std::fmt::Display,
{
    move |s: &str| {
        let v: T = s
            .trim()
            .parse()
            .map_err(|e| format!("'{s}' is not a number ({e})"))?;
        // Written so that NaN fails too.
        if v >= lo && v <= hi {
            Ok(v)
        } else {
            Err(format!("must be between {lo} and {hi}, got {s}"))
        }
    }
}
