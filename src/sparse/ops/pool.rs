//! Global average pooling over active tokens (GlobalAveragePool, ReduceMean over space).

use super::Op;
use crate::sparse::{buffers::Buffers, plan::Frame, value::Value};
use anyhow::Result;
use std::borrow::Cow;

/// Mean over the active tokens of one level: tokens → dense value.
#[derive(Clone, Debug)]
pub struct GlobalMean {
    pub source: &'static str,
    pub level: usize,
    pub c: usize,
    /// Output shape (`[1, C, 1, 1]` or `[1, C]`).
    pub shape: Vec<usize>,
}

impl Op for GlobalMean {
    fn name(&self) -> &'static str {
        self.source
    }

    fn eval(&self, inputs: Vec<Cow<'_, Value>>, _frame: &Frame, bufs: &Buffers) -> Result<Value> {
        let Value::Tokens { c, data, .. } = &*inputs[0] else {
            anyhow::bail!("{} expects token input", self.source);
        };
        let mut sum = bufs.take(*c);
        let rows = data.len() / c;
        for row in data.chunks_exact(*c) {
            sum.iter_mut().zip(row).for_each(|(s, &x)| *s += x);
        }
        // The energy layer keeps at least one token, and strided sets inherit it.
        let inv = 1.0 / rows.max(1) as f32;
        sum.iter_mut().for_each(|s| *s *= inv);
        Ok(Value::Dense {
            shape: self.shape.clone(),
            data: sum,
        })
    }

    fn cost(&self, tokens: &[usize]) -> u64 {
        (tokens[self.level] * self.c) as u64
    }
}
