//! CPU attention over token-tree spans: work items of blocks of one document's query rows, all
//! heads; per head scores = q·kᵀ over the block's keys, a softmax over each row's attended
//! intervals (the rest of the row set to 0 by slice), out = p·v scaled by 1/Σ.
//!
//! Shapes: T query rows, S key rows, H heads, KV key/value heads, D head dim; B rows of a
//! block, K keys of a block.
//!
//! Prefill blocks run both products through gemm.rs's micro-kernel, over each KV head's K and
//! V packed once per call (every block of the head reads its window of them), each row tile
//! only as far as its rows attend (the causal triangle's far side and the keys after a block's
//! last choice are never multiplied). Decode (a few rows) streams the keys as dot products
//! instead: packing K would cost more than the product. A call of decode rows only goes to
//! decode.rs (key chunks, flash-decoding), a child module: it shares this one's intervals and scores.
//!
//! The bf16 routes round where the CUDA kernel (kernels/attention.cu) does: q, k and v to bf16
//! as they are read, the unnormalised probabilities p = exp(s - max) to bf16 before p·v (Σ
//! summed from the f32 p before), products summed in f32; the op rounds the output. On
//! `Bf16Dot` both products are `vdpbf16ps` GEMMs (bf16.rs), every block's, so the keys and
//! values are read only as packed; `Bf16Widened` multiplies the rounded values in f32 (the
//! products of two bf16 values are exact there) through the same path as f32.

mod bf16;
pub(super) mod decode;

use super::gemm::{self, Kernel};
use super::elem::Elem;
use super::kv_cache::CacheView;
use super::route::CpuRoute;
use super::{gemm_bf16, round, vmath, Mat, SendPtr};
use crate::backend::AttnShape;
use crate::token_tree::AttnSpan;
use rayon::prelude::*;
use std::cell::RefCell;

/// Query rows per block up to which attention runs as dot products and row updates (decode
/// steps) instead of GEMMs.
const FEW_QUERY_ROWS: usize = 4;

/// Query rows per attention work item: scores for a block are (ATTN_BLOCK, keys) floats.
pub(super) const ATTN_BLOCK: usize = 64;


thread_local! {
    /// Each worker's (B, K) scores buffer, kept between blocks and calls: grown, never refilled.
    pub(super) static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Each worker's (B, H·D) block output before it is rounded into bf16 rows (`Bf16Dot`).
    static BLOCK_OUT: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Every KV head's keys and values in gemm.rs's panels, for the blocks' products.
struct PackedKv {
    /// Per KV head: its (S, D) keys as the matrix of `pack` (panels of NR keys).
    keys: Vec<Vec<f32>>,
    /// Per KV head: vᵀ (D, S) (panels of NR head columns, S deep).
    values: Vec<Vec<f32>>,
    /// Key rows: the values' panel depth.
    keys_len: usize,
    /// The keys and values are their bf16 roundings, and p is rounded (`Bf16Widened`).
    rounded: bool,
}

/// K and V packed for the products of the call's route.
enum Packed {
    F32(PackedKv),
    Bf16(bf16::PackedKv),
}

impl PackedKv {
    fn new(k: CacheView<f32>, v: CacheView<f32>, s: AttnShape, rounded: bool) -> PackedKv {
        let (kernel, d) = (Kernel::detect(), s.head_dim);
        // Keys and values of each KV head apart: SmolLM2's 3 KV heads are 6 tasks on 2 threads,
        // not 3 (one thread packing two heads while the other waits).
        let mut packed: Vec<Vec<f32>> = (0..2 * s.kv_heads)
            .into_par_iter()
            .map(|i| match (i / 2, i % 2) {
                (kv, 0) => gemm::pack_rows(kernel, &k.data[kv * d..], k.rows, d, k.cols),
                (kv, _) => gemm::pack_cols(kernel, &v.data[kv * d..], v.rows, d, v.cols),
            })
            .map(|mut p| {
                // Rounding commutes with packing (the padding is 0 either way).
                if rounded {
                    round::round_in_place(&mut p);
                }
                p
            })
            .collect();
        let values = (0..s.kv_heads).map(|kv| std::mem::take(&mut packed[2 * kv + 1])).collect();
        let keys = (0..s.kv_heads).map(|kv| std::mem::take(&mut packed[2 * kv])).collect();
        PackedKv { keys, values, keys_len: k.rows, rounded }
    }
}

/// Whether every block is a few rows (decode steps): then attention goes by key chunks.
fn is_decode(blocks: &[(usize, usize)]) -> bool {
    blocks.iter().all(|(t0, t1)| t1 - t0 <= FEW_QUERY_ROWS)
}

/// out (T, H·D) = softmax(q kᵀ / √D over each row's spans) v; q (T, H·D), k and v (S, KV·D) in
/// the type they are kept in (f32, or a generation cache's narrower one); shapes as
/// `shapes::attention` checked them. Rounded as `route` rounds (see the module doc), the f32
/// output itself left to the op; with `as_rows`, a `Bf16Dot` prefill returns it rounded, as
/// the bf16 rows the output projection multiplies (never written whole as f32).
pub(super) fn attention<E: Elem>(q: &Mat, k: CacheView<E>, v: CacheView<E>, s: AttnShape, spans: &[AttnSpan], route: CpuRoute, as_rows: bool) -> Mat {
    let blocks = query_blocks(spans);
    if is_decode(&blocks) {
        return decode::decode_attention(q, k, v, s, spans, &blocks, route.rounds());
    }
    let as_rows = as_rows && route == CpuRoute::Bf16Dot;
    // The micro-kernel packs f32: a narrower cache (rows after a cached prompt) is widened first.
    match (E::as_f32(k.data), E::as_f32(v.data)) {
        (Some(kd), Some(vd)) => prefill(q, CacheView { rows: k.rows, cols: k.cols, data: kd }, CacheView { rows: v.rows, cols: v.cols, data: vd }, s, spans, &blocks, route, as_rows),
        _ => {
            let (k, v) = (k.widen(), v.widen());
            prefill(q, (&k).into(), (&v).into(), s, spans, &blocks, route, as_rows)
        }
    }
}

/// `attention` of calls with a block of more than FEW_QUERY_ROWS rows: its products read the
/// packed K and V (every block's, on the bf16 routes: only the packed K and V are rounded).
#[allow(clippy::too_many_arguments)]
fn prefill(q: &Mat, k: CacheView<f32>, v: CacheView<f32>, s: AttnShape, spans: &[AttnSpan], blocks: &[(usize, usize)], route: CpuRoute, as_rows: bool) -> Mat {
    let (h, d) = (s.heads, s.head_dim);
    let packed = match route {
        CpuRoute::Bf16Dot => Packed::Bf16(bf16::PackedKv::new(q, k, v, s)),
        _ => Packed::F32(PackedKv::new(k, v, s, route.rounds())),
    };
    // The widened route multiplies q's bf16 values; `Bf16Dot`'s operands rounded q once, above.
    let q = super::rounded_if(q, route == CpuRoute::Bf16Widened);
    let q = &*q;
    // Work items: blocks of query rows of one document, every head; each writes its own rows of
    // out (at `out`, the block's first row, rows H·D apart), and every row attends at least its
    // own key, so all of them are written. The block's intervals are worked out once for its heads.
    let run_block = |t0: usize, t1: usize, out: SendPtr| {
        SCORES.with(|scores| {
            let mut scores = scores.borrow_mut();
            let b = Block::new(spans, s, t0, t1, route.rounds());
            for hh in 0..h {
                // SAFETY: out's rows are this item's alone (the caller's contract).
                unsafe { block_head(q, k, v, &packed, s, &b, hh, out, &mut scores) };
            }
        })
    };
    if as_rows {
        // The output projection's bf16 rows: each block's rows made in a scratch and rounded
        // into them while in cache, never written whole as f32 (the op's rounding, done here).
        // SAFETY: every block's rows are rounded whole into its part of the rows.
        let rows = unsafe {
            gemm_bf16::Rows::from_blocks(q.rows, h * d, blocks, |(t0, t1), kp, part| {
                BLOCK_OUT.with(|buf| {
                    let mut buf = buf.borrow_mut();
                    if buf.len() < (t1 - t0) * h * d {
                        buf.resize((t1 - t0) * h * d, 0.0);
                    }
                    run_block(t0, t1, SendPtr(buf.as_mut_ptr()));
                    for (dst, src) in part.chunks_exact_mut(kp).zip(buf.chunks_exact(h * d)) {
                        round::round_into_uninit(src, &mut dst[..h * d]);
                    }
                })
            })
        };
        return Mat::narrow(rows, (q.rows, h * d));
    }
    let len = q.rows * h * d;
    let mut out: Vec<f32> = Vec::with_capacity(len); // (T, H·D)
    let out_ptr = SendPtr(out.as_mut_ptr());
    // SAFETY: blocks are disjoint in rows, so no two items write the same element.
    blocks.par_iter().for_each(|&(t0, t1)| {
        let out = out_ptr; // the whole SendPtr into the closure, not its raw field
        run_block(t0, t1, SendPtr(unsafe { out.0.add(t0 * h * d) }))
    });
    // SAFETY: the blocks cover rows [0, T) for every head, each writing its (rows, D) slice.
    unsafe { out.set_len(len) };
    Mat::new(q.rows, h * d, out)
}

/// The keys rows [t0, t1) can see: from their first row's first key to one past the last any
/// of them attends (an interval's end or its own key).
pub(super) fn block_keys(spans: &[AttnSpan], s: AttnShape, t0: usize, t1: usize) -> (usize, usize) {
    let first = spans[t0..t1].iter().map(|sp| sp.first_key() as usize).min().unwrap_or(0);
    let end = spans[t0..t1].iter().map(|sp| (sp.shared_end as usize).max(sp.path_end as usize)).max().unwrap_or(0).max(t1 + s.key_offset);
    (first, end)
}

/// Query rows cut into blocks of at most ATTN_BLOCK rows that never cross a document boundary,
/// so a block's key range is its own document's keys, not its neighbour's too.
pub(super) fn query_blocks(spans: &[AttnSpan]) -> Vec<(usize, usize)> {
    let mut blocks = vec![];
    let mut t0 = 0;
    for t in 1..=spans.len() {
        if t == spans.len() || t - t0 == ATTN_BLOCK || spans[t].first_key() != spans[t0].first_key() {
            blocks.push((t0, t));
            t0 = t;
        }
    }
    blocks
}

/// A row's attended keys: at most three disjoint, ordered, non-touching intervals; the unused
/// ones empty at the last one's end, so the gaps between consecutive intervals and after the
/// last are exactly the keys it does not attend.
pub(super) type Intervals = [(usize, usize); 3];

/// The keys row `row` attends (its span's shared, path and own [own_start, row] intervals)
/// relative to key k0, clipped to [0, nk).
pub(super) fn attended_intervals(sp: &AttnSpan, row: usize, k0: usize, nk: usize) -> Intervals {
    let clip = |a: u32, b: usize| ((a as usize).saturating_sub(k0).min(nk), b.saturating_sub(k0).min(nk));
    let mut iv = [clip(sp.shared_start, sp.shared_end as usize), clip(sp.path_start, sp.path_end as usize), clip(sp.own_start, row + 1)];
    iv.sort_unstable();
    let mut out = [(0, 0); 3];
    let mut n = 0;
    for (a, b) in iv.into_iter().filter(|(a, b)| a < b) {
        if n > 0 && a <= out[n - 1].1 {
            // Overlapping or touching: one interval.
            out[n - 1].1 = out[n - 1].1.max(b);
        } else {
            out[n] = (a, b);
            n += 1;
        }
    }
    let end = if n > 0 { out[n - 1].1 } else { 0 };
    out[n..].fill((end, end));
    out
}

/// A block of query rows [t0, t1) and what every head's products need of its spans.
struct Block {
    t0: usize,
    t1: usize,
    /// The first key of the products: a whole panel of keys where they run as GEMMs.
    k0: usize,
    /// Keys from k0 to one past the last any row attends.
    nk: usize,
    /// Per row, the keys it attends relative to k0 (`attended_intervals`).
    intervals: Vec<Intervals>,
    /// The products run through the packed K and V (more than FEW_QUERY_ROWS rows, or any
    /// block on a rounding route).
    gemm: bool,
    /// The key ranges (relative to k0, whole panels) the products multiply: [0, nk) less the
    /// runs of two or more panels no row attends. An extract pass's branch rows attend their
    /// document's kept prompt and their kept path, in the kept rows before the batch's, and
    /// their own rows at the end; between lie the other documents' and branches' keys.
    runs: Vec<(usize, usize)>,
}

impl Block {
    fn new(spans: &[AttnSpan], s: AttnShape, t0: usize, t1: usize, always_gemm: bool) -> Block {
        let gemm = always_gemm || t1 - t0 > FEW_QUERY_ROWS;
        let (first, k1) = block_keys(spans, s, t0, t1);
        let nr = Kernel::detect().nr();
        // The products start at a panel of keys: the few keys before the block's first are masked.
        let k0 = if gemm { first / nr * nr } else { first };
        let nk = k1 - k0;
        let intervals: Vec<_> = (t0..t1).map(|t| attended_intervals(&spans[t], t + s.key_offset, k0, nk)).collect();
        let runs = if gemm { attended_runs(&intervals, nk, nr) } else { vec![(0, nk)] };
        Block { t0, t1, k0, nk, intervals, gemm, runs }
    }

    /// One past the last key (relative to k0) that any of the block's rows [r0, r1) attends.
    fn keys_attended_by(&self, r0: usize, r1: usize) -> usize {
        self.intervals[r0..r1].iter().map(|iv| iv[2].1).max().unwrap_or(0)
    }
}

/// [0, nk) less the whole panels of `nr` keys that no row's interval touches, where two or
/// more lie together (one panel skipped would save less than a product's call costs).
fn attended_runs(intervals: &[Intervals], nk: usize, nr: usize) -> Vec<(usize, usize)> {
    let mut iv: Vec<(usize, usize)> = intervals.iter().flatten().copied().filter(|(a, b)| a < b).collect();
    iv.sort_unstable();
    let mut runs: Vec<(usize, usize)> = vec![];
    let mut start = 0;
    let mut covered = 0usize; // one past the last attended key so far
    for (a, b) in iv {
        let (g0, g1) = (covered.div_ceil(nr) * nr, a / nr * nr);
        if g1 >= g0 + 2 * nr {
            runs.push((start, g0));
            start = g1;
        }
        covered = covered.max(b);
    }
    runs.push((start, nk));
    runs
}

/// Each row of scores (rows, nk) in place: e^(s·scale - max·scale) over its intervals (rounded
/// to bf16 where `round_p`), 0 outside them; the reciprocal of its sum (unrounded) into inv.
fn softmax(scores: &mut [f32], nk: usize, intervals: &[Intervals], scale: f32, round_p: bool, inv: &mut [f32]) {
    for ((row, inv), iv) in scores.chunks_mut(nk).zip(inv.iter_mut()).zip(intervals) {
        let shift = row_max(row, iv) * scale;
        *inv = inv_sum(iv, |a, e| vmath::exp_scaled_shift_sum(&mut row[a..e], scale, shift));
        if round_p {
            iv.iter().for_each(|&(a, e)| round::round_in_place(&mut row[a..e]));
        }
        fill_outside(row, iv, 0.0);
    }
}

/// The largest score of a row over its intervals.
fn row_max(row: &[f32], iv: &Intervals) -> f32 {
    iv.iter().filter(|(a, e)| a < e).map(|&(a, e)| vmath::max(&row[a..e])).fold(f32::NEG_INFINITY, f32::max)
}

/// 1 / the sum of a row's numerators, `numerators(a, e)` making those of interval [a, e) and
/// returning their sum: the intervals' sums added in order, the empty ones left out (their 0
/// changes no bit of the total). Every prefill softmax sums this way.
fn inv_sum(iv: &Intervals, mut numerators: impl FnMut(usize, usize) -> f32) -> f32 {
    1.0 / iv.iter().filter(|(a, e)| a < e).map(|&(a, e)| numerators(a, e)).sum::<f32>()
}

/// row's values outside its intervals (before, between and after them) = zero.
fn fill_outside<T: Copy>(row: &mut [T], iv: &Intervals, zero: T) {
    row[..iv[0].0].fill(zero);
    for w in iv.windows(2) {
        row[w[0].1..w[1].0].fill(zero);
    }
    row[iv[2].1..].fill(zero);
}

/// Attention of block `b`'s rows for head hh (see the module doc): through `packed` when the
/// block runs as GEMMs, by dot products otherwise. Each row's probabilities are left
/// unnormalised through p·v and its output scaled by 1/Σ after: D values, not the row's keys.
///
/// # Safety
/// `out` points to the block's first row of (rows, H·D) floats, and no other caller writes the
/// block's rows of head hh.
#[allow(clippy::too_many_arguments)]
unsafe fn block_head(q: &Mat, k: CacheView<f32>, v: CacheView<f32>, packed: &Packed, s: AttnShape, b: &Block, hh: usize, out: SendPtr, scratch: &mut Vec<f32>) {
    let (h, d) = (s.heads, s.head_dim);
    let kv = hh / (h / s.kv_heads);
    let (t0, rows, k0, nk) = (b.t0, b.t1 - b.t0, b.k0, b.nk);
    let kernel = Kernel::detect();
    if scratch.len() < rows * (nk + 1) {
        scratch.resize(rows * (nk + 1), 0.0);
    }
    let (scores, inv) = scratch[..rows * (nk + 1)].split_at_mut(rows * nk); // (B, K), (B,)
    let scale = 1.0 / (d as f32).sqrt();
    // The scores' scale: the dot products apply it, the GEMM leaves it to the softmax.
    let score_scale = match (b.gemm, packed) {
        (true, Packed::F32(packed)) => {
            for &(c0, c1) in &b.runs {
                let panel = (k0 + c0) / kernel.nr() * d * kernel.nr(); // the panel holding key k0 + c0
                // SAFETY: q holds rows t0.. of H·D values (head hh's D at hh·D), scores (rows, nk),
                // the packed keys nk keys from k0 (c0 a multiple of NR); a tile leaves columns past
                // its rows' last attended key unwritten, and the softmax below writes every column
                // outside the intervals (those between the runs too).
                gemm::matmul_tiles(kernel, q.data.as_ptr().add(t0 * q.cols + hh * d), q.cols, rows, d, packed.keys[kv].as_ptr().add(panel), d * kernel.nr(), c1 - c0, scores.as_mut_ptr().add(c0), nk, false, |r0, r1| {
                    (b.keys_attended_by(r0, r1).min(c1).saturating_sub(c0), d)
                });
            }
            scale
        }
        (true, Packed::Bf16(packed)) => {
            packed.scores(s, b, hh, scores);
            scale
        }
        (false, _) => {
            for (i, row) in scores.chunks_mut(nk).enumerate() {
                let qrow = &q.data[(t0 + i) * q.cols + hh * d..][..d];
                for (a, e) in b.intervals[i].into_iter().filter(|(a, e)| a < e) {
                    vmath::scaled_dots(qrow, &k.data[(k0 + a) * k.cols + kv * d..], k.cols, scale, &mut row[a..e]);
                }
            }
            1.0
        }
    };
    let round_p = matches!(packed, Packed::F32(p) if p.rounded);
    // The block's rows of head hh in out: row i at out + i·H·D + hh·D.
    let out_row = |i: usize| std::slice::from_raw_parts_mut(out.0.add(i * h * d + hh * d), d);
    match (b.gemm, packed) {
        // SAFETY: the caller's contract is bf16.rs's.
        (true, Packed::Bf16(packed)) => packed.softmax_weighted(scores, b, kv, score_scale, inv, out.0.add(hh * d), h * d),
        (true, Packed::F32(packed)) => {
            softmax(scores, nk, &b.intervals, score_scale, round_p, inv);
            let nr = kernel.nr();
            for (i, &(c0, c1)) in b.runs.iter().enumerate() {
                // SAFETY: out's rows t0.. at stride H·D, head hh's D columns, are this call's alone;
                // vᵀ's panels are keys_len deep, read from key k0 + c0; p's row is 0 outside its
                // intervals (between the runs included), so the depth stops at its rows' last
                // attended key. The first run writes out (even at depth 0), the others add to it.
                gemm::matmul_tiles(kernel, scores.as_ptr().add(c0), nk, rows, c1 - c0, packed.values[kv].as_ptr().add((k0 + c0) * nr), packed.keys_len * nr, d, out.0.add(hh * d), h * d, i > 0, |r0, r1| {
                    (d, b.keys_attended_by(r0, r1).min(c1).saturating_sub(c0))
                });
            }
        }
        (false, _) => {
            softmax(scores, nk, &b.intervals, score_scale, round_p, inv);
            let vbase = k0 * v.cols + kv * d;
            for (i, row) in scores.chunks(nk).enumerate() {
                // SAFETY: row t's head-hh slice (D) of out is this call's alone (see the contract).
                let o = out_row(i);
                o.fill(0.0);
                // Only the attended intervals: the rest of the row is 0.
                for (a, b) in b.intervals[i].into_iter().filter(|(a, b)| a < b) {
                    vmath::weighted_sum(&row[a..b], &v.data[vbase + a * v.cols..], v.cols, o);
                }
            }
        }
    }
    for (i, &inv) in inv.iter().enumerate() {
        out_row(i).iter_mut().for_each(|x| *x *= inv);
    }
}
