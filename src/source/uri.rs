//! Source URIs, normalised as jetson-inference does: `/dev/videoN` →
//! `v4l2://`, a bare integer → `csi://`, a path → `file://`.

use anyhow::{bail, Context, Result};
use std::fmt;
use std::path::{Path, PathBuf};

/// A parsed `--source`.
#[derive(Clone, Debug, PartialEq)]
pub enum Uri {
    /// A V4L2 device node.
    V4l2(PathBuf),
    /// A Jetson CSI sensor id (GStreamer `nvarguscamerasrc`).
    Csi(u32),
    /// A network stream or anything else ffmpeg opens (`rtsp://`, `http://`, …).
    Url(String),
    /// A video file, one image, or a folder of images.
    File(PathBuf),
    /// rgb24 frames of `width × height` on standard input.
    Raw { width: usize, height: usize },
}

impl Uri {
    /// Parses a `--source` argument.
    pub fn parse(s: &str) -> Result<Uri> {
        let s = s.trim();
        if s.is_empty() {
            bail!("empty source URI");
        }
        if let Some(rest) = s.strip_prefix("v4l2://") {
            if rest.is_empty() {
                bail!("source {s}: expected v4l2:///dev/videoN");
            }
            return Ok(Uri::V4l2(PathBuf::from(rest)));
        }
        if let Some(rest) = s.strip_prefix("csi://") {
            let id = rest
                .parse()
                .with_context(|| format!("source {s}: expected csi://N with a sensor number"))?;
            return Ok(Uri::Csi(id));
        }
        if let Some(rest) = s.strip_prefix("raw://") {
            return parse_raw(s, rest);
        }
        if let Some(rest) = s.strip_prefix("file://") {
            return Ok(Uri::File(file_path(s, rest)?));
        }
        if let Some((scheme, _)) = s.split_once("://") {
            if !NETWORK_SCHEMES.contains(&scheme.to_ascii_lowercase().as_str()) {
                bail!(
                    "source {s}: unknown scheme '{scheme}://' (expected a path, v4l2://, csi://, raw://, file:// or one of {})",
                    NETWORK_SCHEMES
                        .iter()
                        .map(|n| format!("{n}://"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            return Ok(Uri::Url(s.to_string()));
        }
        if s.starts_with("/dev/video") {
            return Ok(Uri::V4l2(PathBuf::from(s)));
        }
        if let Ok(id) = s.parse::<u32>() {
            return Ok(Uri::Csi(id));
        }
        Ok(Uri::File(PathBuf::from(s)))
    }
}

/// Network schemes handed to ffmpeg.
const NETWORK_SCHEMES: &[&str] = &[
    "rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "rtp", "srt", "tcp",
];

fn parse_raw(s: &str, rest: &str) -> Result<Uri> {
    let usage = || {
        format!("source {s}: expected raw://-?w=WIDTH&h=HEIGHT (rgb24 frames on standard input)")
    };
    let (target, query) = rest.split_once('?').with_context(usage)?;
    if target != "-" {
        bail!("{}: only '-' (standard input) is supported", usage());
    }
    let (mut width, mut height) = (0usize, 0usize);
    for kv in query.split('&') {
        let (k, v) = kv.split_once('=').with_context(usage)?;
        let v: usize = v.parse().with_context(usage)?;
        match k {
            "w" | "width" => width = v,
            "h" | "height" => height = v,
            _ => bail!("{}: unknown parameter '{k}'", usage()),
        }
    }
    if width == 0 || height == 0 {
        bail!("{}", usage());
    }
    let max = super::MAX_FRAME_SIDE;
    if width > max || height > max {
        bail!("source {s}: frame {width}×{height} is larger than the limit of {max}×{max}");
    }
    Ok(Uri::Raw { width, height })
}

impl fmt::Display for Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Uri::V4l2(p) => write!(f, "v4l2://{}", p.display()),
            Uri::Csi(n) => write!(f, "csi://{n}"),
            Uri::Url(u) => write!(f, "{u}"),
            Uri::File(p) => write!(f, "file://{}", p.display()),
            Uri::Raw { width, height } => write!(f, "raw://-?w={width}&h={height}"),
        }
    }
}

/// MP4-family files, decoded in-process when their video is H.264.
pub fn is_mp4(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "mp4" | "m4v" | "mov"))
}

/// The path of a `file://` URI (RFC 8089): `file:///abs/path` or
/// `file://localhost/abs/path`, percent-decoded (`%20` is a space); a
/// relative `file://dir/x` is read relative to the working folder, as
/// before.
fn file_path(uri: &str, rest: &str) -> Result<PathBuf> {
    let rest = match rest.strip_prefix("localhost/") {
        Some(abs) => format!("/{abs}"),
        None => rest.to_string(),
    };
    let bytes = rest.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .with_context(|| format!("source {uri}: '%' must be followed by two hex digits"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    use std::os::unix::ffi::OsStringExt;
    Ok(PathBuf::from(std::ffi::OsString::from_vec(out)))
}
