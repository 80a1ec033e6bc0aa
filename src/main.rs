//! The `ersm` command line.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ersm::capture::{Capture, Policy, Reopen};
use ersm::ersm::DeviceChoice;
use ersm::live::stats::Info;
use ersm::live::{http, Live, Target};
use ersm::logits::top1;
use ersm::model::ModelPackage;
use ersm::overlay::OverlayWriter;
use ersm::pipeline::{Pipeline, Placement};
use ersm::report::Ending;
use ersm::report::{ideal_speedup, BenchReport, StageSamples};
use ersm::run::RunOptions;
use ersm::source::{self, images, Looping, SourceOptions, Uri};
use ersm::threads::Threads;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Sparse CNN inference with Energy-Regularized Spatial Masking, beside the dense baseline.
#[derive(Parser)]
#[command(name = "ersm", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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

#[derive(clap::Args)]
struct BenchArgs {
    /// Model package folder (manifest.json + ONNX). Default: the bundled model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// An image file or a folder of PNG/JPEG images. Default: the bundled photos.
    #[arg(long)]
    images: Option<PathBuf>,
    /// Frames to time per mode (images are cycled) [1–1000000].
    #[arg(long, default_value_t = 40, value_parser = within(1usize, 1_000_000))]
    frames: usize,
    /// Untimed frames per mode first (caches, allocator) [0–10000].
    #[arg(long, default_value_t = 3, value_parser = within(0usize, 10_000))]
    warmup: usize,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write every timed frame's kept tokens and ERSM and dense logits, one
    /// JSON record per line (to compare builds, e.g. aarch64 against x86_64).
    #[arg(long)]
    dump: Option<PathBuf>,
    /// Plot the latency distributions (ERSM vs dense per stage, ideal speedup
    /// marked) to this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// After the benchmark, time each stage and each kind of sparse suffix op
    /// on the same frames and print where the time goes.
    #[arg(long)]
    profile: bool,
    /// Where the energy layer runs: cpu, cuda (fails without a usable GPU), or
    /// auto (CUDA when available, else CPU).
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// Re-run a frame densely when the sparse result is unsure (top-1 margin
    /// below the package's `fallback.margin`).
    #[arg(long)]
    fallback: bool,
    /// Worker threads for the prefix, the sparse suffix and the dense
    /// baseline [1–1024]. Default: every core this process may use.
    #[arg(long, value_parser = within(1usize, 1024))]
    threads: Option<usize>,
}

/// `--device` values.
#[derive(Clone, Copy, clap::ValueEnum)]
enum DeviceArg {
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
struct RunArgs {
    /// Source URI: v4l2:///dev/video0, csi://0, rtsp://host/path, file://PATH or
    /// a bare path (video, image, folder of images), raw://-?w=W&h=H (rgb24 on
    /// stdin). Default: the bundled clip.
    #[arg(long, short = 's')]
    source: Option<String>,
    /// Model package folder (manifest.json + ONNX). Default: the bundled model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Run the dense baseline on the same frames (alternating the order), or not.
    #[arg(long, value_enum, default_value_t = CompareArg::Dense)]
    compare: CompareArg,
    /// Where the energy layer runs: cpu, cuda, or auto.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// Requested capture width (cameras) or output width (ffmpeg sources);
    /// 0 lets the source choose [0–16384].
    #[arg(long, default_value_t = 0, value_parser = within(0usize, 16_384))]
    input_width: usize,
    /// Requested capture height; 0 lets the source choose [0–16384].
    #[arg(long, default_value_t = 0, value_parser = within(0usize, 16_384))]
    input_height: usize,
    /// Requested camera frame rate; 0 lets the camera choose [0–1000].
    #[arg(long, default_value_t = 0.0, value_parser = within(0.0f64, 1000.0))]
    input_fps: f64,
    /// Replay files and folders from the start when they end.
    #[arg(long = "loop")]
    looping: bool,
    /// Re-open a live source that fails, ends or stalls (no frame for
    /// --stall-timeout), once a second, until it is back; the run then ends
    /// only on Ctrl-C or --max-frames.
    #[arg(long)]
    reconnect: bool,
    /// Drop the oldest queued frame when inference falls behind, for files too
    /// (live sources always do).
    #[arg(long)]
    drop_frames: bool,
    /// Frames the capture queue holds [1–1024].
    #[arg(long, default_value_t = 4, value_parser = within(1usize, 1024))]
    queue: usize,
    /// Stop after this many frames [1–10^12].
    #[arg(long, value_parser = within(1usize, 1_000_000_000_000))]
    max_frames: Option<usize>,
    /// Frames at the start left out of the latency percentiles [0–100000].
    #[arg(long, default_value_t = 2, value_parser = within(0usize, 100_000))]
    warmup: usize,
    /// Seconds without a frame after which the source counts as stalled [0.1–86400].
    #[arg(long, default_value_t = 10.0, value_parser = within(0.1f64, 86_400.0))]
    stall_timeout: f64,
    /// Write one JSON record per frame to this file.
    #[arg(long)]
    jsonl: Option<PathBuf>,
    /// Write overlays (energy heat map, kept tokens outlined): a folder gets a
    /// PNG sequence; a .mp4/.mkv/.avi/.mjpeg file a video (needs ffmpeg).
    #[arg(long)]
    overlay: Option<PathBuf>,
    /// Stream the overlay while the run goes on; may be given more than once.
    /// http://[HOST]:PORT serves a viewer page, /stream.mjpg, /metrics
    /// (Prometheus) and /status (JSON) on 127.0.0.1 unless another address
    /// is given (@ or 0.0.0.0: every interface); rtp://HOST:PORT and
    /// rtsp://HOST:PORT/PATH stream H.264 through ffmpeg; a file or folder is
    /// written like --overlay.
    #[arg(long, value_name = "URI")]
    output: Vec<String>,
    /// Re-run a frame densely when the sparse result is unsure (top-1 margin
    /// below the package's `fallback.margin`).
    #[arg(long)]
    fallback: bool,
    /// Worker threads for the prefix, the sparse suffix and the dense
    /// baseline [1–1024]. Default: every core this process may use.
    #[arg(long, value_parser = within(1usize, 1024))]
    threads: Option<usize>,
}

#[derive(Subcommand)]
enum EvalCommand {
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
struct OcclusionArgs {
    #[command(flatten)]
    common: EvalArgs,
    /// Occluder sides as fractions of the network's crop [each 0.01–1].
    #[arg(long, value_delimiter = ',', default_values_t = [0.15, 0.3], value_parser = within(0.01f64, 1.0))]
    sizes: Vec<f64>,
    /// Positions per axis (grid × grid over the crop) [1–32].
    #[arg(long, default_value_t = 3, value_parser = within(1usize, 32))]
    grid: usize,
}

#[derive(clap::Args)]
struct EvalArgs {
    /// An image, a folder of PNG/JPEG images or a video file; repeat the flag
    /// for several. Default: the bundled photos.
    #[arg(long)]
    images: Vec<PathBuf>,
    /// Of a video, evaluate every Nth frame, the first included [1–100000].
    #[arg(long, default_value_t = 10, value_parser = within(1usize, 100_000))]
    every: usize,
    /// Model package folder. Default: the bundled model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Where the energy layer runs.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// Folder for the CSV, JSON and SVG results.
    #[arg(long, default_value = "eval")]
    out: PathBuf,
    /// Re-run a frame densely when the sparse result is unsure (top-1 margin
    /// below the package's `fallback.margin`); deletion forces its own token
    /// sets and ignores it.
    #[arg(long)]
    fallback: bool,
    /// Worker threads for the prefix, the sparse suffix and the dense
    /// baseline [1–1024]. Default: every core this process may use.
    #[arg(long, value_parser = within(1usize, 1024))]
    threads: Option<usize>,
}

#[derive(clap::Args)]
struct DeletionArgs {
    #[command(flatten)]
    common: EvalArgs,
    /// Fraction of tokens deleted per step [0.01–0.5].
    #[arg(long, default_value_t = 0.1, value_parser = within(0.01f64, 0.5))]
    step: f64,
    /// Random orders averaged [1–1000].
    #[arg(long, default_value_t = 3, value_parser = within(1u64, 1000))]
    seeds: u64,
}

#[derive(clap::Args)]
struct MaskArgs {
    /// The image (PNG or JPEG).
    image: PathBuf,
    /// Output PNG.
    #[arg(long)]
    out: PathBuf,
    /// Model package folder. Default: the bundled model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Where the energy layer runs.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
}

/// `--compare` values.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CompareArg {
    Dense,
    None,
}

#[derive(clap::Args)]
struct InspectArgs {
    /// Model package folder (manifest.json + ONNX). Default: the bundled model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Keep ratio at which to estimate the sparse suffix cost [0.001–1].
    #[arg(long, default_value_t = 0.5, value_parser = within(0.001f64, 1.0))]
    keep: f64,
}

/// A clap value parser for a number in `[lo, hi]` (NaN and infinities refused):
/// every numeric option is bounded, and its range is in its help.
fn within<T>(lo: T, hi: T) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
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

/// A bundled path: as given relative to the working directory, else beside the crate.
fn bundled(rel: &str) -> PathBuf {
    let here = PathBuf::from(rel);
    if here.exists() {
        return here;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

const DEFAULT_MODEL: &str = "models/mobilenet_v2_ersm";
const DEFAULT_IMAGES: &str = "models/images";
const DEFAULT_STREAM: &str = "models/streams/vtest.mp4";

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    ersm::panics::install_hook();
    let cli = Cli::parse();
    let result = ersm::panics::catch(
        || "ersm".into(),
        || match cli.command {
            Command::Run(a) => run(a),
            Command::Bench(a) => bench(a),
            Command::Inspect(a) => inspect(a),
            Command::Eval(e) => eval(e),
            Command::Mask(a) => mask(a),
        },
    );
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(a: RunArgs) -> Result<()> {
    // Ctrl-C ends the run with its summary; a second one ends it at once.
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    })
    .context("installing the Ctrl-C handler")?;
    let uri = match &a.source {
        Some(s) => Uri::parse(s)?,
        None => Uri::File(bundled(DEFAULT_STREAM)),
    };
    // Everything is opened before the first frame: failures come first. The
    // HTTP port is bound before the model loads, so a port in use fails at once.
    let targets = a
        .output
        .iter()
        .map(|o| Target::parse(o).map(|t| (o.as_str(), t)))
        .collect::<Result<Vec<_>>>()?;
    let mut bound = None;
    for (uri, t) in &targets {
        if let Target::Http(addr) = t {
            anyhow::ensure!(
                bound.is_none(),
                "--output {uri}: one http:// output is enough (it serves every viewer)"
            );
            bound = Some(http::Bound::bind(*addr, uri)?);
        }
    }
    let pipeline = load_pipeline(a.model, a.device, a.fallback, a.threads)?;
    let opts = SourceOptions {
        width: a.input_width,
        height: a.input_height,
        fps: a.input_fps,
    };
    let mut source = source::open(&uri, &opts)?;
    let described = source.describe();
    let live = source.is_live();
    let fps = source.fps();
    let length = source.frame_count().filter(|_| !a.looping);
    log::info!(
        "source {described}; model {} ({}); energy layer on {}",
        pipeline.model.manifest.name,
        pipeline.model.origin.display(),
        pipeline.device().name()
    );
    if a.looping {
        source = Box::new(Looping::new(uri.clone(), opts.clone(), source));
    }
    let reopen: Option<Reopen> = (a.reconnect && live).then(|| {
        let (uri, opts) = (uri.clone(), opts.clone());
        Box::new(move || source::open(&uri, &opts)) as Reopen
    });
    if a.reconnect && !live {
        log::warn!("--reconnect applies to live sources only; {uri} is not one");
    }
    let policy = if live || a.drop_frames {
        Policy::DropOldest
    } else {
        Policy::Block
    };
    let mut overlays = Vec::new();
    let mut streams = Vec::new();
    if let Some(p) = &a.overlay {
        overlays.push(OverlayWriter::create(p, fps)?);
    }
    for (uri, t) in &targets {
        match t {
            Target::File(p) => overlays.push(OverlayWriter::create(p, fps)?),
            Target::Stream(url) => streams.push(OverlayWriter::stream(url)?),
            Target::Http(_) => {}
        }
        log::debug!("--output {uri}");
    }
    let live_outputs = if bound.is_some() || !streams.is_empty() {
        let info = Info {
            model: pipeline.model.manifest.name.clone(),
            source: described.clone(),
            device: pipeline.device().name().into(),
            threads: pipeline.threads.count(),
            compare: a.compare == CompareArg::Dense,
            fallback: pipeline.fallback.is_some(),
        };
        let preprocess = pipeline.model.manifest.preprocess.clone();
        Some(Live::start(bound, streams, info, preprocess)?)
    } else {
        None
    };
    let capture = Capture::start(source, a.queue, policy, reopen).context("capture thread")?;
    let report = ersm::run::run(
        &pipeline,
        &capture,
        RunOptions {
            compare: a.compare == CompareArg::Dense,
            jsonl: a.jsonl,
            overlays,
            live: live_outputs,
            max_frames: a.max_frames,
            warmup: a.warmup,
            stall_timeout: Duration::from_secs_f64(a.stall_timeout),
            reconnect: a.reconnect && live,
            length,
            source: described,
        },
        &stop,
    )?;
    println!("{}", report.table());
    if let Ending::SourceError(e) = &report.ending {
        anyhow::bail!("{e}");
    }
    if report.frames == 0 {
        anyhow::bail!(
            "no frame of {} was processed ({} failed)",
            report.source,
            report.failed
        );
    }
    if !report.output_errors.is_empty() {
        anyhow::bail!("{}", report.output_errors.join("; "));
    }
    Ok(())
}

fn bench(a: BenchArgs) -> Result<()> {
    for (path, what) in [(&a.json, "--json"), (&a.plot, "--plot")] {
        if let Some(p) = path {
            ersm::files::ensure_writable(p, what)?;
        }
    }
    let pipeline = load_pipeline(a.model, a.device, a.fallback, a.threads)?;
    let files = images::list(&a.images.unwrap_or_else(|| bundled(DEFAULT_IMAGES)))?;
    // A bad image is reported and skipped; the rest are still used.
    let (frames, _) = images::load_all(&files);
    anyhow::ensure!(!frames.is_empty(), "no image could be decoded");
    let m = &pipeline.model;
    log::info!(
        "model {} ({}), cut at '{}' ({}×{}×{}), {} images",
        m.manifest.name,
        pipeline.model.origin.display(),
        m.cut.node,
        m.cut.c,
        m.cut.h,
        m.cut.w,
        frames.len()
    );
    let mut dump = match &a.dump {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("--dump {}", p.display()))?,
        )),
        None => None,
    };
    let (mut ersm, mut dense) = (StageSamples::default(), StageSamples::default());
    let (mut keeps, mut agree, mut macs, mut fell) = (Vec::new(), 0usize, 0f64, 0usize);
    let mut failed = 0usize;
    for i in 0..a.warmup + a.frames {
        let frame = &frames[i % frames.len()];
        // Alternate which mode goes first so neither always runs on warm caches.
        let both = ersm::panics::catch(
            || format!("frame {}", frame.name),
            || {
                Ok(if i % 2 == 0 {
                    let e = pipeline.run_ersm(frame)?;
                    (e, pipeline.run_dense(frame)?)
                } else {
                    let d = pipeline.run_dense(frame)?;
                    (pipeline.run_ersm(frame)?, d)
                })
            },
        );
        // A frame that fails is named and left out of every statistic.
        let (e, d) = match both {
            Ok(r) => r,
            Err(err) => {
                log::warn!("frame {}: {err:#}; skipped", frame.name);
                failed += 1;
                continue;
            }
        };
        if i < a.warmup {
            continue;
        }
        ersm.push(&e.times);
        dense.push(&d.times);
        keeps.push(e.mask.keep_ratio());
        agree += usize::from(top1(&e.logits) == top1(&d.logits));
        if let Some(w) = dump.as_mut() {
            let rec = serde_json::json!({
                "image": frame.name,
                "kept": e.mask.kept,
                "logits": e.logits,
                "dense_logits": d.logits,
            });
            writeln!(w, "{rec}").context("--dump")?;
        }
        macs += m.plan.spent(&e.mask.kept, e.fell_back) as f64;
        fell += usize::from(e.fell_back);
        log::debug!(
            "{}: top-1 {} (dense {}), keep {:.3}",
            frame.name,
            m.manifest.label(top1(&e.logits)),
            m.manifest.label(top1(&d.logits)),
            e.mask.keep_ratio()
        );
    }
    anyhow::ensure!(
        !keeps.is_empty(),
        "no frame could be timed ({failed} failed; the log names why)"
    );
    let n = keeps.len() as f64;
    let keep = keeps.iter().sum::<f64>() / n;
    let report = BenchReport {
        model: m.manifest.name.clone(),
        device: pipeline.device().name().into(),
        placement: pipeline.placement(),
        threads: pipeline.threads.count(),
        frames: keeps.len(),
        failed,
        keep_ratio: keep,
        keep_ratio_min: keeps.iter().copied().fold(f64::INFINITY, f64::min),
        keep_ratio_max: keeps.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        ideal_speedup: ideal_speedup(&dense, keep),
        speedup: dense.p50("total") / ersm.p50("total"),
        suffix_speedup: dense.p50("suffix") / ersm.p50("suffix"),
        agreement: agree as f64 / n,
        suffix_macs_dense: m.plan.dense_cost(),
        suffix_macs_ersm: macs / n,
        energy_macs: m.energy.head.macs(m.cut.h, m.cut.w),
        fallback_rate: pipeline.fallback.map(|_| fell as f64 / n),
        stages: [
            ("ersm".to_string(), ersm.summaries()),
            ("dense".to_string(), dense.summaries()),
        ]
        .into(),
    };
    if let Some(w) = dump.as_mut() {
        w.flush().context("--dump")?;
    }
    println!("{}", report.table());
    if a.profile {
        let rows = ersm::profile::ersm(&pipeline, &frames, a.frames)?;
        println!(
            "where an ERSM frame's network time goes ({} threads, mean per frame):",
            pipeline.threads.count()
        );
        println!("{}", ersm::profile::table(&rows));
        let rows = ersm::profile::prefix(&pipeline, &frames, a.frames)?;
        println!("the prefix by tract op and output shape (mean per frame):");
        println!("{}", ersm::profile::table(&rows));
    }
    if let Some(path) = &a.plot {
        let stages: Vec<(&str, Vec<f64>, Vec<f64>)> = ersm::report::STAGES
            .iter()
            .map(|s| (*s, ersm.samples(s).to_vec(), dense.samples(s).to_vec()))
            .collect();
        let ideal = dense.p50("total") / report.ideal_speedup;
        ersm::plot::latency(&stages, ideal, path)?;
        log::info!("wrote {}", path.display());
    }
    if let Some(path) = a.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(&path, text + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        log::info!("wrote {}", path.display());
    }
    Ok(())
}

fn load_pipeline(
    model: Option<PathBuf>,
    device: DeviceArg,
    fallback: bool,
    threads: Option<usize>,
) -> Result<Pipeline> {
    let model_dir = model.unwrap_or_else(|| bundled(DEFAULT_MODEL));
    let model = ModelPackage::load(&model_dir)?;
    let threads = Threads::new(threads.unwrap_or_else(Threads::available))?;
    log::info!("{} worker thread(s)", threads.count());
    let placement = Placement::decide(&model, device.into())?;
    let pipeline = Pipeline::placed(model, placement).with_threads(threads);
    log::info!("{}", pipeline.placement());
    if fallback {
        pipeline.with_fallback()
    } else {
        Ok(pipeline)
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn eval(cmd: EvalCommand) -> Result<()> {
    let common = match &cmd {
        EvalCommand::Deletion(d) => &d.common,
        EvalCommand::Sparsity(a) => a,
        EvalCommand::Occlusion(o) => &o.common,
    };
    let pipeline = load_pipeline(
        common.model.clone(),
        common.device,
        common.fallback,
        common.threads,
    )?;
    let inputs = if common.images.is_empty() {
        vec![bundled(DEFAULT_IMAGES)]
    } else {
        common.images.clone()
    };
    let out = common.out.clone();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let failed = match &cmd {
        EvalCommand::Occlusion(o) => {
            let (frames, failed) = ersm::eval::load_inputs(&inputs, common.every)?;
            let r = ersm::eval::occlusion::run(&pipeline, &frames, &o.sizes, o.grid)?;
            save_results(&out, "occlusion", &r.csv(), &r, &failed)?;
            ersm::plot::occlusion(&r, &out.join("occlusion.svg"))?;
            println!("{}", r.table());
            failed
        }
        EvalCommand::Deletion(d) => {
            let (analysed, failed) = ersm::eval::analyse_inputs(&pipeline, &inputs, common.every)?;
            let r = ersm::eval::deletion::run(&pipeline, &analysed, d.step, d.seeds)?;
            save_results(&out, "deletion", &r.csv(), &r, &failed)?;
            ersm::plot::deletion(&r, &out.join("deletion.svg"))?;
            println!("{}", r.table());
            failed
        }
        EvalCommand::Sparsity(_) => {
            let (analysed, failed) = ersm::eval::analyse_inputs(&pipeline, &inputs, common.every)?;
            let r = ersm::eval::sparsity::of(&pipeline, &analysed)?;
            save_results(&out, "sparsity", &r.csv(), &r, &failed)?;
            ersm::plot::sparsity(&r, &out.join("sparsity.svg"))?;
            println!("{}", r.table());
            failed
        }
    };
    report_failed(&failed);
    println!("results in {}", out.display());
    Ok(())
}

/// Writes `NAME.csv` and `NAME.json` (the result and the images left out).
fn save_results<T: serde::Serialize>(
    out: &Path,
    name: &str,
    csv: &str,
    result: &T,
    failed: &[String],
) -> Result<()> {
    write(&out.join(format!("{name}.csv")), csv)?;
    let json = serde_json::json!({ "result": result, "failed_images": failed });
    write(
        &out.join(format!("{name}.json")),
        &serde_json::to_string_pretty(&json)?,
    )
}

fn report_failed(failed: &[String]) {
    if !failed.is_empty() {
        println!("{} image(s) could not be evaluated:", failed.len());
        for f in failed {
            println!("  {f}");
        }
    }
}

fn mask(a: MaskArgs) -> Result<()> {
    let pipeline = load_pipeline(a.model, a.device, false, None)?;
    let frame = images::load(&a.image)?;
    let r = pipeline.run_ersm(&frame)?;
    let img = ersm::overlay::draw(&frame, &r.mask, &pipeline.model.manifest.preprocess);
    image::save_buffer(
        &a.out,
        &img,
        frame.width as u32,
        frame.height as u32,
        image::ColorType::Rgb8,
    )
    .with_context(|| format!("writing {}", a.out.display()))?;
    println!(
        "{}: top-1 '{}', kept {} of {} tokens ({:.1} %) -> {}",
        a.image.display(),
        pipeline.manifest_label(top1(&r.logits)),
        r.mask.kept.len(),
        r.mask.h * r.mask.w,
        100.0 * r.mask.keep_ratio(),
        a.out.display()
    );
    Ok(())
}

fn inspect(a: InspectArgs) -> Result<()> {
    let model_dir = a.model.unwrap_or_else(|| bundled(DEFAULT_MODEL));
    let m = ModelPackage::load(&model_dir)?;
    let e = &m.energy;
    println!("model      {} ({})", m.manifest.name, m.origin.display());
    println!(
        "input      {} {:?}",
        m.manifest.input.name, m.manifest.input.shape
    );
    println!(
        "cut        energy node '{}' reads '{}' ({}×{}×{} = {} tokens of {} channels)",
        m.cut.node,
        m.cut.input,
        m.cut.c,
        m.cut.h,
        m.cut.w,
        m.cut.h * m.cut.w,
        m.cut.c
    );
    println!(
        "energy     λ = {}, τ = {}, T = {}, {:?}-neighbourhood, {} head ({:.2} M multiply-adds)",
        e.lambda,
        e.tau,
        e.steps,
        e.neighbourhood,
        e.head.describe(),
        e.head.macs(m.cut.h, m.cut.w) as f64 / 1e6
    );
    let filled = m.plan.fill_count();
    let hold = if filled == 0 {
        "zero".to_string()
    } else {
        let s = if filled == 1 { "" } else { "s" };
        format!("the package's fill vectors ({filled} tensor{s}; zero elsewhere)")
    };
    println!(
        "sparse     dropped tokens hold {hold}; strided layers follow the \"{}\" rule",
        m.plan.stride_rule.as_str()
    );
    match &m.baseline {
        Some(b) => println!(
            "baseline   the original network, {} (shares the prefix)",
            b.origin.display()
        ),
        None => println!("baseline   this network with every token kept"),
    }
    if let Some(f) = &m.manifest.fallback {
        println!(
            "fallback   with --fallback, re-run densely when the top-1 margin is below {}",
            f.margin
        );
    }
    println!(
        "\nprefix ({} ONNX nodes, dense in tract):",
        m.prefix_ops.len()
    );
    println!("  {}", m.prefix_ops.join(" → "));
    println!("\nsuffix ({} sparse steps):", m.plan.steps.len());
    for step in &m.plan.steps {
        let level = m.plan.slot_shapes[step.output]
            .level()
            .map(|l| format!("{}×{}", m.plan.levels[l].h, m.plan.levels[l].w))
            .unwrap_or_else(|| "dense".into());
        let full: Vec<usize> = m.plan.levels.iter().map(|l| l.h * l.w).collect();
        let name = step.label();
        println!(
            "  {:<22} {:<28} {:>9}  {:>10} MACs",
            name,
            step.node,
            level,
            step.op.cost(&full)
        );
    }
    // Estimate: every level keeps the same fraction (strided levels keep at least that).
    let est: Vec<usize> = m
        .plan
        .levels
        .iter()
        .map(|l| ((l.h * l.w) as f64 * a.keep).ceil() as usize)
        .collect();
    let (dense, sparse) = (m.plan.dense_cost(), m.plan.cost(&est));
    println!(
        "\nsuffix cost: {:.3} GFLOPs dense, {:.3} GFLOPs at keep {:.2} ({:.2}x fewer; assumes the same keep ratio at every resolution)",
        2.0 * dense as f64 / 1e9,
        2.0 * sparse as f64 / 1e9,
        a.keep,
        dense as f64 / sparse.max(1) as f64
    );
    Ok(())
}
