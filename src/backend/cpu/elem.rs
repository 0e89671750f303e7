//! What the CPU backend's stored values can be: f32, or f16 / bf16 widened exactly to f32 as they
//! are read (one at a time by the reference loops, 8 or 16 at a time into a register by the
//! vector kernels). Generation caches (kv_cache.rs) and packed weights (weight.rs) both hold
//! them, so that a decode step reads half the bytes where the values are half precision.

use half::{bf16, f16};

pub(super) trait Elem: Copy + Default + Send + Sync + 'static {
    /// Every value is a bf16 value: rounding it to bf16 leaves it as it is.
    const BF16: bool = false;
    fn widen(self) -> f32;
    /// The values as f32 when they are f32 already: the f32 kernels of vmath.rs then serve.
    fn as_f32(values: &[Self]) -> Option<&[f32]>;
    /// 16 values from p as f32 lanes.
    ///
    /// # Safety
    /// The CPU has AVX-512F; 16 values are readable at p.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
    /// 8 values from p as f32 lanes.
    ///
    /// # Safety
    /// The CPU has AVX2 and F16C; 8 values are readable at p.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Elem for f32 {
    fn widen(self) -> f32 {
        self
    }

    fn as_f32(values: &[f32]) -> Option<&[f32]> {
        Some(values)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl Elem for f16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }

    fn as_f32(_: &[f16]) -> Option<&[f32]> {
        None
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }
}

/// bf16 is f32's upper half: widening is a 16-bit shift of the zero-extended bits.
impl Elem for bf16 {
    const BF16: bool = true;

    fn widen(self) -> f32 {
        self.to_f32()
    }

    fn as_f32(_: &[bf16]) -> Option<&[f32]> {
        None
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const bf16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()))))
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector loads widen exactly as the scalar one does, every kind of value included.
    #[test]
    fn vector_loads_widen_like_the_scalar_one() {
        let f: Vec<f32> = [0.0, -0.0, 1.0, -2.5, 65504.0, 6.1e-5, 5.96e-8, f32::INFINITY, f32::NAN, 3.1e38, 1e-39, 0.1, -7.0, 123.456, 1e-3, 9.9]
            .into_iter()
            .collect();
        check(&f);
        check(&f.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>());
        check(&f.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>());
    }

    fn check<E: Elem + std::fmt::Debug>(v: &[E]) {
        let want: Vec<u32> = v.iter().map(|x| x.widen().to_bits()).collect();
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::*;
            if is_x86_feature_detected!("avx512f") {
                let mut got = [0f32; 16];
                // SAFETY: AVX-512F is present; v holds 16 values.
                unsafe { _mm512_storeu_ps(got.as_mut_ptr(), E::load16(v.as_ptr())) };
                assert_eq!(got.map(f32::to_bits).to_vec(), want, "{v:?}");
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c") {
                let mut got = [0f32; 8];
                // SAFETY: AVX2 and F16C are present; v holds at least 8 values.
                unsafe { _mm256_storeu_ps(got.as_mut_ptr(), E::load8(v.as_ptr())) };
                assert_eq!(got.map(f32::to_bits).to_vec(), want[..8], "{v:?}");
            }
        }
        let _ = want;
    }
}
