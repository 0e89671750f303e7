//! NVRTC compilation of kernels/*.cu, once per backend, for the device's compute capability.
//!
//! Every kernel file gets kernels/common.cuh pasted in front (NVRTC sees one string per
//! program; an #include would need a header search path on the user's machine).

use super::{dev_err, BackendError, Result};
use cudarc::driver::{CudaContext, CudaFunction};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions};
use std::sync::Arc;

const COMMON: &str = include_str!("../../../kernels/common.cuh");

/// (file name, source, kernel names it defines)
const FILES: &[(&str, &str, &[&str])] = &[
    ("embed.cu", include_str!("../../../kernels/embed.cu"), &["embed_bf16"]),
    ("norm.cu", include_str!("../../../kernels/norm.cu"), &["layer_norm_f32_bf16", "rms_norm_f32_bf16"]),
    ("rope.cu", include_str!("../../../kernels/rope.cu"), &["rope_f32"]),
    ("attention.cu", include_str!("../../../kernels/attention.cu"), &["flash_attention_f32_bf16"]),
    (
        "elementwise.cu",
        include_str!("../../../kernels/elementwise.cu"),
        &["gelu_f32_bf16", "silu_mul_f32_bf16", "add_f32", "cast_f32_bf16", "cast_bf16_f32", "fill_uniform_bf16"],
    ),
    ("gather.cu", include_str!("../../../kernels/gather.cu"), &["cols_f32", "rows_f32"]),
    ("softmax.cu", include_str!("../../../kernels/softmax.cu"), &["log_softmax_at_f32", "log_softmax_f32"]),
];

/// Largest head dim attention.cu's register and shared-memory tiles hold (FA_MAXD).
pub const ATTN_MAX_HEAD_DIM: usize = 128;
/// (query row, head) pairs per attention block (FA_BM).
pub const ATTN_BLOCK_ROWS: usize = 64;
/// Keys per attention tile (FA_BK).
pub const ATTN_TILE_KEYS: usize = 32;
/// Threads per attention block (FA_WARPS * 32).
pub const ATTN_THREADS: u32 = 128;

pub struct Kernels {
    pub embed_bf16: CudaFunction,
    pub layer_norm_f32_bf16: CudaFunction,
    pub rms_norm_f32_bf16: CudaFunction,
    pub rope_f32: CudaFunction,
    pub flash_attention_f32_bf16: CudaFunction,
    pub gelu_f32_bf16: CudaFunction,
    pub silu_mul_f32_bf16: CudaFunction,
    pub add_f32: CudaFunction,
    pub cast_f32_bf16: CudaFunction,
    pub cast_bf16_f32: CudaFunction,
    pub fill_uniform_bf16: CudaFunction,
    pub cols_f32: CudaFunction,
    pub rows_f32: CudaFunction,
    pub log_softmax_at_f32: CudaFunction,
    pub log_softmax_f32: CudaFunction,
}

fn compile_error(file: &str, arch: &str, e: CompileError) -> BackendError {
    let detail = match e {
        CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
        other => format!("{other:?}"),
    };
    // Device, not Unavailable: a GPU is there but our kernels are broken for it, which
    // callers (auto selection, the parity tests) must not mistake for "no GPU".
    BackendError::Device(format!("NVRTC could not compile kernels/{file} for {arch}:\n{detail}"))
}

/// Every kernel file as the backend compiles it: (file name, source, kernel names).
pub fn kernel_files() -> &'static [(&'static str, &'static str, &'static [&'static str])] {
    FILES
}

/// NVRTC's PTX for one kernel file, compiled exactly as the backend does: common.cuh pasted
/// in front, the same options, for the virtual architecture `compute_{major}{minor}`. Needs
/// NVRTC only (no driver, no device), so a machine without a GPU can check the kernels
/// compile (tests/nvrtc_kernels.rs).
pub fn compile_file(file: &str, src: &str, major: i32, minor: i32) -> Result<cudarc::nvrtc::Ptx> {
    // CompileOptions wants a &'static str; one short string per file is leaked.
    let arch: &'static str = Box::leak(format!("compute_{major}{minor}").into_boxed_str());
    let opts = CompileOptions {
        arch: Some(arch),
        name: Some(file.to_string()),
        // Precise division and sqrt: the CPU reference is IEEE f32/f64.
        prec_div: Some(true),
        prec_sqrt: Some(true),
        ..Default::default()
    };
    let full = format!("{COMMON}\n#line 1 \"{file}\"\n{src}");
    compile_ptx_with_opts(full, opts).map_err(|e| compile_error(file, arch, e))
}

impl Kernels {
    /// Compiles every kernel file for `compute_{major}{minor}` and loads it into `ctx`.
    /// PTX for the virtual architecture (not sm_XX): cudarc reads the program's PTX, which
    /// NVRTC only emits for virtual targets; the driver JIT-compiles it for the real GPU.
    pub fn compile(ctx: &Arc<CudaContext>, major: i32, minor: i32) -> Result<Kernels> {
        let mut funcs = std::collections::HashMap::new();
        for (file, src, names) in FILES {
            let ptx = compile_file(file, src, major, minor)?;
            let module = ctx.load_module(ptx).map_err(|e| dev_err(&format!("loading kernels/{file}"), e))?;
            for name in *names {
                let f = module.load_function(name).map_err(|e| dev_err(&format!("kernel {name} in kernels/{file}"), e))?;
                funcs.insert(*name, f);
            }
        }
        let mut take = |name: &str| {
            funcs.remove(name).ok_or_else(|| BackendError::Unavailable(format!("kernel {name} missing from kernels/*.cu")))
        };
        Ok(Kernels {
            embed_bf16: take("embed_bf16")?,
            layer_norm_f32_bf16: take("layer_norm_f32_bf16")?,
            rms_norm_f32_bf16: take("rms_norm_f32_bf16")?,
            rope_f32: take("rope_f32")?,
            flash_attention_f32_bf16: take("flash_attention_f32_bf16")?,
            gelu_f32_bf16: take("gelu_f32_bf16")?,
            silu_mul_f32_bf16: take("silu_mul_f32_bf16")?,
            add_f32: take("add_f32")?,
            cast_f32_bf16: take("cast_f32_bf16")?,
            cast_bf16_f32: take("cast_bf16_f32")?,
            fill_uniform_bf16: take("fill_uniform_bf16")?,
            cols_f32: take("cols_f32")?,
            rows_f32: take("rows_f32")?,
            log_softmax_at_f32: take("log_softmax_at_f32")?,
            log_softmax_f32: take("log_softmax_f32")?,
        })
    }
}
