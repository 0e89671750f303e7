//! `Kernels` and `WeightStream` for `CudaBackend`: one kernel or cuBLASLt call on the
//! compute stream per op.
//!
//! Shapes and index arrays (token ids, rows, targets, spans) are checked on the host by
//! shapes.rs before these run (the same layer, and so the same errors, as the CPU backend),
//! so kernels never see an out-of-range index. What is checked here is this backend's own:
//! 32-bit indexing, the attention kernel's limits, weights and activations in the storage an
//! op reads.

use super::{dev_err, elementwise_cfg, upload, ActBuf, CudaAct, CudaBackend, CudaSlot, CudaTransfer, CudaWeight, PinnedGroup, WeightBuf};
use crate::backend::{AttnShape, BackendError, CopySpan, Kernels, Result, WeightStream};
use std::sync::Arc;
use crate::token_tree::AttnSpan;
use crate::tensor::HostTensor;
use cudarc::driver::{LaunchConfig, PushKernelArg};

fn shape_err(op: &'static str, msg: String) -> BackendError {
    BackendError::Shape { op, msg }
}

fn rows_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

fn u32_of(op: &'static str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| shape_err(op, format!("dimension {v} exceeds the kernels' 32-bit indexing")))
}

fn bf16_of<'a>(op: &'static str, w: &'a CudaWeight) -> Result<&'a cudarc::driver::CudaSlice<u16>> {
    match &w.buf {
        WeightBuf::Bf16(b) => Ok(b),
        WeightBuf::F32(_) => Err(shape_err(op, format!("expected a matrix weight, got shape {:?}", w.shape))),
    }
}

fn vec_of<'a>(op: &'static str, w: &'a CudaWeight) -> Result<&'a cudarc::driver::CudaSlice<f32>> {
    match &w.buf {
        WeightBuf::F32(b) => Ok(b),
        WeightBuf::Bf16(_) => Err(shape_err(op, format!("expected a vector weight, got shape {:?}", w.shape))),
    }
}

impl CudaBackend {
    /// x <- act(x [, y]) over n f32 values, x becoming the bf16 result: GELU and SiLU·up
    /// feed only the down projection (see the module doc of cuda/mod.rs).
    fn activation_bf16(&self, op: &'static str, x: &mut CudaAct, y: Option<&CudaAct>) -> Result<()> {
        let n = x.rows * x.cols;
        let mut out = self.alloc_bf16(n, op)?;
        if n > 0 {
            let (f, name) = match y {
                None => (&self.k.gelu_f32_bf16, "gelu_f32_bf16"),
                Some(_) => (&self.k.silu_mul_f32_bf16, "silu_mul_f32_bf16"),
            };
            let n64 = n as u64;
            let mut l = self.stream.launch_builder(f);
            l.arg(x.f32(op)?);
            if let Some(y) = y {
                l.arg(y.f32(op)?);
            }
            l.arg(&mut out).arg(&n64);
            self.launched(name, unsafe { l.launch(elementwise_cfg(n)) })?;
        }
        x.buf = ActBuf::Bf16(out);
        Ok(())
    }
}

impl CudaBackend {
    /// out (T, N) = x (T, K) · w (N, K)ᵀ [+ b] [+ out where `residual`], on shapes
    /// `shapes::linear` let through.
    fn gemm_into(&self, x: &CudaAct, w: &CudaWeight, b: Option<&CudaWeight>, out: &mut CudaAct, residual: bool) -> Result<()> {
        let op = if residual { "linear_residual" } else { "linear" };
        let (n, k) = (w.shape[0], x.cols);
        let bias = b.map(|b| vec_of(op, b)).transpose()?;
        if x.rows == 0 {
            return Ok(());
        }
        // cuBLASLt reads bf16: an f32 input is staged (see the module doc of cuda/mod.rs).
        let staged;
        let x16 = match &x.buf {
            ActBuf::Bf16(b) => b,
            ActBuf::F32(f) => {
                staged = self.narrow(f, x.rows * k, "linear bf16 input")?;
                &staged
            }
        };
        self.gemm.linear(x16, bf16_of(op, w)?, bias, out.f32_mut(op)?, residual, x.rows, k, n)?;
        self.queued_op(op);
        Ok(())
    }

    /// cuBLASLt plans built so far (one per shape; repeats reuse them).
    pub fn gemm_plans_built(&self) -> usize {
        self.gemm.plans_built()
    }
}

impl Kernels for CudaBackend {
    type Act = CudaAct;
    type Weight = CudaWeight;
    /// The device keeps its generation cache as activations (`KvDtype::F32` only).
    type Cache = CudaAct;

    fn name(&self) -> String {
        self.name.clone()
    }

    fn weight_shape<'w>(&self, w: &'w CudaWeight) -> &'w [usize] {
        &w.shape
    }

    fn cache_dims(&self, c: &CudaAct) -> (usize, usize) {
        (c.rows, c.cols)
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<CudaAct> {
        if data.is_empty() {
            return self.act(rows, cols, "upload");
        }
        let buf = if data.len() >= super::staging::MIN_STAGED {
            self.staging.upload(self, data)?
        } else {
            self.stream.clone_htod(data).map_err(|e| dev_err("upload", e))?
        };
        Ok(CudaAct { rows, cols, buf: ActBuf::F32(buf) })
    }

    /// bf16 activations come back widened to f32 (exactly).
    fn download(&self, x: &CudaAct) -> Result<Vec<f32>> {
        let n = x.rows * x.cols;
        if n == 0 {
            return Ok(vec![]);
        }
        let wide;
        let buf = match &x.buf {
            ActBuf::F32(b) => b,
            ActBuf::Bf16(b) => {
                wide = self.widen(b, n, "download")?;
                &wide
            }
        };
        if n >= super::staging::MIN_STAGED {
            return self.staging.download(self, buf, n);
        }
        let mut v = self.stream.clone_dtoh(buf).map_err(|e| self.wait_err("download", e))?;
        self.synchronize()?;
        v.truncate(n);
        Ok(v)
    }

    fn dims(&self, x: &CudaAct) -> (usize, usize) {
        (x.rows, x.cols)
    }

    fn sync(&self) -> Result<()> {
        self.synchronize()
    }

    fn embed(&self, table: &CudaWeight, ids: &[u32]) -> Result<CudaAct> {
        let c = table.shape[1];
        let mut out = self.act(ids.len(), c, "embed")?;
        if ids.is_empty() {
            return Ok(out);
        }
        let d_ids = self.upload_u32(ids, "embed ids")?;
        let (t32, c32) = (u32_of("embed", ids.len())?, u32_of("embed", c)?);
        let mut l = self.stream.launch_builder(&self.k.embed_bf16);
        l.arg(bf16_of("embed", table)?).arg(&d_ids).arg(out.f32_mut("embed")?).arg(&t32).arg(&c32);
        self.launched("embed_bf16", unsafe { l.launch(rows_cfg(ids.len())) })?;
        Ok(out)
    }

    fn linear(&self, x: &CudaAct, w: &CudaWeight, b: Option<&CudaWeight>) -> Result<CudaAct> {
        let n = w.shape[0];
        let mut out = self.act(x.rows, n, "linear output")?;
        self.gemm_into(x, w, b, &mut out, false)?;
        Ok(out)
    }

    /// The residual is the GEMM's C with beta = 1, written over in place.
    fn linear_residual(&self, x: &CudaAct, w: &CudaWeight, b: Option<&CudaWeight>, mut residual: CudaAct) -> Result<CudaAct> {
        self.gemm_into(x, w, b, &mut residual, true)?;
        Ok(residual)
    }

    fn layer_norm(&self, x: &CudaAct, w: &CudaWeight, b: &CudaWeight, eps: f32) -> Result<CudaAct> {
        let (wv, bv) = (vec_of("layer_norm", w)?, vec_of("layer_norm", b)?);
        let mut out = self.alloc_bf16(x.rows * x.cols, "layer_norm")?;
        if x.rows > 0 {
            let (t32, c32) = (u32_of("layer_norm", x.rows)?, u32_of("layer_norm", x.cols)?);
            let mut l = self.stream.launch_builder(&self.k.layer_norm_f32_bf16);
            l.arg(x.f32("layer_norm")?).arg(wv).arg(bv).arg(&mut out).arg(&t32).arg(&c32).arg(&eps);
            self.launched("layer_norm_f32_bf16", unsafe { l.launch(rows_cfg(x.rows)) })?;
        }
        Ok(CudaAct { rows: x.rows, cols: x.cols, buf: ActBuf::Bf16(out) })
    }

    fn rms_norm(&self, x: &CudaAct, w: &CudaWeight, eps: f32) -> Result<CudaAct> {
        let wv = vec_of("rms_norm", w)?;
        let mut out = self.alloc_bf16(x.rows * x.cols, "rms_norm")?;
        if x.rows > 0 {
            let (t32, c32) = (u32_of("rms_norm", x.rows)?, u32_of("rms_norm", x.cols)?);
            let mut l = self.stream.launch_builder(&self.k.rms_norm_f32_bf16);
            l.arg(x.f32("rms_norm")?).arg(wv).arg(&mut out).arg(&t32).arg(&c32).arg(&eps);
            self.launched("rms_norm_f32_bf16", unsafe { l.launch(rows_cfg(x.rows)) })?;
        }
        Ok(CudaAct { rows: x.rows, cols: x.cols, buf: ActBuf::Bf16(out) })
    }

    fn rope(&self, x: &mut CudaAct, col0: usize, heads: usize, head_dim: usize, positions: &[u32], inv_freq: &[f32]) -> Result<()> {
        let pairs = heads * (head_dim / 2);
        if x.rows == 0 || pairs == 0 {
            return Ok(());
        }
        let d_pos = self.prepared.positions(self, positions)?;
        let d_freq = self.prepared.freqs(self, inv_freq)?;
        let (t32, ld, c0, h32, d32) = (
            u32_of("rope", x.rows)?,
            u32_of("rope", x.cols)?,
            u32_of("rope", col0)?,
            u32_of("rope", heads)?,
            u32_of("rope", head_dim)?,
        );
        // Rows in x (up to 2^31 - 1 blocks), pairs in y: any row count the planner allows.
        let cfg = LaunchConfig { grid_dim: (t32, u32_of("rope", pairs.div_ceil(256))?, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let mut l = self.stream.launch_builder(&self.k.rope_f32);
        l.arg(x.f32_mut("rope")?).arg(&*d_pos).arg(&*d_freq).arg(&t32).arg(&ld).arg(&c0).arg(&h32).arg(&d32);
        self.launched("rope_f32", unsafe { l.launch(cfg) })?;
        Ok(())
    }

    fn attention(&self, q: &CudaAct, k: &CudaAct, v: &CudaAct, s: AttnShape, spans: &[AttnSpan]) -> Result<CudaAct> {
        let (h, kvh, d) = (s.heads, s.kv_heads, s.head_dim);
        if d > super::ATTN_MAX_HEAD_DIM {
            return Err(shape_err("attention", format!("head_dim {d} > {} is not supported by kernels/attention.cu", super::ATTN_MAX_HEAD_DIM)));
        }
        if kvh > 65535 {
            return Err(shape_err("attention", format!("{kvh} kv heads: the kernel's grid holds at most 65535")));
        }
        let mut out = self.alloc_bf16(q.rows * h * d, "attention")?;
        if q.rows == 0 {
            return Ok(CudaAct { rows: 0, cols: h * d, buf: ActBuf::Bf16(out) });
        }
        let rows = self.prepared.attention(self, spans, s.key_offset, h / kvh)?;
        let (t32, h32, kv32, d32, s32, ko32) = (
            u32_of("attention", q.rows)?,
            u32_of("attention", h)?,
            u32_of("attention", kvh)?,
            u32_of("attention", d)?,
            u32_of("attention", k.rows)?,
            u32_of("attention", s.key_offset)?,
        );
        let scale = 1.0 / (d as f32).sqrt();
        let blocks = u32_of("attention", rows.blocks)?;
        let cfg = LaunchConfig { grid_dim: (blocks, kv32, 1), block_dim: (super::kernels::ATTN_THREADS, 1, 1), shared_mem_bytes: 0 };
        let mut l = self.stream.launch_builder(&self.k.flash_attention_f32_bf16);
        l.arg(q.f32("attention")?).arg(k.f32("attention")?).arg(v.f32("attention")?);
        l.arg(&rows.spans).arg(&rows.tile_off).arg(&rows.tile_start).arg(&mut out);
        l.arg(&t32).arg(&h32).arg(&kv32).arg(&d32).arg(&s32).arg(&ko32).arg(&scale);
        self.launched("flash_attention_f32_bf16", unsafe { l.launch(cfg) })?;
        Ok(CudaAct { rows: q.rows, cols: h * d, buf: ActBuf::Bf16(out) })
    }

    /// x becomes bf16 (the down projection's input).
    fn gelu(&self, x: &mut CudaAct) -> Result<()> {
        self.activation_bf16("gelu", x, None)
    }

    /// gate becomes bf16 (the down projection's input).
    fn silu_mul(&self, gate: &mut CudaAct, up: &CudaAct) -> Result<()> {
        self.activation_bf16("silu_mul", gate, Some(up))
    }

    fn add(&self, x: &mut CudaAct, y: &CudaAct) -> Result<()> {
        let n = x.rows * x.cols;
        if n == 0 {
            return Ok(());
        }
        let n64 = n as u64;
        let mut l = self.stream.launch_builder(&self.k.add_f32);
        l.arg(x.f32_mut("add")?).arg(y.f32("add")?).arg(&n64);
        self.launched("add_f32", unsafe { l.launch(elementwise_cfg(n)) })?;
        Ok(())
    }

    fn cols(&self, x: &CudaAct, start: usize, width: usize) -> Result<CudaAct> {
        let mut out = self.act(x.rows, width, "cols")?;
        if x.rows == 0 || width == 0 {
            return Ok(out);
        }
        let (t32, c32, s32, w32) = (u32_of("cols", x.rows)?, u32_of("cols", x.cols)?, u32_of("cols", start)?, u32_of("cols", width)?);
        let cfg = LaunchConfig { grid_dim: (t32, u32_of("cols", width.div_ceil(256))?, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let mut l = self.stream.launch_builder(&self.k.cols_f32);
        l.arg(x.f32("cols")?).arg(out.f32_mut("cols")?).arg(&t32).arg(&c32).arg(&s32).arg(&w32);
        self.launched("cols_f32", unsafe { l.launch(cfg) })?;
        Ok(out)
    }

    fn rows(&self, x: &CudaAct, rows: &[u32]) -> Result<CudaAct> {
        let mut out = self.act(rows.len(), x.cols, "rows")?;
        if rows.is_empty() || x.cols == 0 {
            return Ok(out);
        }
        let d_rows = self.upload_u32(rows, "row indices")?;
        let (r32, c32) = (u32_of("rows", rows.len())?, u32_of("rows", x.cols)?);
        let mut l = self.stream.launch_builder(&self.k.rows_f32);
        l.arg(x.f32("rows")?).arg(&d_rows).arg(out.f32_mut("rows")?).arg(&r32).arg(&c32);
        self.launched("rows_f32", unsafe { l.launch(rows_cfg(rows.len())) })?;
        Ok(out)
    }

    fn attention_cached(&self, q: &CudaAct, k: &CudaAct, v: &CudaAct, s: AttnShape, spans: &[AttnSpan]) -> Result<CudaAct> {
        self.attention(q, k, v, s, spans)
    }

    fn cache_from(&self, x: CudaAct) -> Result<CudaAct> {
        Ok(x)
    }

    fn cache_append(&self, cache: &mut CudaAct, new: &CudaAct) -> Result<()> {
        *cache = self.concat_rows(cache, new)?;
        Ok(())
    }

    fn cache_rows(&self, cache: &CudaAct, rows: &[u32]) -> Result<CudaAct> {
        self.rows(cache, rows)
    }

    /// Two device-to-device copies: a concat kernel would only re-implement memcpy.
    fn concat_rows(&self, a: &CudaAct, b: &CudaAct) -> Result<CudaAct> {
        let (na, nb) = (a.rows * a.cols, b.rows * b.cols);
        let mut out = self.act(a.rows + b.rows, a.cols, "concat_rows")?;
        let (ab, bb, ob) = (a.f32("concat_rows")?, b.f32("concat_rows")?, out.f32_mut("concat_rows")?);
        if na > 0 {
            let mut dst = ob.slice_mut(0..na);
            self.stream.memcpy_dtod(&ab.slice(0..na), &mut dst).map_err(|e| dev_err("concat_rows", e))?;
        }
        if nb > 0 {
            let mut dst = ob.slice_mut(na..na + nb);
            self.stream.memcpy_dtod(&bb.slice(0..nb), &mut dst).map_err(|e| dev_err("concat_rows", e))?;
        }
        Ok(out)
    }

    fn log_softmax_at(&self, logits: &CudaAct, targets: &[u32]) -> Result<Vec<f64>> {
        if targets.is_empty() {
            return Ok(vec![]);
        }
        let d_t = self.upload_u32(targets, "targets")?;
        let mut out = unsafe { self.stream.alloc::<f64>(targets.len()) }.map_err(|e| dev_err("log_softmax_at", e))?;
        let (s32, v32) = (u32_of("log_softmax_at", logits.rows)?, u32_of("log_softmax_at", logits.cols)?);
        let mut l = self.stream.launch_builder(&self.k.log_softmax_at_f32);
        l.arg(logits.f32("log_softmax_at")?).arg(&d_t).arg(&mut out).arg(&s32).arg(&v32);
        self.launched("log_softmax_at_f32", unsafe { l.launch(rows_cfg(targets.len())) })?;
        let v = self.stream.clone_dtoh(&out).map_err(|e| self.wait_err("log_softmax_at download", e))?;
        self.synchronize()?;
        Ok(v)
    }

    fn log_softmax(&self, logits: &CudaAct) -> Result<Vec<f32>> {
        let mut out = self.act(logits.rows, logits.cols, "log_softmax")?;
        if logits.rows == 0 || logits.cols == 0 {
            return Ok(vec![]);
        }
        let (s32, v32) = (u32_of("log_softmax", logits.rows)?, u32_of("log_softmax", logits.cols)?);
        let mut l = self.stream.launch_builder(&self.k.log_softmax_f32);
        l.arg(logits.f32("log_softmax")?).arg(out.f32_mut("log_softmax")?).arg(&s32).arg(&v32);
        self.launched("log_softmax_f32", unsafe { l.launch(rows_cfg(logits.rows)) })?;
        self.download(&out)
    }
}

impl WeightStream for CudaBackend {
    type Pinned = PinnedGroup;
    type Slot = CudaSlot;
    type Transfer = CudaTransfer;

    fn upload_weight(&self, t: &HostTensor) -> Result<CudaWeight> {
        let what = format!("weight {:?}", t.shape);
        let buf = if t.shape.len() >= 2 {
            let host = upload::to_bf16_bits(t);
            let dev = if host.is_empty() { unsafe { self.stream.alloc::<u16>(1) } } else { self.stream.clone_htod(&host) };
            WeightBuf::Bf16(dev.map_err(|e| dev_err(&what, e))?)
        } else {
            let host = t.to_f32();
            let dev = if host.is_empty() { unsafe { self.stream.alloc::<f32>(1) } } else { self.stream.clone_htod(&host) };
            WeightBuf::F32(dev.map_err(|e| dev_err(&what, e))?)
        };
        Ok(CudaWeight { shape: t.shape.clone(), buf })
    }

    fn pin(&self, tensors: &[HostTensor]) -> Result<PinnedGroup> {
        self.stream_pin(tensors)
    }

    fn prefetch(&self, group: Arc<PinnedGroup>, slot: Option<CudaSlot>) -> Result<CudaTransfer> {
        self.stream_prefetch(&group, slot)
    }

    fn wait(&self, transfer: &mut CudaTransfer) -> Result<Vec<CudaWeight>> {
        self.stream_wait(transfer)
    }

    fn release(&self, transfer: CudaTransfer, weights: Vec<CudaWeight>) -> Result<(CudaSlot, Option<CopySpan>)> {
        self.stream_release(transfer, weights)
    }

    fn random_weight(&self, shape: &[usize], seed: u64, lo: f32, hi: f32) -> Result<CudaWeight> {
        CudaBackend::random_weight(self, shape, seed, lo, hi)
    }
}
