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
//! decode.rs (key chunks, flash-decoding).

use super::gemm::{self, Kernel};
use super::elem::Elem;
use super::kv_cache::CacheView;
use super::{vmath, Mat, SendPtr};
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
}

/// Every KV head's keys and values in gemm.rs's panels, for the blocks' products.
struct PackedKv {
    /// Per KV head: its (S, D) keys as the matrix of `pack` (panels of NR keys).
    keys: Vec<Vec<f32>>,
    /// Per KV head: vᵀ (D, S) (panels of NR head columns, S deep).
    values: Vec<Vec<f32>>,
    /// Key rows: the values' panel depth.
    keys_len: usize,
}

impl PackedKv {
    fn new(k: CacheView<f32>, v: CacheView<f32>, s: AttnShape) -> PackedKv {
        let (kernel, d) = (Kernel::detect(), s.head_dim);
        // Keys and values of each KV head apart: SmolLM2's 3 KV heads are 6 tasks on 2 threads,
        // not 3 (one thread packing two heads while the other waits).
        let mut packed: Vec<Vec<f32>> = (0..2 * s.kv_heads)
            .into_par_iter()
            .map(|i| match (i / 2, i % 2) {
                (kv, 0) => gemm::pack_rows(kernel, &k.data[kv * d..], k.rows, d, k.cols),
                (kv, _) => gemm::pack_cols(kernel, &v.data[kv * d..], v.rows, d, v.cols),
            })
            .collect();
        let values = (0..s.kv_heads).map(|kv| std::mem::take(&mut packed[2 * kv + 1])).collect();
        let keys = (0..s.kv_heads).map(|kv| std::mem::take(&mut packed[2 * kv])).collect();
        PackedKv { keys, values, keys_len: k.rows }
    }
}

/// Whether every block is a few rows (decode steps): then attention goes by key chunks.
fn is_decode(blocks: &[(usize, usize)]) -> bool {
    blocks.iter().all(|(t0, t1)| t1 - t0 <= FEW_QUERY_ROWS)
}

/// out (T, H·D) = softmax(q kᵀ / √D over each row's spans) v; q (T, H·D), k and v (S, KV·D) in
/// the type they are kept in (f32, or a generation cache's narrower one); shapes as
/// `shapes::attention` checked them.
pub(super) fn attention<E: Elem>(q: &Mat, k: CacheView<E>, v: CacheView<E>, s: AttnShape, spans: &[AttnSpan]) -> Mat {
    let blocks = query_blocks(spans);
    if is_decode(&blocks) {
        return super::decode::decode_attention(q, k, v, s, spans, &blocks);
    }
    // The micro-kernel packs f32: a narrower cache (rows after a cached prompt) is widened first.
    match (E::as_f32(k.data), E::as_f32(v.data)) {
        (Some(kd), Some(vd)) => prefill(q, CacheView { rows: k.rows, cols: k.cols, data: kd }, CacheView { rows: v.rows, cols: v.cols, data: vd }, s, spans, &blocks),
        _ => {
            let (k, v) = (k.widen(), v.widen());
            prefill(q, (&k).into(), (&v).into(), s, spans, &blocks)
        }
    }
}

/// `attention` of calls with a block of more than FEW_QUERY_ROWS rows: its products read the
/// packed K and V.
fn prefill(q: &Mat, k: CacheView<f32>, v: CacheView<f32>, s: AttnShape, spans: &[AttnSpan], blocks: &[(usize, usize)]) -> Mat {
    let (h, d) = (s.heads, s.head_dim);
    let packed = PackedKv::new(k, v, s);
    let len = q.rows * h * d;
    let mut out: Vec<f32> = Vec::with_capacity(len); // (T, H·D)
    // Work items: blocks of query rows of one document, every head; each writes its own rows of
    // out, and every row attends at least its own key, so all of out is written. The block's
    // intervals are worked out once for its heads.
    let out_ptr = SendPtr(out.as_mut_ptr());
    blocks.par_iter().for_each(|&(t0, t1)| {
        SCORES.with(|scores| {
            let mut scores = scores.borrow_mut();
            let b = Block::new(spans, s, t0, t1);
            for hh in 0..h {
                // SAFETY: blocks are disjoint in rows, so no two items write the same element.
                unsafe { block_head(q, k, v, &packed, s, &b, hh, out_ptr, &mut scores) };
            }
        });
    });
    // SAFETY: the blocks cover rows [0, T) for every head, each writing its (rows, D) slice.
    unsafe { out.set_len(len) };
    Mat { rows: q.rows, cols: h * d, data: out }
}

/// The keys rows [t0, t1) can see: from their first row's first key to one past the last any
/// of them attends (its shared interval's end or its own key).
pub(super) fn block_keys(spans: &[AttnSpan], s: AttnShape, t0: usize, t1: usize) -> (usize, usize) {
    let first = spans[t0..t1].iter().map(|sp| span_first_key(sp) as usize).min().unwrap_or(0);
    let end = spans[t0..t1].iter().map(|sp| sp.shared_end as usize).max().unwrap_or(0).max(t1 + s.key_offset);
    (first, end)
}

/// The first key a row can see: its document's first token.
pub(super) fn span_first_key(sp: &AttnSpan) -> u32 {
    sp.shared_start.min(sp.own_start)
}

/// Query rows cut into blocks of at most ATTN_BLOCK rows that never cross a document boundary,
/// so a block's key range is its own document's keys, not its neighbour's too.
pub(super) fn query_blocks(spans: &[AttnSpan]) -> Vec<(usize, usize)> {
    let mut blocks = vec![];
    let mut t0 = 0;
    for t in 1..=spans.len() {
        if t == spans.len() || t - t0 == ATTN_BLOCK || span_first_key(&spans[t]) != span_first_key(&spans[t0]) {
            blocks.push((t0, t));
            t0 = t;
        }
    }
    blocks
}

/// The keys row `row` attends as at most two disjoint, ordered intervals relative to key k0,
/// clipped to [0, nk): the span's shared interval and its own [own_start, row].
pub(super) fn attended_intervals(sp: &AttnSpan, row: usize, k0: usize, nk: usize) -> [(usize, usize); 2] {
    let clip = |a: usize, b: usize| (a.saturating_sub(k0).min(nk), b.saturating_sub(k0).min(nk));
    let shared = clip(sp.shared_start as usize, sp.shared_end as usize);
    let own = clip(sp.own_start as usize, row + 1);
    let (first, second) = if shared.0 <= own.0 { (shared, own) } else { (own, shared) };
    if first.0 >= first.1 {
        [second, (second.1, second.1)]
    } else if second.0 <= first.1 {
        // Overlapping or touching: one interval.
        [(first.0, first.1.max(second.1)), (nk, nk)]
    } else {
        [first, second]
    }
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
    intervals: Vec<[(usize, usize); 2]>,
    /// Per row, one past the last key it attends relative to k0.
    ends: Vec<usize>,
    /// The products run through the packed K and V (more than FEW_QUERY_ROWS rows).
    gemm: bool,
    /// Whole panels of keys (relative to k0) between the rows' two intervals that no row
    /// attends, skipped by both products: an extract pass's branch rows attend their own
    /// document's kept prompt, at the front of the keys, and their branch, at the end, and
    /// between them lie the other documents' prompts and branches.
    gap: Option<(usize, usize)>,
}

impl Block {
    fn new(spans: &[AttnSpan], s: AttnShape, t0: usize, t1: usize) -> Block {
        let gemm = t1 - t0 > FEW_QUERY_ROWS;
        let (first, k1) = block_keys(spans, s, t0, t1);
        let nr = Kernel::detect().nr();
        // The products start at a panel of keys: the few keys before the block's first are masked.
        let k0 = if gemm { first / nr * nr } else { first };
        let nk = k1 - k0;
        let intervals: Vec<_> = (t0..t1).map(|t| attended_intervals(&spans[t], t + s.key_offset, k0, nk)).collect();
        let ends = intervals.iter().map(|&[(a0, a1), (b0, b1)]| (if b0 < b1 { b1 } else { 0 }).max(if a0 < a1 { a1 } else { 0 })).collect();
        let gap = if gemm { unattended(&intervals, nr) } else { None };
        Block { t0, t1, k0, nk, intervals, ends, gemm, gap }
    }

    /// One past the last key (relative to k0) that any of the block's rows [r0, r1) attends.
    fn keys_attended_by(&self, r0: usize, r1: usize) -> usize {
        self.ends[r0..r1].iter().copied().max().unwrap_or(0)
    }
}

/// Whole panels of `nr` keys between every row's first interval and every row's second, if
/// any: [the first panel after the last first interval's end, the panel of the first second
/// interval's start). A row of one interval counts it as its first.
fn unattended(intervals: &[[(usize, usize); 2]], nr: usize) -> Option<(usize, usize)> {
    let mut first_end = 0;
    let mut second_start = usize::MAX;
    for &[(a0, a1), (b0, b1)] in intervals {
        match (a0 < a1, b0 < b1) {
            (true, true) => {
                first_end = first_end.max(a1);
                second_start = second_start.min(b0);
            }
            (true, false) => first_end = first_end.max(a1),
            (false, true) => first_end = first_end.max(b1),
            (false, false) => {}
        }
    }
    let (g0, g1) = (first_end.div_ceil(nr) * nr, second_start / nr * nr);
    (second_start != usize::MAX && g1 >= g0 + 2 * nr).then_some((g0, g1))
}

/// Attention of block `b`'s rows for head hh (see the module doc): through `packed` when the
/// block runs as GEMMs, by dot products otherwise. Each row's probabilities are left
/// unnormalised through p·v and its output scaled by 1/Σ after: D values, not the row's keys.
///
/// # Safety
/// `out` points to (q.rows, H·D) floats, and no other caller writes the block's rows of head hh.
#[allow(clippy::too_many_arguments)]
unsafe fn block_head(q: &Mat, k: CacheView<f32>, v: CacheView<f32>, packed: &PackedKv, s: AttnShape, b: &Block, hh: usize, out: SendPtr, scratch: &mut Vec<f32>) {
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
    let score_scale = if b.gemm {
        // Keys [0, g0) and [g1, nk) relative to k0; [g0, g1) no row attends.
        let (g0, g1) = b.gap.unwrap_or((nk, nk));
        for (c0, c1) in [(0, g0), (g1, nk)].into_iter().filter(|(c0, c1)| c0 < c1) {
            let panel = (k0 + c0) / kernel.nr() * d * kernel.nr(); // the panel holding key k0 + c0
            // SAFETY: q holds rows t0.. of H·D values (head hh's D at hh·D), scores (rows, nk),
            // the packed keys nk keys from k0 (c0 a multiple of NR); a tile leaves columns past
            // its rows' last attended key unwritten, and the softmax below writes every column
            // outside the intervals (the gap's too).
            gemm::matmul_tiles(kernel, q.data.as_ptr().add(t0 * q.cols + hh * d), q.cols, rows, d, packed.keys[kv].as_ptr().add(panel), d * kernel.nr(), c1 - c0, scores.as_mut_ptr().add(c0), nk, false, |r0, r1| {
                (b.keys_attended_by(r0, r1).min(c1).saturating_sub(c0), d)
            });
        }
        scale
    } else {
        for (i, row) in scores.chunks_mut(nk).enumerate() {
            let qrow = &q.data[(t0 + i) * q.cols + hh * d..][..d];
            for (a, e) in b.intervals[i].into_iter().filter(|(a, e)| a < e) {
                vmath::scaled_dots(qrow, &k.data[(k0 + a) * k.cols + kv * d..], k.cols, scale, &mut row[a..e]);
            }
        }
        1.0
    };
    for ((row, inv), &[(a0, a1), (b0, b1)]) in scores.chunks_mut(nk).zip(inv.iter_mut()).zip(&b.intervals) {
        let max = vmath::max(&row[a0..a1]).max(vmath::max(&row[b0..b1]));
        let shift = max * score_scale;
        let sum = vmath::exp_scaled_shift_sum(&mut row[a0..a1], score_scale, shift) + vmath::exp_scaled_shift_sum(&mut row[b0..b1], score_scale, shift);
        *inv = 1.0 / sum;
        row[..a0].fill(0.0);
        row[a1..b0.max(a1)].fill(0.0);
        row[b1.max(a1)..].fill(0.0);
    }
    // The block's rows of head hh in out: row i at out + (t0 + i)·H·D + hh·D.
    let out_row = |i: usize| std::slice::from_raw_parts_mut(out.0.add((t0 + i) * h * d + hh * d), d);
    if b.gemm {
        let nr = kernel.nr();
        // SAFETY: out's rows t0.. at stride H·D, head hh's D columns, are this call's alone;
        // vᵀ's panels are keys_len deep, read from key k0; p's row is 0 past its rows' last
        // attended key, so the depth stops there.
        let (g0, g1) = b.gap.unwrap_or((nk, nk));
        for (c0, c1, add) in [(0, g0, false), (g1, nk, true)].into_iter().filter(|&(c0, c1, add)| !add || c0 < c1) {
            // SAFETY: out's rows t0.. at stride H·D, head hh's D columns, are this call's alone;
            // vᵀ's panels are keys_len deep, read from key k0 + c0; p's row is 0 outside its
            // intervals (the gap included), so the depth stops at its rows' last attended key.
            // The first range writes out (even at depth 0), the second adds to it.
            gemm::matmul_tiles(kernel, scores.as_ptr().add(c0), nk, rows, c1 - c0, packed.values[kv].as_ptr().add((k0 + c0) * nr), packed.keys_len * nr, d, out.0.add(t0 * h * d + hh * d), h * d, add, |r0, r1| {
                (d, b.keys_attended_by(r0, r1).min(c1).saturating_sub(c0))
            });
        }
    } else {
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
    for (i, &inv) in inv.iter().enumerate() {
        out_row(i).iter_mut().for_each(|x| *x *= inv);
    }
}
