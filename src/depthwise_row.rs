//! One output row of a 3×3 depthwise conv in one pass: the bias, the taps
//! of the (up to three) input rows in tract's order, and the block's clamp.
//!
//! The fused inverted-residual blocks and the stride-2 depthwise op ran this
//! as five passes over the row (fill with the bias, one multiply-add pass per
//! tap row, the clamp), each a function call over 80–320 values: a fifth of
//! the prefix's time went there at 16 G multiply-adds a second per thread.
//! Here each 8-value stretch of the row is summed in a register across its
//! nine taps and stored once. The sums keep tract's order (the bias, then row
//! by row, left to right, a multiply then an add: no fused multiply-add), so
//! the bits are those of the passes it replaces.

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
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: AVX was just detected; every tap slice holds out.len()
        // values (asserted above).
        unsafe {
            match rows.len() {
                3 => avx::row::<CLAMP, 3>(out, rows, k, bias, cap),
                2 => avx::row::<CLAMP, 2>(out, rows, k, bias, cap),
                1 => avx::row::<CLAMP, 1>(out, rows, k, bias, cap),
                _ => out.fill(finish::<CLAMP>(bias, cap)),
            }
        }
        return;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = finish::<CLAMP>(sum(rows, k, bias, i), cap);
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

#[cfg(target_arch = "x86_64")]
mod avx {
    use super::{finish, sum, TapRow};
    use std::arch::x86_64::*;

    /// [`super::depthwise_row`] with `R` rows, eight outputs per register.
    ///
    /// # Safety
    /// The CPU must support AVX, and every tap slice hold `out.len()` values.
    #[target_feature(enable = "avx")]
    pub(super) unsafe fn row<const CLAMP: bool, const R: usize>(
        out: &mut [f32],
        rows: &[TapRow<'_>],
        k: &[[f32; 3]],
        bias: f32,
        cap: f32,
    ) {
        let n = out.len();
        let p: [[*const f32; 3]; R] = std::array::from_fn(|r| rows[r].map(|t| t.as_ptr()));
        let kv: [[__m256; 3]; R] = std::array::from_fn(|r| k[r].map(|v| _mm256_set1_ps(v)));
        let (vb, zero, vcap) = (
            _mm256_set1_ps(bias),
            _mm256_setzero_ps(),
            _mm256_set1_ps(cap),
        );
        let mut i = 0;
        while i + 8 <= n {
            let mut acc = vb;
            for r in 0..R {
                for t in 0..3 {
                    // SAFETY: i + 8 ≤ n ≤ each tap slice's length.
                    let x = unsafe { _mm256_loadu_ps(p[r][t].add(i)) };
                    acc = _mm256_add_ps(acc, _mm256_mul_ps(kv[r][t], x));
                }
            }
            if CLAMP {
                // max(acc, 0) returns 0 where acc is NaN, as f32::max does.
                acc = _mm256_min_ps(_mm256_max_ps(acc, zero), vcap);
            }
            // SAFETY: i + 8 ≤ n = out.len().
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(i), acc) };
            i += 8;
        }
        for (j, o) in out.iter_mut().enumerate().skip(i) {
            *o = finish::<CLAMP>(sum(&rows[..R], k, bias, j), cap);
        }
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
        for n in [1, 7, 8, 9, 23, 80, 161] {
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

    #[test]
    #[should_panic(expected = "shorter")]
    fn a_short_tap_row_is_refused() {
        let a = [0.0f32; 4];
        let mut out = [0.0f32; 8];
        depthwise_row::<true>(&mut out, &[[&a, &a, &a]], &[[1.0; 3]], 0.0, 6.0);
    }
}
