//! Conv on token rows: 1×1 stride-1 as one GEMM; everything else (k×k, grouped,
//! strided) gathers neighbour rows through the rulebook (im2col on active
//! tokens only) and runs one GEMM per group. Output rows are split across the
//! pool's threads; bias and the activation after the conv are applied in the
//! same pass. On the GPU: `sfx_conv1x1` and `sfx_conv_rulebook` of `conv.cu`.
//!
//! The ONNX Conv builder is here too: it folds a BatchNormalization after the
//! conv into its weights and lowers the node to this op, to a [`Depthwise`]
//! conv, or (after global pooling) to a [`Linear`] layer.

use super::activation::GpuAct;
use super::{ActivationKind, Depthwise, Linear, OnnxNode, Op, Tensor};
use crate::onnx::{attr_i64, conv_pads, label};
use crate::sparse::launch::{Family, Kernel, KernelArgs, StepIo};
use crate::sparse::{
    buffers::Buffers,
    frame::Frame,
    gemm,
    rulebook::{Rulebook, Window},
    tokens::{DROPPED, INACTIVE},
    value::Shape,
    value::Value,
};
use crate::threads::par_rows;
use anyhow::{ensure, Context, Result};
use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::Arc;

/// Bytes of im2col rows gathered and multiplied at a time: well inside a
/// core's L2 cache (256 KB on a Jetson Orin's cores; 64–512 KB measured alike here).
const IM2COL_BYTES: usize = 128 << 10;

/// Output rows one thread takes at least (below this, splitting costs more than it saves).
const MIN_ROWS: usize = 16;

thread_local! {
    /// Each worker's im2col rows, kept across frames (it only grows).
    static COLS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A conv lowered for tokens; weights packed as `(taps · cin/g) × cout/g` per group.
#[derive(Clone, Debug)]
pub struct Conv {
    pub cin: usize,
    pub cout: usize,
    pub groups: usize,
    pub window: Window,
    pub in_level: usize,
    pub out_level: usize,
    /// Index of the frame rulebook, `None` for 1×1 stride-1 (reads its own token).
    pub rulebook: Option<usize>,
    /// One weight matrix per group.
    pub weights: Vec<gemm::Weights>,
    pub bias: Vec<f32>,
    /// The input's fill vector (`cin` values), read where a tap falls on a
    /// dropped position; `None` when the input holds zero there.
    pub fill: Option<Vec<f32>>,
    /// Activation applied to the output (fused at load).
    pub act: Option<ActivationKind>,
}

impl Conv {
    /// Output rows `first..first + y.len() / cout` into `y`.
    fn rows(&self, x: &[f32], frame: &Frame, first: usize, y: &mut [f32]) {
        let Some(rb) = self.rulebook else {
            // A 1×1 conv: the bias and a clamp-like activation ride on the
            // product.
            let clamp = self.act.and_then(ActivationKind::clamp);
            let (rows, x) = (y.len() / self.cout, &x[first * self.cin..]);
            gemm::matmul_biased(
                rows,
                x,
                self.cin,
                &self.weights[0],
                &self.bias,
                clamp,
                y,
                self.cout,
            );
            if let Some(a) = self.act.filter(|_| clamp.is_none()) {
                a.apply_all(y);
            }
            return;
        };
        for row in y.chunks_exact_mut(self.cout) {
            row.copy_from_slice(&self.bias);
        }
        let rb = &frame.rulebooks[rb];
        if !(self.window.transposed && self.transposed_rows(x, rb, first, y)) {
            self.im2col_rows(x, rb, first, y);
        }
        if let Some(a) = self.act {
            a.apply_all(y);
        }
    }

    /// Rows `first..` (holding the bias) of a conv read through a rulebook:
    /// each output row's taps gathered into an im2col row (a dropped
    /// neighbour's fill vector, or zero), then one product per group.
    fn im2col_rows(&self, x: &[f32], rb: &Rulebook, first: usize, y: &mut [f32]) {
        let rows = y.len() / self.cout;
        let k = rb.taps * (self.cin / self.groups);
        // In blocks of about IM2COL_BYTES of im2col rows, each multiplied
        // while it is still in the cache (a whole chunk's rows are megabytes:
        // written to memory, then read back). Blocks differ by one row at
        // most and hold two at least, so none takes the one-row product's
        // summation unless the chunk is one row.
        let blocks = (rows * k * 4 / IM2COL_BYTES).clamp(1, (rows / 2).max(1));
        for b in 0..blocks {
            let (start, end) = (rows * b / blocks, rows * (b + 1) / blocks);
            let out = &mut y[start * self.cout..end * self.cout];
            self.im2col_block(x, rb, first + start, k, out);
        }
    }

    /// [`Conv::im2col_rows`] for one block of rows: gathered, then multiplied.
    fn im2col_block(&self, x: &[f32], rb: &Rulebook, first: usize, k: usize, y: &mut [f32]) {
        let rows = y.len() / self.cout;
        let (cin_g, cout_g) = (self.cin / self.groups, self.cout / self.groups);
        COLS.with(|cols| {
            let mut cols = cols.borrow_mut();
            if cols.len() < rows * k {
                cols.resize(rows * k, 0.0);
            }
            let cols = &mut cols[..rows * k];
            for (g, w) in self.weights.iter().enumerate() {
                for (n, col) in cols.chunks_exact_mut(k).enumerate() {
                    for (&i, dst) in rb.row(first + n).iter().zip(col.chunks_exact_mut(cin_g)) {
                        match (i, self.fill.as_deref()) {
                            (DROPPED, Some(f)) => {
                                dst.copy_from_slice(&f[g * cin_g..(g + 1) * cin_g])
                            }
                            // Padding, or a dropped position holding zero.
                            (i, _) if i >= DROPPED => dst.fill(0.0),
                            (i, _) => {
                                let src = i as usize * self.cin + g * cin_g;
                                dst.copy_from_slice(&x[src..src + cin_g]);
                            }
                        }
                    }
                }
                gemm::matmul(rows, cols, k, w, &mut y[g * cout_g..], self.cout, true);
            }
        });
    }

    /// A transposed conv's rows `first..` (holding the bias) when each reads
    /// exactly one input token through one tap, as with kernel = stride:
    /// grouped by that tap, each group is one product with the tap's
    /// `cin × cout` weights, where an im2col over every tap would multiply
    /// three zero taps in four. False (nothing written) when some row reads
    /// no token or several, for the general path.
    fn transposed_rows(&self, x: &[f32], rb: &Rulebook, first: usize, y: &mut [f32]) -> bool {
        let rows = y.len() / self.cout;
        let mut by_tap: Vec<Vec<(usize, usize)>> = vec![Vec::new(); rb.taps];
        for n in 0..rows {
            let mut reads = rb
                .row(first + n)
                .iter()
                .enumerate()
                .filter(|(_, &i)| i != INACTIVE);
            match (reads.next(), reads.next()) {
                (Some((t, &i)), None) if i != DROPPED => by_tap[t].push((n, i as usize)),
                _ => return false,
            }
        }
        let (cin_g, cout_g) = (self.cin / self.groups, self.cout / self.groups);
        COLS.with(|cols| {
            let mut cols = cols.borrow_mut();
            for (g, w) in self.weights.iter().enumerate() {
                for (t, list) in by_tap.iter().enumerate() {
                    let m = list.len();
                    if m == 0 {
                        continue;
                    }
                    let need = m * (cin_g + cout_g);
                    if cols.len() < need {
                        cols.resize(need, 0.0);
                    }
                    let (a, c) = cols[..need].split_at_mut(m * cin_g);
                    for ((&(n, i), a), c) in list
                        .iter()
                        .zip(a.chunks_exact_mut(cin_g))
                        .zip(c.chunks_exact_mut(cout_g))
                    {
                        a.copy_from_slice(&x[i * self.cin + g * cin_g..][..cin_g]);
                        c.copy_from_slice(&y[n * self.cout + g * cout_g..][..cout_g]);
                    }
                    // The bias, then the tap's products in input-channel order.
                    let wt = &w.data[t * cin_g * cout_g..(t + 1) * cin_g * cout_g];
                    gemm::matmul_rows(m, a, cin_g, (wt, cin_g, cout_g), c, cout_g, true);
                    for (&(n, _), c) in list.iter().zip(c.chunks_exact(cout_g)) {
                        y[n * self.cout + g * cout_g..][..cout_g].copy_from_slice(c);
                    }
                }
            }
        });
        true
    }
}

impl Op for Conv {
    fn name(&self) -> &'static str {
        if self.window.transposed {
            "ConvTranspose"
        } else if self.rulebook.is_none() {
            "Conv1x1"
        } else if self.groups > 1 {
            "GroupConv"
        } else {
            "Conv"
        }
    }

    fn eval(&self, inputs: Vec<Cow<'_, Value>>, frame: &Frame, bufs: &Buffers) -> Result<Value> {
        let x = &inputs[0].data;
        ensure!(
            inputs[0].shape
                == Shape::Tokens {
                    level: self.in_level,
                    c: self.cin
                },
            "conv input mismatch"
        );
        let n_out = frame.sets[self.out_level].len();
        let mut y = bufs.take_for_writing(n_out * self.cout);
        par_rows(&mut y, self.cout, MIN_ROWS, |first, rows| {
            self.rows(x, frame, first, rows)
        });
        Ok(Value::tokens(self.out_level, self.cout, y))
    }

    fn cost(&self, tokens: &[usize]) -> u64 {
        let taps = self.window.kh * self.window.kw;
        let macs = tokens[self.out_level] * taps * (self.cin / self.groups) * self.cout;
        // A transposed conv's output reads one tap in stride² (its others
        // fall between input positions): the dense layer's multiply-adds.
        let s = if self.window.transposed {
            self.window.stride * self.window.stride
        } else {
            1
        };
        (macs / s) as u64
    }

    fn with_activation(&self, act: ActivationKind) -> Option<Arc<dyn Op>> {
        self.act
            .is_none()
            .then(|| super::activation::fused(self, |c| c.act = Some(act)))
    }

    fn fused(&self) -> Option<ActivationKind> {
        self.act
    }

    fn takes_residual(&self) -> bool {
        true
    }

    fn gpu_arrays(&self) -> Option<Vec<Cow<'_, [f32]>>> {
        // The groups' matrices one after another, as the kernel reads them.
        let packed: Vec<f32> = self
            .weights
            .iter()
            .flat_map(|w| w.data.iter().copied())
            .collect();
        let mut arrays = vec![Cow::Owned(packed), Cow::Borrowed(&self.bias[..])];
        arrays.extend(self.fill.as_deref().map(Cow::Borrowed));
        Some(arrays)
    }

    fn record(&self, io: &mut StepIo<'_>, arrays: &[u64]) -> Result<Shape> {
        let (level, x) = io.tokens(0, self.cin, "conv")?;
        let out_level = if self.rulebook.is_some() {
            self.out_level
        } else {
            level
        };
        let out = Shape::Tokens {
            level: out_level,
            c: self.cout,
        };
        let res = io.residual(&out);
        let rows = io.capacity(out_level);
        let y = io.output(rows * self.cout)?;
        let p = ConvParams {
            x,
            res,
            w: arrays[0],
            bias: arrays[1],
            rb: self.rulebook.map_or(0, |r| io.rulebook(r)),
            fill: arrays.get(2).copied().unwrap_or(0),
            y,
            count: io.count(out_level),
            rows: rows as i32,
            cin: self.cin as i32,
            cout: self.cout as i32,
            groups: self.groups as i32,
            taps: (self.window.kh * self.window.kw) as i32,
            act: GpuAct::of(self.act),
        };
        let kernel = if self.rulebook.is_some() {
            CONV_RULEBOOK
        } else {
            CONV1X1
        };
        io.launch(kernel, rows * self.cout, &p);
        Ok(out)
    }
}

/// `ConvParams` of `conv.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConvParams {
    pub x: u64,
    pub res: u64,
    pub w: u64,
    pub bias: u64,
    pub rb: u64,
    pub fill: u64,
    pub y: u64,
    pub count: u64,
    pub rows: i32,
    pub cin: i32,
    pub cout: i32,
    pub groups: i32,
    pub taps: i32,
    pub act: GpuAct,
}

// SAFETY: repr(C) addresses, i32s and a repr(C) GpuAct, as in conv.cu.
unsafe impl KernelArgs for ConvParams {}

const CONV1X1: Kernel = Kernel {
    family: Family::Conv,
    name: "sfx_conv1x1",
};
const CONV_RULEBOOK: Kernel = Kernel {
    family: Family::Conv,
    name: "sfx_conv_rulebook",
};

/// An ONNX Conv, read and checked, its BatchNormalization folded in: what
/// each lowering of it starts from.
pub struct ConvNode {
    pub cin: usize,
    pub cout: usize,
    /// Input channels per group.
    pub cin_g: usize,
    pub groups: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    /// Top, left, bottom, right.
    pub pads: [usize; 4],
    /// ONNX layout: `cout × cin/g × kh × kw`.
    pub weights: Vec<f32>,
    pub bias: Vec<f32>,
}

impl ConvNode {
    /// Kernel taps (`kh · kw`).
    pub fn taps(&self) -> usize {
        self.kh * self.kw
    }

    fn read(n: &mut OnnxNode<'_>) -> Result<ConvNode> {
        let node = n.node;
        let (wname, [cout, cin_g, kh, kw]) = weight_shape(n, "Conv", "convs")?;
        let groups = attr_i64(node, "group", Some(1))? as usize;
        ensure!(
            groups >= 1 && cout % groups == 0,
            "group {groups} does not divide {cout} output channels"
        );
        let stride = equal_stride(n)?;
        let pads = conv_pads(node)?;
        let mut weights = n.consts.f32s(&wname)?;
        let mut bias = bias(n, cout, "Conv")?;
        // Weights are `cout × cin/g × kh × kw`: output channel i / per.
        let per = weights.len() / cout;
        fold_batch_norm(n, &mut weights, &mut bias, |i| i / per, "conv")?;
        Ok(ConvNode {
            cin: cin_g * groups,
            cout,
            cin_g,
            groups,
            kh,
            kw,
            stride,
            pads,
            weights,
            bias,
        })
    }
}

/// A conv-like node's constant weight (input 1): its name and 4-D shape.
/// `op` and `what` (its plural, "convs") name it in errors.
pub(super) fn weight_shape(n: &OnnxNode<'_>, op: &str, what: &str) -> Result<(String, [usize; 4])> {
    let wname = n
        .node
        .input
        .get(1)
        .with_context(|| format!("{op} has no weight input"))?;
    let ws = n
        .consts
        .shape(wname)
        .with_context(|| format!("{op} weight '{wname}' must be a constant"))?;
    match *ws {
        [a, b, c, d] => Ok((wname.clone(), [a, b, c, d])),
        _ => anyhow::bail!("only 2-D {what} are supported, weight shape {ws:?}"),
    }
}

/// The node's stride, the same along both axes (1 when not given).
pub(super) fn equal_stride(n: &OnnxNode<'_>) -> Result<usize> {
    let strides = crate::onnx::attr_ints(n.node, "strides")?.unwrap_or(vec![1, 1]);
    ensure!(
        strides.len() == 2 && strides[0] == strides[1] && strides[0] >= 1,
        "only equal strides are supported, got {strides:?}"
    );
    Ok(strides[0] as usize)
}

/// The node's bias (input 2) of `cout` values, zero when it has none.
pub(super) fn bias(n: &OnnxNode<'_>, cout: usize, op: &str) -> Result<Vec<f32>> {
    let bias = n.constant(2)?.unwrap_or(vec![0.0; cout]);
    ensure!(
        bias.len() == cout,
        "{op} bias has {} values, expected {cout}",
        bias.len()
    );
    Ok(bias)
}

/// Folds a BatchNormalization right after the node, reading nothing else,
/// into its weights and bias; `channel(i)` is weight `i`'s output channel.
/// `what` names the node in errors.
pub(super) fn fold_batch_norm(
    n: &mut OnnxNode<'_>,
    weights: &mut [f32],
    bias: &mut [f32],
    channel: impl Fn(usize) -> usize,
    what: &str,
) -> Result<()> {
    let Some(bn) = n.fold_next("BatchNormalization") else {
        return Ok(());
    };
    let (scale, shift) = super::affine::batch_norm(bn, n.consts).with_context(|| label(bn))?;
    let cout = bias.len();
    ensure!(
        scale.len() == cout,
        "{} has {} channels, the {what} {cout}",
        label(bn),
        scale.len()
    );
    for (i, w) in weights.iter_mut().enumerate() {
        *w *= scale[channel(i)];
    }
    for (co, b) in bias.iter_mut().enumerate() {
        *b = *b * scale[co] + shift[co];
    }
    Ok(())
}

/// A rulebook conv's weights, one `(taps · cin/g) × cout/g` matrix per group,
/// tap-major, from `at(group, input channel, output channel, tap)`.
pub(super) fn pack_groups(
    groups: usize,
    cin_g: usize,
    cout_g: usize,
    taps: usize,
    at: impl Fn(usize, usize, usize, usize) -> f32,
) -> Vec<gemm::Weights> {
    let k = taps * cin_g;
    (0..groups)
        .map(|g| {
            let mut data = vec![0.0; k * cout_g];
            for ci in 0..cin_g {
                for co in 0..cout_g {
                    for t in 0..taps {
                        data[(t * cin_g + ci) * cout_g + co] = at(g, ci, co, t);
                    }
                }
            }
            gemm::Weights { k, n: cout_g, data }
        })
        .collect()
}

/// Builds a Conv (with the BatchNormalization after it, when it can fold).
pub fn from_onnx(n: &mut OnnxNode<'_>) -> Result<Tensor> {
    let x = n.input(0)?;
    let conv = ConvNode::read(n)?;
    let (slot, level, c) = match x.shape {
        Shape::Dense { shape } => return Linear::from_conv(n, x.slot, &shape, conv),
        Shape::Tokens { level, c } => (x.slot, level, c),
    };
    let (cin, cout, kh, kw, stride, pads) = (
        conv.cin,
        conv.cout,
        conv.kh,
        conv.kw,
        conv.stride,
        conv.pads,
    );
    ensure!(
        c == cin,
        "Conv expects {cin} input channels, the tensor has {c}"
    );
    let lv = n.lowered.levels[level].clone();
    let oh = (lv.h + pads[0] + pads[2])
        .checked_sub(kh)
        .map(|v| v / stride + 1);
    let ow = (lv.w + pads[1] + pads[3])
        .checked_sub(kw)
        .map(|v| v / stride + 1);
    let (oh, ow) = oh.zip(ow).with_context(|| {
        format!(
            "kernel {kh}×{kw} larger than the padded {}×{} map",
            lv.h, lv.w
        )
    })?;
    let out_level = if stride == 1 {
        ensure!(
            (oh, ow) == (lv.h, lv.w),
            "a stride-1 conv must keep the map size for submanifold semantics; pads {pads:?} turn {}×{} into {oh}×{ow}",
            lv.h,
            lv.w
        );
        level
    } else {
        n.lowered.child_level(level, stride, oh, ow)
    };
    let window = Window {
        kh,
        kw,
        stride,
        pad_top: pads[0],
        pad_left: pads[1],
        transposed: false,
    };
    let shape = Shape::Tokens {
        level: out_level,
        c: cout,
    };
    let pointwise = conv.taps() == 1 && stride == 1 && pads.iter().all(|&p| p == 0);
    if pointwise && conv.groups == 1 {
        let mut data = vec![0.0; cin * cout];
        for co in 0..cout {
            for ci in 0..cin {
                data[ci * cout + co] = conv.weights[co * cin + ci];
            }
        }
        let op = Conv {
            cin,
            cout,
            groups: 1,
            window,
            in_level: level,
            out_level,
            rulebook: None,
            weights: vec![gemm::Weights {
                k: cin,
                n: cout,
                data,
            }],
            bias: conv.bias,
            fill: None,
            act: None,
        };
        return Ok(n.emit(op, vec![slot], shape));
    }
    let rulebook = n.lowered.rulebook(level, out_level, window);
    if conv.groups == cin && cout == cin {
        let op = Depthwise::from_conv(conv, window, (level, out_level), rulebook, n.fill(slot));
        return Ok(n.emit(op, vec![slot], shape));
    }
    let (groups, cin_g, taps) = (conv.groups, conv.cin_g, conv.taps());
    let cout_g = cout / groups;
    // ONNX Conv weights are `cout × cin/g × kh × kw`.
    let per_group = pack_groups(groups, cin_g, cout_g, taps, |g, ci, co, t| {
        conv.weights[((g * cout_g + co) * cin_g + ci) * taps + t]
    });
    let op = Conv {
        cin,
        cout,
        groups,
        window,
        in_level: level,
        out_level,
        rulebook: Some(rulebook),
        weights: per_group,
        bias: conv.bias,
        fill: n.fill(slot).cloned(),
        act: None,
    };
    Ok(n.emit(op, vec![slot], shape))
}
