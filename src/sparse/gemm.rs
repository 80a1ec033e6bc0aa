//! Matrix products on gathered, contiguous token matrices.
//!
//! Through [`crate::rowgemm`]: register tiles over the operands in place
//! where AVX2 and FMA run (the im2col'd 3×3 conv of CenterFace's suffix
//! about 2× faster than `matrixmultiply`'s packed panels, its 1×1 convs
//! about 10 %), the same tiles in NEON on aarch64, `matrixmultiply`'s
//! kernels elsewhere.

use crate::rowgemm::{Epilogue, Line};
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
    matmul_rows(m, a, lda, (&w.data, w.k, w.n), c, ldc, accumulate);
}

/// `c = clamp(bias + a · w)`, the bias added first and per column (a
/// token-major conv's output channels), the clamp after (`None`: none): the
/// bits of filling `c` with the bias, [`matmul`] accumulating and a clamp
/// pass, in one pass over `c` where the register tiles run.
#[allow(clippy::too_many_arguments)]
pub fn matmul_biased(
    m: usize,
    a: &[f32],
    lda: usize,
    w: &Weights,
    bias: &[f32],
    clamp: Option<(f32, f32)>,
    c: &mut [f32],
    ldc: usize,
) {
    if m == 0 || w.n == 0 {
        return;
    }
    assert!(bias.len() >= w.n, "gemm: a bias per column");
    if m == 1 {
        c[..w.n].copy_from_slice(&bias[..w.n]);
        matmul(m, a, lda, w, c, ldc, true);
        if let Some((lo, hi)) = clamp {
            c[..w.n].iter_mut().for_each(|v| *v = v.max(lo).min(hi));
        }
        return;
    }
    assert!(a.len() >= (m - 1) * lda + w.k, "gemm: A too short");
    assert!(c.len() >= (m - 1) * ldc + w.n, "gemm: C too short");
    let ops = Epilogue {
        start: Some(Line::Cols(bias)),
        add: None,
        clamp,
    };
    // SAFETY: the asserts above bound every row rowgemm reads and writes.
    unsafe {
        crate::rowgemm::sgemm_with(
            m,
            w.k,
            w.n,
            a.as_ptr(),
            lda,
            w.data.as_ptr(),
            w.n,
            0.0,
            c.as_mut_ptr(),
            ldc,
            ops,
        );
    }
}

/// [`matmul`] with the weights as a row-major `k × n` slice (a block of
/// rows of a larger matrix), several rows at a time.
pub fn matmul_rows(
    m: usize,
    a: &[f32],
    lda: usize,
    (w, k, n): (&[f32], usize, usize),
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(a.len() >= (m - 1) * lda + k, "gemm: A too short");
    assert!(c.len() >= (m - 1) * ldc + n, "gemm: C too short");
    assert!(w.len() >= k * n, "gemm: W too short");
    // SAFETY: the asserts above bound every row rowgemm reads and writes.
    unsafe {
        crate::rowgemm::sgemm(
            m,
            k,
            n,
            a.as_ptr(),
            lda,
            w.as_ptr(),
            n,
            if accumulate { 1.0 } else { 0.0 },
            c.as_mut_ptr(),
            ldc,
        );
    }
}
