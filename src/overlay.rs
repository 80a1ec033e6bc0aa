//! What the model looked at, drawn on the frame: the energy map as a heat
//! map over the network's crop (red = most important), kept tokens outlined
//! in green, dropped tokens shaded, the frame outside the crop dimmed.
//! Written as a PNG sequence, or through ffmpeg as a video file or an RTP or
//! RTSP stream.

use crate::caption::Line;
use crate::detect::Detection;
use crate::ersm::TokenMask;
use crate::faces::Cover;
use crate::model::manifest::Preprocess;
use crate::preprocess::crop_region;
use crate::source::process::wait_within;
use crate::source::Frame;
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Heat-map opacity over the crop.
const ALPHA: f32 = 0.4;
/// Brightness of dropped tokens.
const DROPPED: f32 = 0.55;
/// Outline thickness, pixels.
const LINE: isize = 2;

/// Jet colour map, `u` in 0..=1 (blue → cyan → yellow → red).
fn jet(u: f32) -> [f32; 3] {
    let c = |x: f32| (1.5 - x.abs()).clamp(0.0, 1.0) * 255.0;
    [c(4.0 * u - 3.0), c(4.0 * u - 2.0), c(4.0 * u - 1.0)]
}

/// What an output shows of a frame: the overlay of `mask` with a
/// detector's `faces` outlined and the caption; or, with `cover`
/// (`--anonymize`), the frame itself with every face covered and nothing
/// else drawn.
pub fn picture(
    frame: &Frame,
    mask: &TokenMask,
    p: &Preprocess,
    faces: &[Detection],
    cover: Option<Cover>,
    caption: &[Line],
) -> Vec<u8> {
    let (w, h) = (frame.width, frame.height);
    if let Some(c) = cover {
        let mut img = frame.rgb.clone();
        crate::faces::anonymize(&mut img, w, h, faces, c);
        return img;
    }
    let mut img = draw(frame, mask, p);
    crate::faces::draw(&mut img, w, h, faces);
    crate::caption::draw(&mut img, w, h, caption);
    img
}

/// Draws the overlay of `mask` on `frame`, pre-processed as `p` describes.
pub fn draw(frame: &Frame, mask: &TokenMask, p: &Preprocess) -> Vec<u8> {
    let (w, h) = (frame.width, frame.height);
    let flags = mask.keep_flags();
    let scale = mask
        .energies
        .iter()
        .filter(|e| e.is_finite())
        .fold(0.0f32, |m, e| m.max(e.abs()))
        .max(1e-6);
    let [x0, y0, x1, y1] = crop_region(w, h, p);
    let (tw, th) = ((x1 - x0) / mask.w as f32, (y1 - y0) / mask.h as f32);
    // Token index of a pixel inside the crop.
    let token = |x: isize, y: isize| -> Option<usize> {
        let (fx, fy) = (x as f32 + 0.5, y as f32 + 0.5);
        if fx < x0 || fy < y0 || fx >= x1 || fy >= y1 {
            return None;
        }
        let tx = (((fx - x0) / tw) as usize).min(mask.w - 1);
        let ty = (((fy - y0) / th) as usize).min(mask.h - 1);
        Some(ty * mask.w + tx)
    };
    let kept = |t: Option<usize>| t.is_some_and(|t| flags[t]);
    let mut out = frame.rgb.clone();
    for y in 0..h as isize {
        for x in 0..w as isize {
            let px = &mut out[(y as usize * w + x as usize) * 3..][..3];
            let Some(t) = token(x, y) else {
                px.iter_mut().for_each(|v| *v /= 2);
                continue;
            };
            let edge = flags[t]
                && [(-LINE, 0), (LINE, 0), (0, -LINE), (0, LINE)]
                    .iter()
                    .any(|(dx, dy)| !kept(token(x + dx, y + dy)));
            if edge {
                px.copy_from_slice(&[0, 255, 0]);
                continue;
            }
            let e = mask.energies[t];
            let u = if e.is_finite() {
                0.5 - 0.5 * e / scale
            } else {
                0.0
            };
            let c = jet(u.clamp(0.0, 1.0));
            // Dropped tokens are shaded: the suffix never sees them.
            let shade = if flags[t] { 1.0 } else { DROPPED };
            for k in 0..3 {
                px[k] = (shade * ((1.0 - ALPHA) * px[k] as f32 + ALPHA * c[k])).round() as u8;
            }
        }
    }
    out
}

/// Where overlays go.
pub enum OverlayWriter {
    /// `frame_000001.png`, … in a folder.
    Png { dir: PathBuf, next: usize },
    /// An ffmpeg encoder fed rgb24 on stdin; started at the first frame.
    Video {
        dest: Dest,
        fps: f64,
        child: Option<(Child, usize, usize)>,
        /// The encoder's process id once started (0 before), for `stopper`.
        pid: Arc<AtomicU32>,
    },
}

/// How long ffmpeg may take to finish its file or stream after the last
/// frame before it is taken as stalled (an RTSP server that never answers)
/// and killed.
pub const FINISH_LIMIT: Duration = Duration::from_secs(10);

/// Where ffmpeg sends the encoded overlay.
#[derive(Clone, Debug)]
pub enum Dest {
    File(PathBuf),
    /// `rtp://HOST:PORT` or `rtsp://…` (published to an RTSP server).
    Stream(String),
}

impl std::fmt::Display for Dest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dest::File(p) => write!(f, "{}", p.display()),
            Dest::Stream(u) => f.write_str(u),
        }
    }
}

/// Fails now, not after the first frame, when ffmpeg is missing.
fn check_ffmpeg(what: &str) -> Result<()> {
    let mut child = Command::new("ffmpeg")
        .arg("-version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|_| {
            anyhow::anyhow!(
                "{what} needs ffmpeg (Debian/Ubuntu/JetPack: sudo apt install ffmpeg){}",
                if what.starts_with("--overlay") || what.starts_with("--output") {
                    "; a folder name writes PNGs without it"
                } else {
                    ""
                }
            )
        })?;
    // An ffmpeg that does not answer `-version` would hold the run before it
    // starts, with Ctrl-C not yet handled.
    match wait_within(&mut child, FFMPEG_VERSION_LIMIT) {
        Ok(Some(_)) => Ok(()),
        _ => bail!(
            "{what}: `ffmpeg -version` did not answer within {} s; is the ffmpeg on PATH a working one?",
            FFMPEG_VERSION_LIMIT.as_secs()
        ),
    }
}

/// How long `ffmpeg -version` may take before the ffmpeg found is taken as broken.
const FFMPEG_VERSION_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// File extensions written as video through ffmpeg.
const VIDEO: &[&str] = &["mp4", "mkv", "mov", "avi", "mjpeg"];

impl OverlayWriter {
    /// A video writer for a video extension, else a PNG folder (created);
    /// `flag` (`--overlay`, `--output`) names it in errors.
    pub fn create(flag: &str, path: &Path, fps: f64) -> Result<OverlayWriter> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase());
        if ext.as_deref().is_some_and(|e| VIDEO.contains(&e)) {
            check_ffmpeg(&format!("{flag} {}: writing video", path.display()))?;
            // And when the file cannot be written (a missing folder): ffmpeg
            // would only say so once the frames are flowing.
            crate::files::ensure_writable(path, flag)?;
            return Ok(OverlayWriter::Video {
                dest: Dest::File(path.to_path_buf()),
                fps: if fps > 0.0 { fps } else { 10.0 },
                child: None,
                pid: Arc::default(),
            });
        }
        std::fs::create_dir_all(path)
            .with_context(|| format!("{flag} {}: cannot create folder", path.display()))?;
        Ok(OverlayWriter::Png {
            dir: path.to_path_buf(),
            next: 1,
        })
    }

    /// An RTP or RTSP stream of the overlays through ffmpeg (H.264, tuned
    /// for latency), timed by the wall clock so a variable frame rate plays
    /// at the speed it was made.
    pub fn stream(url: &str) -> Result<OverlayWriter> {
        check_ffmpeg(&format!("--output {url}"))?;
        Ok(OverlayWriter::Video {
            dest: Dest::Stream(url.to_string()),
            fps: 0.0,
            child: None,
            pid: Arc::default(),
        })
    }

    /// Writes one overlay image.
    pub fn write(&mut self, rgb: &[u8], width: usize, height: usize) -> Result<()> {
        match self {
            OverlayWriter::Png { dir, next } => {
                let file = dir.join(format!("frame_{next:06}.png"));
                image::save_buffer(
                    &file,
                    rgb,
                    width as u32,
                    height as u32,
                    image::ColorType::Rgb8,
                )
                .with_context(|| format!("overlay {}", file.display()))?;
                *next += 1;
                Ok(())
            }
            OverlayWriter::Video {
                dest,
                fps,
                child,
                pid,
            } => {
                if child.is_none() {
                    let c = start_encoder(dest, *fps, width, height)?;
                    pid.store(c.id(), Ordering::SeqCst);
                    *child = Some((c, width, height));
                }
                let (proc_, w0, h0) = child.as_mut().unwrap();
                let resized;
                let data = if (width, height) == (*w0, *h0) {
                    rgb
                } else {
                    // A video has one size: later frames are fitted to the first.
                    let img = image::RgbImage::from_raw(width as u32, height as u32, rgb.to_vec())
                        .context("overlay frame size")?;
                    resized = image::imageops::resize(
                        &img,
                        *w0 as u32,
                        *h0 as u32,
                        image::imageops::FilterType::Triangle,
                    )
                    .into_raw();
                    &resized
                };
                let stdin = proc_.stdin.as_mut().context("ffmpeg stdin closed")?;
                if let Err(e) = stdin.write_all(data) {
                    bail!("overlay {dest}: ffmpeg stopped taking frames ({e})");
                }
                Ok(())
            }
        }
    }

    /// Closes the video: waits for ffmpeg to write its trailer, at most
    /// `FINISH_LIMIT`; an ffmpeg still running then is killed and named.
    pub fn finish(&mut self) -> Result<()> {
        if let OverlayWriter::Video {
            dest, child, pid, ..
        } = self
        {
            if let Some((mut c, _, _)) = child.take() {
                drop(c.stdin.take());
                let status = wait_within(&mut c, FINISH_LIMIT)?;
                pid.store(0, Ordering::SeqCst);
                if let Dest::Stream(url) = dest {
                    // The stream it described has ended with ffmpeg.
                    std::fs::remove_file(sdp_file(url)).ok();
                }
                match status {
                    None => bail!(
                        "overlay {dest}: ffmpeg did not finish within {} s of the last frame (a server that does not answer?); stopped it",
                        FINISH_LIMIT.as_secs()
                    ),
                    Some(s) if !s.success() => bail!("overlay {dest}: ffmpeg exited with {s}"),
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }

    /// A way to stop this writer's encoder from another thread (a write
    /// blocked on an ffmpeg that stopped reading then fails at once).
    pub fn stopper(&self) -> crate::source::Stopper {
        let pid = match self {
            OverlayWriter::Video { pid, .. } => Some(pid.clone()),
            OverlayWriter::Png { .. } => None,
        };
        Arc::new(move || {
            let p = pid.as_ref().map_or(0, |p| p.load(Ordering::SeqCst));
            if let Ok(p @ 1..) = libc::pid_t::try_from(p) {
                // SAFETY: signals our own child, which is not reaped until
                // its writer's finish() has stored 0 here.
                unsafe {
                    libc::kill(p, libc::SIGKILL);
                }
            }
        })
    }

    /// Where the overlays are going, for the summary.
    pub fn target(&self) -> String {
        match self {
            OverlayWriter::Png { dir, next } => {
                format!("{} ({} PNG frames)", dir.display(), next - 1)
            }
            OverlayWriter::Video { dest, .. } => dest.to_string(),
        }
    }
}

/// Where the SDP of an RTP output is written while the run streams.
fn sdp_file(url: &str) -> PathBuf {
    let name: String = url
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    std::env::temp_dir().join(format!("ersm-{}-{name}.sdp", std::process::id()))
}

fn start_encoder(dest: &Dest, fps: f64, width: usize, height: usize) -> Result<Child> {
    let mut cmd = Command::new("ffmpeg");
    cmd.args(["-hide_banner", "-loglevel", "error", "-y"]);
    match dest {
        Dest::File(_) => cmd.args(["-r", &format!("{fps}")]),
        // Frames come when inference makes them: stamp them as they come.
        Dest::Stream(_) => cmd.args(["-use_wallclock_as_timestamps", "1"]),
    };
    cmd.args(["-f", "rawvideo", "-pix_fmt", "rgb24"])
        .args(["-s", &format!("{width}x{height}"), "-i", "-"])
        .args(["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2"]);
    match dest {
        Dest::File(path) => {
            let mjpeg = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "avi" | "mjpeg"));
            if mjpeg {
                cmd.args(["-c:v", "mjpeg", "-q:v", "3"]);
            } else {
                cmd.args([
                    "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
                ]);
            }
            cmd.arg(path);
        }
        Dest::Stream(url) => {
            cmd.args([
                "-c:v",
                "libx264",
                "-preset",
                "ultrafast",
                "-tune",
                "zerolatency",
            ])
            .args(["-pix_fmt", "yuv420p", "-g", "30"]);
            if url.to_ascii_lowercase().starts_with("rtsp://") {
                cmd.args(["-f", "rtsp", "-rtsp_transport", "tcp"]);
            } else {
                // The SDP a player needs goes to a file named in the log.
                let sdp = sdp_file(url);
                log::info!(
                    "{url}: play with `ffplay -protocol_whitelist file,udp,rtp {}` (or open it in VLC)",
                    sdp.display()
                );
                cmd.args(["-f", "rtp", "-sdp_file"]).arg(sdp);
            }
            cmd.arg(url);
        }
    }
    // Its own process group: the terminal's Ctrl-C goes to ersm, which ends
    // the video by closing ffmpeg's input (ffmpeg would exit 255 on it).
    use std::os::unix::process::CommandExt;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .process_group(0)
        .spawn()
        .with_context(|| format!("overlay {dest}: cannot start ffmpeg"))
}
