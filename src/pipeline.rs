//! The per-frame stages, timed: pre-process → prefix → ersm → suffix, and the
//! dense baseline (pre-process → prefix → dense suffix, all tract) beside it.

use crate::ersm::cuda::{DeviceMap, MapSource};
use crate::ersm::{Device, FeatureMap, TokenMask};
use crate::model::ModelPackage;
use crate::prefix::{Output, TractNet};
use crate::preprocess::preprocess;
use crate::source::Frame;
use crate::sparse::gpu::{cuda::CudaDevice, DeviceTokens, GpuSuffix};
use crate::sparse::tokens::TokenSet;
use crate::sparse::value::{Shape, Value};
use crate::threads::Threads;
use anyhow::{Context, Result};
use std::sync::atomic::{AtomicU8, Ordering};
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
    /// The kept set and energies; its gathered rows went to the suffix
    /// without a copy, so `mask.features` is empty here.
    pub mask: TokenMask,
    pub times: StageTimes,
    /// The sparse result was unsure and the frame was re-run densely (its
    /// time is in the suffix stage).
    pub fell_back: bool,
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
    /// Confidence fallback: re-run the dense baseline's suffix when the sparse
    /// top-1 softmax margin is below this.
    pub fallback: Option<f32>,
    /// The threads the prefix, the sparse suffix and the dense baseline share.
    pub threads: Threads,
    /// The sparse suffix on the GPU, when the energy layer runs there and
    /// every suffix op has a kernel; otherwise the CPU executor runs it.
    pub gpu_suffix: Option<GpuSuffix<CudaDevice>>,
    /// The prefix and the dense baseline's suffix prepared by tract-cuda, when
    /// the energy layer runs on a GPU and tract-cuda can serve; otherwise
    /// tract's CPU plans run them.
    pub gpu_nets: Option<GpuNets>,
    /// How the last frame's features reached the GPU energy kernel:
    /// 0 not yet (or no kernel), 1 through the host, 2 in device memory.
    handoff: AtomicU8,
}

/// The tract nets a pipeline runs on the GPU.
pub struct GpuNets {
    /// The dense prefix.
    pub prefix: TractNet,
    /// The dense baseline's layers after the cut.
    pub dense: TractNet,
}

/// Fails when `v` holds NaN or an infinity, naming `what` and where: such a
/// frame has no answer, and must not be counted as one.
pub fn ensure_finite(v: &[f32], what: &str) -> Result<()> {
    match v.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(i) => anyhow::bail!(
            "the {what} hold {} at index {i} (of {}): non-finite values, the frame has no answer",
            v[i],
            v.len()
        ),
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

impl Pipeline {
    /// Wraps a loaded model.
    pub fn new(model: ModelPackage, device: Device) -> Pipeline {
        Pipeline {
            model,
            device,
            fallback: None,
            threads: Threads::single(),
            gpu_suffix: None,
            gpu_nets: None,
            handoff: AtomicU8::new(0),
        }
    }

    /// With the energy layer on a GPU, moves the prefix and the dense
    /// baseline there too (tract-cuda), so the comparison is GPU against GPU;
    /// where tract-cuda cannot serve, says why once and keeps tract's CPU plans.
    pub fn with_gpu_prefix(mut self) -> Pipeline {
        if !matches!(self.device, Device::Cuda(_)) {
            return self;
        }
        let nets = self.model.prefix.on_cuda().and_then(|prefix| {
            Ok(GpuNets {
                prefix,
                dense: self.model.baseline_suffix().on_cuda()?,
            })
        });
        match nets {
            Ok(n) => {
                log::info!("prefix and dense baseline on the GPU (tract-cuda)");
                self.gpu_nets = Some(n);
            }
            Err(e) => log::warn!("prefix and dense baseline stay on the CPU: {e:#}"),
        }
        self
    }

    /// Where each stage runs, for logs and reports: "prefix cpu, energy cuda,
    /// ...", and once a frame has run on a GPU, how its features reached the
    /// energy kernel.
    pub fn placement(&self) -> String {
        let handoff = match self.handoff.load(Ordering::Relaxed) {
            1 => "; features to the energy kernel through the host",
            2 => "; features to the energy kernel in device memory",
            _ => "",
        };
        format!(
            "prefix {}, energy {}, sparse suffix {}, dense baseline {}{handoff}",
            self.prefix_net().engine.name(),
            self.device.name(),
            match &self.gpu_suffix {
                Some(g) if g.device().captures() && g.stopped_capturing() => {
                    "cuda (kernel by kernel: capturing a frame as a CUDA graph failed)"
                }
                Some(g) if g.device().captures() => "cuda (frames as CUDA graphs)",
                Some(_) => "cuda",
                None => "cpu",
            },
            self.dense_net().engine.name()
        )
    }

    /// True once a frame's features reached the GPU energy kernel in device
    /// memory (the last frame's, when frames differ).
    pub fn features_stayed_on_device(&self) -> bool {
        self.handoff.load(Ordering::Relaxed) == 2
    }

    fn prefix_net(&self) -> &TractNet {
        self.gpu_nets
            .as_ref()
            .map_or(&self.model.prefix, |g| &g.prefix)
    }

    fn dense_net(&self) -> &TractNet {
        self.gpu_nets
            .as_ref()
            .map_or(self.model.baseline_suffix(), |g| &g.dense)
    }

    /// With the energy layer on a GPU, moves the sparse suffix there too;
    /// where that cannot be done (an op without a kernel, a failed compile),
    /// says why once and keeps the CPU suffix.
    pub fn with_gpu_suffix(mut self) -> Pipeline {
        if !matches!(self.device, Device::Cuda(_)) {
            return self;
        }
        let lowered = CudaDevice::new(0)
            .map_err(anyhow::Error::from)
            .and_then(|d| {
                let what = d.describe().to_string();
                GpuSuffix::new(d, &self.model.plan).map(|g| (g, what))
            });
        match lowered {
            Ok((g, what)) => {
                log::info!("sparse suffix on the GPU: {what}");
                self.gpu_suffix = Some(g);
            }
            Err(e) => log::warn!("sparse suffix stays on the CPU: {e:#}"),
        }
        self
    }

    /// Runs every stage on `threads` from now on.
    pub fn with_threads(mut self, threads: Threads) -> Pipeline {
        self.threads = threads;
        self
    }

    /// Turns the confidence fallback on with the margin the manifest sets.
    pub fn with_fallback(mut self) -> Result<Pipeline> {
        let f = self.model.manifest.fallback.as_ref().with_context(|| {
            format!(
                "model {}: the manifest sets no fallback margin",
                self.model.origin.display()
            )
        })?;
        self.fallback = Some(f.margin);
        Ok(self)
    }

    /// True when the fallback is on and `logits` are unsure: their top-1 margin
    /// is below the package's.
    pub fn unsure(&self, logits: &[f32]) -> bool {
        self.fallback.is_some_and(|m| top1_margin(logits) < m)
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

    /// Runs the ERSM path on a pre-processed input: logits, mask, stage times,
    /// and whether the confidence fallback re-ran it densely.
    pub fn ersm_from_input(
        &self,
        input: &[f32],
    ) -> Result<(Vec<f32>, TokenMask, StageTimes, bool)> {
        self.threads.install(|| self.ersm_on_threads(input))
    }

    /// The prefix's feature map for a pre-processed input (finite, or an error).
    pub fn features(&self, input: &[f32]) -> Result<Vec<f32>> {
        let features = self.prefix_output(input)?.to_vec().context("prefix")?;
        ensure_finite(&features, "prefix features")?;
        Ok(features)
    }

    /// The sparse suffix's logits for the gathered `rows` of the `kept` tokens
    /// (finite, or an error).
    pub fn sparse_logits(&self, kept: &[u32], rows: Vec<f32>) -> Result<Vec<f32>> {
        match &self.gpu_suffix {
            Some(g) => suffix_logits(
                &self.model.plan,
                g.run(&self.model.plan, kept, &rows)
                    .context("sparse suffix (GPU)")?,
            ),
            None => suffix_logits(
                &self.model.plan,
                self.model.plan.run(kept, rows).context("sparse suffix")?,
            ),
        }
    }

    /// The dense baseline's logits for a prefix feature map (finite, or an error).
    pub fn dense_logits(&self, features: &[f32]) -> Result<Vec<f32>> {
        let logits = self.dense_net().run(features).context("dense suffix")?;
        ensure_finite(&logits, "dense logits")?;
        Ok(logits)
    }

    /// The prefix's output as tract hands it over: on the GPU it stays in
    /// device memory unless something reads it on the host.
    fn prefix_output(&self, input: &[f32]) -> Result<Output> {
        let out = self.prefix_net().run_output(input).context("prefix")?;
        let cut = &self.model.cut;
        anyhow::ensure!(
            out.len() == cut.c * cut.h * cut.w,
            "prefix: {} values, the cut is {}×{}×{}",
            out.len(),
            cut.c,
            cut.h,
            cut.w
        );
        Ok(out)
    }

    /// The dense baseline's suffix on the prefix's output; between two
    /// tract-cuda plans the features stay on the device.
    fn dense_logits_from(&self, features: &Output) -> Result<Vec<f32>> {
        let logits = self
            .dense_net()
            .run_from(features)
            .context("dense suffix")?;
        ensure_finite(&logits, "dense logits")?;
        Ok(logits)
    }

    fn ersm_on_threads(&self, input: &[f32]) -> Result<(Vec<f32>, TokenMask, StageTimes, bool)> {
        let mut times = StageTimes::default();
        let t = Instant::now();
        let features = self.prefix_output(input)?;
        // The tract-cuda prefix's output is read where it is; the host values
        // (tract's own buffer, not a copy) serve the CPU energy layer, or a
        // GPU output tract-cuda had to copy out.
        let on_device = match (&self.device, features.device_ptr()) {
            (Device::Cuda(_), Some(ptr)) => Some(ptr),
            _ => None,
        };
        if matches!(self.device, Device::Cuda(_)) {
            let how = if on_device.is_some() { 2 } else { 1 };
            self.handoff.store(how, Ordering::Relaxed);
        }
        let host: &[f32] = match on_device {
            Some(_) => &[],
            None => {
                let v = features.values().context("prefix")?;
                ensure_finite(v, "prefix features")?;
                v
            }
        };
        times.prefix = ms(t);
        let t = Instant::now();
        let cut = &self.model.cut;
        let source = match on_device {
            Some(ptr) => MapSource::Device(DeviceMap {
                ptr,
                c: cut.c,
                h: cut.h,
                w: cut.w,
            }),
            None => MapSource::Host(FeatureMap::new(host, cut.c, cut.h, cut.w)?),
        };
        let (mask, logits, suffix_started) = match (&self.device, &self.gpu_suffix) {
            // Energy kernel and suffix both on the GPU: the gathered rows go
            // from one to the other in device memory, and the suffix is
            // launched behind the kernel without waiting for it, so `ersm`
            // is the kernel's launch and `suffix` includes the GPU finishing
            // it (its own GPU time is `ersm_kernel`).
            (Device::Cuda(backend), Some(gpu)) => {
                let mut suffix_started = Instant::now();
                let (mask, out) = backend
                    .compute_on_device(source, &self.model.energy, |on| {
                        suffix_started = Instant::now();
                        let tokens = DeviceTokens {
                            kept: on.kept,
                            count: on.count,
                        };
                        // SAFETY: the kernel's kept list, its count and the
                        // `count × C` gathered rows, locked for this call
                        // and written by the kernel launched before on the
                        // same (default) stream.
                        unsafe { gpu.run_on_device(tokens, on.rows) }
                    })
                    .context("energy layer")?;
                times.ersm = (suffix_started - t).as_secs_f64() * 1e3;
                let (value, _) = out.context("sparse suffix (GPU)")?;
                // A token output is placed by the host's sets of the same
                // kept list (off the device's path: the mask came back after
                // the suffix ran).
                let sets = match value.shape {
                    Shape::Tokens { .. } => self.model.plan.sets(&mask.kept),
                    Shape::Dense { .. } => Vec::new(),
                };
                let logits = dense_logits_of(&self.model.plan, &value, &sets)?;
                (mask, logits, suffix_started)
            }
            _ => {
                let mut mask = self
                    .device
                    .compute_from(source, &self.model.energy)
                    .context("energy layer")?;
                times.ersm = ms(t);
                let suffix_started = Instant::now();
                let logits = self.sparse_logits(&mask.kept, std::mem::take(&mut mask.features))?;
                (mask, logits, suffix_started)
            }
        };
        if let Device::Cuda(backend) = &self.device {
            times.ersm_kernel = f64::from(backend.last_timing().kernel_ms);
        }
        let unsure = self.unsure(&logits);
        let logits = if unsure {
            // The prefix is shared, so only the baseline's suffix runs again.
            self.dense_logits_from(&features).context("fallback")?
        } else {
            logits
        };
        times.suffix = ms(suffix_started);
        Ok((logits, mask, times, unsure))
    }

    /// Runs the dense baseline on a pre-processed input.
    pub fn dense_from_input(&self, input: &[f32]) -> Result<(Vec<f32>, StageTimes)> {
        self.threads.install(|| self.dense_on_threads(input))
    }

    fn dense_on_threads(&self, input: &[f32]) -> Result<(Vec<f32>, StageTimes)> {
        let mut times = StageTimes::default();
        let t = Instant::now();
        let features = self.prefix_output(input)?;
        times.prefix = ms(t);
        let t = Instant::now();
        let logits = self.dense_logits_from(&features)?;
        times.suffix = ms(t);
        Ok((logits, times))
    }

    /// The whole ERSM path on one frame.
    pub fn run_ersm(&self, frame: &Frame) -> Result<ErsmResult> {
        let t = Instant::now();
        let input = self.preprocess(frame)?;
        let pre = ms(t);
        let (logits, mask, mut times, fell_back) = self.ersm_from_input(&input)?;
        times.preprocess = pre;
        Ok(ErsmResult {
            logits,
            mask,
            times,
            fell_back,
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

/// The logits a run of `plan` gives, scattered to dense (finite, or an error).
fn suffix_logits(
    plan: &crate::sparse::Plan,
    (out, frame): (Value, crate::sparse::plan::Frame),
) -> Result<Vec<f32>> {
    dense_logits_of(plan, &out, &frame.sets)
}

/// A suffix output as dense logits: a token output scattered over `sets`.
fn dense_logits_of(plan: &crate::sparse::Plan, out: &Value, sets: &[TokenSet]) -> Result<Vec<f32>> {
    let logits = out.to_dense(sets, plan.output_fill()).1;
    ensure_finite(&logits, "sparse suffix's logits")?;
    Ok(logits)
}

/// Dense top-1 margin from which a frame counts as one the dense network is
/// sure of: on the model report's held-out views, a one-pixel shift keeps the
/// dense answer on 98.9 % of these and on 66 % of those below 0.1, so
/// agreement below this margin measures the reference's indecision as much
/// as ERSM's error.
pub const SURE_MARGIN: f64 = 0.3;

/// Softmax probability of the top-1 class minus that of the top-2: how sure
/// a result is (0 for a tie or a single class).
pub fn top1_margin(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let (mut p1, mut p2, mut sum) = (0.0f32, 0.0f32, 0.0f32);
    for &v in logits {
        let p = (v - max).exp();
        sum += p;
        if p > p1 {
            p2 = p1;
            p1 = p;
        } else if p > p2 {
            p2 = p;
        }
    }
    if sum > 0.0 && sum.is_finite() {
        (p1 - p2) / sum
    } else {
        0.0
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
