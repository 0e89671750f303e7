//! The `Bf16Dot` route's prefill products: q·kᵀ and p·v by gemm_bf16.rs's `vdpbf16ps` tiles,
//! rounding where the CUDA kernel (kernels/attention.cu) rounds: q, k and v to bf16 (k and v as
//! they are packed, q's rows per block), and the unnormalised probabilities p = exp(s - max) to
//! bf16 before p·v; the products summed in f32.
//!
//! Packed as gemm_bf16's pair panels, once per call per KV head: K with the keys as the N rows
//! and the head's D as the depth, vᵀ with the head's D columns as N and the keys as the depth
//! (pairs of consecutive keys; an odd count's last pair padded with a zero, where p is 0 too).
//! Each tile multiplies only as far as its rows attend, and the runs of unattended panels are
//! skipped, as the f32 products do (`Block`).

use super::super::gemm_bf16::{self, MR, NR};
use super::super::kv_cache::CacheView;
use super::super::dispatch::dispatch;
use super::super::{round, vmath, Mat};
use super::Block;
use crate::backend::AttnShape;
use half::bf16;
use rayon::prelude::*;
use std::cell::RefCell;

thread_local! {
    /// Each worker's bf16 left operand (a block's p rows of one head): grown, never refilled.
    static OPERAND: RefCell<Vec<bf16>> = const { RefCell::new(Vec::new()) };
}

/// A call's operands in bf16: q's rows rounded, every KV head's keys and values rounded into
/// pair panels.
pub(super) struct PackedKv {
    /// (T·H, D) q rounded, `dp` apart: row t·H + hh is row t's head hh, so a block's tiles
    /// read a head's rows H·dp apart. One pass over q: rounded per block and head instead (64
    /// values at a time from rows 2304 bytes apart), its loads missed cache (perf annotate).
    queries: gemm_bf16::Rows,
    /// Per KV head: its (S, D) keys, panels of NR keys, `dp` deep.
    keys: Vec<Vec<bf16>>,
    /// Per KV head: vᵀ (D, S), panels of NR head columns, `sp` deep.
    values: Vec<Vec<bf16>>,
    d: usize,
    /// D and S rounded up to pairs: the panels' depths.
    dp: usize,
    sp: usize,
}

impl PackedKv {
    pub(super) fn new(q: &Mat, k: CacheView<f32>, v: CacheView<f32>, s: AttnShape) -> PackedKv {
        let d = s.head_dim;
        let queries = gemm_bf16::Rows::round(&q.data, q.rows * s.heads, d);
        // Blocks start their keys at a whole panel of the f32 kernel's width: this one's.
        debug_assert_eq!(super::Kernel::detect().nr(), NR);
        // Keys and values of each KV head apart, as the f32 packing does.
        let mut packed: Vec<Vec<bf16>> = (0..2 * s.kv_heads)
            .into_par_iter()
            .map(|i| match (i / 2, i % 2) {
                (kv, 0) => gemm_bf16::pack_rows_rounded(&k.data[kv * d..], k.rows, d, k.cols),
                (kv, _) => gemm_bf16::pack_cols_rounded(&v.data[kv * d..], v.rows, d, v.cols),
            })
            .collect();
        let values = (0..s.kv_heads).map(|kv| std::mem::take(&mut packed[2 * kv + 1])).collect();
        let keys = (0..s.kv_heads).map(|kv| std::mem::take(&mut packed[2 * kv])).collect();
        PackedKv { queries, keys, values, d, dp: d.div_ceil(2) * 2, sp: k.rows.div_ceil(2) * 2 }
    }

    /// scores (B, K) = q·kᵀ of block b's rows for head hh, over its runs of keys, each tile as
    /// far as its rows attend (the rest left for the softmax to write).
    ///
    /// # Safety
    /// scores holds (rows, b.nk) floats; the CPU runs the kernel.
    pub(super) unsafe fn scores(&self, s: AttnShape, b: &Block, hh: usize, scores: &mut [f32]) {
        let (dp, rows) = (self.dp, b.t1 - b.t0);
        let kv = hh / (s.heads / s.kv_heads);
        // Head hh of the block's rows: rows H·dp apart from row t0·H + hh.
        let (q, lda) = (self.queries.row(b.t0 * s.heads + hh), s.heads * dp);
        for &(c0, c1) in &b.runs {
            // SAFETY: q's rows are dp values at lda apart, the keys' panel of key k0 + c0 (a
            // multiple of NR) starts the window of c1 - c0 keys, scores has rows x nk floats;
            // a tile writes only the columns its rows attend up to.
            gemm_bf16::matmul_tiles(q, lda, rows, dp, self.keys[kv].as_ptr().add((b.k0 + c0) / NR * dp * NR), dp * NR, c1 - c0, scores.as_mut_ptr().add(c0), b.nk, false, |r0, r1| {
                (b.keys_attended_by(r0, r1).min(c1).saturating_sub(c0), dp)
            });
        }
    }

    /// The softmax of block b's scores (rows, nk) and out (B, D) = p·v over its runs of keys,
    /// in one pass: p = e^(s·scale - max·scale) over each row's intervals, rounded to bf16
    /// straight into the product's operand (0 outside them, as attention.rs's `softmax` leaves
    /// it), the reciprocal of its unrounded sum into inv. No f32 p is written back and read
    /// again to be rounded.
    ///
    /// # Safety
    /// out covers the block's rows at stride ldc of D writable floats, written by no one else
    /// meanwhile; the CPU runs the kernel.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn softmax_weighted(&self, scores: &[f32], b: &Block, kv: usize, scale: f32, inv: &mut [f32], out: *mut f32, ldc: usize) {
        let (rows, nk) = (b.t1 - b.t0, b.nk);
        // Rows of whole pairs: an odd K's last pair is (p, 0).
        let nkp = nk.div_ceil(2) * 2;
        OPERAND.with(|buf| {
            let mut buf = buf.borrow_mut();
            if buf.len() < rows * nkp {
                buf.resize(rows * nkp, bf16::ZERO);
            }
            // Only what the tiles read: a row tile's depth stops at the pair holding its rows'
            // last attended key (the causal triangle's far side is half a block's p).
            for r0 in (0..rows).step_by(MR) {
                let r1 = (r0 + MR).min(rows);
                let end = b.keys_attended_by(r0, r1).div_ceil(2) * 2;
                for i in r0..r1 {
                    let (row, dst, iv) = (&scores[i * nk..][..nk], &mut buf[i * nkp..][..end], &b.intervals[i]);
                    let shift = super::row_max(row, iv) * scale;
                    inv[i] = super::inv_sum(iv, |a, e| exp_round_sum(&row[a..e], scale, shift, &mut dst[a..e]));
                    super::fill_outside(dst, iv, bf16::ZERO);
                }
            }
            for (i, &(c0, c1)) in b.runs.iter().enumerate() {
                // SAFETY: p's rows are read from key c0 (even), to at most one pair past the
                // rows' last attended key (0 there, or the pad); vᵀ's panels are sp deep, read
                // from key k0 + c0 (even); the first run writes out (even at depth 0), the
                // others add to it.
                gemm_bf16::matmul_tiles(buf.as_ptr().add(c0), nkp, rows, c1 - c0, self.values[kv].as_ptr().add((b.k0 + c0) * NR), self.sp * NR, self.d, out, ldc, i > 0, |r0, r1| {
                    (self.d, b.keys_attended_by(r0, r1).min(c1).saturating_sub(c0))
                });
            }
        });
    }
}

/// dst[i] = e^(x[i]·scale - shift) rounded to bf16; returns the sum of the unrounded values,
/// added in `vmath::exp_scaled_shift_sum`'s lanes and order (so the sum is that function's to
/// the bit).
#[inline(always)]
fn exp_round_sum_body<const FUSED: bool>(x: &[f32], scale: f32, shift: f32, dst: &mut [bf16]) -> f32 {
    const LANES: usize = vmath::SUM_LANES;
    let x = &x[..dst.len()];
    let mut acc = [0f32; LANES];
    let mut chunks = dst.chunks_exact_mut(LANES);
    for (d, c) in (&mut chunks).zip(x.chunks_exact(LANES)) {
        for i in 0..LANES {
            let e = vmath::exp_scaled_shift::<FUSED>(c[i], scale, shift);
            acc[i] += e;
            d[i] = round::round(e);
        }
    }
    // The tail as one more vector, the lanes past it left out of the sum (none: adding 0 to
    // the lanes changes no bit of them).
    let rest = chunks.into_remainder();
    if rest.is_empty() {
        return vmath::lane_sums(&acc);
    }
    let mut lanes = [0f32; LANES];
    lanes[..rest.len()].copy_from_slice(&x[x.len() - rest.len()..]);
    let mut out = [bf16::ZERO; LANES];
    for i in 0..LANES {
        let e = vmath::exp_scaled_shift::<FUSED>(lanes[i], scale, shift);
        acc[i] += if i < rest.len() { e } else { 0.0 };
        out[i] = round::round(e);
    }
    rest.copy_from_slice(&out[..rest.len()]);
    vmath::lane_sums(&acc)
}

dispatch!(
    fused
    /// dst[i] = e^(x[i]·scale - shift) rounded to bf16, returning the unrounded values' sum.
    exp_round_sum, exp_round_sum_avx2, exp_round_sum_avx512, exp_round_sum_body, (x: &[f32], scale: f32, shift: f32, dst: &mut [bf16]) -> f32
);

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused numerators are `exp_scaled_shift_sum`'s values rounded, and its sum bit for bit,
    /// at every tail length around the 16-lane vector.
    #[test]
    fn exp_round_sum_is_the_numerators_rounded_and_their_sum() {
        for n in 0..50 {
            let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.71).collect();
            let (scale, shift) = (0.125f32, 0.3f32);
            let mut want = x.clone();
            let want_sum = vmath::exp_scaled_shift_sum(&mut want, scale, shift);
            let mut got = vec![bf16::ZERO; n];
            let sum = exp_round_sum(&x, scale, shift, &mut got);
            assert_eq!(sum.to_bits(), want_sum.to_bits(), "sum of {n}");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), round::round(*w).to_bits(), "{n} values, at {i}");
            }
        }
    }
}
