//! CPU backend: the numeric reference. f32 arithmetic over weights widened to f32 at upload
//! (matrices packed there for the own GEMM of `gemm.rs`), attention's small GEMMs by the `gemm`
//! crate, row loops spread over cores by rayon, elementwise math by the vectorised f32
//! functions of `vmath` (each tested against an f64 plain-loop reference).
//!
//! Shapes: T query rows, S key rows, C hidden, H heads, KV key/value heads, D head dim.

use super::{AttnShape, Backend, BackendError, CopySpan, Result};
use crate::token_tree::AttnSpan;
use crate::tensor::{DType, HostTensor};
use rayon::prelude::*;
use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};
use gemm::Kernel;

mod gemm;
mod stream;
mod vmath;
pub use stream::{CpuPinned, CpuSlot, CpuTransfer};
pub use vmath::{erf_one as erf_f32, exp_one as exp_f32, gelu_one as gelu_f32};

/// A row-major (rows, cols) f32 matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Mat {
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// A weight widened to f32, with its logical shape.
pub struct CpuWeight {
    pub shape: Vec<usize>,
    /// Vectors: the values. Matrices (N, K): packed for `Kernel::detect()` (gemm.rs), so that
    /// only `linear` and `embed`'s row lookup read them.
    data: Vec<f32>,
}

impl CpuWeight {
    /// `values` in row-major order for `shape`; a matrix (2 dimensions) is packed here, once.
    pub fn new(shape: Vec<usize>, values: Vec<f32>) -> CpuWeight {
        let data = match shape[..] {
            [n, k] => gemm::pack(Kernel::detect(), &values, n, k),
            _ => values,
        };
        CpuWeight { shape, data }
    }

    fn from_host(t: &HostTensor) -> CpuWeight {
        // An f32 matrix is packed straight from the file's bytes: no widened copy between.
        #[cfg(target_endian = "little")]
        if let ([n, k], DType::F32) = (&t.shape[..], t.dtype) {
            if let Ok(values) = bytemuck::try_cast_slice::<u8, f32>(&t.data) {
                return CpuWeight { shape: t.shape.clone(), data: gemm::pack(Kernel::detect(), values, *n, *k) };
            }
        }
        CpuWeight::new(t.shape.clone(), t.to_f32())
    }

    /// (N, K) of a matrix.
    fn matrix(&self) -> Option<(usize, usize)> {
        match self.shape[..] {
            [n, k] => Some((n, k)),
            _ => None,
        }
    }

    /// Row `r` of a matrix appended to `out`.
    fn push_row(&self, r: usize, out: &mut Vec<f32>) {
        match self.matrix() {
            Some((_, k)) => gemm::unpack_row(Kernel::detect(), &self.data, k, r, out),
            None => out.push(self.data[r]),
        }
    }

    /// The values in row-major order, whatever the layout.
    pub fn to_rows(&self) -> Vec<f32> {
        let rows = self.shape.first().copied().unwrap_or(1);
        let mut out = Vec::with_capacity(self.shape.iter().product());
        match self.matrix() {
            Some(_) => (0..rows).for_each(|r| self.push_row(r, &mut out)),
            None => out.extend_from_slice(&self.data),
        }
        out
    }
}

#[derive(Default)]
pub struct CpuBackend {
    /// The weight copy thread (stream.rs), started by the first prefetch.
    copier: Mutex<Option<stream::Copier>>,
}

fn shape_err(op: &'static str, msg: String) -> BackendError {
    BackendError::Shape { op, msg }
}

impl CpuBackend {
    pub fn new() -> CpuBackend {
        CpuBackend::default()
    }
}

/// A (rows, cols) matrix whose rows `f` fills from the matching rows of `x`, in parallel,
/// without zero-filling first: f must write every element of its output row. Callers pass
/// cols = 0 whenever x has no columns.
fn map_rows(x: &Mat, cols: usize, f: impl Fn(&[f32], &mut [MaybeUninit<f32>]) + Sync) -> Mat {
    let len = x.rows * cols;
    let mut data: Vec<f32> = Vec::with_capacity(len);
    if len > 0 {
        data.spare_capacity_mut()[..len].par_chunks_mut(cols).zip(x.data.par_chunks(x.cols)).for_each(|(o, r)| f(r, o));
    }
    // SAFETY: f wrote each of the x.rows rows of cols values.
    unsafe { data.set_len(len) };
    Mat { rows: x.rows, cols, data }
}

/// A (rows, cols) matrix whose row i is a copy of `row(i)` (cols values), copied in parallel
/// blocks: a KV cache grown by a row per decode step is copied whole every step, and one
/// thread's memcpy leaves the other core idle.
fn gather_rows<'a>(rows: usize, cols: usize, row: impl Fn(usize) -> &'a [f32] + Sync) -> Mat {
    let len = rows * cols;
    let mut data: Vec<f32> = Vec::with_capacity(len);
    if len > 0 {
        let block = ELEMWISE_CHUNK.div_ceil(cols);
        data.spare_capacity_mut()[..len].par_chunks_mut(block * cols).enumerate().for_each(|(bi, out)| {
            for (i, o) in out.chunks_mut(cols).enumerate() {
                for (o, &v) in o.iter_mut().zip(row(bi * block + i)) {
                    o.write(v);
                }
            }
        });
    }
    // SAFETY: each of the rows' cols values was written above.
    unsafe { data.set_len(len) };
    Mat { rows, cols, data }
}

/// Elements per parallel work item of the elementwise ops.
const ELEMWISE_CHUNK: usize = 1 << 14;

impl Backend for CpuBackend {
    type Act = Mat;
    type Weight = CpuWeight;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn upload_weight(&self, t: &HostTensor) -> Result<CpuWeight> {
        Ok(CpuWeight::from_host(t))
    }

    type Pinned = CpuPinned;
    type Slot = CpuSlot;
    type Transfer = CpuTransfer;

    fn pin(&self, tensors: &[HostTensor]) -> Result<CpuPinned> {
        self.stream_pin(tensors)
    }

    fn prefetch(&self, group: Arc<CpuPinned>, slot: Option<CpuSlot>) -> Result<CpuTransfer> {
        self.stream_prefetch(group, slot)
    }

    fn wait(&self, transfer: &mut CpuTransfer) -> Result<Vec<CpuWeight>> {
        self.stream_wait(transfer)
    }

    fn release(&self, transfer: CpuTransfer, weights: Vec<CpuWeight>) -> Result<(CpuSlot, Option<CopySpan>)> {
        self.stream_release(transfer, weights)
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<Mat> {
        if data.len() != rows * cols {
            return Err(shape_err("upload", format!("{} values for ({rows}, {cols})", data.len())));
        }
        Ok(Mat { rows, cols, data: data.to_vec() })
    }

    fn download(&self, x: &Mat) -> Result<Vec<f32>> {
        Ok(x.data.clone())
    }

    fn dims(&self, x: &Mat) -> (usize, usize) {
        (x.rows, x.cols)
    }

    fn embed(&self, table: &CpuWeight, ids: &[u32]) -> Result<Mat> {
        let (v, c) = table.matrix().ok_or_else(|| shape_err("embed", format!("table of shape {:?}", table.shape)))?;
        let mut data = Vec::with_capacity(ids.len() * c);
        for &id in ids {
            let id = id as usize;
            if id >= v {
                return Err(shape_err("embed", format!("token id {id} outside the vocabulary of {v}")));
            }
            table.push_row(id, &mut data);
        }
        Ok(Mat { rows: ids.len(), cols: c, data })
    }

    fn linear(&self, x: &Mat, w: &CpuWeight, b: Option<&CpuWeight>) -> Result<Mat> {
        let (n, k) = w.matrix().ok_or_else(|| shape_err("linear", format!("weight of shape {:?}", w.shape)))?;
        if x.cols != k {
            return Err(shape_err("linear", format!("x has {} columns, weight is ({n}, {k})", x.cols)));
        }
        if let Some(b) = b {
            if b.data.len() != n || b.matrix().is_some() {
                return Err(shape_err("linear", format!("bias of shape {:?} for {n} outputs", b.shape)));
            }
        }
        let len = x.rows * n;
        let mut out: Vec<f32> = Vec::with_capacity(len); // (T, N)
        // SAFETY: out has room for T·N values, which matmul writes (the bias is its start value),
        // x holds T·K, w is packed (N, K) for the detected kernel, the bias N values.
        unsafe {
            gemm::matmul(Kernel::detect(), &x.data, x.rows, k, &w.data, n, b.map(|b| &b.data[..]), out.as_mut_ptr());
            out.set_len(len);
        }
        Ok(Mat { rows: x.rows, cols: n, data: out })
    }

    fn layer_norm(&self, x: &Mat, w: &CpuWeight, b: &CpuWeight, eps: f32) -> Result<Mat> {
        if w.data.len() != x.cols || b.data.len() != x.cols {
            return Err(shape_err("layer_norm", format!("{} columns, weight {} and bias {}", x.cols, w.data.len(), b.data.len())));
        }
        Ok(map_rows(x, x.cols, |row, out| {
            let n = row.len() as f64;
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
            let inv = 1.0 / (var + eps as f64).sqrt();
            for (i, (o, &v)) in out.iter_mut().zip(row).enumerate() {
                o.write(((v as f64 - mean) * inv) as f32 * w.data[i] + b.data[i]);
            }
        }))
    }

    fn rms_norm(&self, x: &Mat, w: &CpuWeight, eps: f32) -> Result<Mat> {
        if w.data.len() != x.cols {
            return Err(shape_err("rms_norm", format!("{} columns, weight {}", x.cols, w.data.len())));
        }
        Ok(map_rows(x, x.cols, |row, out| {
            let ms = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / row.len() as f64;
            let inv = (1.0 / (ms + eps as f64).sqrt()) as f32;
            for ((o, &v), &g) in out.iter_mut().zip(row).zip(&w.data) {
                o.write(v * inv * g);
            }
        }))
    }

    fn rope(&self, x: &mut Mat, col0: usize, heads: usize, head_dim: usize, positions: &[u32], inv_freq: &[f32]) -> Result<()> {
        if positions.len() != x.rows || col0 + heads * head_dim > x.cols || inv_freq.len() != head_dim / 2 {
            return Err(shape_err(
                "rope",
                format!("{} positions, {} rows, {} cols, {} frequencies for head dim {head_dim}", positions.len(), x.rows, x.cols, inv_freq.len()),
            ));
        }
        let half = head_dim / 2;
        let cols = x.cols;
        x.data.par_chunks_mut(cols).zip(positions).for_each(|(row, &pos)| {
            ROPE_TABLE.with(|table| {
                let mut table = table.borrow_mut();
                // cos (D/2) then sin (D/2) of this position, once for all heads.
                table.clear();
                table.extend(inv_freq.iter().map(|f| (pos as f32 * f).cos()));
                table.extend(inv_freq.iter().map(|f| (pos as f32 * f).sin()));
                let (cos, sin) = table.split_at(half);
                for head in row[col0..col0 + heads * head_dim].chunks_exact_mut(head_dim) {
                    vmath::rotate_half(head, cos, sin);
                }
            });
        });
        Ok(())
    }

    fn attention(&self, q: &Mat, k: &Mat, v: &Mat, s: AttnShape, spans: &[AttnSpan]) -> Result<Mat> {
        let (h, kvh, d) = (s.heads, s.kv_heads, s.head_dim);
        if q.cols != h * d || k.cols != kvh * d || v.cols != kvh * d || spans.len() != q.rows || k.rows != v.rows {
            return Err(shape_err("attention", format!("q {:?} k {:?} v {:?} spans {}", (q.rows, q.cols), (k.rows, k.cols), (v.rows, v.cols), spans.len())));
        }
        for (t, span) in spans.iter().enumerate() {
            if t + s.key_offset >= k.rows || span.shared_end as usize > k.rows {
                return Err(shape_err("attention", format!("row {t} attends past the {} key rows", k.rows)));
            }
        }
        let len = q.rows * h * d;
        let mut out: Vec<f32> = Vec::with_capacity(len); // (T, H·D)
        // Work items: (head, block of query rows of one document); each writes its own (rows, D)
        // slice of out, and every row attends at least its own key, so all of out is written.
        let blocks = query_blocks(spans);
        let items: Vec<(usize, usize, usize)> = (0..h).flat_map(|hh| blocks.iter().map(move |&(t0, t1)| (hh, t0, t1))).collect();
        let out_ptr = SendPtr(out.as_mut_ptr());
        items.par_iter().for_each(|&(hh, t0, t1)| {
            SCORES.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                // SAFETY: items are disjoint in (rows, head columns), so no two write the same element.
                unsafe { attention_block_head(q, k, v, s, spans, hh, t0, t1, out_ptr, &mut scratch) };
            });
        });
        // SAFETY: the blocks cover rows [0, T) for every head, each writing its (rows, D) slice.
        unsafe { out.set_len(len) };
        Ok(Mat { rows: q.rows, cols: h * d, data: out })
    }

    fn gelu(&self, x: &mut Mat) -> Result<()> {
        x.data.par_chunks_mut(ELEMWISE_CHUNK).for_each(vmath::gelu_slice);
        Ok(())
    }

    fn silu_mul(&self, gate: &mut Mat, up: &Mat) -> Result<()> {
        if gate.data.len() != up.data.len() {
            return Err(shape_err("silu_mul", format!("{} vs {} values", gate.data.len(), up.data.len())));
        }
        gate.data.par_chunks_mut(ELEMWISE_CHUNK).zip(up.data.par_chunks(ELEMWISE_CHUNK)).for_each(|(g, u)| vmath::silu_mul_slice(g, u));
        Ok(())
    }

    fn add(&self, x: &mut Mat, y: &Mat) -> Result<()> {
        if x.data.len() != y.data.len() {
            return Err(shape_err("add", format!("({}, {}) + ({}, {})", x.rows, x.cols, y.rows, y.cols)));
        }
        x.data.par_iter_mut().zip(&y.data).for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn cols(&self, x: &Mat, start: usize, width: usize) -> Result<Mat> {
        if start + width > x.cols {
            return Err(shape_err("cols", format!("[{start}, {}) of {} columns", start + width, x.cols)));
        }
        Ok(map_rows(x, width, |row, out| {
            for (o, &v) in out.iter_mut().zip(&row[start..start + width]) {
                o.write(v);
            }
        }))
    }

    fn rows(&self, x: &Mat, rows: &[u32]) -> Result<Mat> {
        if let Some(&r) = rows.iter().find(|&&r| r as usize >= x.rows) {
            return Err(shape_err("rows", format!("row {r} of {}", x.rows)));
        }
        Ok(gather_rows(rows.len(), x.cols, |i| x.row(rows[i] as usize)))
    }

    fn concat_rows(&self, a: &Mat, b: &Mat) -> Result<Mat> {
        if a.cols != b.cols {
            return Err(shape_err("concat_rows", format!("{} vs {} columns", a.cols, b.cols)));
        }
        Ok(gather_rows(a.rows + b.rows, a.cols, |i| if i < a.rows { a.row(i) } else { b.row(i - a.rows) }))
    }

    fn append_rows(&self, cache: &mut Mat, new: &Mat) -> Result<()> {
        if cache.cols != new.cols {
            return Err(shape_err("append_rows", format!("{} vs {} columns", cache.cols, new.cols)));
        }
        cache.data.extend_from_slice(&new.data);
        cache.rows += new.rows;
        Ok(())
    }

    fn log_softmax_at(&self, logits: &Mat, targets: &[u32]) -> Result<Vec<f64>> {
        if targets.len() != logits.rows {
            return Err(shape_err("log_softmax_at", format!("{} targets for {} rows", targets.len(), logits.rows)));
        }
        logits
            .data
            .par_chunks(logits.cols)
            .zip(targets)
            .map(|(row, &t)| {
                let t = t as usize;
                if t >= row.len() {
                    return Err(shape_err("log_softmax_at", format!("target {t} outside the vocabulary of {}", row.len())));
                }
                Ok(row[t] as f64 - logsumexp(row))
            })
            .collect()
    }

    fn log_softmax(&self, logits: &Mat) -> Result<Vec<f32>> {
        let mut out = logits.data.clone();
        out.par_chunks_mut(logits.cols).for_each(|row| {
            let lse = logsumexp(row);
            row.iter_mut().for_each(|v| *v = (*v as f64 - lse) as f32);
        });
        Ok(out)
    }
}

/// Query rows per block up to which attention runs as dot products and row updates (decode
/// steps) instead of GEMMs.
const FEW_QUERY_ROWS: usize = 4;

/// Query rows per attention work item: scores for a block are (ATTN_BLOCK, keys) floats.
const ATTN_BLOCK: usize = 64;

thread_local! {
    /// Each worker's cos and sin of one position (D), for `rope`.
    static ROPE_TABLE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Each worker's (B, K) scores buffer, kept between blocks and calls: grown, never refilled.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used to hand disjoint output regions to rayon workers.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// The first key a row can see: its document's first token.
fn span_first_key(sp: &AttnSpan) -> u32 {
    sp.shared_start.min(sp.own_start)
}

/// Query rows cut into blocks of at most ATTN_BLOCK rows that never cross a document boundary,
/// so a block's key range is its own document's keys, not its neighbour's too.
fn query_blocks(spans: &[AttnSpan]) -> Vec<(usize, usize)> {
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
fn attended_intervals(sp: &AttnSpan, row: usize, k0: usize, nk: usize) -> [(usize, usize); 2] {
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

/// Attention of query rows [t0, t1) of head hh: scores (B, K) = q·kᵀ over the block's key
/// range, softmax over each row's attended intervals (the rest set to 0 by slice), then
/// out (B, D) = p · v; by GEMMs, or for a few rows by dot products and row updates.
///
/// # Safety
/// `out` points to (q.rows, H·D) floats, and no other caller writes rows [t0, t1) of head hh.
#[allow(clippy::too_many_arguments)]
unsafe fn attention_block_head(q: &Mat, k: &Mat, v: &Mat, s: AttnShape, spans: &[AttnSpan], hh: usize, t0: usize, t1: usize, out: SendPtr, scratch: &mut Vec<f32>) {
    let (h, d) = (s.heads, s.head_dim);
    let kv = hh / (h / s.kv_heads);
    let rows = t1 - t0;
    let k0 = spans[t0..t1].iter().map(|sp| span_first_key(sp) as usize).min().unwrap_or(0);
    let k1 = spans[t0..t1].iter().map(|sp| sp.shared_end as usize).max().unwrap_or(0).max(t1 + s.key_offset);
    let nk = k1 - k0;
    if scratch.len() < rows * nk {
        scratch.resize(rows * nk, 0.0);
    }
    let scores = &mut scratch[..rows * nk]; // (B, K), fully written by the GEMM or the dots
    let scale = 1.0 / (d as f32).sqrt();
    let (kbase, vbase) = (k0 * k.cols + kv * d, k0 * v.cols + kv * d);
    if rows <= FEW_QUERY_ROWS {
        // Decode: the keys streamed once as dot products; the GEMM's packing of K costs more.
        for (i, row) in scores.chunks_mut(nk).enumerate() {
            let qrow = &q.data[(t0 + i) * q.cols + hh * d..][..d];
            vmath::scaled_dots(qrow, &k.data[kbase..], k.cols, scale, row);
        }
    } else {
        ::gemm::gemm(
            rows, nk, d,
            scores.as_mut_ptr(), 1, nk as isize, false,
            q.data.as_ptr().add(t0 * q.cols + hh * d), 1, q.cols as isize,
            k.data.as_ptr().add(kbase), k.cols as isize, 1,
            0.0, scale, false, false, false, ::gemm::Parallelism::None,
        );
    }
    for (i, row) in scores.chunks_mut(nk).enumerate() {
        let t = t0 + i;
        let [(a0, a1), (b0, b1)] = attended_intervals(&spans[t], t + s.key_offset, k0, nk);
        let max = row[a0..a1].iter().chain(&row[b0..b1]).copied().fold(f32::NEG_INFINITY, f32::max);
        let sum = vmath::exp_shift_sum(&mut row[a0..a1], max) + vmath::exp_shift_sum(&mut row[b0..b1], max);
        let inv = 1.0 / sum;
        row[..a0].fill(0.0);
        row[a0..a1].iter_mut().for_each(|p| *p *= inv);
        row[a1..b0.max(a1)].fill(0.0);
        row[b0..b1].iter_mut().for_each(|p| *p *= inv);
        row[b1.max(a1)..].fill(0.0);
    }
    if rows <= FEW_QUERY_ROWS {
        for (i, row) in scores.chunks(nk).enumerate() {
            let t = t0 + i;
            // SAFETY: row t's head-hh slice (D) of out is this call's alone (see the contract).
            let o = std::slice::from_raw_parts_mut(out.0.add(t * h * d + hh * d), d);
            o.fill(0.0);
            // Only the attended intervals: the rest of the row is 0.
            for (a, b) in attended_intervals(&spans[t], t + s.key_offset, k0, nk).into_iter().filter(|(a, b)| a < b) {
                vmath::weighted_sum(&row[a..b], &v.data[vbase + a * v.cols..], v.cols, o);
            }
        }
        return;
    }
    ::gemm::gemm(
        rows, d, nk,
        out.0.add(t0 * h * d + hh * d), 1, (h * d) as isize, false,
        scores.as_ptr(), 1, nk as isize,
        v.data.as_ptr().add(vbase), 1, v.cols as isize,
        0.0, 1.0, false, false, false, ::gemm::Parallelism::None,
    );
}

fn logsumexp(row: &[f32]) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln()
}

#[cfg(test)]
mod tests;
