//! Matrix products on gathered, contiguous token matrices.
//!
//! `matrixmultiply` packs panels and dispatches at run time to AVX2/FMA,
//! AVX-512 or NEON micro-kernels, so the suffix runs on real GEMM kernels.

use crate::threads::par_rows;

/// A row-major `k × n` weight matrix, stored once at load.
#[derive(Clone, Debug, PartialEq)]
pub struct Weights {
    /// Rows (input features).
    pub k: usize,
    /// Columns (output features).
    pub n: usize,
    /// `k × n` values.
    pub data: Vec<f32>,
}

/// `c[m × n] (row stride ldc, column offset already applied) = a[m × k] · w (+ c if accumulate)`.
///
/// `a` has row stride `lda`; `c` row stride `ldc`.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    m: usize,
    a: &[f32],
    lda: usize,
    w: &Weights,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    if m == 0 || w.n == 0 {
        return;
    }
    assert!(a.len() >= (m - 1) * lda + w.k, "gemm: A too short");
    assert!(c.len() >= (m - 1) * ldc + w.n, "gemm: C too short");
    if m == 1 {
        // A single row (classifier, squeeze-excite): packing the weights would
        // cost as much as the product, so stream them once, row by row, each
        // thread over its own columns (the sum order per column is fixed).
        let c = &mut c[..w.n];
        if !accumulate {
            c.fill(0.0);
        }
        let x = &a[..w.k];
        par_rows(c, 1, 256, |j0, cs| {
            for (&xv, row) in x.iter().zip(w.data.chunks_exact(w.n)) {
                let n = cs.len();
                cs.iter_mut()
                    .zip(&row[j0..j0 + n])
                    .for_each(|(y, &wv)| *y += xv * wv);
            }
        });
        return;
    }
    // SAFETY: the asserts above bound every access sgemm makes through these
    // pointers and strides; `w.data` is exactly k × n.
    unsafe {
        matrixmultiply::sgemm(
            m,
            w.k,
            w.n,
            1.0,
            a.as_ptr(),
            lda as isize,
            1,
            w.data.as_ptr(),
            w.n as isize,
            1,
            if accumulate { 1.0 } else { 0.0 },
            c.as_mut_ptr(),
            ldc as isize,
            1,
        );
    }
}
