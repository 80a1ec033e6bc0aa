//! Depthwise conv on token rows: per output token, a channel-contiguous
//! multiply-add over the taps the rulebook lists. The channel loop is
//! vectorised with fused multiply-adds: AVX2/FMA where the x86 CPU has them
//! (checked at run time), NEON on aarch64. On the GPU: `sfx_depthwise` of
//! `conv.cu`. Built from an ONNX Conv by `conv::from_onnx`.

use super::activation::GpuAct;
use super::conv::ConvNode;
use super::{ActivationKind, Op};
use crate::sparse::launch::{Family, Kernel, KernelArgs, StepIo};
use crate::sparse::{
    buffers::Buffers, frame::Frame, rulebook::Rulebook, rulebook::Window, tokens::DROPPED,
    value::Shape, value::Value,
};
use crate::threads::par_rows;
use anyhow::{ensure, Result};
use std::borrow::Cow;
use std::sync::Arc;

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

/// Channels one pass of [`rows`] sums in registers: four AVX2 vectors, so
/// each tap loads only its input and weights (the sums were loaded and stored
/// at every tap before: 1.5–2× slower). Every channel of CenterFace's
/// sparse depthwise convs (192–960) is a multiple of it.
const BLOCK: usize = 32;

/// Output rows `first..` into `y`: bias, then every tap in order (an active
/// one multiplies, a dropped one adds its precomputed fill term, padding adds
/// nothing). `FMA` selects fused multiply-adds (one rounding) over a
/// multiply then an add. Channels run in blocks of [`BLOCK`], each block's
/// sums held across the taps; the order per channel is the same.
#[inline(always)]
fn rows<const FMA: bool>(x: &[f32], rb: &Rulebook, k: Taps<'_>, first: usize, y: &mut [f32]) {
    let c = k.bias.len();
    for (n, out) in y.chunks_exact_mut(c).enumerate() {
        let taps = rb.row(first + n);
        let mut c0 = 0;
        while c0 + BLOCK <= c {
            let mut acc: [f32; BLOCK] = k.bias[c0..c0 + BLOCK].try_into().expect("block");
            channels::<FMA, BLOCK>(x, taps, k, c0, &mut acc);
            out[c0..c0 + BLOCK].copy_from_slice(&acc);
            c0 += BLOCK;
        }
        if c0 < c {
            let tail = &mut out[c0..];
            tail.copy_from_slice(&k.bias[c0..]);
            channels::<FMA, 0>(x, taps, k, c0, tail);
        }
    }
}

/// Adds one output token's taps to the sums `acc` of channels `c0..`
/// (`acc.len()` of them; `N` is that length when fixed, 0 when not, so the
/// fixed case unrolls into registers).
#[inline(always)]
fn channels<const FMA: bool, const N: usize>(
    x: &[f32],
    taps: &[u32],
    k: Taps<'_>,
    c0: usize,
    acc: &mut [f32],
) {
    let c = k.bias.len();
    let len = if N > 0 { N } else { acc.len() };
    let acc = &mut acc[..len];
    for (t, &i) in taps.iter().enumerate() {
        if i >= DROPPED {
            if let (DROPPED, Some(f)) = (i, k.fill_taps) {
                acc.iter_mut()
                    .zip(&f[t * c + c0..][..len])
                    .for_each(|(o, &v)| *o += v);
            }
            continue;
        }
        let xs = &x[i as usize * c + c0..][..len];
        let ws = &k.weights[t * c + c0..][..len];
        if FMA {
            for ((o, &xv), &wv) in acc.iter_mut().zip(xs).zip(ws) {
                *o = xv.mul_add(wv, *o);
            }
        } else {
            for ((o, &xv), &wv) in acc.iter_mut().zip(xs).zip(ws) {
                *o += xv * wv;
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

/// [`rows`] compiled for AVX-512: a block's 32 channels in two vectors.
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_avx512(x: &[f32], rb: &Rulebook, k: Taps<'_>, first: usize, y: &mut [f32]) {
    rows::<true>(x, rb, k, first, y)
}

/// The best [`rows`] this CPU runs.
fn rows_dispatch(x: &[f32], rb: &Rulebook, k: Taps<'_>, first: usize, y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::lanes::wide() {
            // SAFETY: `wide` detected AVX-512F.
            return unsafe { rows_avx512(x, rb, k, first, y) };
        }
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
        let x = &inputs[0].data;
        ensure!(
            inputs[0].shape
                == Shape::Tokens {
                    level: self.in_level,
                    c: self.c
                },
            "depthwise input mismatch"
        );
        let rb = &frame.rulebooks[self.rulebook];
        let n_out = frame.sets[self.out_level].len();
        let mut y = bufs.take_for_writing(n_out * self.c);
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
        Ok(Value::tokens(self.out_level, self.c, y))
    }

    fn cost(&self, tokens: &[usize]) -> u64 {
        (tokens[self.out_level] * self.window.kh * self.window.kw * self.c) as u64
    }

    fn with_activation(&self, act: ActivationKind) -> Option<Arc<dyn Op>> {
        self.act
            .is_none()
            .then(|| super::activation::fused(self, |d| d.act = Some(act)))
    }

    fn fused(&self) -> Option<ActivationKind> {
        self.act
    }

    fn takes_residual(&self) -> bool {
        true
    }

    fn gpu_arrays(&self) -> Option<Vec<Cow<'_, [f32]>>> {
        let mut arrays = vec![
            Cow::Borrowed(&self.weights[..]),
            Cow::Borrowed(&self.bias[..]),
        ];
        arrays.extend(self.fill_taps.as_deref().map(Cow::Borrowed));
        Some(arrays)
    }

    fn record(&self, io: &mut StepIo<'_>, arrays: &[u64]) -> Result<Shape> {
        io.tokens(0, self.c, "depthwise conv")?;
        let x = io.input(0)?.1;
        let out = Shape::Tokens {
            level: self.out_level,
            c: self.c,
        };
        let res = io.residual(&out);
        let rows = io.capacity(self.out_level);
        let y = io.output(rows * self.c)?;
        let p = DepthwiseParams {
            x,
            res,
            w: arrays[0],
            bias: arrays[1],
            rb: io.rulebook(self.rulebook),
            fill_taps: arrays.get(2).copied().unwrap_or(0),
            y,
            count: io.count(self.out_level),
            rows: rows as i32,
            c: self.c as i32,
            taps: (self.window.kh * self.window.kw) as i32,
            act: GpuAct::of(self.act),
        };
        io.launch(KERNEL, rows * self.c, &p);
        Ok(out)
    }
}

impl Depthwise {
    /// Lowers a depthwise ONNX conv (groups = channels = outputs) between
    /// `levels` (in, out) through `rulebook`; `fill` is its input's fill
    /// vector, if any.
    pub fn from_conv(
        conv: ConvNode,
        window: Window,
        (in_level, out_level): (usize, usize),
        rulebook: usize,
        fill: Option<&Vec<f32>>,
    ) -> Depthwise {
        let (c, taps) = (conv.cin, conv.taps());
        let mut data = vec![0.0; taps * c];
        for ch in 0..c {
            for t in 0..taps {
                data[t * c + ch] = conv.weights[ch * taps + t];
            }
        }
        // A dropped neighbour adds its tap's weight times the fill: one
        // precomputed row per tap.
        let fill_taps = fill.map(|f| {
            (0..taps * c)
                .map(|i| data[i] * f[i % c])
                .collect::<Vec<f32>>()
        });
        Depthwise {
            c,
            window,
            in_level,
            out_level,
            rulebook,
            weights: data,
            bias: conv.bias,
            fill_taps,
            act: None,
        }
    }
}

/// `DepthwiseParams` of `conv.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DepthwiseParams {
    pub x: u64,
    pub res: u64,
    pub w: u64,
    pub bias: u64,
    pub rb: u64,
    pub fill_taps: u64,
    pub y: u64,
    pub count: u64,
    pub rows: i32,
    pub c: i32,
    pub taps: i32,
    pub act: GpuAct,
}

// SAFETY: repr(C) addresses, i32s and a repr(C) GpuAct, as in conv.cu.
unsafe impl KernelArgs for DepthwiseParams {}

const KERNEL: Kernel = Kernel {
    family: Family::Conv,
    name: "sfx_depthwise",
};
