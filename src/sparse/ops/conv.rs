//! Conv on token rows: 1×1 stride-1 as one GEMM; everything else (k×k, grouped,
//! strided) gathers neighbour rows through the rulebook (im2col on active
//! tokens only) and runs one GEMM per group.

use super::Op;
use crate::sparse::{gemm, plan::Frame, rulebook::Window, tokens::INACTIVE, value::Value};
use anyhow::{ensure, Result};
use std::borrow::Cow;

/// A conv lowered for tokens; weights packed as `(taps · cin/g) × cout/g` per group.
#[derive(Clone, Debug)]
pub struct Conv {
    pub cin: usize,
    pub cout: usize,
    pub groups: usize,
    pub window: Window,
    pub in_level: usize,
    pub out_level: usize,
    /// Index of the frame rulebook, `None` for 1×1 stride-1 (reads its own token).
    pub rulebook: Option<usize>,
    /// One weight matrix per group.
    pub weights: Vec<gemm::Weights>,
    pub bias: Vec<f32>,
}

impl Op for Conv {
    fn name(&self) -> &'static str {
        if self.rulebook.is_none() {
            "Conv1x1"
        } else if self.groups > 1 {
            "GroupConv"
        } else {
            "Conv"
        }
    }

    fn eval(&self, inputs: Vec<Cow<'_, Value>>, frame: &Frame) -> Result<Value> {
        let Value::Tokens { level, c, data: x } = &*inputs[0] else {
            anyhow::bail!("conv expects token input");
        };
        ensure!(
            *level == self.in_level && *c == self.cin,
            "conv input mismatch"
        );
        let n_out = frame.sets[self.out_level].len();
        let mut y = Vec::with_capacity(n_out * self.cout);
        for _ in 0..n_out {
            y.extend_from_slice(&self.bias);
        }
        let Some(rb) = self.rulebook else {
            gemm::matmul(
                n_out,
                x,
                self.cin,
                &self.weights[0],
                &mut y,
                self.cout,
                true,
            );
            return Ok(Value::Tokens {
                level: self.out_level,
                c: self.cout,
                data: y,
            });
        };
        let rb = &frame.rulebooks[rb];
        let (cin_g, cout_g) = (self.cin / self.groups, self.cout / self.groups);
        let k = rb.taps * cin_g;
        let mut cols = vec![0.0f32; n_out * k];
        for (g, w) in self.weights.iter().enumerate() {
            for (n, col) in cols.chunks_exact_mut(k).enumerate() {
                for (&i, dst) in rb.row(n).iter().zip(col.chunks_exact_mut(cin_g)) {
                    if i == INACTIVE {
                        dst.fill(0.0);
                    } else {
                        let src = i as usize * self.cin + g * cin_g;
                        dst.copy_from_slice(&x[src..src + cin_g]);
                    }
                }
            }
            gemm::matmul(n_out, &cols, k, w, &mut y[g * cout_g..], self.cout, true);
        }
        Ok(Value::Tokens {
            level: self.out_level,
            c: self.cout,
            data: y,
        })
    }

    fn cost(&self, tokens: &[usize]) -> u64 {
        let taps = self.window.kh * self.window.kw;
        (tokens[self.out_level] * taps * (self.cin / self.groups) * self.cout) as u64
    }
}
