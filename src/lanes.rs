//! Vectors of f32 lanes for the hand-written CPU kernels (the products'
//! register tiles, the depthwise rows): one generic loop over AVX, AVX-512
//! and NEON, each operation the scalar one lane by lane, so every width
//! gives the same bits and a kernel is written once.
#![cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]

/// True when x86's AVX-512F may be used (detected once), unless
/// `ERSM_AVX512=0` keeps the kernels on AVX2's eight lanes (to measure what
/// the wide vectors give). tract's own kernels pick AVX-512 where the CPU
/// has it, so the dense baseline's layers already run on it.
#[cfg(target_arch = "x86_64")]
pub(crate) fn wide() -> bool {
    static WIDE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WIDE.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx512f")
            && !std::env::var("ERSM_AVX512").is_ok_and(|v| v == "0")
    })
}

/// A vector of f32 lanes: AVX's eight or AVX-512's sixteen on x86, NEON's
/// four on aarch64. Every operation is the lane-wise one of the scalar code
/// (one rounding per operation, one per fused multiply-add; a clamp that
/// gives `lo` for NaN, as `f32::max` does), so both give the same bits.
pub(crate) trait Lanes: Copy {
    /// Lanes per vector.
    const N: usize;
    /// # Safety
    /// The CPU has the vector unit ([`crate::rowgemm::sums_in_order`], [`wide`]).
    unsafe fn splat(v: f32) -> Self;
    /// # Safety
    /// As [`Lanes::splat`]; `p..p + N` readable.
    unsafe fn load(p: *const f32) -> Self;
    /// # Safety
    /// As [`Lanes::splat`]; `p..p + N` writable.
    unsafe fn store(self, p: *mut f32);
    /// `self + a·b`, one rounding.
    ///
    /// # Safety
    /// As [`Lanes::splat`].
    unsafe fn fma(self, a: Self, b: Self) -> Self;
    /// # Safety
    /// As [`Lanes::splat`].
    unsafe fn add(self, o: Self) -> Self;
    /// # Safety
    /// As [`Lanes::splat`].
    unsafe fn mul(self, o: Self) -> Self;
    /// `min(max(self, lo), hi)`, `lo` where `self` is NaN.
    ///
    /// # Safety
    /// As [`Lanes::splat`].
    unsafe fn clamp(self, lo: Self, hi: Self) -> Self;
}

#[cfg(target_arch = "x86_64")]
impl Lanes for std::arch::x86_64::__m256 {
    const N: usize = 8;
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        // SAFETY: the caller's CPU.
        unsafe { std::arch::x86_64::_mm256_set1_ps(v) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller's CPU and bounds.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller's CPU and bounds.
        unsafe { std::arch::x86_64::_mm256_storeu_ps(p, self) }
    }
    #[inline(always)]
    unsafe fn fma(self, a: Self, b: Self) -> Self {
        // SAFETY: the caller's CPU.
        unsafe { std::arch::x86_64::_mm256_fmadd_ps(a, b, self) }
    }
    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        // SAFETY: the caller's CPU.
        unsafe { std::arch::x86_64::_mm256_add_ps(self, o) }
    }
    #[inline(always)]
    unsafe fn mul(self, o: Self) -> Self {
        // SAFETY: the caller's CPU.
        unsafe { std::arch::x86_64::_mm256_mul_ps(self, o) }
    }
    #[inline(always)]
    unsafe fn clamp(self, lo: Self, hi: Self) -> Self {
        use std::arch::x86_64::*;
        // SAFETY: the caller's CPU. maxps returns its second operand when
        // either is NaN.
        unsafe { _mm256_min_ps(_mm256_max_ps(self, lo), hi) }
    }
}

#[cfg(target_arch = "x86_64")]
impl Lanes for std::arch::x86_64::__m512 {
    const N: usize = 16;
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        // SAFETY: the caller's CPU.
        unsafe { std::arch::x86_64::_mm512_set1_ps(v) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller's CPU and bounds.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller's CPU and bounds.
        unsafe { std::arch::x86_64::_mm512_storeu_ps(p, self) }
    }
    #[inline(always)]
    unsafe fn fma(self, a: Self, b: Self) -> Self {
        // SAFETY: the caller's CPU.
        unsafe { std::arch::x86_64::_mm512_fmadd_ps(a, b, self) }
    }
    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        // SAFETY: the caller's CPU.
        unsafe { std::arch::x86_64::_mm512_add_ps(self, o) }
    }
    #[inline(always)]
    unsafe fn mul(self, o: Self) -> Self {
        // SAFETY: the caller's CPU.
        unsafe { std::arch::x86_64::_mm512_mul_ps(self, o) }
    }
    #[inline(always)]
    unsafe fn clamp(self, lo: Self, hi: Self) -> Self {
        use std::arch::x86_64::*;
        // SAFETY: the caller's CPU. vmaxps returns its second operand when
        // either is NaN, as on AVX.
        unsafe { _mm512_min_ps(_mm512_max_ps(self, lo), hi) }
    }
}

#[cfg(target_arch = "aarch64")]
impl Lanes for std::arch::aarch64::float32x4_t {
    const N: usize = 4;
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        // SAFETY: NEON is part of every aarch64 CPU.
        unsafe { std::arch::aarch64::vdupq_n_f32(v) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller's bounds.
        unsafe { std::arch::aarch64::vld1q_f32(p) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller's bounds.
        unsafe { std::arch::aarch64::vst1q_f32(p, self) }
    }
    #[inline(always)]
    unsafe fn fma(self, a: Self, b: Self) -> Self {
        // SAFETY: NEON.
        unsafe { std::arch::aarch64::vfmaq_f32(self, a, b) }
    }
    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        // SAFETY: NEON.
        unsafe { std::arch::aarch64::vaddq_f32(self, o) }
    }
    #[inline(always)]
    unsafe fn mul(self, o: Self) -> Self {
        // SAFETY: NEON.
        unsafe { std::arch::aarch64::vmulq_f32(self, o) }
    }
    #[inline(always)]
    unsafe fn clamp(self, lo: Self, hi: Self) -> Self {
        use std::arch::aarch64::*;
        // SAFETY: NEON. fmaxnm/fminnm return the number when one operand
        // is NaN.
        unsafe { vminnmq_f32(vmaxnmq_f32(self, lo), hi) }
    }
}
