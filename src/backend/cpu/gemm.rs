//! The `linear` GEMM: out (T, N) = x (T, K) · w (N, K)ᵀ + bias (and SwiGLU's two products with
//! their SiLU·up, `matmul_silu_mul`), over weights packed once into column panels of f32, f16
//! or bf16 (elem.rs: widened exactly as the micro-kernel loads them, so a half-precision weight
//! gives the results of its f32 widening from half the bytes), by a register-blocked
//! micro-kernel chosen at run time (AVX-512, AVX2+FMA+F16C, or plain loops), threads splitting
//! (row block, panel range) tasks in one fork/join.
//!
//! Packed layout: w's N rows cut into panels of NR rows (the last one zero-padded); a panel is
//! (K, NR) row-major, so element (n, k) is at (n / NR)·K·NR + k·NR + n % NR and the micro-kernel
//! reads a panel front to back. The same loop serves decode (T <= MR rows: each panel streamed
//! once, the weight-read-bound GEMV) and prefill.
//!
//! Blocking: a (KC, NR) panel slice stays in L2 while every MR-row tile of an MC-row block goes
//! past it, and the (MC, KC) block of x stays in L2 or L3 across the task's panels. x is not
//! packed: a tile reads MR rows of x at stride K, KC values each. KC is large, so a decoder's
//! K is one block: a tile of out is written once, never reloaded between K blocks.

use super::elem::Elem;
use super::{vmath, SendPtr};
use rayon::prelude::*;
use std::sync::OnceLock;

/// Most depth of a K block: a (KC, 32) panel slice is 256 KiB, a quarter of a Zen 4 core's L2.
/// The micro-kernel streams its panel from L2 at full speed, and K blocks cost a reload and
/// store of out each: at SmolLM2's shapes (T = 2048) no K blocks gave 213 GFLOP/s on 2 threads
/// against 200 with KC = 256 (3 blocks of 192), and 1024x4544x1024 was no slower at 4544 than
/// at 1536 or 2048 (`bench --gemm`, 2026-12-01 session 6).
pub(super) const KC: usize = 2048;
/// Most rows of x per block: (MC, K) of SmolLM2's K = 576 is 540 KiB, in L2 beside the panel.
/// 120..2048 measured within noise of each other; 60 slower.
pub(super) const MC: usize = 240;
/// Below this many multiply-adds a call runs on the calling thread: forking costs more.
const SERIAL_MACS: usize = 1 << 15;
/// Tasks per thread: more than one so a thread slowed by another process is caught up by stealing.
const TASKS_PER_THREAD: usize = 4;

/// A micro-kernel and the panel width its packing uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// 12 rows x 32 columns in 24 zmm accumulators.
    Avx512,
    /// 6 rows x 16 columns in 12 ymm accumulators (F16C widens f16 panels).
    Avx2,
    /// 4 rows x 16 columns, plain loops (whatever the baseline target vectorises).
    Portable,
}

impl Kernel {
    /// The fastest kernel this CPU runs (detected once).
    pub fn detect() -> Kernel {
        static KERNEL: OnceLock<Kernel> = OnceLock::new();
        *KERNEL.get_or_init(|| *Kernel::available().first().unwrap_or(&Kernel::Portable))
    }

    /// Every kernel this CPU runs, fastest first.
    pub fn available() -> Vec<Kernel> {
        let mut ks = vec![];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                ks.push(Kernel::Avx512);
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
                ks.push(Kernel::Avx2);
            }
        }
        ks.push(Kernel::Portable);
        ks
    }

    /// Panel width: columns of out per tile.
    pub fn nr(self) -> usize {
        match self {
            Kernel::Avx512 => 32,
            Kernel::Avx2 | Kernel::Portable => 16,
        }
    }

    /// Rows of out per tile.
    pub fn mr(self) -> usize {
        match self {
            Kernel::Avx512 => 12,
            Kernel::Avx2 => 6,
            Kernel::Portable => 4,
        }
    }
}

/// Values the packed form of an (n, k) matrix takes.
pub fn packed_len(kernel: Kernel, n: usize, k: usize) -> usize {
    n.div_ceil(kernel.nr()) * k * kernel.nr()
}

/// w (N, K) row-major -> panels (N / NR, K, NR), the last panel's missing rows zero; panels
/// in parallel (a model's weights are packed once, at load, on every core).
pub fn pack<T: Copy + Default + Send + Sync>(kernel: Kernel, w: &[T], n: usize, k: usize) -> Vec<T> {
    let nr = kernel.nr();
    let mut out = vec![T::default(); packed_len(kernel, n, k)]; // (panels, K, NR)
    if k > 0 {
        out.par_chunks_mut(k * nr).enumerate().for_each(|(p, panel)| pack_panel(panel, p, w, n, k, k, nr));
    }
    out
}

/// `pack` of w (N, K) whose row j starts at src[j·ld], on the calling thread: one attention
/// head's keys, rows of a wider matrix.
pub fn pack_rows(kernel: Kernel, src: &[f32], n: usize, k: usize, ld: usize) -> Vec<f32> {
    let nr = kernel.nr();
    let mut out = vec![0f32; packed_len(kernel, n, k)]; // (panels, K, NR)
    if k > 0 {
        out.chunks_exact_mut(k * nr).enumerate().for_each(|(p, panel)| pack_panel(panel, p, src, n, k, ld, nr));
    }
    out
}

/// Panel p (K, NR) of w (N, K), w's row j at src[j·ld]; lanes past N stay as they are (zero).
fn pack_panel<T: Copy>(panel: &mut [T], p: usize, src: &[T], n: usize, k: usize, ld: usize, nr: usize) {
    for lane in 0..nr.min(n - p * nr) {
        for (kk, &v) in src[(p * nr + lane) * ld..][..k].iter().enumerate() {
            panel[kk * nr + lane] = v;
        }
    }
}

/// `pack` of w = srcᵀ, src (K, N) with row kk at src[kk·ld]: one attention head's values, for
/// p (B, K) · v (K, D).
pub fn pack_cols(kernel: Kernel, src: &[f32], k: usize, n: usize, ld: usize) -> Vec<f32> {
    let nr = kernel.nr();
    let mut out = vec![0f32; packed_len(kernel, n, k)]; // (panels, K, NR)
    if k > 0 {
        for (p, panel) in out.chunks_exact_mut(k * nr).enumerate() {
            let (c0, width) = (p * nr, nr.min(n - p * nr));
            for kk in 0..k {
                panel[kk * nr..][..width].copy_from_slice(&src[kk * ld + c0..][..width]);
            }
        }
    }
    out
}

/// Row `j` (K values) of the matrix that `packed` holds: the row lookup of tied embeddings.
pub fn unpack_row<W: Elem>(kernel: Kernel, packed: &[W], k: usize, j: usize, out: &mut Vec<f32>) {
    let nr = kernel.nr();
    let base = (j / nr) * k * nr + j % nr;
    out.extend((0..k).map(|kk| packed[base + kk * nr].widen()));
}

/// How a tile's accumulators start.
#[derive(Clone, Copy)]
pub(super) enum Init {
    Zero,
    /// The panel's NR bias values (fewer at the last panel: only `ncols` are read).
    Bias(*const f32),
    /// What out holds: a later K block, or the first over a residual.
    Load,
    /// What out holds plus the panel's bias: the first K block over a residual.
    LoadBias(*const f32),
}

impl Init {
    /// The start of the tile at out column `col` over the K block starting at depth `k0`.
    ///
    /// # Safety
    /// `bias`, when given, holds at least `col` values.
    pub(super) unsafe fn at(k0: usize, bias: Option<&[f32]>, mode: Out, col: usize) -> Init {
        match (k0, bias, mode) {
            (0, Some(bias), Out::Write) => Init::Bias(bias.as_ptr().add(col)),
            (0, None, Out::Write) => Init::Zero,
            (0, Some(bias), Out::Accumulate) => Init::LoadBias(bias.as_ptr().add(col)),
            _ => Init::Load,
        }
    }
}

/// What `matmul` does with out's values.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Out {
    /// Overwrite them (they may be uninitialised).
    Write,
    /// Add the product to them: a residual summed inside the GEMM.
    Accumulate,
}

/// Most matrices one product's out is cut into (`Dest`): q, k and v.
pub(super) const MAX_PARTS: usize = 3;

/// Where a product's out (T, N) goes: N's columns in consecutive blocks, each block its own
/// row-major (T, width) matrix. One block is one (T, N) matrix; several let a product over a
/// fused weight (q|k|v) write q, k and v apart, with no copy of its columns after. Every block
/// but the last is whole panels wide (`Dest::split`), so no tile straddles two.
#[derive(Clone, Copy)]
pub(super) struct Dest {
    /// (the block's first value, its width) for the first `len`
    parts: [(SendPtr, usize); MAX_PARTS],
    len: usize,
}

impl Dest {
    /// One (T, n) matrix at `out`.
    pub(super) fn whole(out: *mut f32, n: usize) -> Dest {
        Dest { parts: [(SendPtr(out), n); MAX_PARTS], len: 1 }
    }

    /// Blocks of the given (first value, width), in column order; None when there are more than
    /// MAX_PARTS or a block but the last is not whole `nr`-column panels (the caller then
    /// writes one matrix and copies the columns out).
    pub(super) fn split(parts: &[(*mut f32, usize)], nr: usize) -> Option<Dest> {
        let whole_panels = parts.iter().rev().skip(1).all(|&(_, w)| w % nr == 0);
        if parts.is_empty() || parts.len() > MAX_PARTS || !whole_panels {
            return None;
        }
        let mut d = Dest { parts: [(SendPtr(std::ptr::null_mut()), 0); MAX_PARTS], len: parts.len() };
        for (slot, &(p, w)) in d.parts.iter_mut().zip(parts) {
            *slot = (SendPtr(p), w);
        }
        Some(d)
    }

    /// out[row][col]'s address, and the row stride of its block.
    ///
    /// # Safety
    /// col < N and row < T of the matrices the blocks point to.
    #[inline(always)]
    pub(super) unsafe fn at(&self, row: usize, col: usize) -> (*mut f32, usize) {
        let mut c = col;
        for &(p, w) in &self.parts[..self.len - 1] {
            if c < w {
                return (p.0.add(row * w + c), w);
            }
            c -= w;
        }
        let (p, w) = self.parts[self.len - 1];
        (p.0.add(row * w + c), w)
    }
}

/// out (T, N) (+)= x (T, K) · wᵀ (+ bias (N,)), w packed by `pack` with the same kernel.
///
/// # Safety
/// `out` covers t·n writable floats (with `Out::Write` they may be uninitialised: every one
/// is written before any is read); `x` holds t·k values, `w` packed_len(n, k), `bias` n.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul<W: Elem>(kernel: Kernel, x: &[f32], t: usize, k: usize, w: &[W], n: usize, bias: Option<&[f32]>, out: Dest, mode: Out) {
    debug_assert!(x.len() >= t * k && w.len() >= packed_len(kernel, n, k) && bias.is_none_or(|b| b.len() >= n));
    if t == 0 || n == 0 {
        return;
    }
    // SAFETY: tasks write disjoint (rows, panels) blocks of out; the caller's contract covers
    // the rest.
    fork(kernel.nr(), kernel.mr(), t, k, n, |rows, panels| unsafe { block(kernel, x, k, w, n, bias, out, mode, rows, panels) });
}

/// out (T, N) = silu(x · gᵀ + bg) ⊙ (x · uᵀ + bu): SwiGLU's gate and up products in one pass,
/// g and u packed by `pack` with the same kernel. Each row tile runs the gate tile into out and
/// the up tile into a (MR, NR) buffer on the stack, then multiplies in place while the tile is
/// in L1: the up product is never stored whole, and no separate pass reads the two back. The
/// values are those of two `matmul`s and `vmath::silu_mul_slice` (the same tiles, in the same
/// order).
///
/// # Safety
/// As `matmul` with `Out::Write`, for both weights and biases, and `fuses_silu_mul(k)`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_silu_mul<W: Elem>(kernel: Kernel, x: &[f32], t: usize, k: usize, g: &[W], bg: Option<&[f32]>, u: &[W], bu: Option<&[f32]>, n: usize, out: *mut f32) {
    debug_assert!(fuses_silu_mul(k) && x.len() >= t * k && g.len().min(u.len()) >= packed_len(kernel, n, k));
    if t == 0 || n == 0 {
        return;
    }
    let out = SendPtr(out);
    // SAFETY: as in `matmul`.
    fork(kernel.nr(), kernel.mr(), t, k, n, |rows, panels| unsafe { block_silu_mul(kernel, x, k, g, bg, u, bu, n, out, rows, panels) });
}

/// Whether `matmul_silu_mul` takes depth k: one K block. Deeper, each up partial sum would have
/// to be kept whole between blocks, which is the unfused route.
pub fn fuses_silu_mul(k: usize) -> bool {
    k <= KC
}

/// Cuts out (T, N) into (row block, panel range) tasks, for panels of `nr` columns and tiles
/// of `mr` rows, and runs them on the pool, or on the calling thread when the product is too
/// small to fork for.
pub(super) fn fork(nr: usize, mr: usize, t: usize, k: usize, n: usize, task: impl Fn(std::ops::Range<usize>, std::ops::Range<usize>) + Sync) {
    let panels = n.div_ceil(nr);
    let threads = rayon::current_num_threads();
    let want = if t * n * k < SERIAL_MACS { 1 } else { threads * TASKS_PER_THREAD };
    // Panels first (each task then reads only its part of w); rows as well when there are few
    // panels, in whole MR tiles.
    let panel_parts = panels.min(want);
    let row_parts = want.div_ceil(panel_parts).min(t.div_ceil(mr));
    let rows_per = t.div_ceil(row_parts).div_ceil(mr) * mr;
    let row_parts = t.div_ceil(rows_per);
    let run = |i: usize| {
        let (rp, pp) = (i / panel_parts, i % panel_parts);
        task(rp * rows_per..((rp + 1) * rows_per).min(t), pp * panels / panel_parts..(pp + 1) * panels / panel_parts);
    };
    let tasks = row_parts * panel_parts;
    if tasks == 1 {
        run(0);
    } else {
        super::spin::keep_workers_awake();
        (0..tasks).into_par_iter().for_each(run);
    }
}

/// out (t, n) = x (t, k) · wᵀ on the calling thread, x's rows `lda` apart and out's `ldc`; w
/// in `pack`'s panels, panel p at w + p·panel_stride (k·NR when w is exactly (n, k); larger
/// when the product reads a window of a bigger packed matrix). The row tile of rows [r0, r1)
/// computes only out's first `used(r0, r1).0` columns, over the first `used(r0, r1).1` of the
/// depth: attention's masks say where a tile's scores are never read or its probabilities are
/// all 0. No K blocks: attention's depths (D, or a block's keys) keep a panel in L1 or L2.
///
/// With `add`, out += the product instead (a product over a second range of the depth).
///
/// # Safety
/// `x` covers t rows at stride lda of k values, `out` t rows at stride ldc of n writable
/// floats, `w` n.div_ceil(NR) panels of k·NR values; columns past a tile's `used` are left
/// as they were.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_tiles(
    kernel: Kernel,
    x: *const f32,
    lda: usize,
    t: usize,
    k: usize,
    w: *const f32,
    panel_stride: usize,
    n: usize,
    out: *mut f32,
    ldc: usize,
    add: bool,
    used: impl Fn(usize, usize) -> (usize, usize),
) {
    let (nr, mr) = (kernel.nr(), kernel.mr());
    let init = if add { Init::Load } else { Init::Zero };
    used_tiles(t, k, n, mr, nr, used, |r0, r1, p, ncols, depth| {
        let tile = Tile { kc: depth, a: x.add(r0 * lda), lda, b: w.add(p * panel_stride), c: out.add(r0 * ldc + p * nr), ldc, ncols, init };
        tile.run(kernel, r1 - r0);
    });
}

/// The tiles of a `matmul_tiles` (this kernel's or gemm_bf16.rs's): for each row tile
/// [r0, r1) of `mr` rows, `tile(r0, r1, p, ncols, depth)` for its panels p of `nr` columns up to
/// the columns `used(r0, r1)` says, ncols of panel p, depth as `used` says; both clipped to
/// n and k.
pub(super) fn used_tiles(t: usize, k: usize, n: usize, mr: usize, nr: usize, used: impl Fn(usize, usize) -> (usize, usize), mut tile: impl FnMut(usize, usize, usize, usize, usize)) {
    for r0 in (0..t).step_by(mr) {
        let r1 = (r0 + mr).min(t);
        let (cols, depth) = used(r0, r1);
        let (cols, depth) = (cols.min(n), depth.min(k));
        for p in 0..cols.div_ceil(nr) {
            tile(r0, r1, p, nr.min(cols - p * nr), depth);
        }
    }
}

/// The block size that cuts `len` into the fewest blocks of at most `max`, all equal but the
/// last, rounded up to a multiple of `unit`.
pub(super) fn even_split(len: usize, max: usize, unit: usize) -> usize {
    let blocks = len.div_ceil(max).max(1);
    len.div_ceil(blocks).div_ceil(unit) * unit
}

/// Rows `rows` and panels `panels` of out, K block by K block.
///
/// # Safety
/// As `matmul`, and no one else writes this block of out meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn block<W: Elem>(kernel: Kernel, x: &[f32], k: usize, w: &[W], n: usize, bias: Option<&[f32]>, out: Dest, mode: Out, rows: std::ops::Range<usize>, panels: std::ops::Range<usize>) {
    let (nr, mr) = (kernel.nr(), kernel.mr());
    // Blocks of equal size (rows in whole tiles): 576 = 3 x 192, not 256 + 256 + 64.
    let mc = even_split(rows.len(), MC, mr);
    // K blocks keep a tile of x cached while it meets many panels; a single row tile (decode)
    // meets each panel once, so it streams every panel whole: the task's panels are then one
    // contiguous run of memory, which the prefetchers follow across pages.
    let kc_max = if rows.len() <= mr { k.max(1) } else { even_split(k, KC, 1).max(1) };
    let mut wide = Widened::default();
    for m0 in rows.clone().step_by(mc) {
        let m1 = (m0 + mc).min(rows.end);
        for k0 in (0..k.max(1)).step_by(kc_max) {
            let kc = kc_max.min(k - k0);
            for p in panels.clone() {
                let ncols = nr.min(n - p * nr);
                let init = Init::at(k0, bias, mode, p * nr);
                let b = &w[p * k * nr + k0 * nr..][..kc * nr];
                let tile = |i0: usize| {
                    let (c, ldc) = out.at(i0, p * nr);
                    Tile { kc, a: x.as_ptr().add(i0 * k + k0), lda: k, b: std::ptr::null(), c, ldc, ncols, init }
                };
                match wide.panel(kernel, b, m1 - m0) {
                    Some(b) => (m0..m1).step_by(mr).for_each(|i0| tile(i0).with(b.as_ptr()).run(kernel, mr.min(m1 - i0))),
                    None => (m0..m1).step_by(mr).for_each(|i0| tile(i0).with(b.as_ptr()).run(kernel, mr.min(m1 - i0))),
                }
            }
        }
    }
}

/// A half-precision panel slice widened once for the row block's tiles: each tile widening it
/// again as it loads costs prefill (T > MR) ~5-10% over f32 panels (`bench --gemm`), while one
/// pass into this buffer, which stays in L1/L2 for the tiles after, costs ~1/(MC/MR) of that.
/// Decode (one tile) loads the half values directly: there the bytes read are the cost.
#[derive(Default)]
struct Widened(Vec<f32>);

impl Widened {
    /// `b` widened when it is half precision and `rows` (> MR) make several tiles meet it.
    fn panel<W: Elem>(&mut self, kernel: Kernel, b: &[W], rows: usize) -> Option<&[f32]> {
        if W::as_f32(b).is_some() || rows <= kernel.mr() {
            return None;
        }
        widen_into(kernel, b, &mut self.0);
        Some(&self.0)
    }
}

/// `dst` set to `src` widened to f32, by `kernel`'s vector loads (its capacity kept).
pub(super) fn widen_into<W: Elem>(kernel: Kernel, src: &[W], dst: &mut Vec<f32>) {
    dst.clear();
    dst.reserve(src.len());
    // SAFETY: dst has room for src.len() values, all written; `kernel` was detected on this CPU.
    unsafe {
        widen(kernel, src, dst.spare_capacity_mut().as_mut_ptr().cast());
        dst.set_len(src.len());
    }
}

/// dst[i] = src[i] as f32, for src.len() values.
///
/// # Safety
/// dst has room for src.len() values; `kernel` runs on this CPU.
unsafe fn widen<W: Elem>(kernel: Kernel, src: &[W], dst: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512<W: Elem>(src: &[W], dst: *mut f32) -> usize {
        let whole = src.len() / 16 * 16;
        for i in (0..whole).step_by(16) {
            std::arch::x86_64::_mm512_storeu_ps(dst.add(i), W::load16(src.as_ptr().add(i)));
        }
        whole
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn avx2<W: Elem>(src: &[W], dst: *mut f32) -> usize {
        let whole = src.len() / 8 * 8;
        for i in (0..whole).step_by(8) {
            std::arch::x86_64::_mm256_storeu_ps(dst.add(i), W::load8(src.as_ptr().add(i)));
        }
        whole
    }
    let done = match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => avx512(src, dst),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => avx2(src, dst),
        _ => 0,
    };
    for (i, v) in src.iter().enumerate().skip(done) {
        dst.add(i).write(v.widen());
    }
}

/// `matmul_silu_mul`'s rows `rows` and panels `panels`, k <= KC (one K block).
///
/// # Safety
/// As `block`, for both weights.
#[allow(clippy::too_many_arguments)]
unsafe fn block_silu_mul<W: Elem>(kernel: Kernel, x: &[f32], k: usize, g: &[W], bg: Option<&[f32]>, u: &[W], bu: Option<&[f32]>, n: usize, out: SendPtr, rows: std::ops::Range<usize>, panels: std::ops::Range<usize>) {
    const MAX_TILE: usize = 12 * 32; // the largest MR x NR
    let (nr, mr) = (kernel.nr(), kernel.mr());
    let mut up = [0f32; MAX_TILE]; // (MR, NR): one tile of the up product
    let init = |bias: Option<&[f32]>, p: usize| bias.map_or(Init::Zero, |b| Init::Bias(b.as_ptr().add(p * nr)));
    let mc = even_split(rows.len(), MC, mr);
    let (mut wide_g, mut wide_u) = (Widened::default(), Widened::default());
    for m0 in rows.clone().step_by(mc) {
        let m1 = (m0 + mc).min(rows.end);
        for p in panels.clone() {
            let ncols = nr.min(n - p * nr);
            let (gp, upp) = (&g[p * k * nr..][..k * nr], &u[p * k * nr..][..k * nr]);
            let widened = (wide_g.panel(kernel, gp, m1 - m0), wide_u.panel(kernel, upp, m1 - m0));
            for i0 in (m0..m1).step_by(mr) {
                let (r, a, c) = (mr.min(m1 - i0), x.as_ptr().add(i0 * k), out.0.add(i0 * n + p * nr));
                let gate = Tile { kc: k, a, lda: k, b: std::ptr::null(), c, ldc: n, ncols, init: init(bg, p) };
                let up_tile = Tile { kc: k, a, lda: k, b: std::ptr::null(), c: up.as_mut_ptr(), ldc: nr, ncols, init: init(bu, p) };
                match widened {
                    (Some(wg), Some(wu)) => {
                        gate.with(wg.as_ptr()).run(kernel, r);
                        up_tile.with(wu.as_ptr()).run(kernel, r);
                    }
                    _ => {
                        gate.with(gp.as_ptr()).run(kernel, r);
                        up_tile.with(upp.as_ptr()).run(kernel, r);
                    }
                }
                for (i, up) in up.chunks_exact(nr).take(r).enumerate() {
                    vmath::silu_mul_slice(std::slice::from_raw_parts_mut(c.add(i * n), ncols), &up[..ncols]);
                }
            }
        }
    }
}

/// One (rows, ncols) tile of out over one K block: out[i][j] (=|+=) Σ_p a[i·lda + p]·b[p·NR + j].
struct Tile<W = f32> {
    kc: usize,
    /// x at the tile's first row and the block's first column.
    a: *const f32,
    lda: usize,
    /// The panel at the block's first K row: (kc, NR).
    b: *const W,
    /// out at the tile's first row and the panel's first column.
    c: *mut f32,
    ldc: usize,
    /// Valid columns of the panel (NR except at the last one).
    ncols: usize,
    init: Init,
}

/// Calls `$f::<R, W>($tile)` for R = `$rows`, one of the listed literals.
macro_rules! by_rows {
    ($f:ident, $w:ty, $rows:expr, $tile:expr, $($r:literal)*) => {
        match $rows {
            $($r => $f::<$r, $w>($tile),)*
            _ => unreachable!("tile rows are at most the kernel's MR"),
        }
    };
}

impl Tile<()> {
    /// This tile over the panel slice at b.
    fn with<V>(self, b: *const V) -> Tile<V> {
        Tile { kc: self.kc, a: self.a, lda: self.lda, b, c: self.c, ldc: self.ldc, ncols: self.ncols, init: self.init }
    }
}

impl<W: Elem> Tile<W> {
    /// # Safety
    /// The pointers cover `rows` x `ncols` of out, `rows` x kc of x, kc x NR of the panel, and
    /// `kernel` runs on this CPU.
    unsafe fn run(&self, kernel: Kernel, rows: usize) {
        match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => by_rows!(tile_avx512, W, rows, self, 1 2 3 4 5 6 7 8 9 10 11 12),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => by_rows!(tile_avx2, W, rows, self, 1 2 3 4 5 6),
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Avx512 | Kernel::Avx2 => unreachable!("x86 kernels are never detected elsewhere"),
            Kernel::Portable => by_rows!(tile_portable, W, rows, self, 1 2 3 4),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512<const R: usize, W: Elem>(t: &Tile<W>) {
    use std::arch::x86_64::*;
    let masks = avx512::masks(t.ncols);
    let mut acc = avx512::start::<R>(t.init, t.c, t.ldc, masks);
    for p in 0..t.kc {
        let b = t.b.add(p * 32);
        let (b0, b1) = (W::load16(b), W::load16(b.add(16)));
        for (i, a) in acc.iter_mut().enumerate() {
            let x = _mm512_set1_ps(*t.a.add(i * t.lda + p));
            a[0] = _mm512_fmadd_ps(x, b0, a[0]);
            a[1] = _mm512_fmadd_ps(x, b1, a[1]);
        }
    }
    avx512::store(&acc, t.init, t.c, t.ldc, masks);
}

/// The AVX-512 tiles' accumulators, (R, 32 columns) in two zmm per row: how they start and
/// how they are stored, shared by the f32 FMA kernel and the bf16 dot-product kernel.
#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    use super::Init;
    use std::arch::x86_64::*;

    /// The write masks of a tile's two halves for its `ncols` valid columns.
    #[inline(always)]
    pub fn masks(ncols: usize) -> (u16, u16) {
        let m = if ncols >= 32 { u32::MAX } else { (1u32 << ncols) - 1 };
        (m as u16, (m >> 16) as u16)
    }

    /// The accumulators' start: zero or the panel's bias. What out holds (Init::Load, LoadBias)
    /// is added at `store`, not loaded here: a residual's or an earlier K block's tile of out is
    /// not in cache, and loading it first left the products waiting on 2·R misses per tile
    /// (prefetched here instead, it arrives while they run). The sum is then bias + products,
    /// plus out at the end, the order HF's `residual + linear(x)` adds in.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `c` covers R rows at stride ldc of the masks' columns, and the
    /// init's bias pointer the masks' columns.
    #[inline(always)]
    pub unsafe fn start<const R: usize>(init: Init, c: *const f32, ldc: usize, (m0, m1): (u16, u16)) -> [[__m512; 2]; R] {
        let bias = |p: *const f32| [_mm512_maskz_loadu_ps(m0, p), _mm512_maskz_loadu_ps(m1, p.wrapping_add(16))];
        if matches!(init, Init::Load | Init::LoadBias(_)) {
            for i in 0..R {
                let c = c.wrapping_add(i * ldc);
                _mm_prefetch::<_MM_HINT_T0>(c.cast());
                _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(16).cast());
            }
        }
        match init {
            Init::Zero | Init::Load => [[_mm512_setzero_ps(); 2]; R],
            Init::Bias(p) | Init::LoadBias(p) => [bias(p); R],
        }
    }

    /// acc into out (plus what out holds, for the inits that load it).
    ///
    /// # Safety
    /// As `start`, c writable.
    #[inline(always)]
    pub unsafe fn store<const R: usize>(acc: &[[__m512; 2]; R], init: Init, c: *mut f32, ldc: usize, (m0, m1): (u16, u16)) {
        let load = matches!(init, Init::Load | Init::LoadBias(_));
        for (i, a) in acc.iter().enumerate() {
            let c = c.add(i * ldc);
            let (mut lo, mut hi) = (a[0], a[1]);
            if load {
                lo = _mm512_add_ps(lo, _mm512_maskz_loadu_ps(m0, c));
                hi = _mm512_add_ps(hi, _mm512_maskz_loadu_ps(m1, c.wrapping_add(16)));
            }
            _mm512_mask_storeu_ps(c, m0, lo);
            _mm512_mask_storeu_ps(c.wrapping_add(16), m1, hi);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2<const R: usize, W: Elem>(t: &Tile<W>) {
    use std::arch::x86_64::*;
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let n = t.ncols as i32;
    let (m0, m1) = (_mm256_cmpgt_epi32(_mm256_set1_epi32(n), lanes), _mm256_cmpgt_epi32(_mm256_set1_epi32(n - 8), lanes));
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    match t.init {
        Init::Zero => {}
        Init::Bias(p) => {
            let v = [_mm256_maskload_ps(p, m0), _mm256_maskload_ps(p.wrapping_add(8), m1)];
            acc = [v; R];
        }
        Init::Load => {
            for (i, a) in acc.iter_mut().enumerate() {
                let c = t.c.add(i * t.ldc);
                *a = [_mm256_maskload_ps(c, m0), _mm256_maskload_ps(c.wrapping_add(8), m1)];
            }
        }
        Init::LoadBias(p) => {
            let v = [_mm256_maskload_ps(p, m0), _mm256_maskload_ps(p.wrapping_add(8), m1)];
            for (i, a) in acc.iter_mut().enumerate() {
                let c = t.c.add(i * t.ldc);
                *a = [_mm256_add_ps(v[0], _mm256_maskload_ps(c, m0)), _mm256_add_ps(v[1], _mm256_maskload_ps(c.wrapping_add(8), m1))];
            }
        }
    }
    for p in 0..t.kc {
        let b = t.b.add(p * 16);
        let (b0, b1) = (W::load8(b), W::load8(b.add(8)));
        for (i, a) in acc.iter_mut().enumerate() {
            let x = _mm256_set1_ps(*t.a.add(i * t.lda + p));
            a[0] = _mm256_fmadd_ps(x, b0, a[0]);
            a[1] = _mm256_fmadd_ps(x, b1, a[1]);
        }
    }
    for (i, a) in acc.iter().enumerate() {
        let c = t.c.add(i * t.ldc);
        _mm256_maskstore_ps(c, m0, a[0]);
        _mm256_maskstore_ps(c.wrapping_add(8), m1, a[1]);
    }
}

unsafe fn tile_portable<const R: usize, W: Elem>(t: &Tile<W>) {
    const NR: usize = 16;
    let mut acc = [[0f32; NR]; R];
    match t.init {
        Init::Zero => {}
        Init::Bias(p) => {
            for a in acc.iter_mut() {
                a[..t.ncols].copy_from_slice(std::slice::from_raw_parts(p, t.ncols));
            }
        }
        Init::Load => {
            for (i, a) in acc.iter_mut().enumerate() {
                a[..t.ncols].copy_from_slice(std::slice::from_raw_parts(t.c.add(i * t.ldc), t.ncols));
            }
        }
        Init::LoadBias(p) => {
            let bias = std::slice::from_raw_parts(p, t.ncols);
            for (i, a) in acc.iter_mut().enumerate() {
                for ((o, &c), &b) in a.iter_mut().zip(std::slice::from_raw_parts(t.c.add(i * t.ldc), t.ncols)).zip(bias) {
                    *o = c + b;
                }
            }
        }
    }
    for p in 0..t.kc {
        let b = std::slice::from_raw_parts(t.b.add(p * NR), NR);
        for (i, a) in acc.iter_mut().enumerate() {
            let x = *t.a.add(i * t.lda + p);
            for (o, &w) in a.iter_mut().zip(b) {
                *o += x * w.widen();
            }
        }
    }
    for (i, a) in acc.iter().enumerate() {
        std::slice::from_raw_parts_mut(t.c.add(i * t.ldc), t.ncols).copy_from_slice(&a[..t.ncols]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    fn values(n: usize, seed: u64) -> Vec<f32> {
        crate::testing::rand_values(n, seed, 1.0)
    }

    /// out[t][j] = Σ_k x[t][k]·w[j][k] + b[j], in f64.
    fn reference(x: &[f32], w: &[f32], b: Option<&[f32]>, t: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; t * n];
        for r in 0..t {
            for j in 0..n {
                let mut acc = 0f64;
                for i in 0..k {
                    acc += x[r * k + i] as f64 * w[j * k + i] as f64;
                }
                out[r * n + j] = (acc + b.map_or(0.0, |b| b[j] as f64)) as f32;
            }
        }
        out
    }

    /// The product written over NaNs, or added to `residual`.
    #[allow(clippy::too_many_arguments)]
    fn run(kernel: Kernel, x: &[f32], w: &[f32], b: Option<&[f32]>, t: usize, k: usize, n: usize, residual: Option<&[f32]>) -> Vec<f32> {
        let packed = pack(kernel, w, n, k);
        let (mut out, mode) = match residual {
            Some(r) => (r.to_vec(), Out::Accumulate),
            None => (vec![f32::NAN; t * n], Out::Write),
        };
        // SAFETY: out holds t·n floats, x t·k, packed its packed_len, b n.
        unsafe { matmul(kernel, x, t, k, &packed, n, b, Dest::whole(out.as_mut_ptr(), n), mode) };
        out
    }

    /// A product cut into blocks (q|k|v) writes each block's matrix with exactly the values of
    /// the whole product's columns, for one row and many, with and without bias.
    #[test]
    fn split_destinations_get_the_whole_products_columns() {
        for kernel in Kernel::available() {
            let nr = kernel.nr();
            let widths = [3 * nr, nr, nr + 5];
            let (k, n) = (37, widths.iter().sum::<usize>());
            for t in [1, 7, 2 * MC + 3] {
                let (x, w, b) = (values(t * k, 1), values(n * k, 2), values(n, 3));
                let packed = pack(kernel, &w, n, k);
                for bias in [None, Some(&b[..])] {
                    let whole = run(kernel, &x, &w, bias, t, k, n, None);
                    let mut outs: Vec<Vec<f32>> = widths.iter().map(|&w| vec![f32::NAN; t * w]).collect();
                    let parts: Vec<(*mut f32, usize)> = outs.iter_mut().zip(widths).map(|(o, w)| (o.as_mut_ptr(), w)).collect();
                    let dest = Dest::split(&parts, nr).expect("whole panels");
                    // SAFETY: each block holds t rows of its width, x t·k, packed its packed_len.
                    unsafe { matmul(kernel, &x, t, k, &packed, n, bias, dest, Out::Write) };
                    let mut start = 0;
                    for (o, &width) in outs.iter().zip(&widths) {
                        for r in 0..t {
                            assert_eq!(o[r * width..][..width], whole[r * n + start..][..width], "{kernel:?} t {t} block at {start} row {r}");
                        }
                        start += width;
                    }
                }
            }
            // A block but the last that ends inside a panel, or too many blocks: no split.
            let p = std::ptr::null_mut();
            assert!(Dest::split(&[(p, nr + 1), (p, nr)], nr).is_none());
            assert!(Dest::split(&[(p, nr); MAX_PARTS + 1], nr).is_none());
            assert!(Dest::split(&[(p, nr), (p, 1)], nr).is_some());
        }
    }

    #[test]
    fn every_kernel_matches_the_triple_loop_on_awkward_shapes() {
        // T: one row, fewer than MR, more than MC; K: under, across and not a multiple of KC;
        // N: odd, under one panel, a partial last panel.
        let shapes = [(1, 5, 3), (3, 200, 33), (17, 193, 31), (13, 385, 97), (513, 77, 65), (4, 1, 40), (2, 600, 1), (14, 2 * KC + 3, 35)];
        for kernel in Kernel::available() {
            for (si, &(t, k, n)) in shapes.iter().enumerate() {
                let (x, w, b) = (values(t * k, si as u64), values(n * k, 100 + si as u64), values(n, 200 + si as u64));
                let residual = values(t * n, 300 + si as u64);
                for (bias, res) in [(None, None), (Some(&b[..]), None), (None, Some(&residual[..])), (Some(&b[..]), Some(&residual[..]))] {
                    let got = run(kernel, &x, &w, bias, t, k, n, res);
                    let mut want = reference(&x, &w, bias, t, k, n);
                    if let Some(r) = res {
                        want.iter_mut().zip(r).for_each(|(e, r)| *e += r);
                    }
                    for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - e).abs() <= 2e-6 * (k as f32).sqrt() * (1.0 + e.abs()),
                            "{kernel:?} {t}x{k}x{n} bias {} residual {} at {i}: {g} vs {e}",
                            bias.is_some(),
                            res.is_some()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn fused_silu_mul_gives_the_two_products_and_silu_mul_exactly() {
        // As above, plus T past one MC block and the deepest K fused (one K block).
        let shapes = [(1, 5, 3), (3, 200, 33), (17, 193, 31), (13, 385, 97), (513, 77, 65), (2, 600, 1), (5, KC, 40)];
        for kernel in Kernel::available() {
            for (si, &(t, k, n)) in shapes.iter().enumerate() {
                let x = values(t * k, si as u64);
                let (g, u) = (values(n * k, 100 + si as u64), values(n * k, 200 + si as u64));
                let (bg, bu) = (values(n, 300 + si as u64), values(n, 400 + si as u64));
                let (pg, pu) = (pack(kernel, &g, n, k), pack(kernel, &u, n, k));
                for (bg, bu) in [(None, None), (Some(&bg[..]), Some(&bu[..])), (None, Some(&bu[..]))] {
                    let mut want = run(kernel, &x, &g, bg, t, k, n, None);
                    vmath::silu_mul_slice(&mut want, &run(kernel, &x, &u, bu, t, k, n, None));
                    let mut got = vec![f32::NAN; t * n];
                    // SAFETY: got holds t·n floats, x t·k, both packed weights their packed_len.
                    unsafe { matmul_silu_mul(kernel, &x, t, k, &pg, bg, &pu, bu, n, got.as_mut_ptr()) };
                    let differ = got.iter().zip(&want).position(|(a, b)| a.to_bits() != b.to_bits());
                    assert_eq!(differ, None, "{kernel:?} {t}x{k}x{n} biases {} {}", bg.is_some(), bu.is_some());
                }
            }
        }
    }

    /// `matmul` written and accumulated, and `matmul_silu_mul` (where k fuses; else the written
    /// product again), over panels of w (and u) in their own dtype.
    fn run_routes<W: Elem>(kernel: Kernel, x: &[f32], w: &[W], u: &[W], b: Option<&[f32]>, t: usize, k: usize, n: usize, residual: &[f32]) -> [Vec<f32>; 3] {
        let (pw, pu) = (pack(kernel, w, n, k), pack(kernel, u, n, k));
        let (mut written, mut added, mut fused) = (vec![f32::NAN; t * n], residual.to_vec(), vec![f32::NAN; t * n]);
        // SAFETY: each output holds t·n floats, x t·k, the packed weights their packed_len, b n.
        unsafe {
            matmul(kernel, x, t, k, &pw, n, b, Dest::whole(written.as_mut_ptr(), n), Out::Write);
            matmul(kernel, x, t, k, &pw, n, b, Dest::whole(added.as_mut_ptr(), n), Out::Accumulate);
            match fuses_silu_mul(k) {
                true => matmul_silu_mul(kernel, x, t, k, &pw, b, &pu, None, n, fused.as_mut_ptr()),
                false => matmul(kernel, x, t, k, &pu, n, None, Dest::whole(fused.as_mut_ptr(), n), Out::Write),
            }
        }
        [written, added, fused]
    }

    #[test]
    fn half_precision_panels_give_the_f32_results_of_their_values_exactly() {
        // Widening is exact, so bf16 / f16 weights must give, bit for bit, what f32 weights
        // holding the same values give: every kernel, every route, K over one block included.
        let shapes = [(1, 5, 3), (3, 200, 33), (17, 193, 31), (513, 77, 65), (2, 2 * KC + 3, 35)];
        for kernel in Kernel::available() {
            for (si, &(t, k, n)) in shapes.iter().enumerate() {
                let (x, b, residual) = (values(t * k, si as u64), values(n, 300 + si as u64), values(t * n, 400 + si as u64));
                let (w, u) = (values(n * k, 100 + si as u64), values(n * k, 200 + si as u64));
                let (w16, u16): (Vec<f16>, Vec<f16>) = (w.iter().map(|&v| f16::from_f32(v)).collect(), u.iter().map(|&v| f16::from_f32(v)).collect());
                let (wb, ub): (Vec<bf16>, Vec<bf16>) = (w.iter().map(|&v| bf16::from_f32(v)).collect(), u.iter().map(|&v| bf16::from_f32(v)).collect());
                for (name, got, wide) in [
                    ("f16", run_routes(kernel, &x, &w16, &u16, Some(&b), t, k, n, &residual), (widen(&w16), widen(&u16))),
                    ("bf16", run_routes(kernel, &x, &wb, &ub, Some(&b), t, k, n, &residual), (widen(&wb), widen(&ub))),
                ] {
                    let want = run_routes(kernel, &x, &wide.0, &wide.1, Some(&b), t, k, n, &residual);
                    for (route, (g, e)) in ["write", "accumulate", "silu_mul"].iter().zip(got.iter().zip(&want)) {
                        let differ = g.iter().zip(e).position(|(a, b)| a.to_bits() != b.to_bits());
                        assert_eq!(differ, None, "{kernel:?} {name} {route} {t}x{k}x{n}");
                    }
                }
            }
        }
    }

    fn widen<W: Elem>(v: &[W]) -> Vec<f32> {
        v.iter().map(|&x| x.widen()).collect()
    }

    #[test]
    fn packing_keeps_every_row_readable() {
        for kernel in Kernel::available() {
            let (n, k) = (37, 11);
            let w = values(n * k, 7);
            let packed = pack(kernel, &w, n, k);
            assert_eq!(packed.len(), packed_len(kernel, n, k));
            for j in 0..n {
                let mut row = vec![];
                unpack_row(kernel, &packed, k, j, &mut row);
                assert_eq!(row, &w[j * k..(j + 1) * k]);
            }
        }
    }
}
