//! Global average pooling (GlobalAveragePool, ReduceMean over space): over
//! the active tokens, or over every position when dropped ones hold a fill.

use super::Op;
use crate::sparse::{buffers::Buffers, plan::Frame, value::Value};
use anyhow::Result;
use std::borrow::Cow;

/// Global mean of one level's token map: tokens → dense value.
#[derive(Clone, Debug)]
pub struct GlobalMean {
    pub source: &'static str,
    pub level: usize,
    pub c: usize,
    /// Output shape (`[1, C, 1, 1]` or `[1, C]`).
    pub shape: Vec<usize>,
    /// The input's fill vector: with one, the mean is over every position of
    /// the level's map (the dense mean of the filled map); without, over
    /// active tokens only (submanifold semantics).
    pub fill: Option<Vec<f32>>,
}

impl Op for GlobalMean {
    fn name(&self) -> &'static str {
        self.source
    }

    fn eval(&self, inputs: Vec<Cow<'_, Value>>, frame: &Frame, bufs: &Buffers) -> Result<Value> {
        let Value::Tokens { c, data, .. } = &*inputs[0] else {
            anyhow::bail!("{} expects token input", self.source);
        };
        let mut sum = bufs.take(*c);
        let rows = data.len() / c;
        for row in data.chunks_exact(*c) {
            sum.iter_mut().zip(row).for_each(|(s, &x)| *s += x);
        }
        let inv = match &self.fill {
            Some(f) => {
                let set = &frame.sets[self.level];
                let positions = set.h * set.w;
                let dropped = positions.saturating_sub(rows) as f32;
                sum.iter_mut().zip(f).for_each(|(s, &v)| *s += dropped * v);
                1.0 / positions.max(1) as f32
            }
            // The energy layer keeps at least one token, and strided sets inherit it.
            None => 1.0 / rows.max(1) as f32,
        };
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
