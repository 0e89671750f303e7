//! CPU backend: the numeric reference. f32 arithmetic over weights as weight.rs holds them
//! (matrices packed at upload for the own GEMM of `gemm.rs` in their file's dtype, widened
//! exactly as they are read; attention, in `attention.rs`, runs its products through the same
//! micro-kernel), row loops spread over cores by rayon, elementwise
//! math by the vectorised f32 functions of `vmath` (each tested against an f64 plain-loop
//! reference).
//!
//! The bf16 compute route (route.rs, `--compute-dtype bf16`) rounds GEMM inputs to bf16 where
//! the CUDA backend does: matrices once at upload, and the outputs of the norms, GELU, SiLU·up
//! and attention as these ops make them (the values stay f32, rounded). Its GEMMs are
//! gemm_bf16.rs's `vdpbf16ps` kernel where the CPU has AVX512-BF16; everything else is f32.
//!
//! Shapes: T query rows, S key rows, C hidden, H heads, KV key/value heads, D head dim.

use super::{AttnShape, Backend, BackendError, CopySpan, KvDtype, Result};
use crate::token_tree::AttnSpan;
use crate::tensor::HostTensor;
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};
use gemm::{Kernel, Out};

mod attention;
mod decode;
mod elem;
mod kv_cache;
mod gemm;
mod gemm_bf16;
mod heap;
mod rope;
mod round;
mod route;
mod spin;
mod stream;
mod vmath;
mod weight;
pub use heap::keep_freed_buffers;
pub use kv_cache::KvCache;
pub use round::{round_f32 as round_bf16, round_in_place as round_bf16_in_place};
pub use route::CpuRoute;
pub use spin::{keep_workers_awake, spinners};
pub use stream::{CpuPinned, CpuSlot, CpuTransfer};
pub use weight::CpuWeight;
use weight::with_panels;
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

#[derive(Default)]
pub struct CpuBackend {
    /// The weight copy thread (stream.rs), started by the first prefetch.
    copier: Mutex<Option<stream::Copier>>,
    /// RoPE's cos and sin of recent positions, for the layers that follow (rope.rs).
    rope_tables: rope::RopeTables,
    /// What generation caches keep their keys and values as (kv_cache.rs).
    kv_dtype: KvDtype,
    /// What the GEMMs multiply in, and how (route.rs).
    route: CpuRoute,
}

fn shape_err(op: &'static str, msg: String) -> BackendError {
    BackendError::Shape { op, msg }
}

impl CpuBackend {
    pub fn new() -> CpuBackend {
        CpuBackend::default()
    }

    /// A backend whose generation caches keep keys and values as `kv_dtype`.
    pub fn with_kv_dtype(kv_dtype: KvDtype) -> CpuBackend {
        CpuBackend { kv_dtype, ..CpuBackend::default() }
    }

    /// A backend computing on `route` (`CpuRoute::detect` for a user's compute dtype).
    pub fn with_route(kv_dtype: KvDtype, route: CpuRoute) -> CpuBackend {
        CpuBackend { kv_dtype, route, ..CpuBackend::default() }
    }

    pub fn route(&self) -> CpuRoute {
        self.route
    }

    /// An op's output that only GEMMs read, rounded to bf16 on the bf16 routes (as CUDA stores it).
    fn rounded(&self, mut x: Mat) -> Mat {
        if self.route.rounds() {
            x.data.par_chunks_mut(ELEMWISE_CHUNK).for_each(round::round_in_place);
        }
        x
    }

    /// out (T, N) (+)= x · wᵀ (+ b) on this backend's route, by the weight's packing.
    ///
    /// # Safety
    /// `out` points to T·N writable floats (with `Out::Write` they may be uninitialised); the
    /// shapes were checked by `linear_shape`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn matmul(&self, op: &'static str, x: &Mat, w: &CpuWeight, b: Option<&[f32]>, n: usize, out: *mut f32, mode: Out) -> Result<()> {
        if let Some(pairs) = w.pairs() {
            gemm_bf16::matmul(&gemm_bf16::Rows::round(&x.data, x.rows, x.cols), pairs, n, b, out, mode);
            return Ok(());
        }
        let p = panels(op, w)?;
        let xs = self.gemm_input(x);
        with_panels!(p, w => gemm::matmul(Kernel::detect(), &xs, x.rows, x.cols, w, n, b, out, mode));
        Ok(())
    }

    /// x as the widening kernels multiply it: rounded to bf16 values on the bf16 routes (a
    /// copy; the ops that make GEMM inputs have rounded them already, so the values are the
    /// same, but `linear` takes any activation).
    fn gemm_input<'a>(&self, x: &'a Mat) -> std::borrow::Cow<'a, [f32]> {
        match self.route.rounds() {
            true => std::borrow::Cow::Owned(self.rounded(x.clone()).data),
            false => std::borrow::Cow::Borrowed(&x.data),
        }
    }
}

/// N of x (T, K) · w (N, K)ᵀ + b (N,), or why the shapes do not fit.
/// The width F of SwiGLU's gate and up products, which must agree.
fn gate_up_width(x: &Mat, (gate, gate_b): (&CpuWeight, Option<&CpuWeight>), (up, up_b): (&CpuWeight, Option<&CpuWeight>)) -> Result<usize> {
    let n = linear_shape(x, gate, gate_b)?;
    if linear_shape(x, up, up_b)? != n {
        return Err(shape_err("linear_silu_mul", format!("gate of shape {:?}, up of shape {:?}", gate.shape, up.shape)));
    }
    Ok(n)
}

fn linear_shape(x: &Mat, w: &CpuWeight, b: Option<&CpuWeight>) -> Result<usize> {
    let (n, k) = w.matrix().ok_or_else(|| shape_err("linear", format!("weight of shape {:?}", w.shape)))?;
    if x.cols != k {
        return Err(shape_err("linear", format!("x has {} columns, weight is ({n}, {k})", x.cols)));
    }
    if let Some(b) = b {
        if b.values().map(<[f32]>::len) != Some(n) {
            return Err(shape_err("linear", format!("bias of shape {:?} for {n} outputs", b.shape)));
        }
    }
    Ok(n)
}

/// A weight's packed values, or why it is not a matrix.
fn panels<'a>(op: &'static str, w: &'a CpuWeight) -> Result<&'a weight::Panels> {
    w.panels().ok_or_else(|| shape_err(op, format!("weight of shape {:?}", w.shape)))
}

/// A vector weight's values (norms, biases), or why it is not one of `len` values.
fn vector<'a>(op: &'static str, w: &'a CpuWeight, len: usize) -> Result<&'a [f32]> {
    w.values().filter(|v| v.len() == len).ok_or_else(|| shape_err(op, format!("weight of shape {:?} for {len} columns", w.shape)))
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

/// A (rows, cols) matrix whose row i is a copy of `row(i)` (cols values): `gather`.
fn gather_rows<'a>(rows: usize, cols: usize, row: impl Fn(usize) -> &'a [f32] + Sync) -> Mat {
    Mat { rows, cols, data: gather(rows, cols, row) }
}

/// rows × cols values, row i a copy of `row(i)`, copied in parallel blocks: a whole generation
/// cache regrouped, or two matrices stacked, is too much for one thread's memcpy while the
/// other core idles.
fn gather<'a, T: Copy + Send + Sync + 'a>(rows: usize, cols: usize, row: impl Fn(usize) -> &'a [T] + Sync) -> Vec<T> {
    let len = rows * cols;
    let mut data: Vec<T> = Vec::with_capacity(len);
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
    data
}

/// Elements per parallel work item of the elementwise ops.
const ELEMWISE_CHUNK: usize = 1 << 14;

impl Backend for CpuBackend {
    type Act = Mat;
    type Weight = CpuWeight;
    type Cache = KvCache;

    fn name(&self) -> String {
        match self.route {
            CpuRoute::F32 => format!("cpu ({} threads)", rayon::current_num_threads()),
            route => format!("cpu ({} threads, compute {route})", rayon::current_num_threads()),
        }
    }

    fn upload_weight(&self, t: &HostTensor) -> Result<CpuWeight> {
        Ok(CpuWeight::from_host(t, self.route))
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
        let n = linear_shape(x, w, b)?;
        let b = b.and_then(CpuWeight::values);
        let len = x.rows * n;
        let mut out: Vec<f32> = Vec::with_capacity(len); // (T, N)
        // SAFETY: out has room for T·N values, which matmul writes (the bias is its start value),
        // x holds T·K, w is packed (N, K), the bias N values.
        unsafe {
            self.matmul("linear", x, w, b, n, out.as_mut_ptr(), Out::Write)?;
            out.set_len(len);
        }
        Ok(Mat { rows: x.rows, cols: n, data: out })
    }

    fn linear_silu_mul(&self, x: &Mat, gate: &CpuWeight, gate_b: Option<&CpuWeight>, up: &CpuWeight, up_b: Option<&CpuWeight>) -> Result<Mat> {
        if let (Some(g), Some(u)) = (gate.pairs(), up.pairs()) {
            return self.linear_silu_mul_pairs(x, (gate, g, gate_b), (up, u, up_b));
        }
        if !gemm::fuses_silu_mul(x.cols) {
            return super::linear_silu_mul_unfused(self, x, gate, gate_b, up, up_b);
        }
        let n = gate_up_width(x, (gate, gate_b), (up, up_b))?;
        let (gb, ub) = (gate_b.and_then(CpuWeight::values), up_b.and_then(CpuWeight::values));
        let len = x.rows * n;
        let mut out: Vec<f32> = Vec::with_capacity(len); // (T, F)
        /// # Safety
        /// As `gemm::matmul_silu_mul`.
        #[allow(clippy::too_many_arguments)]
        unsafe fn run<W: elem::Elem>(x: &Mat, g: &[W], gb: Option<&[f32]>, u: &[W], ub: Option<&[f32]>, n: usize, out: *mut f32) {
            gemm::matmul_silu_mul(Kernel::detect(), &x.data, x.rows, x.cols, g, gb, u, ub, n, out)
        }
        use weight::Panels::*;
        let o = out.as_mut_ptr();
        let xs = self.gemm_input(x);
        let x = &Mat { rows: x.rows, cols: x.cols, data: xs.into_owned() };
        // SAFETY: as in `linear`, for both weights: out has room for T·F values, all written.
        unsafe {
            match (panels("linear_silu_mul", gate)?, panels("linear_silu_mul", up)?) {
                (F32(g), F32(u)) => run(x, g, gb, u, ub, n, o),
                (F16(g), F16(u)) => run(x, g, gb, u, ub, n, o),
                (Bf16(g), Bf16(u)) => run(x, g, gb, u, ub, n, o),
                // Two dtypes in one layer: the products one at a time.
                _ => return super::linear_silu_mul_unfused(self, x, gate, gate_b, up, up_b),
            }
        }
        // SAFETY: matmul_silu_mul wrote all T·F values.
        unsafe { out.set_len(len) };
        Ok(self.rounded(Mat { rows: x.rows, cols: n, data: out }))
    }

    fn linear_residual(&self, x: &Mat, w: &CpuWeight, b: Option<&CpuWeight>, mut residual: Mat) -> Result<Mat> {
        let n = linear_shape(x, w, b)?;
        if (residual.rows, residual.cols) != (x.rows, n) {
            return Err(shape_err("linear_residual", format!("residual ({}, {}) for a ({}, {n}) product", residual.rows, residual.cols, x.rows)));
        }
        let b = b.and_then(CpuWeight::values);
        // SAFETY: as in `linear`; the residual's T·N values are the accumulators' start.
        unsafe { self.matmul("linear_residual", x, w, b, n, residual.data.as_mut_ptr(), Out::Accumulate)? };
        Ok(residual)
    }

    fn layer_norm(&self, x: &Mat, w: &CpuWeight, b: &CpuWeight, eps: f32) -> Result<Mat> {
        let (w, b) = (vector("layer_norm", w, x.cols)?, vector("layer_norm", b, x.cols)?);
        let round = self.route.rounds();
        Ok(map_rows(x, x.cols, |row, out| {
            let n = row.len() as f64;
            let mean = vmath::sum_f64(row) / n;
            let var = vmath::sum_sq_dev(row, mean) / n;
            let inv = 1.0 / (var + eps as f64).sqrt();
            for (i, (o, &v)) in out.iter_mut().zip(row).enumerate() {
                let y = ((v as f64 - mean) * inv) as f32 * w[i] + b[i];
                o.write(if round { round::round_f32(y) } else { y });
            }
        }))
    }

    fn rms_norm(&self, x: &Mat, w: &CpuWeight, eps: f32) -> Result<Mat> {
        let w = vector("rms_norm", w, x.cols)?;
        let round = self.route.rounds();
        Ok(map_rows(x, x.cols, |row, out| {
            let ms = vmath::sum_sq_dev(row, 0.0) / row.len() as f64;
            let inv = (1.0 / (ms + eps as f64).sqrt()) as f32;
            for ((o, &v), &g) in out.iter_mut().zip(row).zip(w) {
                let y = v * inv * g;
                o.write(if round { round::round_f32(y) } else { y });
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
        let table = self.rope_tables.get(positions, inv_freq);
        let cols = x.cols;
        x.data.par_chunks_mut(cols).enumerate().for_each(|(t, row)| {
            let (cos, sin) = table.row(t);
            for head in row[col0..col0 + heads * head_dim].chunks_exact_mut(head_dim) {
                vmath::rotate_half(head, cos, sin);
            }
        });
        Ok(())
    }

    fn attention(&self, q: &Mat, k: &Mat, v: &Mat, s: AttnShape, spans: &[AttnSpan]) -> Result<Mat> {
        Ok(self.rounded(attention::attention(q, k.into(), v.into(), s, spans)?))
    }

    fn attention_cached(&self, q: &Mat, k: &KvCache, v: &KvCache, s: AttnShape, spans: &[AttnSpan]) -> Result<Mat> {
        self.attention_cached_f32(q, k, v, s, spans).map(|o| self.rounded(o))
    }

    fn cache_from(&self, x: Mat) -> Result<KvCache> {
        Ok(KvCache::new(x, self.kv_dtype))
    }

    fn cache_append(&self, cache: &mut KvCache, new: &Mat) -> Result<()> {
        cache.append(new)
    }

    fn cache_rows(&self, cache: &KvCache, rows: &[u32]) -> Result<KvCache> {
        cache.rows(rows)
    }

    fn cache_len(&self, cache: &KvCache) -> usize {
        cache.len()
    }

    fn gelu(&self, x: &mut Mat) -> Result<()> {
        let round = self.route.rounds();
        x.data.par_chunks_mut(ELEMWISE_CHUNK).for_each(|c| {
            vmath::gelu_slice(c);
            if round {
                round::round_in_place(c);
            }
        });
        Ok(())
    }

    fn silu_mul(&self, gate: &mut Mat, up: &Mat) -> Result<()> {
        if gate.data.len() != up.data.len() {
            return Err(shape_err("silu_mul", format!("{} vs {} values", gate.data.len(), up.data.len())));
        }
        let round = self.route.rounds();
        gate.data.par_chunks_mut(ELEMWISE_CHUNK).zip(up.data.par_chunks(ELEMWISE_CHUNK)).for_each(|(g, u)| {
            vmath::silu_mul_slice(g, u);
            if round {
                round::round_in_place(g);
            }
        });
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

/// A weight, its bf16 pair panels, its bias: one half of a fused gate/up product.
type PairsOperand<'a> = (&'a CpuWeight, &'a [half::bf16], Option<&'a CpuWeight>);

impl CpuBackend {
    /// `linear_silu_mul` over bf16 pair panels: fused at any depth (gemm_bf16.rs), the output
    /// rounded as the down projection's input.
    fn linear_silu_mul_pairs(&self, x: &Mat, (gate, g, gate_b): PairsOperand, (up, u, up_b): PairsOperand) -> Result<Mat> {
        let n = gate_up_width(x, (gate, gate_b), (up, up_b))?;
        let (gb, ub) = (gate_b.and_then(CpuWeight::values), up_b.and_then(CpuWeight::values));
        let len = x.rows * n;
        let mut out: Vec<f32> = Vec::with_capacity(len); // (T, F)
        // SAFETY: out has room for T·F values, all written; both weights are packed (F, K), the
        // biases F values; pair panels exist only where the kernel runs.
        unsafe {
            gemm_bf16::matmul_silu_mul(&gemm_bf16::Rows::round(&x.data, x.rows, x.cols), g, gb, u, ub, n, out.as_mut_ptr());
            out.set_len(len);
        }
        Ok(self.rounded(Mat { rows: x.rows, cols: n, data: out }))
    }

    /// `attention_cached` before its output is rounded.
    fn attention_cached_f32(&self, q: &Mat, k: &KvCache, v: &KvCache, s: AttnShape, spans: &[AttnSpan]) -> Result<Mat> {
        match (k, v) {
            (KvCache::F32(k), KvCache::F32(v)) => attention::attention(q, k.into(), v.into(), s, spans),
            (KvCache::F16 { rows, cols, data: kd }, KvCache::F16 { rows: vr, cols: vc, data: vd }) => {
                let k = kv_cache::CacheView { rows: *rows, cols: *cols, data: &kd[..] };
                attention::attention(q, k, kv_cache::CacheView { rows: *vr, cols: *vc, data: &vd[..] }, s, spans)
            }
            _ => Err(shape_err("attention_cached", format!("keys kept as {}, values as {}", k.dtype(), v.dtype()))),
        }
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used to hand disjoint output regions to rayon workers.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// ln Σ e^row: the max in f32 (exact), the exponentials by vmath in f32 (2e-7 each), the sum
/// in f64.
fn logsumexp(row: &[f32]) -> f64 {
    let max = vmath::max(row);
    max as f64 + vmath::sum_exp_shifted(row, max).ln()
}

#[cfg(test)]
mod tests;
