//! CPU attention of decode rows (a few query rows per document, over a long cache) by key
//! chunks (flash-decoding): one work item reads its chunk of K and V, every KV head, keeping a
//! softmax partial per (row, head); the partials are merged at the end, so the cache is read
//! once, in address order, and the threads share it evenly.
//!
//! Shapes: T query rows, S key rows, H heads, KV key/value heads, G = H / KV query heads per KV
//! head, D head dim; n keys of a sub-block.
//!
//! Within a chunk the keys go by sub-blocks of a few rows of the cache, read whole (all KV
//! heads) while the next sub-block is fetched. Each KV head's row is loaded once for the G
//! query heads that share it (`group_scaled_dots`, `group_weighted_sum`); the plain per-head
//! functions of vmath.rs are their reference and their fallback.
//!
//! The bf16 routes round as the prefill's products do (attention.rs): q, and k and v as the
//! kernels load them, to bf16 values (the f32 products of bf16 values are exact), and p =
//! exp(s - max) to bf16 before p·v, max being the chunk's (the CUDA kernel's p is relative to
//! its running max, the keys so far), Σ summed before the rounding.

use super::super::elem::Elem;
use super::super::kv_cache::CacheView;
use super::super::{round, vmath, Mat};
use super::{attended_intervals, block_keys, SCORES};
use crate::backend::AttnShape;
use crate::token_tree::AttnSpan;
use rayon::prelude::*;

/// Fewest keys in a decode chunk: below this a chunk's partial and merge cost more than its keys.
const DECODE_CHUNK_KEYS: usize = 64;
/// Decode work items per thread wanted: several, so a thread slowed by another process is caught
/// up by the others.
const DECODE_ITEMS_PER_THREAD: usize = 4;
/// Bytes of cache rows in a sub-block: the group kernels run over one while it is in L1, and
/// the next is fetched meanwhile. 8-32 KB measured alike; 16 KB is 21 rows of SmolLM2's cache.
const DECODE_SUB_BLOCK_BYTES: usize = 16 << 10;

/// One decode work item: keys [c0, c1) of every KV head for the rows of block `block`.
pub(in crate::backend::cpu) struct DecodeChunk {
    pub block: usize,
    pub c0: usize,
    pub c1: usize,
}

/// The work items of decode blocks: each block's keys cut into chunks of at least
/// DECODE_CHUNK_KEYS, about DECODE_ITEMS_PER_THREAD per thread in all; a block's chunks
/// consecutive, in key order.
pub(in crate::backend::cpu) fn decode_chunks(spans: &[AttnSpan], s: AttnShape, blocks: &[(usize, usize)]) -> Vec<DecodeChunk> {
    let want = rayon::current_num_threads() * DECODE_ITEMS_PER_THREAD;
    let per_block = want.div_ceil(blocks.len().max(1));
    let mut chunks = vec![];
    for (bi, &(t0, t1)) in blocks.iter().enumerate() {
        let (first, end) = block_keys(spans, s, t0, t1);
        let n = per_block.min((end - first).div_ceil(DECODE_CHUNK_KEYS)).max(1);
        let len = (end - first).div_ceil(n);
        chunks.extend((first..end).step_by(len).map(|c0| DecodeChunk { block: bi, c0, c1: (c0 + len).min(end) }));
    }
    chunks
}

/// Attention of decode rows (every block at most a few rows) by key chunks; see the module doc.
/// Same result as the prefill path's dot products up to f32 rounding; rounded to bf16 as the
/// module doc says where `round`.
#[allow(clippy::too_many_arguments)]
pub(super) fn decode_attention<E: Elem>(q: &Mat, k: CacheView<E>, v: CacheView<E>, s: AttnShape, spans: &[AttnSpan], blocks: &[(usize, usize)], round: bool) -> Mat {
    let (h, d) = (s.heads, s.head_dim);
    let q = super::super::rounded_if(q, round);
    let q = &*q;
    let g = h / s.kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    // A bf16 cache holds k and v rounded already: the kernels skip the rounding per step.
    let round_kv = round && !E::BF16;
    let chunks = decode_chunks(spans, s, blocks);
    // Per chunk, per (row of its block, head): max score, Σ e^(score - max), and the
    // unnormalised output Σ e^(score - max)·v (D): (rows, H, D + 2).
    super::super::spin::keep_workers_awake();
    let partials: Vec<Vec<f32>> = chunks
        .par_iter()
        .map(|c| {
            let (t0, t1) = blocks[c.block];
            let mut part = vec![0f32; (t1 - t0) * h * (d + 2)];
            SCORES.with(|scores| {
                let mut scores = scores.borrow_mut();
                for (t, part) in (t0..t1).zip(part.chunks_mut(h * (d + 2))) {
                    let segs = attended_intervals(&spans[t], t + s.key_offset, 0, k.rows).map(|(a, b)| (a.max(c.c0), b.min(c.c1))).into_iter().filter(|(a, b)| a < b);
                    let nk: usize = segs.clone().map(|(a, b)| b - a).sum();
                    if scores.len() < h * nk {
                        scores.resize(h * nk, 0.0);
                    }
                    let scores = &mut scores[..h * nk]; // (H, nk)
                    let qrow = &q.data[t * q.cols..][..h * d]; // (H, D)
                    let mut at = 0;
                    for (a, b) in segs.clone() {
                        sub_blocks(k, a, b, s.kv_heads, |j0, n, kv| {
                            let out = &mut scores[kv * g * nk + at + j0 - a..];
                            group_scaled_dots(&qrow[kv * g * d..][..g * d], d, &k.data[j0 * k.cols + kv * d..], k.cols, scale, n, out, nk, round_kv);
                        });
                        at += b - a;
                    }
                    for (p, sc) in part.chunks_mut(d + 2).zip(scores.chunks_mut(nk.max(1))) {
                        let max = vmath::max(&sc[..nk]);
                        p[0] = max;
                        p[1] = if nk > 0 { vmath::exp_scaled_shift_sum(&mut sc[..nk], 1.0, max) } else { 0.0 };
                        if round {
                            round::round_in_place(&mut sc[..nk]);
                        }
                    }
                    let mut at = 0;
                    for (a, b) in segs {
                        sub_blocks(v, a, b, s.kv_heads, |j0, n, kv| {
                            let p = &scores[kv * g * nk + at + j0 - a..];
                            let out = &mut part[kv * g * (d + 2) + 2..];
                            group_weighted_sum(g, p, nk, &v.data[j0 * v.cols + kv * d..], v.cols, n, out, d, d + 2, round_kv);
                        });
                        at += b - a;
                    }
                }
            });
            part
        })
        .collect();
    // Merge each (row, head)'s chunks: the chunks of one block are consecutive.
    let mut out = vec![0f32; q.rows * h * d]; // (T, H·D)
    let mut i = 0;
    while i < chunks.len() {
        let bi = chunks[i].block;
        let j = (i..chunks.len()).find(|&j| chunks[j].block != bi).unwrap_or(chunks.len());
        let (t0, t1) = blocks[bi];
        for (r, t) in (t0..t1).enumerate() {
            for hh in 0..h {
                let at = (r * h + hh) * (d + 2);
                let max = partials[i..j].iter().map(|p| p[at]).fold(f32::NEG_INFINITY, f32::max);
                let o = &mut out[(t * h + hh) * d..][..d];
                let mut sum = 0f32;
                for p in &partials[i..j] {
                    let w = vmath::exp_one(p[at] - max);
                    sum += w * p[at + 1];
                    o.iter_mut().zip(&p[at + 2..at + 2 + d]).for_each(|(o, x)| *o += w * x);
                }
                // Every row attends its own key, so some chunk's sum is positive.
                let inv = 1.0 / sum;
                o.iter_mut().for_each(|x| *x *= inv);
            }
        }
        i = j;
    }
    Mat::new(q.rows, h * d, out)
}

/// Calls `f(j0, n, kv)` for each sub-block [j0, j0 + n) of rows [a, b) of the cache `m`
/// (S, KV·D), in order, and each KV head. The next sub-block is asked for a KV-th at a time,
/// before each head's call: the pass over the cache is one stream in address order, running a
/// sub-block ahead of the kernels, with the requests spread between them (all at once, they
/// fill the core's miss buffers and stall it with the kernel's own work still to do).
fn sub_blocks<E>(m: CacheView<E>, a: usize, b: usize, kvh: usize, mut f: impl FnMut(usize, usize, usize)) {
    let sub = (DECODE_SUB_BLOCK_BYTES / (m.cols * size_of::<E>()).max(1)).max(1);
    vmath::prefetch(&m.data[a * m.cols..(a + sub).min(b) * m.cols]);
    for j0 in (a..b).step_by(sub) {
        let n = sub.min(b - j0);
        let next = &m.data[(j0 + n) * m.cols..(j0 + n + sub).min(b) * m.cols];
        let piece = next.len().div_ceil(kvh);
        for kv in 0..kvh {
            vmath::prefetch(&next[(kv * piece).min(next.len())..((kv + 1) * piece).min(next.len())]);
            f(j0, n, kv);
        }
    }
}

/// Heads of a KV group run together by the D = 64 kernels: 3 queries (or sums) are 12
/// registers, next to 4 of a key row and 12 accumulators. At D = 128 one head is 8.
const GROUP_TILE: usize = 3;

/// Heads per call of the AVX-512 group kernels at head size d, where the CPU has them and d
/// is one they are built for (64, 128); None where the per-head fallback runs.
fn zmm_tile(d: usize) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        return match d {
            64 => Some(GROUP_TILE),
            128 => Some(1),
            _ => None,
        };
    }
    None
}

/// out[i·out_stride + j] = scale · (q_i · row j of `rows`) for j < n and each of the G query
/// heads of one KV group, q (G, D); rows `stride` apart, their values rounded to bf16 first
/// where `round`. Each row is loaded once for the group.
#[allow(clippy::too_many_arguments)]
pub(in crate::backend::cpu) fn group_scaled_dots<E: Elem>(q: &[f32], d: usize, rows: &[E], stride: usize, scale: f32, n: usize, out: &mut [f32], out_stride: usize, round: bool) {
    let g = q.len() / d;
    if n == 0 || g == 0 {
        return;
    }
    assert!(rows.len() >= (n - 1) * stride + d && out.len() >= (g - 1) * out_stride + n, "group_scaled_dots: slices too short");
    if let Some(tile_of) = zmm_tile(d) {
        for i in (0..g).step_by(tile_of) {
            // SAFETY: AVX-512F is present (zmm_tile); heads i..i + tile of q hold D values each,
            // the n rows are inside `rows` and their outputs inside `out` (asserted above).
            #[cfg(target_arch = "x86_64")]
            unsafe {
                let (qp, op) = (q.as_ptr().add(i * d), out.as_mut_ptr().add(i * out_stride));
                let rp = rows.as_ptr();
                let tile = tile_of.min(g - i);
                match round {
                    true => zmm::group_dots_of::<E, true>(d, tile, qp, rp, stride, scale, n, op, out_stride),
                    false => zmm::group_dots_of::<E, false>(d, tile, qp, rp, stride, scale, n, op, out_stride),
                }
            }
        }
        return;
    }
    match E::as_f32(rows).filter(|_| !round) {
        Some(rows) => {
            for (i, qh) in q.chunks_exact(d).enumerate() {
                vmath::scaled_dots(qh, rows, stride, scale, &mut out[i * out_stride..][..n]);
            }
        }
        None => {
            for (i, qh) in q.chunks_exact(d).enumerate() {
                for (j, o) in out[i * out_stride..][..n].iter_mut().enumerate() {
                    *o = scale * qh.iter().zip(&rows[j * stride..][..d]).map(|(a, b)| a * value(*b, round)).sum::<f32>();
                }
            }
        }
    }
}

/// A cache value as the group kernels multiply it: widened, and rounded to bf16 where `round`.
#[inline(always)]
fn value<E: Elem>(x: E, round: bool) -> f32 {
    match round {
        true => round::round_f32(x.widen()),
        false => x.widen(),
    }
}

/// out[i·out_stride..][..D] += Σ_j p[i·p_stride + j] · row j of `rows`, j < n, for each of the
/// `g` query heads of one KV group; rows `stride` apart, their values rounded to bf16 first
/// where `round`. Each row is loaded once for the group.
#[allow(clippy::too_many_arguments)]
pub(in crate::backend::cpu) fn group_weighted_sum<E: Elem>(g: usize, p: &[f32], p_stride: usize, rows: &[E], stride: usize, n: usize, out: &mut [f32], d: usize, out_stride: usize, round: bool) {
    if n == 0 || g == 0 {
        return;
    }
    let fits = rows.len() >= (n - 1) * stride + d && p.len() >= (g - 1) * p_stride + n && out.len() >= (g - 1) * out_stride + d;
    assert!(fits, "group_weighted_sum: slices too short");
    if let Some(tile_of) = zmm_tile(d) {
        for i in (0..g).step_by(tile_of) {
            // SAFETY: AVX-512F is present (zmm_tile); the n rows are inside `rows`, heads
            // i..i + tile's n weights inside p and their D outputs inside `out` (asserted above).
            #[cfg(target_arch = "x86_64")]
            unsafe {
                let (pp, op) = (p.as_ptr().add(i * p_stride), out.as_mut_ptr().add(i * out_stride));
                let rp = rows.as_ptr();
                let tile = tile_of.min(g - i);
                match round {
                    true => zmm::group_sums_of::<E, true>(d, tile, pp, p_stride, rp, stride, n, op, out_stride),
                    false => zmm::group_sums_of::<E, false>(d, tile, pp, p_stride, rp, stride, n, op, out_stride),
                }
            }
        }
        return;
    }
    for i in 0..g {
        let (p, out) = (&p[i * p_stride..][..n], &mut out[i * out_stride..][..d]);
        match E::as_f32(rows).filter(|_| !round) {
            Some(rows) => vmath::weighted_sum(p, rows, stride, out),
            None => {
                for (j, &w) in p.iter().enumerate() {
                    out.iter_mut().zip(&rows[j * stride..][..d]).for_each(|(o, x)| *o += w * value(*x, round));
                }
            }
        }
    }
}

/// The group kernels for D = 16·V (4 registers a row at D = 64, 8 at 128), over cache values
/// of type E widened as they are loaded.
#[cfg(target_arch = "x86_64")]
mod zmm {
    use super::Elem;
    use std::arch::x86_64::*;

    /// [Σa, Σb, Σc, Σd] of four vectors: pairs interleaved and added, then the 128-bit lanes.
    #[inline(always)]
    unsafe fn sum4(a: __m512, b: __m512, c: __m512, d: __m512) -> __m128 {
        let ab = _mm512_castps_pd(_mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b)));
        let cd = _mm512_castps_pd(_mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d)));
        let x = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(ab, cd)), _mm512_castpd_ps(_mm512_unpackhi_pd(ab, cd)));
        let lo = _mm512_castps512_ps256(x);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1));
        let y = _mm256_add_ps(lo, hi);
        _mm_add_ps(_mm256_castps256_ps128(y), _mm256_extractf128_ps(y, 1))
    }

    /// A row of 16V values, each rounded to bf16 where ROUND. Loops, not `array::from_fn`:
    /// its closure with the rounding in it was not inlined, and neither were the intrinsics
    /// in it (a call per instruction: decode steps 4x slower).
    #[inline(always)]
    unsafe fn row<E: Elem, const V: usize, const ROUND: bool>(r: *const E) -> [__m512; V] {
        let mut x = [_mm512_setzero_ps(); V];
        for (c, x) in x.iter_mut().enumerate() {
            *x = E::load16(r.add(c * 16));
        }
        if ROUND {
            for x in x.iter_mut() {
                *x = super::round::avx512::round16(*x);
            }
        }
        x
    }

    #[inline(always)]
    unsafe fn dot<const V: usize>(q: &[__m512; V], r: &[__m512; V]) -> __m512 {
        let mut a = _mm512_mul_ps(q[0], r[0]);
        for c in 1..V {
            a = _mm512_fmadd_ps(q[c], r[c], a);
        }
        a
    }

    /// `group_dots` of `tile` heads (at most zmm_tile(d)) at the head dim's register width.
    ///
    /// # Safety
    /// As `group_dots` for the V and TG chosen (d = 16V).
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn group_dots_of<E: Elem, const ROUND: bool>(d: usize, tile: usize, q: *const f32, rows: *const E, stride: usize, scale: f32, n: usize, out: *mut f32, out_stride: usize) {
        match (d, tile) {
            (64, 3) => group_dots::<E, 4, 3, ROUND>(q, rows, stride, scale, n, out, out_stride),
            (64, 2) => group_dots::<E, 4, 2, ROUND>(q, rows, stride, scale, n, out, out_stride),
            (64, _) => group_dots::<E, 4, 1, ROUND>(q, rows, stride, scale, n, out, out_stride),
            _ => group_dots::<E, 8, 1, ROUND>(q, rows, stride, scale, n, out, out_stride),
        }
    }

    /// `group_sums` of `tile` heads, as `group_dots_of` chooses.
    ///
    /// # Safety
    /// As `group_sums` for the V and TG chosen (d = 16V).
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn group_sums_of<E: Elem, const ROUND: bool>(d: usize, tile: usize, p: *const f32, p_stride: usize, rows: *const E, stride: usize, n: usize, out: *mut f32, out_stride: usize) {
        match (d, tile) {
            (64, 3) => group_sums::<E, 4, 3, ROUND>(p, p_stride, rows, stride, n, out, out_stride),
            (64, 2) => group_sums::<E, 4, 2, ROUND>(p, p_stride, rows, stride, n, out, out_stride),
            (64, _) => group_sums::<E, 4, 1, ROUND>(p, p_stride, rows, stride, n, out, out_stride),
            _ => group_sums::<E, 8, 1, ROUND>(p, p_stride, rows, stride, n, out, out_stride),
        }
    }

    /// Scores of TG heads (q: TG × 16V) over n rows, four keys at a time.
    ///
    /// # Safety
    /// AVX-512F; q holds TG·16V values, rows n rows of 16V `stride` apart, out TG rows of n
    /// `out_stride` apart.
    #[target_feature(enable = "avx512f")]
    unsafe fn group_dots<E: Elem, const V: usize, const TG: usize, const ROUND: bool>(q: *const f32, rows: *const E, stride: usize, scale: f32, n: usize, out: *mut f32, out_stride: usize) {
        let qv: [[__m512; V]; TG] = std::array::from_fn(|i| row::<f32, V, false>(q.add(i * 16 * V)));
        let sv = _mm_set1_ps(scale);
        let mut j = 0;
        while j + 4 <= n {
            let mut acc = [[_mm512_setzero_ps(); 4]; TG]; // [head][key]
            for u in 0..4 {
                let r = row::<E, V, ROUND>(rows.add((j + u) * stride));
                for (a, qh) in acc.iter_mut().zip(&qv) {
                    a[u] = dot(qh, &r);
                }
            }
            for (i, a) in acc.iter().enumerate() {
                _mm_storeu_ps(out.add(i * out_stride + j), _mm_mul_ps(sv, sum4(a[0], a[1], a[2], a[3])));
            }
            j += 4;
        }
        for j in j..n {
            let r = row::<E, V, ROUND>(rows.add(j * stride));
            for (i, qh) in qv.iter().enumerate() {
                *out.add(i * out_stride + j) = scale * _mm512_reduce_add_ps(dot(qh, &r));
            }
        }
    }

    /// out_i (16V) += Σ_j p_i[j] · row j for TG heads.
    ///
    /// # Safety
    /// AVX-512F; p holds TG rows of n weights `p_stride` apart, rows n rows of 16V `stride`
    /// apart, out TG rows of 16V `out_stride` apart.
    #[target_feature(enable = "avx512f")]
    unsafe fn group_sums<E: Elem, const V: usize, const TG: usize, const ROUND: bool>(p: *const f32, p_stride: usize, rows: *const E, stride: usize, n: usize, out: *mut f32, out_stride: usize) {
        let mut acc = [[_mm512_setzero_ps(); V]; TG];
        for j in 0..n {
            let r = row::<E, V, ROUND>(rows.add(j * stride));
            for (i, a) in acc.iter_mut().enumerate() {
                let w = _mm512_set1_ps(*p.add(i * p_stride + j));
                for c in 0..V {
                    a[c] = _mm512_fmadd_ps(w, r[c], a[c]);
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            for (c, a) in a.iter().enumerate() {
                let o = out.add(i * out_stride + c * 16);
                _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), *a));
            }
        }
    }
}
