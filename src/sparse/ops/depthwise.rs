//! Depthwise conv on token rows: per output token, a channel-contiguous
//! multiply-add over the taps the rulebook lists (vectorised over channels).

use super::Op;
use crate::sparse::{plan::Frame, rulebook::Window, tokens::INACTIVE, value::Value};
use anyhow::{ensure, Result};
use std::borrow::Cow;

/// Depthwise conv (groups = channels, one filter per channel).
#[derive(Clone, Debug)]
pub struct Depthwise {
    pub c: usize,
    pub window: Window,
    pub in_level: usize,
    pub out_level: usize,
    pub rulebook: usize,
    /// `taps × c`, tap-major.
    pub weights: Vec<f32>,
    pub bias: Vec<f32>,
}

impl Op for Depthwise {
    fn name(&self) -> &'static str {
        "DepthwiseConv"
    }

    fn eval(&self, inputs: Vec<Cow<'_, Value>>, frame: &Frame) -> Result<Value> {
        let Value::Tokens { level, c, data: x } = &*inputs[0] else {
            anyhow::bail!("depthwise conv expects token input");
        };
        ensure!(
            *level == self.in_level && *c == self.c,
            "depthwise input mismatch"
        );
        let rb = &frame.rulebooks[self.rulebook];
        let n_out = frame.sets[self.out_level].len();
        let c = self.c;
        let mut y = vec![0.0f32; n_out * c];
        for (n, out) in y.chunks_exact_mut(c).enumerate() {
            out.copy_from_slice(&self.bias);
            for (t, &i) in rb.row(n).iter().enumerate() {
                if i == INACTIVE {
                    continue;
                }
                let xs = &x[i as usize * c..(i as usize + 1) * c];
                let ws = &self.weights[t * c..(t + 1) * c];
                for ((o, &xv), &wv) in out.iter_mut().zip(xs).zip(ws) {
                    *o += xv * wv;
                }
            }
        }
        Ok(Value::Tokens {
            level: self.out_level,
            c,
            data: y,
        })
    }

    fn cost(&self, tokens: &[usize]) -> u64 {
        (tokens[self.out_level] * self.window.kh * self.window.kw * self.c) as u64
    }
}
