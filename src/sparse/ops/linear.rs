//! Fully connected layers on dense values: Gemm, MatMul, and 1×1 convs after
//! global pooling (squeeze-excite).

use super::{ActivationKind, Op};
use crate::sparse::{buffers::Buffers, gemm, plan::Frame, value::Value};
use anyhow::{ensure, Result};
use std::borrow::Cow;

/// `y = x · W + b` on a dense `[1, K, (1, 1)]` value.
#[derive(Clone, Debug)]
pub struct Linear {
    /// What the ONNX node was (for listings).
    pub source: &'static str,
    pub weights: gemm::Weights,
    pub bias: Vec<f32>,
    /// Output shape.
    pub shape: Vec<usize>,
    /// Activation applied to the output (fused at load).
    pub act: Option<ActivationKind>,
}

impl Op for Linear {
    fn name(&self) -> &'static str {
        self.source
    }

    fn eval(&self, inputs: Vec<Cow<'_, Value>>, _frame: &Frame, bufs: &Buffers) -> Result<Value> {
        let Value::Dense { data: x, .. } = &*inputs[0] else {
            anyhow::bail!("{} expects a dense input", self.source);
        };
        ensure!(
            x.len() == self.weights.k,
            "{} expects {} inputs, got {}",
            self.source,
            self.weights.k,
            x.len()
        );
        let mut y = bufs.take(self.bias.len());
        y.copy_from_slice(&self.bias);
        gemm::matmul(
            1,
            x,
            self.weights.k,
            &self.weights,
            &mut y,
            self.weights.n,
            true,
        );
        if let Some(a) = self.act {
            a.apply_all(&mut y);
        }
        Ok(Value::Dense {
            shape: self.shape.clone(),
            data: y,
        })
    }

    fn fuse_activation(&mut self, act: ActivationKind) -> bool {
        super::activation::fuse_once(&mut self.act, act)
    }

    fn fused(&self) -> Option<ActivationKind> {
        self.act
    }

    fn cost(&self, _tokens: &[usize]) -> u64 {
        (self.weights.k * self.weights.n) as u64
    }
}
