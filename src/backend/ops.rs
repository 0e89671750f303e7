//! The compute ops model code calls: each checks its shapes (shapes.rs) and then runs the
//! backend's kernel (`Kernels`), so every backend reports the same shape errors.

use super::kernels::Kernels;
use super::{shapes, AttnShape, Result};
use crate::token_tree::AttnSpan;

/// Ops over f32 activations and stored weights. Implemented once, for every `Kernels`.
pub trait Ops: Send + Sync {
    /// See `Kernels::Act`.
    type Act: Send;
    /// See `Kernels::Weight`.
    type Weight: Send + Sync;

    fn name(&self) -> String;
    /// (rows, cols)
    fn dims(&self, x: &Self::Act) -> (usize, usize);
    /// Blocks until queued work is done (asynchronous backends); for timing.
    fn sync(&self) -> Result<()>;
    /// data, row-major, as a (rows, cols) activation.
    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<Self::Act>;
    fn download(&self, x: &Self::Act) -> Result<Vec<f32>>;

    /// table (V, C), ids (T,) -> (T, C)
    fn embed(&self, table: &Self::Weight, ids: &[u32]) -> Result<Self::Act>;
    /// x (T, K) · w (N, K)ᵀ + b (N,) -> (T, N)
    fn linear(&self, x: &Self::Act, w: &Self::Weight, b: Option<&Self::Weight>) -> Result<Self::Act>;
    /// x (T, K) · w (N, K)ᵀ + b (N,), its N columns cut into P consecutive blocks of `widths`
    /// (summing to N), each block its own (T, width) matrix: q, k and v from one fused
    /// projection. A backend may write the blocks straight from the product (CPU); the
    /// reference is `linear_split_unfused`: `linear` then `cols`.
    fn linear_split<const P: usize>(&self, x: &Self::Act, w: &Self::Weight, b: Option<&Self::Weight>, widths: [usize; P]) -> Result<[Self::Act; P]>;
    /// x (T, K) · w (N, K)ᵀ + b (N,) + residual (T, N) -> (T, N), reusing the residual's
    /// memory. The reference is `linear_residual_unfused`: `linear` then `add`.
    fn linear_residual(&self, x: &Self::Act, w: &Self::Weight, b: Option<&Self::Weight>, residual: Self::Act) -> Result<Self::Act>;
    /// Row-wise LayerNorm with weight and bias (C,).
    fn layer_norm(&self, x: &Self::Act, w: &Self::Weight, b: &Self::Weight, eps: f32) -> Result<Self::Act>;
    /// Row-wise RMSNorm with weight (C,).
    fn rms_norm(&self, x: &Self::Act, w: &Self::Weight, eps: f32) -> Result<Self::Act>;
    /// Rotary embedding (rotate-half form) in place on columns [col0, col0 + heads·D) of x (T, ·):
    /// pair i of a head at position p turns by p · inv_freq[i], inv_freq (D/2).
    fn rope(&self, x: &mut Self::Act, col0: usize, heads: usize, head_dim: usize, positions: &[u32], inv_freq: &[f32]) -> Result<()>;
    /// q (T, H·D), k and v (S, KV·D) -> (T, H·D). Query row t attends key rows
    /// [shared_start, shared_end) ∪ [own_start, t + key_offset] of its span, scaled by 1/√D.
    fn attention(&self, q: &Self::Act, k: &Self::Act, v: &Self::Act, shape: AttnShape, spans: &[AttnSpan]) -> Result<Self::Act>;
    /// Exact (erf) GELU in place.
    fn gelu(&self, x: &mut Self::Act) -> Result<()>;
    /// gate <- silu(gate) * up
    fn silu_mul(&self, gate: &mut Self::Act, up: &Self::Act) -> Result<()>;
    /// x (T, K) -> silu(x · gateᵀ + gate_b) * (x · upᵀ + up_b) (T, F): SwiGLU's first half. The
    /// reference is `linear_silu_mul_unfused`: two `linear`s and `silu_mul`.
    fn linear_silu_mul(&self, x: &Self::Act, gate: &Self::Weight, gate_b: Option<&Self::Weight>, up: &Self::Weight, up_b: Option<&Self::Weight>) -> Result<Self::Act>;
    /// x (T, K), residual (T, C) -> residual + down(silu(x·gateᵀ + gate_b) ⊙ (x·upᵀ + up_b)) +
    /// down_b (T, C): the whole SwiGLU MLP, so a backend may keep its (T, F) activation in
    /// whatever form the down projection reads (CPU bf16 route: bf16 rows). The reference is
    /// `swiglu_residual_unfused`: `linear_silu_mul`, then `linear_residual`.
    fn swiglu_residual(&self, x: &Self::Act, w: Swiglu<'_, Self::Weight>, residual: Self::Act) -> Result<Self::Act>;
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
}

impl<K: Kernels> Ops for K {
    type Act = K::Act;
    type Weight = K::Weight;

    fn name(&self) -> String {
        Kernels::name(self)
    }

    fn dims(&self, x: &K::Act) -> (usize, usize) {
        Kernels::dims(self, x)
    }

    fn sync(&self) -> Result<()> {
        Kernels::sync(self)
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<K::Act> {
        shapes::upload(data.len(), rows, cols)?;
        Kernels::upload(self, data, rows, cols)
    }

    fn download(&self, x: &K::Act) -> Result<Vec<f32>> {
        Kernels::download(self, x)
    }

    fn embed(&self, table: &K::Weight, ids: &[u32]) -> Result<K::Act> {
        shapes::embed(self.weight_shape(table), ids)?;
        Kernels::embed(self, table, ids)
    }

    fn linear(&self, x: &K::Act, w: &K::Weight, b: Option<&K::Weight>) -> Result<K::Act> {
        shapes::linear("linear", Kernels::dims(self, x), self.weight_shape(w), b.map(|b| self.weight_shape(b)))?;
        Kernels::linear(self, x, w, b)
    }

    fn linear_split<const P: usize>(&self, x: &K::Act, w: &K::Weight, b: Option<&K::Weight>, widths: [usize; P]) -> Result<[K::Act; P]> {
        shapes::linear_split(Kernels::dims(self, x), self.weight_shape(w), b.map(|b| self.weight_shape(b)), &widths)?;
        Kernels::linear_split(self, x, w, b, widths)
    }

    fn linear_residual(&self, x: &K::Act, w: &K::Weight, b: Option<&K::Weight>, residual: K::Act) -> Result<K::Act> {
        shapes::linear_residual(Kernels::dims(self, x), self.weight_shape(w), b.map(|b| self.weight_shape(b)), Kernels::dims(self, &residual))?;
        Kernels::linear_residual(self, x, w, b, residual)
    }

    fn layer_norm(&self, x: &K::Act, w: &K::Weight, b: &K::Weight, eps: f32) -> Result<K::Act> {
        let d = Kernels::dims(self, x);
        shapes::norm("layer_norm", d, self.weight_shape(w))?;
        shapes::norm("layer_norm", d, self.weight_shape(b))?;
        Kernels::layer_norm(self, x, w, b, eps)
    }

    fn rms_norm(&self, x: &K::Act, w: &K::Weight, eps: f32) -> Result<K::Act> {
        shapes::norm("rms_norm", Kernels::dims(self, x), self.weight_shape(w))?;
        Kernels::rms_norm(self, x, w, eps)
    }

    fn rope(&self, x: &mut K::Act, col0: usize, heads: usize, head_dim: usize, positions: &[u32], inv_freq: &[f32]) -> Result<()> {
        shapes::rope(Kernels::dims(self, x), col0, heads, head_dim, positions.len(), inv_freq.len())?;
        Kernels::rope(self, x, col0, heads, head_dim, positions, inv_freq)
    }

    fn attention(&self, q: &K::Act, k: &K::Act, v: &K::Act, shape: AttnShape, spans: &[AttnSpan]) -> Result<K::Act> {
        shapes::attention("attention", Kernels::dims(self, q), Kernels::dims(self, k), Kernels::dims(self, v), shape, spans)?;
        Kernels::attention(self, q, k, v, shape, spans)
    }

    fn gelu(&self, x: &mut K::Act) -> Result<()> {
        Kernels::gelu(self, x)
    }

    fn silu_mul(&self, gate: &mut K::Act, up: &K::Act) -> Result<()> {
        shapes::same("silu_mul", Kernels::dims(self, gate), Kernels::dims(self, up))?;
        Kernels::silu_mul(self, gate, up)
    }

    fn linear_silu_mul(&self, x: &K::Act, gate: &K::Weight, gate_b: Option<&K::Weight>, up: &K::Weight, up_b: Option<&K::Weight>) -> Result<K::Act> {
        let (gs, us) = ((self.weight_shape(gate), gate_b.map(|b| self.weight_shape(b))), (self.weight_shape(up), up_b.map(|b| self.weight_shape(b))));
        shapes::linear_silu_mul(Kernels::dims(self, x), gs, us)?;
        Kernels::linear_silu_mul(self, x, gate, gate_b, up, up_b)
    }

    fn swiglu_residual(&self, x: &K::Act, w: Swiglu<'_, K::Weight>, residual: K::Act) -> Result<K::Act> {
        fn shape<'w, K: Kernels>(k: &K, (m, b): (&'w K::Weight, Option<&'w K::Weight>)) -> (&'w [usize], Option<&'w [usize]>) {
            (k.weight_shape(m), b.map(|b| k.weight_shape(b)))
        }
        shapes::swiglu_residual(Kernels::dims(self, x), shape(self, w.gate), shape(self, w.up), shape(self, w.down), Kernels::dims(self, &residual))?;
        Kernels::swiglu_residual(self, x, w, residual)
    }

    fn add(&self, x: &mut K::Act, y: &K::Act) -> Result<()> {
        shapes::same("add", Kernels::dims(self, x), Kernels::dims(self, y))?;
        Kernels::add(self, x, y)
    }

    fn cols(&self, x: &K::Act, start: usize, width: usize) -> Result<K::Act> {
        shapes::cols(Kernels::dims(self, x), start, width)?;
        Kernels::cols(self, x, start, width)
    }

    fn rows(&self, x: &K::Act, rows: &[u32]) -> Result<K::Act> {
        shapes::rows("rows", Kernels::dims(self, x).0, rows)?;
        Kernels::rows(self, x, rows)
    }

    fn concat_rows(&self, a: &K::Act, b: &K::Act) -> Result<K::Act> {
        shapes::stack("concat_rows", Kernels::dims(self, a).1, Kernels::dims(self, b).1)?;
        Kernels::concat_rows(self, a, b)
    }

    fn log_softmax_at(&self, logits: &K::Act, targets: &[u32]) -> Result<Vec<f64>> {
        shapes::log_softmax_at(Kernels::dims(self, logits), targets)?;
        Kernels::log_softmax_at(self, logits, targets)
    }

    fn log_softmax(&self, logits: &K::Act) -> Result<Vec<f32>> {
        Kernels::log_softmax(self, logits)
    }
}

/// `Ops::linear_silu_mul`'s reference route: two `linear`s, then `silu_mul`. Also where a
/// fusing backend sends the shapes it does not fuse.
pub fn linear_silu_mul_unfused<B: Ops + ?Sized>(b: &B, x: &B::Act, gate: &B::Weight, gate_b: Option<&B::Weight>, up: &B::Weight, up_b: Option<&B::Weight>) -> Result<B::Act> {
    let mut g = b.linear(x, gate, gate_b)?; // (T, F)
    b.silu_mul(&mut g, &b.linear(x, up, up_b)?)?;
    Ok(g)
}

/// A SwiGLU MLP's three projections, each with its bias where it has one.
pub struct Swiglu<'a, W> {
    pub gate: (&'a W, Option<&'a W>),
    pub up: (&'a W, Option<&'a W>),
    pub down: (&'a W, Option<&'a W>),
}

// Copy for any W: the fields are references (a derive would ask W: Copy).
impl<W> Clone for Swiglu<'_, W> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<W> Copy for Swiglu<'_, W> {}

/// `Ops::swiglu_residual`'s reference route: `linear_silu_mul`, then `linear_residual`.
pub fn swiglu_residual_unfused<B: Ops + ?Sized>(b: &B, x: &B::Act, w: Swiglu<'_, B::Weight>, residual: B::Act) -> Result<B::Act> {
    let act = b.linear_silu_mul(x, w.gate.0, w.gate.1, w.up.0, w.up.1)?; // (T, F)
    b.linear_residual(&act, w.down.0, w.down.1, residual)
}

/// `Ops::linear_split`'s reference route: `linear`, then `cols` of each block.
pub fn linear_split_unfused<B: Ops + ?Sized, const P: usize>(b: &B, x: &B::Act, w: &B::Weight, bias: Option<&B::Weight>, widths: [usize; P]) -> Result<[B::Act; P]> {
    let y = b.linear(x, w, bias)?; // (T, N)
    let mut start = 0;
    let mut parts = Vec::with_capacity(P);
    for width in widths {
        parts.push(b.cols(&y, start, width)?); // (T, width)
        start += width;
    }
    // P blocks were pushed, one per width.
    Ok(parts.try_into().unwrap_or_else(|_| unreachable!("one block per width")))
}

/// `Ops::linear_residual`'s reference route: `linear`, then `add`.
pub fn linear_residual_unfused<B: Ops + ?Sized>(b: &B, x: &B::Act, w: &B::Weight, bias: Option<&B::Weight>, residual: B::Act) -> Result<B::Act> {
    let mut y = b.linear(x, w, bias)?; // (T, N)
    b.add(&mut y, &residual)?;
    Ok(y)
}
