//! Rounding f32 to bf16 where the bf16 compute route rounds: to nearest, ties to even, NaN kept
//! a (quiet) NaN, bit for bit what `half::bf16::from_f32` gives and so what the CUDA backend
//! uploads its weights with (cuda/upload.rs) and its kernels' `__float2bfloat16_rn` writes.
//! One formula serves the weights at load and the activations as ops make them; it is plain
//! integer arithmetic without branches, so the loops over slices vectorise.

use super::dispatch::dispatch;
use half::bf16;
use std::mem::MaybeUninit;

/// v rounded to bf16, as its bit pattern.
#[inline(always)]
fn bits(v: f32) -> u16 {
    let b = v.to_bits();
    let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
    // Adding 0x7fff plus the lowest kept bit carries into the kept bits exactly when the
    // dropped half is over one half, or one half with the kept part odd (ties to even).
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    if nan {
        ((b >> 16) | 0x40) as u16
    } else {
        rounded
    }
}

/// v rounded to bf16.
#[inline(always)]
pub fn round(v: f32) -> bf16 {
    bf16::from_bits(bits(v))
}

/// v rounded to bf16 and widened back: the f32 holding the bf16 value.
#[inline(always)]
pub fn round_f32(v: f32) -> f32 {
    f32::from_bits((bits(v) as u32) << 16)
}

#[inline(always)]
fn round_in_place_body(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = round_f32(*v));
}

#[inline(always)]
fn round_into_body(src: &[f32], dst: &mut [MaybeUninit<bf16>]) {
    dst.iter_mut().zip(src).for_each(|(d, &s)| {
        d.write(round(s));
    });
}

#[inline(always)]
fn round_pairs_into_body(a: &[f32], b: &[f32], dst: &mut [bf16]) {
    dst.chunks_exact_mut(2).zip(a.iter().zip(b)).for_each(|(d, (&a, &b))| {
        d[0] = round(a);
        d[1] = round(b);
    });
}

// The baseline build's copies of these loops are SSE2, 4 lanes with packing shuffles: 3% of a
// bf16 scoring run's wall (perf), where the AVX-512 copies are a few instructions per 16.
dispatch!(
    /// Every value of x rounded to bf16, kept as f32: an op's output that only GEMMs read.
    round_in_place, round_in_place_avx2, round_in_place_avx512, round_in_place_body, (x: &mut [f32]) -> ()
);
/// dst[i] = src[i] rounded to bf16, dst written whole (it may start uninitialised).
pub fn round_into_uninit(src: &[f32], dst: &mut [MaybeUninit<bf16>]) {
    let src = &src[..dst.len()];
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features the copy was compiled for.
            return unsafe { avx512::round_into(src, dst) };
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { round_into_avx2(src, dst) };
        }
    }
    round_into_body(src, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn round_into_avx2(src: &[f32], dst: &mut [MaybeUninit<bf16>]) {
    round_into_body(src, dst)
}

/// The AVX-512 copies written with intrinsics: the callers' slices are short (a head's 64
/// values, a block's attended keys), where the compiler's vectorised loop (64 wide, unrolled)
/// seldom ran and its 8-wide remainder loop did the work; here every 16 values, the tail
/// included (masked), are one vector.
#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    use half::bf16;
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// `round_f32` of 16 lanes: each the f32 holding its bf16 value.
    #[inline(always)]
    pub unsafe fn round16(x: __m512) -> __m512 {
        let b = _mm512_castps_si512(x);
        let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
        let high = _mm512_set1_epi32(0xffff_0000u32 as i32);
        let rounded = _mm512_and_si512(_mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), high);
        let quiet = _mm512_or_si512(_mm512_and_si512(b, high), _mm512_set1_epi32(0x0040_0000));
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
        _mm512_castsi512_ps(_mm512_mask_mov_epi32(rounded, nan, quiet))
    }

    /// dst[i] = src[i] rounded to bf16 (src as long as dst).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn round_into(src: &[f32], dst: &mut [MaybeUninit<bf16>]) {
        debug_assert_eq!(src.len(), dst.len());
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr().cast::<i16>());
        for i in (0..dst.len()).step_by(16) {
            let m: __mmask16 = if dst.len() - i >= 16 { !0 } else { (1u16 << (dst.len() - i)) - 1 };
            let x = round16(_mm512_maskz_loadu_ps(m, s.add(i)));
            _mm512_mask_cvtepi32_storeu_epi16(d.add(i).cast(), m, _mm512_srli_epi32::<16>(_mm512_castps_si512(x)));
        }
    }
}

dispatch!(
    /// (dst[2i], dst[2i + 1]) = (a[i], b[i]) rounded to bf16: two rows interleaved, as a pair
    /// panel holds two consecutive depths of each column.
    round_pairs_into, round_pairs_into_avx2, round_pairs_into_avx512, round_pairs_into_body, (a: &[f32], b: &[f32], dst: &mut [bf16]) -> ()
);

/// dst[i] = src[i] rounded to bf16.
pub fn round_into(src: &[f32], dst: &mut [bf16]) {
    // SAFETY: MaybeUninit<bf16> has bf16's layout, and every value written is initialised.
    let dst = unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<MaybeUninit<bf16>>(), dst.len()) };
    round_into_uninit(src, dst);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bit for bit `half`'s rounding (an independent implementation) over every exponent, the
    /// ties, infinities, NaNs and subnormals.
    #[test]
    fn rounds_like_half() {
        let mut z = 0x9E3779B97F4A7C15u64;
        let mut patterns: Vec<u32> = (0..200_000)
            .map(|_| {
                z ^= z << 13;
                z ^= z >> 7;
                z ^= z << 17;
                z as u32
            })
            .collect();
        // ties (dropped half exactly 0x8000) at even and odd kept parts, the largest finite
        // values (which round to infinity), infinities, NaNs with payloads only in the dropped half
        patterns.extend([0x3f80_8000, 0x3f81_8000, 0xbf80_8000, 0x7f7f_ffff, 0xff7f_ffff, 0x7f7f_8000, 0x7f80_0000, 0xff80_0000, 0x7f80_0001, 0xffc0_0000, 0x0000_8000, 0x0001_8000, 0x8000_0001, 0]);
        for b in patterns {
            let v = f32::from_bits(b);
            assert_eq!(round(v).to_bits(), bf16::from_f32(v).to_bits(), "{b:#010x}");
            assert_eq!(round_f32(v).to_bits(), bf16::from_f32(v).to_f32().to_bits(), "{b:#010x}");
        }
    }

    /// The dispatched slice loops (AVX-512 here) bit for bit the scalar formula, at lengths
    /// around the vector widths (the tails) and over the special values.
    #[test]
    fn vector_copies_round_like_the_scalar_formula() {
        let special = [0x3f80_8000u32, 0x3f81_8000, 0x7f7f_ffff, 0x7f80_0000, 0x7f80_0001, 0xffc0_0000, 0x0000_8000, 0x0001_8000, 0x8000_0001];
        for len in [0, 1, 15, 16, 17, 31, 33, 64, 100, 577] {
            let x: Vec<f32> = (0..len).map(|i| if i % 7 == 3 { f32::from_bits(special[i % special.len()]) } else { f32::from_bits(0x3c00_0000u32.wrapping_add((i as u32).wrapping_mul(0x9E37_79B1) >> 6)) }).collect();
            let mut y = x.clone();
            round_in_place(&mut y);
            let mut z = vec![bf16::ZERO; len];
            round_into(&x, &mut z);
            for (i, &v) in x.iter().enumerate() {
                assert_eq!(y[i].to_bits(), round_f32(v).to_bits(), "len {len} at {i}");
                assert_eq!(z[i].to_bits(), bf16::from_f32(v).to_bits(), "len {len} at {i}");
            }
        }
    }

    #[test]
    fn pairs_interleave_two_rows_rounded() {
        for len in [0, 1, 15, 16, 17, 33] {
            let a: Vec<f32> = (0..len).map(|i| i as f32 * 0.377 - 3.1).collect();
            let b: Vec<f32> = (0..len).map(|i| f32::from_bits(0x3f80_8000 + i as u32)).collect();
            let mut d = vec![bf16::ZERO; 2 * len];
            round_pairs_into(&a, &b, &mut d);
            for i in 0..len {
                assert_eq!([d[2 * i].to_bits(), d[2 * i + 1].to_bits()], [bf16::from_f32(a[i]).to_bits(), bf16::from_f32(b[i]).to_bits()], "len {len} at {i}");
            }
        }
    }

    #[test]
    fn slices_round_element_by_element() {
        let x: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.123_456_79).collect();
        let mut y = x.clone();
        round_in_place(&mut y);
        let mut z = vec![bf16::ZERO; x.len()];
        round_into(&x, &mut z);
        for ((&a, &b), &c) in x.iter().zip(&y).zip(&z) {
            assert_eq!(b, bf16::from_f32(a).to_f32());
            assert_eq!(c, bf16::from_f32(a));
        }
    }
}
