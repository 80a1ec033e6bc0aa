//! Depthwise conv on token rows: per output token, a channel-contiguous
//! multiply-add over the taps the rulebook lists. The channel loop is
//! vectorised with fused multiply-adds: AVX2/FMA where the x86 CPU has them
//! (checked at run time), NEON on aarch64.

use super::{ActivationKind, Op};
use crate::sparse::{
    buffers::Buffers, plan::Frame, rulebook::Rulebook, rulebook::Window, tokens::DROPPED,
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
    /// `taps × c`: each tap's weights times the input's fill vector, added
    /// where that tap falls on a dropped position; `None` when the input
    /// holds zero there.
    pub fill_taps: Option<Vec<f32>>,
    /// Activation applied to the output (fused at load).
    pub act: Option<ActivationKind>,
}

/// What one output row reads besides the input rows.
#[derive(Clone, Copy)]
struct Taps<'a> {
    weights: &'a [f32],
    bias: &'a [f32],
    fill_taps: Option<&'a [f32]>,
}

/// Output rows `first..` into `y`: bias, then every tap in order (an active
/// one multiplies, a dropped one adds its precomputed fill term, padding adds
/// nothing). `FMA` selects fused multiply-adds (one rounding) over a
/// multiply then an add.
#[inline(always)]
fn rows<const FMA: bool>(x: &[f32], rb: &Rulebook, k: Taps<'_>, first: usize, y: &mut [f32]) {
    let Taps {
        weights,
        bias,
        fill_taps,
    } = k;
    let c = bias.len();
    for (n, out) in y.chunks_exact_mut(c).enumerate() {
        out.copy_from_slice(bias);
        for (t, &i) in rb.row(first + n).iter().enumerate() {
            if i >= DROPPED {
                if let (DROPPED, Some(f)) = (i, fill_taps) {
                    out.iter_mut()
                        .zip(&f[t * c..(t + 1) * c])
                        .for_each(|(o, &v)| *o += v);
                }
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
unsafe fn rows_avx2(x: &[f32], rb: &Rulebook, k: Taps<'_>, first: usize, y: &mut [f32]) {
    rows::<true>(x, rb, k, first, y)
}

/// The best [`rows`] this CPU runs.
fn rows_dispatch(x: &[f32], rb: &Rulebook, k: Taps<'_>, first: usize, y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: both features were just detected.
            return unsafe { rows_avx2(x, rb, k, first, y) };
        }
        rows::<false>(x, rb, k, first, y)
    }
    #[cfg(target_arch = "aarch64")]
    {
        // NEON and its fused multiply-add are part of every aarch64 CPU.
        rows::<true>(x, rb, k, first, y)
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        rows::<false>(x, rb, k, first, y)
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
        let k = Taps {
            weights: &self.weights,
            bias: &self.bias,
            fill_taps: self.fill_taps.as_deref(),
        };
        par_rows(&mut y, self.c, MIN_ROWS, |first, out| {
            rows_dispatch(x, rb, k, first, out);
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
