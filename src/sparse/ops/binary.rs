//! Add and Mul of two computed values: residual adds, gates, and the
//! squeeze-excite channel scale (tokens × a dense per-channel vector). An Add
//! or Mul with a constant lowers to a [`ChannelAffine`]; of two token maps on
//! different levels, to a [`super::merge::MergeBinary`]. On the GPU:
//! `sfx_binary` of `elementwise.cu`, or, for a residual add after a conv,
//! nothing: the conv's kernel adds it.

use super::{ChannelAffine, OnnxNode, Op, Tensor};
use crate::sparse::launch::{Family, Kernel, KernelArgs, StepIo};
use crate::sparse::{buffers::Buffers, frame::Frame, value::Shape, value::Value};
use anyhow::{bail, ensure, Context, Result};
use std::borrow::Cow;

/// Which elementwise function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryKind {
    Add,
    Mul,
}

impl BinaryKind {
    #[inline]
    fn apply(self, a: f32, b: f32) -> f32 {
        match self {
            BinaryKind::Add => a + b,
            BinaryKind::Mul => a * b,
        }
    }
}

/// A binary elementwise op; keeps the active set of its token operand.
#[derive(Clone, Debug)]
pub struct Binary {
    pub kind: BinaryKind,
    /// Channels of the result.
    pub c: usize,
    /// Level of the token operand, if any (for cost).
    pub level: Option<usize>,
}

/// Builds an Add or Mul.
pub fn from_onnx(n: &mut OnnxNode<'_>) -> Result<Tensor> {
    let kind = if n.op_type() == "Add" {
        BinaryKind::Add
    } else {
        BinaryKind::Mul
    };
    let (a, b) = (&n.node.input[0], &n.node.input[1]);
    let (a_const, b_const) = (n.consts.contains(a), n.consts.contains(b));
    if a_const && b_const {
        bail!("both operands are constants");
    }
    if a_const || b_const {
        // x op constant: a per-channel affine map.
        let (k, name) = if a_const { (1, a) } else { (0, b) };
        let x = n.input(k)?;
        let (rank, c) = match &x.shape {
            Shape::Tokens { c, .. } => (4, *c),
            Shape::Dense { shape } => (shape.len(), x.shape.channels()),
        };
        let shape = n.consts.shape(name).unwrap_or(&[]).to_vec();
        let v = per_channel(&shape, rank, c, n.consts.f32s(name)?)
            .with_context(|| format!("constant '{name}' of shape {shape:?} does not broadcast per channel over a {c}-channel tensor"))?;
        let (scale, shift, source) = match kind {
            BinaryKind::Add => (vec![1.0; c], v, "AddConst"),
            BinaryKind::Mul => (v, vec![0.0; c], "MulConst"),
        };
        return ChannelAffine::emit(n, source, x, scale, shift);
    }
    let (x, y) = (n.input(0)?, n.input(1)?);
    if let (Shape::Tokens { level: la, .. }, Shape::Tokens { level: lb, .. }) = (&x.shape, &y.shape)
    {
        if la != lb {
            // Two maps reached by different paths: on the union of their sets.
            return super::merge::emit(n, kind, x, y);
        }
    }
    let inputs = vec![x.slot, y.slot];
    // A token operand decides the result's set; the other operand is tokens
    // of the same set or a per-channel value.
    let tokens = match (&x.shape, &y.shape) {
        (Shape::Tokens { level: la, c: ca }, Shape::Tokens { level: lb, c: cb }) => {
            ensure!(
                la == lb,
                "operands are token maps of different resolutions (levels {la} and {lb})"
            );
            ensure!(ca == cb, "operands have {ca} and {cb} channels");
            Some((*la, *ca))
        }
        (Shape::Tokens { level, c }, Shape::Dense { shape })
        | (Shape::Dense { shape }, Shape::Tokens { level, c }) => {
            ensure!(
                shape.len() == 4 && shape[1] == *c && shape.iter().product::<usize>() == *c,
                "a token map ({c} channels) can only be combined with a [1, {c}, 1, 1] per-channel value, got {shape:?}"
            );
            Some((*level, *c))
        }
        _ => None,
    };
    if let Some((level, c)) = tokens {
        let op = Binary {
            kind,
            c,
            level: Some(level),
        };
        return Ok(n.emit(op, inputs, Shape::Tokens { level, c }));
    }
    match (&x.shape, &y.shape) {
        (Shape::Dense { shape: sa }, Shape::Dense { shape: sb }) => {
            ensure!(
                sa == sb,
                "dense operands of shapes {sa:?} and {sb:?}: only equal shapes are supported"
            );
            let shape = sa.clone();
            let op = Binary {
                kind,
                c: shape.iter().product(),
                level: None,
            };
            Ok(n.emit(op, inputs, Shape::Dense { shape }))
        }
        _ => bail!("internal: token operands are handled above"),
    }
}

/// A constant that broadcasts along axis 1 only, expanded to `c` values.
fn per_channel(shape: &[usize], rank: usize, c: usize, v: Vec<f32>) -> Option<Vec<f32>> {
    if shape.len() > rank {
        return None;
    }
    let offset = rank - shape.len();
    // The channel axis: 1, or the only axis of a vector.
    let channel = usize::from(rank > 1);
    for (i, &d) in shape.iter().enumerate() {
        let axis = i + offset;
        if d != 1 && !(axis == channel && d == c) {
            return None;
        }
    }
    match v.len() {
        1 => Some(vec![v[0]; c]),
        n if n == c => Some(v),
        _ => None,
    }
}

impl Op for Binary {
    fn name(&self) -> &'static str {
        match self.kind {
            BinaryKind::Add => "Add",
            BinaryKind::Mul => "Mul",
        }
    }

    fn eval(
        &self,
        mut inputs: Vec<Cow<'_, Value>>,
        _frame: &Frame,
        bufs: &Buffers,
    ) -> Result<Value> {
        let b = inputs.pop().context("binary op has two inputs")?;
        let a = inputs.pop().context("binary op has two inputs")?;
        // Put the token operand (if any) first, so the result reuses its buffer.
        let (a, b) = match (&a.shape, &b.shape) {
            (Shape::Dense { .. }, Shape::Tokens { .. }) => (b, a),
            _ => (a, b),
        };
        let kind = self.kind;
        let mut out = a.into_owned();
        let db = &b.data;
        match (&out.shape, &b.shape) {
            (Shape::Tokens { level: la, .. }, Shape::Tokens { level: lb, .. }) => {
                ensure!(la == lb, "operands on different token sets ({la} vs {lb})");
                ensure!(out.data.len() == db.len(), "operand sizes differ");
                out.data
                    .iter_mut()
                    .zip(db)
                    .for_each(|(x, &y)| *x = kind.apply(*x, y));
            }
            (Shape::Tokens { c, .. }, Shape::Dense { .. }) => {
                let c = *c;
                ensure!(
                    db.len() == c,
                    "per-channel operand has {} values, expected {c}",
                    db.len()
                );
                for row in out.data.chunks_exact_mut(c) {
                    row.iter_mut()
                        .zip(db)
                        .for_each(|(x, &y)| *x = kind.apply(*x, y));
                }
            }
            (Shape::Dense { .. }, Shape::Dense { .. }) => {
                ensure!(out.data.len() == db.len(), "operand sizes differ");
                out.data
                    .iter_mut()
                    .zip(db)
                    .for_each(|(x, &y)| *x = kind.apply(*x, y));
            }
            (Shape::Dense { .. }, Shape::Tokens { .. }) => bail!("unreachable operand order"),
        }
        // The other operand, when read for the last time, goes back to the free list.
        if let Cow::Owned(v) = b {
            bufs.give(v.into_data());
        }
        Ok(out)
    }

    fn in_place(&self) -> bool {
        true
    }

    fn cost(&self, tokens: &[usize]) -> u64 {
        (self.level.map_or(1, |l| tokens[l]) * self.c) as u64
    }

    fn is_add(&self) -> bool {
        self.kind == BinaryKind::Add
    }

    fn gpu_arrays(&self) -> Option<Vec<Cow<'_, [f32]>>> {
        Some(Vec::new())
    }

    fn record(&self, io: &mut StepIo<'_>, _arrays: &[u64]) -> Result<Shape> {
        let (sa, a) = io.input(0)?;
        let (sb, b) = io.input(1)?;
        // The token operand first, as the CPU op orders them.
        let ((sa, a), (sb, b)) = match (sa, sb) {
            (Shape::Dense { .. }, Shape::Tokens { .. }) => ((sb, b), (sa, a)),
            _ => ((sa, a), (sb, b)),
        };
        let (sa, sb) = (sa.clone(), sb.clone());
        let n = io.len(&sa);
        let per_channel = match (&sa, &sb) {
            (Shape::Tokens { level: la, .. }, Shape::Tokens { level: lb, .. }) => {
                ensure!(la == lb, "operands on different token sets ({la} vs {lb})");
                0
            }
            (Shape::Tokens { c, .. }, Shape::Dense { shape }) => {
                let m: usize = shape.iter().product();
                ensure!(m == *c, "per-channel operand has {m} values, expected {c}");
                *c
            }
            _ => 0,
        };
        ensure!(per_channel > 0 || io.len(&sb) == n, "operand sizes differ");
        let y = io.output(n)?;
        let (count, row_len) = io.count_of(&sa);
        let p = BinaryParams {
            a,
            b,
            y,
            count,
            n: n as i32,
            row_len,
            per_channel: per_channel as i32,
            kind: match self.kind {
                BinaryKind::Add => 0,
                BinaryKind::Mul => 1,
            },
        };
        io.launch(KERNEL, n, &p);
        Ok(sa)
    }
}

/// `BinaryParams` of `elementwise.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BinaryParams {
    pub a: u64,
    pub b: u64,
    pub y: u64,
    pub count: u64,
    pub n: i32,
    pub row_len: i32,
    pub per_channel: i32,
    pub kind: i32,
}

// SAFETY: repr(C) addresses and i32s, as in elementwise.cu.
unsafe impl KernelArgs for BinaryParams {}

const KERNEL: Kernel = Kernel {
    family: Family::Elementwise,
    name: "sfx_binary",
};
