//! Live outputs of `ersm run --output URI`: the overlay streamed while the
//! run goes on (an embedded HTTP server with a viewer page, MJPEG,
//! Prometheus metrics and a JSON status; RTP and RTSP through ffmpeg), fed
//! from the run loop without ever making it wait.
//!
//! The run hands each frame to a painter thread through a one-frame mailbox:
//! a frame that arrives while the painter is still busy replaces the one
//! waiting, so slow outputs skip frames instead of slowing inference. The
//! painter draws the overlay, encodes a JPEG only while someone watches, and
//! passes the picture to each ffmpeg stream through its own mailbox.

mod frames;
pub mod http;
mod mailbox;
pub mod stats;

use crate::caption::Line;
use crate::ersm::TokenMask;
use crate::model::manifest::Preprocess;
use crate::overlay::{self, OverlayWriter};
use crate::relay::Relay;
use crate::source::Frame;
use anyhow::{bail, Context, Result};
use mailbox::Mailbox;
use stats::{FrameRecord, Info, Stats};
use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// The port `http://HOST` serves on when none is given.
pub const DEFAULT_PORT: u16 = 8090;
/// JPEG quality of the MJPEG stream and snapshots.
const JPEG_QUALITY: u8 = 80;

/// Where one `--output` goes.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    /// The embedded HTTP server on this address.
    Http(SocketAddr),
    /// `rtp://` or `rtsp://`, sent by ffmpeg.
    Stream(String),
    /// A file or folder, written like `--overlay`.
    File(PathBuf),
}

impl Target {
    /// Parses an `--output` value: `http://[HOST][:PORT]`, `rtp://HOST:PORT`,
    /// `rtsp://HOST[:PORT]/PATH`, or a file or folder.
    pub fn parse(uri: &str) -> Result<Target> {
        let lower = uri.to_ascii_lowercase();
        if let Some(rest) = lower.strip_prefix("http://") {
            return Ok(Target::Http(http_addr(
                uri,
                &uri[uri.len() - rest.len()..],
            )?));
        }
        if lower.starts_with("rtp://") || lower.starts_with("rtsp://") {
            let rest = &uri[uri.find("://").map_or(0, |i| i + 3)..];
            let host = rest.split(['/', '?']).next().unwrap_or("");
            if host.is_empty() {
                bail!("--output {uri}: needs a host, e.g. rtp://192.168.1.10:5000 or rtsp://server:8554/ersm");
            }
            if lower.starts_with("rtp://")
                && !host
                    .rsplit_once(':')
                    .is_some_and(|(_, p)| p.parse::<u16>().is_ok_and(|p| p > 0))
            {
                bail!(
                    "--output {uri}: an RTP destination needs a port, e.g. rtp://192.168.1.10:5000"
                );
            }
            return Ok(Target::Stream(uri.to_string()));
        }
        if let Some((scheme, _)) = uri.split_once("://") {
            bail!(
                "--output {uri}: unknown scheme '{scheme}://' (http://, rtp://, rtsp://, or a file or folder)"
            );
        }
        if uri.is_empty() {
            bail!("--output needs a value");
        }
        Ok(Target::File(PathBuf::from(uri)))
    }
}

/// The address of `http://HOST:PORT`: no host means loopback; `@` or
/// `0.0.0.0` every interface (on purpose only).
fn http_addr(uri: &str, rest: &str) -> Result<SocketAddr> {
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let path = &rest[authority.len()..];
    if !(path.is_empty() || path == "/") {
        bail!("--output {uri}: the server has no path of its own; give http://HOST:PORT");
    }
    let (host, port) = match authority.rsplit_once(':') {
        // An IPv6 address without a port: "[::1]".
        Some((h, p)) if !p.ends_with(']') => {
            let port = p
                .parse::<u16>()
                .map_err(|_| anyhow::anyhow!("--output {uri}: '{p}' is not a port (0-65535)"))?;
            (h, port)
        }
        _ => (authority, DEFAULT_PORT),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match host {
        "" | "localhost" => Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port))),
        "@" => Ok(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))),
        h => (h, port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .with_context(|| format!("--output {uri}: cannot resolve '{h}'")),
    }
}

/// A frame for the live outputs.
pub struct Shot {
    pub frame: Frame,
    pub mask: TokenMask,
    pub caption: Vec<Line>,
    /// A detector's faces to outline, or to cover with `cover`.
    pub faces: Vec<crate::detect::Detection>,
    pub cover: Option<crate::faces::Cover>,
}

/// The painter thread and its mailbox; the thread returns what failed.
struct Painter {
    mailbox: Arc<Mailbox<Shot>>,
    thread: JoinHandle<Vec<String>>,
}

/// The live outputs of one run.
pub struct Live {
    stats: Arc<Mutex<Stats>>,
    frames: Option<Arc<http::Frames>>,
    server: Option<http::Server>,
    painter: Option<Painter>,
    has_streams: bool,
    targets: Vec<String>,
}

impl Live {
    /// Starts serving on `bound` (if any) and streaming to `streams` (ffmpeg
    /// writers), drawing overlays as `preprocess` crops.
    pub fn start(
        bound: Option<http::Bound>,
        streams: Vec<OverlayWriter>,
        info: Info,
        preprocess: Preprocess,
    ) -> Result<Live> {
        let stats = Arc::new(Mutex::new(Stats::new(info)));
        let mut targets = Vec::new();
        let (server, frames) = match bound {
            Some(b) => {
                let frames = Arc::new(http::Frames::default());
                let server = http::Server::start(b, stats.clone(), frames.clone())?;
                let addr = server.addr();
                if !addr.ip().is_loopback() {
                    log::warn!(
                        "serving on {addr}: anyone who can reach this machine can watch the \
                         stream (there is no authentication)"
                    );
                }
                log::info!("live view on http://{addr}/ (metrics /metrics, status /status, stream /stream.mjpg)");
                targets.push(format!("http://{addr}/"));
                (Some(server), Some(frames))
            }
            None => (None, None),
        };
        // One picture ahead: a stream shows the newest frames, a slow
        // network or encoder skips some.
        let relays = streams
            .into_iter()
            .map(|w| Relay::start("--output", w, 1))
            .collect::<Result<Vec<_>>>()?;
        targets.extend(relays.iter().map(|r| r.target().to_string()));
        let has_streams = !relays.is_empty();
        let painter = if server.is_some() || has_streams {
            let mailbox = Arc::new(Mailbox::default());
            let inbox = mailbox.clone();
            let jpeg = frames.clone();
            let painted = stats.clone();
            let thread = std::thread::Builder::new()
                .name("ersm-painter".into())
                .spawn(move || paint(&inbox, jpeg.as_deref(), relays, &preprocess, &painted))
                .context("starting the live painter thread")?;
            Some(Painter { mailbox, thread })
        } else {
            None
        };
        Ok(Live {
            stats,
            frames,
            server,
            painter,
            has_streams,
            targets,
        })
    }

    /// The address the HTTP server listens on, if there is one.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.server.as_ref().map(|s| s.addr())
    }

    /// Where the live outputs go, for the summary.
    pub fn targets(&self) -> &[String] {
        &self.targets
    }

    /// Records a processed frame in the statistics.
    pub fn record(&self, r: FrameRecord, capture_dropped: u64) {
        let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        s.set_capture_dropped(capture_dropped);
        s.record(r);
    }

    /// Records a frame that failed.
    pub fn record_failure(&self) {
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record_failure();
    }

    /// Whether a picture of this frame would be shown anywhere: streams
    /// always take one; the server only while someone watches.
    pub fn wants_picture(&self) -> bool {
        self.painter.is_some()
            && (self.has_streams || self.frames.as_ref().is_some_and(|f| f.wanted()))
    }

    /// Hands a frame to the painter; one still waiting is replaced (and
    /// counted as skipped by the live outputs).
    pub fn offer(&self, shot: Shot) {
        if let Some(p) = &self.painter {
            if p.mailbox.put(shot) {
                self.stats
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .record_live_drop();
            }
        }
    }

    /// Ends the live outputs: the painter finishes its frame, the ffmpeg
    /// streams close, the server stops. Returns what failed on the way.
    pub fn finish(&mut self, ending: &str) -> Vec<String> {
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .end(ending);
        let mut errors = Vec::new();
        if let Some(p) = self.painter.take() {
            p.mailbox.close();
            match p.thread.join() {
                Ok(e) => errors.extend(e),
                Err(_) => errors.push("live painter thread panicked".into()),
            }
        }
        if let Some(mut s) = self.server.take() {
            s.finish();
        }
        errors
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        if self.painter.is_some() || self.server.is_some() {
            self.finish("stopped");
        }
    }
}

/// The painter thread: overlay, JPEG for the server, frames for the streams.
fn paint(
    inbox: &Mailbox<Shot>,
    jpeg: Option<&http::Frames>,
    mut relays: Vec<Relay>,
    preprocess: &Preprocess,
    stats: &Mutex<Stats>,
) -> Vec<String> {
    let mut errors = Vec::new();
    while let Some(shot) = inbox.take() {
        let (w, h) = (shot.frame.width, shot.frame.height);
        let img = overlay::picture(
            &shot.frame,
            &shot.mask,
            preprocess,
            &shot.faces,
            shot.cover,
            &shot.caption,
        );
        if let Some(frames) = jpeg.filter(|f| f.wanted()) {
            match encode_jpeg(&img, w, h) {
                Ok(bytes) => frames.publish(bytes),
                Err(e) => log::warn!("live view: {e:#}"),
            }
        }
        // A relay that has failed is ended at once, so the log, /status and
        // the summary say so while the run goes on.
        let mut i = 0;
        while i < relays.len() {
            if relays[i].send((img.clone(), w, h)) {
                i += 1;
            } else {
                errors.extend(end_relay(relays.remove(i), stats));
            }
        }
    }
    for r in relays {
        errors.extend(end_relay(r, stats));
    }
    errors
}

/// Ends a relay; what failed, logged and recorded in `stats`.
fn end_relay(r: Relay, stats: &Mutex<Stats>) -> Option<String> {
    let why = r.finish()?;
    log::error!("{why}; no more frames sent there");
    stats
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .record_output_error(why.clone());
    Some(why)
}

/// An RGB image as JPEG.
pub fn encode_jpeg(rgb: &[u8], width: usize, height: usize) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(rgb.len() / 8);
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, JPEG_QUALITY)
        .encode(
            rgb,
            width as u32,
            height as u32,
            image::ExtendedColorType::Rgb8,
        )
        .context("encoding the overlay as JPEG")?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_targets_bind_loopback_unless_told_otherwise() {
        let http = |s: &str| match Target::parse(s).unwrap() {
            Target::Http(a) => a.to_string(),
            t => panic!("{t:?}"),
        };
        assert_eq!(http("http://:8091"), "127.0.0.1:8091");
        assert_eq!(http("http://localhost"), "127.0.0.1:8090");
        assert_eq!(http("http://127.0.0.1:0/"), "127.0.0.1:0");
        assert_eq!(http("http://@:8554"), "0.0.0.0:8554");
        assert_eq!(http("http://0.0.0.0:80"), "0.0.0.0:80");
        assert_eq!(http("http://[::1]:9000"), "[::1]:9000");
        assert_eq!(http("HTTP://[::1]"), "[::1]:8090");
        for bad in [
            "http://:99999",
            "http://:x",
            "http://:8090/view",
            "ftp://x",
            "http://no-such-host.invalid:80",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stream_and_file_targets() {
        assert_eq!(
            Target::parse("rtp://192.168.1.10:5000").unwrap(),
            Target::Stream("rtp://192.168.1.10:5000".into())
        );
        assert_eq!(
            Target::parse("rtsp://server:8554/ersm").unwrap(),
            Target::Stream("rtsp://server:8554/ersm".into())
        );
        assert!(Target::parse("rtp://192.168.1.10").is_err());
        assert!(Target::parse("rtsp://").is_err());
        assert_eq!(
            Target::parse("out/overlay.mp4").unwrap(),
            Target::File("out/overlay.mp4".into())
        );
    }
}
