//! Elementwise activations: Relu, Clip (Relu6), Sigmoid, HardSigmoid, HardSwish.

use super::Op;
use crate::sparse::{buffers::Buffers, plan::Frame, value::Value};
use anyhow::Result;
use std::borrow::Cow;

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

/// Sets `slot` to `act` unless an activation is already fused there: the
/// shared body of [`super::Op::fuse_activation`] for ops that carry one.
pub fn fuse_once(slot: &mut Option<ActivationKind>, act: ActivationKind) -> bool {
    slot.is_none() && {
        *slot = Some(act);
        true
    }
}

/// An activation op; keeps the active set.
#[derive(Clone, Debug)]
pub struct Activation {
    pub kind: ActivationKind,
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
}
