//! Every op's shape rule, written once: `Ops` and `KvCache` run these before any backend's
//! kernel, so the CPU and CUDA backends refuse the same inputs with the same errors.
//!
//! Each rule takes the dimensions only (activations as (rows, cols), weights as their shape),
//! never a backend's storage. What one backend cannot do for reasons of its own (CUDA's 32-bit
//! indexing, its attention kernel's largest head dim, a bf16 input outside a linear) stays in
//! that backend. Shapes: T query rows, S key rows, C hidden, H heads, KV key/value heads, D head dim.

use super::{AttnShape, BackendError, Result};
use crate::token_tree::AttnSpan;

/// An activation's (rows, cols).
pub type Dims = (usize, usize);

fn err(op: &'static str, msg: String) -> BackendError {
    BackendError::Shape { op, msg }
}

/// `data` of `len` values for a (rows, cols) matrix.
pub fn upload(len: usize, rows: usize, cols: usize) -> Result<()> {
    match rows.checked_mul(cols) {
        Some(n) if n == len => Ok(()),
        _ => Err(err("upload", format!("{len} values for ({rows}, {cols})"))),
    }
}

/// table (V, C), every id below V.
pub fn embed(table: &[usize], ids: &[u32]) -> Result<()> {
    let [v, _] = *table else {
        return Err(err("embed", format!("table of shape {table:?}")));
    };
    match ids.iter().find(|&&id| id as usize >= v) {
        Some(id) => Err(err("embed", format!("token id {id} outside the vocabulary of {v}"))),
        None => Ok(()),
    }
}

/// x (T, K) · w (N, K)ᵀ + b (N,): returns N.
pub fn linear(op: &'static str, x: Dims, w: &[usize], b: Option<&[usize]>) -> Result<usize> {
    let [n, k] = *w else {
        return Err(err(op, format!("weight of shape {w:?}")));
    };
    if x.1 != k {
        return Err(err(op, format!("x ({}, {}) with weight ({n}, {k})", x.0, x.1)));
    }
    match b {
        Some(b) if b != [n] => Err(err(op, format!("bias of shape {b:?} for {n} outputs"))),
        _ => Ok(n),
    }
}

/// `linear` whose (T, N) product is added to `residual`, which must be (T, N).
pub fn linear_residual(x: Dims, w: &[usize], b: Option<&[usize]>, residual: Dims) -> Result<()> {
    let n = linear("linear_residual", x, w, b)?;
    if residual != (x.0, n) {
        return Err(err("linear_residual", format!("residual {residual:?} for a ({}, {n}) product", x.0)));
    }
    Ok(())
}

/// `linear` whose N outputs are cut into blocks of these widths: they must sum to N.
pub fn linear_split(x: Dims, w: &[usize], b: Option<&[usize]>, widths: &[usize]) -> Result<()> {
    let n = linear("linear_split", x, w, b)?;
    match widths.iter().sum::<usize>() {
        sum if sum == n => Ok(()),
        sum => Err(err("linear_split", format!("blocks {widths:?} ({sum} columns) of a product of {n}"))),
    }
}

/// Two `linear`s of x, gate and up, of one width F.
pub fn linear_silu_mul(x: Dims, (gate, gate_b): (&[usize], Option<&[usize]>), (up, up_b): (&[usize], Option<&[usize]>)) -> Result<()> {
    let op = "linear_silu_mul";
    if linear(op, x, gate, gate_b)? != linear(op, x, up, up_b)? {
        return Err(err(op, format!("gate of shape {gate:?}, up of shape {up:?}")));
    }
    Ok(())
}

/// SwiGLU over a residual: gate and up as `linear_silu_mul`, down from their width to the
/// residual's.
pub fn swiglu_residual(x: Dims, gate: (&[usize], Option<&[usize]>), up: (&[usize], Option<&[usize]>), down: (&[usize], Option<&[usize]>), residual: Dims) -> Result<()> {
    linear_silu_mul(x, gate, up)?;
    let f = linear("swiglu_residual", x, gate.0, gate.1)?;
    linear_residual((x.0, f), down.0, down.1, residual)
}

/// A norm's weight or bias: one value per column of x.
pub fn norm(op: &'static str, x: Dims, w: &[usize]) -> Result<()> {
    match w == [x.1] {
        true => Ok(()),
        false => Err(err(op, format!("weight of shape {w:?} for {} columns", x.1))),
    }
}

/// One position per row of x, heads·D columns from col0 inside x, D/2 frequencies.
pub fn rope(x: Dims, col0: usize, heads: usize, head_dim: usize, positions: usize, inv_freq: usize) -> Result<()> {
    let end = heads.checked_mul(head_dim).and_then(|w| w.checked_add(col0));
    if positions != x.0 || end.is_none_or(|e| e > x.1) || inv_freq != head_dim / 2 {
        return Err(err("rope", format!("{positions} positions, {} rows, {} cols, {inv_freq} frequencies for head dim {head_dim}", x.0, x.1)));
    }
    Ok(())
}

/// q (T, H·D), k and v (S, KV·D), H a multiple of KV, one span per query row, every key row a
/// span reaches inside k.
pub fn attention(op: &'static str, q: Dims, k: Dims, v: Dims, s: AttnShape, spans: &[AttnSpan]) -> Result<()> {
    let (h, kvh, d) = (s.heads, s.kv_heads, s.head_dim);
    if kvh == 0 || h % kvh != 0 || q.1 != h * d || k.1 != kvh * d || v.1 != kvh * d || spans.len() != q.0 || k.0 != v.0 {
        return Err(err(op, format!("q {q:?} k {k:?} v {v:?} spans {} heads {h}/{kvh}", spans.len())));
    }
    for (t, span) in spans.iter().enumerate() {
        if t + s.key_offset >= k.0 || span.shared_end as usize > k.0 || span.path_end as usize > k.0 {
            return Err(err(op, format!("row {t} attends past the {} key rows", k.0)));
        }
    }
    Ok(())
}

/// Elementwise ops of two operands (x <- f(x, y)): equal shapes.
pub fn same(op: &'static str, x: Dims, y: Dims) -> Result<()> {
    match x == y {
        true => Ok(()),
        false => Err(err(op, format!("{x:?} with {y:?}"))),
    }
}

/// Columns [start, start + width) inside x's.
pub fn cols(x: Dims, start: usize, width: usize) -> Result<()> {
    match start.checked_add(width) {
        Some(end) if end <= x.1 => Ok(()),
        _ => Err(err("cols", format!("[{start}, {start} + {width}) of {} columns", x.1))),
    }
}

/// Row indices below `len` (an activation's rows, a cache's length).
pub fn rows(op: &'static str, len: usize, rows: &[u32]) -> Result<()> {
    match rows.iter().find(|&&r| r as usize >= len) {
        Some(r) => Err(err(op, format!("row {r} of {len}"))),
        None => Ok(()),
    }
}

/// Two matrices stacked: equal columns.
pub fn stack(op: &'static str, a_cols: usize, b_cols: usize) -> Result<()> {
    match a_cols == b_cols {
        true => Ok(()),
        false => Err(err(op, format!("{a_cols} vs {b_cols} columns"))),
    }
}

/// One target per row of logits (S, V), each below V.
pub fn log_softmax_at(logits: Dims, targets: &[u32]) -> Result<()> {
    if targets.len() != logits.0 {
        return Err(err("log_softmax_at", format!("{} targets for {} rows", targets.len(), logits.0)));
    }
    match targets.iter().find(|&&t| t as usize >= logits.1) {
        Some(t) => Err(err("log_softmax_at", format!("target {t} outside the vocabulary of {}", logits.1))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests;
