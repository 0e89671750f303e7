//! f32 exp, erf, GELU and RoPE's rotation over slices, written as branch-free loops the compiler vectorises.
//!
//! The build targets baseline x86-64 (SSE2, no FMA), so each slice function has AVX2+FMA and
//! AVX-512 copies chosen at run time: the same `#[inline(always)]` body compiled three times.
//! The bodies with e^x are generic over FUSED (`madd`): fused multiply-adds in the two copies
//! whose target has FMA, a multiply and an add in the baseline one.
//!
//! Accuracy (tests in cpu/tests.rs against f64): exp ~2e-7 relative, erf ~3e-7 absolute,
//! GELU ~3e-7·max(1, |x|): below what f32 activations carry and what HF's goldens test.

use super::dispatch::dispatch;
use std::mem::MaybeUninit;

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two (Cody–Waite) so that x - n·ln2 stays exact for |n| <= 127.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// 1.5·2^23: adding and subtracting it rounds an f32 below 2^22 in magnitude to an integer.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// e^x. Below -87.3 (e^x under f32's smallest normal) it is 0; above 88 it saturates at e^88.
#[inline(always)]
pub fn exp_one(x: f32) -> f32 {
    exp_in::<false>(x)
}

/// a·b + c, in one rounding where FUSED: the AVX2 and AVX-512 copies of the slice functions
/// (their target has FMA, so `mul_add` is one instruction, and exp's polynomial takes 10
/// instructions instead of 20); in the baseline copy `mul_add` would be a libm call.
#[inline(always)]
fn madd<const FUSED: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FUSED {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `exp_one`, with its multiply-adds fused where FUSED.
#[inline(always)]
fn exp_in<const FUSED: bool>(x: f32) -> f32 {
    let xc = x.clamp(-87.0, 88.0);
    // e^x = 2^n · e^r with r in [-ln2/2, ln2/2]; e^r by its Taylor series to r^7/7!
    // (truncation 5e-9 there).
    let rounded = madd::<FUSED>(xc, LOG2E, ROUND_MAGIC); // n + 1.5·2^23: n is in its low mantissa bits
    let n = rounded - ROUND_MAGIC;
    let r = madd::<FUSED>(-n, LN2_LO, madd::<FUSED>(-n, LN2_HI, xc));
    let mut p = 1.0 / 5040.0;
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = madd::<FUSED>(p, r, c);
    }
    // 2^n built from n's bits, not from `n as i32`: Rust's saturating cast compiled to one
    // scalar cvttss2si per lane, a third of SiLU's and the softmax's time (perf annotate).
    let n_int = rounded.to_bits().wrapping_sub(ROUND_MAGIC.to_bits()) as i32; // n in [-126, 127]
    let scale = f32::from_bits((n_int.wrapping_add(127) as u32) << 23);
    if x < -87.3 {
        0.0
    } else {
        p * scale
    }
}

/// 2/√π · (-1)^n / (n! (2n+1)), n = 0..9: erf(z) = z · Σ c_n z^2n, truncation < 2e-8 for z <= 1.
const ERF_TAYLOR: [f32; 10] = [
    std::f32::consts::FRAC_2_SQRT_PI,
    -0.376_126_4,
    0.112_837_92,
    -0.026_866_171,
    0.005_223_977_6,
    -8.548_327e-4,
    1.205_533_3e-4,
    -1.492_565e-5,
    1.646_211_4e-6,
    -1.636_584_5e-7,
];

/// erfc(z)·e^(z²) on z in [1, 4] as a polynomial in s = (2z - 5)/3 (s in [-1, 1]), lowest
/// power first: a least-squares fit on 400 Chebyshev nodes, 1.7e-7 relative evaluated in f32.
/// Made with numpy.polynomial.chebyshev.chebfit(nodes, erfc(z)·exp(z²), 11) then cheb2poly.
const ERFC_SCALED_FIT: [f32; 12] = [
    0.210_806_35,
    -0.111_521_006,
    0.056_110_96,
    -0.027_005_725,
    0.012_484_035,
    -0.005_567_333,
    0.002_425_885,
    -0.001_017_117_8,
    3.678_686_6e-4,
    -1.439_486e-4,
    9.640_452e-5,
    -3.692_872_3e-5,
];

#[inline(always)]
fn horner(coeffs: &[f32], x: f32) -> f32 {
    let mut acc = 0.0;
    for &c in coeffs.iter().rev() {
        acc = acc * x + c;
    }
    acc
}

/// erf(x): a series below |x| = 1, 1 - e^(-x²)·fit(|x|) from 1 to 4, ±1 beyond (erfc(4) is
/// under half an ulp of 1). Both halves are computed and one selected, so the loop has no branch.
#[inline(always)]
pub fn erf_one(x: f32) -> f32 {
    erf_in::<false>(x)
}

#[inline(always)]
fn erf_in<const FUSED: bool>(x: f32) -> f32 {
    let z = x.abs().min(4.0);
    let z2 = z * z;
    let small = z * horner(&ERF_TAYLOR, z2);
    let s = (z - 1.0) * (2.0 / 3.0) - 1.0;
    let large = 1.0 - exp_in::<FUSED>(-z2) * horner(&ERFC_SCALED_FIT, s);
    let v = if z < 1.0 { small } else { large };
    v.copysign(x)
}

/// 0.5 x (1 + erf(x / √2)): torch's default (exact) GELU.
#[inline(always)]
pub fn gelu_one(x: f32) -> f32 {
    gelu_in::<false>(x)
}

#[inline(always)]
fn gelu_in<const FUSED: bool>(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_in::<FUSED>(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[inline(always)]
fn gelu_body<const FUSED: bool>(x: &mut [f32]) {
    // A plain loop: `for_each`'s closure was outlined, compiled without the target features.
    for v in x.iter_mut() {
        *v = gelu_in::<FUSED>(*v);
    }
}

/// SiLU(g) · u, its multiply-adds fused where FUSED.
#[inline(always)]
pub(super) fn silu_mul_one<const FUSED: bool>(g: f32, u: f32) -> f32 {
    g / (1.0 + exp_in::<FUSED>(-g)) * u
}

/// Vectors of 16 and the tail as one more: the GEMMs' epilogues call this on one tile row (32
/// columns), where a plain zip loop's vectorised body (64 wide, unrolled) never ran and its
/// 8-wide remainder loop did the work (perf annotate).
#[inline(always)]
fn silu_mul_body<const FUSED: bool>(gate: &mut [f32], up: &[f32]) {
    const LANES: usize = 16;
    let up = &up[..gate.len()];
    let mut chunks = gate.chunks_exact_mut(LANES);
    for (g, u) in (&mut chunks).zip(up.chunks_exact(LANES)) {
        for i in 0..LANES {
            g[i] = silu_mul_one::<FUSED>(g[i], u[i]);
        }
    }
    let rest = chunks.into_remainder();
    if rest.is_empty() {
        return;
    }
    let (mut g, mut u) = ([0f32; LANES], [0f32; LANES]);
    g[..rest.len()].copy_from_slice(rest);
    u[..rest.len()].copy_from_slice(&up[up.len() - rest.len()..]);
    for i in 0..LANES {
        g[i] = silu_mul_one::<FUSED>(g[i], u[i]);
    }
    rest.copy_from_slice(&g[..rest.len()]);
}

/// e^(x·scale - shift), its multiply-adds fused where FUSED: a softmax numerator.
#[inline(always)]
pub(super) fn exp_scaled_shift<const FUSED: bool>(x: f32, scale: f32, shift: f32) -> f32 {
    exp_in::<FUSED>(madd::<FUSED>(x, scale, -shift))
}

/// Lanes of the softmax sums: the numerators are summed in 16 partial sums, so the loops
/// vectorise at either vector width, and added up at the end (`lane_sums`).
pub(super) const SUM_LANES: usize = 16;

/// The partial sums' total, in the one order every softmax of the backend adds them.
#[inline(always)]
pub(super) fn lane_sums(acc: &[f32; SUM_LANES]) -> f32 {
    acc.iter().sum::<f32>()
}

/// x[i] = e^(x[i]·scale - shift); returns the sum (`SUM_LANES` partial sums).
#[inline(always)]
fn exp_scaled_shift_sum_body<const FUSED: bool>(x: &mut [f32], scale: f32, shift: f32) -> f32 {
    const LANES: usize = SUM_LANES;
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            c[i] = exp_scaled_shift::<FUSED>(c[i], scale, shift);
            acc[i] += c[i];
        }
    }
    // The tail as one more vector (scores rows are short: a choice's own keys are a few), the
    // lanes past it left out of the sum.
    let rest = chunks.into_remainder();
    let mut lanes = [0f32; LANES];
    lanes[..rest.len()].copy_from_slice(rest);
    for i in 0..LANES {
        lanes[i] = exp_scaled_shift::<FUSED>(lanes[i], scale, shift);
        acc[i] += if i < rest.len() { lanes[i] } else { 0.0 };
    }
    rest.copy_from_slice(&lanes[..rest.len()]);
    lane_sums(&acc)
}

/// The largest of x (-inf when empty), in 16 lanes: `f32::max`'s fold stays one scalar chain.
#[inline(always)]
fn max_body(x: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    // The tail as one more vector, padded with -inf (scores rows are short).
    let rest = chunks.remainder();
    let mut lanes = [f32::NEG_INFINITY; LANES];
    lanes[..rest.len()].copy_from_slice(rest);
    for i in 0..LANES {
        acc[i] = if lanes[i] > acc[i] { lanes[i] } else { acc[i] };
    }
    acc.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// Σ e^(x[i] - shift) in f64: f32 exponentials summed in 16 f32 lanes over blocks of 256, each
/// block's sum added in f64, so a 150 000-entry vocabulary row keeps f64-like accuracy
/// (relative error ~1e-6 at worst, against 2e-7 per exponential).
#[inline(always)]
fn sum_exp_shifted_body<const FUSED: bool>(x: &[f32], shift: f32) -> f64 {
    const LANES: usize = 16;
    const BLOCK: usize = 256;
    let mut total = 0f64;
    for block in x.chunks(BLOCK) {
        let mut acc = [0f32; LANES];
        let mut chunks = block.chunks_exact(LANES);
        for c in &mut chunks {
            for i in 0..LANES {
                acc[i] += exp_in::<FUSED>(c[i] - shift);
            }
        }
        let tail: f32 = chunks.remainder().iter().map(|&v| exp_in::<FUSED>(v - shift)).sum();
        total += (acc.iter().sum::<f32>() + tail) as f64;
    }
    total
}

/// Σ (x[i] - shift)² in f64 (shift 0: the sum of squares of RMSNorm), in 8 f64 partial sums:
/// one sum in order is a chain of dependent f64 adds, 4 cycles per element.
#[inline(always)]
fn sum_sq_dev_body(x: &[f32], shift: f64) -> f64 {
    const LANES: usize = 8;
    let mut acc = [0f64; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            let d = c[i] as f64 - shift;
            acc[i] += d * d;
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&v| (v as f64 - shift) * (v as f64 - shift)).sum();
    acc.iter().sum::<f64>() + tail
}

/// Σ x[i] in f64, in 8 partial sums (see sum_sq_dev_body).
#[inline(always)]
fn sum_f64_body(x: &[f32]) -> f64 {
    const LANES: usize = 8;
    let mut acc = [0f64; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] += c[i] as f64;
        }
    }
    acc.iter().sum::<f64>() + chunks.remainder().iter().map(|&v| v as f64).sum::<f64>()
}

/// out[i] = x[i] · inv · w[i]: a norm's output row from its statistics' 1/σ and the gain.
#[inline(always)]
fn scale_gain_body(x: &[f32], inv: f32, w: &[f32], out: &mut [MaybeUninit<f32>]) {
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        o.write(v * inv * g);
    }
}

/// `scale_gain_body` rounded to bf16: a norm's output that only GEMMs read, on the bf16 route.
#[inline(always)]
fn scale_gain_rounded_body(x: &[f32], inv: f32, w: &[f32], out: &mut [MaybeUninit<f32>]) {
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        o.write(super::round::round_f32(v * inv * g));
    }
}

/// `scale_gain_body` rounded into bf16: a norm's output as the bf16 GEMM's operand.
#[inline(always)]
fn scale_gain_bf16_body(x: &[f32], inv: f32, w: &[f32], out: &mut [MaybeUninit<half::bf16>]) {
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        o.write(super::round::round(v * inv * g));
    }
}

/// head (D) <- its rotate-half rotation: pair (i, i + D/2) turns by the angle of cos[i], sin[i].
#[inline(always)]
fn rotate_half_body(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let (a, b) = head.split_at_mut(cos.len());
    for (((a, b), &c), &s) in a.iter_mut().zip(b.iter_mut()).zip(cos).zip(sin) {
        let (x, y) = (*a, *b);
        *a = x * c - y * s;
        *b = y * c + x * s;
    }
}

/// sum_i a[i] b[i] with 16 partial sums, so the loop vectorises, added as a tree: summed in
/// order they were a chain of 16 dependent scalar adds, most of a decode step's attention at
/// 2000 tokens of context.
#[inline(always)]
fn dot_one(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            acc[i] += acc[i + width];
        }
        width /= 2;
    }
    acc[0] + tail
}

/// out[j] = scale · q · rows[j·stride..][..q.len()] for each j: attention scores of one query
/// row against out.len() key rows, streamed once.
#[inline(always)]
fn scaled_dots_body(q: &[f32], rows: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
    match q.len() {
        64 => scaled_dots_fixed::<64>(q, rows, stride, scale, out),
        128 => scaled_dots_fixed::<128>(q, rows, stride, scale, out),
        d => {
            for (j, o) in out.iter_mut().enumerate() {
                *o = scale * dot_one(q, &rows[j * stride..j * stride + d]);
            }
        }
    }
}

/// scaled_dots for a head size known at compile time (the common 64 and 128): the loops
/// unroll and the query stays in registers.
#[inline(always)]
fn scaled_dots_fixed<const D: usize>(q: &[f32], rows: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
    let q = &q[..D];
    for (j, o) in out.iter_mut().enumerate() {
        *o = scale * dot_one(q, &rows[j * stride..][..D]);
    }
}

/// out += Σ_j p[j] · rows[j·stride..][..out.len()]: one query row's attention-weighted values.
#[inline(always)]
fn weighted_sum_body(p: &[f32], rows: &[f32], stride: usize, out: &mut [f32]) {
    match out.len() {
        64 => weighted_sum_fixed::<64>(p, rows, stride, out),
        128 => weighted_sum_fixed::<128>(p, rows, stride, out),
        _ => weighted_sum_any(p, rows, stride, out),
    }
}

/// weighted_sum for a head size known at compile time: the sum stays in registers across the
/// rows instead of going through `out` for each.
#[inline(always)]
fn weighted_sum_fixed<const D: usize>(p: &[f32], rows: &[f32], stride: usize, out: &mut [f32]) {
    let mut acc = [0f32; D];
    for (j, &w) in p.iter().enumerate() {
        for (a, &v) in acc.iter_mut().zip(&rows[j * stride..][..D]) {
            *a += w * v;
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o += a;
    }
}

#[inline(always)]
fn weighted_sum_any(p: &[f32], rows: &[f32], stride: usize, out: &mut [f32]) {
    let d = out.len();
    for (j, &w) in p.iter().enumerate() {
        for (o, &v) in out.iter_mut().zip(&rows[j * stride..j * stride + d]) {
            *o += w * v;
        }
    }
}


dispatch!(
    fused
    /// x = GELU(x) in place.
    gelu_slice, gelu_avx2, gelu_avx512, gelu_body, (x: &mut [f32]) -> ()
);
dispatch!(
    fused
    /// gate = SiLU(gate) · up, elementwise.
    silu_mul_slice, silu_mul_avx2, silu_mul_avx512, silu_mul_body, (gate: &mut [f32], up: &[f32]) -> ()
);
dispatch!(
    fused
    /// x = e^(x·scale - shift) in place, returning the sum: the softmax numerators of scores
    /// still to be scaled.
    exp_scaled_shift_sum, exp_scaled_shift_sum_avx2, exp_scaled_shift_sum_avx512, exp_scaled_shift_sum_body, (x: &mut [f32], scale: f32, shift: f32) -> f32
);
dispatch!(
    /// The largest value of x; -inf when x is empty.
    max, max_avx2, max_avx512, max_body, (x: &[f32]) -> f32
);
dispatch!(
    fused
    /// Σ e^(x - shift), the softmax denominator of a row of logits, in f64.
    sum_exp_shifted, sum_exp_shifted_avx2, sum_exp_shifted_avx512, sum_exp_shifted_body, (x: &[f32], shift: f32) -> f64
);
dispatch!(
    /// Σ (x - shift)² in f64: a norm's variance (or mean square) of one row.
    sum_sq_dev, sum_sq_dev_avx2, sum_sq_dev_avx512, sum_sq_dev_body, (x: &[f32], shift: f64) -> f64
);
dispatch!(
    /// Σ x in f64: a norm's mean of one row.
    sum_f64, sum_f64_avx2, sum_f64_avx512, sum_f64_body, (x: &[f32]) -> f64
);
dispatch!(
    /// out = x · inv · w elementwise (RMSNorm's output row; out may start uninitialised).
    scale_gain, scale_gain_avx2, scale_gain_avx512, scale_gain_body, (x: &[f32], inv: f32, w: &[f32], out: &mut [MaybeUninit<f32>]) -> ()
);
dispatch!(
    /// `scale_gain`, each value rounded into bf16.
    scale_gain_bf16, scale_gain_bf16_avx2, scale_gain_bf16_avx512, scale_gain_bf16_body, (x: &[f32], inv: f32, w: &[f32], out: &mut [MaybeUninit<half::bf16>]) -> ()
);
dispatch!(
    /// `scale_gain`, each value rounded to bf16 as it is written.
    scale_gain_rounded, scale_gain_rounded_avx2, scale_gain_rounded_avx512, scale_gain_rounded_body, (x: &[f32], inv: f32, w: &[f32], out: &mut [MaybeUninit<f32>]) -> ()
);
dispatch!(
    /// RoPE's rotation of one head (D) by per-pair cos and sin (D/2 each).
    rotate_half, rotate_half_avx2, rotate_half_avx512, rotate_half_body, (head: &mut [f32], cos: &[f32], sin: &[f32]) -> ()
);
dispatch!(
    /// scaled_dots by loops the compiler vectorises (any head size, any x86 or none).
    scaled_dots_loops, scaled_dots_avx2, scaled_dots_avx512, scaled_dots_body, (q: &[f32], rows: &[f32], stride: usize, scale: f32, out: &mut [f32]) -> ()
);

/// Asks for `data` to be brought into the cache, a 64-byte line at a time: a hint to run ahead
/// of a stream, with no effect on any value.
pub fn prefetch<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    for line in data.chunks((64 / size_of::<T>().max(1)).max(1)) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: a prefetch of an address inside `data`; it reads nothing a program can see.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast()) };
    }
}

/// out[j] = scale · (q · row j of `rows`), rows `stride` apart.
pub fn scaled_dots(q: &[f32], rows: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") && (q.len() == 64 || q.len() == 128) {
        assert!(out.is_empty() || rows.len() >= (out.len() - 1) * stride + q.len(), "scaled_dots: rows too short");
        // SAFETY: the CPU has AVX-512F; every row read (j < out.len(), D values at j·stride) is
        // inside `rows` (asserted) and q holds D values.
        unsafe {
            match q.len() {
                64 => scaled_dots_zmm::<4>(q, rows, stride, scale, out),
                _ => scaled_dots_zmm::<8>(q, rows, stride, scale, out),
            }
        }
        return;
    }
    scaled_dots_loops(q, rows, stride, scale, out)
}

/// scaled_dots for D = 16·V: the loops above compile to 2- and 4-wide pieces with a serial
/// 16-lane sum per key (LLVM's SLP vectoriser takes the fully unrolled fixed-D loop), so the
/// head size the decode of SmolLM2/Llama uses gets its kernel spelled out: q in V registers,
/// four keys at a time so their horizontal sums overlap.
///
/// # Safety
/// AVX-512F; q has 16·V values and rows (out.len() - 1)·stride + 16·V.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scaled_dots_zmm<const V: usize>(q: &[f32], rows: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let mut qv = [_mm512_setzero_ps(); V];
    for (c, v) in qv.iter_mut().enumerate() {
        *v = _mm512_loadu_ps(q.as_ptr().add(c * 16));
    }
    let dot = |j: usize| {
        let r = rows.as_ptr().add(j * stride);
        let mut acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(r));
        for (c, v) in qv.iter().enumerate().skip(1) {
            acc = _mm512_fmadd_ps(*v, _mm512_loadu_ps(r.add(c * 16)), acc);
        }
        acc
    };
    let n = out.len();
    let mut j = 0;
    while j + 4 <= n {
        let acc = [dot(j), dot(j + 1), dot(j + 2), dot(j + 3)];
        for (u, a) in acc.into_iter().enumerate() {
            out[j + u] = scale * _mm512_reduce_add_ps(a);
        }
        j += 4;
    }
    for (jj, o) in out.iter_mut().enumerate().skip(j) {
        *o = scale * _mm512_reduce_add_ps(dot(jj));
    }
}
dispatch!(
    /// out += Σ_j p[j] · row j of `rows`, rows `stride` apart.
    weighted_sum, weighted_sum_avx2, weighted_sum_avx512, weighted_sum_body, (p: &[f32], rows: &[f32], stride: usize, out: &mut [f32]) -> ()
);
