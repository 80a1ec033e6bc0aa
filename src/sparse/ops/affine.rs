//! Per-channel `x · scale + shift`: a BatchNormalization that could not be
//! folded into a conv, or an Add/Mul with a per-channel constant.

use super::Op;
use crate::sparse::{buffers::Buffers, plan::Frame, value::Value};
use anyhow::{ensure, Result};
use std::borrow::Cow;

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
        match &mut v {
            Value::Tokens { data, .. } => {
                for row in data.chunks_exact_mut(c) {
                    for ((x, s), b) in row.iter_mut().zip(&self.scale).zip(&self.shift) {
                        *x = *x * s + b;
                    }
                }
            }
            Value::Dense { shape, data } => {
                // Channel axis 1; trailing axes (1×1 spatial) repeat each channel.
                let inner: usize = shape.iter().skip(2).product();
                for (i, x) in data.iter_mut().enumerate() {
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
}
