//! The compute backend: what the model asks of a device, in three parts, each its own trait.
//!
//! - `Ops` (ops.rs): the compute ops over f32 activations and stored weights (embed, linear,
//!   norms, rope, attention, ...). Model code calls only these, plus `KvCache` to decode.
//! - `KvCache` (kv_cache.rs): the generation cache, keys and values kept between decode
//!   steps, and attention over them.
//! - `WeightStream` (weight_stream.rs): how weights reach the device, uploaded once or
//!   streamed group by group through slots (pin, prefetch, wait, release).
//! - `Backend` (here): all three, for the code that drives a whole run.
//!
//! A backend implements `Kernels` (kernels.rs), the ops and cache ops on checked inputs, and
//! `WeightStream`; `Ops` and `KvCache` come with every `Kernels` by blanket impls that first
//! check the op's shape rule (shapes.rs, written once), so every backend refuses the same
//! inputs with the same errors. `cpu` is the numeric reference; `cuda` must agree with it
//! within the dtype's tolerance. Fused ops keep their unfused reference route
//! (`linear_residual_unfused`, `linear_silu_mul_unfused`, `swiglu_residual_unfused`,
//! `linear_split_unfused`) and are tested against it.

pub mod cpu;
pub mod cuda;
mod kernels;
mod kv_cache;
mod ops;
pub mod select;
pub mod shapes;
mod weight_stream;

pub use kernels::Kernels;
pub use kv_cache::KvCache;
pub use ops::{linear_residual_unfused, linear_silu_mul_unfused, linear_split_unfused, swiglu_residual_unfused, Ops, Swiglu};
pub use weight_stream::WeightStream;

use std::time::Instant;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum BackendError {
    #[error("shape mismatch in {op}: {msg}")]
    Shape { op: &'static str, msg: String },
    #[error("device unavailable: {0}")]
    Unavailable(String),
    #[error("device error: {0}")]
    Device(String),
    /// The streaming contract was broken by the caller (see `WeightStream::wait` / `release`).
    #[error("weight streaming: {0}")]
    Streaming(String),
}

pub type Result<T> = std::result::Result<T, BackendError>;

/// An op given an activation a backend holds in bf16 (`Kernels::Act`), which only a linear reads.
fn bf16_input(op: &'static str) -> BackendError {
    BackendError::Shape {
        op,
        msg: "input is a bf16 activation (the output of a norm, GELU, SiLU·up or attention), which only a linear reads".into(),
    }
}

/// Everything a run needs of a device: its compute ops, its generation cache and the way its
/// weights reach it. Code that needs only one part bounds on that part.
pub trait Backend: Ops + KvCache + WeightStream {}

impl<T: Ops + KvCache + WeightStream> Backend for T {}

/// When a weight copy ran, on the host clock (the trace's weight-copy track).
pub type CopySpan = (Instant, Instant);

/// FromStr (case-insensitive, trimmed) and Display of a flag's enum from one table of its
/// variants' names; `what` names the value in a refusal ("unknown cache dtype `x`: expected
/// f32 or f16").
macro_rules! flag_names {
    ($ty:ident, $what:literal, $($var:ident => $name:literal),+) => {
        impl std::str::FromStr for $ty {
            type Err = String;

            fn from_str(s: &str) -> std::result::Result<Self, String> {
                let wanted = s.trim().to_ascii_lowercase();
                $(if wanted == $name {
                    return Ok($ty::$var);
                })+
                let names = [$($name),+];
                let expected = match names.split_last() {
                    Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
                    _ => names.join(""),
                };
                Err(format!("unknown {} `{s}`: expected {expected}", $what))
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(match self {
                    $($ty::$var => $name,)+
                })
            }
        }
    };
}

/// What a generation cache keeps its keys and values as. f32 is the reference; f16 halves
/// the bytes every decode step reads (the cache is most of them at long contexts), with
/// llama.cpp's default rounding of K and V (its cache is f16 unless told otherwise); bf16
/// halves them too, with the rounding the bf16 compute route gives K and V as it reads them
/// anyway (there, a bf16 cache changes no result and saves that rounding at every step).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvDtype {
    #[default]
    F32,
    F16,
    Bf16,
}

flag_names!(KvDtype, "cache dtype", F32 => "f32", F16 => "f16", Bf16 => "bf16");

/// What the GEMMs multiply in. f32 is the reference (HF parity is checked on it). bf16 rounds
/// every GEMM input to bf16 where the CUDA backend does (weights once at load; the outputs of
/// norms, GELU, SiLU·up and attention as they are made) and accumulates the products in f32;
/// everything outside the GEMMs stays f32. The CUDA backend always computes in bf16.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ComputeDtype {
    #[default]
    F32,
    Bf16,
}

flag_names!(ComputeDtype, "compute dtype", F32 => "f32", Bf16 => "bf16");

#[cfg(test)]
mod flag_name_tests {
    use super::{ComputeDtype, KvDtype};

    #[test]
    fn names_round_trip_and_refusals_list_them() {
        for k in [KvDtype::F32, KvDtype::F16, KvDtype::Bf16] {
            assert_eq!(k.to_string().parse::<KvDtype>(), Ok(k));
        }
        for c in [ComputeDtype::F32, ComputeDtype::Bf16] {
            assert_eq!(format!(" {} ", c.to_string().to_uppercase()).parse::<ComputeDtype>(), Ok(c));
        }
        assert_eq!("q8".parse::<KvDtype>(), Err("unknown cache dtype `q8`: expected f32, f16 or bf16".to_string()));
        assert_eq!("fp16".parse::<ComputeDtype>(), Err("unknown compute dtype `fp16`: expected f32 or bf16".to_string()));
    }
}

/// Element `i` of the synthetic weight stream `seed` (splitmix64, the same hash as
/// kernels/elementwise.cu `fill_uniform_bf16`), rounded to bf16.
pub fn uniform_bf16(seed: u64, i: u64, lo: f32, hi: f32) -> f32 {
    let mut z = seed.wrapping_mul(0x9E3779B97F4A7C15).wrapping_add(i);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^= z >> 31;
    let u = (z >> 40) as f32 * (1.0 / 16777216.0);
    half::bf16::from_f32(lo + (hi - lo) * u).to_f32()
}

/// Head counts of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Key row of query row 0: spans index key rows, and query row t's own key is
    /// row t + key_offset (a KV cache's keys come first).
    pub key_offset: usize,
}
