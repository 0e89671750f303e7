//! `linear` through cuBLASLt: bf16 x bf16 with f32 accumulation into an f32 output, bias
//! fused through the BIAS epilogue, a residual through beta = 1 (the output buffer holds it).
//! Layouts, descriptor and the heuristic's algorithm are a plan, built once per shape and
//! kept (every layer of a micro-batch repeats the same few shapes).
//!
//! Not cudarc's safe `Matmul` trait: it types A, B and C alike (so no f32 output from bf16
//! inputs), and its handle and descriptors unwrap() on failure; here every status becomes
//! a BackendError.

use super::{dev_err, BackendError, Result};
use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use std::collections::{HashMap, VecDeque};
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

/// Plans kept: a micro-batch's few shapes for each of the row counts in flight.
const PLANS_KEPT: usize = 64;

fn lt_err(what: &str, e: lt::CublasError) -> BackendError {
    BackendError::Device(format!("cuBLASLt {what}: {e:?}"))
}

/// A cuBLASLt handle bound to the compute stream, with its workspace.
pub struct Gemm {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    stream: Arc<CudaStream>,
    /// Held through each matmul call: the bias pointer is set on the plan's descriptor,
    /// which cuBLASLt reads when the call is queued.
    plans: Mutex<Plans>,
}

/// What a plan depends on besides the dtypes, which are fixed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct PlanKey {
    t: usize,
    k: usize,
    n: usize,
    bias: bool,
    residual: bool,
}

struct Plan {
    a: Layout,
    b: Layout,
    c: Layout,
    desc: Desc,
    algo: sys::cublasLtMatmulAlgo_t,
}

#[derive(Default)]
struct Plans {
    map: HashMap<PlanKey, Plan>,
    /// Insertion order, for eviction past PLANS_KEPT.
    order: VecDeque<PlanKey>,
    built: usize,
}

// SAFETY: a cuBLASLt handle may be used from any thread; every call on it is issued to
// the one compute stream, which orders them.
unsafe impl Send for Gemm {}
unsafe impl Sync for Gemm {}

impl Drop for Gemm {
    fn drop(&mut self) {
        // A failed destroy at teardown leaves nothing to recover; it must not panic.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

/// RAII guards so an early `?` never leaks a descriptor.
struct Layout(sys::cublasLtMatrixLayout_t);
impl Drop for Layout {
    fn drop(&mut self) {
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}
struct Desc(sys::cublasLtMatmulDesc_t);
impl Drop for Desc {
    fn drop(&mut self) {
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}
struct Pref(sys::cublasLtMatmulPreference_t);
impl Drop for Pref {
    fn drop(&mut self) {
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

impl Gemm {
    pub fn new(stream: Arc<CudaStream>, cc_major: i32) -> Result<Gemm> {
        // Hopper kernels want a larger workspace (NVIDIA recommends 32 MiB there).
        let size = if cc_major >= 9 { 32 << 20 } else { 4 << 20 };
        let workspace = unsafe { stream.alloc::<u8>(size) }.map_err(|e| dev_err("cuBLASLt workspace", e))?;
        let handle = lt::create_handle().map_err(|e| lt_err("create handle", e))?;
        Ok(Gemm { handle, workspace, stream, plans: Mutex::new(Plans::default()) })
    }

    /// How many plans were built so far (the parity test checks that repeats reuse them).
    pub fn plans_built(&self) -> usize {
        self.plans.lock().map(|p| p.built).unwrap_or(0)
    }

    /// cuBLASLt is column-major: row-major out (T, N) is column-major (N, T) with ld N, and
    /// out = op(A)·B with A = w as column-major (K, N) transposed, B = x as column-major (K, T).
    /// The bias is added per row of that column-major (N, T) result, i.e. per output column.
    fn plan(&self, key: PlanKey) -> Result<Plan> {
        let PlanKey { t, k, n, bias, .. } = key;
        let (t64, k64, n64) = (t as u64, k as u64, n as u64);
        let bf16 = sys::cudaDataType_t::CUDA_R_16BF;
        let f32t = sys::cudaDataType_t::CUDA_R_32F;
        let a = Layout(lt::create_matrix_layout(bf16, k64, n64, k as i64).map_err(|e| lt_err("layout A", e))?);
        let b = Layout(lt::create_matrix_layout(bf16, k64, t64, k as i64).map_err(|e| lt_err("layout B", e))?);
        let c = Layout(lt::create_matrix_layout(f32t, n64, t64, n as i64).map_err(|e| lt_err("layout C", e))?);
        let desc = Desc(
            lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, f32t).map_err(|e| lt_err("matmul desc", e))?,
        );
        let (op_t, op_n) = (1i32, 0i32); // CUBLAS_OP_T, CUBLAS_OP_N
        desc.set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, &op_t)?;
        desc.set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, &op_n)?;
        let epilogue = if bias { sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS } else { sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT };
        desc.set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue)?;
        let pref = Pref(lt::create_matmul_pref().map_err(|e| lt_err("preference", e))?);
        let ws_size = self.workspace.len();
        unsafe {
            lt::set_matmul_pref_attribute(
                pref.0,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws_size as *const usize as _,
                std::mem::size_of::<usize>(),
            )
        }
        .map_err(|e| lt_err("workspace preference", e))?;
        let heuristic = unsafe { lt::get_matmul_algo_heuristic(self.handle, desc.0, a.0, b.0, c.0, c.0, pref.0) }
            .map_err(|e| lt_err(&format!("no algorithm for bf16 ({t}x{k}) x ({n}x{k})^T -> f32"), e))?;
        Ok(Plan { a, b, c, desc, algo: heuristic.algo })
    }

    /// out (T, N) f32 = x (T, K) bf16 · w (N, K)ᵀ bf16 [+ bias (N,) f32] [+ out, where
    /// `residual`: out holds the residual on entry].
    #[allow(clippy::too_many_arguments)]
    pub fn linear(
        &self,
        x: &CudaSlice<u16>,
        w: &CudaSlice<u16>,
        bias: Option<&CudaSlice<f32>>,
        out: &mut CudaSlice<f32>,
        residual: bool,
        t: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        self.stream.context().bind_to_thread().map_err(|e| dev_err("bind context", e))?;
        let key = PlanKey { t, k, n, bias: bias.is_some(), residual };
        let mut plans = self.plans.lock().map_err(|_| BackendError::Device("cuBLASLt plans: a thread panicked while holding them".into()))?;
        if !plans.map.contains_key(&key) {
            let plan = self.plan(key)?;
            if plans.order.len() >= PLANS_KEPT {
                if let Some(old) = plans.order.pop_front() {
                    plans.map.remove(&old);
                }
            }
            plans.map.insert(key, plan);
            plans.order.push_back(key);
            plans.built += 1;
        }
        let plan = &plans.map[&key];
        let stream = &self.stream;
        // Guards record the reads/writes on the stream when dropped, after the launch.
        let _bias_guard = match bias {
            Some(b) => {
                let (p, g) = b.device_ptr(stream);
                plan.desc.set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &p)?;
                Some(g)
            }
            None => None,
        };
        let (alpha, beta) = (1.0f32, if residual { 1.0f32 } else { 0.0 });
        let (a_ptr, _ga) = w.device_ptr(stream);
        let (b_ptr, _gb) = x.device_ptr(stream);
        let (c_ptr, _gc) = out.device_ptr_mut(stream);
        let (ws_ptr, _gw) = self.workspace.device_ptr(stream);
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc.0,
                &alpha as *const f32 as _,
                &beta as *const f32 as _,
                a_ptr as *const c_void,
                plan.a.0,
                b_ptr as *const c_void,
                plan.b.0,
                c_ptr as *const c_void,
                plan.c.0,
                c_ptr as *mut c_void,
                plan.c.0,
                &plan.algo,
                ws_ptr as *mut c_void,
                self.workspace.len(),
                stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(|e| lt_err(&format!("matmul ({t}x{k}) x ({n}x{k})^T"), e))
    }
}

impl Desc {
    fn set<T>(&self, attr: sys::cublasLtMatmulDescAttributes_t, value: &T) -> Result<()> {
        unsafe { lt::set_matmul_desc_attribute(self.0, attr, value as *const T as *const c_void, std::mem::size_of::<T>()) }
            .map_err(|e| lt_err("matmul attribute", e))
    }
}
