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
//! (32 with AVX-512) of sums stay in registers over the whole K, `B`'s rows
//! read as vectors and `A`'s entries broadcast: AVX-512, or AVX2 and FMA,
//! detected at run time on x86; NEON on aarch64 (the Jetsons' CPUs, where
//! `matrixmultiply` packed as it does on x86); one generic tile over all
//! ([`crate::lanes::Lanes`]). Other CPUs take `matrixmultiply`.
//!
//! A conv's bias and activation ride on the product ([`Epilogue`]): the
//! sums start from the bias, or are biased and clamped as they leave the
//! registers, where passes of their own over the rows after the product
//! cost the fused blocks about a tenth of the prefix's time (perf,
//! CenterFace at 640×480).

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use crate::lanes::Lanes;

/// One value per row or per column of C.
#[derive(Clone, Copy, Debug)]
pub enum Line<'a> {
    /// `m` values, one per output row (channels-major maps).
    Rows(&'a [f32]),
    /// `n` values, one per output column (token-major matrices).
    Cols(&'a [f32]),
}

impl Line<'_> {
    /// The value at output `(i, j)`.
    ///
    /// # Safety
    /// `i` (rows) or `j` (columns) inside the slice.
    #[inline(always)]
    unsafe fn at(self, i: usize, j: usize) -> f32 {
        // SAFETY: the caller's bounds.
        unsafe {
            match self {
                Line::Rows(v) => *v.get_unchecked(i),
                Line::Cols(v) => *v.get_unchecked(j),
            }
        }
    }

    fn covers(self, m: usize, n: usize) -> bool {
        match self {
            Line::Rows(v) => v.len() >= m,
            Line::Cols(v) => v.len() >= n,
        }
    }
}

/// What each output gets besides its sum, in this order, so the bits are
/// those of separate passes: the sum starts from `start` (a bias added
/// first; `β` must be 0), `add` is added to it (a bias added last), and the
/// result is clamped to `[lo, hi]` (ReLU: `[0, ∞)`, ReLU6: `[0, 6]`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Epilogue<'a> {
    /// Start values of the sums.
    pub start: Option<Line<'a>>,
    /// Added after the sums.
    pub add: Option<Line<'a>>,
    /// Bounds of the clamp at the end.
    pub clamp: Option<(f32, f32)>,
}

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
    // SAFETY: the caller's contract, with no epilogue.
    unsafe { sgemm_with(m, k, n, a, rsa, b, rsb, beta, c, rsc, Epilogue::default()) }
}

/// [`sgemm`] with a bias and clamp on each output ([`Epilogue`]).
///
/// # Safety
/// As [`sgemm`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm_with(
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
    ops: Epilogue<'_>,
) {
    debug_assert!(beta == 0.0 || beta == 1.0);
    assert!(
        ops.start.is_none_or(|s| s.covers(m, n) && beta == 0.0),
        "rowgemm: a start value per row or column, and β 0 with it"
    );
    assert!(
        ops.add.is_none_or(|s| s.covers(m, n)),
        "rowgemm: a value to add per row or column"
    );
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    if let Some(tiles) = Tiles::best() {
        // SAFETY: `best` detected the vector unit; the caller's contract.
        return unsafe { tiled(tiles, m, k, n, a, rsa, b, rsb, beta, c, rsc, ops) };
    }
    // SAFETY: the caller's contract.
    unsafe { portable(m, k, n, a, rsa, b, rsb, beta, c, rsc, ops) }
}

/// The register tiles a CPU runs [`sgemm`] on: every kind sums each output
/// in order with one rounding per multiply-add, so all give the same bits.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tiles {
    /// AVX2 and FMA: 8 lanes.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512F: 16 lanes, with AVX2's for a last strip of 8 columns.
    /// Where tract's dense kernels run AVX-512 (its CPU detection), the
    /// sparse suffix and the fused prefix blocks on 8 lanes would give the
    /// dense baseline a vector width ERSM does not have.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// NEON: 4 lanes.
    #[cfg(target_arch = "aarch64")]
    Neon,
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
impl Tiles {
    /// Every kind this CPU runs, narrowest first.
    fn available() -> Vec<Tiles> {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let mut kinds = Vec::new();
            if has!("avx2") && has!("fma") {
                kinds.push(Tiles::Avx2);
                if has!("avx512f") {
                    kinds.push(Tiles::Avx512);
                }
            }
            kinds
        }
        #[cfg(target_arch = "aarch64")]
        vec![Tiles::Neon]
    }

    /// The widest kind this CPU runs, detected once (AVX2 where
    /// [`crate::lanes::wide`] says no).
    fn best() -> Option<Tiles> {
        static BEST: std::sync::OnceLock<Option<Tiles>> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let kinds = Tiles::available();
            #[cfg(target_arch = "x86_64")]
            if !crate::lanes::wide() {
                return kinds.into_iter().find(|&t| t == Tiles::Avx2);
            }
            kinds.last().copied()
        })
    }
}

/// [`sgemm_with`] on register tiles of kind `tiles`.
///
/// # Safety
/// As [`sgemm`], and `tiles` is one of [`Tiles::available`].
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn tiled(
    tiles: Tiles,
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
    ops: Epilogue<'_>,
) {
    {
        let g = Gemm {
            k,
            a,
            rsa,
            b,
            rsb,
            c,
            rsc,
            acc: beta != 0.0,
            ops,
        };
        // SAFETY: the caller detected the vector unit and vouches for the
        // matrices, `sgemm_with`'s asserts for the epilogue's values.
        unsafe {
            match tiles {
                #[cfg(target_arch = "x86_64")]
                Tiles::Avx2 => g.run_avx2(m, n),
                #[cfg(target_arch = "x86_64")]
                Tiles::Avx512 => g.run_avx512(m, n),
                #[cfg(target_arch = "aarch64")]
                Tiles::Neon => g.run_neon(m, n),
            }
        }
    }
}

/// [`sgemm_with`] through `matrixmultiply` (any CPU), the epilogue in
/// passes of their own.
///
/// # Safety
/// As [`sgemm_with`].
#[allow(clippy::too_many_arguments)]
unsafe fn portable(
    m: usize,
    k: usize,
    n: usize,
    a: *const f32,
    rsa: usize,
    b: *const f32,
    rsb: usize,
    mut beta: f32,
    c: *mut f32,
    rsc: usize,
    ops: Epilogue<'_>,
) {
    // SAFETY (every row below): row i of C, n values (the caller's bounds);
    // the epilogue's lines cover C (asserted by the caller).
    let row = |i: usize| unsafe { std::slice::from_raw_parts_mut(c.add(i * rsc), n) };
    if let Some(start) = ops.start {
        for i in 0..m {
            for (j, v) in row(i).iter_mut().enumerate() {
                *v = unsafe { start.at(i, j) };
            }
        }
        beta = 1.0;
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
    if ops.add.is_some() || ops.clamp.is_some() {
        for i in 0..m {
            for (j, v) in row(i).iter_mut().enumerate() {
                *v = unsafe { ops.finish(*v, i, j) };
            }
        }
    }
}

impl Epilogue<'_> {
    /// An output's sum as it leaves: `add`, then the clamp.
    ///
    /// # Safety
    /// `(i, j)` inside the lines.
    #[inline(always)]
    unsafe fn finish(&self, mut v: f32, i: usize, j: usize) -> f32 {
        if let Some(add) = self.add {
            // SAFETY: the caller's bounds.
            v += unsafe { add.at(i, j) };
        }
        match self.clamp {
            Some((lo, hi)) => v.max(lo).min(hi),
            None => v,
        }
    }
}

/// True when [`sgemm`] runs its register tiles (AVX2 and FMA, AVX-512 or
/// NEON): each output's K products summed in order, from zero (β = 0),
/// with one rounding each. `matrixmultiply`, elsewhere, promises no order.
pub fn sums_in_order() -> bool {
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    return Tiles::best().is_some();
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    false
}

/// The operands of one product, for the tile loops.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
struct Gemm<'a> {
    k: usize,
    a: *const f32,
    rsa: usize,
    b: *const f32,
    rsb: usize,
    c: *mut f32,
    rsc: usize,
    /// Add to C (β = 1) rather than overwrite it.
    acc: bool,
    /// The bias and clamp around the sums.
    ops: Epilogue<'a>,
}

/// About how many bytes of A's rows one block of rows holds (L2 is 512 KiB
/// to 2 MiB a core on the x86 CPUs this path runs on, 256 KiB to 1 MiB on
/// Jetsons' Cortex-A cores).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const A_BLOCK_BYTES: usize = 128 << 10;

/// Output rows per register tile.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const MR: usize = 6;

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
impl Gemm<'_> {
    /// Blocks of rows, each through column strips of 16, then 8, then
    /// single columns (AVX2's lanes; the other kinds below keep the shape);
    /// within a strip, tiles of `MR` rows and the rows left
    /// over. A block's rows of A are read once per strip: the block keeps
    /// them to about [`A_BLOCK_BYTES`], so a tall A (a token-major suffix
    /// conv's thousands of tokens) is read from the cache, not from memory,
    /// by every strip after the first. Each output's sum is the same.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, m: usize, n: usize) {
        // SAFETY: the caller's bounds; AVX2 and FMA detected.
        unsafe { self.blocks::<std::arch::x86_64::__m256, 2, 1>(m, 0..n) }
    }

    /// [`Gemm::run_avx2`] with AVX-512's sixteen lanes (strips of 32 and 16
    /// columns), then AVX2's strip of 8 and single columns for the rest: a
    /// 24-channel map's last 8 columns stay in vectors.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn run_avx512(&self, m: usize, n: usize) {
        use std::arch::x86_64::{__m256, __m512};
        let wide = n / 16 * 16;
        // SAFETY: the caller's bounds; AVX-512F, AVX2 and FMA detected.
        unsafe {
            self.blocks::<__m512, 2, 1>(m, 0..wide);
            self.blocks::<__m256, 2, 1>(m, wide..n);
        }
    }

    /// The register tiles with NEON's four lanes: strips of four and two
    /// vectors (16 and 8 columns), as AVX's two and one; its 32 registers
    /// hold the 6 × 4 vectors of sums.
    #[cfg(target_arch = "aarch64")]
    unsafe fn run_neon(&self, m: usize, n: usize) {
        // SAFETY: the caller's bounds.
        unsafe { self.blocks::<std::arch::aarch64::float32x4_t, 4, 2>(m, 0..n) }
    }

    /// Columns `cols` in lanes `L`: blocks of rows, each through strips of
    /// `V` vectors, then one of `H` (`V / 2`), then single columns.
    #[inline(always)]
    unsafe fn blocks<L: Lanes, const V: usize, const H: usize>(
        &self,
        m: usize,
        cols: std::ops::Range<usize>,
    ) {
        let n = cols.end;
        if cols.is_empty() {
            return;
        }
        let block = (A_BLOCK_BYTES / (4 * self.k.max(1))).max(MR) / MR * MR;
        let mut i0 = 0;
        while i0 < m {
            let rows = i0..(i0 + block).min(m);
            let mut j = cols.start;
            while j + L::N * V <= n {
                // SAFETY: columns j..j + N·V inside (the loop), rows inside.
                unsafe { self.strip::<L, V>(rows.clone(), j) };
                j += L::N * V;
            }
            if j + L::N * H <= n {
                // SAFETY: as above.
                unsafe { self.strip::<L, H>(rows.clone(), j) };
                j += L::N * H;
            }
            for j in j..n {
                // SAFETY: j < n, and the caller's bounds.
                unsafe { self.column(rows.clone(), j) };
            }
            i0 = rows.end;
        }
    }

    #[inline(always)]
    unsafe fn strip<L: Lanes, const V: usize>(&self, rows: std::ops::Range<usize>, j: usize) {
        let mut i = rows.start;
        while i + MR <= rows.end {
            // SAFETY: rows i..i + MR and columns j..j + N·V are inside.
            unsafe { self.tile::<L, MR, V>(i, j) };
            i += MR;
        }
        // SAFETY: as above, for the rows left over.
        unsafe {
            match rows.end - i {
                0 => {}
                1 => self.tile::<L, 1, V>(i, j),
                2 => self.tile::<L, 2, V>(i, j),
                3 => self.tile::<L, 3, V>(i, j),
                4 => self.tile::<L, 4, V>(i, j),
                _ => self.tile::<L, 5, V>(i, j),
            }
        }
    }

    /// Rows `i..i + R`, columns `j..j + N·V`: `R × V` vectors of sums in
    /// registers over the whole K.
    #[inline(always)]
    unsafe fn tile<L: Lanes, const R: usize, const V: usize>(&self, i: usize, j: usize) {
        // SAFETY (the whole body): every pointer below stays inside rows
        // i..i + R of A and C and columns j..j + N·V of B and C, which the
        // callers keep inside the matrices; the lines cover C.
        unsafe {
            let at = |r: usize, v: usize| (i + r) * self.rsc + j + L::N * v;
            let mut sums = [[L::splat(0.0); V]; R];
            if self.acc {
                for (r, row) in sums.iter_mut().enumerate() {
                    for (v, s) in row.iter_mut().enumerate() {
                        *s = L::load(self.c.add(at(r, v)));
                    }
                }
            } else if let Some(start) = self.ops.start {
                for (r, row) in sums.iter_mut().enumerate() {
                    for (v, s) in row.iter_mut().enumerate() {
                        *s = start.lanes(i + r, j + L::N * v);
                    }
                }
            }
            for p in 0..self.k {
                let mut bv = [L::splat(0.0); V];
                for (v, x) in bv.iter_mut().enumerate() {
                    *x = L::load(self.b.add(p * self.rsb + j + L::N * v));
                }
                for (r, row) in sums.iter_mut().enumerate() {
                    let w = L::splat(*self.a.add((i + r) * self.rsa + p));
                    for (s, &x) in row.iter_mut().zip(&bv) {
                        *s = s.fma(w, x);
                    }
                }
            }
            if let Some(add) = self.ops.add {
                for (r, row) in sums.iter_mut().enumerate() {
                    for (v, s) in row.iter_mut().enumerate() {
                        *s = s.add(add.lanes(i + r, j + L::N * v));
                    }
                }
            }
            if let Some((lo, hi)) = self.ops.clamp {
                let (lo, hi) = (L::splat(lo), L::splat(hi));
                // Row by row: `flatten()` over the sums here kept them on the
                // stack through the whole K loop (the prefix 2× slower).
                for row in sums.iter_mut() {
                    for s in row.iter_mut() {
                        *s = s.clamp(lo, hi);
                    }
                }
            }
            for (r, row) in sums.iter().enumerate() {
                for (v, &s) in row.iter().enumerate() {
                    s.store(self.c.add(at(r, v)));
                }
            }
        }
    }

    /// Column `j` (one past the last vector), eight rows at a time: eight
    /// independent sums in order, where one row's sum alone waits on each
    /// multiply-add's latency in turn (a CenterFace head's 1–2 output
    /// channels over thousands of tokens: 2.4× faster, bound by the loads
    /// now). The rows left over one at a time.
    #[inline(always)]
    unsafe fn column(&self, rows: std::ops::Range<usize>, j: usize) {
        const ROWS: usize = 8;
        let (mut i, m) = (rows.start, rows.end);
        // SAFETY (the loop): rows i..i + ROWS ≤ m and column j are inside.
        while i + ROWS <= m {
            unsafe {
                let mut s = [0.0f32; ROWS];
                for (r, s) in s.iter_mut().enumerate() {
                    *s = self.first(i + r, j);
                }
                for p in 0..self.k {
                    let b = *self.b.add(p * self.rsb + j);
                    for (r, s) in s.iter_mut().enumerate() {
                        *s = (*self.a.add((i + r) * self.rsa + p)).mul_add(b, *s);
                    }
                }
                for (r, &s) in s.iter().enumerate() {
                    self.last(i + r, j, s);
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
    #[inline(always)]
    unsafe fn scalar(&self, i: usize, j: usize) {
        // SAFETY: i, j inside the matrices (the caller's bounds).
        unsafe {
            let mut s = self.first(i, j);
            for p in 0..self.k {
                s = (*self.a.add(i * self.rsa + p)).mul_add(*self.b.add(p * self.rsb + j), s);
            }
            self.last(i, j, s);
        }
    }

    /// Where output `(i, j)`'s sum starts: C, the start value or 0.
    ///
    /// # Safety
    /// `(i, j)` inside C and the epilogue's lines.
    #[inline(always)]
    unsafe fn first(&self, i: usize, j: usize) -> f32 {
        // SAFETY: the caller's bounds.
        unsafe {
            if self.acc {
                *self.c.add(i * self.rsc + j)
            } else if let Some(start) = self.ops.start {
                start.at(i, j)
            } else {
                0.0
            }
        }
    }

    /// Stores output `(i, j)`'s sum through the epilogue.
    ///
    /// # Safety
    /// As [`Gemm::first`].
    #[inline(always)]
    unsafe fn last(&self, i: usize, j: usize, s: f32) {
        // SAFETY: the caller's bounds.
        unsafe { *self.c.add(i * self.rsc + j) = self.ops.finish(s, i, j) };
    }
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
impl Line<'_> {
    /// Values for outputs `(i, j..j + N)`: one broadcast, or `N` columns.
    ///
    /// # Safety
    /// As [`Lanes::splat`]; `i` or `j..j + N` inside the slice.
    #[inline(always)]
    unsafe fn lanes<L: Lanes>(self, i: usize, j: usize) -> L {
        // SAFETY: the caller's bounds and CPU.
        unsafe {
            match self {
                Line::Rows(v) => L::splat(*v.get_unchecked(i)),
                Line::Cols(v) => L::load(v.as_ptr().add(j)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values in [-0.5, 0.5) from a linear congruential generator.
    fn values(mut seed: u32) -> impl FnMut() -> f32 {
        move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        }
    }

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
        let mut next = values(7);
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
            // Blocks of 30 rows (A_BLOCK_BYTES over 4·K), the last short.
            (200, 1088, 25),
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

    /// Every kind of register tile this CPU runs (AVX2 and AVX-512 on a
    /// recent x86) gives the same bits, on the column counts that split
    /// between them (16 wide, then 8, then single columns), and matches the
    /// definition.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    #[test]
    fn every_kind_of_tile_gives_the_same_bits() {
        let kinds = Tiles::available();
        eprintln!("tiles on this CPU: {kinds:?}");
        let mut next = values(13);
        for &(m, k, n) in &[
            (6, 16, 32),
            (7, 24, 24),
            (13, 96, 40),
            (5, 32, 47),
            (96, 16, 80),
            (30, 144, 160),
            (3, 5, 15),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| next()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| next()).collect();
            let rows: Vec<f32> = (0..m).map(|_| next()).collect();
            let cols: Vec<f32> = (0..n).map(|_| next()).collect();
            let ops = Epilogue {
                start: Some(Line::Rows(&rows)),
                add: Some(Line::Cols(&cols)),
                clamp: Some((-0.2, 0.3)),
            };
            let outs: Vec<Vec<f32>> = kinds
                .iter()
                .map(|&t| {
                    let mut c = vec![7.0f32; m * n];
                    // SAFETY: dense row-major matrices of the stated sizes;
                    // `t` is one this CPU runs.
                    unsafe {
                        tiled(
                            t,
                            m,
                            k,
                            n,
                            a.as_ptr(),
                            k,
                            b.as_ptr(),
                            n,
                            0.0,
                            c.as_mut_ptr(),
                            n,
                            ops,
                        )
                    };
                    c
                })
                .collect();
            for o in 0..m * n {
                let (i, j) = (o / n, o % n);
                let sum: f64 = (0..k)
                    .map(|p| a[i * k + p] as f64 * b[p * n + j] as f64)
                    .sum();
                let want = (rows[i] as f64 + sum + cols[j] as f64).clamp(-0.2, 0.3);
                for (t, out) in kinds.iter().zip(&outs) {
                    assert!(
                        (out[o] as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "{t:?} {m}×{k}×{n}, output {o}: {} vs {want}",
                        out[o]
                    );
                    assert_eq!(
                        out[o].to_bits(),
                        outs[0][o].to_bits(),
                        "{t:?} against {:?}, {m}×{k}×{n}, output {o}",
                        kinds[0]
                    );
                }
            }
        }
    }

    /// Every epilogue (start values per row or column; a bias per row or
    /// column added after the sums, then a clamp), on the register tiles
    /// and on the portable path, against its definition, every shape class.
    #[test]
    fn epilogues_match_their_definition_on_both_paths() {
        let mut next = values(11);
        for &(m, k, n) in &[
            (1, 1, 1),
            (7, 3, 25),
            (96, 16, 41),
            (19, 24, 3),
            (13, 5, 16),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| next()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| next()).collect();
            let rows: Vec<f32> = (0..m).map(|_| next()).collect();
            let cols: Vec<f32> = (0..n).map(|_| next()).collect();
            let sum = |i: usize, j: usize| -> f64 {
                (0..k)
                    .map(|p| a[i * k + p] as f64 * b[p * n + j] as f64)
                    .sum()
            };
            let cases = [
                (Some(Line::Rows(&rows[..])), None, None),
                (
                    Some(Line::Cols(&cols[..])),
                    None,
                    Some((0.0, f32::INFINITY)),
                ),
                (None, Some(Line::Rows(&rows[..])), Some((0.0, 0.2))),
                (None, Some(Line::Cols(&cols[..])), Some((-0.1, 0.1))),
                (
                    Some(Line::Cols(&cols[..])),
                    Some(Line::Rows(&rows[..])),
                    None,
                ),
            ];
            for (case, (start, add, clamp)) in cases.into_iter().enumerate() {
                let ops = Epilogue { start, add, clamp };
                let value = |line: Option<Line>, i: usize, j: usize| match line {
                    Some(Line::Rows(v)) => v[i] as f64,
                    Some(Line::Cols(v)) => v[j] as f64,
                    None => 0.0,
                };
                let mut tiles = vec![7.0f32; m * n];
                let mut passes = vec![7.0f32; m * n];
                // SAFETY: dense row-major matrices of the stated sizes.
                unsafe {
                    let (a, b) = (a.as_ptr(), b.as_ptr());
                    sgemm_with(m, k, n, a, k, b, n, 0.0, tiles.as_mut_ptr(), n, ops);
                    portable(m, k, n, a, k, b, n, 0.0, passes.as_mut_ptr(), n, ops);
                }
                for o in 0..m * n {
                    let (i, j) = (o / n, o % n);
                    let mut want = value(start, i, j) + sum(i, j) + value(add, i, j);
                    if let Some((lo, hi)) = clamp {
                        want = want.clamp(lo as f64, hi as f64);
                    }
                    for (path, got) in [("tiles", tiles[o]), ("portable", passes[o])] {
                        assert!(
                            (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{path} {m}×{k}×{n} case {case}, output {o}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
