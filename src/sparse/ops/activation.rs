//! Elementwise activations: Relu, Clip (Relu6), Sigmoid, HardSigmoid,
//! HardSwish. Usually fused into the conv or linear op before them (CPU row
//! loop and GPU kernel alike); a lone one runs `sfx_activation`.

use super::{OnnxNode, Op, Tensor};
use crate::onnx::attr_f32;
use crate::sparse::launch::{Family, Kernel, KernelArgs, StepIo};
use crate::sparse::{buffers::Buffers, frame::Frame, value::Shape, value::Value};
use anyhow::{bail, ensure, Result};
use std::borrow::Cow;
use std::sync::Arc;

/// Which function is applied.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ActivationKind {
    Relu,
    /// `min(max(x, lo), hi)`.
    Clip {
        lo: f32,
        hi: f32,
    },
    Sigmoid,
    /// `max(0, min(1, αx + β))`.
    HardSigmoid {
        alpha: f32,
        beta: f32,
    },
    /// `x · max(0, min(1, x/6 + 1/2))`.
    HardSwish,
}

impl ActivationKind {
    /// Applies the function to one value.
    #[inline]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            ActivationKind::Relu => x.max(0.0),
            ActivationKind::Clip { lo, hi } => x.max(lo).min(hi),
            ActivationKind::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            ActivationKind::HardSigmoid { alpha, beta } => (alpha * x + beta).clamp(0.0, 1.0),
            ActivationKind::HardSwish => x * (x / 6.0 + 0.5).clamp(0.0, 1.0),
        }
    }

    /// The function as a clamp to `[lo, hi]` (ReLU, Clip), for products
    /// that clamp their outputs as they store them; `None` for the others.
    pub fn clamp(self) -> Option<(f32, f32)> {
        match self {
            ActivationKind::Relu => Some((0.0, f32::INFINITY)),
            ActivationKind::Clip { lo, hi } => Some((lo, hi)),
            _ => None,
        }
    }

    /// The ONNX op name.
    pub fn name(self) -> &'static str {
        match self {
            ActivationKind::Relu => "Relu",
            ActivationKind::Clip { .. } => "Clip",
            ActivationKind::Sigmoid => "Sigmoid",
            ActivationKind::HardSigmoid { .. } => "HardSigmoid",
            ActivationKind::HardSwish => "HardSwish",
        }
    }

    /// Applies the function to every value (the match is outside the loop, so
    /// each arm vectorises).
    pub fn apply_all(self, xs: &mut [f32]) {
        match self {
            ActivationKind::Relu => xs.iter_mut().for_each(|x| *x = x.max(0.0)),
            ActivationKind::Clip { lo, hi } => xs.iter_mut().for_each(|x| *x = x.max(lo).min(hi)),
            _ => xs.iter_mut().for_each(|x| *x = self.apply(*x)),
        }
    }
}

/// An activation as the kernels take it (`SfxAct` in `common.cuh`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GpuAct {
    pub code: i32,
    pub a0: f32,
    pub a1: f32,
}

impl GpuAct {
    /// The kernels' encoding of `a` (none: code 0, the identity).
    pub fn of(a: Option<ActivationKind>) -> GpuAct {
        let (code, a0, a1) = match a {
            None => (0, 0.0, 0.0),
            Some(ActivationKind::Relu) => (1, 0.0, 0.0),
            Some(ActivationKind::Clip { lo, hi }) => (2, lo, hi),
            Some(ActivationKind::Sigmoid) => (3, 0.0, 0.0),
            Some(ActivationKind::HardSigmoid { alpha, beta }) => (4, alpha, beta),
            Some(ActivationKind::HardSwish) => (5, 0.0, 0.0),
        };
        GpuAct { code, a0, a1 }
    }
}

/// `ActivationParams` of `elementwise.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ActivationParams {
    pub x: u64,
    pub y: u64,
    pub count: u64,
    pub n: i32,
    pub row_len: i32,
    pub act: GpuAct,
}

// SAFETY: repr(C) addresses, i32s and a repr(C) GpuAct, as in elementwise.cu.
unsafe impl KernelArgs for ActivationParams {}

/// The lone-activation kernel; with no function, a plain copy.
pub const KERNEL: Kernel = Kernel {
    family: Family::Elementwise,
    name: "sfx_activation",
};

/// Records `act` (or a copy, with `None`) of the `shape` value at `x`.
pub fn record_elementwise(
    io: &mut StepIo<'_>,
    shape: &Shape,
    x: u64,
    act: Option<ActivationKind>,
) -> Result<()> {
    let n = io.len(shape);
    let y = io.output(n)?;
    let (count, row_len) = io.count_of(shape);
    let p = ActivationParams {
        x,
        y,
        count,
        n: n as i32,
        row_len,
        act: GpuAct::of(act),
    };
    io.launch(KERNEL, n, &p);
    Ok(())
}

/// An activation op; keeps the active set.
#[derive(Clone, Debug)]
pub struct Activation {
    pub kind: ActivationKind,
}

/// Builds an activation from its ONNX node.
pub fn from_onnx(n: &mut OnnxNode<'_>) -> Result<Tensor> {
    let kind = match n.op_type() {
        "Relu" => ActivationKind::Relu,
        "Sigmoid" => ActivationKind::Sigmoid,
        "HardSwish" => ActivationKind::HardSwish,
        "HardSigmoid" => ActivationKind::HardSigmoid {
            alpha: attr_f32(n.node, "alpha", Some(0.2))?,
            beta: attr_f32(n.node, "beta", Some(0.5))?,
        },
        "Clip" => {
            let bound = |k: usize, attr: &str, default: f32| -> Result<f32> {
                match n.constant(k)? {
                    Some(v) if v.len() == 1 => Ok(v[0]),
                    Some(v) => bail!("Clip bound must be a scalar, has {} values", v.len()),
                    None => attr_f32(n.node, attr, Some(default)),
                }
            };
            let lo = bound(1, "min", f32::NEG_INFINITY)?;
            let hi = bound(2, "max", f32::INFINITY)?;
            ensure!(lo <= hi, "Clip min {lo} > max {hi}");
            ActivationKind::Clip { lo, hi }
        }
        other => bail!("{other} is not an activation"),
    };
    let x = n.input(0)?;
    Ok(n.emit(Activation { kind }, vec![x.slot], x.shape))
}

impl Op for Activation {
    fn name(&self) -> &'static str {
        self.kind.name()
    }

    fn eval(
        &self,
        mut inputs: Vec<Cow<'_, Value>>,
        _frame: &Frame,
        _bufs: &Buffers,
    ) -> Result<Value> {
        let mut v = inputs.swap_remove(0).into_owned();
        self.kind.apply_all(v.data_mut());
        Ok(v)
    }

    fn in_place(&self) -> bool {
        true
    }

    fn activation(&self) -> Option<ActivationKind> {
        Some(self.kind)
    }

    fn cost(&self, _tokens: &[usize]) -> u64 {
        0
    }

    fn gpu_arrays(&self) -> Option<Vec<Cow<'_, [f32]>>> {
        Some(Vec::new())
    }

    fn record(&self, io: &mut StepIo<'_>, _arrays: &[u64]) -> Result<Shape> {
        let (shape, x) = io.input(0)?;
        let shape = shape.clone();
        record_elementwise(io, &shape, x, Some(self.kind))?;
        Ok(shape)
    }
}

/// A copy of `op` changed by `set`: how an op with an activation slot
/// answers [`Op::with_activation`].
pub(super) fn fused<T: Op + Clone + 'static>(op: &T, set: impl FnOnce(&mut T)) -> Arc<dyn Op> {
    let mut op = op.clone();
    set(&mut op);
    Arc::new(op)
}
