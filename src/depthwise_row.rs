//! One output row of a 3×3 depthwise conv in one pass: the bias, the taps
//! of the (up to three) input rows in tract's order, and the block's clamp.
//!
//! The fused inverted-residual blocks and the stride-2 depthwise op ran this
//! as five passes over the row (fill with the bias, one multiply-add pass per
//! tap row, the clamp), each a function call over 80–320 values: a fifth of
//! the prefix's time went there at 16 G multiply-adds a second per thread.
//! Here each vector of the row (16 values with AVX-512, 8 with AVX, 4 with
//! NEON) is summed in a register across its nine taps and stored once. The sums keep tract's order (the bias, then row
//! by row, left to right, a multiply then an add: no fused multiply-add), so
//! the bits are those of the passes it replaces.

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use crate::lanes::Lanes;

/// The three tap columns of one input row, each slice starting at the
/// input value that output 0 reads through that tap: at stride 1 the padded
/// row from offsets 0, 1 and 2; at stride 2 the even half, the odd half and
/// the even half from 1 ([`crate::strided_depthwise::split_row`]).
pub(crate) type TapRow<'a> = [&'a [f32]; 3];

/// `out[i] = clamp(bias + Σ_r Σ_t k[r][t]·rows[r][t][i])` over the rows
/// present (a row in the padding is left out: its products are zeros), with
/// `clamp` to `[0, cap]` (`cap` infinite for a plain ReLU) when `CLAMP`.
///
/// Panics when a tap slice is shorter than `out`.
pub(crate) fn depthwise_row<const CLAMP: bool>(
    out: &mut [f32],
    rows: &[TapRow<'_>],
    k: &[[f32; 3]],
    bias: f32,
    cap: f32,
) {
    assert!(rows.len() <= 3 && k.len() >= rows.len());
    for r in rows {
        for t in r {
            assert!(
                t.len() >= out.len(),
                "a tap row shorter than the output row"
            );
        }
    }
    if rows.is_empty() {
        out.fill(finish::<CLAMP>(bias, cap));
        return;
    }
    let done = match rows.len() {
        3 => vectors::<CLAMP, 3>(out, rows, k, bias, cap),
        2 => vectors::<CLAMP, 2>(out, rows, k, bias, cap),
        _ => vectors::<CLAMP, 1>(out, rows, k, bias, cap),
    };
    for (i, o) in out.iter_mut().enumerate().skip(done) {
        *o = finish::<CLAMP>(sum(rows, k, bias, i), cap);
    }
}

/// The outputs this CPU's vectors cover, from the first: AVX-512's sixteen
/// lanes, then AVX's eight, on x86; NEON's four on aarch64. Returns how
/// many (the rest are summed one by one).
#[allow(unreachable_code)]
fn vectors<const CLAMP: bool, const R: usize>(
    out: &mut [f32],
    rows: &[TapRow<'_>],
    k: &[[f32; 3]],
    bias: f32,
    cap: f32,
) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m256, __m512};
        if crate::lanes::wide() {
            // SAFETY: AVX-512F detected (it implies AVX); every tap slice
            // holds out.len() values (asserted by the caller).
            return unsafe { wide::<CLAMP, R>(out, rows, k, bias, cap) };
        }
        if std::arch::is_x86_feature_detected!("avx") {
            // SAFETY: AVX detected; the slices as above.
            return unsafe { avx::<CLAMP, R>(out, rows, k, bias, cap) };
        }
        #[target_feature(enable = "avx512f")]
        unsafe fn wide<const CLAMP: bool, const R: usize>(
            out: &mut [f32],
            rows: &[TapRow<'_>],
            k: &[[f32; 3]],
            bias: f32,
            cap: f32,
        ) -> usize {
            // SAFETY: the caller's CPU and slices.
            unsafe {
                let i = row::<__m512, CLAMP, R>(out, rows, k, bias, cap, 0);
                row::<__m256, CLAMP, R>(out, rows, k, bias, cap, i)
            }
        }
        #[target_feature(enable = "avx")]
        unsafe fn avx<const CLAMP: bool, const R: usize>(
            out: &mut [f32],
            rows: &[TapRow<'_>],
            k: &[[f32; 3]],
            bias: f32,
            cap: f32,
        ) -> usize {
            // SAFETY: the caller's CPU and slices.
            unsafe { row::<__m256, CLAMP, R>(out, rows, k, bias, cap, 0) }
        }
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: NEON is part of every aarch64 CPU; the slices as above.
    return unsafe { row::<std::arch::aarch64::float32x4_t, CLAMP, R>(out, rows, k, bias, cap, 0) };
    0
}

/// Outputs from `from` in whole vectors of `L`, each summed in a register
/// across its taps and stored once; returns where it stopped.
///
/// # Safety
/// The CPU has `L`'s vector unit; every tap slice holds `out.len()` values.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[inline(always)]
unsafe fn row<L: Lanes, const CLAMP: bool, const R: usize>(
    out: &mut [f32],
    rows: &[TapRow<'_>],
    k: &[[f32; 3]],
    bias: f32,
    cap: f32,
    from: usize,
) -> usize {
    let n = out.len();
    let p: [[*const f32; 3]; R] = std::array::from_fn(|r| rows[r].map(|t| t.as_ptr()));
    // SAFETY (the whole body): the caller's CPU; i + N ≤ n ≤ each tap
    // slice's length and out's.
    unsafe {
        let kv: [[L; 3]; R] = std::array::from_fn(|r| k[r].map(|v| L::splat(v)));
        let (vb, zero, vcap) = (L::splat(bias), L::splat(0.0), L::splat(cap));
        let mut i = from;
        while i + L::N <= n {
            let mut acc = vb;
            for r in 0..R {
                for t in 0..3 {
                    acc = acc.add(kv[r][t].mul(L::load(p[r][t].add(i))));
                }
            }
            if CLAMP {
                acc = acc.clamp(zero, vcap);
            }
            acc.store(out.as_mut_ptr().add(i));
            i += L::N;
        }
        i
    }
}

/// Output `i`'s sum, in tract's order.
#[inline(always)]
fn sum(rows: &[TapRow<'_>], k: &[[f32; 3]], bias: f32, i: usize) -> f32 {
    let mut o = bias;
    for (r, k) in rows.iter().zip(k) {
        o = o + k[0] * r[0][i] + k[1] * r[1][i] + k[2] * r[2][i];
    }
    o
}

#[inline(always)]
fn finish<const CLAMP: bool>(v: f32, cap: f32) -> f32 {
    if CLAMP {
        v.max(0.0).min(cap)
    } else {
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The five passes this replaces, written plainly.
    fn passes(out: &mut [f32], rows: &[TapRow<'_>], k: &[[f32; 3]], bias: f32, cap: Option<f32>) {
        out.fill(bias);
        for (r, k) in rows.iter().zip(k) {
            for (i, o) in out.iter_mut().enumerate() {
                *o = *o + k[0] * r[0][i] + k[1] * r[1][i] + k[2] * r[2][i];
            }
        }
        if let Some(cap) = cap {
            out.iter_mut().for_each(|v| *v = v.max(0.0).min(cap));
        }
    }

    #[test]
    fn equals_the_passes_bit_for_bit_for_every_row_count_and_length() {
        let mut seed = 7u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        // Lengths that end in each kind of vector (16, 8, 4 lanes) and in
        // single outputs after them.
        for n in [1, 4, 7, 8, 9, 23, 24, 40, 41, 80, 161] {
            let data: Vec<Vec<f32>> = (0..3)
                .map(|_| (0..n + 2).map(|_| next()).collect())
                .collect();
            let odd: Vec<Vec<f32>> = (0..3).map(|_| (0..n).map(|_| next()).collect()).collect();
            let k: Vec<[f32; 3]> = (0..3).map(|_| [next(), next(), next()]).collect();
            let bias = next();
            for stride in [1, 2] {
                let rows: Vec<TapRow<'_>> = (0..3)
                    .map(|r| match stride {
                        1 => [&data[r][..], &data[r][1..], &data[r][2..]],
                        _ => [&data[r][..], &odd[r][..], &data[r][1..]],
                    })
                    .collect();
                for m in 0..=3 {
                    for cap in [Some(6.0), Some(0.3), Some(f32::INFINITY), None] {
                        let (mut want, mut got) = (vec![0.0; n], vec![1.0; n]);
                        passes(&mut want, &rows[..m], &k, bias, cap);
                        match cap {
                            Some(c) => depthwise_row::<true>(&mut got, &rows[..m], &k, bias, c),
                            None => depthwise_row::<false>(&mut got, &rows[..m], &k, bias, 0.0),
                        }
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(
                            bits(&got),
                            bits(&want),
                            "n {n} stride {stride} rows {m} cap {cap:?}"
                        );
                    }
                }
            }
        }
    }

    /// The vector loop at each x86 width this CPU has, from the first
    /// output, against the plain sums: the AVX path is the one a CPU
    /// without AVX-512 takes, which the test above does not reach here.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_x86_width_gives_the_passes_bits() {
        use std::arch::is_x86_feature_detected as has;
        use std::arch::x86_64::{__m256, __m512};
        let data: Vec<f32> = (0..3 * 60)
            .map(|i| ((i * 37 % 29) as f32 - 14.0) / 7.0)
            .collect();
        let rows: Vec<TapRow<'_>> = (0..3)
            .map(|r| {
                let d = &data[r * 60..(r + 1) * 60];
                [d, &d[1..], &d[2..]]
            })
            .collect();
        let k = [[0.3, -0.7, 1.1], [0.9, 0.2, -0.4], [-1.3, 0.6, 0.8]];
        let n = 56;
        let mut want = vec![0.0; n];
        passes(&mut want, &rows, &k, 0.1, Some(6.0));
        let check = |got: &[f32], done: usize, what: &str| {
            assert!(done > 0, "{what}: no vectors");
            for i in 0..done {
                assert_eq!(got[i].to_bits(), want[i].to_bits(), "{what}, output {i}");
            }
        };
        if has!("avx") {
            let mut got = vec![0.0; n];
            // SAFETY: AVX detected; each tap slice holds n values or more.
            let done = unsafe { row::<__m256, true, 3>(&mut got, &rows, &k, 0.1, 6.0, 0) };
            check(&got, done, "AVX");
        }
        if has!("avx512f") {
            let mut got = vec![0.0; n];
            // SAFETY: AVX-512F detected; the slices as above.
            let done = unsafe { row::<__m512, true, 3>(&mut got, &rows, &k, 0.1, 6.0, 0) };
            check(&got, done, "AVX-512");
        }
    }

    #[test]
    #[should_panic(expected = "shorter")]
    fn a_short_tap_row_is_refused() {
        let a = [0.0f32; 4];
        let mut out = [0.0f32; 8];
        depthwise_row::<true>(&mut out, &[[&a, &a, &a]], &[[1.0; 3]], 0.0, 6.0);
    }
}
