//! Per-channel `x · scale + shift`: a BatchNormalization that could not be
//! folded into a conv, or an Add/Mul with a per-channel constant. On the
//! GPU: `sfx_affine` of `elementwise.cu`.

use super::{OnnxNode, Op, Tensor};
use crate::onnx::{attr_f32, node_name};
use crate::sparse::launch::{Family, Kernel, KernelArgs, StepIo};
use crate::sparse::{buffers::Buffers, frame::Frame, value::Shape, value::Value};
use anyhow::{bail, ensure, Context, Result};
use std::borrow::Cow;
use tract_onnx::pb::NodeProto;

/// Per-channel affine map; keeps the active set.
#[derive(Clone, Debug)]
pub struct ChannelAffine {
    /// What the ONNX node was (for listings).
    pub source: &'static str,
    pub scale: Vec<f32>,
    pub shift: Vec<f32>,
    /// Tokens at which level, or `None` for a dense value.
    pub level: Option<usize>,
}

impl ChannelAffine {
    /// Lowers `x · scale + shift` of computed tensor `x`.
    pub fn emit(
        n: &mut OnnxNode<'_>,
        source: &'static str,
        x: Tensor,
        scale: Vec<f32>,
        shift: Vec<f32>,
    ) -> Result<Tensor> {
        let c = x.shape.channels();
        ensure!(
            scale.len() == c && shift.len() == c,
            "per-channel parameters have {} values, tensor has {c} channels",
            scale.len()
        );
        let op = ChannelAffine {
            source,
            scale,
            shift,
            level: x.shape.level(),
        };
        Ok(n.emit(op, vec![x.slot], x.shape))
    }
}

/// Builds a BatchNormalization not folded into a conv.
pub fn batch_norm_from_onnx(n: &mut OnnxNode<'_>) -> Result<Tensor> {
    let x = n.input(0)?;
    let (scale, shift) = batch_norm(n.node, n.consts)?;
    ChannelAffine::emit(n, "BatchNorm", x, scale, shift)
}

/// BatchNormalization as per-channel `(scale, shift)`.
pub fn batch_norm(
    node: &NodeProto,
    consts: &crate::onnx::Constants,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let get = |k: usize| -> Result<Vec<f32>> {
        let name = node
            .input
            .get(k)
            .with_context(|| format!("missing input {k}"))?;
        ensure!(
            consts.contains(name),
            "input {k} ('{name}') must be a constant"
        );
        consts.f32s(name)
    };
    let (gamma, beta, mean, var) = (get(1)?, get(2)?, get(3)?, get(4)?);
    let eps = attr_f32(node, "epsilon", Some(1e-5))?;
    ensure!(
        eps >= 0.0,
        "{}: epsilon must be >= 0, got {eps}",
        node_name(node)
    );
    let c = gamma.len();
    ensure!(
        beta.len() == c && mean.len() == c && var.len() == c,
        "BatchNormalization parameters differ in length"
    );
    let scale: Vec<f32> = gamma
        .iter()
        .zip(&var)
        .map(|(g, v)| g / (v + eps).sqrt())
        .collect();
    if let Some(i) = scale.iter().position(|s| !s.is_finite()) {
        bail!(
            "{}: channel {i} has variance {} + epsilon {eps}, which must be > 0",
            node_name(node),
            var[i]
        );
    }
    let shift = beta
        .iter()
        .zip(&mean)
        .zip(&scale)
        .map(|((b, m), s)| b - m * s)
        .collect();
    Ok((scale, shift))
}

impl Op for ChannelAffine {
    fn name(&self) -> &'static str {
        self.source
    }

    fn eval(
        &self,
        mut inputs: Vec<Cow<'_, Value>>,
        _frame: &Frame,
        _bufs: &Buffers,
    ) -> Result<Value> {
        let mut v = inputs.swap_remove(0).into_owned();
        let c = self.scale.len();
        ensure!(
            v.channels() == c,
            "affine expects {c} channels, got {}",
            v.channels()
        );
        match &v.shape {
            Shape::Tokens { .. } => {
                for row in v.data.chunks_exact_mut(c) {
                    for ((x, s), b) in row.iter_mut().zip(&self.scale).zip(&self.shift) {
                        *x = *x * s + b;
                    }
                }
            }
            Shape::Dense { shape } => {
                // Channel axis 1; trailing axes (1×1 spatial) repeat each channel.
                let inner: usize = shape.iter().skip(2).product();
                for (i, x) in v.data.iter_mut().enumerate() {
                    let ch = (i / inner.max(1)) % c;
                    *x = *x * self.scale[ch] + self.shift[ch];
                }
            }
        }
        Ok(v)
    }

    fn in_place(&self) -> bool {
        true
    }

    fn cost(&self, tokens: &[usize]) -> u64 {
        (self.level.map_or(1, |l| tokens[l]) * self.scale.len()) as u64
    }

    fn gpu_arrays(&self) -> Option<Vec<Cow<'_, [f32]>>> {
        Some(vec![
            Cow::Borrowed(&self.scale[..]),
            Cow::Borrowed(&self.shift[..]),
        ])
    }

    fn record(&self, io: &mut StepIo<'_>, arrays: &[u64]) -> Result<Shape> {
        let c = self.scale.len();
        let (shape, x) = io.input(0)?;
        let shape = shape.clone();
        let inner = match &shape {
            Shape::Tokens { c: ci, .. } => {
                ensure!(*ci == c, "affine expects {c} channels, got {ci}");
                1
            }
            Shape::Dense { shape } => shape.iter().skip(2).product::<usize>().max(1),
        };
        let n = io.len(&shape);
        let y = io.output(n)?;
        let (count, row_len) = io.count_of(&shape);
        let p = AffineParams {
            x,
            scale: arrays[0],
            shift: arrays[1],
            y,
            count,
            n: n as i32,
            row_len,
            c: c as i32,
            inner: inner as i32,
        };
        io.launch(KERNEL, n, &p);
        Ok(shape)
    }
}

/// `AffineParams` of `elementwise.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AffineParams {
    pub x: u64,
    pub scale: u64,
    pub shift: u64,
    pub y: u64,
    pub count: u64,
    pub n: i32,
    pub row_len: i32,
    pub c: i32,
    pub inner: i32,
}

// SAFETY: repr(C) addresses and i32s, as in elementwise.cu.
unsafe impl KernelArgs for AffineParams {}

const KERNEL: Kernel = Kernel {
    family: Family::Elementwise,
    name: "sfx_affine",
};
