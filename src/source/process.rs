//! Sources read from a subprocess that writes rgb24 frames to its stdout:
//! ffmpeg for network streams and video files ersm does not decode itself,
//! GStreamer's `nvarguscamerasrc` for Jetson CSI cameras.

use super::raw::{RawFrames, RawRead};
use super::{Frame, Source, SourceOptions, Stopper};
use anyhow::{bail, Context, Result};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, ErrorKind};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Lines of the tool's stderr kept for error messages.
const STDERR_LINES: usize = 8;

/// A running capture subprocess and its frames.
pub struct ProcessSource {
    tool: &'static str,
    what: String,
    child: Child,
    frames: RawFrames<ChildStdout>,
    stderr: Arc<Mutex<VecDeque<String>>>,
    live: bool,
    count: Option<usize>,
    killed: Arc<AtomicBool>,
}

/// Where to get a missing tool.
fn install_hint(tool: &str) -> &'static str {
    match tool {
        "ffmpeg" | "ffprobe" => "install ffmpeg (Debian/Ubuntu/JetPack: sudo apt install ffmpeg)",
        "gst-launch-1.0" => {
            "install GStreamer (sudo apt install gstreamer1.0-tools; on Jetson, nvarguscamerasrc comes with JetPack's nvidia-l4t-gstreamer)"
        }
        _ => "install it",
    }
}

/// A failed start of `tool` as an error; a missing tool says how to get it.
fn start_error(tool: &str, e: std::io::Error) -> anyhow::Error {
    if e.kind() == ErrorKind::NotFound {
        anyhow::anyhow!("{tool} not found on PATH: {}", install_hint(tool))
    } else {
        anyhow::anyhow!("cannot start {tool}: {e}")
    }
}

/// Starts `tool` with its stdout and stderr piped.
fn spawn(tool: &'static str, args: &[String]) -> Result<Child> {
    Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| start_error(tool, e))
}

/// Waits for `child` at most `limit`: its exit status, or `None` when it was
/// still running then (it is killed and reaped). A child that cannot be
/// waited on is killed too, and the error returned.
pub fn wait_within(child: &mut Child, limit: Duration) -> std::io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(Some(status)),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            done => {
                let _ = child.kill();
                let _ = child.wait();
                return done.map(|_| None);
            }
        }
    }
}

/// Frame size (and count, when the container says) of a video, by ffprobe;
/// a source that does not answer within `limit` (a server that accepts and
/// then says nothing) is an error, not a wait for ever.
fn probe(url: &str, limit: Option<Duration>) -> Result<(usize, usize, Option<usize>)> {
    let mut child = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=width,height,nb_frames",
            "-of",
            "csv=p=0",
            url,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| start_error("ffprobe", e))?;
    if let Some(limit) = limit {
        if wait_within(&mut child, limit)?.is_none() {
            bail!(
                "source {url}: no answer within {:.0} s (ffprobe; --stall-timeout sets the limit)",
                limit.as_secs_f64()
            );
        }
    }
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<&str> = text.trim().split(',').collect();
    let parsed = match fields.as_slice() {
        [w, h, rest @ ..] => w.parse().ok().zip(h.parse().ok()).map(|(w, h)| {
            let n = rest.first().and_then(|n| n.parse().ok());
            (w, h, n)
        }),
        _ => None,
    };
    match parsed {
        Some((w, h, n)) if w > 0 && h > 0 => Ok((w, h, n)),
        _ => bail!(
            "source {url}: ffprobe found no video stream: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
}

/// A video file or network stream (`live`) decoded by an ffmpeg subprocess.
pub fn ffmpeg(url: &str, opts: &SourceOptions, live: bool) -> Result<ProcessSource> {
    let (width, height, count) = if opts.width > 0 && opts.height > 0 {
        (opts.width, opts.height, None)
    } else {
        probe(url, opts.stall_timeout)?
    };
    let mut args: Vec<String> = ["-hide_banner", "-loglevel", "error", "-nostdin"]
        .map(String::from)
        .to_vec();
    if url.starts_with("rtsp://") {
        args.extend(["-rtsp_transport", "tcp"].map(String::from));
    }
    args.extend(["-i".into(), url.into(), "-map".into(), "0:v:0".into()]);
    if opts.width > 0 && opts.height > 0 {
        args.extend(["-vf".into(), format!("scale={width}:{height}")]);
    }
    args.extend(["-f", "rawvideo", "-pix_fmt", "rgb24", "-"].map(String::from));
    let mut src = ProcessSource::start("ffmpeg", url.to_string(), &args, width, height, live)?;
    src.frames.label = short_label(url);
    src.count = count;
    Ok(src)
}

/// A Jetson CSI camera through `nvarguscamerasrc`.
pub fn csi(sensor: u32, opts: &SourceOptions) -> Result<ProcessSource> {
    let (w, h) = if opts.width > 0 && opts.height > 0 {
        (opts.width, opts.height)
    } else {
        (1280, 720)
    };
    let fps = if opts.fps > 0.0 {
        opts.fps.round() as u32
    } else {
        30
    };
    let pipeline = format!(
        "nvarguscamerasrc sensor-id={sensor} ! video/x-raw(memory:NVMM),width={w},height={h},framerate={fps}/1 \
         ! nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=RGB ! fdsink fd=1"
    );
    let mut args = vec!["-q".to_string(), "-e".to_string()];
    args.extend(pipeline.split_whitespace().map(String::from));
    log::info!("csi://{sensor}: requested {w}×{h} @ {fps} fps (gst-launch-1.0 {pipeline})");
    ProcessSource::start(
        "gst-launch-1.0",
        format!("csi://{sensor}"),
        &args,
        w,
        h,
        true,
    )
}

fn short_label(url: &str) -> String {
    url.rsplit('/').next().unwrap_or(url).to_string()
}

impl ProcessSource {
    fn start(
        tool: &'static str,
        what: String,
        args: &[String],
        width: usize,
        height: usize,
        live: bool,
    ) -> Result<ProcessSource> {
        let mut child = spawn(tool, args).with_context(|| format!("source {what}"))?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(err) = child.stderr.take() {
            let tail = stderr.clone();
            // Keeps the last lines for error messages; also logs them at debug.
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(|l| l.ok()) {
                    log::debug!("{tool}: {line}");
                    let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
                    if t.len() == STDERR_LINES {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            });
        }
        Ok(ProcessSource {
            tool,
            what: what.clone(),
            child,
            frames: RawFrames::new(stdout, what, width, height),
            stderr,
            live,
            count: None,
            killed: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The tool's exit status and last stderr line, for an error message.
    fn why(&mut self) -> String {
        // Give the stderr thread a moment to collect the last words.
        let status = self.child.wait().ok();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let tail = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
        let last = tail.back().cloned().unwrap_or_default();
        match status {
            Some(s) if s.success() => format!("{} ended ({last})", self.tool),
            Some(s) => format!("{} exited with {s}: {last}", self.tool),
            None => format!("{} could not be waited on: {last}", self.tool),
        }
    }
}

impl Source for ProcessSource {
    fn next_frame(&mut self) -> Result<Option<Frame>> {
        match self.frames.read() {
            Ok(RawRead::Frame(f)) => Ok(Some(f)),
            Ok(RawRead::End) => {
                if self.killed.load(Ordering::SeqCst) {
                    bail!("source {}: {} stopped", self.what, self.tool);
                }
                if self.child.wait().is_ok_and(|s| s.success()) {
                    return Ok(None);
                }
                let why = self.why();
                bail!(
                    "source {}: stream ended after {} frames: {why}",
                    self.what,
                    self.frames.count()
                )
            }
            Ok(RawRead::Partial { got }) => {
                let why = self.why();
                bail!(
                    "source {}: stream ended inside frame {} ({got} of {} bytes): {why}",
                    self.what,
                    self.frames.count() + 1,
                    self.frames.frame_bytes()
                )
            }
            Err(e) => Err(e.context(format!("source {}", self.what))),
        }
    }

    fn size(&self) -> Option<(usize, usize)> {
        Some((self.frames.width, self.frames.height))
    }

    fn describe(&self) -> String {
        format!(
            "{} (via {}, rgb24 {}×{})",
            self.what, self.tool, self.frames.width, self.frames.height
        )
    }

    fn is_live(&self) -> bool {
        self.live
    }

    fn frame_count(&self) -> Option<usize> {
        self.count
    }

    fn stopper(&self) -> Option<Stopper> {
        let pid = self.child.id() as libc::pid_t;
        let killed = self.killed.clone();
        Some(Arc::new(move || {
            if !killed.swap(true, Ordering::SeqCst) {
                // SAFETY: plain kill(2) on our own child's pid; the child is
                // not reaped until its stdout ends, so the pid is still ours.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }))
    }
}

impl Drop for ProcessSource {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
