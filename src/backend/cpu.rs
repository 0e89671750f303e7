//! CPU backend: the numeric reference. f32 arithmetic over weights widened to f32 at upload,
//! GEMM by the `gemm` crate, row loops spread over cores by rayon.
//!
//! Shapes: T query rows, S key rows, C hidden, H heads, KV key/value heads, D head dim.

use super::{AttnShape, Backend, BackendError, CopySpan, Result};
use crate::layout::AttnSpan;
use crate::tensor::HostTensor;
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

mod stream;
pub use stream::{CpuPinned, CpuSlot, CpuTransfer};

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
    pub data: Vec<f32>,
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

/// Rows up to which `matmul_nt` streams the weight once as dot products (decode steps):
/// there the work is reading the weight, which the packing of a GEMM only slows down.
const GEMV_MAX_ROWS: usize = 4;

/// sum_i a[i] b[i] with independent partial sums, so the loop vectorizes.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// out (T, N) = x (T, K) · w (N, K)ᵀ: dot products for a few rows, the gemm crate otherwise.
fn matmul_nt(x: &[f32], w: &[f32], t: usize, k: usize, n: usize, out: &mut [f32]) {
    if t <= GEMV_MAX_ROWS {
        // out is (T, N) row-major; work over blocks of weight rows, each row read once for all T.
        const BLOCK: usize = 64;
        let mut cols = vec![0f32; n * t]; // (N, T)
        cols.par_chunks_mut(BLOCK * t).enumerate().for_each(|(blk, chunk)| {
            for (j, o) in chunk.chunks_mut(t).enumerate() {
                let wrow = &w[(blk * BLOCK + j) * k..(blk * BLOCK + j + 1) * k];
                for (r, o) in o.iter_mut().enumerate() {
                    *o = dot(&x[r * k..(r + 1) * k], wrow);
                }
            }
        });
        for r in 0..t {
            for j in 0..n {
                out[r * n + j] = cols[j * t + r];
            }
        }
        return;
    }
    let threads = rayon::current_num_threads();
    let par = if t * n * k >= 1 << 16 && threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the slices hold t*k, n*k and t*n elements, matching the strides below.
    unsafe {
        gemm::gemm(
            t, n, k,
            out.as_mut_ptr(), 1, n as isize, false,
            x.as_ptr(), 1, k as isize,
            w.as_ptr(), k as isize, 1,
            0.0, 1.0, false, false, false, par,
        );
    }
}

impl Backend for CpuBackend {
    type Act = Mat;
    type Weight = CpuWeight;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn upload_weight(&self, t: &HostTensor) -> Result<CpuWeight> {
        Ok(CpuWeight { shape: t.shape.clone(), data: t.to_f32() })
    }

    type Pinned = CpuPinned;
    type Slot = CpuSlot;
    type Transfer = CpuTransfer;

    fn pin(&self, tensors: &[HostTensor]) -> Result<CpuPinned> {
        self.stream_pin(tensors)
    }

    fn prefetch(&self, group: &Arc<CpuPinned>, slot: Option<CpuSlot>) -> Result<CpuTransfer> {
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
        let (v, c) = (table.shape[0], table.shape[1]);
        let mut data = Vec::with_capacity(ids.len() * c);
        for &id in ids {
            let id = id as usize;
            if id >= v {
                return Err(shape_err("embed", format!("token id {id} outside the vocabulary of {v}")));
            }
            data.extend_from_slice(&table.data[id * c..(id + 1) * c]);
        }
        Ok(Mat { rows: ids.len(), cols: c, data })
    }

    fn linear(&self, x: &Mat, w: &CpuWeight, b: Option<&CpuWeight>) -> Result<Mat> {
        let (n, k) = (w.shape[0], w.shape.get(1).copied().unwrap_or(1));
        if x.cols != k {
            return Err(shape_err("linear", format!("x has {} columns, weight is ({n}, {k})", x.cols)));
        }
        let mut out = vec![0f32; x.rows * n];
        if x.rows > 0 {
            matmul_nt(&x.data, &w.data, x.rows, k, n, &mut out);
        }
        if let Some(b) = b {
            out.par_chunks_mut(n).for_each(|row| row.iter_mut().zip(&b.data).for_each(|(o, b)| *o += b));
        }
        Ok(Mat { rows: x.rows, cols: n, data: out })
    }

    fn layer_norm(&self, x: &Mat, w: &CpuWeight, b: &CpuWeight, eps: f32) -> Result<Mat> {
        let mut out = x.clone();
        out.data.par_chunks_mut(x.cols).for_each(|row| {
            let n = row.len() as f64;
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
            let inv = 1.0 / (var + eps as f64).sqrt();
            for (i, v) in row.iter_mut().enumerate() {
                *v = ((*v as f64 - mean) * inv) as f32 * w.data[i] + b.data[i];
            }
        });
        Ok(out)
    }

    fn rms_norm(&self, x: &Mat, w: &CpuWeight, eps: f32) -> Result<Mat> {
        let mut out = x.clone();
        out.data.par_chunks_mut(x.cols).for_each(|row| {
            let ms = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / row.len() as f64;
            let inv = (1.0 / (ms + eps as f64).sqrt()) as f32;
            for (i, v) in row.iter_mut().enumerate() {
                *v = *v * inv * w.data[i];
            }
        });
        Ok(out)
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
            for (i, f) in inv_freq.iter().enumerate() {
                let angle = pos as f32 * f;
                let (sin, cos) = angle.sin_cos();
                for h in 0..heads {
                    let base = col0 + h * head_dim;
                    let (a, b) = (row[base + i], row[base + i + half]);
                    row[base + i] = a * cos - b * sin;
                    row[base + i + half] = b * cos + a * sin;
                }
            }
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
        let mut out = vec![0f32; q.rows * h * d];
        // Work items: (head, block of query rows); each writes its own (rows, D) slice of out.
        let blocks: Vec<(usize, usize)> = (0..h).flat_map(|hh| (0..q.rows).step_by(ATTN_BLOCK).map(move |t0| (hh, t0))).collect();
        let out_ptr = SendPtr(out.as_mut_ptr());
        blocks.par_iter().for_each(|&(hh, t0)| {
            let t1 = (t0 + ATTN_BLOCK).min(q.rows);
            // SAFETY: blocks are disjoint in (rows, head columns), so no two items write the same element.
            unsafe { attention_block_head(q, k, v, s, spans, hh, t0, t1, out_ptr) };
        });
        Ok(Mat { rows: q.rows, cols: h * d, data: out })
    }

    fn gelu(&self, x: &mut Mat) -> Result<()> {
        x.data.par_iter_mut().for_each(|v| *v = gelu_exact(*v));
        Ok(())
    }

    fn silu_mul(&self, gate: &mut Mat, up: &Mat) -> Result<()> {
        if gate.data.len() != up.data.len() {
            return Err(shape_err("silu_mul", format!("{} vs {} values", gate.data.len(), up.data.len())));
        }
        gate.data.par_iter_mut().zip(&up.data).for_each(|(g, u)| *g = *g / (1.0 + (-*g).exp()) * u);
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
        let data = x.data.chunks(x.cols).flat_map(|r| r[start..start + width].iter().copied()).collect();
        Ok(Mat { rows: x.rows, cols: width, data })
    }

    fn rows(&self, x: &Mat, rows: &[u32]) -> Result<Mat> {
        let mut data = Vec::with_capacity(rows.len() * x.cols);
        for &r in rows {
            if r as usize >= x.rows {
                return Err(shape_err("rows", format!("row {r} of {}", x.rows)));
            }
            data.extend_from_slice(x.row(r as usize));
        }
        Ok(Mat { rows: rows.len(), cols: x.cols, data })
    }

    fn concat_rows(&self, a: &Mat, b: &Mat) -> Result<Mat> {
        if a.cols != b.cols {
            return Err(shape_err("concat_rows", format!("{} vs {} columns", a.cols, b.cols)));
        }
        let mut data = a.data.clone();
        data.extend_from_slice(&b.data);
        Ok(Mat { rows: a.rows + b.rows, cols: a.cols, data })
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

/// Query rows per attention work item: scores for a block are (ATTN_BLOCK, keys) floats.
const ATTN_BLOCK: usize = 64;

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used to hand disjoint output regions to rayon workers.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Attention of query rows [t0, t1) of head hh: scores (B, K) = q·kᵀ over the block's key
/// range by GEMM, masked to each row's span, softmax, then out (B, D) = p · v by GEMM.
///
/// # Safety
/// `out` points to (q.rows, H·D) floats, and no other caller writes rows [t0, t1) of head hh.
#[allow(clippy::too_many_arguments)]
unsafe fn attention_block_head(q: &Mat, k: &Mat, v: &Mat, s: AttnShape, spans: &[AttnSpan], hh: usize, t0: usize, t1: usize, out: SendPtr) {
    let (h, d) = (s.heads, s.head_dim);
    let kv = hh / (h / s.kv_heads);
    let rows = t1 - t0;
    let k0 = spans[t0..t1].iter().map(|sp| sp.shared_start.min(sp.own_start) as usize).min().unwrap_or(0);
    let k1 = t1 - 1 + s.key_offset + 1;
    let nk = k1 - k0;
    let mut scores = vec![0f32; rows * nk]; // (B, K)
    let scale = 1.0 / (d as f32).sqrt();
    gemm::gemm(
        rows, nk, d,
        scores.as_mut_ptr(), 1, nk as isize, false,
        q.data.as_ptr().add(t0 * q.cols + hh * d), 1, q.cols as isize,
        k.data.as_ptr().add(k0 * k.cols + kv * d), k.cols as isize, 1,
        0.0, scale, false, false, false, gemm::Parallelism::None,
    );
    for (i, row) in scores.chunks_mut(nk).enumerate() {
        let t = t0 + i;
        let span = spans[t];
        let mut max = f32::NEG_INFINITY;
        for (j, sc) in row.iter_mut().enumerate() {
            if span.attends((t + s.key_offset) as u32, (k0 + j) as u32) {
                max = max.max(*sc);
            } else {
                *sc = f32::NEG_INFINITY;
            }
        }
        let mut sum = 0f32;
        for sc in row.iter_mut() {
            *sc = (*sc - max).exp();
            sum += *sc;
        }
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|sc| *sc *= inv);
    }
    gemm::gemm(
        rows, d, nk,
        out.0.add(t0 * h * d + hh * d), 1, (h * d) as isize, false,
        scores.as_ptr(), 1, nk as isize,
        v.data.as_ptr().add(k0 * v.cols + kv * d), 1, v.cols as isize,
        0.0, 1.0, false, false, false, gemm::Parallelism::None,
    );
}

fn logsumexp(row: &[f32]) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln()
}

/// 0.5 x (1 + erf(x / √2)), as torch's default GELU.
pub fn gelu_exact(x: f32) -> f32 {
    (0.5 * x as f64 * (1.0 + erf(x as f64 / std::f64::consts::SQRT_2))) as f32
}

/// erf to ~1e-15 (W. J. Cody's rational approximations via erfc for |x| > 0.5).
fn erf(x: f64) -> f64 {
    // Abramowitz–Stegun 7.1.26 is only 1e-7; use the series / continued fraction split.
    if x.abs() < 2.5 {
        // Maclaurin series: converges fast for |x| < 2.5 in double precision.
        let mut sum = x;
        let mut term = x;
        let x2 = x * x;
        let mut n = 0.0;
        loop {
            n += 1.0;
            term *= -x2 / n;
            let add = term / (2.0 * n + 1.0);
            sum += add;
            if add.abs() < 1e-17 * sum.abs() {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc continued fraction (Lentz), accurate for |x| >= 2.5.
        let ax = x.abs();
        let mut f = ax;
        let mut c = ax;
        let mut dd = 0.0;
        for i in 1..200 {
            let a = i as f64 / 2.0;
            dd = ax + a * dd;
            dd = 1.0 / dd;
            c = ax + a / c;
            let delta = c * dd;
            f *= delta;
            if (delta - 1.0).abs() < 1e-16 {
                break;
            }
        }
        let erfc = (-ax * ax).exp() / (f * std::f64::consts::PI.sqrt());
        (1.0 - erfc).copysign(x)
    }
}

#[cfg(test)]
mod tests;
