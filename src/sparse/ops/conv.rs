//! Conv on token rows: 1×1 stride-1 as one GEMM; everything else (k×k, grouped,
//! strided) gathers neighbour rows through the rulebook (im2col on active
//! tokens only) and runs one GEMM per group. Output rows are split across the
//! pool's threads; bias and the activation after the conv are applied in the
//! same pass.

use super::{ActivationKind, Op};
use crate::sparse::{
    buffers::Buffers, gemm, plan::Frame, rulebook::Window, tokens::DROPPED, value::Value,
};
use crate::threads::par_rows;
use anyhow::{ensure, Result};
use std::borrow::Cow;
use std::cell::RefCell;

/// Output rows one thread takes at least (below this, splitting costs more than it saves).
const MIN_ROWS: usize = 16;

thread_local! {
    /// Each worker's im2col rows, kept across frames (it only grows).
    static COLS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

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
    /// The input's fill vector (`cin` values), read where a tap falls on a
    /// dropped position; `None` when the input holds zero there.
    pub fill: Option<Vec<f32>>,
    /// Activation applied to the output (fused at load).
    pub act: Option<ActivationKind>,
}

impl Conv {
    /// Output rows `first..first + y.len() / cout` into `y`.
    fn rows(&self, x: &[f32], frame: &Frame, first: usize, y: &mut [f32]) {
        let rows = y.len() / self.cout;
        for row in y.chunks_exact_mut(self.cout) {
            row.copy_from_slice(&self.bias);
        }
        match self.rulebook {
            None => gemm::matmul(
                rows,
                &x[first * self.cin..],
                self.cin,
                &self.weights[0],
                y,
                self.cout,
                true,
            ),
            Some(rb) => {
                let rb = &frame.rulebooks[rb];
                let (cin_g, cout_g) = (self.cin / self.groups, self.cout / self.groups);
                let k = rb.taps * cin_g;
                COLS.with(|cols| {
                    let mut cols = cols.borrow_mut();
                    if cols.len() < rows * k {
                        cols.resize(rows * k, 0.0);
                    }
                    let cols = &mut cols[..rows * k];
                    for (g, w) in self.weights.iter().enumerate() {
                        for (n, col) in cols.chunks_exact_mut(k).enumerate() {
                            for (&i, dst) in
                                rb.row(first + n).iter().zip(col.chunks_exact_mut(cin_g))
                            {
                                match (i, self.fill.as_deref()) {
                                    (DROPPED, Some(f)) => {
                                        dst.copy_from_slice(&f[g * cin_g..(g + 1) * cin_g])
                                    }
                                    // Padding, or a dropped position holding zero.
                                    (i, _) if i >= DROPPED => dst.fill(0.0),
                                    (i, _) => {
                                        let src = i as usize * self.cin + g * cin_g;
                                        dst.copy_from_slice(&x[src..src + cin_g]);
                                    }
                                }
                            }
                        }
                        gemm::matmul(rows, cols, k, w, &mut y[g * cout_g..], self.cout, true);
                    }
                });
            }
        }
        if let Some(a) = self.act {
            a.apply_all(y);
        }
    }
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

    fn eval(&self, inputs: Vec<Cow<'_, Value>>, frame: &Frame, bufs: &Buffers) -> Result<Value> {
        let Value::Tokens { level, c, data: x } = &*inputs[0] else {
            anyhow::bail!("conv expects token input");
        };
        ensure!(
            *level == self.in_level && *c == self.cin,
            "conv input mismatch"
        );
        let n_out = frame.sets[self.out_level].len();
        let mut y = bufs.take(n_out * self.cout);
        par_rows(&mut y, self.cout, MIN_ROWS, |first, rows| {
            self.rows(x, frame, first, rows)
        });
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

    fn fuse_activation(&mut self, act: ActivationKind) -> bool {
        super::activation::fuse_once(&mut self.act, act)
    }

    fn fused(&self) -> Option<ActivationKind> {
        self.act
    }
}
