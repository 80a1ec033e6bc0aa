//! Frame → network input: resize the short side (antialiased bilinear) and
//! centre-crop, or stretch the whole frame to the input size; then scale,
//! normalise, HWC u8 → CHW f32. Only the crop is computed.

use crate::model::manifest::Preprocess;
use crate::threads::{par_rows, SendPtr};
use anyhow::{ensure, Result};

/// Filter taps for one output coordinate: first source index and weights.
struct Taps {
    start: usize,
    weights: Vec<f32>,
}

/// Triangle-filter taps mapping `src` samples to `dst` samples, for output
/// coordinates `offset..offset + count` (PIL-style: the support widens with
/// the downscale factor, so downscaling averages instead of aliasing).
fn taps(src: usize, dst: usize, offset: usize, count: usize) -> Vec<Taps> {
    let scale = src as f32 / dst as f32;
    let support = scale.max(1.0);
    (offset..offset + count)
        .map(|o| {
            let centre = (o as f32 + 0.5) * scale;
            let lo = ((centre - support).floor().max(0.0)) as usize;
            let hi = ((centre + support).ceil() as usize).min(src);
            let mut weights: Vec<f32> = (lo..hi)
                .map(|i| (1.0 - ((i as f32 + 0.5 - centre) / support).abs()).max(0.0))
                .collect();
            let sum: f32 = weights.iter().sum();
            if sum > 0.0 {
                weights.iter_mut().for_each(|w| *w /= sum);
            } else {
                // Degenerate 1-pixel source: take the nearest sample.
                weights = vec![1.0];
                return Taps {
                    start: (centre as usize).min(src - 1),
                    weights,
                };
            }
            Taps { start: lo, weights }
        })
        .collect()
}

/// The horizontal taps of every output column as flat arrays: each column
/// reads `k` pixels from `start` (the last ones with weight zero when it
/// needs fewer), so the row pass runs one fixed-length loop per pixel
/// instead of walking a list of taps (a CIF frame stretched to 640×480 took
/// 1.7–2.2 ms a frame on two threads, mostly there).
struct Columns {
    /// Index of each column's first value in a row of interleaved RGB.
    start: Vec<usize>,
    /// `k` weights per column.
    weights: Vec<f32>,
    k: usize,
    /// One past the last value any column reads (its four-value loads
    /// included): a row buffer must be longer.
    reach: usize,
    /// For the AVX path, columns `2p` and `2p + 1`'s weights per tap, each
    /// repeated over four lanes: `k` vectors of 8 per pair.
    #[cfg(target_arch = "x86_64")]
    pairs: Vec<f32>,
}

impl Columns {
    /// From the taps of the crop's columns, on rows that begin at source
    /// column `col_lo` (and hold `3·k` zeros past their end). A padding tap
    /// reads the pixel after the column's last, or a zero, with weight zero:
    /// adding `0 · v` to a sum of non-negative products leaves it as it is,
    /// so the bits are those of the taps alone.
    fn new(taps: &[Taps], col_lo: usize) -> Columns {
        let k = taps.iter().map(|t| t.weights.len()).max().unwrap_or(0);
        let mut weights = vec![0.0; taps.len() * k];
        for (t, w) in taps.iter().zip(weights.chunks_exact_mut(k.max(1))) {
            w[..t.weights.len()].copy_from_slice(&t.weights);
        }
        #[cfg(target_arch = "x86_64")]
        let pairs = {
            let mut pairs = vec![0.0; taps.len() / 2 * k * 8];
            for (p, lanes) in pairs.chunks_exact_mut(k * 8).enumerate() {
                for (t, v) in lanes.chunks_exact_mut(8).enumerate() {
                    v[..4].fill(weights[2 * p * k + t]);
                    v[4..].fill(weights[(2 * p + 1) * k + t]);
                }
            }
            pairs
        };
        let start: Vec<usize> = taps.iter().map(|t| (t.start - col_lo) * 3).collect();
        Columns {
            reach: start.iter().max().map_or(0, |&s| s + 3 * k + 1),
            start,
            weights,
            k,
            #[cfg(target_arch = "x86_64")]
            pairs,
        }
    }

    /// Values a row buffer holds past the crop's span: the padding taps'
    /// zeros, and one more for the AVX path's four-value loads.
    fn tail(&self) -> usize {
        3 * self.k + 1
    }

    /// One output row of each plane from a row of interleaved RGB sums,
    /// scaled and shifted per channel.
    fn row(&self, rows: &[f32], out: [&mut [f32]; 3], mul: [f32; 3], add: [f32; 3]) {
        assert!(
            self.reach <= rows.len(),
            "a row shorter than the columns read"
        );
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx") {
            // SAFETY: AVX detected; the assert bounds every four-value load.
            return unsafe { avx::row(self, rows, out, mul, add) };
        }
        self.row_from(0, rows, out, mul, add)
    }

    /// [`Columns::row`] without vectors, from column `from` on.
    fn row_from(
        &self,
        from: usize,
        rows: &[f32],
        out: [&mut [f32]; 3],
        mul: [f32; 3],
        add: [f32; 3],
    ) {
        let out = out.map(|o| &mut o[from..]);
        let (start, weights) = (&self.start[from..], &self.weights[from * self.k..]);
        match self.k {
            1 => Self::row_k::<1>(1, start, weights, rows, out, mul, add),
            2 => Self::row_k::<2>(2, start, weights, rows, out, mul, add),
            3 => Self::row_k::<3>(3, start, weights, rows, out, mul, add),
            4 => Self::row_k::<4>(4, start, weights, rows, out, mul, add),
            5 => Self::row_k::<5>(5, start, weights, rows, out, mul, add),
            6 => Self::row_k::<6>(6, start, weights, rows, out, mul, add),
            7 => Self::row_k::<7>(7, start, weights, rows, out, mul, add),
            8 => Self::row_k::<8>(8, start, weights, rows, out, mul, add),
            k => Self::row_k::<0>(k, start, weights, rows, out, mul, add),
        }
    }

    /// [`Columns::row_from`] with `K` taps a column (0: `k`, not fixed).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn row_k<const K: usize>(
        k: usize,
        start: &[usize],
        weights: &[f32],
        rows: &[f32],
        out: [&mut [f32]; 3],
        mul: [f32; 3],
        add: [f32; 3],
    ) {
        let k = if K > 0 { K } else { k };
        let [r, g, b] = out;
        let cols = start.iter().zip(weights.chunks_exact(k.max(1)));
        for (((&start, w), r), (g, b)) in cols.zip(r.iter_mut()).zip(g.iter_mut().zip(b.iter_mut()))
        {
            let px = &rows[start..][..3 * k];
            let mut acc = [0.0f32; 3];
            for (&w, px) in w[..k].iter().zip(px.chunks_exact(3)) {
                acc[0] += w * px[0];
                acc[1] += w * px[1];
                acc[2] += w * px[2];
            }
            *r = acc[0] * mul[0] + add[0];
            *g = acc[1] * mul[1] + add[1];
            *b = acc[2] * mul[2] + add[2];
        }
    }
}

/// The resized size, the crop's offset in it and the crop's size.
struct Geometry {
    rw: usize,
    rh: usize,
    ox: usize,
    oy: usize,
    ow: usize,
    oh: usize,
}

fn geometry(width: usize, height: usize, p: &Preprocess) -> Geometry {
    if let Some([w, h]) = p.resize {
        return Geometry {
            rw: w,
            rh: h,
            ox: 0,
            oy: 0,
            ow: w,
            oh: h,
        };
    }
    let short = width.min(height) as f32;
    let rw = ((width as f32 * p.resize_short as f32 / short).round() as usize).max(p.crop);
    let rh = ((height as f32 * p.resize_short as f32 / short).round() as usize).max(p.crop);
    Geometry {
        rw,
        rh,
        ox: (rw - p.crop) / 2,
        oy: (rh - p.crop) / 2,
        ow: p.crop,
        oh: p.crop,
    }
}

/// The part of a `width × height` frame the network sees, in frame pixels:
/// `[x0, y0, x1, y1)`.
pub fn crop_region(width: usize, height: usize, p: &Preprocess) -> [f32; 4] {
    let g = geometry(width.max(1), height.max(1), p);
    let (sx, sy) = (width as f32 / g.rw as f32, height as f32 / g.rh as f32);
    [
        g.ox as f32 * sx,
        g.oy as f32 * sy,
        (g.ox + g.ow) as f32 * sx,
        (g.oy + g.oh) as f32 * sy,
    ]
}

/// Converts an RGB8 image (`width × height`, row-major HWC) into a normalised
/// `3 × H × W` CHW tensor (the crop, or the stretched frame) as the manifest
/// describes. Rows are split across the threads of the pool it is called in
/// ([`crate::threads::Threads::install`]); the values do not depend on how.
pub fn preprocess(rgb: &[u8], width: usize, height: usize, p: &Preprocess) -> Result<Vec<f32>> {
    ensure!(width > 0 && height > 0, "empty image ({width}×{height})");
    ensure!(
        rgb.len() == width * height * 3,
        "image buffer has {} bytes, expected {width}×{height}×3",
        rgb.len()
    );
    let Geometry {
        rw,
        rh,
        ox,
        oy,
        ow,
        oh,
    } = geometry(width, height, p);
    let xt = taps(width, rw, ox, ow);
    let yt = taps(height, rh, oy, oh);
    let n = ow * oh;
    // Over just the columns the crop reads.
    let col_lo = xt.iter().map(|t| t.start).min().unwrap_or(0);
    let col_hi = xt
        .iter()
        .map(|t| t.start + t.weights.len())
        .max()
        .unwrap_or(0);
    let span = (col_hi - col_lo) * 3;
    let cols = Columns::new(&xt, col_lo);
    // Source rows the crop reads: tap starts and ends rise with the output row.
    let src_rows =
        yt.last().map_or(0, |t| t.start + t.weights.len()) - yt.first().map_or(0, |t| t.start);
    let mut out = vec![0.0f32; 3 * n];
    let mul: [f32; 3] = std::array::from_fn(|c| p.scale / p.std[c]);
    let add: [f32; 3] = std::array::from_fn(|c| -p.mean[c] / p.std[c]);
    // Bands of output rows run on the caller's threads: at 640×480 from a
    // 720p frame this is a few ms, shared by ERSM and dense, so it weighs on
    // their ratio. The red plane is split; green and blue rows follow it.
    let (red, rest) = out.split_at_mut(n);
    let rest = SendPtr(rest.as_mut_ptr());
    // SAFETY (both passes): `rest` holds the green then the blue plane (2·n
    // values); row y of each belongs to the band holding red row y alone.
    let green_blue = |y: usize| unsafe {
        (
            std::slice::from_raw_parts_mut(rest.get().add(y * ow), ow),
            std::slice::from_raw_parts_mut(rest.get().add(n + y * ow), ow),
        )
    };
    if src_rows < oh {
        // Stretched taller (a CIF call, a 2.35:1 clip): the horizontal pass
        // first, once per source row a band reads, then each output row is
        // a few of those rows summed along contiguous planes. The other
        // order ran the per-pixel horizontal taps on every output row: 3.3×
        // the pixels from 144 source rows.
        par_rows(red, ow, 8, |first, band| {
            let last = &yt[first + band.len() / ow - 1];
            let (lo, hi) = (yt[first].start, last.start + last.weights.len());
            let mut row = vec![0.0f32; span + cols.tail()];
            let mut planes = vec![0.0f32; (hi - lo) * 3 * ow];
            for (y, p) in (lo..hi).zip(planes.chunks_exact_mut(3 * ow)) {
                let src = &rgb[(y * width + col_lo) * 3..][..span];
                // 1 · v is v: the bytes as they are, eight at a time.
                add_scaled(&mut row[..span], src, 1.0, true);
                let (r, gb) = p.split_at_mut(ow);
                let (g, b) = gb.split_at_mut(ow);
                cols.row(&row, [r, g, b], [1.0; 3], [0.0; 3]);
            }
            for (i, r) in band.chunks_exact_mut(ow).enumerate() {
                let y = first + i;
                let t = &yt[y];
                let (g, b) = green_blue(y);
                for (c, dst) in [r, g, b].into_iter().enumerate() {
                    dst.fill(0.0);
                    for (k, &w) in t.weights.iter().enumerate() {
                        let src = &planes[((t.start + k - lo) * 3 + c) * ow..][..ow];
                        dst.iter_mut().zip(src).for_each(|(a, &v)| *a += w * v);
                    }
                    dst.iter_mut().for_each(|a| *a = *a * mul[c] + add[c]);
                }
            }
        });
        return Ok(out);
    }
    // Otherwise the vertical pass first: along contiguous rows, so u8→f32
    // and the multiply-adds vectorise; the horizontal pass then only
    // touches the `n` output rows.
    par_rows(red, ow, 8, |first, band| {
        // Zeros past the row's end for the last columns' padding taps.
        let mut rows = vec![0.0f32; span + cols.tail()];
        for (i, r) in band.chunks_exact_mut(ow).enumerate() {
            let y = first + i;
            let t = &yt[y];
            for (k, &w) in t.weights.iter().enumerate() {
                let at = (t.start + k) * width * 3 + col_lo * 3;
                add_scaled(&mut rows[..span], &rgb[at..at + span], w, k == 0);
            }
            let (g, b) = green_blue(y);
            cols.row(&rows, [r, g, b], mul, add);
        }
    });
    Ok(out)
}

/// `acc[i] += w · src[i]` (a multiply, then an add), or `acc[i] = w ·
/// src[i]` when `first`: the same bits as adding to zeros, since the
/// products are never -0.
fn add_scaled(acc: &mut [f32], src: &[u8], w: f32, first: bool) {
    assert_eq!(acc.len(), src.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 detected; the lengths are equal.
        return unsafe { avx::add_scaled(acc, src, w, first) };
    }
    add_scaled_plain(acc, src, w, first);
}

/// [`add_scaled`] one value at a time (other CPUs, and the AVX path's last
/// values).
fn add_scaled_plain(acc: &mut [f32], src: &[u8], w: f32, first: bool) {
    for (a, &v) in acc.iter_mut().zip(src) {
        *a = if first {
            w * v as f32
        } else {
            *a + w * v as f32
        };
    }
}

/// The two passes' AVX kernels: the same operations in the same order as
/// the plain loops (no fused multiply-adds), so the same bits. The plain
/// loops compiled to 4-wide vectors (the vertical pass) and scalar sums
/// waiting on each add's latency (the horizontal): 2 ms of a 720p frame on
/// two threads, shared by ERSM and dense.
#[cfg(target_arch = "x86_64")]
mod avx {
    use super::Columns;
    use std::arch::x86_64::*;

    /// [`super::add_scaled`], eight values at a time.
    ///
    /// # Safety
    /// AVX2; `acc` and `src` of one length.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn add_scaled(acc: &mut [f32], src: &[u8], w: f32, first: bool) {
        let n = acc.len() / 8 * 8;
        let wv = _mm256_set1_ps(w);
        // SAFETY: i + 8 ≤ n ≤ both lengths.
        unsafe {
            for i in (0..n).step_by(8) {
                let bytes = _mm_loadl_epi64(src.as_ptr().add(i) as *const __m128i);
                let v = _mm256_mul_ps(wv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)));
                let out = acc.as_mut_ptr().add(i);
                let v = if first {
                    v
                } else {
                    _mm256_add_ps(_mm256_loadu_ps(out), v)
                };
                _mm256_storeu_ps(out, v);
            }
        }
        super::add_scaled_plain(&mut acc[n..], &src[n..], w, first);
    }

    /// [`Columns::row`], two columns to a vector (each column's red, green
    /// and blue in four lanes, the fourth unused) and two vectors at a time,
    /// so four chains of sums overlap their latency.
    ///
    /// # Safety
    /// AVX; every column's `start + 3k` inside `rows`.
    #[target_feature(enable = "avx")]
    pub(super) unsafe fn row(
        cols: &Columns,
        rows: &[f32],
        out: [&mut [f32]; 3],
        mul: [f32; 3],
        add: [f32; 3],
    ) {
        let (k, n) = (cols.k, cols.start.len());
        let m = _mm256_setr_ps(mul[0], mul[1], mul[2], 0.0, mul[0], mul[1], mul[2], 0.0);
        let a = _mm256_setr_ps(add[0], add[1], add[2], 0.0, add[0], add[1], add[2], 0.0);
        let p = rows.as_ptr();
        // The sums of columns 2q and 2q + 1, over their k taps.
        let pair = |q: usize| {
            let (s0, s1) = (cols.start[2 * q], cols.start[2 * q + 1]);
            let w = cols.pairs[q * k * 8..].as_ptr();
            let mut acc = _mm256_setzero_ps();
            for t in 0..k {
                // SAFETY: s + 3t + 3 < rows.len() (the caller's bound); the
                // pair's k vectors of weights.
                unsafe {
                    let v = _mm256_loadu2_m128(p.add(s1 + 3 * t), p.add(s0 + 3 * t));
                    acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(w.add(8 * t)), v));
                }
            }
            _mm256_add_ps(_mm256_mul_ps(acc, m), a)
        };
        let [r, g, b] = out;
        let mut store = |q: usize, v: __m256| {
            let mut lanes = [0.0f32; 8];
            // SAFETY: eight values into eight.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
            for (c, lanes) in [(2 * q, &lanes[..3]), (2 * q + 1, &lanes[4..7])] {
                (r[c], g[c], b[c]) = (lanes[0], lanes[1], lanes[2]);
            }
        };
        let mut q = 0;
        while 2 * q + 4 <= n {
            let (x, y) = (pair(q), pair(q + 1));
            store(q, x);
            store(q + 1, y);
            q += 2;
        }
        if 2 * q + 2 <= n {
            store(q, pair(q));
            q += 1;
        }
        cols.row_from(2 * q, rows, [r, g, b], mul, add);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 16) as f32 / 257.0
            })
            .collect()
    }

    /// The vector kernels give the plain loops' bits: the horizontal pass
    /// for downscales and upscales (1 to 9 taps a column, odd and even
    /// widths), the vertical pass first and after.
    #[test]
    fn vector_kernels_give_the_plain_loops_bits() {
        for (src, dst) in [
            (1280, 640),
            (176, 640),
            (640, 640),
            (333, 47),
            (97, 31),
            (1920, 480),
        ] {
            let taps = taps(src, dst, 0, dst);
            let cols = Columns::new(&taps, 0);
            let rows = values(3 * src + cols.tail(), src as u32);
            let mul = [0.5, 0.25, 2.0];
            let add = [-1.0, 0.125, 3.0];
            let mut want = vec![vec![0.0f32; dst]; 3];
            let mut got = want.clone();
            let [r, g, b] = &mut want[..] else {
                unreachable!()
            };
            cols.row_from(0, &rows, [r, g, b], mul, add);
            let [r, g, b] = &mut got[..] else {
                unreachable!()
            };
            cols.row(&rows, [r, g, b], mul, add);
            for c in 0..3 {
                for x in 0..dst {
                    assert_eq!(
                        got[c][x].to_bits(),
                        want[c][x].to_bits(),
                        "{src}→{dst} k {} channel {c} column {x}",
                        cols.k
                    );
                }
            }
        }
        let src: Vec<u8> = (0..1003).map(|i| (i * 37 % 256) as u8).collect();
        for first in [true, false] {
            let mut want = values(1003, 5);
            let mut got = want.clone();
            for (a, &v) in want.iter_mut().zip(&src) {
                *a = if first {
                    0.0 + 0.3 * v as f32
                } else {
                    *a + 0.3 * v as f32
                };
            }
            add_scaled(&mut got, &src, 0.3, first);
            assert!(got
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }
}
