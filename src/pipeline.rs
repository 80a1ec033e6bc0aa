//! The per-frame stages, timed: pre-process → prefix → ersm → suffix, and the
//! dense baseline (pre-process → prefix → dense suffix, all tract) beside it.

use crate::ersm::{Device, FeatureMap, TokenMask};
use crate::model::ModelPackage;
use crate::preprocess::preprocess;
use crate::source::Frame;
use anyhow::{Context, Result};
use std::time::Instant;

/// Wall-clock time of each stage of one frame, milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StageTimes {
    pub preprocess: f64,
    pub prefix: f64,
    /// The energy layer (zero for the dense baseline).
    pub ersm: f64,
    pub suffix: f64,
    /// The energy kernel alone by CUDA events (zero on CPU); inside `ersm`.
    pub ersm_kernel: f64,
}

impl StageTimes {
    /// Sum of the stages.
    pub fn total(&self) -> f64 {
        self.preprocess + self.prefix + self.ersm + self.suffix
    }
}

/// What the ERSM path gives for one frame.
#[derive(Clone, Debug)]
pub struct ErsmResult {
    pub logits: Vec<f32>,
    pub mask: TokenMask,
    pub times: StageTimes,
}

/// What the dense baseline gives for one frame.
#[derive(Clone, Debug)]
pub struct DenseResult {
    pub logits: Vec<f32>,
    pub times: StageTimes,
}

/// A loaded model and the device its energy layer runs on.
pub struct Pipeline {
    pub model: ModelPackage,
    pub device: Device,
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

impl Pipeline {
    /// Wraps a loaded model.
    pub fn new(model: ModelPackage, device: Device) -> Pipeline {
        Pipeline { model, device }
    }

    /// The model's label for class `i`.
    pub fn manifest_label(&self, i: usize) -> String {
        self.model.manifest.label(i)
    }

    /// Frame → input tensor.
    pub fn preprocess(&self, frame: &Frame) -> Result<Vec<f32>> {
        preprocess(
            &frame.rgb,
            frame.width,
            frame.height,
            &self.model.manifest.preprocess,
        )
        .with_context(|| format!("frame {}", frame.name))
    }

    /// Runs the ERSM path on a pre-processed input.
    pub fn ersm_from_input(&self, input: &[f32]) -> Result<(Vec<f32>, TokenMask, StageTimes)> {
        let mut times = StageTimes::default();
        let t = Instant::now();
        let features = self.model.prefix.run(input).context("prefix")?;
        times.prefix = ms(t);
        let t = Instant::now();
        let cut = &self.model.cut;
        let fmap = FeatureMap::new(&features, cut.c, cut.h, cut.w)?;
        let mask = self
            .device
            .compute(fmap, &self.model.energy)
            .context("energy layer")?;
        times.ersm = ms(t);
        let t = Instant::now();
        let (out, frame) = self
            .model
            .plan
            .run(&mask.kept, mask.features.clone())
            .context("sparse suffix")?;
        let logits = out.to_dense(&frame.sets).1;
        times.suffix = ms(t);
        Ok((logits, mask, times))
    }

    /// Runs the dense baseline on a pre-processed input.
    pub fn dense_from_input(&self, input: &[f32]) -> Result<(Vec<f32>, StageTimes)> {
        let mut times = StageTimes::default();
        let t = Instant::now();
        let features = self.model.prefix.run(input).context("prefix")?;
        times.prefix = ms(t);
        let t = Instant::now();
        let logits = self
            .model
            .dense_suffix
            .run(&features)
            .context("dense suffix")?;
        times.suffix = ms(t);
        Ok((logits, times))
    }

    /// The whole ERSM path on one frame.
    pub fn run_ersm(&self, frame: &Frame) -> Result<ErsmResult> {
        let t = Instant::now();
        let input = self.preprocess(frame)?;
        let pre = ms(t);
        let (logits, mask, mut times) = self.ersm_from_input(&input)?;
        times.preprocess = pre;
        Ok(ErsmResult {
            logits,
            mask,
            times,
        })
    }

    /// The whole dense baseline on one frame.
    pub fn run_dense(&self, frame: &Frame) -> Result<DenseResult> {
        let t = Instant::now();
        let input = self.preprocess(frame)?;
        let pre = ms(t);
        let (logits, mut times) = self.dense_from_input(&input)?;
        times.preprocess = pre;
        Ok(DenseResult { logits, times })
    }
}

/// Index of the largest logit.
pub fn top1(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best
}
