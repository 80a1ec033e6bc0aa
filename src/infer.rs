//! One frame in, its answer out: ERSM on an RGB buffer (and the dense
//! baseline beside it when asked), read by the package's reader. This is
//! the per-frame call the Python package wraps; it borrows the caller's
//! pixels instead of taking a `Frame`, so a numpy array is read in place.

use crate::answer::{Answer, Comparison};
use crate::caption::{self, Line};
use crate::live::stats::FrameRecord;
use crate::pipeline::{DenseResult, ErsmResult, Pipeline, StageTimes};
use crate::preprocess::preprocess;
use anyhow::{Context, Result};
use std::time::Instant;

/// Everything one frame gave.
#[derive(Clone, Debug)]
pub struct Inference {
    /// Frame size in pixels.
    pub width: usize,
    pub height: usize,
    /// The ERSM path's outputs, mask and times.
    pub ersm: ErsmResult,
    /// What ERSM's outputs say.
    pub answer: Answer,
    /// Suffix multiply-accumulates spent, as a fraction of the dense suffix.
    pub suffix_compute: f64,
    /// The dense baseline on the same frame, when asked for.
    pub dense: Option<DenseInference>,
}

/// The dense baseline's side of one frame.
#[derive(Clone, Debug)]
pub struct DenseInference {
    pub result: DenseResult,
    pub answer: Answer,
    /// ERSM's answer against this one.
    pub comparison: Comparison,
}

/// Runs ERSM on `rgb` (`height × width × 3` bytes, row-major RGB), and the
/// dense baseline after it when `dense`. `name` labels errors.
pub fn infer(
    pipeline: &Pipeline,
    rgb: &[u8],
    width: usize,
    height: usize,
    name: &str,
    dense: bool,
) -> Result<Inference> {
    let m = &pipeline.model;
    let t = Instant::now();
    let input = preprocess(rgb, width, height, &m.manifest.preprocess)
        .with_context(|| format!("frame {name}"))?;
    let pre = t.elapsed().as_secs_f64() * 1e3;
    let mut ersm = pipeline
        .ersm_from_input(&input)
        .with_context(|| format!("frame {name}"))?;
    ersm.times.preprocess = pre;
    let answer = m.reader.read(&ersm.logits, width, height)?;
    let suffix_compute = ersm.suffix_macs(&m.plan) as f64 / m.plan.dense_cost().max(1) as f64;
    let dense = if dense {
        let (logits, mut times) = pipeline
            .dense_from_input(&input)
            .with_context(|| format!("frame {name}: dense baseline"))?;
        // Both paths read the same pre-processed input.
        times.preprocess = pre;
        let d = m.reader.read(&logits, width, height)?;
        Some(DenseInference {
            comparison: Comparison::of(&answer, &d),
            answer: d,
            result: DenseResult { logits, times },
        })
    } else {
        None
    };
    Ok(Inference {
        width,
        height,
        ersm,
        answer,
        suffix_compute,
        dense,
    })
}

impl Inference {
    /// ERSM's and (when it ran) dense's stage times.
    pub fn times(&self) -> (StageTimes, Option<StageTimes>) {
        (self.ersm.times, self.dense.as_ref().map(|d| d.result.times))
    }

    /// The frame as the live statistics (`/metrics`, `/status`) record it.
    pub fn record(&self, pipeline: &Pipeline, index: usize, name: &str) -> FrameRecord {
        let m = &pipeline.model.manifest;
        FrameRecord {
            index,
            name: name.to_string(),
            ersm: self.ersm.times,
            dense: self.dense.as_ref().map(|d| d.result.times),
            keep: self.ersm.mask.keep_ratio(),
            label: self.answer.label(m),
            dense_label: self.dense.as_ref().map(|d| d.answer.label(m)),
            agree: self.dense.as_ref().map(|d| d.comparison.agrees()),
            faces: match self.dense.as_ref().map(|d| d.comparison) {
                Some(Comparison::Faces(a)) => Some(a),
                _ => None,
            },
            fell_back: self.ersm.fell_back,
            suffix_compute: self.suffix_compute,
            warmup: false,
        }
    }

    /// The overlay's caption for this frame alone (the run's captions show
    /// recent medians instead).
    pub fn caption(&self, pipeline: &Pipeline) -> Vec<Line> {
        let m = &pipeline.model.manifest;
        let dense_label = self.dense.as_ref().map(|d| d.answer.label(m));
        caption::compose(
            &self.answer.label(m),
            dense_label.as_deref(),
            self.ersm.mask.keep_ratio(),
            (
                self.ersm.times.total(),
                self.dense.as_ref().map(|d| d.result.times.total()),
            ),
            self.ersm.fell_back,
        )
    }
}
