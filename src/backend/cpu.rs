//! CPU backend: the numeric reference. f32 arithmetic over weights as weight.rs holds them
//! (matrices packed at upload for the own GEMM of `gemm.rs` in their file's dtype, widened
//! exactly as they are read; attention, in `attention.rs`, runs its products through the same
//! micro-kernel), row loops spread over cores by rayon, elementwise
//! math by the vectorised f32 functions of `vmath` (each tested against an f64 plain-loop
//! reference).
//!
//! The bf16 compute route (route.rs, `--compute-dtype bf16`) rounds GEMM inputs to bf16 where
//! the CUDA backend does: matrices once at upload, and the outputs of the norms, GELU, SiLU·up
//! and attention as these ops make them, and inside attention q, k, v and the probabilities as
//! the CUDA kernel rounds them. Its GEMMs, attention's products included, are gemm_bf16.rs's
//! `vdpbf16ps` kernel where the CPU has AVX512-BF16; everything else is f32. There the norms'
//! and prefill attention's outputs are held as the bf16 rows the next GEMM multiplies (`Mat`'s
//! `narrow`: no f32 matrix written, read back and rounded again), as CUDA holds its bf16
//! activations; the rounded values otherwise stay f32.
//!
//! The ops here are `Kernels`: shapes.rs has checked their inputs before they run.
//! Shapes: T query rows, S key rows, C hidden, H heads, KV key/value heads, D head dim.

use super::{AttnShape, BackendError, CopySpan, KvDtype, Result, WeightStream};
use crate::token_tree::AttnSpan;
use crate::tensor::HostTensor;
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};
use gemm::{Dest, Kernel, Out};

mod attention;
mod dispatch;
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
pub use kv_cache::CpuCache;
pub use round::{round_f32 as round_bf16, round_in_place as round_bf16_in_place};
pub use route::CpuRoute;
pub use spin::{keep_workers_awake, spinners};
pub use stream::{CpuPinned, CpuSlot, CpuTransfer};
pub use weight::CpuWeight;
use weight::with_panels;
pub use vmath::{erf_one as erf_f32, exp_one as exp_f32, gelu_one as gelu_f32};

/// A row-major (rows, cols) f32 matrix: the backend's activation.
#[derive(Clone, Debug, PartialEq)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    /// (rows, cols) values; empty where the matrix is held `narrow`.
    pub data: Vec<f32>,
    /// On the `Bf16Dot` route, a norm's output held as the bf16 rows its GEMMs multiply, never
    /// written as f32 (`Kernels::Act`: an output only GEMMs read may be stored narrower). The
    /// ops that read f32 values refuse it (`f32`), as CUDA's refuse its bf16 activations.
    narrow: Option<gemm_bf16::Rows>,
}

impl Mat {
    /// data (rows·cols values) as a (rows, cols) matrix.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Mat {
        debug_assert_eq!(data.len(), rows * cols);
        Mat { rows, cols, data, narrow: None }
    }

    /// (rows, cols) held as bf16 GEMM rows.
    fn narrow(rows: gemm_bf16::Rows, (t, cols): (usize, usize)) -> Mat {
        Mat { rows: t, cols, data: Vec::new(), narrow: Some(rows) }
    }

    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }

    /// Refuses a matrix held as bf16 GEMM rows as op's input: only GEMMs read those.
    fn f32(&self, op: &'static str) -> Result<&Mat> {
        match self.narrow {
            None => Ok(self),
            Some(_) => Err(super::bf16_input(op)),
        }
    }

    /// The values, widened where the matrix is held as bf16 rows (exact).
    fn values(&self) -> std::borrow::Cow<'_, [f32]> {
        match &self.narrow {
            None => std::borrow::Cow::Borrowed(&self.data),
            Some(r) => std::borrow::Cow::Owned(r.widen(self.cols)),
        }
    }

    /// The bf16 GEMM's left operand: the rows held, or the values rounded into rows.
    fn gemm_rows(&self) -> std::borrow::Cow<'_, gemm_bf16::Rows> {
        match &self.narrow {
            Some(r) => std::borrow::Cow::Borrowed(r),
            None => std::borrow::Cow::Owned(gemm_bf16::Rows::round(&self.data, self.rows, self.cols)),
        }
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

    /// An op's output that only GEMMs read, rounded to bf16 on the bf16 routes (as CUDA stores
    /// it; one held as bf16 rows has no f32 values to round).
    fn rounded(&self, mut x: Mat) -> Mat {
        if self.route.rounds() {
            round_values(&mut x.data);
        }
        x
    }

    /// out (T, N) (+)= x · wᵀ (+ b) on this backend's route, by the weight's packing.
    ///
    /// # Safety
    /// `out` points to T·N writable floats (with `Out::Write` they may be uninitialised); the
    /// shapes were checked by `shapes::linear`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn matmul(&self, op: &'static str, x: &Mat, w: &CpuWeight, b: Option<&[f32]>, n: usize, out: *mut f32, mode: Out) -> Result<()> {
        self.matmul_into(op, x, w, b, n, Dest::whole(out, n), mode)
    }

    /// `matmul` into `out`'s blocks of columns.
    ///
    /// # Safety
    /// As `matmul`, for the T rows of each block's matrix.
    #[allow(clippy::too_many_arguments)]
    unsafe fn matmul_into(&self, op: &'static str, x: &Mat, w: &CpuWeight, b: Option<&[f32]>, n: usize, out: Dest, mode: Out) -> Result<()> {
        if let Some(pairs) = w.pairs() {
            gemm_bf16::matmul(&x.gemm_rows(), pairs, n, b, out, mode);
            return Ok(());
        }
        let p = panels(op, w)?;
        let xs = self.gemm_input(x);
        with_panels!(p, w => gemm::matmul(Kernel::detect(), &xs, x.rows, x.cols, w, n, b, out, mode));
        Ok(())
    }

    /// The panel width of the kernel that multiplies by w: what `Dest::split` cuts out by.
    fn panel_width(w: &CpuWeight) -> usize {
        match w.pairs() {
            Some(_) => gemm_bf16::NR,
            None => Kernel::detect().nr(),
        }
    }

    /// x as the widening kernels multiply it: rounded to bf16 values on the bf16 routes (a
    /// copy; the ops that make GEMM inputs have rounded them already, so the values are the
    /// same, but `linear` takes any activation).
    fn gemm_input<'a>(&self, x: &'a Mat) -> std::borrow::Cow<'a, [f32]> {
        match (self.route.rounds(), x.values()) {
            (true, values) => {
                let mut v = values.into_owned();
                round_values(&mut v);
                std::borrow::Cow::Owned(v)
            }
            (false, values) => values,
        }
    }
}

/// A weight's packed values, or why it is not a matrix.
fn panels<'a>(op: &'static str, w: &'a CpuWeight) -> Result<&'a weight::Panels> {
    w.panels().ok_or_else(|| shape_err(op, format!("weight of shape {:?}", w.shape)))
}

/// A vector weight's values (norms, biases), or why it is not held as one.
fn vector<'a>(op: &'static str, w: &'a CpuWeight) -> Result<&'a [f32]> {
    w.values().ok_or_else(|| shape_err(op, format!("weight of shape {:?} is not held as a vector", w.shape)))
}

/// The output width N of a weight (N, K) that `shapes::linear` let through.
fn outputs(w: &CpuWeight) -> usize {
    w.shape[0]
}

/// A (rows, cols) matrix whose rows `f` fills from the matching rows of `x`, in parallel,
/// without zero-filling first: f must write every element of its output row. Callers pass
/// cols = 0 whenever x has no columns.
fn map_rows(x: &Mat, cols: usize, f: impl Fn(&[f32], &mut [MaybeUninit<f32>]) + Sync) -> Mat {
    let len = x.rows * cols;
    let mut data: Vec<f32> = Vec::with_capacity(len);
    if len > 0 {
        // Rows in items of ELEMWISE_CHUNK values: one item a row was thousands of rayon items
        // of a few hundred values (a norm, q/k/v's columns) per call.
        let per = ELEMWISE_CHUNK.div_ceil(cols.max(x.cols).max(1));
        data.spare_capacity_mut()[..len].par_chunks_mut(cols).zip(x.data.par_chunks(x.cols)).with_min_len(per).for_each(|(o, r)| f(r, o));
    }
    // SAFETY: f wrote each of the x.rows rows of cols values.
    unsafe { data.set_len(len) };
    Mat::new(x.rows, cols, data)
}

/// A (rows, cols) matrix whose row i is a copy of `row(i)` (cols values): `gather`.
fn gather_rows<'a>(rows: usize, cols: usize, row: impl Fn(usize) -> &'a [f32] + Sync) -> Mat {
    Mat::new(rows, cols, gather(rows, cols, row))
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

/// x's values rounded to bf16 (kept f32), in items of ELEMWISE_CHUNK values.
fn round_values(x: &mut [f32]) {
    x.par_chunks_mut(ELEMWISE_CHUNK).for_each(round::round_in_place);
}

/// x as a bf16 route's products read it: a copy with its values rounded to bf16 where `round`.
fn rounded_if(x: &Mat, round: bool) -> std::borrow::Cow<'_, Mat> {
    match round {
        true => {
            let mut r = x.clone();
            round_values(&mut r.data);
            std::borrow::Cow::Owned(r)
        }
        false => std::borrow::Cow::Borrowed(x),
    }
}

// Named by path, not imported: tests.rs takes this module's names, and there the ops must
// be `Ops`' (checked), not these.
impl super::Kernels for CpuBackend {
    type Act = Mat;
    type Weight = CpuWeight;
    type Cache = CpuCache;

    fn name(&self) -> String {
        match self.route {
            CpuRoute::F32 => format!("cpu ({} threads)", rayon::current_num_threads()),
            route => format!("cpu ({} threads, compute {route})", rayon::current_num_threads()),
        }
    }

    fn weight_shape<'w>(&self, w: &'w CpuWeight) -> &'w [usize] {
        &w.shape
    }

    fn cache_dims(&self, c: &CpuCache) -> (usize, usize) {
        (c.len(), c.cols())
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<Mat> {
        Ok(Mat::new(rows, cols, data.to_vec()))
    }

    fn download(&self, x: &Mat) -> Result<Vec<f32>> {
        Ok(x.values().into_owned())
    }

    fn dims(&self, x: &Mat) -> (usize, usize) {
        (x.rows, x.cols)
    }

    fn embed(&self, table: &CpuWeight, ids: &[u32]) -> Result<Mat> {
        let c = table.shape[1];
        let mut data = Vec::with_capacity(ids.len() * c);
        for &id in ids {
            table.push_row(id as usize, &mut data);
        }
        Ok(Mat::new(ids.len(), c, data))
    }

    fn linear(&self, x: &Mat, w: &CpuWeight, b: Option<&CpuWeight>) -> Result<Mat> {
        let n = outputs(w);
        let b = b.and_then(CpuWeight::values);
        let len = x.rows * n;
        let mut out: Vec<f32> = Vec::with_capacity(len); // (T, N)
        // SAFETY: out has room for T·N values, which matmul writes (the bias is its start value),
        // x holds T·K, w is packed (N, K), the bias N values.
        unsafe {
            self.matmul("linear", x, w, b, n, out.as_mut_ptr(), Out::Write)?;
            out.set_len(len);
        }
        Ok(Mat::new(x.rows, n, out))
    }

    fn linear_split<const P: usize>(&self, x: &Mat, w: &CpuWeight, b: Option<&CpuWeight>, widths: [usize; P]) -> Result<[Mat; P]> {
        let mut outs: [Vec<f32>; P] = widths.map(|width| Vec::with_capacity(x.rows * width)); // (T, width) each
        let parts: Vec<(*mut f32, usize)> = outs.iter_mut().zip(widths).map(|(o, width)| (o.as_mut_ptr(), width)).collect();
        let Some(dest) = Dest::split(&parts, Self::panel_width(w)) else {
            return super::linear_split_unfused(self, x, w, b, widths);
        };
        let n = outputs(w);
        // SAFETY: each block's matrix has room for T rows of its width, which matmul writes (the
        // bias is its start value); x holds T·K, w is packed (N, K), the widths sum to N.
        unsafe {
            self.matmul_into("linear_split", x, w, b.and_then(CpuWeight::values), n, dest, Out::Write)?;
            for (o, width) in outs.iter_mut().zip(widths) {
                o.set_len(x.rows * width);
            }
        }
        let mut block = 0;
        Ok(outs.map(|data| {
            block += 1;
            Mat::new(x.rows, widths[block - 1], data)
        }))
    }

    fn linear_silu_mul(&self, x: &Mat, gate: &CpuWeight, gate_b: Option<&CpuWeight>, up: &CpuWeight, up_b: Option<&CpuWeight>) -> Result<Mat> {
        if let (Some(g), Some(u)) = (gate.pairs(), up.pairs()) {
            return self.linear_silu_mul_pairs(x, outputs(gate), (g, gate_b), (u, up_b));
        }
        if !gemm::fuses_silu_mul(x.cols) {
            return super::linear_silu_mul_unfused(self, x, gate, gate_b, up, up_b);
        }
        let n = outputs(gate);
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
        let x = &Mat::new(x.rows, x.cols, xs.into_owned());
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
        Ok(self.rounded(Mat::new(x.rows, n, out)))
    }

    fn swiglu_residual(&self, x: &Mat, w: super::Swiglu<'_, CpuWeight>, mut residual: Mat) -> Result<Mat> {
        residual.f32("swiglu_residual")?;
        let ((gate, gate_b), (up, up_b), (down, down_b)) = (w.gate, w.up, w.down);
        let (Some(g), Some(u), Some(d)) = (gate.pairs(), up.pairs(), down.pairs()) else {
            return super::swiglu_residual_unfused(self, x, w, residual);
        };
        // SAFETY: gate and up are packed (F, K), down (C, F), the biases F and C values, the
        // residual T·C; pair panels exist only where the kernel runs. The activation is made
        // whole, in bf16 rows, before down reads it.
        unsafe {
            let act = gemm_bf16::matmul_silu_mul_rows(&x.gemm_rows(), g, gate_b.and_then(CpuWeight::values), u, up_b.and_then(CpuWeight::values), outputs(gate)); // (T, F)
            gemm_bf16::matmul(&act, d, outputs(down), down_b.and_then(CpuWeight::values), Dest::whole(residual.data.as_mut_ptr(), residual.cols), Out::Accumulate);
        }
        Ok(residual)
    }

    fn linear_residual(&self, x: &Mat, w: &CpuWeight, b: Option<&CpuWeight>, mut residual: Mat) -> Result<Mat> {
        residual.f32("linear_residual")?;
        let n = outputs(w);
        let b = b.and_then(CpuWeight::values);
        // SAFETY: as in `linear`; the residual's T·N values are the accumulators' start.
        unsafe { self.matmul("linear_residual", x, w, b, n, residual.data.as_mut_ptr(), Out::Accumulate)? };
        Ok(residual)
    }

    fn layer_norm(&self, x: &Mat, w: &CpuWeight, b: &CpuWeight, eps: f32) -> Result<Mat> {
        let x = x.f32("layer_norm")?;
        let (w, b) = (vector("layer_norm", w)?, vector("layer_norm", b)?);
        // Row r's mean and 1/σ, and its output value i.
        let stats = |row: &[f32]| {
            let n = row.len() as f64;
            let mean = vmath::sum_f64(row) / n;
            (mean, 1.0 / (vmath::sum_sq_dev(row, mean) / n + eps as f64).sqrt())
        };
        let value = |(mean, inv): (f64, f64), i: usize, v: f32| ((v as f64 - mean) * inv) as f32 * w[i] + b[i];
        if self.route == CpuRoute::Bf16Dot {
            // SAFETY: each row's C values are written.
            let rows = unsafe {
                gemm_bf16::Rows::from_fn(x.rows, x.cols, |r, out| {
                    let (row, s) = (x.row(r), stats(x.row(r)));
                    out.iter_mut().zip(row).enumerate().for_each(|(i, (o, &v))| {
                        o.write(round::round(value(s, i, v)));
                    });
                })
            };
            return Ok(Mat::narrow(rows, (x.rows, x.cols)));
        }
        let round = self.route.rounds();
        Ok(map_rows(x, x.cols, |row, out| {
            let s = stats(row);
            for (i, (o, &v)) in out.iter_mut().zip(row).enumerate() {
                let y = value(s, i, v);
                o.write(if round { round::round_f32(y) } else { y });
            }
        }))
    }

    fn rms_norm(&self, x: &Mat, w: &CpuWeight, eps: f32) -> Result<Mat> {
        let x = x.f32("rms_norm")?;
        let w = vector("rms_norm", w)?;
        let inv = |row: &[f32]| (1.0 / (vmath::sum_sq_dev(row, 0.0) / row.len() as f64 + eps as f64).sqrt()) as f32;
        if self.route == CpuRoute::Bf16Dot {
            // SAFETY: scale_gain_bf16 writes each row's C values.
            let rows = unsafe { gemm_bf16::Rows::from_fn(x.rows, x.cols, |r, out| vmath::scale_gain_bf16(x.row(r), inv(x.row(r)), w, out)) };
            return Ok(Mat::narrow(rows, (x.rows, x.cols)));
        }
        let round = self.route.rounds();
        Ok(map_rows(x, x.cols, |row, out| match round {
            true => vmath::scale_gain_rounded(row, inv(row), w, out),
            false => vmath::scale_gain(row, inv(row), w, out),
        }))
    }

    fn rope(&self, x: &mut Mat, col0: usize, heads: usize, head_dim: usize, positions: &[u32], inv_freq: &[f32]) -> Result<()> {
        x.f32("rope")?;
        let table = self.rope_tables.get(positions, inv_freq);
        let cols = x.cols;
        // Rows in items of ELEMWISE_CHUNK values, as in map_rows.
        x.data.par_chunks_mut(cols).enumerate().with_min_len(ELEMWISE_CHUNK.div_ceil(cols.max(1))).for_each(|(t, row)| {
            let (cos, sin) = table.row(t);
            for head in row[col0..col0 + heads * head_dim].chunks_exact_mut(head_dim) {
                vmath::rotate_half(head, cos, sin);
            }
        });
        Ok(())
    }

    fn attention(&self, q: &Mat, k: &Mat, v: &Mat, s: AttnShape, spans: &[AttnSpan]) -> Result<Mat> {
        let (q, k, v) = (q.f32("attention")?, k.f32("attention")?, v.f32("attention")?);
        Ok(self.rounded(attention::attention(q, k.into(), v.into(), s, spans, self.route, true)))
    }

    fn attention_cached(&self, q: &Mat, k: &CpuCache, v: &CpuCache, s: AttnShape, spans: &[AttnSpan]) -> Result<Mat> {
        let q = q.f32("attention_cached")?;
        let out = match (k, v) {
            (CpuCache::F32(k), CpuCache::F32(v)) => attention::attention(q, k.into(), v.into(), s, spans, self.route, true),
            (CpuCache::F16(k), CpuCache::F16(v)) => attention::attention(q, k.view(), v.view(), s, spans, self.route, true),
            (CpuCache::Bf16(k), CpuCache::Bf16(v)) => attention::attention(q, k.view(), v.view(), s, spans, self.route, true),
            _ => return Err(shape_err("attention_cached", format!("keys kept as {}, values as {}", k.dtype(), v.dtype()))),
        };
        Ok(self.rounded(out))
    }

    fn cache_from(&self, x: Mat) -> Result<CpuCache> {
        x.f32("cache_from")?;
        Ok(CpuCache::new(x, self.kv_dtype))
    }

    fn cache_append(&self, cache: &mut CpuCache, new: &Mat) -> Result<()> {
        new.f32("cache_append")?;
        cache.append(new);
        Ok(())
    }

    fn cache_rows(&self, cache: &CpuCache, rows: &[u32]) -> Result<CpuCache> {
        Ok(cache.rows(rows))
    }

    fn gelu(&self, x: &mut Mat) -> Result<()> {
        x.f32("gelu")?;
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
        gate.f32("silu_mul")?;
        up.f32("silu_mul")?;
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
        x.f32("add")?;
        y.f32("add")?;
        x.data.par_iter_mut().zip(&y.data).for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn cols(&self, x: &Mat, start: usize, width: usize) -> Result<Mat> {
        let x = x.f32("cols")?;
        Ok(map_rows(x, width, |row, out| {
            for (o, &v) in out.iter_mut().zip(&row[start..start + width]) {
                o.write(v);
            }
        }))
    }

    fn rows(&self, x: &Mat, rows: &[u32]) -> Result<Mat> {
        let x = x.f32("rows")?;
        Ok(gather_rows(rows.len(), x.cols, |i| x.row(rows[i] as usize)))
    }

    fn concat_rows(&self, a: &Mat, b: &Mat) -> Result<Mat> {
        let (a, b) = (a.f32("concat_rows")?, b.f32("concat_rows")?);
        Ok(gather_rows(a.rows + b.rows, a.cols, |i| if i < a.rows { a.row(i) } else { b.row(i - a.rows) }))
    }

    fn log_softmax_at(&self, logits: &Mat, targets: &[u32]) -> Result<Vec<f64>> {
        let logits = logits.f32("log_softmax_at")?;
        Ok(logits.data.par_chunks(logits.cols).zip(targets).map(|(row, &t)| row[t as usize] as f64 - logsumexp(row)).collect())
    }

    fn log_softmax(&self, logits: &Mat) -> Result<Vec<f32>> {
        let logits = logits.f32("log_softmax")?;
        let mut out = logits.data.clone();
        out.par_chunks_mut(logits.cols).for_each(|row| {
            let lse = logsumexp(row);
            row.iter_mut().for_each(|v| *v = (*v as f64 - lse) as f32);
        });
        Ok(out)
    }
}

impl WeightStream for CpuBackend {
    type Pinned = CpuPinned;
    type Slot = CpuSlot;
    type Transfer = CpuTransfer;

    fn upload_weight(&self, t: &HostTensor) -> Result<CpuWeight> {
        Ok(CpuWeight::from_host(t, self.route))
    }

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
}

/// A weight's bf16 pair panels and its bias: one half of a fused gate/up product.
type PairsOperand<'a> = (&'a [half::bf16], Option<&'a CpuWeight>);

impl CpuBackend {
    /// `linear_silu_mul` over bf16 pair panels: fused at any depth (gemm_bf16.rs), the output
    /// rounded there as the down projection's input.
    fn linear_silu_mul_pairs(&self, x: &Mat, n: usize, (g, gate_b): PairsOperand, (u, up_b): PairsOperand) -> Result<Mat> {
        let (gb, ub) = (gate_b.and_then(CpuWeight::values), up_b.and_then(CpuWeight::values));
        let len = x.rows * n;
        let mut out: Vec<f32> = Vec::with_capacity(len); // (T, F)
        // SAFETY: out has room for T·F values, all written; both weights are packed (F, K), the
        // biases F values; pair panels exist only where the kernel runs.
        unsafe {
            gemm_bf16::matmul_silu_mul(&x.gemm_rows(), g, gb, u, ub, n, gemm_bf16::SiluOut::F32(out.as_mut_ptr()));
            out.set_len(len);
        }
        Ok(Mat::new(x.rows, n, out))
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
