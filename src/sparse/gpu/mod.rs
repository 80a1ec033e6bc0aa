//! The sparse suffix on a GPU: the CPU plan's steps lowered once to kernels
//! of `kernels/suffix.cu`, their weights uploaded once, and each frame's
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
mod workspace;

use super::ops::{
    ActivationKind, Binary, BinaryKind, ChannelAffine, Conv, Depthwise, GlobalMean, Linear, Reshape,
};
use super::plan::{Frame, Plan};
use super::rulebook::Rulebook;
use super::tokens::{StrideRule, TokenSet};
use super::value::Value;
use anyhow::{bail, ensure, Context, Result};
use std::any::Any;
use std::sync::{Mutex, PoisonError};
use std::time::Instant;
use workspace::{keep_newest, Captured, Recorded, Recorder, Workspace};

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// Token indices and rulebook entries as the `f32` buffers carry them: bit
/// for bit.
fn words_as_f32(words: &[u32]) -> Vec<f32> {
    words.iter().map(|&i| f32::from_bits(i)).collect()
}

/// The kernel source, embedded in the binary.
pub const KERNEL_SRC: &str = include_str!("../kernels/suffix.cu");
/// Threads per block of every launch.
pub const BLOCK: usize = 256;

/// The one parameter block every kernel takes by value (`SfxParams` in the
/// kernel source, field for field).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Params {
    pub x: u64,
    pub x2: u64,
    pub w: u64,
    pub bias: u64,
    pub rb: u64,
    pub fill: u64,
    pub y: u64,
    pub rows: i32,
    pub cin: i32,
    pub cout: i32,
    pub groups: i32,
    pub taps: i32,
    pub act: i32,
    pub a0: f32,
    pub a1: f32,
    pub kind: i32,
    pub n: i32,
    pub inner: i32,
    pub set_in: u64,
    pub list_in: u64,
    pub count_in: u64,
    pub set_out: u64,
    pub list_out: u64,
    pub count_out: u64,
    pub map_h: i32,
    pub map_w: i32,
    pub in_h: i32,
    pub in_w: i32,
    pub stride: i32,
    pub rule: i32,
    pub kh: i32,
    pub kw: i32,
    pub pad_top: i32,
    pub pad_left: i32,
    pub count: u64,
    pub row_len: i32,
}

/// The kernels of `suffix.cu`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Conv1x1,
    ConvRulebook,
    Depthwise,
    Binary,
    Affine,
    Activation,
    GlobalMean,
    Linear,
    Level0,
    Level,
    Rulebook,
}

impl Kernel {
    /// Every kernel, in source order.
    pub const ALL: [Kernel; 11] = [
        Kernel::Conv1x1,
        Kernel::ConvRulebook,
        Kernel::Depthwise,
        Kernel::Binary,
        Kernel::Affine,
        Kernel::Activation,
        Kernel::GlobalMean,
        Kernel::Linear,
        Kernel::Level0,
        Kernel::Level,
        Kernel::Rulebook,
    ];

    /// The entry point's name in the source.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Conv1x1 => "sfx_conv1x1",
            Kernel::ConvRulebook => "sfx_conv_rulebook",
            Kernel::Depthwise => "sfx_depthwise",
            Kernel::Binary => "sfx_binary",
            Kernel::Affine => "sfx_affine",
            Kernel::Activation => "sfx_activation",
            Kernel::GlobalMean => "sfx_global_mean",
            Kernel::Linear => "sfx_linear",
            Kernel::Level0 => "sfx_level0",
            Kernel::Level => "sfx_level",
            Kernel::Rulebook => "sfx_rulebook",
        }
    }
}

/// What runs the kernels: memory and launches.
pub trait Device {
    /// A buffer of `f32` (rulebooks travel as the bits of their `u32`s).
    type Buf;
    /// A buffer holding `data`.
    fn upload(&self, data: &[f32]) -> Result<Self::Buf>;
    /// A buffer of `n` values, contents unspecified.
    fn alloc(&self, n: usize) -> Result<Self::Buf>;
    /// A buffer holding a copy of the `n` values at device address `src`
    /// (another component's output, still on the device).
    ///
    /// # Safety
    /// `src` must address `n` live `f32`s of this device, written by work
    /// that has finished.
    unsafe fn copy_from(&self, src: u64, n: usize) -> Result<Self::Buf>;
    /// The address kernels use for `buf`.
    fn ptr(&self, buf: &Self::Buf) -> u64;
    /// Runs `kernel` on `threads` threads (blocks of [`BLOCK`]), in order
    /// after every earlier launch.
    fn launch(&self, kernel: Kernel, threads: usize, p: &Params) -> Result<()>;
    /// Writes `data` into `buf` from value `at` on, in order after every
    /// earlier launch.
    fn write(&self, buf: &mut Self::Buf, at: usize, data: &[f32]) -> Result<()>;
    /// The first `n` values of `buf`, after every launch so far has finished.
    fn download(&self, buf: &Self::Buf, n: usize) -> Result<Vec<f32>>;
    /// Returns once every launch and copy so far has finished (for timing).
    fn sync(&self) -> Result<()>;
    /// A frame's launches captured to run as one unit (a CUDA graph).
    type Graph;
    /// Captures the launches `f` makes instead of running them: `Ok(None)`
    /// where this device does not capture (its launches then run one by one).
    fn capture(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<Option<Self::Graph>>;
    /// Runs a captured graph, in order after every earlier launch and copy
    /// and before every later one.
    fn launch_graph(&self, graph: &Self::Graph) -> Result<()>;
}

/// An activation as the kernels encode it: (code, a0, a1).
fn act_code(a: Option<ActivationKind>) -> (i32, f32, f32) {
    match a {
        None => (0, 0.0, 0.0),
        Some(ActivationKind::Relu) => (1, 0.0, 0.0),
        Some(ActivationKind::Clip { lo, hi }) => (2, lo, hi),
        Some(ActivationKind::Sigmoid) => (3, 0.0, 0.0),
        Some(ActivationKind::HardSigmoid { alpha, beta }) => (4, alpha, beta),
        Some(ActivationKind::HardSwish) => (5, 0.0, 0.0),
    }
}

/// One step lowered for the device; weights are indices into `GpuSuffix::weights`.
#[derive(Clone, Debug)]
enum GpuOp {
    Conv {
        kernel: Kernel,
        w: usize,
        b: usize,
        cin: usize,
        cout: usize,
        groups: usize,
        taps: usize,
        rulebook: Option<usize>,
        out_level: usize,
        /// The input's fill vector, when it has one.
        fill: Option<usize>,
        act: Option<ActivationKind>,
    },
    Depthwise {
        w: usize,
        b: usize,
        c: usize,
        taps: usize,
        rulebook: usize,
        out_level: usize,
        /// Tap weights times the input's fill vector, when it has one.
        fill: Option<usize>,
        act: Option<ActivationKind>,
    },
    Binary(BinaryKind),
    Affine {
        scale: usize,
        shift: usize,
        c: usize,
    },
    Activation(ActivationKind),
    GlobalMean {
        c: usize,
        shape: Vec<usize>,
        /// The input's fill vector, when it has one.
        fill: Option<usize>,
    },
    Linear {
        w: usize,
        b: usize,
        k: usize,
        n: usize,
        shape: Vec<usize>,
        act: Option<ActivationKind>,
    },
    Reshape(Vec<usize>),
}

#[derive(Clone, Debug)]
struct GpuStep {
    node: String,
    op: GpuOp,
    inputs: Vec<usize>,
    output: usize,
}

/// What a device buffer holds, kept on the host.
#[derive(Clone, Debug, PartialEq)]
enum Meta {
    Tokens { level: usize, c: usize },
    Dense { shape: Vec<usize> },
}

impl Meta {
    /// Values in the buffer, given the active tokens of every level.
    fn len(&self, counts: &[usize]) -> usize {
        match self {
            Meta::Tokens { level, c } => counts[*level] * c,
            Meta::Dense { shape } => shape.iter().product(),
        }
    }
}

/// The token counts a frame's steps see: each level's capacity (its
/// positions) sizes the launches and buffers, and the exact counts stay in
/// device memory where the kernels read them, so nothing comes back to the
/// host before the steps run and every frame launches the same grids.
#[derive(Clone, Copy)]
struct Counts<'a> {
    /// Rows each level can hold.
    capacity: &'a [usize],
    /// Address of the exact counts, one `u32` per level.
    at: u64,
}

impl Counts<'_> {
    /// What a launch over `meta`'s values sets as `count` and `row_len`
    /// (nothing for a dense value, whose size is fixed).
    fn of(&self, meta: &Meta) -> (u64, i32) {
        match meta {
            Meta::Tokens { level, c } => (self.at(*level), *c as i32),
            Meta::Dense { .. } => (0, 0),
        }
    }

    /// The address of `level`'s count.
    fn at(&self, level: usize) -> u64 {
        self.at + 4 * level as u64
    }
}

/// A value of a frame's steps while they are recorded, until its last
/// reader: what it holds, its address, and its pool buffer (`None` for the
/// gathered rows, read where another component left them).
type Slot = Option<(Meta, u64, Option<usize>)>;

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

/// Where each level's sets and each rulebook's table sit in the frame's
/// device buffers, fixed at load: every level sized for all its positions.
#[derive(Clone, Debug, Default)]
struct FrameLayout {
    /// Positions (`h · w`) of each level.
    positions: Vec<usize>,
    /// Offset of each level's index map, then of its token list (the two
    /// of a level lie side by side), in the sets buffer.
    sets: Vec<usize>,
    /// Offset of each rulebook's table in the tables buffer.
    tables: Vec<usize>,
    sets_len: usize,
    tables_len: usize,
}

impl FrameLayout {
    /// Offset of level `l`'s index map in the sets buffer.
    fn index(&self, l: usize) -> usize {
        self.sets[l]
    }

    /// Offset of level `l`'s token list in the sets buffer.
    fn list(&self, l: usize) -> usize {
        self.sets[l] + self.positions[l]
    }

    fn new(plan: &Plan) -> FrameLayout {
        let mut l = FrameLayout::default();
        for level in &plan.levels {
            l.positions.push(level.h * level.w);
            l.sets.push(l.sets_len);
            l.sets_len += 2 * level.h * level.w;
        }
        for r in &plan.rules {
            l.tables.push(l.tables_len);
            l.tables_len += l.positions[r.out_level] * r.window.kh * r.window.kw;
        }
        l
    }
}

/// A plan's suffix, lowered for a device.
pub struct GpuSuffix<D: Device> {
    device: D,
    layout: FrameLayout,
    levels: Vec<super::plan::Level>,
    rules: Vec<super::plan::RuleKey>,
    stride_rule: StrideRule,
    steps: Vec<GpuStep>,
    weights: Vec<D::Buf>,
    slots: usize,
    output: usize,
    channels: usize,
    /// Step index after which each slot is read for the last time.
    last_use: Vec<usize>,
    /// For each step, the other operand of an Add that may run in its
    /// kernel (see [`fusable_adds`]).
    residual: Vec<Option<usize>>,
    /// The frame buffers and recorded launches, from the first frame on.
    workspace: Mutex<Option<Workspace<D::Buf, D::Graph>>>,
}

impl<D: Device> GpuSuffix<D> {
    /// Lowers every step of `plan` and uploads its weights; an op without a
    /// kernel is an error naming its node (the caller keeps the CPU suffix).
    pub fn new(device: D, plan: &Plan) -> Result<GpuSuffix<D>> {
        let mut weights = Vec::new();
        let mut up = |v: &[f32]| -> Result<usize> {
            weights.push(device.upload(v)?);
            Ok(weights.len() - 1)
        };
        let mut steps = Vec::with_capacity(plan.steps.len());
        for s in &plan.steps {
            let any: &dyn Any = s.op.as_ref();
            let op = if let Some(c) = any.downcast_ref::<Conv>() {
                let packed: Vec<f32> = c
                    .weights
                    .iter()
                    .flat_map(|w| w.data.iter().copied())
                    .collect();
                GpuOp::Conv {
                    kernel: if c.rulebook.is_some() {
                        Kernel::ConvRulebook
                    } else {
                        Kernel::Conv1x1
                    },
                    w: up(&packed)?,
                    b: up(&c.bias)?,
                    cin: c.cin,
                    cout: c.cout,
                    groups: c.groups,
                    taps: c.window.kh * c.window.kw,
                    rulebook: c.rulebook,
                    out_level: c.out_level,
                    fill: c.fill.as_deref().map(&mut up).transpose()?,
                    act: c.act,
                }
            } else if let Some(d) = any.downcast_ref::<Depthwise>() {
                GpuOp::Depthwise {
                    w: up(&d.weights)?,
                    b: up(&d.bias)?,
                    c: d.c,
                    taps: d.window.kh * d.window.kw,
                    rulebook: d.rulebook,
                    out_level: d.out_level,
                    fill: d.fill_taps.as_deref().map(&mut up).transpose()?,
                    act: d.act,
                }
            } else if let Some(b) = any.downcast_ref::<Binary>() {
                GpuOp::Binary(b.kind)
            } else if let Some(a) = any.downcast_ref::<ChannelAffine>() {
                GpuOp::Affine {
                    scale: up(&a.scale)?,
                    shift: up(&a.shift)?,
                    c: a.scale.len(),
                }
            } else if let Some(a) = any.downcast_ref::<super::ops::Activation>() {
                GpuOp::Activation(a.kind)
            } else if let Some(p) = any.downcast_ref::<GlobalMean>() {
                GpuOp::GlobalMean {
                    c: p.c,
                    shape: p.shape.clone(),
                    fill: p.fill.as_deref().map(&mut up).transpose()?,
                }
            } else if let Some(l) = any.downcast_ref::<Linear>() {
                GpuOp::Linear {
                    w: up(&l.weights.data)?,
                    b: up(&l.bias)?,
                    k: l.weights.k,
                    n: l.weights.n,
                    shape: l.shape.clone(),
                    act: l.act,
                }
            } else if let Some(r) = any.downcast_ref::<Reshape>() {
                GpuOp::Reshape(r.shape.clone())
            } else {
                bail!("node '{}' ({}) has no GPU kernel", s.node, s.op.name());
            };
            steps.push(GpuStep {
                node: s.node.clone(),
                op,
                inputs: s.inputs.clone(),
                output: s.output,
            });
        }
        let slots = plan.slot_names.len();
        let mut last_use = vec![usize::MAX; slots];
        for (i, s) in steps.iter().enumerate() {
            for &x in &s.inputs {
                last_use[x] = i;
            }
        }
        last_use[plan.output] = usize::MAX;
        let residual = fusable_adds(&steps, plan.output, slots);
        Ok(GpuSuffix {
            device,
            layout: FrameLayout::new(plan),
            levels: plan.levels.clone(),
            rules: plan.rules.clone(),
            stride_rule: plan.stride_rule,
            steps,
            weights,
            slots,
            output: plan.output,
            channels: plan.channels,
            last_use,
            residual,
            workspace: Mutex::new(None),
        })
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
    /// memory) for the token set `kept`, with the token sets and rulebooks
    /// built on the host; the result as the CPU plan gives it.
    pub fn run(&self, plan: &Plan, kept: &[u32], features: &[f32]) -> Result<(Value, Frame)> {
        plan.check_features(kept.len(), features.len())?;
        let frame = plan.frame(kept);
        let value = self.with_workspace(|ws| {
            let counts = self.put_host_frame(ws, &frame, features)?;
            let rows = self.device.ptr(&ws.input);
            let (meta, out) = self.replay(ws, rows, None)?;
            self.fetch(ws, meta, out, rows, &counts)
        })?;
        Ok((value, frame))
    }

    /// Runs the suffix on gathered rows another component left in device
    /// memory (the energy kernel's output) for the kept tokens it left there
    /// too: the token sets and rulebooks are built on the device, and the
    /// kernels read every token count where it lies, so nothing comes back
    /// to the host until the output has been computed. The output and the
    /// token count of each level are returned (the host's [`Plan::sets`] of
    /// the same kept list places a token output).
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
    ) -> Result<(Value, Vec<usize>)> {
        self.with_workspace(|ws| {
            let (meta, out) = self.launch_frame(ws, tokens, rows)?;
            let counts = self.read_counts(ws, None)?;
            Ok((self.fetch(ws, meta, out, rows, &counts)?, counts))
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
        site: RulebookSite,
        times: &mut Vec<f64>,
    ) -> Result<(Value, Vec<usize>)> {
        plan.check_features(kept.len(), features.len())?;
        let n = self.steps.len();
        times.resize(n + 2, 0.0);
        self.with_workspace(|ws| {
            let rows = self.device.ptr(&ws.input);
            // Recorded untimed: like the weights' upload, it happens once.
            self.recorded(ws, rows)?;
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
            let (meta, out) = self.replay(ws, rows, Some(times))?;
            let counts = match counts {
                Some(c) => c,
                None => self.read_counts(ws, Some(kept.len()))?,
            };
            Ok((self.fetch(ws, meta, out, rows, &counts)?, counts))
        })
    }

    /// Times one untimed device-path frame (sets, rulebooks and steps from
    /// a kept list and rows already on the device, as the energy kernel
    /// leaves them; the frame's graph where the device captures, after a
    /// first frame that records and captures): ms until every launch is
    /// issued, and until the level counts are back. Issued close to done
    /// means the host's launch rate bounds the frame (CUDA graphs help);
    /// done far past issued means the kernels do (faster kernels would).
    pub fn time_launches(&self, plan: &Plan, kept: &[u32], features: &[f32]) -> Result<(f64, f64)> {
        plan.check_features(kept.len(), features.len())?;
        self.with_workspace(|ws| {
            self.device.write(&mut ws.input, 0, features)?;
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

    /// Builds a frame's token sets and rulebooks on the device from a kept
    /// list on the host, and reads them back: what the kernels build, for
    /// checking against [`Plan::frame`].
    pub fn frame_on_device(&self, kept: &[u32]) -> Result<Frame> {
        self.with_workspace(|ws| {
            let tokens = self.put_kept(ws, kept)?;
            self.build_frame(ws, tokens)?;
            let rows = self.read_counts(ws, Some(kept.len()))?;
            let words = |buf: &D::Buf, n: usize| -> Result<Vec<u32>> {
                Ok(self
                    .device
                    .download(buf, n)?
                    .into_iter()
                    .map(f32::to_bits)
                    .collect())
            };
            let all_sets = words(&ws.sets, self.layout.sets_len)?;
            let all_tables = words(&ws.tables, self.layout.tables_len.max(1))?;
            let sets = self
                .levels
                .iter()
                .enumerate()
                .map(|(l, level)| {
                    let (index, list) = (self.layout.index(l), self.layout.list(l));
                    TokenSet {
                        h: level.h,
                        w: level.w,
                        index: all_sets[index..list].to_vec(),
                        coords: all_sets[list..list + rows[l]].to_vec(),
                    }
                })
                .collect();
            let rulebooks = self
                .rules
                .iter()
                .enumerate()
                .map(|(r, key)| {
                    let taps = key.window.kh * key.window.kw;
                    let at = self.layout.tables[r];
                    Rulebook {
                        taps,
                        table: all_tables[at..at + rows[key.out_level] * taps].to_vec(),
                    }
                })
                .collect();
            Ok(Frame { sets, rulebooks })
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
            *guard = Some(Workspace::new(&self.device, &self.layout, self.channels)?);
        }
        f(guard.as_mut().expect("just set"))
    }

    /// Writes a kept list from the host where the workspace keeps one; its
    /// addresses.
    fn put_kept(&self, ws: &mut Workspace<D::Buf, D::Graph>, kept: &[u32]) -> Result<DeviceTokens> {
        ensure!(
            !kept.is_empty() && kept.len() <= self.layout.positions[0],
            "a kept list of {} tokens for {} positions",
            kept.len(),
            self.layout.positions[0]
        );
        self.device.write(&mut ws.kept, 0, &words_as_f32(kept))?;
        self.device
            .write(&mut ws.kept_count, 0, &[f32::from_bits(kept.len() as u32)])?;
        Ok(DeviceTokens {
            kept: self.device.ptr(&ws.kept),
            count: self.device.ptr(&ws.kept_count),
        })
    }

    /// Writes a host-built frame (each level's count and each rulebook's
    /// table) and its gathered rows into the workspace; the counts.
    fn put_host_frame(
        &self,
        ws: &mut Workspace<D::Buf, D::Graph>,
        frame: &Frame,
        features: &[f32],
    ) -> Result<Vec<usize>> {
        let d = &self.device;
        d.write(&mut ws.input, 0, features)?;
        let counts: Vec<usize> = frame.sets.iter().map(TokenSet::len).collect();
        let bits: Vec<f32> = counts.iter().map(|&c| f32::from_bits(c as u32)).collect();
        d.write(&mut ws.counts, 0, &bits)?;
        for (r, rb) in frame.rulebooks.iter().enumerate() {
            d.write(
                &mut ws.tables,
                self.layout.tables[r],
                &words_as_f32(&rb.table),
            )?;
        }
        Ok(counts)
    }

    /// Launches the kernels that build every level's set and every rulebook
    /// into the workspace from the kept list at `tokens`; the counts stay on
    /// the device.
    fn build_frame(&self, ws: &Workspace<D::Buf, D::Graph>, tokens: DeviceTokens) -> Result<()> {
        let d = &self.device;
        let l = &self.layout;
        let (sets, counts) = (d.ptr(&ws.sets), d.ptr(&ws.counts));
        let index_at = |level: usize| sets + 4 * l.index(level) as u64;
        let list_at = |level: usize| sets + 4 * l.list(level) as u64;
        let count_at = |level: usize| counts + 4 * level as u64;
        for (i, level) in self.levels.iter().enumerate() {
            let mut p = Params {
                set_out: index_at(i),
                list_out: list_at(i),
                count_out: count_at(i),
                map_h: level.h as i32,
                map_w: level.w as i32,
                ..Params::default()
            };
            match level.parent {
                None => {
                    p.list_in = tokens.kept;
                    p.count_in = tokens.count;
                    d.launch(Kernel::Level0, level.h * level.w, &p)?;
                }
                Some(parent) => {
                    p.set_in = index_at(parent);
                    p.list_in = list_at(parent);
                    p.count_in = count_at(parent);
                    p.in_h = self.levels[parent].h as i32;
                    p.in_w = self.levels[parent].w as i32;
                    p.stride = level.stride as i32;
                    p.rule = match self.stride_rule {
                        StrideRule::Any => 0,
                        StrideRule::Centre => 1,
                    };
                    d.launch(Kernel::Level, level.h * level.w, &p)?;
                }
            }
        }
        let tables = d.ptr(&ws.tables);
        for (r, key) in self.rules.iter().enumerate() {
            let (out, inp) = (&self.levels[key.out_level], &self.levels[key.in_level]);
            let win = key.window;
            let p = Params {
                set_in: index_at(key.in_level),
                list_in: list_at(key.out_level),
                count_in: count_at(key.out_level),
                set_out: tables + 4 * l.tables[r] as u64,
                map_h: out.h as i32,
                map_w: out.w as i32,
                in_h: inp.h as i32,
                in_w: inp.w as i32,
                stride: win.stride as i32,
                kh: win.kh as i32,
                kw: win.kw as i32,
                pad_top: win.pad_top as i32,
                pad_left: win.pad_left as i32,
                ..Params::default()
            };
            d.launch(Kernel::Rulebook, out.h * out.w * win.kh * win.kw, &p)?;
        }
        Ok(())
    }

    /// Reads back the token count of each level, once everything launched
    /// has finished, and checks level 0's against the map (the kernels clamp
    /// to it, so a bad count cannot reach past a buffer, but it must not
    /// pass unreported). `expect` is the kept count when the host knows it,
    /// checked against what the kernels saw.
    fn read_counts(
        &self,
        ws: &Workspace<D::Buf, D::Graph>,
        expect: Option<usize>,
    ) -> Result<Vec<usize>> {
        let rows: Vec<usize> = self
            .device
            .download(&ws.counts, self.levels.len())?
            .into_iter()
            .map(|c| c.to_bits() as usize)
            .collect();
        let all = self.layout.positions[0];
        ensure!(
            rows[0] > 0 && rows[0] <= all,
            "the kept list holds {} tokens of {all}",
            rows[0]
        );
        if let Some(n) = expect {
            ensure!(
                rows[0] == n,
                "the device saw {} kept tokens, the host {n}",
                rows[0]
            );
        }
        Ok(rows)
    }

    /// Reads an output back, with the exact token `counts` of every level.
    fn fetch(
        &self,
        ws: &Workspace<D::Buf, D::Graph>,
        meta: Meta,
        out: Option<usize>,
        rows: u64,
        counts: &[usize],
    ) -> Result<Value> {
        let n = meta.len(counts);
        let data = match out {
            Some(i) => self.device.download(&ws.pool[i].0, n)?,
            None => {
                // SAFETY: a suffix with no steps hands back its input, which
                // the caller keeps live and which holds `n` values.
                let b = unsafe { self.device.copy_from(rows, n)? };
                self.device.download(&b, n)?
            }
        };
        Ok(match meta {
            Meta::Tokens { level, c } => Value::Tokens { level, c, data },
            Meta::Dense { shape } => Value::Dense { shape, data },
        })
    }

    /// The recorded launches for rows at `rows`, recorded now if this is
    /// the first frame from there: its index in `ws.recorded`.
    fn recorded(&self, ws: &mut Workspace<D::Buf, D::Graph>, rows: u64) -> Result<usize> {
        if let Some(i) = ws.recorded.iter().position(|r| r.rows == rows) {
            return Ok(i);
        }
        let counts = Counts {
            capacity: &self.layout.positions,
            at: self.device.ptr(&ws.counts),
        };
        let tables = self.device.ptr(&ws.tables);
        let rb_ptr = |i: usize| tables + 4 * self.layout.tables[i] as u64;
        let mut rec = Recorder::new(&self.device, &mut ws.pool);
        let mut slots: Vec<Slot> = (0..self.slots).map(|_| None).collect();
        slots[0] = Some((
            Meta::Tokens {
                level: 0,
                c: self.channels,
            },
            rows,
            None,
        ));
        let mut i = 0;
        while i < self.steps.len() {
            let s = &self.steps[i];
            rec.step = i;
            let context = || format!("GPU suffix, node '{}'", s.node);
            // A reshape of a value read by nothing after it relabels the
            // value's buffer: no launch, no copy.
            if let (GpuOp::Reshape(shape), &[x]) = (&s.op, &s.inputs[..]) {
                if self.last_use[x] == i && matches!(slots[x], Some((_, _, Some(_)))) {
                    let (meta, at, buf) = slots[x].take().expect("matched");
                    let meta = reshaped(&meta, shape, counts.capacity).with_context(context)?;
                    slots[s.output] = Some((meta, at, buf));
                    i += 1;
                    continue;
                }
            }
            let residual = self.residual[i].and_then(|r| slots[r].as_ref().map(|v| (&v.0, v.1)));
            let (meta, at, buf, fused) = self
                .step(s, &slots, counts, &rb_ptr, residual, &mut rec)
                .with_context(context)?;
            // With the Add fused, its output is the kernel's.
            let last = if fused { i + 1 } else { i };
            slots[self.steps[last].output] = Some((meta, at, Some(buf)));
            for j in i..=last {
                for &x in &self.steps[j].inputs {
                    if self.last_use[x] == j {
                        if let Some((_, _, Some(b))) = slots[x].take() {
                            rec.release(b);
                        }
                    }
                }
            }
            i = last + 1;
        }
        let (output, _, out) = slots[self.output]
            .take()
            .context("the suffix output was never computed")?;
        let launches = rec.launches;
        let pool_mb = ws.pool.iter().map(|(_, n)| n).sum::<usize>() as f64 * 4.0 / 1e6;
        log::info!(
            "GPU suffix: {} launches recorded for rows at {rows:#x}; {} output buffers, {pool_mb:.1} MB",
            launches.len(),
            ws.pool.len()
        );
        keep_newest(
            &mut ws.recorded,
            Recorded {
                rows,
                launches,
                output,
                out,
            },
        );
        Ok(ws.recorded.len() - 1)
    }

    /// Launches a whole device-path frame (token sets, rulebooks, steps)
    /// for the kept list at `tokens` and the rows at `rows`: as one captured
    /// graph where the device captures (captured at the first frame from
    /// these addresses), else launch by launch. The output's meta and pool
    /// buffer, still on the device.
    fn launch_frame(
        &self,
        ws: &mut Workspace<D::Buf, D::Graph>,
        tokens: DeviceTokens,
        rows: u64,
    ) -> Result<(Meta, Option<usize>)> {
        if let Some(g) = captured(ws, tokens, rows) {
            self.device.launch_graph(&g.graph)?;
            return Ok((g.output.clone(), g.out));
        }
        let i = self.recorded(ws, rows)?;
        let (output, out) = (ws.recorded[i].output.clone(), ws.recorded[i].out);
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
                        output: output.clone(),
                        out,
                    };
                    keep_newest(&mut ws.graphs, g);
                    return Ok((output, out));
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
        Ok((output, out))
    }

    /// Launches a recorded list. With `times`, each launch is synchronised
    /// and timed into its step's entry (an Add fused into a conv's kernel
    /// into the conv's).
    fn launch_recorded(&self, r: &Recorded, mut times: Option<&mut Vec<f64>>) -> Result<()> {
        for l in &r.launches {
            let t = Instant::now();
            self.device
                .launch(l.kernel, l.threads, &l.p)
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
    /// times them; the output's meta and pool buffer, still on the device.
    fn replay(
        &self,
        ws: &mut Workspace<D::Buf, D::Graph>,
        rows: u64,
        times: Option<&mut Vec<f64>>,
    ) -> Result<(Meta, Option<usize>)> {
        let i = self.recorded(ws, rows)?;
        let r = &ws.recorded[i];
        self.launch_recorded(r, times)?;
        Ok((r.output.clone(), r.out))
    }

    /// Records the launch of one step with `counts` active tokens per
    /// level and rulebook `i`'s table at `rb_ptr(i)`; the output's meta,
    /// address and pool buffer, and whether the `residual` offered (the
    /// other operand of the Add after a conv) was added in the kernel.
    fn step(
        &self,
        s: &GpuStep,
        slots: &[Slot],
        counts: Counts<'_>,
        rb_ptr: &dyn Fn(usize) -> u64,
        residual: Option<(&Meta, u64)>,
        rec: &mut Recorder<'_, D>,
    ) -> Result<(Meta, u64, usize, bool)> {
        let d = &self.device;
        let input = |k: usize| -> Result<(&Meta, u64)> {
            let (meta, at, _) = slots[s.inputs[k]]
                .as_ref()
                .with_context(|| format!("input {k} is not computed"))?;
            Ok((meta, *at))
        };
        let w = |i: usize| d.ptr(&self.weights[i]);
        let rows_of = |level: usize| counts.capacity[level];
        // The residual's address when it holds the same rows as `out`.
        let residual_for = |out: &Meta| match residual {
            Some((meta, at)) if meta == out => at,
            _ => 0,
        };
        match &s.op {
            GpuOp::Conv {
                kernel,
                w: wi,
                b,
                cin,
                cout,
                groups,
                taps,
                rulebook,
                out_level,
                fill,
                act,
            } => {
                let (meta, x) = input(0)?;
                let Meta::Tokens { level, c } = meta else {
                    bail!("conv expects token rows");
                };
                ensure!(*c == *cin, "conv expects {cin} channels, got {c}");
                let out = if rulebook.is_some() {
                    *out_level
                } else {
                    *level
                };
                let out_meta = Meta::Tokens {
                    level: out,
                    c: *cout,
                };
                let x2 = residual_for(&out_meta);
                let rows = rows_of(out);
                let (y, yb) = rec.alloc((rows * cout).max(1))?;
                let (act, a0, a1) = act_code(*act);
                let p = Params {
                    x,
                    x2,
                    w: w(*wi),
                    bias: w(*b),
                    rb: rulebook.map_or(0, rb_ptr),
                    fill: fill.map_or(0, w),
                    y,
                    rows: rows as i32,
                    cin: *cin as i32,
                    cout: *cout as i32,
                    groups: *groups as i32,
                    taps: *taps as i32,
                    act,
                    a0,
                    a1,
                    count: counts.at(out),
                    ..Params::default()
                };
                rec.launch(*kernel, rows * cout, p);
                Ok((out_meta, y, yb, x2 != 0))
            }
            GpuOp::Depthwise {
                w: wi,
                b,
                c,
                taps,
                rulebook,
                out_level,
                fill,
                act,
            } => {
                let (meta, x) = input(0)?;
                ensure!(
                    matches!(meta, Meta::Tokens { c: ci, .. } if ci == c),
                    "depthwise expects token rows of {c} channels"
                );
                let out_meta = Meta::Tokens {
                    level: *out_level,
                    c: *c,
                };
                let x2 = residual_for(&out_meta);
                let rows = rows_of(*out_level);
                let (y, yb) = rec.alloc((rows * c).max(1))?;
                let (act, a0, a1) = act_code(*act);
                let p = Params {
                    x,
                    x2,
                    w: w(*wi),
                    bias: w(*b),
                    rb: rb_ptr(*rulebook),
                    fill: fill.map_or(0, w),
                    y,
                    rows: rows as i32,
                    cin: *c as i32,
                    cout: *c as i32,
                    taps: *taps as i32,
                    act,
                    a0,
                    a1,
                    count: counts.at(*out_level),
                    ..Params::default()
                };
                rec.launch(Kernel::Depthwise, rows * c, p);
                Ok((out_meta, y, yb, x2 != 0))
            }
            GpuOp::Binary(kind) => {
                let (ma, a) = input(0)?;
                let (mb, b) = input(1)?;
                // The token operand first, as the CPU op orders them.
                let ((ma, a), (mb, b)) = match (ma, mb) {
                    (Meta::Dense { .. }, Meta::Tokens { .. }) => ((mb, b), (ma, a)),
                    _ => ((ma, a), (mb, b)),
                };
                let n = ma.len(counts.capacity);
                let per_channel = match (ma, mb) {
                    (Meta::Tokens { level: la, .. }, Meta::Tokens { level: lb, .. }) => {
                        ensure!(la == lb, "operands on different token sets ({la} vs {lb})");
                        0
                    }
                    (Meta::Tokens { c, .. }, Meta::Dense { shape }) => {
                        let m: usize = shape.iter().product();
                        ensure!(m == *c, "per-channel operand has {m} values, expected {c}");
                        *c
                    }
                    _ => 0,
                };
                ensure!(
                    per_channel > 0 || mb.len(counts.capacity) == n,
                    "operand sizes differ"
                );
                let (y, yb) = rec.alloc(n.max(1))?;
                let (count, row_len) = counts.of(ma);
                let p = Params {
                    x: a,
                    x2: b,
                    y,
                    kind: match kind {
                        BinaryKind::Add => 0,
                        BinaryKind::Mul => 1,
                    },
                    n: n as i32,
                    cout: per_channel as i32,
                    inner: 1,
                    count,
                    row_len,
                    ..Params::default()
                };
                rec.launch(Kernel::Binary, n, p);
                Ok((ma.clone(), y, yb, false))
            }
            GpuOp::Affine { scale, shift, c } => {
                let (meta, x) = input(0)?;
                let n = meta.len(counts.capacity);
                let inner = match meta {
                    Meta::Tokens { c: ci, .. } => {
                        ensure!(ci == c, "affine expects {c} channels, got {ci}");
                        1
                    }
                    Meta::Dense { shape } => shape.iter().skip(2).product::<usize>().max(1),
                };
                let (y, yb) = rec.alloc(n.max(1))?;
                let (count, row_len) = counts.of(meta);
                let p = Params {
                    x,
                    w: w(*scale),
                    bias: w(*shift),
                    y,
                    n: n as i32,
                    cout: *c as i32,
                    inner: inner as i32,
                    count,
                    row_len,
                    ..Params::default()
                };
                rec.launch(Kernel::Affine, n, p);
                Ok((meta.clone(), y, yb, false))
            }
            GpuOp::Activation(kind) => {
                let (meta, x) = input(0)?;
                let n = meta.len(counts.capacity);
                let (y, yb) = rec.alloc(n.max(1))?;
                let (act, a0, a1) = act_code(Some(*kind));
                let (count, row_len) = counts.of(meta);
                let p = Params {
                    x,
                    y,
                    n: n as i32,
                    act,
                    a0,
                    a1,
                    count,
                    row_len,
                    ..Params::default()
                };
                rec.launch(Kernel::Activation, n, p);
                Ok((meta.clone(), y, yb, false))
            }
            GpuOp::GlobalMean { c, shape, fill } => {
                let (meta, x) = input(0)?;
                let Meta::Tokens { level, c: ci } = meta else {
                    bail!("global pooling expects token rows");
                };
                ensure!(ci == c, "global pooling expects {c} channels, got {ci}");
                let (y, yb) = rec.alloc(*c)?;
                let p = Params {
                    x,
                    fill: fill.map_or(0, w),
                    y,
                    rows: rows_of(*level) as i32,
                    cout: *c as i32,
                    n: self.layout.positions[*level] as i32,
                    count: counts.at(*level),
                    ..Params::default()
                };
                rec.launch(Kernel::GlobalMean, *c, p);
                Ok((
                    Meta::Dense {
                        shape: shape.clone(),
                    },
                    y,
                    yb,
                    false,
                ))
            }
            GpuOp::Linear {
                w: wi,
                b,
                k,
                n,
                shape,
                act,
            } => {
                let (meta, x) = input(0)?;
                ensure!(
                    matches!(meta, Meta::Dense { .. }) && meta.len(counts.capacity) == *k,
                    "linear expects a dense input of {k} values"
                );
                let (y, yb) = rec.alloc(*n)?;
                let (act, a0, a1) = act_code(*act);
                let p = Params {
                    x,
                    w: w(*wi),
                    bias: w(*b),
                    y,
                    cin: *k as i32,
                    cout: *n as i32,
                    act,
                    a0,
                    a1,
                    ..Params::default()
                };
                rec.launch(Kernel::Linear, *n, p);
                Ok((
                    Meta::Dense {
                        shape: shape.clone(),
                    },
                    y,
                    yb,
                    false,
                ))
            }
            GpuOp::Reshape(shape) => {
                let (meta, x) = input(0)?;
                let out = reshaped(meta, shape, counts.capacity)?;
                // A copy, as the input is read again later and each slot
                // owns its buffer (the activation kernel with no function
                // is a plain copy).
                let n = out.len(counts.capacity);
                let (y, yb) = rec.alloc(n.max(1))?;
                let p = Params {
                    x,
                    y,
                    n: n as i32,
                    ..Params::default()
                };
                rec.launch(Kernel::Activation, n, p);
                Ok((out, y, yb, false))
            }
        }
    }
}

/// The frame captured for the kept list at `tokens` and the rows at `rows`.
fn captured<B, G>(ws: &Workspace<B, G>, tokens: DeviceTokens, rows: u64) -> Option<&Captured<G>> {
    ws.graphs
        .iter()
        .find(|g| g.rows == rows && g.tokens == tokens)
}

/// `meta` reshaped to `shape`: only a dense value of as many values.
fn reshaped(meta: &Meta, shape: &[usize], capacity: &[usize]) -> Result<Meta> {
    ensure!(
        matches!(meta, Meta::Dense { .. }),
        "reshape of a token map is not supported"
    );
    let n = meta.len(capacity);
    ensure!(
        shape.iter().product::<usize>() == n,
        "reshape of {n} values to {shape:?}"
    );
    Ok(Meta::Dense {
        shape: shape.to_vec(),
    })
}

/// For each step, the other operand of an Add that may run in its kernel:
/// the step is a conv read only by the next step, an Add of its output and
/// another value. (Whether the other value holds the same token rows is
/// known when the launches are recorded; if not, the Add runs on its own.)
/// In MobileNet-style blocks this is every residual add.
fn fusable_adds(steps: &[GpuStep], output: usize, slots: usize) -> Vec<Option<usize>> {
    let mut readers = vec![0usize; slots];
    for s in steps {
        for &x in &s.inputs {
            readers[x] += 1;
        }
    }
    steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let next = steps.get(i + 1)?;
            let conv = matches!(s.op, GpuOp::Conv { .. } | GpuOp::Depthwise { .. });
            let add = matches!(next.op, GpuOp::Binary(BinaryKind::Add));
            if !conv || !add || readers[s.output] != 1 || s.output == output {
                return None;
            }
            match next.inputs[..] {
                [a, b] if a == s.output => Some(b),
                [a, b] if b == s.output => Some(a),
                _ => None,
            }
        })
        .collect()
}
