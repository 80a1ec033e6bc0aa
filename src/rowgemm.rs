//! Matrix products for 1×1 convs over a few rows of a map: `C = β·C + A·B`
//! with `A` a small weight matrix (channels out × channels in) and `B` rows
//! of the map, every matrix row-major with unit column stride.
//!
//! The fused inverted-residual blocks call one product per image row (the
//! expansion: K = 16–32 input channels) or per two rows (the projection),
//! thousands per frame. `matrixmultiply` packs both operands on every call,
//! which at these sizes cost it about 40 % of the product's time (perf: 7.6
//! % of a CenterFace bench's samples in packing against 20 % in its
//! kernel). Here the operands are read in place: 6 output rows × 16 columns
//! of sums stay in registers over the whole K, `B`'s rows read as vectors
//! and `A`'s entries broadcast (AVX2 and FMA, detected at run time). Other
//! CPUs take `matrixmultiply`.

/// `C = β·C + A·B`: `A` is `m × k` (row stride `rsa`), `B` `k × n` (`rsb`),
/// `C` `m × n` (`rsc`); `β` is 0 (C is only written) or 1.
///
/// # Safety
/// Every row of each matrix must be valid for its length (reads of `A` and
/// `B`, writes of `C`), and `C` may not overlap `A` or `B`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    a: *const f32,
    rsa: usize,
    b: *const f32,
    rsb: usize,
    beta: f32,
    c: *mut f32,
    rsc: usize,
) {
    debug_assert!(beta == 0.0 || beta == 1.0);
    #[cfg(target_arch = "x86_64")]
    if sums_in_order() {
        let g = Gemm {
            k,
            a,
            rsa,
            b,
            rsb,
            c,
            rsc,
            acc: beta != 0.0,
        };
        // SAFETY: `sums_in_order` just detected AVX2 and FMA; the caller
        // vouches for the matrices.
        return unsafe { g.run(m, n) };
    }
    // SAFETY: as documented above, with unit column strides.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a,
            rsa as isize,
            1,
            b,
            rsb as isize,
            1,
            beta,
            c,
            rsc as isize,
            1,
        )
    }
}

/// True when [`sgemm`] runs its register tiles (AVX2 and FMA): each
/// output's K products summed in order, from zero (β = 0), with one
/// rounding each. `matrixmultiply`, elsewhere, promises no order.
pub fn sums_in_order() -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        return true;
    }
    false
}

/// The operands of one product, for the tile loops.
#[cfg(target_arch = "x86_64")]
struct Gemm {
    k: usize,
    a: *const f32,
    rsa: usize,
    b: *const f32,
    rsb: usize,
    c: *mut f32,
    rsc: usize,
    /// Add to C (β = 1) rather than overwrite it.
    acc: bool,
}

/// Output rows per register tile.
#[cfg(target_arch = "x86_64")]
const MR: usize = 6;

#[cfg(target_arch = "x86_64")]
impl Gemm {
    /// Column strips of 16, then 8, then single columns; within a strip,
    /// tiles of `MR` rows and the rows left over.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run(&self, m: usize, n: usize) {
        let mut j = 0;
        while j + 16 <= n {
            self.strip::<2>(m, j);
            j += 16;
        }
        if j + 8 <= n {
            self.strip::<1>(m, j);
            j += 8;
        }
        for j in j..n {
            // SAFETY: j < n, and the caller's bounds.
            unsafe { self.column(m, j) };
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn strip<const V: usize>(&self, m: usize, j: usize) {
        let mut i = 0;
        while i + MR <= m {
            // SAFETY: rows i..i + MR and columns j..j + 8·V are inside.
            unsafe { self.tile::<MR, V>(i, j) };
            i += MR;
        }
        // SAFETY: as above, for the rows left over.
        unsafe {
            match m - i {
                0 => {}
                1 => self.tile::<1, V>(i, j),
                2 => self.tile::<2, V>(i, j),
                3 => self.tile::<3, V>(i, j),
                4 => self.tile::<4, V>(i, j),
                _ => self.tile::<5, V>(i, j),
            }
        }
    }

    /// Rows `i..i + R`, columns `j..j + 8·V`: `R × V` vectors of sums in
    /// registers over the whole K.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const R: usize, const V: usize>(&self, i: usize, j: usize) {
        use std::arch::x86_64::*;
        // SAFETY (the whole body): every pointer below stays inside rows
        // i..i + R of A and C and columns j..j + 8·V of B and C, which the
        // callers keep inside the matrices.
        unsafe {
            let mut sums = [[_mm256_setzero_ps(); V]; R];
            if self.acc {
                for (r, row) in sums.iter_mut().enumerate() {
                    for (v, s) in row.iter_mut().enumerate() {
                        *s = _mm256_loadu_ps(self.c.add((i + r) * self.rsc + j + 8 * v));
                    }
                }
            }
            for p in 0..self.k {
                let mut bv = [_mm256_setzero_ps(); V];
                for (v, x) in bv.iter_mut().enumerate() {
                    *x = _mm256_loadu_ps(self.b.add(p * self.rsb + j + 8 * v));
                }
                for (r, row) in sums.iter_mut().enumerate() {
                    let w = _mm256_set1_ps(*self.a.add((i + r) * self.rsa + p));
                    for (s, &x) in row.iter_mut().zip(&bv) {
                        *s = _mm256_fmadd_ps(w, x, *s);
                    }
                }
            }
            for (r, row) in sums.iter().enumerate() {
                for (v, &s) in row.iter().enumerate() {
                    _mm256_storeu_ps(self.c.add((i + r) * self.rsc + j + 8 * v), s);
                }
            }
        }
    }

    /// Column `j` (one past the last vector), eight rows at a time: eight
    /// independent sums in order, where one row's sum alone waits on each
    /// multiply-add's latency in turn (a CenterFace head's 1–2 output
    /// channels over thousands of tokens: 2.4× faster, bound by the loads
    /// now). The rows left over one at a time.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn column(&self, m: usize, j: usize) {
        const ROWS: usize = 8;
        let mut i = 0;
        // SAFETY (the loop): rows i..i + ROWS < m and column j are inside.
        while i + ROWS <= m {
            unsafe {
                let mut s = [0.0f32; ROWS];
                if self.acc {
                    for (r, s) in s.iter_mut().enumerate() {
                        *s = *self.c.add((i + r) * self.rsc + j);
                    }
                }
                for p in 0..self.k {
                    let b = *self.b.add(p * self.rsb + j);
                    for (r, s) in s.iter_mut().enumerate() {
                        *s = (*self.a.add((i + r) * self.rsa + p)).mul_add(b, *s);
                    }
                }
                for (r, &s) in s.iter().enumerate() {
                    *self.c.add((i + r) * self.rsc + j) = s;
                }
            }
            i += ROWS;
        }
        for i in i..m {
            // SAFETY: i < m, and column j inside.
            unsafe { self.scalar(i, j) };
        }
    }

    /// One output, for the columns past the last vector.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn scalar(&self, i: usize, j: usize) {
        // SAFETY: i, j inside the matrices (the caller's bounds).
        unsafe {
            let out = self.c.add(i * self.rsc + j);
            let mut s = if self.acc { *out } else { 0.0 };
            for p in 0..self.k {
                s = (*self.a.add(i * self.rsa + p)).mul_add(*self.b.add(p * self.rsb + j), s);
            }
            *out = s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &[f32], beta: f32) -> Vec<f64> {
        (0..m * n)
            .map(|o| {
                let (i, j) = (o / n, o % n);
                beta as f64 * c[o] as f64
                    + (0..k)
                        .map(|p| a[i * k + p] as f64 * b[p * n + j] as f64)
                        .sum::<f64>()
            })
            .collect()
    }

    /// Rows of each matrix apart in a larger buffer, as the blocks call it
    /// (the map's rows a plane apart).
    #[test]
    fn reads_and_writes_strided_rows() {
        let (m, k, n) = (13, 5, 29);
        let (rsa, rsb, rsc) = (k + 2, n + 5, n + 3);
        let a: Vec<f32> = (0..m * rsa)
            .map(|i| ((i * 37 % 17) as f32) / 8.0 - 1.0)
            .collect();
        let b: Vec<f32> = (0..k * rsb)
            .map(|i| ((i * 53 % 23) as f32) / 11.0 - 1.0)
            .collect();
        let mut c = vec![0.5f32; m * rsc];
        // SAFETY: every row lies inside its buffer.
        unsafe {
            sgemm(
                m,
                k,
                n,
                a.as_ptr(),
                rsa,
                b.as_ptr(),
                rsb,
                1.0,
                c.as_mut_ptr(),
                rsc,
            )
        };
        for i in 0..m {
            for j in 0..rsc {
                let want = if j < n {
                    0.5 + (0..k).map(|p| a[i * rsa + p] * b[p * rsb + j]).sum::<f32>()
                } else {
                    0.5
                };
                assert!((c[i * rsc + j] - want).abs() < 1e-5, "({i}, {j})");
            }
        }
    }

    /// Every shape class: full tiles, leftover rows (1–5), 16- and 8-wide
    /// strips and single columns (eight rows at a time and one by one), K
    /// from 1; with β 0 and 1.
    #[test]
    fn matches_the_definition() {
        let mut seed = 7u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for &(m, k, n) in &[
            (1, 1, 1),
            (6, 16, 16),
            (7, 3, 25),
            (11, 24, 8),
            (96, 16, 320),
            (24, 144, 41),
            (5, 32, 17),
            // Narrow columns: eight rows at a time, then the rows left over.
            (19, 24, 3),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| next()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| next()).collect();
            let c0: Vec<f32> = (0..m * n).map(|_| next()).collect();
            for beta in [0.0f32, 1.0] {
                let mut c = c0.clone();
                // SAFETY: dense row-major matrices of the stated sizes.
                unsafe {
                    sgemm(
                        m,
                        k,
                        n,
                        a.as_ptr(),
                        k,
                        b.as_ptr(),
                        n,
                        beta,
                        c.as_mut_ptr(),
                        n,
                    )
                };
                let want = naive(m, k, n, &a, &b, &c0, beta);
                for (o, (&got, &want)) in c.iter().zip(&want).enumerate() {
                    assert!(
                        (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "{m}×{k}×{n} β {beta}, output {o}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
