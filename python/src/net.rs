//! `Net` (a loaded model package and where it runs) and what it answers
//! for a frame: `Result`, with its `Class`es or `Face`s, and `Dense`, the
//! dense baseline's side when it was asked for.

use crate::array;
use ersm::answer::{Answer, Comparison};
use ersm::ersm::DeviceChoice;
use ersm::infer::{infer, Inference};
use ersm::pipeline::{Pipeline, StageTimes};
use numpy::ndarray::Array2;
use numpy::{PyArray1, PyArray2};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A model package loaded and placed: the prefix, the energy layer and the
/// sparse suffix, with the dense baseline of the same network beside them.
#[pyclass(module = "ersm", frozen)]
pub struct Net {
    pub(crate) pipeline: Arc<Pipeline>,
    frames: AtomicUsize,
}

#[pymethods]
impl Net {
    #[new]
    #[pyo3(signature = (model=None, *, device="auto", threads=None, input_size=None, fallback=false, track=false))]
    fn new(
        py: Python<'_>,
        model: Option<PathBuf>,
        device: &str,
        threads: Option<usize>,
        input_size: Option<(usize, usize)>,
        fallback: bool,
        track: bool,
    ) -> PyResult<Net> {
        let device = match device {
            "cpu" => DeviceChoice::Cpu,
            "cuda" => DeviceChoice::Cuda,
            "auto" => DeviceChoice::Auto,
            d => {
                return Err(PyValueError::new_err(format!(
                    "device: '{d}' is not one of 'cpu', 'cuda', 'auto'"
                )))
            }
        };
        if let Some((w, h)) = input_size {
            for (what, v) in [("width", w), ("height", h)] {
                if !(32..=4096).contains(&v) {
                    return Err(PyValueError::new_err(format!(
                        "input_size: {what} {v} is not within 32-4096"
                    )));
                }
            }
        }
        // Warnings (a thread count capped, a GPU not usable) reach stderr;
        // RUST_LOG=info shows what the CLI shows.
        let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
            .try_init();
        let opts = ersm::cli::PipelineOptions {
            model,
            device,
            threads,
            input_size,
            fallback,
            // With `track`, the frames `process` is given, in the order it
            // is called, are one stream (`new_stream` starts another).
            track,
        };
        let pipeline = py.detach(|| ersm::cli::load(&opts)).map_err(crate::error)?;
        Ok(Net {
            pipeline: Arc::new(pipeline),
            frames: AtomicUsize::new(0),
        })
    }

    /// Runs ERSM on one frame (`H × W × 3` uint8, RGB; `bgr=True` for
    /// OpenCV's order), and the dense baseline after it when `dense=True`.
    /// The array is read in place; the GIL is released while it runs.
    #[pyo3(signature = (frame, *, bgr=false, dense=false))]
    fn process(
        &self,
        py: Python<'_>,
        frame: &Bound<'_, PyAny>,
        bgr: bool,
        dense: bool,
    ) -> PyResult<Result> {
        let f = array::frame(frame, bgr)?;
        let index = self.frames.fetch_add(1, Ordering::Relaxed);
        let rgb = f.pixels.rgb();
        let (w, h) = (f.width, f.height);
        let p = &*self.pipeline;
        let name = format!("#{index}");
        let inf = py
            .detach(|| infer(p, rgb, w, h, &name, dense))
            .map_err(crate::error)?;
        Ok(Result {
            inf,
            pipeline: self.pipeline.clone(),
            index,
        })
    }

    /// Forgets the faces of the frames before: the next frame starts a new
    /// stream (with `track=True`; otherwise nothing to forget).
    fn new_stream(&self) {
        self.pipeline.new_stream();
    }

    /// True when frames are tracked (`track=True`).
    #[getter]
    fn tracking(&self) -> bool {
        self.pipeline.tracking()
    }

    /// The package's name (its manifest's).
    #[getter]
    fn name(&self) -> String {
        self.pipeline.model.manifest.name.clone()
    }

    /// The model file the package loaded.
    #[getter]
    fn path(&self) -> PathBuf {
        self.pipeline.model.origin.clone()
    }

    /// "classifier" or "detector".
    #[getter]
    fn kind(&self) -> &'static str {
        kind(&self.pipeline)
    }

    /// A classifier's labels, by class index (empty for a detector).
    #[getter]
    fn labels(&self) -> Vec<String> {
        self.pipeline.model.manifest.labels.clone()
    }

    /// The network's input, (width, height) pixels.
    #[getter]
    fn input_size(&self) -> (usize, usize) {
        let s = &self.pipeline.model.manifest.input.shape;
        (s[3], s[2])
    }

    /// Where the energy layer runs: "cpu" or the CUDA device's name.
    #[getter]
    fn device(&self) -> String {
        self.pipeline.device().name().to_string()
    }

    /// Where each stage runs, in one line.
    #[getter]
    fn placement(&self) -> String {
        self.pipeline.placement()
    }

    /// Worker threads the stages share.
    #[getter]
    fn threads(&self) -> usize {
        self.pipeline.threads.count()
    }

    fn __repr__(&self) -> String {
        format!(
            "ersm.Net('{}', {}, {}, {} thread(s))",
            self.pipeline.model.origin.display(),
            kind(&self.pipeline),
            self.pipeline.device().name(),
            self.pipeline.threads.count()
        )
    }
}

fn kind(p: &Pipeline) -> &'static str {
    if p.model.reader.is_detector() {
        "detector"
    } else {
        "classifier"
    }
}

/// A class and its softmax probability.
#[pyclass(module = "ersm", frozen, get_all)]
#[derive(Clone)]
pub struct Class {
    /// The class index.
    pub index: usize,
    /// Its label in the package's list.
    pub label: String,
    /// Softmax probability.
    pub prob: f32,
}

#[pymethods]
impl Class {
    fn __repr__(&self) -> String {
        format!(
            "ersm.Class({}, '{}', {:.4})",
            self.index, self.label, self.prob
        )
    }
}

/// A face found: its box and landmarks in frame pixels.
#[pyclass(module = "ersm", frozen, get_all)]
#[derive(Clone)]
pub struct Face {
    /// (x1, y1, x2, y2).
    pub r#box: (f32, f32, f32, f32),
    /// The heatmap's score at its centre.
    pub score: f32,
    /// Eyes, nose and mouth corners, (x, y) each.
    pub landmarks: Vec<(f32, f32)>,
}

#[pymethods]
impl Face {
    fn __repr__(&self) -> String {
        let (a, b, c, d) = self.r#box;
        format!(
            "ersm.Face(box=({a:.1}, {b:.1}, {c:.1}, {d:.1}), score={:.3})",
            self.score
        )
    }
}

fn classes(p: &Pipeline, logits: &[f32], answer: &Answer, k: usize) -> Vec<Class> {
    match answer {
        Answer::Class { .. } => ersm::logits::top_k(logits, k)
            .into_iter()
            .map(|(index, prob)| Class {
                index,
                label: p.model.manifest.label(index),
                prob,
            })
            .collect(),
        Answer::Faces(_) => Vec::new(),
    }
}

fn faces(answer: &Answer) -> Vec<Face> {
    answer
        .faces()
        .iter()
        .map(|d| Face {
            r#box: (d.x1, d.y1, d.x2, d.y2),
            score: d.score,
            landmarks: d.landmarks.iter().map(|l| (l[0], l[1])).collect(),
        })
        .collect()
}

fn times<'py>(py: Python<'py>, t: &StageTimes) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("preprocess", t.preprocess)?;
    d.set_item("prefix", t.prefix)?;
    d.set_item("ersm", t.ersm)?;
    d.set_item("suffix", t.suffix)?;
    d.set_item("total", t.total())?;
    d.set_item("ersm_kernel", t.ersm_kernel)?;
    Ok(d)
}

/// What ERSM answered for one frame (and the dense baseline, when asked).
#[pyclass(module = "ersm", frozen)]
pub struct Result {
    pub(crate) inf: Inference,
    pub(crate) pipeline: Arc<Pipeline>,
    /// The frame's number in its net's sequence.
    pub(crate) index: usize,
}

#[pymethods]
impl Result {
    /// "classifier" or "detector".
    #[getter]
    fn kind(&self) -> &'static str {
        kind(&self.pipeline)
    }

    /// A short answer: the top-1 label, or "N faces".
    #[getter]
    fn label(&self) -> String {
        self.inf.answer.label(&self.pipeline.model.manifest)
    }

    /// A classifier's most probable class (None for a detector).
    #[getter]
    fn top1(&self) -> Option<Class> {
        self.top5().into_iter().next()
    }

    /// A classifier's five most probable classes (empty for a detector).
    #[getter]
    fn top5(&self) -> Vec<Class> {
        classes(&self.pipeline, &self.inf.ersm.logits, &self.inf.answer, 5)
    }

    /// A detector's faces, in frame pixels (empty for a classifier).
    #[getter]
    fn faces(&self) -> Vec<Face> {
        faces(&self.inf.answer)
    }

    /// Fraction of the cut's tokens kept.
    #[getter]
    fn keep_ratio(&self) -> f64 {
        self.inf.ersm.mask.keep_ratio()
    }

    /// The kept tokens: a bool array of the cut's grid (H × W tokens).
    #[getter]
    fn mask<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<bool>>> {
        let m = &self.inf.ersm.mask;
        let mut a = Array2::from_elem((m.h, m.w), false);
        let flat = a
            .as_slice_mut()
            .ok_or_else(|| PyValueError::new_err("mask: not contiguous"))?;
        for &k in &m.kept {
            flat[k as usize] = true;
        }
        Ok(PyArray2::from_owned_array(py, a))
    }

    /// Raster indices of the kept tokens, ascending (uint32).
    #[getter]
    fn kept<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u32>> {
        PyArray1::from_slice(py, &self.inf.ersm.mask.kept)
    }

    /// Each token's final energy (H × W float32): kept where negative.
    #[getter]
    fn energies<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let m = &self.inf.ersm.mask;
        let a = Array2::from_shape_vec((m.h, m.w), m.energies.clone())
            .map_err(|e| PyValueError::new_err(format!("energies: {e}")))?;
        Ok(PyArray2::from_owned_array(py, a))
    }

    /// The network's outputs (every output flattened, one after another;
    /// a classifier's logits).
    #[getter]
    fn logits<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f32>> {
        PyArray1::from_slice(py, &self.inf.ersm.logits)
    }

    /// Milliseconds per stage: preprocess, prefix, ersm, suffix, total
    /// (and ersm_kernel: the energy kernel alone, on a GPU).
    #[getter]
    fn times<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        times(py, &self.inf.ersm.times)
    }

    /// Suffix multiply-adds spent, as a fraction of the dense suffix's.
    #[getter]
    fn suffix_compute(&self) -> f64 {
        self.inf.suffix_compute
    }

    /// The frame was unsure and re-run densely (`fallback=True`).
    #[getter]
    fn fell_back(&self) -> bool {
        self.inf.ersm.fell_back
    }

    /// The dense baseline on the same frame (`process(..., dense=True)`), else None.
    #[getter]
    fn dense(&self) -> Option<Dense> {
        self.inf.dense.as_ref().map(|d| Dense {
            logits: d.result.logits.clone(),
            times: d.result.times,
            top5: classes(&self.pipeline, &d.result.logits, &d.answer, 5),
            faces: faces(&d.answer),
            label: d.answer.label(&self.pipeline.model.manifest),
            comparison: d.comparison,
        })
    }

    /// ERSM agrees with dense (same class; every dense face found and no
    /// other); None when dense did not run.
    #[getter]
    fn agrees(&self) -> Option<bool> {
        self.inf.dense.as_ref().map(|d| d.comparison.agrees())
    }

    /// Frame size (width, height) in pixels.
    #[getter]
    fn size(&self) -> (usize, usize) {
        (self.inf.width, self.inf.height)
    }

    fn __repr__(&self) -> String {
        format!(
            "ersm.Result('{}', keep_ratio={:.3}, {:.1} ms)",
            self.label(),
            self.keep_ratio(),
            self.inf.ersm.times.total()
        )
    }
}

/// The dense baseline's answer on a frame.
#[pyclass(module = "ersm", frozen)]
pub struct Dense {
    logits: Vec<f32>,
    times: StageTimes,
    top5: Vec<Class>,
    faces: Vec<Face>,
    label: String,
    comparison: Comparison,
}

#[pymethods]
impl Dense {
    /// The dense network's outputs, as `Result.logits`.
    #[getter]
    fn logits<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f32>> {
        PyArray1::from_slice(py, &self.logits)
    }

    /// Milliseconds per stage (preprocess, prefix, suffix, total).
    #[getter]
    fn times<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        times(py, &self.times)
    }

    /// The most probable class (None for a detector).
    #[getter]
    fn top1(&self) -> Option<Class> {
        self.top5.first().cloned()
    }

    /// The five most probable classes (empty for a detector).
    #[getter]
    fn top5(&self) -> Vec<Class> {
        self.top5.clone()
    }

    /// The faces dense found (empty for a classifier).
    #[getter]
    fn faces(&self) -> Vec<Face> {
        self.faces.clone()
    }

    /// The top-1 label, or "N faces".
    #[getter]
    fn label(&self) -> String {
        self.label.clone()
    }

    /// For a detector, ERSM's faces matched to these at IoU ≥ 0.5: a dict
    /// of dense faces, found, matched, recall, precision, f1, mean_iou.
    #[getter]
    fn face_agreement<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Comparison::Faces(a) = self.comparison else {
            return Ok(None);
        };
        let d = PyDict::new(py);
        d.set_item("dense_faces", a.reference)?;
        d.set_item("found", a.found)?;
        d.set_item("matched", a.matched)?;
        d.set_item("recall", a.recall())?;
        d.set_item("precision", a.precision())?;
        d.set_item("f1", a.f1())?;
        d.set_item("mean_iou", a.mean_iou())?;
        Ok(Some(d))
    }

    fn __repr__(&self) -> String {
        format!("ersm.Dense('{}', {:.1} ms)", self.label, self.times.total())
    }
}
