//! Exact CPU implementation of the energy layer (DESIGN.md, "ERSM, precisely").

use super::{EnergySpec, FeatureMap, HeadConv, TokenMask, UnaryHead};
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use crate::lanes::Lanes;
use crate::rowgemm::{Epilogue, Line};
use crate::threads::par_rows;
use anyhow::{bail, Result};

/// Unary costs `u_i` for every token, raster order.
pub fn unary(x: FeatureMap<'_>, head: &UnaryHead) -> Vec<f32> {
    match head {
        UnaryHead::Linear { w, b } => linear(x, w, *b),
        UnaryHead::TwoLayer { w1, b1, w2, b2 } => {
            // relu(W1 x + b1) is a 1×1 conv with a ReLU, and w2 · h + b2 the
            // linear head on its planes: each sum keeps its order (channels,
            // then hidden units, then the bias), and the conv's tiles and
            // threads serve the hidden layer.
            let hidden = HeadConv {
                cin: x.c,
                cout: b1.len(),
                k: 1,
                groups: 1,
                dilation: 1,
                weight: w1.clone(),
                bias: b1.clone(),
                relu: true,
            };
            let mut planes = scratch::take(hidden.cout * x.h * x.w);
            conv_into(x, &hidden, &mut planes);
            let h = FeatureMap {
                data: &planes,
                c: b1.len(),
                ..x
            };
            let u = linear(h, w2, *b2);
            scratch::give(planes);
            u
        }
        UnaryHead::Conv { layers, head } => {
            // The first conv reads the feature map itself; each later one its
            // predecessor's output.
            let mut map: Option<Vec<f32>> = None;
            let mut c = x.c;
            for l in layers {
                let input = FeatureMap {
                    data: map.as_deref().unwrap_or(x.data),
                    c,
                    ..x
                };
                let mut out = scratch::take(l.cout * x.h * x.w);
                conv_into(input, l, &mut out);
                if let Some(done) = map.replace(out) {
                    scratch::give(done);
                }
                c = l.cout;
            }
            let input = FeatureMap {
                data: map.as_deref().unwrap_or(x.data),
                c,
                ..x
            };
            let u = unary(input, head);
            if let Some(done) = map {
                scratch::give(done);
            }
            u
        }
    }
}

/// `w · x + b` per token: channel by channel, then the bias. The channel
/// loop is outermost so the inner loop runs over contiguous tokens of one
/// NCHW plane and vectorises.
fn linear(x: FeatureMap<'_>, w: &[f32], b: f32) -> Vec<f32> {
    let hw = x.h * x.w;
    let mut u = vec![0.0f32; hw];
    for (c, &wc) in w.iter().enumerate() {
        for (ui, &xi) in u.iter_mut().zip(&x.data[c * hw..(c + 1) * hw]) {
            *ui += wc * xi;
        }
    }
    u.iter_mut().for_each(|ui| *ui += b);
    u
}

/// Multiply-adds a thread must get before a head conv's output planes are
/// split across threads. At 28×28 (MobileNetV2's cut at 224²) every layer of
/// the classifier's head is smaller, and splitting it measured slower: 0.40–0.46
/// ms for the energy layer on two threads against 0.34–0.39 on one. At 80×60
/// (CenterFace) half of a depthwise layer's 32 planes is 0.7 M: split, the
/// face head's energy layer takes 1.06–1.09 ms on two threads against
/// 1.17–1.20 on one (it was 1.27 and 1.42 with 1 M and fresh buffers).
const MIN_CHUNK_MACS: usize = 1 << 19;

/// The same for a 1×1 conv, whose register tiles run about four times as
/// many multiply-adds a second as the taps: a chunk of 0.6 M is a few
/// microseconds, less than waking a worker. The face package's gate (40×30
/// tokens, 32-plane 1×1 convs split in halves of 0.6 M) took 0.47–0.72 ms on
/// two threads against 0.40 on one (`cargo bench --bench ersm_stage`).
const MIN_CHUNK_MACS_1X1: usize = 1 << 21;

/// One conv layer of a unary head over the whole map (NCHW in, NCHW out).
///
/// Each output sums its taps in the order input channel, kernel row, kernel
/// column, then adds the bias: the order the CUDA kernel uses, so both give
/// the same values (a tap outside the map adds an exact zero here and is
/// skipped there). Vectorised by running each tap over the whole zero-padded
/// plane at once: on the padded grid a tap is one shift, so every
/// multiply-add is a long contiguous loop; the pad columns' outputs are
/// dropped. Output planes are independent, so they run in parallel.
pub fn conv(x: FeatureMap<'_>, l: &HeadConv) -> Vec<f32> {
    let mut out = vec![0.0f32; l.cout * x.h * x.w];
    conv_into(x, l, &mut out);
    out
}

/// [`conv`] into `out` (`cout × h × w` values, every one written).
fn conv_into(x: FeatureMap<'_>, l: &HeadConv, out: &mut [f32]) {
    if l.k == 1 && l.groups == 1 && crate::rowgemm::sums_in_order() {
        return conv_1x1(x, l, out);
    }
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    if (2..=MAX_K).contains(&l.k)
        && l.groups == l.cin
        && l.cout == l.cin
        && crate::rowgemm::sums_in_order()
    {
        return depthwise_into(x, l, out);
    }
    let (h, w, hw) = (x.h, x.w, x.h * x.w);
    let (k, d) = (l.k, l.dilation);
    let r = d * (k / 2);
    let (hp, wp) = (h + 2 * r, w + 2 * r);
    // A 1×1 conv's grid is the map itself.
    let mut grid = None;
    let padded: &[f32] = if r == 0 {
        &x.data[..l.cin * hw]
    } else {
        let grid = grid.insert(scratch::take(l.cin * hp * wp));
        for (c, plane) in grid.chunks_mut(hp * wp).enumerate() {
            pad_plane(&x.data[c * hw..][..hw], w, r, plane);
        }
        grid
    };
    // Output (y, x) sits at y * wp + x on the padded grid; tap (ky, kx) reads
    // that index plus d * (ky * wp + kx).
    let span = (h - 1) * wp + w;
    let (cin_g, cout_g) = (l.cin / l.groups, l.cout / l.groups);
    // Planes are split across the run's threads only (never rayon's global
    // pool: `--threads 1` means one thread), and only in chunks big enough
    // to pay for waking a worker.
    let min_planes = MIN_CHUNK_MACS.div_ceil(cin_g * k * k * hw);
    par_rows(out, hw, min_planes, |first, planes| {
        let n = planes.len() / hw;
        let mut sums = scratch::take(PLANE_BLOCK.min(n).min(cout_g) * span);
        let mut i = 0;
        while i < n {
            let co = first + i;
            let g = co / cout_g;
            // Output planes of one group read the same inputs: up to
            // PLANE_BLOCK of them are summed together, so each input chunk
            // is read once from the cache for all of them.
            let outs = PLANE_BLOCK.min(n - i).min((g + 1) * cout_g - co);
            let acc = &mut sums[..outs * span];
            let block = TapBlock {
                inputs: &padded[g * cin_g * hp * wp..][..cin_g * hp * wp],
                taps: &l.weight[co * cin_g * k * k..][..outs * cin_g * k * k],
                outs,
                k,
                d,
                wp,
            };
            taps_dispatch(&block, acc);
            for (j, sums) in acc.chunks_exact(span).enumerate() {
                let b = l.bias[co + j];
                let plane = &mut planes[(i + j) * hw..][..hw];
                for (row, sums) in plane.chunks_exact_mut(w).zip(sums.chunks(wp)) {
                    let pairs = row.iter_mut().zip(sums);
                    if l.relu {
                        pairs.for_each(|(o, &a)| *o = (a + b).max(0.0));
                    } else {
                        pairs.for_each(|(o, &a)| *o = a + b);
                    }
                }
            }
            i += outs;
        }
        scratch::give(sums);
    });
    if let Some(grid) = grid {
        scratch::give(grid);
    }
}

/// Copies one `h × w` plane (`w` values a row) into the middle of `plane`, a
/// grid with `r` zeros on every side. Only the border is zeroed: the grid
/// comes from the scratch with last frame's values in it.
fn pad_plane(src: &[f32], w: usize, r: usize, plane: &mut [f32]) {
    let wp = w + 2 * r;
    let h = src.len() / w;
    plane[..r * wp].fill(0.0);
    plane[(r + h) * wp..].fill(0.0);
    for (row, line) in src
        .chunks_exact(w)
        .zip(plane[r * wp..].chunks_exact_mut(wp))
    {
        pad_row(row, r, line);
    }
}

/// Copies `row` into the middle of `line`, `r` zeros on either side.
fn pad_row(row: &[f32], r: usize, line: &mut [f32]) {
    let w = row.len();
    line[..r].fill(0.0);
    line[r..r + w].copy_from_slice(row);
    line[r + w..].fill(0.0);
}

/// A dense 1×1 conv as one matrix product per thread's output planes
/// (weights × the map's planes), where rowgemm sums each output's input
/// channels in order with one rounding each: the order and the bits of
/// [`taps_into`] and the CUDA kernel, at the speed of register tiles
/// (most of the shipped head's multiply-adds are its 1×1 convs).
fn conv_1x1(x: FeatureMap<'_>, l: &HeadConv, out: &mut [f32]) {
    let hw = x.h * x.w;
    let min_planes = MIN_CHUNK_MACS_1X1.div_ceil(l.cin * hw);
    par_rows(out, hw, min_planes, |first, planes| {
        let n = planes.len() / hw;
        // SAFETY: the weights hold `cin` values for each of the `n` planes
        // from `first`, the map `cin` planes of `hw`, the output `n` planes.
        // The bias (after the sums) and the ReLU as the sums are stored.
        let ops = Epilogue {
            start: None,
            add: Some(Line::Rows(&l.bias[first..first + n])),
            clamp: l.relu.then_some((0.0, f32::INFINITY)),
        };
        unsafe {
            crate::rowgemm::sgemm_with(
                n,
                l.cin,
                hw,
                l.weight[first * l.cin..][..n * l.cin].as_ptr(),
                l.cin,
                x.data[..l.cin * hw].as_ptr(),
                hw,
                0.0,
                planes.as_mut_ptr(),
                hw,
                ops,
            )
        };
    });
}

/// A depthwise conv (each output plane reads its own input plane), plane
/// by plane straight into the output: each input plane padded left and
/// right only (a kernel row above or below the map is left out of the sum,
/// where the padded grid added its zeros: the same sum), a few vectors of
/// positions' sums in registers over the taps, the bias and ReLU applied
/// before the one store. Each output adds its taps in [`taps_into`]'s
/// order, a fused multiply-add each, then the bias: the same bits on every
/// vector width. With the whole map padded, the sums in a buffer copied out
/// after, and four chains of sums, the shipped face head's energy layer
/// took 1.17–1.29 ms on two threads; this way 0.92–0.94 (`cargo bench
/// --bench ersm_stage`, AVX2).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn depthwise_into(x: FeatureMap<'_>, l: &HeadConv, out: &mut [f32]) {
    let (h, w, hw) = (x.h, x.w, x.h * x.w);
    let r = l.dilation * (l.k / 2);
    let wp = w + 2 * r;
    let min_planes = MIN_CHUNK_MACS.div_ceil(l.k * l.k * hw);
    par_rows(out, hw, min_planes, |first, planes| {
        let mut grid = scratch::take(h * wp);
        for (j, plane) in planes.chunks_exact_mut(hw).enumerate() {
            let c = first + j;
            for (src, line) in x.data[c * hw..][..hw]
                .chunks_exact(w)
                .zip(grid.chunks_exact_mut(wp))
            {
                pad_row(src, r, line);
            }
            let taps = &l.weight[c * l.k * l.k..][..l.k * l.k];
            depthwise_plane(&grid, (h, w), l, taps, l.bias[c], plane);
        }
        scratch::give(grid);
    });
}

/// The largest kernel [`depthwise_into`] takes (larger ones take [`taps_into`]).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const MAX_K: usize = 7;

/// One plane of [`depthwise_into`] in this CPU's widest vectors: AVX-512
/// (then AVX2 for a last 8 positions) or AVX2 on x86, NEON on aarch64. The
/// caller checked [`crate::rowgemm::sums_in_order`] (AVX2 and FMA on x86).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn depthwise_plane(
    grid: &[f32],
    hw: (usize, usize),
    l: &HeadConv,
    taps: &[f32],
    bias: f32,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m256, __m512};
        #[target_feature(enable = "avx512f")]
        unsafe fn wide(
            g: &[f32],
            hw: (usize, usize),
            l: &HeadConv,
            t: &[f32],
            b: f32,
            o: &mut [f32],
        ) {
            // SAFETY: AVX-512F (with AVX2 and FMA) detected by the caller.
            unsafe { plane::<__m512, __m256>(g, hw, l, t, b, o) }
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(
            g: &[f32],
            hw: (usize, usize),
            l: &HeadConv,
            t: &[f32],
            b: f32,
            o: &mut [f32],
        ) {
            // SAFETY: AVX2 and FMA detected by the caller.
            unsafe { plane::<__m256, __m256>(g, hw, l, t, b, o) }
        }
        // SAFETY: `wide` detected AVX-512F; the caller AVX2 and FMA.
        unsafe {
            if crate::lanes::wide() {
                wide(grid, hw, l, taps, bias, out)
            } else {
                avx2(grid, hw, l, taps, bias, out)
            }
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        use std::arch::aarch64::float32x4_t as Neon;
        // SAFETY: NEON is part of every aarch64 CPU.
        unsafe { plane::<Neon, Neon>(grid, hw, l, taps, bias, out) }
    }
}

/// [`depthwise_plane`] in lanes `L`, the positions left after its vectors
/// in the narrower `S` (or `L` again), then one by one: `grid` is the input
/// plane with `r` zeros left and right of each row.
///
/// # Safety
/// The CPU has both vector units.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[inline(always)]
unsafe fn plane<L: Lanes, S: Lanes>(
    grid: &[f32],
    (h, w): (usize, usize),
    l: &HeadConv,
    taps: &[f32],
    bias: f32,
    out: &mut [f32],
) {
    let (k, d) = (l.k, l.dilation);
    let r = d * (k / 2);
    let wp = w + 2 * r;
    assert!(grid.len() >= h * wp && out.len() >= h * w && taps.len() >= k * k);
    let finish = |v: f32| {
        let v = v + bias;
        if l.relu {
            v.max(0.0)
        } else {
            v
        }
    };
    for y in 0..h {
        // Kernel rows inside the map, and where in the grid each reads.
        let mut at = [(0usize, 0usize); MAX_K];
        let mut m = 0;
        for ky in 0..k {
            if let Some(yy) = (y + d * ky).checked_sub(r).filter(|&yy| yy < h) {
                at[m] = (ky, yy * wp);
                m += 1;
            }
        }
        let rows = &at[..m];
        let row_out = &mut out[y * w..(y + 1) * w];
        let block = Block {
            grid,
            rows,
            taps,
            k,
            d,
            bias,
            relu: l.relu,
        };
        let mut x0 = 0;
        // SAFETY (the loops): each block's positions x0..x0 + N·V ≤ w, its
        // taps inside the grid (h rows of w + 2r); the caller's CPU.
        unsafe {
            // Ten vectors of sums at a time (ten chains of multiply-adds
            // keep both FMA units busy; four waited on their latency), then
            // five, then one, then the narrower vector, then single
            // positions.
            while x0 + 10 * L::N <= w {
                block.sums::<L, 10>(x0, row_out);
                x0 += 10 * L::N;
            }
            while x0 + 5 * L::N <= w {
                block.sums::<L, 5>(x0, row_out);
                x0 += 5 * L::N;
            }
            while x0 + L::N <= w {
                block.sums::<L, 1>(x0, row_out);
                x0 += L::N;
            }
            while x0 + S::N <= w {
                block.sums::<S, 1>(x0, row_out);
                x0 += S::N;
            }
        }
        for (xo, o) in row_out.iter_mut().enumerate().skip(x0) {
            let mut s = 0.0f32;
            for &(ky, base) in rows {
                for kx in 0..k {
                    s = taps[ky * k + kx].mul_add(grid[base + xo + d * kx], s);
                }
            }
            *o = finish(s);
        }
    }
}

/// One row of [`plane`]: the kernel rows inside the map with their grid
/// rows' offsets, and what every output of the row shares.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
struct Block<'a> {
    grid: &'a [f32],
    rows: &'a [(usize, usize)],
    taps: &'a [f32],
    k: usize,
    d: usize,
    bias: f32,
    relu: bool,
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
impl Block<'_> {
    /// Outputs `x0..x0 + N·V` of the row.
    ///
    /// # Safety
    /// The CPU has `L`'s vector unit; `x0 + N·V` must not pass the row, nor
    /// any tap the grid.
    #[inline(always)]
    unsafe fn sums<L: Lanes, const V: usize>(&self, x0: usize, row_out: &mut [f32]) {
        let (k, d) = (self.k, self.d);
        // SAFETY (the whole body): the caller's CPU and bounds.
        unsafe {
            let mut acc = [L::splat(0.0); V];
            for &(ky, base) in self.rows {
                for kx in 0..k {
                    let wt = L::splat(self.taps[ky * k + kx]);
                    let src = self.grid.as_ptr().add(base + x0 + d * kx);
                    for (v, a) in acc.iter_mut().enumerate() {
                        *a = a.fma(wt, L::load(src.add(L::N * v)));
                    }
                }
            }
            let (vb, zero, inf) = (L::splat(self.bias), L::splat(0.0), L::splat(f32::INFINITY));
            for (v, a) in acc.iter().enumerate() {
                let mut s = a.add(vb);
                if self.relu {
                    // max(s, 0) gives 0 where s is NaN, as f32::max does.
                    s = s.clamp(zero, inf);
                }
                s.store(row_out.as_mut_ptr().add(x0 + L::N * v));
            }
        }
    }
}

/// Output planes summed together by [`conv`].
const PLANE_BLOCK: usize = 8;

/// Output positions per pass of [`taps_into`]: the block's sums over a
/// chunk (8 KB) stay in the L1 cache.
const TAP_CHUNK: usize = 256;

/// One block of output planes of a head conv: what [`taps_into`] sums.
struct TapBlock<'a> {
    /// The group's zero-padded input planes.
    inputs: &'a [f32],
    /// Each output plane's `cin_g × k × k` weights in turn.
    taps: &'a [f32],
    /// Output planes in the block.
    outs: usize,
    k: usize,
    /// Tap spacing.
    d: usize,
    /// Padded row length.
    wp: usize,
}

/// Adds every tap of a block of output planes to `acc` (one span per
/// plane, zeroed by the caller), input channel by input channel, each a
/// fused multiply-add (one rounding, as `fmaf` in the CUDA kernel's source:
/// every build rounds alike; a CPU without FMA computes it in software).
/// Each output adds its taps in the same order whatever the block.
#[inline(always)]
fn taps_into(b: &TapBlock<'_>, acc: &mut [f32]) {
    let (k, d, wp) = (b.k, b.d, b.wp);
    let (span, per_out) = (acc.len() / b.outs, b.taps.len() / b.outs);
    let plane = b.inputs.len() / (per_out / (k * k));
    // Chunk by chunk, so the block's sums over a chunk stay in the L1 cache
    // while every tap passes over them.
    for start in (0..span).step_by(TAP_CHUNK) {
        let len = TAP_CHUNK.min(span - start);
        for (ci, input) in b.inputs.chunks_exact(plane).enumerate() {
            for ky in 0..k {
                for kx in 0..k {
                    let t = ci * k * k + ky * k + kx;
                    let src = &input[d * (ky * wp + kx) + start..][..len];
                    for (j, sums) in acc.chunks_exact_mut(span).enumerate() {
                        let wt = b.taps[j * per_out + t];
                        for (a, &v) in sums[start..][..len].iter_mut().zip(src) {
                            *a = wt.mul_add(v, *a);
                        }
                    }
                }
            }
        }
    }
}

/// [`taps_into`] with the sums in registers, for AVX2 and FMA: `N` output
/// planes × `P` vectors of eight positions at a time, every tap of every input
/// channel added before one store (against a load and a store per tap when
/// the sums live in memory). `N · P` independent sums hide the adds'
/// latency: eight planes of a 1×1 conv, or four position vectors of a
/// depthwise conv's single plane. Each output still adds its taps in
/// [`taps_into`]'s order, a fused multiply-add each, so the bits are the
/// same; positions past the last full tile take the scalar loop.
///
/// # Safety
/// The CPU must support AVX2 and FMA, and `b.outs == N`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn taps_tiled_avx2<const N: usize, const P: usize>(b: &TapBlock<'_>, acc: &mut [f32]) {
    use std::arch::x86_64::*;
    let (k, d, wp) = (b.k, b.d, b.wp);
    let (span, per_out) = (acc.len() / N, b.taps.len() / N);
    let cin = per_out / (k * k);
    let plane = b.inputs.len() / cin;
    let (inp, taps, out) = (b.inputs.as_ptr(), b.taps.as_ptr(), acc.as_mut_ptr());
    let tile = 8 * P;
    let full = span - span % tile;
    let mut p = 0;
    while p < full {
        let mut sums = [[_mm256_setzero_ps(); P]; N];
        for ci in 0..cin {
            for ky in 0..k {
                for kx in 0..k {
                    let t = ci * k * k + ky * k + kx;
                    // SAFETY: a tap reads at most (hp − 1) · wp + wp − 1
                    // past the plane's start for p < span (`conv`'s grid).
                    let src = inp.add(ci * plane + d * (ky * wp + kx) + p);
                    let mut v = [_mm256_setzero_ps(); P];
                    for (q, v) in v.iter_mut().enumerate() {
                        *v = _mm256_loadu_ps(src.add(8 * q));
                    }
                    for (j, row) in sums.iter_mut().enumerate() {
                        let wt = _mm256_set1_ps(*taps.add(j * per_out + t));
                        for (s, &v) in row.iter_mut().zip(&v) {
                            *s = _mm256_fmadd_ps(wt, v, *s);
                        }
                    }
                }
            }
        }
        for (j, row) in sums.iter().enumerate() {
            for (q, &s) in row.iter().enumerate() {
                _mm256_storeu_ps(out.add(j * span + p + 8 * q), s);
            }
        }
        p += tile;
    }
    for p in full..span {
        for j in 0..N {
            let mut s = 0.0f32;
            for ci in 0..cin {
                for ky in 0..k {
                    for kx in 0..k {
                        let t = ci * k * k + ky * k + kx;
                        let v = b.inputs[ci * plane + d * (ky * wp + kx) + p];
                        s = b.taps[j * per_out + t].mul_add(v, s);
                    }
                }
            }
            acc[j * span + p] = s;
        }
    }
}

/// The fastest summation of a block this CPU has: register tiles under
/// AVX2 and FMA, else [`taps_into`]. Same bits either way.
fn taps_dispatch(b: &TapBlock<'_>, acc: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA were just detected, and each arm's N is `b.outs`.
        unsafe {
            return match b.outs {
                1 => taps_tiled_avx2::<1, 4>(b, acc),
                2 => taps_tiled_avx2::<2, 2>(b, acc),
                3 => taps_tiled_avx2::<3, 2>(b, acc),
                4 => taps_tiled_avx2::<4, 2>(b, acc),
                5 => taps_tiled_avx2::<5, 1>(b, acc),
                6 => taps_tiled_avx2::<6, 1>(b, acc),
                7 => taps_tiled_avx2::<7, 1>(b, acc),
                _ => taps_tiled_avx2::<8, 1>(b, acc),
            };
        }
    }
    acc.fill(0.0);
    taps_into(b, acc)
}

/// `σ(−e/τ)`: the probability of keeping a token of energy `e`.
#[inline]
pub fn keep_probability(e: f32, tau: f32) -> f32 {
    1.0 / (1.0 + (e / tau).exp())
}

/// Runs `T` synchronous mean-field steps from the unary costs; returns final energies.
pub fn mean_field(u: &[f32], h: usize, w: usize, spec: &EnergySpec) -> Vec<f32> {
    let mut e = u.to_vec();
    if spec.steps == 0 || spec.lambda == 0.0 {
        return e;
    }
    let offsets = spec.neighbourhood.offsets();
    // The same offsets as raster steps, for positions whose neighbours are
    // all inside the map: the sums add the same terms in the same order.
    let steps: Vec<isize> = offsets
        .iter()
        .map(|&(dy, dx)| dy * w as isize + dx)
        .collect();
    let mut pull = Pull::new(spec.tau);
    // 1 − 2q, the per-neighbour pull: −1 for a surely kept neighbour, +1 for a dropped one.
    let mut pulls: Vec<f32> = u.iter().map(|&ui| pull.of(ui)).collect();
    for step in 0..spec.steps {
        for y in 0..h {
            let inner = y > 0 && y + 1 < h;
            for x in 0..w {
                let i = y * w + x;
                let mut s = 0.0f32;
                if inner && x > 0 && x + 1 < w {
                    for &d in &steps {
                        s += pulls[(i as isize + d) as usize];
                    }
                } else {
                    for &(dy, dx) in offsets {
                        let (ny, nx) = (y as isize + dy, x as isize + dx);
                        if ny >= 0 && nx >= 0 && (ny as usize) < h && (nx as usize) < w {
                            s += pulls[ny as usize * w + nx as usize];
                        }
                    }
                }
                e[i] = u[i] + spec.lambda * s;
            }
        }
        if step + 1 < spec.steps {
            for (p, &ei) in pulls.iter_mut().zip(&e) {
                *p = pull.of(ei);
            }
        }
    }
    e
}

/// `1 − 2·keep_probability(e, τ)`, remembering the last energy it was
/// asked for: a gate's map holds one value wherever its input was dropped
/// (and so do long runs of its neighbours' energies), and each new value
/// costs an exponential.
struct Pull {
    tau: f32,
    last: Option<(u32, f32)>,
}

impl Pull {
    fn new(tau: f32) -> Pull {
        Pull { tau, last: None }
    }

    fn of(&mut self, e: f32) -> f32 {
        match self.last {
            Some((bits, p)) if bits == e.to_bits() => p,
            _ => {
                let p = 1.0 - 2.0 * keep_probability(e, self.tau);
                self.last = Some((e.to_bits(), p));
                p
            }
        }
    }
}

/// Raster indices of tokens with negative energy; the lowest one alone if none is.
pub fn select(energies: &[f32]) -> Vec<u32> {
    select_holding(energies, &[])
}

/// [`select`] with the tokens `held` (ascending indices into `energies`:
/// where a stream's last faces were) kept whatever their energy; the
/// lowest one alone only if neither rule keeps any.
pub fn select_holding(energies: &[f32], held: &[u32]) -> Vec<u32> {
    let mut held = held.iter().copied().peekable();
    let mut kept = Vec::new();
    for (i, &e) in energies.iter().enumerate() {
        let i = i as u32;
        // (a repeated index is passed over)
        while held.next_if(|&h| h < i).is_some() {}
        let is_held = held.next_if_eq(&i).is_some();
        if e < 0.0 || is_held {
            kept.push(i);
        }
    }
    if !kept.is_empty() {
        return kept;
    }
    // First lowest in raster order, so ties resolve the same way on every device.
    let mut best = 0;
    for (i, &e) in energies.iter().enumerate() {
        if e < energies[best] {
            best = i;
        }
    }
    vec![best as u32]
}

/// Copies the kept tokens' feature vectors out of the NCHW map into `N × C` rows.
pub fn gather(x: FeatureMap<'_>, kept: &[u32]) -> Vec<f32> {
    let hw = x.h * x.w;
    let mut out = vec![0.0f32; kept.len() * x.c];
    for c in 0..x.c {
        let plane = &x.data[c * hw..(c + 1) * hw];
        for (n, &i) in kept.iter().enumerate() {
            out[n * x.c + c] = plane[i as usize];
        }
    }
    out
}

/// The whole energy layer on CPU.
pub fn compute(x: FeatureMap<'_>, spec: &EnergySpec) -> Result<TokenMask> {
    compute_holding(x, spec, &[])
}

/// [`compute`] keeping the raster indices `held` (ascending) whatever
/// their energy ([`select_holding`]).
pub fn compute_holding(x: FeatureMap<'_>, spec: &EnergySpec, held: &[u32]) -> Result<TokenMask> {
    if spec.head.channels() != x.c {
        bail!(
            "energy head reads {} channels, feature map has {}",
            spec.head.channels(),
            x.c
        );
    }
    let u = unary(x, &spec.head);
    let energies = mean_field(&u, x.h, x.w, spec);
    if let Some(why) = TokenMask::non_finite(&energies) {
        bail!(why);
    }
    if let Some(&bad) = held.iter().find(|&&i| i as usize >= energies.len()) {
        bail!("held token {bad} is outside the {}×{} map", x.w, x.h);
    }
    let kept = select_holding(&energies, held);
    let features = gather(x, &kept);
    Ok(TokenMask {
        h: x.h,
        w: x.w,
        c: x.c,
        energies,
        kept,
        features,
    })
}

/// Work buffers kept across frames on each thread: a head conv's output
/// planes, its zero-padded input grid, its sums. The map's size is fixed, so
/// from the second frame every request finds a buffer of its exact length
/// and nothing is allocated or zeroed (fresh zeroed buffers were a quarter
/// of the energy layer's time: 11 MB a frame at 80×60 tokens). What a
/// buffer holds when taken is left from its last use: every user writes
/// all of it before reading it.
pub(crate) mod scratch {
    use std::cell::RefCell;

    /// Buffers kept per thread (a head holds at most three at once).
    const KEEP: usize = 8;

    thread_local! {
        static FREE: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
    }

    /// A buffer of `len` values: a free one of that length if there is one,
    /// else the smallest free one whose capacity holds it (so a small
    /// request, a depthwise layer's one padded plane, does not take a map's
    /// buffer that the next layer then grows and zeroes again), else the
    /// largest free one grown, else a new one.
    pub fn take(len: usize) -> Vec<f32> {
        let found = FREE.with(|f| {
            let mut free = f.borrow_mut();
            let at = free
                .iter()
                .position(|b| b.len() == len)
                .or_else(|| {
                    (0..free.len())
                        .filter(|&i| free[i].capacity() >= len)
                        .min_by_key(|&i| free[i].capacity())
                })
                .or_else(|| (0..free.len()).max_by_key(|&i| free[i].capacity()));
            at.map(|i| free.swap_remove(i))
        });
        let mut v = found.unwrap_or_default();
        v.resize(len, 0.0);
        v
    }

    /// Returns a buffer for later frames.
    pub fn give(v: Vec<f32>) {
        FREE.with(|f| {
            let mut free = f.borrow_mut();
            if free.len() < KEEP {
                free.push(v);
            }
        });
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// The depthwise planes give the same bits on AVX2 and AVX-512 (when
    /// this CPU has it), on row lengths that end in each kind of vector
    /// and in single positions, dilated or not, and match the sum written
    /// plainly: the taps of the kernel rows inside the map in order, a
    /// fused multiply-add each, then the bias and ReLU.
    #[test]
    fn depthwise_planes_give_the_same_bits_on_every_width() {
        use std::arch::is_x86_feature_detected as has;
        use std::arch::x86_64::{__m256, __m512};
        if !(has!("avx2") && has!("fma")) {
            return;
        }
        let mut seed = 5u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for (h, w, k, d) in [
            (5, 40, 3, 1),
            (7, 80, 3, 2),
            (4, 23, 5, 1),
            (6, 168, 3, 4),
            (3, 8, 7, 1),
        ] {
            let r = d * (k / 2);
            let wp = w + 2 * r;
            let l = HeadConv {
                cin: 1,
                cout: 1,
                k,
                groups: 1,
                dilation: d,
                weight: (0..k * k).map(|_| next()).collect(),
                bias: vec![next()],
                relu: true,
            };
            let mut grid = vec![0.0f32; h * wp];
            for row in grid.chunks_exact_mut(wp) {
                row[r..r + w].iter_mut().for_each(|v| *v = next());
            }
            let mut want = vec![0.0f32; h * w];
            for y in 0..h {
                for x in 0..w {
                    let mut s = 0.0f32;
                    for ky in 0..k {
                        let Some(yy) = (y + d * ky).checked_sub(r).filter(|&yy| yy < h) else {
                            continue;
                        };
                        for kx in 0..k {
                            s = l.weight[ky * k + kx].mul_add(grid[yy * wp + x + d * kx], s);
                        }
                    }
                    want[y * w + x] = (s + l.bias[0]).max(0.0);
                }
            }
            let mut narrow = vec![7.0f32; h * w];
            // SAFETY: AVX2 and FMA detected above.
            unsafe {
                plane::<__m256, __m256>(&grid, (h, w), &l, &l.weight, l.bias[0], &mut narrow)
            };
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&narrow), bits(&want), "AVX2, {h}×{w} k {k} d {d}");
            if has!("avx512f") {
                let mut wide = vec![7.0f32; h * w];
                // SAFETY: AVX-512F detected.
                unsafe {
                    plane::<__m512, __m256>(&grid, (h, w), &l, &l.weight, l.bias[0], &mut wide)
                };
                assert_eq!(bits(&wide), bits(&want), "AVX-512, {h}×{w} k {k} d {d}");
            }
        }
    }
}
