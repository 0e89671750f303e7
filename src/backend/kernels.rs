//! What a backend implements: each compute and cache op as a kernel over inputs that
//! shapes.rs has already checked. Callers never call these; they call `Ops` and `KvCache`,
//! which every `Kernels` gets by a blanket impl, so no backend can skip the checks.

use super::ops::{linear_residual_unfused, linear_silu_mul_unfused, linear_split_unfused, swiglu_residual_unfused, Swiglu};
use super::{AttnShape, Result};
use crate::token_tree::AttnSpan;

/// The methods mean what `Ops`' and `KvCache`'s of the same name say, on checked inputs: a
/// kernel may assume its op's rule in shapes.rs holds.
pub trait Kernels: Send + Sync {
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
    /// (rows, cols)
    fn dims(&self, x: &Self::Act) -> (usize, usize);
    /// A weight's logical shape (what shapes.rs checks).
    fn weight_shape<'w>(&self, w: &'w Self::Weight) -> &'w [usize];
    /// A cache's (rows, cols).
    fn cache_dims(&self, c: &Self::Cache) -> (usize, usize);
    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<Self::Act>;
    fn download(&self, x: &Self::Act) -> Result<Vec<f32>>;
    fn embed(&self, table: &Self::Weight, ids: &[u32]) -> Result<Self::Act>;
    fn linear(&self, x: &Self::Act, w: &Self::Weight, b: Option<&Self::Weight>) -> Result<Self::Act>;
    /// A backend may write the blocks straight from the product (CPU); the default is the
    /// reference.
    fn linear_split<const P: usize>(&self, x: &Self::Act, w: &Self::Weight, b: Option<&Self::Weight>, widths: [usize; P]) -> Result<[Self::Act; P]>
    where
        Self: Sized,
    {
        linear_split_unfused(self, x, w, b, widths)
    }
    /// A backend may fuse the sum into the GEMM (CUDA: beta = 1); the default is the reference.
    fn linear_residual(&self, x: &Self::Act, w: &Self::Weight, b: Option<&Self::Weight>, residual: Self::Act) -> Result<Self::Act>
    where
        Self: Sized,
    {
        linear_residual_unfused(self, x, w, b, residual)
    }
    fn layer_norm(&self, x: &Self::Act, w: &Self::Weight, b: &Self::Weight, eps: f32) -> Result<Self::Act>;
    fn rms_norm(&self, x: &Self::Act, w: &Self::Weight, eps: f32) -> Result<Self::Act>;
    fn rope(&self, x: &mut Self::Act, col0: usize, heads: usize, head_dim: usize, positions: &[u32], inv_freq: &[f32]) -> Result<()>;
    fn attention(&self, q: &Self::Act, k: &Self::Act, v: &Self::Act, shape: AttnShape, spans: &[AttnSpan]) -> Result<Self::Act>;
    fn gelu(&self, x: &mut Self::Act) -> Result<()>;
    fn silu_mul(&self, gate: &mut Self::Act, up: &Self::Act) -> Result<()>;
    /// A backend may fuse the two products and the SiLU·up (CPU: tile by tile); the default
    /// is the reference.
    fn linear_silu_mul(&self, x: &Self::Act, gate: &Self::Weight, gate_b: Option<&Self::Weight>, up: &Self::Weight, up_b: Option<&Self::Weight>) -> Result<Self::Act>
    where
        Self: Sized,
    {
        linear_silu_mul_unfused(self, x, gate, gate_b, up, up_b)
    }
    /// A backend may keep the MLP's activation narrower between its products (CPU bf16 route);
    /// the default is the reference.
    fn swiglu_residual(&self, x: &Self::Act, w: Swiglu<'_, Self::Weight>, residual: Self::Act) -> Result<Self::Act>
    where
        Self: Sized,
    {
        swiglu_residual_unfused(self, x, w, residual)
    }
    fn add(&self, x: &mut Self::Act, y: &Self::Act) -> Result<()>;
    fn cols(&self, x: &Self::Act, start: usize, width: usize) -> Result<Self::Act>;
    fn rows(&self, x: &Self::Act, rows: &[u32]) -> Result<Self::Act>;
    fn concat_rows(&self, a: &Self::Act, b: &Self::Act) -> Result<Self::Act>;
    fn log_softmax_at(&self, logits: &Self::Act, targets: &[u32]) -> Result<Vec<f64>>;
    fn log_softmax(&self, logits: &Self::Act) -> Result<Vec<f32>>;

    fn cache_from(&self, x: Self::Act) -> Result<Self::Cache>;
    fn cache_append(&self, cache: &mut Self::Cache, new: &Self::Act) -> Result<()>;
    fn cache_rows(&self, cache: &Self::Cache, rows: &[u32]) -> Result<Self::Cache>;
    fn attention_cached(&self, q: &Self::Act, k: &Self::Cache, v: &Self::Cache, shape: AttnShape, spans: &[AttnSpan]) -> Result<Self::Act>;
}
