//! CUDA backend (cudarc 0.19, libraries loaded at run time).
//!
//! Always compiled; `CudaBackend::new` checks at run time that libcuda, cuBLASLt and NVRTC
//! load and that the device exists, and turns anything missing into
//! `BackendError::Unavailable` (cudarc itself would panic at first use).
//!
//! Storage choices:
//! - Activations (`CudaAct`) are (rows, cols) row-major, f32 or bf16 (`ActBuf`). Every op
//!   computes in f32. The outputs that only a GEMM reads (norms, GELU, SiLU·up, attention)
//!   are written in bf16, rounded once from the f32 result: cuBLASLt multiplies bf16 by
//!   bf16, accumulating in f32. What the model reads elsewhere stays f32: the residual
//!   stream (GEMM outputs with beta = 1), q/k/v and the generation cache, logits. An f32
//!   input to a GEMM (an uploaded activation) is rounded to a bf16 staging copy first, the
//!   same rounding the producers do.
//! - Weights with 2+ dims (projections, embeddings, LM head) are bf16 on the device,
//!   whatever the host dtype (narrowed with round-to-nearest-even on the host).
//! - 1-D weights (norm weights, biases) stay f32: they are tiny, the norms read them in
//!   f32 anyway, and the GEMM bias epilogue of an f32-output matmul reads an f32 vector.
//!
//! Ordering: all ops run on one compute stream. Weight streaming copies on a second stream
//! forked from it, ordered by explicit events both ways (upload.rs: compute waits on a
//! copy's `done`, a copy into a reused slot waits on the slot's `readers_done`). cudarc's
//! per-buffer event tracking stays on as well.

mod attn_plan;
mod gemm;
mod kernels;
mod ops;
mod prepared;
mod staging;
mod track;
mod upload;

pub use kernels::{compile_file, kernel_files, ATTN_MAX_HEAD_DIM};
pub use track::sync_each_op;
pub use upload::{CudaSlot, CudaTransfer, PinnedGroup};

use super::{BackendError, Result};
use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use std::sync::Arc;
use std::time::Instant;

pub(crate) fn dev_err(what: &str, e: impl std::fmt::Debug) -> BackendError {
    let msg = format!("{e:?}");
    if msg.contains("OUT_OF_MEMORY") {
        BackendError::Device(format!("{what}: out of device memory ({msg})"))
    } else {
        BackendError::Device(format!("{what}: {msg}"))
    }
}

/// A (rows, cols) activation matrix on the device (see the module doc for its dtype).
pub struct CudaAct {
    pub rows: usize,
    pub cols: usize,
    pub(crate) buf: ActBuf,
}

pub(crate) enum ActBuf {
    F32(CudaSlice<f32>),
    /// bf16 bit patterns: an output only a GEMM reads
    Bf16(CudaSlice<u16>),
}

impl CudaAct {
    /// The f32 values of an op's input. A bf16 activation here is a model wiring error: only
    /// GEMMs read them.
    pub(crate) fn f32(&self, op: &'static str) -> Result<&CudaSlice<f32>> {
        match &self.buf {
            ActBuf::F32(b) => Ok(b),
            ActBuf::Bf16(_) => Err(super::bf16_input(op)),
        }
    }

    pub(crate) fn f32_mut(&mut self, op: &'static str) -> Result<&mut CudaSlice<f32>> {
        match &mut self.buf {
            ActBuf::F32(b) => Ok(b),
            ActBuf::Bf16(_) => Err(super::bf16_input(op)),
        }
    }

    /// Whether this activation is kept in bf16 (an output only a GEMM reads).
    pub fn is_bf16(&self) -> bool {
        matches!(self.buf, ActBuf::Bf16(_))
    }
}

pub(crate) enum WeightBuf {
    /// 2+ dims, row-major
    Bf16(CudaSlice<u16>),
    /// 1 dim
    F32(CudaSlice<f32>),
}

/// A weight on the device with its logical shape (see the module doc for its dtype).
pub struct CudaWeight {
    pub shape: Vec<usize>,
    pub(crate) buf: WeightBuf,
}

impl CudaWeight {
    pub fn bytes(&self) -> usize {
        match &self.buf {
            WeightBuf::Bf16(b) => b.len() * 2,
            WeightBuf::F32(b) => b.len() * 4,
        }
    }
}

pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    /// Every op runs here.
    stream: Arc<CudaStream>,
    /// Weight copies for streaming, forked from `stream`.
    copy_stream: Arc<CudaStream>,
    /// A timing event that had completed at this host instant: device event times become
    /// host times for the trace (upload.rs `host_span`).
    clock: (CudaEvent, Instant),
    k: kernels::Kernels,
    gemm: gemm::Gemm,
    /// Positions, spans and tile plans of the micro-batches in flight (prepared.rs).
    prepared: prepared::Prepared,
    /// Pinned buffers for activation uploads and downloads (staging.rs).
    staging: staging::Staging,
    /// Ops queued since the last wait, for errors (track.rs).
    queued: track::Queued,
    name: String,
    cc: (i32, i32),
}

/// Whether the libraries this backend loads are present (no device is touched).
pub fn libraries_present() -> std::result::Result<(), String> {
    // SAFETY: these only try to dlopen the library names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("the NVIDIA driver library libcuda.so.1 was not found (no NVIDIA driver installed?)".into());
    }
    if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
        return Err("cuBLASLt (libcublasLt.so.13) was not found; install the CUDA 13 cuBLAS runtime".into());
    }
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err("NVRTC (libnvrtc.so.13) was not found; install the CUDA 13 NVRTC runtime".into());
    }
    Ok(())
}

/// Number of CUDA devices, or why there are none usable.
pub fn device_count() -> std::result::Result<usize, String> {
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("the NVIDIA driver library libcuda.so.1 was not found".into());
    }
    CudaContext::device_count().map(|n| n.max(0) as usize).map_err(|e| format!("CUDA driver: {e:?}"))
}

/// Launch config for `n` elements with a grid-stride kernel (any grid size is correct).
fn elementwise_cfg(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65535 * 8) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

impl CudaBackend {
    /// Opens device `ordinal`, compiles the kernels for it and sets up cuBLASLt.
    pub fn new(ordinal: usize) -> Result<CudaBackend> {
        libraries_present().map_err(BackendError::Unavailable)?;
        let count = device_count().map_err(BackendError::Unavailable)?;
        if ordinal >= count {
            return Err(BackendError::Unavailable(format!("CUDA device {ordinal} requested, {count} present")));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| BackendError::Unavailable(format!("opening CUDA device {ordinal}: {e:?}")))?;
        let cc = ctx.compute_capability().map_err(|e| dev_err("compute capability", e))?;
        if cc.0 < 7 || (cc.0 == 7 && cc.1 < 5) {
            return Err(BackendError::Unavailable(format!(
                "CUDA device {ordinal} has compute capability {}.{}; CUDA 13 needs 7.5 or newer",
                cc.0, cc.1
            )));
        }
        let dev_name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        // A non-default stream: the legacy default stream would serialise with the copy stream.
        let stream = ctx.new_stream().map_err(|e| dev_err("compute stream", e))?;
        let copy_stream = stream.fork().map_err(|e| dev_err("copy stream", e))?;
        let k = kernels::Kernels::compile(&ctx, cc.0, cc.1)?;
        let gemm = gemm::Gemm::new(stream.clone(), cc.0)?;
        let name = format!("cuda:{ordinal} ({dev_name}, sm_{}{})", cc.0, cc.1);
        let anchor = stream.record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| dev_err("clock event", e))?;
        anchor.synchronize().map_err(|e| dev_err("clock event", e))?;
        let clock = (anchor, Instant::now());
        Ok(CudaBackend { ctx, stream, copy_stream, clock, k, gemm, prepared: Default::default(), staging: Default::default(), queued: track::Queued::from_env(), name, cc })
    }

    pub fn compute_capability(&self) -> (i32, i32) {
        self.cc
    }

    /// (free, total) device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(|e| dev_err("memory info", e))
    }

    /// Blocks until all work queued on the compute stream is done.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| self.wait_err("synchronize", e))?;
        self.waited();
        Ok(())
    }

    /// n uninitialised values (at least one, so empty results still have a buffer).
    fn alloc<T: cudarc::driver::DeviceRepr>(&self, n: usize, what: &str) -> Result<CudaSlice<T>> {
        // SAFETY: every caller overwrites all n values before reading them.
        unsafe { self.stream.alloc::<T>(n.max(1)) }.map_err(|e| dev_err(&format!("{what}: allocating {} bytes", n * std::mem::size_of::<T>()), e))
    }

    pub(crate) fn alloc_f32(&self, n: usize, what: &str) -> Result<CudaSlice<f32>> {
        self.alloc(n, what)
    }

    pub(crate) fn alloc_bf16(&self, n: usize, what: &str) -> Result<CudaSlice<u16>> {
        self.alloc(n, what)
    }

    pub(crate) fn act(&self, rows: usize, cols: usize, what: &str) -> Result<CudaAct> {
        Ok(CudaAct { rows, cols, buf: ActBuf::F32(self.alloc_f32(rows * cols, what)?) })
    }

    /// Small host index arrays (ids, positions, spans, rows) go up synchronously-enough:
    /// a pageable-memory copy returns once the source is staged.
    pub(crate) fn upload_u32(&self, v: &[u32], what: &str) -> Result<CudaSlice<u32>> {
        self.upload_small(v, what)
    }

    /// Small host f32 tables (the rotary frequencies), like `upload_u32`.
    pub(crate) fn upload_f32(&self, v: &[f32], what: &str) -> Result<CudaSlice<f32>> {
        self.upload_small(v, what)
    }

    fn upload_small<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(&self, v: &[T], what: &str) -> Result<CudaSlice<T>> {
        if v.is_empty() {
            // SAFETY: a one-element placeholder no kernel reads (callers launch nothing for empty input).
            return unsafe { self.stream.alloc::<T>(1) }.map_err(|e| dev_err(what, e));
        }
        self.stream.clone_htod(v).map_err(|e| dev_err(what, e))
    }

    /// A weight of `shape` with values uniform in [lo, hi), made on the device from a
    /// hash of (seed, index): synthetic layers for the benchmark without host traffic.
    pub fn random_weight(&self, shape: &[usize], seed: u64, lo: f32, hi: f32) -> Result<CudaWeight> {
        let n: usize = shape.iter().product();
        let what = format!("random weight {shape:?}");
        let mut b16 = self.alloc_bf16(n, &what)?;
        let n64 = n as u64;
        if n > 0 {
            let mut l = self.stream.launch_builder(&self.k.fill_uniform_bf16);
            l.arg(&mut b16).arg(&n64).arg(&seed).arg(&lo).arg(&hi);
            self.launched("fill_uniform_bf16", unsafe { l.launch(elementwise_cfg(n)) })?;
        }
        if shape.len() >= 2 {
            return Ok(CudaWeight { shape: shape.to_vec(), buf: WeightBuf::Bf16(b16) });
        }
        Ok(CudaWeight { shape: shape.to_vec(), buf: WeightBuf::F32(self.widen(&b16, n, &what)?) })
    }

    /// The first n values of x, rounded to nearest even in a new bf16 buffer.
    pub(crate) fn narrow(&self, x: &CudaSlice<f32>, n: usize, what: &str) -> Result<CudaSlice<u16>> {
        self.cast(&self.k.cast_f32_bf16, "cast_f32_bf16", x, n, what)
    }

    /// The first n values of x widened to a new f32 buffer (exact).
    pub(crate) fn widen(&self, x: &CudaSlice<u16>, n: usize, what: &str) -> Result<CudaSlice<f32>> {
        self.cast(&self.k.cast_bf16_f32, "cast_bf16_f32", x, n, what)
    }

    /// `kernel` (x, out, n) over the first n values of x into a new buffer.
    fn cast<A: cudarc::driver::DeviceRepr, B: cudarc::driver::DeviceRepr>(&self, kernel: &cudarc::driver::CudaFunction, name: &'static str, x: &CudaSlice<A>, n: usize, what: &str) -> Result<CudaSlice<B>> {
        let mut out = self.alloc::<B>(n, what)?;
        if n > 0 {
            let n64 = n as u64;
            let mut l = self.stream.launch_builder(kernel);
            l.arg(x).arg(&mut out).arg(&n64);
            self.launched(name, unsafe { l.launch(elementwise_cfg(n)) })?;
        }
        Ok(out)
    }
}
