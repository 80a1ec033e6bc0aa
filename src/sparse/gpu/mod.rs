//! The sparse suffix on a GPU: each step of the CPU plan runs its op's GPU
//! twin (`Op::record`, beside the op's CPU code in `sparse/ops/`) on the
//! kernels of `sparse/kernels/`, its arrays uploaded once, and each frame's
//! token rows kept in device memory from the first step to the logits. The
//! token sets and rulebooks are built by kernels too, from the energy
//! kernel's kept list where it lies, or on the host and uploaded. Every
//! launch is sized for its level's positions and reads the token count in
//! device memory, so the first frame records the steps' launches and
//! allocates their buffers (`workspace`), and later frames replay them.
//! A residual Add runs in the kernel of the conv before it, and a reshape
//! read by nothing else relabels its input's buffer, so neither is a launch.
//!
//! The executor is generic over a [`Device`]: [`cuda::CudaDevice`] runs the
//! kernels on an NVIDIA GPU through cudarc; anything else that can run the
//! same kernel source may stand in (the tests build it for the CPU, so the
//! lowering, the device-built sets and rulebooks, the rulebook upload and the
//! launch order are checked against the CPU executor where no GPU is present).

pub mod cuda;
pub mod device;
mod frame;
mod record;
mod workspace;

use super::frame::{Frame, Level, RuleKey};
use super::plan::{Holding, Plan};
use super::tokens::StrideRule;
use super::value::{Shape, Value};
pub use crate::sparse::launch::{Args, Family, Kernel, KernelArgs};
use anyhow::{Context, Result};
pub use device::{words_as_f32, Device, BLOCK};
use frame::FrameLayout;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;
use workspace::{keep_newest, Captured, Outputs, Recorded, Workspace};

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// Where a frame's token sets and rulebooks are built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RulebookSite {
    /// By kernels, from the kept list in device memory: no token index or
    /// count crosses to the host before the output is computed.
    #[default]
    Device,
    /// By the CPU plan from the kept list on the host, then uploaded.
    Host,
}

/// The kept tokens of a frame in device memory: the energy kernel's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceTokens {
    /// Address of the kept raster indices (`u32`, ascending).
    pub kept: u64,
    /// Address of their count (one `u32`).
    pub count: u64,
}

/// A kept list and its count uploaded from the host, laid out as the energy
/// kernel leaves them.
pub struct UploadedKept<B> {
    /// Their addresses, valid while this lives.
    pub tokens: DeviceTokens,
    _buffers: (B, B),
}

/// One step for the device: the plan's op, and the addresses of the arrays
/// it uploaded.
#[derive(Debug)]
struct GpuStep {
    node: String,
    op: Arc<dyn super::ops::Op>,
    inputs: Vec<usize>,
    output: usize,
    arrays: Vec<u64>,
}

/// A device-path frame's outputs, each level's token count, and, behind a
/// gate, every level's token set as the device built it.
#[derive(Debug)]
pub struct DeviceRun {
    pub values: Vec<Value>,
    pub counts: Vec<usize>,
    pub sets: Option<Vec<super::tokens::TokenSet>>,
}

/// A plan's suffix, lowered for a device.
pub struct GpuSuffix<D: Device> {
    device: D,
    layout: FrameLayout,
    levels: Vec<Level>,
    rules: Vec<RuleKey>,
    stride_rule: StrideRule,
    /// The gate each level waits for (`None`: built before the steps).
    behind: Vec<Option<usize>>,
    steps: Vec<GpuStep>,
    /// The uploaded arrays, kept alive while their addresses are in use.
    _arrays: Vec<D::Buf>,
    slots: usize,
    /// The plan's output slots, and its tap slots with their dense shapes.
    outputs: Vec<usize>,
    taps: Vec<usize>,
    tap_shapes: Vec<Shape>,
    channels: usize,
    /// The plan's schedule: step after which each slot is read for the
    /// last time, and the Add each step's kernel may take in.
    last_use: Vec<usize>,
    residual: Vec<Option<usize>>,
    /// The frame buffers and recorded launches, from the first frame on.
    workspace: Mutex<Option<Workspace<D::Buf, D::Graph>>>,
}

impl<D: Device> GpuSuffix<D> {
    /// Uploads the arrays of every step of `plan`; an op without a GPU
    /// kernel is an error naming its node (the caller keeps the CPU suffix).
    pub fn new(device: D, plan: &Plan) -> Result<GpuSuffix<D>> {
        let mut bufs = Vec::new();
        let mut steps = Vec::with_capacity(plan.steps.len());
        for s in &plan.steps {
            let arrays = s.op.gpu_arrays().with_context(|| {
                format!("node '{}' ({}) has no GPU kernel", s.node, s.op.name())
            })?;
            let mut at = Vec::with_capacity(arrays.len());
            for a in &arrays {
                let buf = device.upload(a)?;
                at.push(device.ptr(&buf));
                bufs.push(buf);
            }
            steps.push(GpuStep {
                node: s.node.clone(),
                op: s.op.clone(),
                inputs: s.inputs.clone(),
                output: s.output,
                arrays: at,
            });
        }
        Ok(GpuSuffix {
            device,
            layout: FrameLayout::new(plan),
            levels: plan.levels.clone(),
            rules: plan.rules.clone(),
            stride_rule: plan.stride_rule,
            behind: frame::behind_gates(&plan.levels),
            steps,
            _arrays: bufs,
            slots: plan.slot_names.len(),
            outputs: plan.outputs.clone(),
            taps: plan.taps.clone(),
            tap_shapes: plan
                .taps
                .iter()
                .map(|&t| plan.slot_shapes[t].clone())
                .collect(),
            channels: plan.channels,
            last_use: plan.last_use.clone(),
            residual: plan.residual.clone(),
            workspace: Mutex::new(None),
        })
    }

    /// True when a gate narrows a level: its sets and counts are known on
    /// the device only, once the frame has run.
    fn gated(&self) -> bool {
        self.behind.iter().any(Option::is_some)
    }

    /// The device the suffix runs on.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// True once a device-path frame found it could not be captured as a
    /// graph (the device does not capture, or capturing failed): frames
    /// since launch kernel by kernel.
    pub fn stopped_capturing(&self) -> bool {
        let ws = self
            .workspace
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        ws.as_ref().is_some_and(|ws| !ws.capture)
    }

    /// Runs the suffix on gathered `features` (`kept.len() × C`, host
    /// memory) and the prefix maps it reads (`taps`, dense, host memory) for
    /// the token set `kept`, with the token sets and rulebooks built on the
    /// host; the outputs as the CPU plan gives them. On a stream,
    /// `holding` (from [`Plan::holding`]) holds tokens at every gate and
    /// moves its costs, as [`Plan::run_holding`] does.
    pub fn run(
        &self,
        plan: &Plan,
        kept: &[u32],
        features: &[f32],
        taps: &[Vec<f32>],
        holding: Option<&Holding>,
    ) -> Result<(Vec<Value>, Frame)> {
        plan.check_features(kept.len(), features.len())?;
        plan.check_taps(taps)?;
        let frame = plan.frame(kept);
        let (values, sets) = self.with_workspace(|ws| {
            let counts = self.put_host_frame(ws, &frame, features)?;
            self.put_taps(ws, taps)?;
            self.put_holding(ws, holding)?;
            let rows = self.device.ptr(&ws.input);
            let outputs = self.replay(ws, rows, None)?;
            // Behind a gate the counts and sets are the device's.
            let (counts, sets) = if self.gated() {
                let counts = self.read_counts(ws, Some(kept.len()))?;
                let sets = self.device_sets(ws, &counts)?;
                (counts, Some(sets))
            } else {
                (counts, None)
            };
            Ok((self.fetch(ws, &outputs, rows, &counts)?, sets))
        })?;
        Ok((
            values,
            sets.map_or(frame, |s| Frame::with_sets(s, plan.rules.len())),
        ))
    }

    /// Writes a stream frame's held flags and gate shifts (none: zeros,
    /// written only if the last frame's were not).
    fn put_holding(
        &self,
        ws: &mut Workspace<D::Buf, D::Graph>,
        holding: Option<&Holding>,
    ) -> Result<()> {
        let clear = holding.is_none_or(Holding::is_none);
        if clear && ws.stream_clear {
            return Ok(());
        }
        let mut v = vec![0.0f32; self.layout.stream_len.max(1)];
        if let Some(h) = holding.filter(|_| !clear) {
            anyhow::ensure!(
                h.shifts.len() == self.layout.gates
                    && (h.held.is_empty() || h.held.len() == self.levels.len()),
                "a stream frame for {} gates and {} levels, given {} shifts and {} held levels",
                self.layout.gates,
                self.levels.len(),
                h.shifts.len(),
                h.held.len()
            );
            for (l, set) in h.held.iter().enumerate() {
                let at = self.layout.held(l);
                for &i in &set.coords {
                    v[at + i as usize] = f32::from_bits(1);
                }
            }
            for (g, &s) in h.shifts.iter().enumerate() {
                v[self.layout.shift(g)] = s;
            }
        }
        self.device.write(&mut ws.stream, 0, &v)?;
        ws.stream_clear = clear;
        Ok(())
    }

    /// Writes the prefix maps the suffix reads into their buffers.
    fn put_taps(&self, ws: &mut Workspace<D::Buf, D::Graph>, taps: &[Vec<f32>]) -> Result<()> {
        for (buf, t) in ws.taps.iter_mut().zip(taps) {
            self.device.write(buf, 0, t)?;
        }
        Ok(())
    }

    /// Runs the suffix on gathered rows another component left in device
    /// memory (the energy kernel's output) for the kept tokens it left there
    /// too: the token sets and rulebooks are built on the device, and the
    /// kernels read every token count where it lies, so nothing comes back
    /// to the host until the outputs have been computed (`taps`, the prefix
    /// maps the suffix reads, are written from the host first). The outputs
    /// and the token count of each level are returned, and behind a gate
    /// the device's token sets (elsewhere the host's [`Plan::sets`] of the
    /// same kept list places a token output). `holding`: as for
    /// [`GpuSuffix::run`].
    ///
    /// # Safety
    /// `tokens` must address a kept list and its count as the energy kernel
    /// writes them for this plan's level 0, and `rows` their `count × C`
    /// gathered values, all live on this device while this runs and written
    /// by work ordered before this call's launches.
    pub unsafe fn run_on_device(
        &self,
        tokens: DeviceTokens,
        rows: u64,
        taps: &[Vec<f32>],
        holding: Option<&Holding>,
    ) -> Result<DeviceRun> {
        anyhow::ensure!(
            taps.len() == self.taps.len(),
            "{} prefix maps given, the suffix reads {}",
            taps.len(),
            self.taps.len()
        );
        self.with_workspace(|ws| {
            self.put_taps(ws, taps)?;
            self.put_holding(ws, holding)?;
            let outputs = self.launch_frame(ws, tokens, rows)?;
            let counts = self.read_counts(ws, None)?;
            let sets = if self.gated() {
                Some(self.device_sets(ws, &counts)?)
            } else {
                None
            };
            Ok(DeviceRun {
                values: self.fetch(ws, &outputs, rows, &counts)?,
                counts,
                sets,
            })
        })
    }

    /// Like [`GpuSuffix::run`], timing each part of the frame in ms, laid out
    /// as the CPU plan's `run_timed` lays them: `times[s]` for step `s`, then
    /// the token sets and rulebooks (on the side `site` says), then (one
    /// entry more than the CPU plan) the upload of the rows, and of the
    /// rulebooks or the kept list. The device is synchronised after each
    /// part, so a step's time is its launch and its kernels, and the whole
    /// frame runs slower than untimed.
    pub fn run_timed(
        &self,
        plan: &Plan,
        kept: &[u32],
        features: &[f32],
        taps: &[Vec<f32>],
        site: RulebookSite,
        times: &mut Vec<f64>,
    ) -> Result<(Vec<Value>, Vec<usize>)> {
        plan.check_features(kept.len(), features.len())?;
        plan.check_taps(taps)?;
        let n = self.steps.len();
        times.resize(n + 2, 0.0);
        self.with_workspace(|ws| {
            let rows = self.device.ptr(&ws.input);
            // Recorded untimed: like the weights' upload, it happens once.
            self.recorded(ws, rows)?;
            self.put_taps(ws, taps)?;
            let counts = match site {
                RulebookSite::Host => {
                    let t = Instant::now();
                    let frame = plan.frame(kept);
                    times[n] += ms(t);
                    let t = Instant::now();
                    let counts = self.put_host_frame(ws, &frame, features)?;
                    self.device.sync()?;
                    times[n + 1] += ms(t);
                    Some(counts)
                }
                RulebookSite::Device => {
                    let t = Instant::now();
                    self.device.write(&mut ws.input, 0, features)?;
                    let tokens = self.put_kept(ws, kept)?;
                    self.device.sync()?;
                    times[n + 1] += ms(t);
                    let t = Instant::now();
                    self.build_frame(ws, tokens)?;
                    self.device.sync()?;
                    times[n] += ms(t);
                    None
                }
            };
            let outputs = self.replay(ws, rows, Some(times))?;
            let counts = match counts {
                Some(c) if !self.gated() => c,
                _ => self.read_counts(ws, Some(kept.len()))?,
            };
            Ok((self.fetch(ws, &outputs, rows, &counts)?, counts))
        })
    }

    /// Times one untimed device-path frame (sets, rulebooks and steps from
    /// a kept list and rows already on the device, as the energy kernel
    /// leaves them; the frame's graph where the device captures, after a
    /// first frame that records and captures): ms until every launch is
    /// issued, and until the level counts are back. Issued close to done
    /// means the host's launch rate bounds the frame (CUDA graphs help);
    /// done far past issued means the kernels do (faster kernels would).
    pub fn time_launches(
        &self,
        plan: &Plan,
        kept: &[u32],
        features: &[f32],
        taps: &[Vec<f32>],
    ) -> Result<(f64, f64)> {
        plan.check_features(kept.len(), features.len())?;
        plan.check_taps(taps)?;
        self.with_workspace(|ws| {
            self.device.write(&mut ws.input, 0, features)?;
            self.put_taps(ws, taps)?;
            let tokens = self.put_kept(ws, kept)?;
            let rows = self.device.ptr(&ws.input);
            // Recording and capturing happen once, untimed (capturing by a
            // frame before the timed one).
            self.recorded(ws, rows)?;
            if ws.capture && captured(ws, tokens, rows).is_none() {
                self.launch_frame(ws, tokens, rows)?;
            }
            self.device.sync()?;
            let t = Instant::now();
            self.launch_frame(ws, tokens, rows)?;
            let issued = ms(t);
            self.read_counts(ws, Some(kept.len()))?;
            Ok((issued, ms(t)))
        })
    }

    /// A kept list and its count, uploaded as the energy kernel leaves them.
    pub fn upload_kept(&self, kept: &[u32]) -> Result<UploadedKept<D::Buf>> {
        let bits = words_as_f32(kept);
        let list = self
            .device
            .upload(if bits.is_empty() { &[0.0] } else { &bits })?;
        let count = self.device.upload(&[f32::from_bits(kept.len() as u32)])?;
        Ok(UploadedKept {
            tokens: DeviceTokens {
                kept: self.device.ptr(&list),
                count: self.device.ptr(&count),
            },
            _buffers: (list, count),
        })
    }

    /// Runs `f` on the workspace, allocated at the first frame; frames take
    /// turns (they share its buffers, as they share the GPU).
    fn with_workspace<R>(
        &self,
        f: impl FnOnce(&mut Workspace<D::Buf, D::Graph>) -> Result<R>,
    ) -> Result<R> {
        // A frame that panicked left nothing half-recorded (a list is kept
        // only once whole), and every buffer is rewritten by the next frame.
        let mut guard = self
            .workspace
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if guard.is_none() {
            let taps: Vec<usize> = self.tap_shapes.iter().map(|s| s.len(&[])).collect();
            *guard = Some(Workspace::new(
                &self.device,
                &self.layout,
                self.channels,
                &taps,
            )?);
        }
        f(guard.as_mut().expect("just set"))
    }

    /// Reads the outputs back, with the exact token `counts` of every level.
    fn fetch(
        &self,
        ws: &Workspace<D::Buf, D::Graph>,
        outputs: &Outputs,
        rows: u64,
        counts: &[usize],
    ) -> Result<Vec<Value>> {
        outputs
            .iter()
            .map(|(shape, out)| {
                let n = shape.len(counts);
                let data = match out {
                    Some(i) => self.device.download(&ws.pool[*i].0, n)?,
                    None => {
                        // SAFETY: a suffix with no steps hands back its input,
                        // which the caller keeps live and which holds `n` values.
                        let b = unsafe { self.device.copy_from(rows, n)? };
                        self.device.download(&b, n)?
                    }
                };
                Ok(Value {
                    shape: shape.clone(),
                    data,
                })
            })
            .collect()
    }

    /// Launches a whole device-path frame (token sets, rulebooks, steps)
    /// for the kept list at `tokens` and the rows at `rows`: as one captured
    /// graph where the device captures (captured at the first frame from
    /// these addresses), else launch by launch. The outputs' shapes and pool
    /// buffers, still on the device.
    fn launch_frame(
        &self,
        ws: &mut Workspace<D::Buf, D::Graph>,
        tokens: DeviceTokens,
        rows: u64,
    ) -> Result<Outputs> {
        if let Some(g) = captured(ws, tokens, rows) {
            self.device.launch_graph(&g.graph)?;
            return Ok(g.outputs.clone());
        }
        let i = self.recorded(ws, rows)?;
        let outputs = ws.recorded[i].outputs.clone();
        if ws.capture {
            let frame = &*ws;
            let captured = self.device.capture(&mut || {
                self.build_frame(frame, tokens)?;
                self.launch_recorded(&frame.recorded[i], None)
            });
            match captured {
                Ok(Some(graph)) => {
                    self.device.launch_graph(&graph)?;
                    let g = Captured {
                        rows,
                        tokens,
                        graph,
                        outputs: outputs.clone(),
                    };
                    keep_newest(&mut ws.graphs, g);
                    return Ok(outputs);
                }
                Ok(None) => ws.capture = false,
                Err(e) => {
                    log::warn!("GPU suffix: capturing the frame as a graph failed ({e:#}); launching kernel by kernel");
                    ws.capture = false;
                }
            }
        }
        self.build_frame(ws, tokens)?;
        self.launch_recorded(&ws.recorded[i], None)?;
        Ok(outputs)
    }

    /// Launches a recorded list. With `times`, each launch is synchronised
    /// and timed into its step's entry (an Add fused into a conv's kernel
    /// into the conv's).
    fn launch_recorded(&self, r: &Recorded, mut times: Option<&mut Vec<f64>>) -> Result<()> {
        for l in &r.launches {
            let t = Instant::now();
            self.device
                .launch(l.kernel, l.threads, &l.args)
                .with_context(|| format!("GPU suffix, node '{}'", self.steps[l.step].node))?;
            if let Some(times) = times.as_deref_mut() {
                self.device.sync()?;
                times[l.step] += ms(t);
            }
        }
        Ok(())
    }

    /// Launches every step on the rows at `rows` (recording the launches at
    /// the first frame from there), timed as [`GpuSuffix::launch_recorded`]
    /// times them; the outputs' shapes and pool buffers, still on the device.
    fn replay(
        &self,
        ws: &mut Workspace<D::Buf, D::Graph>,
        rows: u64,
        times: Option<&mut Vec<f64>>,
    ) -> Result<Outputs> {
        let i = self.recorded(ws, rows)?;
        let r = &ws.recorded[i];
        self.launch_recorded(r, times)?;
        Ok(r.outputs.clone())
    }
}

/// The frame captured for the kept list at `tokens` and the rows at `rows`.
fn captured<B, G>(ws: &Workspace<B, G>, tokens: DeviceTokens, rows: u64) -> Option<&Captured<G>> {
    ws.graphs
        .iter()
        .find(|g| g.rows == rows && g.tokens == tokens)
}
