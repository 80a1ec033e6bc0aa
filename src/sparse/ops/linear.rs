//! Fully connected layers on dense values: Gemm, MatMul, and 1×1 convs after
//! global pooling (squeeze-excite).

use super::Op;
use crate::sparse::{gemm, plan::Frame, value::Value};
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
}

impl Op for Linear {
    fn name(&self) -> &'static str {
        self.source
    }

    fn eval(&self, inputs: Vec<Cow<'_, Value>>, _frame: &Frame) -> Result<Value> {
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
        let mut y = self.bias.clone();
        gemm::matmul(
            1,
            x,
            self.weights.k,
            &self.weights,
            &mut y,
            self.weights.n,
            true,
        );
        Ok(Value::Dense {
            shape: self.shape.clone(),
            data: y,
        })
    }

    fn cost(&self, _tokens: &[usize]) -> u64 {
        (self.weights.k * self.weights.n) as u64
    }
}
