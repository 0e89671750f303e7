//! The bf16 compute route's GEMM: out (T, N) (+)= x (T, K) · w (N, K)ᵀ + bias with x and w in
//! bf16 and the products summed in f32 by AVX512-BF16's `vdpbf16ps` (two bf16 products per f32
//! lane per instruction: twice the multiply-adds of an f32 FMA of the same width, from half
//! the bytes). gemm.rs's blocking, task split and accumulator handling serve it unchanged.
//!
//! Packed layout: w's N rows cut into panels of NR = 32 rows (the last one zero-padded), the
//! depth rounded up to pairs (Kp, the odd K's last pair padded with a zero); a panel is
//! (Kp / 2, NR, 2): a row of the panel holds, for each of its 32 columns, two consecutive
//! depths, which is the operand `vdpbf16ps` pairs with one broadcast pair of x. x is not
//! packed, only rounded into rows of Kp bf16 (`Rows`): a tile broadcasts 32 bits of a row.

use super::gemm::{self, Dest, Init, Out, KC, MC};
use super::dispatch::dispatch;
use super::{round, vmath};
use half::bf16;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Columns of out per tile: two zmm of f32 accumulators per row.
pub(super) const NR: usize = 32;
/// Rows of out per tile: 24 accumulators, 2 panel registers and a broadcast of 32.
pub(super) const MR: usize = 12;

/// Panels a one-row product streams at once (`block`).
const STREAMS: usize = 4;

/// Whether this CPU runs the kernel (detected once by the caller's route).
pub(super) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// K rounded up to whole pairs.
fn pairs_depth(k: usize) -> usize {
    k.div_ceil(2) * 2
}

/// Values the packed form of an (n, k) matrix takes.
pub(super) fn packed_len(n: usize, k: usize) -> usize {
    n.div_ceil(NR) * pairs_depth(k) * NR
}

/// w (N, K) row-major -> panels (N / NR, Kp / 2, NR, 2), padding zero; panels in parallel.
pub(super) fn pack(w: &[bf16], n: usize, k: usize) -> Vec<bf16> {
    pack_rows(n, k, |j| w[j * k..][..k].iter().copied())
}

/// `pack` of a matrix given as a file's little-endian bf16 bytes, read straight into the panels:
/// no widened or copied matrix between (a model's start-up packs every weight once).
pub(super) fn pack_le_bytes(bytes: &[u8], n: usize, k: usize) -> Vec<bf16> {
    pack_rows(n, k, |j| bytes[2 * j * k..][..2 * k].chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]])))
}

/// `pack` of the matrix whose row j (K values) `row(j)` yields. The output is not zero-filled
/// first (a one-thread pass over the whole matrix at load): a panel with padding zeroes itself,
/// while it is in cache, before its rows are scattered in.
fn pack_rows<R: Iterator<Item = bf16>>(n: usize, k: usize, row: impl Fn(usize) -> R + Sync) -> Vec<bf16> {
    let (kp, len) = (pairs_depth(k), packed_len(n, k));
    let mut out: Vec<bf16> = Vec::with_capacity(len);
    if kp > 0 {
        out.spare_capacity_mut()[..len].par_chunks_mut(kp * NR).enumerate().for_each(|(p, panel)| {
            let lanes = NR.min(n - p * NR);
            // Only a partial last panel or an odd depth has padding to zero.
            if lanes < NR || kp > k {
                panel.fill(std::mem::MaybeUninit::new(bf16::ZERO));
            }
            for lane in 0..lanes {
                // A row's pairs of depths are adjacent in the row and in the panel.
                let mut at = lane * 2;
                let mut values = row(p * NR + lane);
                while let Some(a) = values.next() {
                    panel[at].write(a);
                    if let Some(b) = values.next() {
                        panel[at + 1].write(b);
                    }
                    at += 2 * NR;
                }
            }
        });
    }
    // SAFETY: the panels cover all len values (kp = 0: len = 0), each filled above.
    unsafe { out.set_len(len) };
    out
}

/// Row `j` (K values) of the matrix that `packed` holds, widened: tied embeddings' lookup.
pub(super) fn unpack_row(packed: &[bf16], k: usize, j: usize, out: &mut Vec<f32>) {
    let base = (j / NR) * pairs_depth(k) * NR + (j % NR) * 2;
    out.extend((0..k).map(|kk| packed[base + kk / 2 * 2 * NR + kk % 2].to_f32()));
}

/// x (T, K) rounded to bf16, each row padded to Kp with a zero: the left operand.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Rows {
    data: Vec<bf16>,
    rows: usize,
    kp: usize,
}

impl Rows {
    /// Rows of this many values or more are made as one parallel item: smaller ones cost more
    /// to hand out than to make.
    const CHUNK: usize = 1 << 14;

    pub(super) fn round(x: &[f32], t: usize, k: usize) -> Rows {
        // SAFETY: round_into_uninit writes all k values of each row.
        unsafe { Rows::from_fn(t, k, |i, values| round::round_into_uninit(&x[i * k..][..k], values)) }
    }

    /// (t, k) rows whose row i `row(i, values)` writes, in parallel: an op writing its output
    /// straight into the GEMM's operand.
    ///
    /// # Safety
    /// `row` writes every one of its k values (they start uninitialised).
    pub(super) unsafe fn from_fn(t: usize, k: usize, row: impl Fn(usize, &mut [MaybeUninit<bf16>]) + Sync) -> Rows {
        let per = Self::CHUNK.div_ceil(k.max(1));
        let blocks: Vec<(usize, usize)> = (0..t).step_by(per).map(|t0| (t0, (t0 + per).min(t))).collect();
        // SAFETY: `row` writes each row's k values (the caller's contract).
        Rows::from_blocks(t, k, &blocks, |(t0, _), kp, part| {
            for (i, values) in part.chunks_exact_mut(kp.max(1)).enumerate() {
                row(t0 + i, &mut values[..k]);
            }
        })
    }

    /// (t, k) rows made by blocks of rows in parallel: `fill((t0, t1), kp, rows)` writes the k
    /// values of each of the block's rows, rows[i·kp..][..k] being row t0 + i (the pads are
    /// written after). `blocks` are [t0, t1) ranges covering [0, t) in order.
    ///
    /// # Safety
    /// `fill` writes every one of those values (they start uninitialised).
    pub(super) unsafe fn from_blocks(t: usize, k: usize, blocks: &[(usize, usize)], fill: impl Fn((usize, usize), usize, &mut [MaybeUninit<bf16>]) + Sync) -> Rows {
        let (kp, len) = (pairs_depth(k), t * pairs_depth(k));
        assert!(blocks.first().is_none_or(|b| b.0 == 0) && blocks.windows(2).all(|w| w[0].1 == w[1].0) && blocks.last().map_or(0, |b| b.1) == t, "blocks cover the rows in order");
        // Not zero-filled first: that was one thread's memset of the whole buffer (3% of a bf16
        // scoring run's wall, the other core waiting), and each value is written below anyway.
        let mut data: Vec<bf16> = Vec::with_capacity(len);
        let mut parts = Vec::with_capacity(blocks.len());
        let mut rest = &mut data.spare_capacity_mut()[..len];
        for &(t0, t1) in blocks {
            let (part, tail) = rest.split_at_mut((t1 - t0) * kp);
            parts.push(((t0, t1), part));
            rest = tail;
        }
        parts.into_par_iter().for_each(|(block, part)| {
            fill(block, kp, part);
            for row in part.chunks_exact_mut(kp.max(1)) {
                row[k..].iter_mut().for_each(|p| {
                    p.write(bf16::ZERO);
                });
            }
        });
        // SAFETY: the blocks cover the t rows; `fill` wrote each one's k values, the pads above
        // (k = 0: len = 0).
        data.set_len(len);
        Rows { data, rows: t, kp }
    }

    /// Where row i starts (its kp values; i = rows: one past the last).
    pub(super) fn row(&self, i: usize) -> *const bf16 {
        assert!(i <= self.rows);
        self.data[i * self.kp..].as_ptr()
    }

    /// Row i's k values, widened (exactly): the f32 matrix these rows hold.
    pub(super) fn widen(&self, k: usize) -> Vec<f32> {
        self.data.par_chunks(self.kp.max(1)).take(self.rows).flat_map_iter(|r| r[..k].iter().map(|v| v.to_f32())).collect()
    }
}

/// out (T, N) (+)= x · wᵀ (+ bias (N,)), w packed by `pack`.
///
/// # Safety
/// `out` points to T·N writable floats (with `Out::Write` they may be uninitialised); `w` holds
/// packed_len(n, k) values for x's k, `bias` n; the CPU runs the kernel (`available`).
pub(super) unsafe fn matmul(x: &Rows, w: &[bf16], n: usize, bias: Option<&[f32]>, out: Dest, mode: Out) {
    debug_assert!(w.len() >= n.div_ceil(NR) * x.kp * NR && bias.is_none_or(|b| b.len() >= n));
    if x.rows == 0 || n == 0 {
        return;
    }
    // SAFETY: tasks write disjoint (rows, panels) blocks of out; the caller's contract covers
    // the rest.
    gemm::fork(NR, MR, x.rows, x.kp, n, |rows, panels| unsafe { block(x, w, n, bias, out, mode, rows, panels) });
}

/// out (T, N) = silu(x · gᵀ + bg) ⊙ (x · uᵀ + bu) rounded to bf16 (the down projection's input,
/// as the CUDA backend stores it), gate and up tile by tile as in gemm.rs's `matmul_silu_mul`
/// (the up tile in a buffer on the stack, multiplied in and rounded while in L1, not in a pass
/// of its own over T·N), over the whole depth at once: a bf16 pair panel of any decoder's
/// depth fits L2.
///
/// Written to `out` (`SiluOut`): f32 rows holding the rounded values, or straight into the
/// bf16 rows the down projection multiplies (no (T, N) f32 matrix written, read back and
/// rounded again: the MLP's widest activation).
///
/// # Safety
/// As `matmul` with `Out::Write`, for both weights and biases; `out` covers T rows of N.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn matmul_silu_mul(x: &Rows, g: &[bf16], bg: Option<&[f32]>, u: &[bf16], bu: Option<&[f32]>, n: usize, out: SiluOut) {
    if x.rows == 0 || n == 0 {
        return;
    }
    // SAFETY: as in `matmul`.
    gemm::fork(NR, MR, x.rows, x.kp, n, |rows, panels| unsafe {
        #[allow(clippy::redundant_locals)]
        let out = out; // the whole SiluOut (Sync), not its raw fields, into the closure
        // Two panels' up tiles (or one tile of r rows), and as much of gate where out is bf16.
        let (mut up, mut gate) = ([0f32; MR * NR], [0f32; MR * NR]);
        let kp = x.kp;
        for i0 in rows.clone().step_by(MR) {
            let r = MR.min(rows.end - i0);
            // Where panel p's gate tile goes (`half`: which of two one-row tiles): out's own
            // rows where it is f32, else the stack.
            let gate_at = |p: usize, half: usize, gate: *mut f32| match out {
                SiluOut::F32(o) => (o.add(i0 * n + p * NR), n),
                SiluOut::Bf16(..) => (gate.add(half * NR), NR),
            };
            let tile = |b: &[bf16], p: usize, (c, ldc): (*mut f32, usize), bias: Option<&[f32]>| Tile {
                pairs: kp / 2,
                a: x.data.as_ptr().add(i0 * kp),
                lda: kp,
                b: b.as_ptr().add(p * kp * NR),
                c,
                ldc,
                ncols: NR.min(n - p * NR),
                init: Init::at(0, bias, Out::Write, p * NR),
            };
            // Rows of panel p = silu(gate) ⊙ up rounded, `up` holding r rows of NR.
            let silu = |p: usize, (gc, ldg): (*mut f32, usize), up: &[f32], r: usize| {
                let ncols = NR.min(n - p * NR);
                match out {
                    SiluOut::F32(_) => {
                        for (i, up) in up.chunks_exact(NR).take(r).enumerate() {
                            let row = std::slice::from_raw_parts_mut(gc.add(i * ldg), ncols);
                            vmath::silu_mul_slice(row, &up[..ncols]);
                            round::round_in_place(row);
                        }
                    }
                    SiluOut::Bf16(o, ld) => {
                        // The whole tile in one call (its gate is on the stack, ldg = NR): a
                        // call per 32-value row spent its time on the calls and the constants'
                        // set-up, not the 2 vectors between.
                        let mut vals = [MaybeUninit::<bf16>::uninit(); MR * NR];
                        silu_mul_round_into(std::slice::from_raw_parts(gc, r * NR), &up[..r * NR], &mut vals[..r * NR]);
                        for i in 0..r {
                            let (from, to) = (vals.as_ptr().add(i * NR).cast::<bf16>(), o.add((i0 + i) * ld + p * NR));
                            // A constant count is two vector moves; a variable one, a memmove call.
                            if ncols == NR {
                                std::ptr::copy_nonoverlapping(from, to, NR);
                            } else {
                                std::ptr::copy_nonoverlapping(from, to, ncols);
                            }
                        }
                    }
                }
            };
            let (up_at, g_buf) = (up.as_mut_ptr(), gate.as_mut_ptr());
            if r == 1 {
                // One row streams both weights from memory, as `block` does: the gate and up
                // panels of two panels at once, from the two halves of the task's run.
                let (start, half) = (panels.start, panels.len() / 2);
                for j in 0..half {
                    let (p, q) = (start + j, start + half + j);
                    let (gp, gq) = (gate_at(p, 0, g_buf), gate_at(q, 1, g_buf));
                    streams::<4>(&[tile(g, p, gp, bg), tile(u, p, (up_at, NR), bu), tile(g, q, gq, bg), tile(u, q, (up_at.add(NR), NR), bu)]);
                    silu(p, gp, &up[..NR], 1);
                    silu(q, gq, &up[NR..2 * NR], 1);
                }
                if panels.len() % 2 == 1 {
                    let p = panels.end - 1;
                    let gp = gate_at(p, 0, g_buf);
                    streams::<2>(&[tile(g, p, gp, bg), tile(u, p, (up_at, NR), bu)]);
                    silu(p, gp, &up[..NR], 1);
                }
                continue;
            }
            for p in panels.clone() {
                let gp = gate_at(p, 0, g_buf);
                tile(g, p, gp, bg).run(r);
                tile(u, p, (up_at, NR), bu).run(r);
                silu(p, gp, &up, r);
            }
        }
    });
}

/// dst[i] = SiLU(gate[i]) · up[i] rounded to bf16 (`vmath::silu_mul_slice` then
/// `round::round_into`, in one pass): a tile's epilogue, (r, NR) values, so whole vectors of
/// 16. As two slice calls per 32-value row it was 4.8% of a bf16 scoring job's samples, mostly
/// in the loops' 8-wide remainders.
#[inline(always)]
fn silu_mul_round_body<const FUSED: bool>(gate: &[f32], up: &[f32], dst: &mut [MaybeUninit<bf16>]) {
    const LANES: usize = 16;
    // Every value of dst is written: a tile's rows are NR, a multiple of LANES.
    assert_eq!(dst.len() % LANES, 0, "whole vectors");
    let (gate, up) = (&gate[..dst.len()], &up[..dst.len()]);
    for ((d, g), u) in dst.chunks_exact_mut(LANES).zip(gate.chunks_exact(LANES)).zip(up.chunks_exact(LANES)) {
        for i in 0..LANES {
            d[i].write(round::round(vmath::silu_mul_one::<FUSED>(g[i], u[i])));
        }
    }
}

dispatch!(
    fused
    /// dst[i] = SiLU(gate[i]) · up[i] rounded to bf16, dst (whole vectors of 16) written whole
    /// (it may start uninitialised).
    silu_mul_round_into, silu_mul_round_avx2, silu_mul_round_avx512, silu_mul_round_body, (gate: &[f32], up: &[f32], dst: &mut [MaybeUninit<bf16>]) -> ()
);

/// Where `matmul_silu_mul` writes.
#[derive(Clone, Copy)]
pub(super) enum SiluOut {
    /// (T, N) f32 values, rounded.
    F32(*mut f32),
    /// (T, ld) bf16 rows, ld >= N: the first N values of each.
    Bf16(*mut bf16, usize),
}

// SAFETY: tasks write disjoint (rows, panels) blocks through the pointer (`matmul_silu_mul`).
unsafe impl Send for SiluOut {}
unsafe impl Sync for SiluOut {}

/// `matmul_silu_mul` into bf16 rows: the down projection's left operand, made in the products'
/// epilogue.
///
/// # Safety
/// As `matmul_silu_mul`.
pub(super) unsafe fn matmul_silu_mul_rows(x: &Rows, g: &[bf16], bg: Option<&[f32]>, u: &[bf16], bu: Option<&[f32]>, n: usize) -> Rows {
    let (kp, len) = (pairs_depth(n), x.rows * pairs_depth(n));
    let mut data: Vec<bf16> = Vec::with_capacity(len);
    matmul_silu_mul(x, g, bg, u, bu, n, SiluOut::Bf16(data.as_mut_ptr(), kp));
    if kp > n {
        // An odd N's pad of each row (the epilogue writes the first N).
        for row in data.spare_capacity_mut()[..len].chunks_exact_mut(kp) {
            row[n].write(bf16::ZERO);
        }
    }
    // SAFETY: the products wrote each row's N values (n = 0: nothing to write, a zero pad only
    // where kp > n, written above; x.rows = 0: len = 0).
    data.set_len(len);
    Rows { data, rows: x.rows, kp }
}

/// Rows `rows` and panels `panels` of out, K block by K block (gemm.rs's `block`).
///
/// # Safety
/// As `matmul`, and no one else writes this block of out meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn block(x: &Rows, w: &[bf16], n: usize, bias: Option<&[f32]>, out: Dest, mode: Out, rows: std::ops::Range<usize>, panels: std::ops::Range<usize>) {
    let kp = x.kp;
    let mc = gemm::even_split(rows.len(), MC, MR);
    // As in gemm.rs: one tile row (decode) streams whole panels; else K blocks of whole pairs.
    let kc_max = if rows.len() <= MR { kp.max(2) } else { gemm::even_split(kp, KC, 2).max(2) };
    for m0 in rows.clone().step_by(mc) {
        let m1 = (m0 + mc).min(rows.end);
        for k0 in (0..kp.max(1)).step_by(kc_max) {
            let kc = kc_max.min(kp - k0);
            let tile = |i0: usize, p: usize| {
                let (c, ldc) = out.at(i0, p * NR);
                Tile { pairs: kc / 2, a: x.data.as_ptr().add(i0 * kp + k0), lda: kp, b: w.as_ptr().add(p * kp * NR + k0 * NR), c, ldc, ncols: NR.min(n - p * NR), init: Init::at(k0, bias, mode, p * NR) }
            };
            if rows.len() == 1 {
                // One row (a decode step of one sequence) reads each panel once, from memory,
                // and one stream of misses leaves the core waiting on the prefetcher: the task's
                // run of panels is cut in up to STREAMS parts, read side by side (1x576x49152 on
                // one thread, best of 40: 21 -> 27 GFLOP/s = GB/s).
                let (start, len) = (panels.start, panels.len());
                let part = len / STREAMS;
                match len.min(STREAMS) {
                    STREAMS => (0..part).for_each(|j| streams::<STREAMS>(&std::array::from_fn(|s| tile(m0, start + s * part + j)))),
                    3 => streams::<3>(&std::array::from_fn(|s| tile(m0, start + s))),
                    2 => streams::<2>(&std::array::from_fn(|s| tile(m0, start + s))),
                    _ => tile(m0, start).run(1),
                }
                // STREAMS runs of `part` panels leave len % STREAMS at the end.
                if len > STREAMS {
                    (start + part * STREAMS..panels.end).for_each(|p| tile(m0, p).run(1));
                }
                continue;
            }
            for p in panels.clone() {
                for i0 in (m0..m1).step_by(MR) {
                    tile(i0, p).run(MR.min(m1 - i0));
                }
            }
        }
    }
}

/// `pack` of the (n, k) matrix whose row j is src[j·ld..][..k], f32 values rounded to bf16 as
/// they are packed: one attention head's keys (the keys as the N rows, its D as the depth).
/// Each row is rounded whole (`round::round_into`, vectorised) and its pairs then placed as
/// 32-bit units: `pack_rows`'s value-by-value iterator was 0.6% of a bf16 scoring job.
pub(super) fn pack_rows_rounded(src: &[f32], n: usize, k: usize, ld: usize) -> Vec<bf16> {
    let kp = pairs_depth(k);
    let mut out = vec![bf16::ZERO; packed_len(n, k)];
    if kp > 0 {
        out.par_chunks_mut(kp * NR).enumerate().for_each(|(p, panel)| {
            // One key row, rounded; an odd K's pad stays 0.
            let mut row = vec![bf16::ZERO; kp];
            for lane in 0..NR.min(n - p * NR) {
                round::round_into(&src[(p * NR + lane) * ld..][..k], &mut row[..k]);
                for (pair, v) in row.chunks_exact(2).enumerate() {
                    panel[(pair * NR + lane) * 2..][..2].copy_from_slice(v);
                }
            }
        });
    }
    out
}

/// `pack` of w = srcᵀ, src (k, n) f32 with row kk at src[kk·ld], rounded to bf16 as it is
/// packed: one attention head's values for p·v, its D columns as the N rows and the keys as
/// the pair depth (consecutive keys paired; an odd count's last pair padded with a zero).
/// Read a key row at a time (contiguous), each value into its lane of the key pair's row.
pub(super) fn pack_cols_rounded(src: &[f32], k: usize, n: usize, ld: usize) -> Vec<bf16> {
    let kp = pairs_depth(k);
    let mut out = vec![bf16::ZERO; packed_len(n, k)];
    let zeros = [0f32; NR];
    if kp > 0 {
        for (p, panel) in out.chunks_exact_mut(kp * NR).enumerate() {
            let (c0, width) = (p * NR, NR.min(n - p * NR));
            // Panel row `pair`: keys 2·pair and 2·pair + 1 (past an odd count, 0) of each column.
            for (pair, row) in panel.chunks_exact_mut(2 * NR).enumerate() {
                let (k0, k1) = (2 * pair, 2 * pair + 1);
                let second = if k1 < k { &src[k1 * ld + c0..][..width] } else { &zeros[..width] };
                round::round_pairs_into(&src[k0 * ld + c0..][..width], second, &mut row[..2 * width]);
            }
        }
    }
    out
}

/// gemm.rs's `matmul_tiles` over bf16 pairs: out (t, n) = x (t, k) · wᵀ on the calling thread,
/// x's rows `lda` values apart, out's `ldc`; w in `pack`'s panels, panel p at w + p·panel_stride
/// (a window of a larger packed matrix, starting at an even depth). The row tile of rows
/// [r0, r1) computes only out's first `used(r0, r1).0` columns, over the first
/// `used(r0, r1).1` of the depth rounded up to a pair: x's value just past an odd depth is
/// multiplied too, so it must be 0 (attention's probabilities past a tile's last attended key
/// are). With `add`, out += the product instead.
///
/// # Safety
/// `x` covers t rows at stride lda of k values rounded up to a pair, `out` t rows at stride
/// ldc of n writable floats, `w` n.div_ceil(NR) panels of k rounded up to pairs; columns past
/// a tile's `used` are left as they were; the CPU runs the kernel (`available`).
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn matmul_tiles(
    x: *const bf16,
    lda: usize,
    t: usize,
    k: usize,
    w: *const bf16,
    panel_stride: usize,
    n: usize,
    out: *mut f32,
    ldc: usize,
    add: bool,
    used: impl Fn(usize, usize) -> (usize, usize),
) {
    let init = if add { Init::Load } else { Init::Zero };
    gemm::used_tiles(t, k, n, MR, NR, used, |r0, r1, p, ncols, depth| {
        let tile = Tile { pairs: depth.div_ceil(2), a: x.add(r0 * lda), lda, b: w.add(p * panel_stride), c: out.add(r0 * ldc + p * NR), ldc, ncols, init };
        tile.run(r1 - r0);
    });
}

/// One (rows, ncols) tile of out over `pairs` pairs of depth.
#[derive(Clone, Copy)]
struct Tile {
    pairs: usize,
    /// x at the tile's first row and the block's first (even) depth.
    a: *const bf16,
    lda: usize,
    /// The panel at the block's first pair: (pairs, NR, 2).
    b: *const bf16,
    c: *mut f32,
    ldc: usize,
    ncols: usize,
    init: Init,
}

impl Tile {
    /// # Safety
    /// The pointers cover `rows` x `ncols` of out, `rows` x 2·pairs of x, the panel's
    /// pairs x NR x 2, and the CPU runs the kernel.
    unsafe fn run(&self, rows: usize) {
        #[cfg(target_arch = "x86_64")]
        match rows {
            1 => streams::<1>(&[*self]),
            2 => tile_chains::<2, 3>(self),
            3 => tile_chains::<3, 2>(self),
            4 => tile::<4>(self),
            5 => tile::<5>(self),
            6 => tile::<6>(self),
            7 => tile::<7>(self),
            8 => tile::<8>(self),
            9 => tile::<9>(self),
            10 => tile::<10>(self),
            11 => tile::<11>(self),
            12 => tile::<12>(self),
            _ => unreachable!("tile rows are at most MR"),
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("the bf16 kernel is never detected off x86 ({rows} rows)");
    }
}

/// acc[i][h] lane j += x[i][2p]·w[2p][16h + j] + x[i][2p + 1]·w[2p + 1][16h + j], for every pair p.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile<const R: usize>(t: &Tile) {
    let masks = gemm::avx512::masks(t.ncols);
    let mut acc = gemm::avx512::start::<R>(t.init, t.c, t.ldc, masks);
    for p in 0..t.pairs {
        pair_step(t, &mut acc, p);
    }
    gemm::avx512::store(&acc, t.init, t.c, t.ldc, masks);
}

/// Pair `p` of the tile's depth into `acc`: two panel loads, a broadcast of each row's pair.
///
/// # Safety
/// As `Tile::run`, p < t.pairs; inlined into the kernels, which enable AVX512-BF16.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn pair_step<const R: usize>(t: &Tile, acc: &mut [[std::arch::x86_64::__m512; 2]; R], p: usize) {
    use std::arch::x86_64::*;
    let b = t.b.add(p * 2 * NR);
    let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.cast()));
    let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(NR).cast()));
    for (i, a) in acc.iter_mut().enumerate() {
        let pair = t.a.add(i * t.lda + 2 * p).cast::<i32>().read_unaligned();
        let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
        a[0] = _mm512_dpbf16_ps(a[0], x, b0);
        a[1] = _mm512_dpbf16_ps(a[1], x, b1);
    }
}

/// `tile` for a few rows (decode: one per sequence), whose 2·R accumulators alone would make
/// each `vdpbf16ps` wait for the one before (latency ~6 cycles, one issued per cycle): the pairs
/// go round C independent sets of accumulators, summed at the end, so the loop runs at the
/// rate the panel streams in.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_chains<const R: usize, const C: usize>(t: &Tile) {
    use std::arch::x86_64::*;
    let masks = gemm::avx512::masks(t.ncols);
    let mut chains = [[[_mm512_setzero_ps(); 2]; R]; C];
    chains[0] = gemm::avx512::start::<R>(t.init, t.c, t.ldc, masks);
    let whole = t.pairs / C * C;
    for p0 in (0..whole).step_by(C) {
        for (c, acc) in chains.iter_mut().enumerate() {
            pair_step(t, acc, p0 + c);
        }
    }
    for p in whole..t.pairs {
        pair_step(t, &mut chains[0], p);
    }
    let mut acc = chains[0];
    for chain in &chains[1..] {
        for (a, c) in acc.iter_mut().zip(chain) {
            *a = [_mm512_add_ps(a[0], c[0]), _mm512_add_ps(a[1], c[1])];
        }
    }
    gemm::avx512::store(&acc, t.init, t.c, t.ldc, masks);
}

/// One-row tiles over STREAMS panels in one loop (see `block`): each panel's pairs go round
/// two sets of accumulators, summed at the end, so with two or more streams at least four
/// `vdpbf16ps` chains hide its latency.
///
/// # Safety
/// As `Tile::run` with one row, for every tile; the tiles have equal `pairs`.
unsafe fn streams<const STREAMS: usize>(ts: &[Tile; STREAMS]) {
    #[cfg(target_arch = "x86_64")]
    streams_avx512(ts);
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("the bf16 kernel is never detected off x86 ({} pairs)", ts[0].pairs);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn streams_avx512<const STREAMS: usize>(ts: &[Tile; STREAMS]) {
    use std::arch::x86_64::*;
    let pairs = ts[0].pairs;
    debug_assert!(ts.iter().all(|t| t.pairs == pairs));
    let zero = [[_mm512_setzero_ps(); 2]; 1];
    let mut even = [zero; STREAMS];
    let mut odd = [zero; STREAMS];
    for (acc, t) in even.iter_mut().zip(ts) {
        *acc = gemm::avx512::start::<1>(t.init, t.c, t.ldc, gemm::avx512::masks(t.ncols));
    }
    let whole = pairs / 2 * 2;
    for p in (0..whole).step_by(2) {
        for (acc, t) in even.iter_mut().zip(ts) {
            pair_step(t, acc, p);
        }
        for (acc, t) in odd.iter_mut().zip(ts) {
            pair_step(t, acc, p + 1);
        }
    }
    if whole < pairs {
        for (acc, t) in even.iter_mut().zip(ts) {
            pair_step(t, acc, whole);
        }
    }
    for ((e, o), t) in even.iter().zip(&odd).zip(ts) {
        let sum = [[_mm512_add_ps(e[0][0], o[0][0]), _mm512_add_ps(e[0][1], o[0][1])]];
        gemm::avx512::store(&sum, t.init, t.c, t.ldc, gemm::avx512::masks(t.ncols));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<bf16> {
        crate::testing::rand_values(n, seed, 1.0).into_iter().map(bf16::from_f32).collect()
    }

    /// out[t][j] = Σ_k x[t][k]·w[j][k] + b[j] + residual, in f64 from the bf16 values.
    fn reference(x: &[bf16], w: &[bf16], b: Option<&[f32]>, residual: Option<&[f32]>, t: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0f64; t * n];
        for r in 0..t {
            for j in 0..n {
                let dot: f64 = (0..k).map(|i| x[r * k + i].to_f64() * w[j * k + i].to_f64()).sum();
                out[r * n + j] = dot + b.map_or(0.0, |b| b[j] as f64) + residual.map_or(0.0, |v| v[r * n + j] as f64);
            }
        }
        out
    }

    /// Within f32 accumulation error: each of k products (exact in f32) and the start value
    /// summed with one rounding each, |error| <= (k + 1) · 2^-24 · Σ|terms|.
    fn assert_within_f32_sums(got: &[f32], want: &[f64], x: &[bf16], w: &[bf16], t: usize, k: usize, n: usize, what: &str) {
        for r in 0..t {
            for j in 0..n {
                let abs: f64 = (0..k).map(|i| (x[r * k + i].to_f64() * w[j * k + i].to_f64()).abs()).sum();
                let (g, e) = (got[r * n + j] as f64, want[r * n + j]);
                let bound = (k as f64 + 2.0) * f32::EPSILON as f64 * 0.5 * (abs + e.abs()) + 1e-30;
                assert!((g - e).abs() <= bound, "{what}: ({r}, {j}): {g} vs {e} (bound {bound:e})");
            }
        }
    }

    #[test]
    fn dot_products_match_f64_sums_of_the_bf16_inputs() {
        if !available() {
            println!("skipped: no AVX512-BF16");
            return;
        }
        // T: one row, fewer than MR, more than MC; K: odd, one, over KC; N: under one panel,
        // a partial last panel; one row over runs of 1 to 3 panels a task (8 tasks), 5 and 6 a
        // task (STREAMS runs and what they leave), and 8 on the calling thread.
        let shapes = [(1, 5, 3), (3, 200, 33), (17, 193, 31), (13, 385, 97), (513, 77, 65), (4, 1, 40), (2, 601, 1), (14, 2 * KC + 3, 35), (1, 577, 357), (1, 65, 1287), (1, 9, 225)];
        for (si, &(t, k, n)) in shapes.iter().enumerate() {
            let (x, w) = (values(t * k, si as u64), values(n * k, 100 + si as u64));
            let b: Vec<f32> = values(n, 200 + si as u64).iter().map(|v| v.to_f32()).collect();
            let residual: Vec<f32> = values(t * n, 300 + si as u64).iter().map(|v| v.to_f32()).collect();
            let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
            let (rows, packed) = (Rows::round(&xf, t, k), pack(&w, n, k));
            for (bias, res) in [(None, None), (Some(&b[..]), None), (None, Some(&residual[..])), (Some(&b[..]), Some(&residual[..]))] {
                let (mut out, mode) = match res {
                    Some(r) => (r.to_vec(), Out::Accumulate),
                    None => (vec![f32::NAN; t * n], Out::Write),
                };
                // SAFETY: out holds t·n floats, packed its packed_len, b n; the kernel is available.
                unsafe { matmul(&rows, &packed, n, bias, Dest::whole(out.as_mut_ptr(), n), mode) };
                let want = reference(&x, &w, bias, res, t, k, n);
                assert_within_f32_sums(&out, &want, &x, &w, t, k, n, &format!("{t}x{k}x{n} bias {} residual {}", bias.is_some(), res.is_some()));
            }
        }
    }

    /// As gemm.rs's test of split destinations, through the pair kernel.
    #[test]
    fn split_destinations_get_the_whole_products_columns() {
        if !available() {
            println!("skipped: no AVX512-BF16");
            return;
        }
        let widths = [2 * NR, NR, 9];
        let (k, n) = (41, widths.iter().sum::<usize>());
        for t in [1, 5, 2 * MC + 1] {
            let (x, w) = (values(t * k, 11), values(n * k, 12));
            let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
            let (rows, packed) = (Rows::round(&xf, t, k), pack(&w, n, k));
            let mut whole = vec![f32::NAN; t * n];
            let mut outs: Vec<Vec<f32>> = widths.iter().map(|&w| vec![f32::NAN; t * w]).collect();
            let parts: Vec<(*mut f32, usize)> = outs.iter_mut().zip(widths).map(|(o, w)| (o.as_mut_ptr(), w)).collect();
            // SAFETY: whole holds t·n floats, each block t rows of its width; the kernel is available.
            unsafe {
                matmul(&rows, &packed, n, None, Dest::whole(whole.as_mut_ptr(), n), Out::Write);
                matmul(&rows, &packed, n, None, Dest::split(&parts, NR).expect("whole panels"), Out::Write);
            }
            let mut start = 0;
            for (o, &width) in outs.iter().zip(&widths) {
                for r in 0..t {
                    assert_eq!(o[r * width..][..width], whole[r * n + start..][..width], "t {t} block at {start} row {r}");
                }
                start += width;
            }
        }
    }

    /// Where every partial sum is exact in f32 (small integers), the order of the sums does not
    /// matter: the kernel must then give the exact result bit for bit.
    #[test]
    fn exact_sums_come_out_bit_for_bit() {
        if !available() {
            println!("skipped: no AVX512-BF16");
            return;
        }
        let (t, k, n) = (25, 301, 70);
        let int = |i: usize, s: usize| bf16::from_f32(((i * 7 + s * 13) % 9) as f32 - 4.0);
        let x: Vec<bf16> = (0..t * k).map(|i| int(i, 1)).collect();
        let w: Vec<bf16> = (0..n * k).map(|i| int(i, 2)).collect();
        let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        let mut out = vec![f32::NAN; t * n];
        // SAFETY: as above.
        unsafe { matmul(&Rows::round(&xf, t, k), &pack(&w, n, k), n, None, Dest::whole(out.as_mut_ptr(), n), Out::Write) };
        let want = reference(&x, &w, None, None, t, k, n);
        for (i, (g, e)) in out.iter().zip(&want).enumerate() {
            assert_eq!(*g as f64, *e, "at {i}");
        }
    }

    /// Attention's packings of f32 keys and values: `pack` of the values rounded (the keys
    /// as rows, the values transposed), odd depths and partial panels included.
    #[test]
    fn rounded_packings_are_pack_of_the_rounded_values() {
        for (n, k, ld) in [(1, 1, 1), (5, 64, 70), (33, 7, 9), (70, 80, 80), (31, 128, 200)] {
            let src: Vec<f32> = (0..n * ld).map(|i| (i as f32 * 0.377).sin() * 3.0 + f32::from_bits(0x3380_8000)).collect();
            let rows: Vec<bf16> = (0..n).flat_map(|j| src[j * ld..][..k].iter().map(|&v| bf16::from_f32(v))).collect();
            assert_eq!(pack_rows_rounded(&src, n, k, ld), pack(&rows, n, k), "rows {n}x{k} ld {ld}");
            // src as (k', n') = (n, k) f32 rows: w = srcᵀ (k, n).
            let cols: Vec<bf16> = (0..k).flat_map(|c| (0..n).map(move |j| (j, c))).map(|(j, c)| bf16::from_f32(src[j * ld + c])).collect();
            assert_eq!(pack_cols_rounded(&src, n, k, ld), pack(&cols, k, n), "cols {n}x{k} ld {ld}");
        }
    }

    #[test]
    fn fused_silu_mul_gives_the_two_products_silu_mul_and_rounding_exactly() {
        if !available() {
            println!("skipped: no AVX512-BF16");
            return;
        }
        for (si, &(t, k, n)) in [(1, 5, 3), (3, 200, 33), (17, 193, 31), (513, 77, 65), (5, KC + 1, 40), (1, 577, 357), (1, 65, 1287), (1, 9, 225), (13, 9, 225)].iter().enumerate() {
            let xf: Vec<f32> = values(t * k, si as u64).iter().map(|v| v.to_f32()).collect();
            let (g, u) = (pack(&values(n * k, 100 + si as u64), n, k), pack(&values(n * k, 200 + si as u64), n, k));
            let bu: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
            let rows = Rows::round(&xf, t, k);
            let (mut want, mut up, mut got) = (vec![0f32; t * n], vec![0f32; t * n], vec![f32::NAN; t * n]);
            // SAFETY: as above, for every output.
            unsafe {
                matmul(&rows, &g, n, None, Dest::whole(want.as_mut_ptr(), n), Out::Write);
                matmul(&rows, &u, n, Some(&bu), Dest::whole(up.as_mut_ptr(), n), Out::Write);
                matmul_silu_mul(&rows, &g, None, &u, Some(&bu), n, SiluOut::F32(got.as_mut_ptr()));
            }
            vmath::silu_mul_slice(&mut want, &up);
            round::round_in_place(&mut want);
            let differ = got.iter().zip(&want).position(|(a, b)| a.to_bits() != b.to_bits());
            assert_eq!(differ, None, "{t}x{k}x{n}");
            // Into bf16 rows (the down projection's operand): the same values, an odd N's pad 0.
            // SAFETY: as above.
            let rows_out = unsafe { matmul_silu_mul_rows(&rows, &g, None, &u, Some(&bu), n) };
            let kp = pairs_depth(n);
            assert_eq!((rows_out.rows, rows_out.kp), (t, kp));
            for (r, row) in rows_out.data.chunks_exact(kp).enumerate() {
                let want_row: Vec<bf16> = want[r * n..][..n].iter().map(|&v| bf16::from_f32(v)).chain((n..kp).map(|_| bf16::ZERO)).collect();
                assert_eq!(row, &want_row[..], "{t}x{k}x{n} row {r} as bf16 rows");
            }
        }
    }

    /// Not a check: best-of-many GFLOP/s of `matmul` at a decoder's shapes and of the GEMV over
    /// a matrix larger than L3, on 1 and 2 threads, for A/B runs of two builds on a loaded
    /// machine (`cargo test --release --lib gemm_bf16::tests::speed -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn speed() {
        if !available() {
            return;
        }
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a pool");
            for &(t, k, n, reps) in &[(2048, 576, 960, 40), (2048, 1536, 576, 40), (1, 576, 1536, 400), (1, 576, 49152, 40)] {
                let xf: Vec<f32> = values(t * k, 1).iter().map(|v| v.to_f32()).collect();
                let w = pack(&values(n * k, 2), n, k);
                let mut out = vec![0f32; t * n];
                let mut times: Vec<f64> = pool.install(|| {
                    (0..reps)
                        .map(|_| {
                            let start = std::time::Instant::now();
                            // SAFETY: out holds t·n floats, w its packed_len; the kernel is available.
                            unsafe { matmul(&Rows::round(&xf, t, k), &w, n, None, Dest::whole(out.as_mut_ptr(), n), Out::Write) };
                            start.elapsed().as_secs_f64()
                        })
                        .collect()
                });
                times.sort_by(f64::total_cmp);
                let gf = |s: f64| 2.0 * (t * k * n) as f64 / s / 1e9;
                println!("speed threads {threads} {t}x{k}x{n}: best {:.1} GFLOP/s, median {:.1}", gf(times[0]), gf(times[reps / 2]));
            }
        }
    }

    /// Value (j, kk) at its place in panel j / NR, pair kk / 2, lane j % NR; every other value
    /// (a partial panel's lanes, an odd K's padding) zero.
    #[test]
    fn packing_puts_each_value_at_its_panel_place() {
        for (n, k) in [(37, 10), (33, 11), (64, 576), (1, 1), (32, 3)] {
            let w = values(n * k, 8);
            let packed = pack_le_bytes(&w.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(), n, k);
            let kp = pairs_depth(k);
            let mut want = vec![bf16::ZERO; packed_len(n, k)];
            for j in 0..n {
                for kk in 0..k {
                    want[(j / NR) * kp * NR + (kk / 2) * 2 * NR + (j % NR) * 2 + kk % 2] = w[j * k + kk];
                }
            }
            assert_eq!(packed, want, "{n}x{k}");
            assert_eq!(pack(&w, n, k), want, "{n}x{k}");
        }
    }

    #[test]
    fn packing_keeps_every_row_readable() {
        for k in [1, 10, 11] {
            let n = 37;
            let w = values(n * k, 7);
            let packed = pack(&w, n, k);
            assert_eq!(packed.len(), packed_len(n, k));
            for j in 0..n {
                let mut row = vec![];
                unpack_row(&packed, k, j, &mut row);
                assert_eq!(row, w[j * k..(j + 1) * k].iter().map(|v| v.to_f32()).collect::<Vec<_>>());
            }
        }
    }
}
