//! Frame sources by URI, as jetson-inference names them: `v4l2://`,
//! `csi://`, `rtsp://` (and any URL ffmpeg reads), `file://` or a bare path
//! (video, image, folder of images) and `raw://-` (rgb24 on standard input).

pub mod convert;
pub mod images;
pub mod mp4;
pub mod process;
pub mod raw;
pub mod uri;
pub mod v4l2;
pub mod video;

use anyhow::{Context, Result};
use std::sync::Arc;
pub use uri::Uri;

/// One decoded RGB frame.
#[derive(Clone, Debug)]
pub struct Frame {
    /// Where it came from (file name, frame number), for logs and errors.
    pub name: String,
    pub width: usize,
    pub height: usize,
    /// `height × width × 3` bytes, row-major RGB.
    pub rgb: Vec<u8>,
}

/// Kills what a blocked `next_frame` waits on (a subprocess), from another thread.
pub type Stopper = Arc<dyn Fn() + Send + Sync>;

/// A stream of frames.
pub trait Source: Send {
    /// The next frame; `Ok(None)` at the end of the stream.
    fn next_frame(&mut self) -> Result<Option<Frame>>;
    /// One line saying what is being read, and in what mode.
    fn describe(&self) -> String;
    /// Live sources (cameras, network streams) drop frames when inference
    /// falls behind; files and folders do not.
    fn is_live(&self) -> bool {
        false
    }
    /// Frames per second the source delivers, when known (0 otherwise).
    fn fps(&self) -> f64 {
        0.0
    }
    /// Inputs skipped so far because they could not be read (an image that
    /// does not decode); the run summary counts them.
    fn skipped(&self) -> u64 {
        0
    }
    /// Frames in the stream, when known in advance.
    fn frame_count(&self) -> Option<usize> {
        None
    }
    /// The frames' size (width, height) when every frame has it and it is
    /// known before the first (a video, a camera, a single image; not a
    /// folder of images).
    fn size(&self) -> Option<(usize, usize)> {
        None
    }
    /// A way to unblock a stalled `next_frame` from another thread.
    fn stopper(&self) -> Option<Stopper> {
        None
    }
}

/// What the `--input-*` flags request of a source.
#[derive(Clone, Debug, Default)]
pub struct SourceOptions {
    /// Requested capture size (cameras) or output size (ffmpeg); 0 = the source's own.
    pub width: usize,
    pub height: usize,
    /// Requested frame rate (cameras); 0 = the source's own.
    pub fps: f64,
    /// How long opening a network source may wait for an answer (its
    /// probe); `None`: no limit.
    pub stall_timeout: Option<std::time::Duration>,
}

/// Largest frame side a source may deliver or be asked for (pixels): frame
/// buffers are sized from it before any frame arrives.
pub const MAX_FRAME_SIDE: usize = 16_384;

/// Opens the source `uri` names. Fails fast, naming the device, file or tool.
pub fn open(uri: &Uri, opts: &SourceOptions) -> Result<Box<dyn Source>> {
    Ok(match uri {
        Uri::V4l2(path) => Box::new(v4l2::V4l2Source::open(path, opts)?),
        Uri::Csi(sensor) => Box::new(process::csi(*sensor, opts)?),
        Uri::Url(url) => Box::new(process::ffmpeg(url, opts, true)?),
        Uri::Raw { width, height } => Box::new(raw::RawSource::stdin(*width, *height)?),
        Uri::File(path) => {
            if path.is_dir() || images::is_image(path) {
                Box::new(images::ImageSource::open(path)?)
            } else if !path.exists() {
                anyhow::bail!(
                    "source {}: {}",
                    path.display(),
                    crate::files::why_missing(path)
                );
            } else if uri::is_mp4(path) {
                match video::Mp4Source::open(path) {
                    Ok(s) => Box::new(s),
                    Err(e) => match e.downcast_ref::<mp4::NeedsFfmpeg>() {
                        Some(why) => {
                            let why = why.to_string();
                            log::info!("{}: {why}; decoding it with ffmpeg", path.display());
                            Box::new(
                                process::ffmpeg(&path.to_string_lossy(), opts, false)
                                    .with_context(|| format!("source {}: {why}", path.display()))?,
                            )
                        }
                        None => return Err(e),
                    },
                }
            } else {
                Box::new(process::ffmpeg(&path.to_string_lossy(), opts, false)?)
            }
        }
    })
}

/// Replays a finite source from the start when it ends (`--loop`).
pub struct Looping {
    uri: Uri,
    opts: SourceOptions,
    inner: Box<dyn Source>,
    /// Frames the current pass gave; a pass with none ends the loop.
    this_pass: usize,
}

impl Looping {
    /// Wraps an opened source; it is re-opened from `uri` at each end.
    pub fn new(uri: Uri, opts: SourceOptions, inner: Box<dyn Source>) -> Looping {
        Looping {
            uri,
            opts,
            inner,
            this_pass: 0,
        }
    }
}

impl Source for Looping {
    fn next_frame(&mut self) -> Result<Option<Frame>> {
        loop {
            if let Some(f) = self.inner.next_frame()? {
                self.this_pass += 1;
                return Ok(Some(f));
            }
            if self.this_pass == 0 {
                return Ok(None);
            }
            log::debug!("end of {}: looping", self.uri);
            self.inner = open(&self.uri, &self.opts)?;
            self.this_pass = 0;
        }
    }
    fn describe(&self) -> String {
        format!("{} (looping)", self.inner.describe())
    }
    fn is_live(&self) -> bool {
        self.inner.is_live()
    }
    fn stopper(&self) -> Option<Stopper> {
        self.inner.stopper()
    }
    fn fps(&self) -> f64 {
        self.inner.fps()
    }
    fn size(&self) -> Option<(usize, usize)> {
        self.inner.size()
    }
}
