//! The per-frame stages, timed: pre-process → prefix → ersm → suffix, and the
//! dense baseline (pre-process → prefix → dense suffix, all tract) beside it.

use crate::ersm::cuda::{DeviceMap, MapSource};
use crate::ersm::{Device, FeatureMap, TokenMask};
use crate::logits::top1_margin;
use crate::package::ModelPackage;
pub use crate::placement::{GpuNets, Placement};
use crate::prefix::{Output, TractNet};
use crate::preprocess::preprocess;
use crate::source::Frame;
use crate::sparse::gpu::DeviceTokens;
use crate::sparse::plan::GateOffsets;
use crate::sparse::tokens::TokenSet;
use crate::sparse::value::{Shape, Value};
use crate::threads::Threads;
use anyhow::{Context, Result};
use std::sync::{Mutex, PoisonError};
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

/// The prefix's outputs on the host: the cut's feature map, and the maps
/// the suffix reads beside it (FPN laterals; none for most networks).
#[derive(Clone, Debug, Default)]
pub struct PrefixMaps {
    /// `C × H × W` features at the cut.
    pub features: Vec<f32>,
    /// Each tap's dense map, in the cut's order.
    pub taps: Vec<Vec<f32>>,
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
    /// Active tokens at each level of the suffix, as the suffix ran them.
    pub tokens: Vec<usize>,
}

impl ErsmResult {
    /// Multiply-accumulates the frame spent in the suffix (the sparse
    /// suffix, plus the dense one when it fell back).
    pub fn suffix_macs(&self, plan: &crate::sparse::Plan) -> u64 {
        plan.spent(&self.tokens, self.fell_back)
    }
}

/// What the dense baseline gives for one frame.
#[derive(Clone, Debug)]
pub struct DenseResult {
    pub logits: Vec<f32>,
    pub times: StageTimes,
}

/// A loaded model and where its stages run.
pub struct Pipeline {
    pub model: ModelPackage,
    /// Where each stage runs, with the GPU executors of those placed there.
    pub placement: Placement,
    /// Confidence fallback: re-run the dense baseline's suffix when the sparse
    /// top-1 softmax margin is below this.
    pub fallback: Option<f32>,
    /// The threads the prefix, the sparse suffix and the dense baseline share.
    pub threads: Threads,
    /// How the last frame's features reached the GPU energy kernel, once a
    /// frame has (the prefix's output stays on the device unless tract-cuda
    /// copies it out).
    handoff: Mutex<Option<Handoff>>,
    /// On a stream (`--track`): the tokens every energy layer keeps.
    track: Option<Tracking>,
}

/// A stream's memory: the cut's tokens around the faces of the frame before
/// ([`crate::track`]).
#[derive(Debug)]
struct Tracking {
    margin: usize,
    /// Frames whose faces are held.
    frames: usize,
    /// Every `refresh`-th frame runs the gates at the package's own offsets
    /// (0: never).
    refresh: usize,
    /// Each face is also held where its last motion carries it.
    predict: bool,
    /// Frames of the cut's own masks a token must be new against (0: the
    /// gates never look at new tokens).
    new_tokens: usize,
    state: Mutex<StreamState>,
}

/// What a stream has seen so far.
#[derive(Debug, Default)]
struct StreamState {
    /// The held tokens of each of the last `frames` frames, oldest first.
    held: std::collections::VecDeque<Vec<u32>>,
    /// Frames begun since the stream started.
    begun: usize,
    /// The last frame's faces (at the network input).
    faces: Vec<crate::detect::Detection>,
    /// The cut's own masks (negative energy) of the last `new_tokens`
    /// frames, oldest first.
    own: std::collections::VecDeque<Vec<bool>>,
}

impl StreamState {
    /// Every held frame's tokens, ascending, once each.
    fn union(&self) -> Vec<u32> {
        let mut all: Vec<u32> = self.held.iter().flatten().copied().collect();
        all.sort_unstable();
        all.dedup();
        all
    }
}

/// What a tracked frame starts from.
#[derive(Debug)]
struct StreamFrame {
    /// The tokens the last frames' faces hold, ascending.
    held: Vec<u32>,
    offsets: GateOffsets,
}

/// How a frame's features reached the GPU energy kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Handoff {
    /// Copied from the host.
    Host,
    /// Read where the prefix left them, in device memory.
    Device,
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
    /// Wraps a loaded model, its energy layer on `device` and every other
    /// stage on the CPU.
    pub fn new(model: ModelPackage, device: Device) -> Pipeline {
        Pipeline::placed(model, Placement::energy_only(device))
    }

    /// Wraps a loaded model whose stages are placed already.
    pub fn placed(model: ModelPackage, placement: Placement) -> Pipeline {
        Pipeline {
            model,
            placement,
            fallback: None,
            threads: Threads::single(),
            handoff: Mutex::new(None),
            track: None,
        }
    }

    /// The energy layer's device.
    pub fn device(&self) -> &Device {
        &self.placement.energy
    }

    /// Where each stage runs, for logs and reports: "prefix cpu, energy cuda,
    /// ...", and once a frame has run on a GPU, how its features reached the
    /// energy kernel.
    pub fn placement(&self) -> String {
        let handoff = match *self.handoff.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(Handoff::Host) => "; features to the energy kernel through the host",
            Some(Handoff::Device) => "; features to the energy kernel in device memory",
            None => "",
        };
        let stream = match &self.track {
            Some(t) => format!(
                "; a tracked stream (faces of the last {} frame(s) held, margin {}{}{}{})",
                t.frames,
                t.margin,
                if t.predict {
                    ", faces carried by their motion"
                } else {
                    ""
                },
                match t.refresh {
                    0 => String::new(),
                    n => format!(", the package's own gates every {n} frames"),
                },
                match t.new_tokens {
                    0 => String::new(),
                    n => format!(", and where the cut keeps tokens its last {n} frames did not"),
                },
            ),
            None => String::new(),
        };
        format!("{}{handoff}{stream}", self.placement)
    }

    /// True once a frame's features reached the GPU energy kernel in device
    /// memory (the last frame's, when frames differ).
    pub fn features_stayed_on_device(&self) -> bool {
        *self.handoff.lock().unwrap_or_else(PoisonError::into_inner) == Some(Handoff::Device)
    }

    fn prefix_net(&self) -> &TractNet {
        self.placement
            .nets
            .as_ref()
            .map_or(&self.model.prefix, |g| &g.prefix)
    }

    fn dense_net(&self) -> &TractNet {
        self.placement
            .nets
            .as_ref()
            .map_or(self.model.baseline_suffix(), |g| &g.dense)
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

    /// Turns on the package's stream settings (manifest `track`): every
    /// energy layer keeps the tokens around the faces found in the frame
    /// before, and each gate named there moves by its offset. Frames must
    /// then come in stream order; [`Pipeline::new_stream`] forgets the last.
    pub fn with_tracking(mut self) -> Result<Pipeline> {
        let origin = self.model.origin.display().to_string();
        let t = self.model.manifest.track.clone().with_context(|| {
            format!("model {origin}: the manifest sets no `track` section (a detector's stream settings)")
        })?;
        anyhow::ensure!(
            self.model.manifest.detector.is_some(),
            "model {origin}: --track keeps the tokens around faces found, and this package is no detector"
        );
        for (node, shift) in &t.gate_offsets {
            self.model
                .plan
                .set_gate_shift(node, *shift)
                .with_context(|| format!("model {origin}: manifest track.gate_offsets"))?;
        }
        anyhow::ensure!(
            t.new_tokens == 0 || self.placement.suffix.is_none(),
            "model {origin}: manifest track.new_tokens (the gates' choice at two offsets on a stream) runs on the CPU's sparse suffix only so far: --device cpu, or the energy layer alone on the GPU"
        );
        self.track = Some(Tracking {
            margin: t.margin,
            frames: t.frames,
            refresh: t.refresh,
            predict: t.predict,
            new_tokens: t.new_tokens,
            state: Mutex::new(Default::default()),
        });
        Ok(self)
    }

    /// Forgets the last frame's faces: the next frame starts a new stream.
    pub fn new_stream(&self) {
        if let Some(t) = &self.track {
            *t.state.lock().unwrap_or_else(PoisonError::into_inner) = StreamState::default();
        }
    }

    /// True when frames are tracked (`--track`).
    pub fn tracking(&self) -> bool {
        self.track.is_some()
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
        self.threads.install(|| self.preprocess_here(frame))
    }

    /// [`Pipeline::preprocess`] on the threads the caller is on.
    fn preprocess_here(&self, frame: &Frame) -> Result<Vec<f32>> {
        preprocess(
            &frame.rgb,
            frame.width,
            frame.height,
            &self.model.manifest.preprocess,
        )
        .with_context(|| format!("frame {}", frame.name))
    }

    /// Runs the ERSM path on a pre-processed input (its result's
    /// pre-processing time is zero).
    pub fn ersm_from_input(&self, input: &[f32]) -> Result<ErsmResult> {
        self.threads.install(|| self.ersm_on_threads(input))
    }

    /// The prefix's maps on the host for a pre-processed input (finite, or
    /// an error).
    pub fn features(&self, input: &[f32]) -> Result<PrefixMaps> {
        let outs = self.prefix_outputs(input)?;
        let mut maps = outs.iter().map(|o| o.to_vec().context("prefix"));
        let features = maps.next().context("prefix: no output")??;
        ensure_finite(&features, "prefix features")?;
        let taps = maps.collect::<Result<Vec<_>>>()?;
        for t in &taps {
            ensure_finite(t, "prefix maps the suffix reads")?;
        }
        Ok(PrefixMaps { features, taps })
    }

    /// The sparse suffix's outputs (logits) for the gathered `rows` of the
    /// `kept` tokens and the prefix maps it reads (finite, or an error).
    pub fn sparse_logits(
        &self,
        kept: &[u32],
        rows: Vec<f32>,
        taps: Vec<Vec<f32>>,
    ) -> Result<Vec<f32>> {
        Ok(self.sparse_suffix(kept, rows, taps)?.0)
    }

    /// The sparse suffix's outputs for the gathered `rows` of the `kept`
    /// tokens and the prefix maps it reads (finite, or an error), and the
    /// active tokens at each level.
    pub fn sparse_suffix(
        &self,
        kept: &[u32],
        rows: Vec<f32>,
        taps: Vec<Vec<f32>>,
    ) -> Result<(Vec<f32>, Vec<usize>)> {
        let plan = &self.model.plan;
        let (out, frame) = match &self.placement.suffix {
            Some(g) => g
                .run(plan, kept, &rows, &taps, None)
                .context("sparse suffix (GPU)")?,
            None => plan.run(kept, rows, taps).context("sparse suffix")?,
        };
        Ok((dense_logits_of(plan, &out, &frame.sets)?, frame.counts()))
    }

    /// The dense baseline's outputs (logits) for the prefix's maps (finite,
    /// or an error).
    pub fn dense_logits(&self, maps: &PrefixMaps) -> Result<Vec<f32>> {
        let shapes = self.model.cut.suffix_input_shapes();
        let values = std::iter::once(&maps.features).chain(&maps.taps);
        let inputs: Vec<(&[usize], &[f32])> = shapes
            .iter()
            .zip(values)
            .map(|(s, v)| (&s[..], &v[..]))
            .collect();
        let logits = self.dense_net().run_many(&inputs).context("dense suffix")?;
        ensure_finite(&logits, "dense logits")?;
        Ok(logits)
    }

    /// The prefix's outputs as tract hands them over (the cut's map first):
    /// on the GPU they stay in device memory unless something reads them on
    /// the host.
    fn prefix_outputs(&self, input: &[f32]) -> Result<Vec<Output>> {
        let outs = self.prefix_net().run_outputs(input).context("prefix")?;
        let cut = &self.model.cut;
        anyhow::ensure!(
            outs.len() == 1 + cut.taps.len(),
            "prefix: {} outputs, the suffix reads {}",
            outs.len(),
            1 + cut.taps.len()
        );
        anyhow::ensure!(
            outs[0].len() == cut.c * cut.h * cut.w,
            "prefix: {} values, the cut is {}×{}×{}",
            outs[0].len(),
            cut.c,
            cut.h,
            cut.w
        );
        Ok(outs)
    }

    /// The dense baseline's suffix on the prefix's outputs; between two
    /// tract-cuda plans the features stay on the device.
    fn dense_logits_from(&self, outs: &[Output]) -> Result<Vec<f32>> {
        let inputs: Vec<&Output> = outs.iter().collect();
        let logits = self.dense_net().run_from(&inputs).context("dense suffix")?;
        ensure_finite(&logits, "dense logits")?;
        Ok(logits)
    }

    fn ersm_on_threads(&self, input: &[f32]) -> Result<ErsmResult> {
        let mut times = StageTimes::default();
        let t = Instant::now();
        let outs = self.prefix_outputs(input)?;
        let features = &outs[0];
        // The suffix reads the prefix's other maps on the host.
        let taps = outs[1..]
            .iter()
            .map(|o| o.to_vec().context("prefix"))
            .collect::<Result<Vec<_>>>()?;
        // The tract-cuda prefix's output is read where it is; the host values
        // (tract's own buffer, not a copy) serve the CPU energy layer, or a
        // GPU output tract-cuda had to copy out.
        let on_device = match (self.device(), features.device_ptr()) {
            (Device::Cuda(_), Some(ptr)) => Some(ptr),
            _ => None,
        };
        if matches!(self.device(), Device::Cuda(_)) {
            let how = if on_device.is_some() {
                Handoff::Device
            } else {
                Handoff::Host
            };
            *self.handoff.lock().unwrap_or_else(PoisonError::into_inner) = Some(how);
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
        let (mask, logits, tokens, suffix_started) = match (self.device(), &self.placement.suffix) {
            // Energy kernel and suffix both on the GPU: the gathered rows go
            // from one to the other in device memory, and the suffix is
            // launched behind the kernel without waiting for it, so `ersm`
            // is the kernel's launch and `suffix` includes the GPU finishing
            // it (its own GPU time is `ersm_kernel`).
            (Device::Cuda(backend), Some(gpu)) => {
                let mut suffix_started = Instant::now();
                let at = self.begin_frame();
                let holding = self
                    .track
                    .as_ref()
                    .map(|_| self.model.plan.holding(&at.held, at.offsets));
                let (mask, out) = backend
                    .compute_on_device(source, &self.model.energy, &at.held, |on| {
                        suffix_started = Instant::now();
                        let tokens = DeviceTokens {
                            kept: on.kept,
                            count: on.count,
                        };
                        // SAFETY: the kernel's kept list, its count and the
                        // `count × C` gathered rows, locked for this call
                        // and written by the kernel launched before on the
                        // same (default) stream.
                        unsafe { gpu.run_on_device(tokens, on.rows, &taps, holding.as_ref()) }
                    })
                    .context("energy layer")?;
                times.ersm = (suffix_started - t).as_secs_f64() * 1e3;
                let run = out.context("sparse suffix (GPU)")?;
                let (values, tokens) = (run.values, run.counts);
                // A token output is placed by the host's sets of the same
                // kept list (off the device's path: the mask came back after
                // the suffix ran); behind a gate, by the device's.
                let sets = match run.sets {
                    Some(sets) => sets,
                    None if values
                        .iter()
                        .any(|v| matches!(v.shape, Shape::Tokens { .. })) =>
                    {
                        self.model.plan.sets(&mask.kept)
                    }
                    None => Vec::new(),
                };
                let logits = dense_logits_of(&self.model.plan, &values, &sets)?;
                (mask, logits, tokens, suffix_started)
            }
            _ => {
                let at = self.begin_frame();
                let mut mask = self
                    .device()
                    .compute_holding(source, &self.model.energy, &at.held)
                    .context("energy layer")?;
                times.ersm = ms(t);
                let suffix_started = Instant::now();
                let rows = std::mem::take(&mut mask.features);
                let fresh = self.fresh_tokens(&mask, &at);
                let (logits, tokens) = self.suffix_holding(&mask.kept, &at, &fresh, rows, taps)?;
                (mask, logits, tokens, suffix_started)
            }
        };
        if let Device::Cuda(backend) = self.device() {
            times.ersm_kernel = f64::from(backend.last_timing().kernel_ms);
        }
        let unsure = self.unsure(&logits);
        let logits = if unsure {
            // The prefix is shared, so only the baseline's suffix runs again.
            self.dense_logits_from(&outs).context("fallback")?
        } else {
            logits
        };
        times.suffix = ms(suffix_started);
        if let Some(track) = &self.track {
            self.remember(track, &logits)?;
        }
        Ok(ErsmResult {
            logits,
            mask,
            times,
            fell_back: unsure,
            tokens,
        })
    }

    /// The tokens the next frame of the stream will hold, ascending (none
    /// off a stream).
    pub fn held(&self) -> Vec<u32> {
        self.track.as_ref().map_or_else(Vec::new, |t| {
            t.state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .union()
        })
    }

    /// Counts a frame of the stream and says what it starts from: the
    /// tokens the last frames' faces hold and its gates' offsets (off a
    /// stream: nothing held, the gates as loaded). A stream's first frame
    /// holds nothing, so it is one of the refreshes.
    fn begin_frame(&self) -> StreamFrame {
        let Some(t) = &self.track else {
            return StreamFrame {
                held: Vec::new(),
                offsets: GateOffsets::Stream,
            };
        };
        let mut s = t.state.lock().unwrap_or_else(PoisonError::into_inner);
        let held = s.union();
        let refresh = t.refresh > 0 && s.begun % t.refresh == 0;
        s.begun += 1;
        StreamFrame {
            held,
            offsets: if refresh {
                GateOffsets::Package
            } else {
                GateOffsets::Stream
            },
        }
    }

    /// [`Pipeline::sparse_suffix`] whose gates also keep the held tokens'
    /// reach, at the frame's offsets.
    fn suffix_holding(
        &self,
        kept: &[u32],
        at: &StreamFrame,
        fresh: &[u32],
        rows: Vec<f32>,
        taps: Vec<Vec<f32>>,
    ) -> Result<(Vec<f32>, Vec<usize>)> {
        // Off a stream nothing is held and the gates run as loaded.
        if self.track.is_none() {
            return self.sparse_suffix(kept, rows, taps);
        }
        let plan = &self.model.plan;
        let (out, frame) = match &self.placement.suffix {
            Some(g) => g
                .run(
                    plan,
                    kept,
                    &rows,
                    &taps,
                    Some(&plan.holding(&at.held, at.offsets)),
                )
                .context("sparse suffix (GPU)")?,
            None => plan
                .run_stream(kept, &at.held, fresh, at.offsets, rows, taps)
                .context("sparse suffix")?,
        };
        Ok((dense_logits_of(plan, &out, &frame.sets)?, frame.counts()))
    }

    /// On a stream: the energy layer and the sparse suffix on one frame's
    /// prefix maps, keeping the last frame's faces' tokens, then this
    /// frame's remembered for the next (`ersm eval`'s path, inside its
    /// [`Threads::install`]; `run` and `bench` go through
    /// [`Pipeline::run_ersm`]). The mask's rows are consumed.
    pub fn tracked(&self, maps: &PrefixMaps) -> Result<(TokenMask, Vec<f32>, Vec<usize>)> {
        let track = self
            .track
            .as_ref()
            .context("internal: tracked() off a stream")?;
        let cut = &self.model.cut;
        let at = self.begin_frame();
        let x = FeatureMap::new(&maps.features, cut.c, cut.h, cut.w)?;
        let mut mask = self
            .device()
            .compute_holding(MapSource::Host(x), &self.model.energy, &at.held)
            .context("energy layer")?;
        let rows = std::mem::take(&mut mask.features);
        let fresh = self.fresh_tokens(&mask, &at);
        let (logits, tokens) =
            self.suffix_holding(&mask.kept, &at, &fresh, rows, maps.taps.clone())?;
        self.remember(track, &logits)?;
        Ok((mask, logits, tokens))
    }

    /// The cut's tokens that are new on this frame (manifest
    /// `track.new_tokens`, [`crate::track::new_tokens`]) when it runs at the
    /// stream's offsets, and this frame's own mask remembered for the
    /// next ones. None off a stream or without the setting.
    fn fresh_tokens(&self, mask: &TokenMask, at: &StreamFrame) -> Vec<u32> {
        let Some(t) = self.track.as_ref().filter(|t| t.new_tokens > 0) else {
            return Vec::new();
        };
        let own: Vec<bool> = mask.energies.iter().map(|&e| e < 0.0).collect();
        let mut s = t.state.lock().unwrap_or_else(PoisonError::into_inner);
        let fresh = if at.offsets == GateOffsets::Stream {
            crate::track::new_tokens(&own, s.own.make_contiguous(), (mask.w, mask.h), t.margin)
        } else {
            Vec::new()
        };
        s.own.push_back(own);
        while s.own.len() > t.new_tokens {
            s.own.pop_front();
        }
        fresh
    }

    /// Keeps the tokens around this frame's faces for the next frame.
    fn remember(&self, track: &Tracking, logits: &[f32]) -> Result<()> {
        let m = &self.model;
        let (h, w) = (m.manifest.input.shape[2], m.manifest.input.shape[3]);
        let answer = m
            .reader
            .read(logits, w, h)
            .context("tracking: the frame's faces")?;
        let faces = answer.faces();
        let mut s = track.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut boxes = faces.to_vec();
        if track.predict {
            boxes.extend(crate::track::carried(faces, &s.faces));
        }
        s.faces = faces.to_vec();
        let held = crate::track::held_tokens(&boxes, (w, h), (m.cut.w, m.cut.h), track.margin);
        s.held.push_back(held);
        while s.held.len() > track.frames {
            s.held.pop_front();
        }
        Ok(())
    }

    /// Runs the dense baseline on a pre-processed input.
    pub fn dense_from_input(&self, input: &[f32]) -> Result<(Vec<f32>, StageTimes)> {
        self.threads.install(|| self.dense_on_threads(input))
    }

    fn dense_on_threads(&self, input: &[f32]) -> Result<(Vec<f32>, StageTimes)> {
        let mut times = StageTimes::default();
        let t = Instant::now();
        let outs = self.prefix_outputs(input)?;
        times.prefix = ms(t);
        let t = Instant::now();
        let logits = self.dense_logits_from(&outs)?;
        times.suffix = ms(t);
        Ok((logits, times))
    }

    /// The whole ERSM path on one frame. Pre-processing and the network
    /// run inside one [`Threads::install`]: each install wakes the pool's
    /// other threads (25–100 µs on this project's VMs after an idle gap),
    /// once a frame rather than twice; the dense path does the same.
    pub fn run_ersm(&self, frame: &Frame) -> Result<ErsmResult> {
        self.threads.install(|| {
            let t = Instant::now();
            let input = self.preprocess_here(frame)?;
            let pre = ms(t);
            let mut r = self.ersm_on_threads(&input)?;
            r.times.preprocess = pre;
            Ok(r)
        })
    }

    /// The whole dense baseline on one frame (one install, as [`Pipeline::run_ersm`]).
    pub fn run_dense(&self, frame: &Frame) -> Result<DenseResult> {
        self.threads.install(|| {
            let t = Instant::now();
            let input = self.preprocess_here(frame)?;
            let pre = ms(t);
            let (logits, mut times) = self.dense_on_threads(&input)?;
            times.preprocess = pre;
            Ok(DenseResult { logits, times })
        })
    }
}

/// The suffix outputs as dense logits: token outputs scattered over `sets`.
fn dense_logits_of(
    plan: &crate::sparse::Plan,
    out: &[Value],
    sets: &[TokenSet],
) -> Result<Vec<f32>> {
    let logits = plan.dense_outputs(out, sets);
    ensure_finite(&logits, "sparse suffix's logits")?;
    Ok(logits)
}
