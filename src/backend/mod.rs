//! The compute backend: a small set of ops over f32 activations and stored weights.
//!
//! Model code (src/model/) calls only these. `cpu` is the numeric reference; `cuda`
//! must agree with it within the dtype's tolerance.

pub mod cpu;
pub mod cuda;
pub mod select;

use crate::token_tree::AttnSpan;
use crate::tensor::HostTensor;
use std::sync::Arc;
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
    /// The streaming contract was broken by the caller (see `Backend::wait` / `release`).
    #[error("weight streaming: {0}")]
    Streaming(String),
}

pub type Result<T> = std::result::Result<T, BackendError>;

pub trait Backend: Send + Sync {
    /// A (rows, cols) activation matrix on the device, of f32 values. The outputs of
    /// `layer_norm`, `rms_norm`, `attention`, `gelu` and `silu_mul` may be stored narrower
    /// (CUDA: bf16, rounded once): model code passes them only to `linear` and
    /// `linear_residual`, and a backend may refuse them as any other op's input.
    type Act: Send;
    /// A weight tensor on the device, in whatever form the backend computes with.
    type Weight: Send + Sync;
    /// Keys or values of earlier tokens kept between generation steps, (S, KV·D): the
    /// activation type, or narrower where the backend was asked for that (`KvDtype`).
    type Cache: Send;

    fn name(&self) -> String;

    // ---- memory ----
    fn upload_weight(&self, t: &HostTensor) -> Result<Self::Weight>;

    // ---- weight streaming (docs/DESIGN.md, "Weight streaming") ----
    //
    // pin (once per group, at start) -> prefetch into a free slot (returns at once) ->
    // wait where compute reaches the group -> compute -> release after its last op, which
    // makes the slot free for the next prefetch. A slot is a value: it exists only while no
    // weight reads its memory (release consumes the weights), so a copy can never overwrite
    // weights still in use.

    /// A group's weights in host memory, converted once to what the device computes with
    /// (CPU: f32; CUDA: bf16 matrices and f32 vectors, page-locked), read by every copy.
    type Pinned: Send + Sync;
    /// Device memory for one group, handed from one copy to the next.
    type Slot: Send;
    /// A copy into a slot, started by `prefetch`: the event compute waits on, then the
    /// group's record of residency until `release`.
    type Transfer: Send;

    /// Converts `tensors` (a group's, in a fixed order) for streaming. Costs host time and
    /// memory once per group.
    fn pin(&self, tensors: &[HostTensor]) -> Result<Self::Pinned>;
    /// Starts copying `group` into `slot` (None: fresh memory) off the compute path (the
    /// CPU's copy thread, CUDA's copy stream) and returns at once. A caller that will not
    /// copy the group again hands over its last reference: the CPU then moves the group into
    /// the slot instead of copying it (CUDA copies either way).
    fn prefetch(&self, group: Arc<Self::Pinned>, slot: Option<Self::Slot>) -> Result<Self::Transfer>;
    /// Called where compute reaches the group: orders what follows after the copy (the CPU
    /// blocks until its copy thread is done; CUDA's compute stream waits on the copy's
    /// event, the host does not) and hands over the weights, in `pin`'s order. A second
    /// call on the same transfer is refused.
    fn wait(&self, transfer: &mut Self::Transfer) -> Result<Vec<Self::Weight>>;
    /// After the last op that reads `weights` (all of the transfer's, as `wait` gave them):
    /// their memory becomes a slot again. CUDA records an event on the compute stream here,
    /// which the next copy into the slot waits for. Weights of another transfer, or missing
    /// ones, are refused. Also returns when the copy ran on the host clock, where known.
    fn release(&self, transfer: Self::Transfer, weights: Vec<Self::Weight>) -> Result<(Self::Slot, Option<CopySpan>)>;
    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<Self::Act>;
    fn download(&self, x: &Self::Act) -> Result<Vec<f32>>;
    /// (rows, cols)
    fn dims(&self, x: &Self::Act) -> (usize, usize);

    // ---- ops ----
    /// table (V, C), ids (T,) -> (T, C)
    fn embed(&self, table: &Self::Weight, ids: &[u32]) -> Result<Self::Act>;
    /// x (T, K) · w (N, K)ᵀ + b (N,) -> (T, N)
    fn linear(&self, x: &Self::Act, w: &Self::Weight, b: Option<&Self::Weight>) -> Result<Self::Act>;
    /// x (T, K) · w (N, K)ᵀ + b (N,) + residual (T, N) -> (T, N), reusing the residual's
    /// memory. The reference is `linear` then `add`; a backend may fuse the sum into the
    /// GEMM (CUDA: beta = 1).
    fn linear_residual(&self, x: &Self::Act, w: &Self::Weight, b: Option<&Self::Weight>, residual: Self::Act) -> Result<Self::Act> {
        let mut y = self.linear(x, w, b)?;
        self.add(&mut y, &residual)?;
        Ok(y)
    }
    /// Row-wise LayerNorm with weight and bias (C,).
    fn layer_norm(&self, x: &Self::Act, w: &Self::Weight, b: &Self::Weight, eps: f32) -> Result<Self::Act>;
    /// Row-wise RMSNorm with weight (C,).
    fn rms_norm(&self, x: &Self::Act, w: &Self::Weight, eps: f32) -> Result<Self::Act>;
    /// Rotary embedding (rotate-half form) in place on columns [col0, col0 + heads·D) of x (T, ·):
    /// pair i of a head at position p turns by p · inv_freq[i], inv_freq (D/2).
    fn rope(&self, x: &mut Self::Act, col0: usize, heads: usize, head_dim: usize, positions: &[u32], inv_freq: &[f32]) -> Result<()>;
    /// q (T, H·D), k and v (S, KV·D) -> (T, H·D). Query row t attends key rows
    /// [shared_start, shared_end) ∪ [own_start, t + key_offset] of its span, scaled by 1/√D.
    fn attention(
        &self,
        q: &Self::Act,
        k: &Self::Act,
        v: &Self::Act,
        shape: AttnShape,
        spans: &[AttnSpan],
    ) -> Result<Self::Act>;
    /// `attention` with k and v from a generation cache (this call's keys already appended).
    fn attention_cached(&self, q: &Self::Act, k: &Self::Cache, v: &Self::Cache, shape: AttnShape, spans: &[AttnSpan]) -> Result<Self::Act>;
    /// A generation cache holding x's rows (S, KV·D): the keys or values of a prompt.
    fn cache_from(&self, x: Self::Act) -> Result<Self::Cache>;
    /// cache <- cache stacked on top of new: a cache growing by a step's rows.
    fn cache_append(&self, cache: &mut Self::Cache, new: &Self::Act) -> Result<()>;
    /// The given rows of a cache, in order (sequences regrouped, finished ones dropped).
    fn cache_rows(&self, cache: &Self::Cache, rows: &[u32]) -> Result<Self::Cache>;
    /// Rows in a cache.
    fn cache_len(&self, cache: &Self::Cache) -> usize;
    /// Exact (erf) GELU in place.
    fn gelu(&self, x: &mut Self::Act) -> Result<()>;
    /// gate <- silu(gate) * up
    fn silu_mul(&self, gate: &mut Self::Act, up: &Self::Act) -> Result<()>;
    /// x (T, K) -> silu(x · gateᵀ + gate_b) * (x · upᵀ + up_b) (T, F): SwiGLU's first half. The
    /// reference is two `linear`s and `silu_mul`; a backend may fuse them (CPU: both products
    /// tile by tile, the up product never stored whole).
    fn linear_silu_mul(&self, x: &Self::Act, gate: &Self::Weight, gate_b: Option<&Self::Weight>, up: &Self::Weight, up_b: Option<&Self::Weight>) -> Result<Self::Act> {
        linear_silu_mul_unfused(self, x, gate, gate_b, up, up_b)
    }
    /// x <- x + y
    fn add(&self, x: &mut Self::Act, y: &Self::Act) -> Result<()>;
    /// Columns [start, start + width) of x as a new matrix.
    fn cols(&self, x: &Self::Act, start: usize, width: usize) -> Result<Self::Act>;
    /// The given rows of x, in order.
    fn rows(&self, x: &Self::Act, rows: &[u32]) -> Result<Self::Act>;
    /// a stacked on top of b.
    fn concat_rows(&self, a: &Self::Act, b: &Self::Act) -> Result<Self::Act>;
    /// logits (S, V), targets (S,) -> log softmax(logits)[s, targets[s]] (S,), accumulated in f64.
    fn log_softmax_at(&self, logits: &Self::Act, targets: &[u32]) -> Result<Vec<f64>>;
    /// logits (S, V) -> log softmax (S, V), for sampling.
    fn log_softmax(&self, logits: &Self::Act) -> Result<Vec<f32>>;

    // ---- additive, with defaults ----
    /// Blocks until queued work is done (asynchronous backends); for timing.
    fn sync(&self) -> Result<()> {
        Ok(())
    }

    /// A synthetic weight of `shape`, uniform in [lo, hi) from a hash of (seed, index),
    /// values rounded to bf16: every backend makes the same values (`uniform_bf16`).
    /// Backends override this to make them where they live (no host traffic).
    fn random_weight(&self, shape: &[usize], seed: u64, lo: f32, hi: f32) -> Result<Self::Weight> {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n as u64).map(|i| uniform_bf16(seed, i, lo, hi)).collect();
        self.upload_weight(&HostTensor::from_f32(shape.to_vec(), &values))
    }
}

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
/// llama.cpp's default rounding of K and V (its cache is f16 unless told otherwise).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvDtype {
    #[default]
    F32,
    F16,
}

flag_names!(KvDtype, "cache dtype", F32 => "f32", F16 => "f16");

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
        for k in [KvDtype::F32, KvDtype::F16] {
            assert_eq!(k.to_string().parse::<KvDtype>(), Ok(k));
        }
        for c in [ComputeDtype::F32, ComputeDtype::Bf16] {
            assert_eq!(format!(" {} ", c.to_string().to_uppercase()).parse::<ComputeDtype>(), Ok(c));
        }
        assert_eq!("q8".parse::<KvDtype>(), Err("unknown cache dtype `q8`: expected f32 or f16".to_string()));
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

/// `Backend::linear_silu_mul`'s reference route: two `linear`s, then `silu_mul`. Also where a
/// fusing backend sends the shapes it does not fuse.
pub fn linear_silu_mul_unfused<B: Backend + ?Sized>(b: &B, x: &B::Act, gate: &B::Weight, gate_b: Option<&B::Weight>, up: &B::Weight, up_b: Option<&B::Weight>) -> Result<B::Act> {
    let mut g = b.linear(x, gate, gate_b)?; // (T, F)
    b.silu_mul(&mut g, &b.linear(x, up, up_b)?)?;
    Ok(g)
}
