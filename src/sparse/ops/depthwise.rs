//! Depthwise conv on token rows: per output token, a channel-contiguous
//! multiply-add over the taps the rulebook lists. The channel loop is
//! vectorised with fused multiply-adds: AVX2/FMA where the x86 CPU has them
//! (checked at run time), NEON on aarch64.

use super::{ActivationKind, Op};
use crate::sparse::{
    buffers::Buffers, plan::Frame, rulebook::Rulebook, rulebook::Window, tokens::INACTIVE,
    value::Value,
};
use crate::threads::par_rows;
use anyhow::{ensure, Result};
use std::borrow::Cow;

/// Output rows one thread takes at least.
const MIN_ROWS: usize = 32;

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
    /// Activation applied to the output (fused at load).
    pub act: Option<ActivationKind>,
}

/// Output rows `first..` into `y`: bias, then every active tap. `FMA` selects
/// fused multiply-adds (one rounding) over a multiply then an add.
#[inline(always)]
fn rows<const FMA: bool>(
    x: &[f32],
    rb: &Rulebook,
    weights: &[f32],
    bias: &[f32],
    first: usize,
    y: &mut [f32],
) {
    let c = bias.len();
    for (n, out) in y.chunks_exact_mut(c).enumerate() {
        out.copy_from_slice(bias);
        for (t, &i) in rb.row(first + n).iter().enumerate() {
            if i == INACTIVE {
                continue;
            }
            let xs = &x[i as usize * c..(i as usize + 1) * c];
            let ws = &weights[t * c..(t + 1) * c];
            if FMA {
                for ((o, &xv), &wv) in out.iter_mut().zip(xs).zip(ws) {
                    *o = xv.mul_add(wv, *o);
                }
            } else {
                for ((o, &xv), &wv) in out.iter_mut().zip(xs).zip(ws) {
                    *o += xv * wv;
                }
            }
        }
    }
}

/// [`rows`] compiled for AVX2 and FMA.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2(
    x: &[f32],
    rb: &Rulebook,
    weights: &[f32],
    bias: &[f32],
    first: usize,
    y: &mut [f32],
) {
    rows::<true>(x, rb, weights, bias, first, y)
}

/// The best [`rows`] this CPU runs.
fn rows_dispatch(
    x: &[f32],
    rb: &Rulebook,
    weights: &[f32],
    bias: &[f32],
    first: usize,
    y: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: both features were just detected.
            return unsafe { rows_avx2(x, rb, weights, bias, first, y) };
        }
        rows::<false>(x, rb, weights, bias, first, y)
    }
    #[cfg(target_arch = "aarch64")]
    {
        // NEON and its fused multiply-add are part of every aarch64 CPU.
        rows::<true>(x, rb, weights, bias, first, y)
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        rows::<false>(x, rb, weights, bias, first, y)
    }
}

impl Op for Depthwise {
    fn name(&self) -> &'static str {
        "DepthwiseConv"
    }

    fn eval(&self, inputs: Vec<Cow<'_, Value>>, frame: &Frame, bufs: &Buffers) -> Result<Value> {
        let Value::Tokens { level, c, data: x } = &*inputs[0] else {
            anyhow::bail!("depthwise conv expects token input");
        };
        ensure!(
            *level == self.in_level && *c == self.c,
            "depthwise input mismatch"
        );
        let rb = &frame.rulebooks[self.rulebook];
        let n_out = frame.sets[self.out_level].len();
        let mut y = bufs.take(n_out * self.c);
        par_rows(&mut y, self.c, MIN_ROWS, |first, out| {
            rows_dispatch(x, rb, &self.weights, &self.bias, first, out);
            if let Some(a) = self.act {
                a.apply_all(out);
            }
        });
        Ok(Value::Tokens {
            level: self.out_level,
            c: self.c,
            data: y,
        })
    }

    fn cost(&self, tokens: &[usize]) -> u64 {
        (tokens[self.out_level] * self.window.kh * self.window.kw * self.c) as u64
    }

    fn fuse_activation(&mut self, act: ActivationKind) -> bool {
        super::activation::fuse_once(&mut self.act, act)
    }

    fn fused(&self) -> Option<ActivationKind> {
        self.act
    }
}
