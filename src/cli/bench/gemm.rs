//! `falcon-batch bench --gemm`: GFLOP/s of the CPU backend's `linear` (its own packed GEMM)
//! against the `gemm` crate on the same shapes and threads, best of interleaved repeats.

use super::synthetic::{BenchError, Result};
use falcon_batch::backend::cpu::{CpuBackend, CpuRoute};
use falcon_batch::backend::{ComputeDtype, KvDtype, Ops, WeightStream};
use falcon_batch::tensor::{DType, HostTensor};
use serde::Serialize;
use std::time::Instant;

/// One (T, K, N) shape: out (T, N) = x (T, K) · w (N, K)ᵀ.
#[derive(Clone, Debug, Serialize)]
pub struct GemmTiming {
    pub t: usize,
    pub k: usize,
    pub n: usize,
    /// `CpuBackend::linear`, output allocation included, over wall time.
    pub linear_gflops: f64,
    /// The `gemm` crate (packs w on every call), into a preallocated output.
    pub gemm_crate_gflops: f64,
    /// The same over the process's CPU time (all threads): what a loaded machine does not
    /// distort much, a per-core efficiency rather than a speed.
    pub linear_cpu_gflops: f64,
    pub gemm_crate_cpu_gflops: f64,
    /// SwiGLU's gate and up products at this shape (N = F): `linear_silu_mul`, fused, and the
    /// trait's reference route (two `linear`s, then `silu_mul`), over wall time.
    pub gate_up_fused_gflops: f64,
    pub gate_up_unfused_gflops: f64,
    /// `linear` over the same weight held as bf16 and as f16 (widened as the kernel loads it),
    /// over wall time.
    pub linear_bf16_gflops: f64,
    pub linear_f16_gflops: f64,
    /// `linear` and the fused gate+up on the bf16 compute route (`--compute-dtype bf16`: bf16
    /// weights and activations, f32 sums), over wall time; `bf16_route` says how it ran.
    pub linear_bf16_compute_gflops: f64,
    pub gate_up_bf16_compute_gflops: f64,
    pub bf16_route: String,
}

/// CPU seconds this process has used, all threads.
fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// "512x576x1536,1x576x576" -> [(T, K, N), ...]
pub fn parse_shapes(s: &str) -> Result<Vec<(usize, usize, usize)>> {
    s.split(',')
        .map(|shape| {
            let dims: Vec<usize> = shape.split('x').map(|d| d.trim().parse::<usize>()).collect::<std::result::Result<_, _>>().map_err(|e| BenchError::Invalid(format!("gemm shape `{shape}`: {e}")))?;
            match dims[..] {
                [t, k, n] if t * k * n > 0 => Ok((t, k, n)),
                _ => Err(BenchError::Invalid(format!("gemm shape `{shape}`: expected TxKxN, all positive"))),
            }
        })
        .collect()
}

/// (wall, CPU) seconds per call of `f`, repeated for at least 0.1 s.
fn seconds_per_call(mut f: impl FnMut()) -> (f64, f64) {
    let (start, cpu0, mut calls) = (Instant::now(), cpu_seconds(), 0u32);
    while calls == 0 || start.elapsed().as_secs_f64() < 0.1 {
        f();
        calls += 1;
    }
    (start.elapsed().as_secs_f64() / calls as f64, (cpu_seconds() - cpu0) / calls as f64)
}

fn min2(a: (f64, f64), b: (f64, f64)) -> (f64, f64) {
    (a.0.min(b.0), a.1.min(b.1))
}

pub fn run(shapes: &[(usize, usize, usize)], reps: usize) -> Result<Vec<GemmTiming>> {
    // As a CPU rank runs (job/rank.rs): freed outputs reused, not faulted in afresh per call.
    falcon_batch::backend::cpu::keep_freed_buffers();
    let b = CpuBackend::new();
    let b16 = CpuBackend::with_route(KvDtype::F32, CpuRoute::detect(ComputeDtype::Bf16));
    let threads = rayon::current_num_threads();
    let mut out = vec![];
    for &(t, k, n) in shapes {
        let values = |len: usize, seed: u64| (0..len as u64).map(|i| falcon_batch::backend::uniform_bf16(seed, i, -1.0, 1.0)).collect::<Vec<f32>>();
        let (xv, wv) = (values(t * k, 1), values(n * k, 2));
        let x = b.upload(&xv, t, k)?;
        let w = b.random_weight(&[n, k], 2, -1.0, 1.0)?;
        let up = b.random_weight(&[n, k], 3, -1.0, 1.0)?;
        let half = |dtype| b.upload_weight(&HostTensor::from_f32(vec![n, k], &wv).to_dtype(dtype));
        let (w_bf16, w_f16) = (half(DType::Bf16)?, half(DType::F16)?);
        let on_bf16 = |seed| b16.random_weight(&[n, k], seed, -1.0, 1.0);
        let (w16, up16, x16) = (on_bf16(2)?, on_bf16(3)?, b16.upload(&xv, t, k)?);
        let mut dst = vec![0f32; t * n];
        let flops = 2.0 * (t * k * n) as f64;
        let inf = (f64::INFINITY, f64::INFINITY);
        let (mut ours, mut theirs, mut fused, mut unfused, mut ours_bf16, mut ours_f16) = (inf, inf, inf, inf, inf, inf);
        let (mut compute16, mut fused16) = (inf, inf);
        let mut err = None;
        // Interleaved: a load spike hits both alike.
        for _ in 0..reps.max(1) {
            for (best, w) in [(&mut ours, &w), (&mut ours_bf16, &w_bf16), (&mut ours_f16, &w_f16)] {
                *best = min2(*best, seconds_per_call(|| {
                    if let Err(e) = b.linear(&x, w, None) {
                        err = Some(e);
                    }
                }));
            }
            theirs = min2(theirs, seconds_per_call(|| {
                // SAFETY: dst holds t·n floats, xv t·k and wv n·k, matching the strides.
                unsafe {
                    gemm::gemm(
                        t, n, k,
                        dst.as_mut_ptr(), 1, n as isize, false,
                        xv.as_ptr(), 1, k as isize,
                        wv.as_ptr(), k as isize, 1,
                        0.0, 1.0, false, false, false, gemm::Parallelism::Rayon(threads),
                    )
                }
            }));
            fused = min2(fused, seconds_per_call(|| {
                if let Err(e) = b.linear_silu_mul(&x, &w, None, &up, None) {
                    err = Some(e);
                }
            }));
            compute16 = min2(compute16, seconds_per_call(|| {
                if let Err(e) = b16.linear(&x16, &w16, None) {
                    err = Some(e);
                }
            }));
            fused16 = min2(fused16, seconds_per_call(|| {
                if let Err(e) = b16.linear_silu_mul(&x16, &w16, None, &up16, None) {
                    err = Some(e);
                }
            }));
            unfused = min2(unfused, seconds_per_call(|| {
                if let Err(e) = falcon_batch::backend::linear_silu_mul_unfused(&b, &x, &w, None, &up, None) {
                    err = Some(e);
                }
            }));
        }
        if let Some(e) = err {
            return Err(e.into());
        }
        let g = |s: f64| flops / s / 1e9;
        let row = GemmTiming {
            t, k, n,
            linear_gflops: g(ours.0),
            gemm_crate_gflops: g(theirs.0),
            linear_cpu_gflops: g(ours.1),
            gemm_crate_cpu_gflops: g(theirs.1),
            gate_up_fused_gflops: 2.0 * g(fused.0),
            gate_up_unfused_gflops: 2.0 * g(unfused.0),
            linear_bf16_gflops: g(ours_bf16.0),
            linear_f16_gflops: g(ours_f16.0),
            linear_bf16_compute_gflops: g(compute16.0),
            gate_up_bf16_compute_gflops: 2.0 * g(fused16.0),
            bf16_route: b16.route().to_string(),
        };
        falcon_batch::info!(
            "gemm {t}x{k}x{n}: linear {:.1} GFLOP/s ({:.1} per CPU-s; bf16 weights {:.1}, f16 {:.1}), gemm crate {:.1} ({:.1} per CPU-s); gate+up fused {:.1}, unfused {:.1}; bf16 compute: linear {:.1}, gate+up fused {:.1}",
            row.linear_gflops, row.linear_cpu_gflops, row.linear_bf16_gflops, row.linear_f16_gflops, row.gemm_crate_gflops, row.gemm_crate_cpu_gflops, row.gate_up_fused_gflops, row.gate_up_unfused_gflops, row.linear_bf16_compute_gflops, row.gate_up_bf16_compute_gflops
        );
        out.push(row);
    }
    Ok(out)
}
