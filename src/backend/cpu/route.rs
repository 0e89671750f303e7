//! The CPU backend's compute route: what its GEMMs multiply in (`ComputeDtype`) and what this
//! CPU runs that with, chosen once at start and printed by the command.

use super::gemm_bf16;
use crate::backend::ComputeDtype;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CpuRoute {
    /// f32 products of f32 activations and the weights' stored values (widened exactly).
    #[default]
    F32,
    /// bf16 GEMM inputs, products summed in f32 by AVX512-BF16's `vdpbf16ps` (gemm_bf16.rs).
    Bf16Dot,
    /// The same bf16 inputs on a CPU without AVX512-BF16: weights kept bf16 and widened as the
    /// f32 kernel loads them, activations rounded to bf16 values; the products of two bf16
    /// values are exact in f32, so only the order of the f32 sums differs from `Bf16Dot`.
    Bf16Widened,
}

impl CpuRoute {
    /// The fastest route this CPU runs for `dtype`.
    pub fn detect(dtype: ComputeDtype) -> CpuRoute {
        match dtype {
            ComputeDtype::F32 => CpuRoute::F32,
            ComputeDtype::Bf16 if gemm_bf16::available() => CpuRoute::Bf16Dot,
            ComputeDtype::Bf16 => CpuRoute::Bf16Widened,
        }
    }

    /// Every route this CPU runs for `dtype`, fastest first (tests run them all).
    pub fn available(dtype: ComputeDtype) -> Vec<CpuRoute> {
        match dtype {
            ComputeDtype::F32 => vec![CpuRoute::F32],
            ComputeDtype::Bf16 if gemm_bf16::available() => vec![CpuRoute::Bf16Dot, CpuRoute::Bf16Widened],
            ComputeDtype::Bf16 => vec![CpuRoute::Bf16Widened],
        }
    }

    pub fn dtype(self) -> ComputeDtype {
        match self {
            CpuRoute::F32 => ComputeDtype::F32,
            CpuRoute::Bf16Dot | CpuRoute::Bf16Widened => ComputeDtype::Bf16,
        }
    }

    /// Whether GEMM inputs are rounded to bf16.
    pub fn rounds(self) -> bool {
        self.dtype() == ComputeDtype::Bf16
    }
}

impl std::fmt::Display for CpuRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CpuRoute::F32 => "f32",
            CpuRoute::Bf16Dot => "bf16 (AVX512-BF16 dot products, f32 sums)",
            CpuRoute::Bf16Widened => "bf16 (no AVX512-BF16 on this CPU: bf16 inputs widened to f32 products)",
        })
    }
}
