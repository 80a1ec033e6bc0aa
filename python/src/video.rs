//! `VideoSource` and `VideoOutput`: frames in and overlays out by the
//! CLI's URIs (`--source`, `--output`), as jetson-inference's videoSource
//! and videoOutput are used: iterate frames, render each with its result.

use crate::array;
use crate::net::Result as Answered;
use ersm::faces::{Cover, Hold};
use ersm::live::stats::Info;
use ersm::live::{http, Live, Shot, Target};
use ersm::overlay::{self, OverlayWriter};
use ersm::source::{self, Frame, Looping, Source, SourceOptions, Uri};
use pyo3::exceptions::{PyStopIteration, PyValueError};
use pyo3::prelude::*;
use std::sync::{Mutex, MutexGuard, PoisonError};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic inside ersm is caught and raised; the state it left is still
    // the last good one.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Frames from a camera, a video file, a folder of images or a network
/// stream, by the CLI's `--source` URIs. Iterating yields `H × W × 3`
/// uint8 RGB arrays until the stream ends.
#[pyclass(module = "ersm", frozen)]
pub struct VideoSource {
    uri: String,
    described: String,
    live: bool,
    fps: f64,
    frame_count: Option<usize>,
    inner: Mutex<Option<Box<dyn Source>>>,
    /// Unblocks a capture waiting on a subprocess, from `close()`.
    stopper: Option<source::Stopper>,
    last_name: Mutex<String>,
}

#[pymethods]
impl VideoSource {
    #[new]
    #[pyo3(signature = (uri, *, width=0, height=0, fps=0.0, r#loop=false))]
    fn new(
        py: Python<'_>,
        uri: &str,
        width: usize,
        height: usize,
        fps: f64,
        r#loop: bool,
    ) -> PyResult<VideoSource> {
        let parsed = Uri::parse(uri).map_err(crate::error)?;
        let opts = SourceOptions {
            width,
            height,
            fps,
            stall_timeout: Some(std::time::Duration::from_secs(10)),
        };
        let opened = py
            .detach(|| source::open(&parsed, &opts))
            .map_err(crate::error)?;
        let mut inner: Box<dyn Source> = opened;
        let (described, live, src_fps) = (inner.describe(), inner.is_live(), inner.fps());
        let frame_count = inner.frame_count().filter(|_| !r#loop);
        if r#loop {
            inner = Box::new(Looping::new(parsed, opts, inner));
        }
        Ok(VideoSource {
            uri: uri.to_string(),
            described,
            live,
            fps: src_fps,
            frame_count,
            stopper: inner.stopper(),
            inner: Mutex::new(Some(inner)),
            last_name: Mutex::new(String::new()),
        })
    }

    /// The next frame (`H × W × 3` uint8 RGB), or None at the end of the
    /// stream. The GIL is released while it waits.
    fn capture(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        let next = py.detach(|| -> anyhow::Result<Option<Frame>> {
            let mut g = lock(&self.inner);
            let Some(src) = g.as_mut() else {
                anyhow::bail!("source {}: closed", self.uri);
            };
            src.next_frame()
        });
        match next.map_err(crate::error)? {
            Some(f) => {
                *lock(&self.last_name) = f.name;
                Ok(Some(array::to_numpy(py, f.rgb, f.width, f.height)?))
            }
            None => Ok(None),
        }
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.capture(py)?
            .ok_or_else(|| PyStopIteration::new_err(()))
    }

    /// Stops reading: a capture after this raises `ersm.Error`.
    fn close(&self, py: Python<'_>) {
        if let Some(stop) = &self.stopper {
            stop();
        }
        // Without the GIL: a capture in another thread may hold the source
        // until the stopper ends its wait, and a subprocess source waits
        // for its child on drop.
        py.detach(|| drop(lock(&self.inner).take()));
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.close(py);
        false
    }

    /// The URI it was opened with.
    #[getter]
    fn uri(&self) -> String {
        self.uri.clone()
    }

    /// One line saying what is read, and how.
    #[getter]
    fn description(&self) -> String {
        self.described.clone()
    }

    /// A camera or network stream (drops frames when inference lags).
    #[getter]
    fn is_live(&self) -> bool {
        self.live
    }

    /// Frames per second the source delivers, when known (0 otherwise).
    #[getter]
    fn fps(&self) -> f64 {
        self.fps
    }

    /// Frames in the stream, when known in advance.
    #[getter]
    fn frame_count(&self) -> Option<usize> {
        self.frame_count
    }

    /// The last frame's name (file and frame number), for messages.
    #[getter]
    fn frame_name(&self) -> String {
        lock(&self.last_name).clone()
    }

    fn __repr__(&self) -> String {
        format!("ersm.VideoSource('{}')", self.uri)
    }
}

/// Where a `VideoOutput` writes.
enum Sink {
    /// A video file or a folder of PNGs.
    File(OverlayWriter),
    /// The HTTP server (viewer, MJPEG, /metrics, /status), bound at once
    /// and serving from the first frame on.
    Http(Option<http::Bound>),
    /// RTP or RTSP through ffmpeg, started at the first frame.
    Stream(Option<OverlayWriter>),
}

struct OutState {
    sink: Sink,
    /// The live outputs once the first frame has come.
    live: Option<Live>,
    hold: Hold,
    frames: usize,
    closed: bool,
}

/// Overlays out by the CLI's `--output` URIs: a video file (`.mp4`, …) or a
/// folder of PNGs, `http://HOST:PORT` (the live viewer, MJPEG and
/// `/metrics`), `rtp://` or `rtsp://`. `render` draws a frame with its
/// result (the kept tokens, the labels, the faces) — or, with
/// `anonymize`, covers the faces and draws nothing else.
#[pyclass(module = "ersm", frozen)]
pub struct VideoOutput {
    uri: String,
    cover: Option<Cover>,
    address: Option<String>,
    state: Mutex<OutState>,
}

#[pymethods]
impl VideoOutput {
    #[new]
    #[pyo3(signature = (uri, *, fps=30.0, anonymize=None, hold=3))]
    fn new(
        py: Python<'_>,
        uri: &str,
        fps: f64,
        anonymize: Option<&str>,
        hold: usize,
    ) -> PyResult<VideoOutput> {
        let cover = anonymize
            .map(|a| a.parse::<Cover>())
            .transpose()
            .map_err(|e| PyValueError::new_err(format!("anonymize: {e:#}")))?;
        let target = Target::parse(uri).map_err(crate::error)?;
        let (sink, address) = py
            .detach(|| -> anyhow::Result<(Sink, Option<String>)> {
                Ok(match target {
                    Target::File(path) => (
                        Sink::File(OverlayWriter::create("VideoOutput", &path, fps)?),
                        None,
                    ),
                    Target::Http(addr) => {
                        let b = http::Bound::bind(addr, uri)?;
                        let a = format!("http://{}/", b.addr());
                        (Sink::Http(Some(b)), Some(a))
                    }
                    Target::Stream(url) => (Sink::Stream(Some(OverlayWriter::stream(&url)?)), None),
                })
            })
            .map_err(crate::error)?;
        Ok(VideoOutput {
            uri: uri.to_string(),
            cover,
            address,
            state: Mutex::new(OutState {
                sink,
                live: None,
                hold: Hold::new(hold),
                frames: 0,
                closed: false,
            }),
        })
    }

    /// Draws `frame` with `result` (from `Net.process` on that frame) and
    /// sends it on. `bgr=True` for a frame in OpenCV's order.
    #[pyo3(signature = (frame, result, *, bgr=false))]
    fn render(
        &self,
        py: Python<'_>,
        frame: &Bound<'_, PyAny>,
        result: &Bound<'_, Answered>,
        bgr: bool,
    ) -> PyResult<()> {
        let f = array::frame(frame, bgr)?;
        let r = result.get();
        if (f.width, f.height) != (r.inf.width, r.inf.height) {
            return Err(PyValueError::new_err(format!(
                "render: the frame is {}×{} but the result is of a {}×{} frame",
                f.width, f.height, r.inf.width, r.inf.height
            )));
        }
        let frame = Frame {
            name: format!("#{}", r.index),
            width: f.width,
            height: f.height,
            rgb: f.pixels.rgb().to_vec(),
        };
        py.detach(|| self.send(frame, r)).map_err(crate::error)
    }

    /// Finishes the output (the video file is closed, the server stops).
    /// Raises `ersm.Error` naming what failed on the way.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.finish()).map_err(crate::error)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }

    /// The URI it was opened with.
    #[getter]
    fn uri(&self) -> String {
        self.uri.clone()
    }

    /// For `http://`, the viewer's address (with the port bound, when 0
    /// was asked); else None.
    #[getter]
    fn address(&self) -> Option<String> {
        self.address.clone()
    }

    /// Frames rendered so far.
    #[getter]
    fn frames(&self) -> usize {
        lock(&self.state).frames
    }

    fn __repr__(&self) -> String {
        format!("ersm.VideoOutput('{}')", self.uri)
    }
}

impl VideoOutput {
    fn send(&self, frame: Frame, r: &Answered) -> anyhow::Result<()> {
        let mut st = lock(&self.state);
        anyhow::ensure!(!st.closed, "VideoOutput {}: closed", self.uri);
        let p = &*r.pipeline;
        let shown = match self.cover {
            Some(_) => st.hold.update(r.inf.answer.faces()),
            None => r.inf.answer.faces().to_vec(),
        };
        let caption = r.inf.caption(p);
        let pre = &p.model.manifest.preprocess;
        let index = st.frames;
        st.frames += 1;
        let OutState { sink, live, .. } = &mut *st;
        if let Sink::File(w) = sink {
            let img = overlay::picture(&frame, &r.inf.ersm.mask, pre, &shown, self.cover, &caption);
            return w
                .write(&img, frame.width, frame.height)
                .map_err(|e| e.context(format!("VideoOutput {}", self.uri)));
        }
        if live.is_none() {
            let info = Info {
                model: p.model.manifest.name.clone(),
                source: "Python".into(),
                device: p.device().name().into(),
                threads: p.threads.count(),
                compare: r.inf.dense.is_some(),
                fallback: p.fallback.is_some(),
            };
            let (bound, streams) = match sink {
                Sink::Http(b) => (b.take(), Vec::new()),
                Sink::Stream(w) => (None, w.take().into_iter().collect()),
                Sink::File(_) => (None, Vec::new()),
            };
            *live = Some(Live::start(bound, streams, info, pre.clone())?);
        }
        let Some(l) = live.as_ref() else {
            return Ok(());
        };
        l.record(r.inf.record(p, index, &frame.name), 0);
        if l.wants_picture() {
            l.offer(Shot {
                frame,
                mask: r.inf.ersm.mask.clone(),
                caption,
                faces: shown,
                cover: self.cover,
            });
        }
        Ok(())
    }

    fn finish(&self) -> anyhow::Result<()> {
        let mut st = lock(&self.state);
        if st.closed {
            return Ok(());
        }
        st.closed = true;
        let mut errors = Vec::new();
        if let Sink::File(w) = &mut st.sink {
            if let Err(e) = w.finish() {
                errors.push(format!("{e:#}"));
            }
        }
        if let Some(mut l) = st.live.take() {
            errors.extend(l.finish("closed"));
        }
        anyhow::ensure!(
            errors.is_empty(),
            "VideoOutput {}: {}",
            self.uri,
            errors.join("; ")
        );
        Ok(())
    }
}

impl Drop for VideoOutput {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            log::error!("{e:#}");
        }
    }
}
