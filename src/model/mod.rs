//! Model families: each file owns its HF config parsing, its tensor table and its block.
//!
//! A model is begin (embeddings) -> layers -> end (final norm + LM head), each stored in its
//! own part file under the family's short tensor names. Files: table.rs (walking a family's
//! tensor table: conversion, expected tensors, GGUF names), weights.rs (a loaded part's typed
//! weights), one file per family.

pub mod falcon;
pub mod kept;
pub mod llama;
pub mod qwen2;
pub mod table;
pub mod weights;

pub use kept::{BatchPrompts, GroupKeys, LayerKeys, LayerPrompts, PromptStore};
pub use table::{convert_part, expected_tensors};
pub use weights::PartWeights;

use crate::backend::{AttnShape, BackendError, KvCache, Ops};
use crate::config::{ModelConfig, RopeScaling};
use crate::token_tree::{AttnSpan, MicroBatch, Prefix};
use crate::tensor::HostTensor;
use thiserror::Error;
use weights::{AttnRef, View};

#[derive(Debug, Error)]
pub enum ModelError {
    #[error("{file}: field `{field}`: {msg}")]
    Config { file: String, field: String, msg: String },
    /// A config that parsed but breaks a rule of the model (its message names the file).
    #[error(transparent)]
    Invalid(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Unsupported(String),
    #[error("part {part}: missing tensor `{name}`")]
    MissingTensor { part: String, name: String },
    #[error("tensor `{name}`: expected shape {expected:?}, found {found:?}")]
    BadShape { name: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("source checkpoint: {0}")]
    Source(String),
    /// A checkpoint's reader failed (its error names the file).
    #[error("source checkpoint: {0}")]
    Checkpoint(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("document {doc}: layer {layer} keeps no prompt for it (its first pass must keep it, and nothing release it before its last)")]
    PromptNotKept { doc: usize, layer: usize },
    #[error("document {doc}: layer {layer} keeps {kept} rows, the batch needs {wanted}")]
    KeptRows { doc: usize, layer: usize, kept: usize, wanted: usize },
    #[error(transparent)]
    Backend(#[from] BackendError),
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// One file of the model directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Part {
    Begin,
    Layer(usize),
    End,
}

impl Part {
    pub fn name(self) -> String {
        match self {
            Part::Begin => "begin".into(),
            Part::Layer(i) => format!("layer_{i:03}"),
            Part::End => "end".into(),
        }
    }

    pub fn file_name(self) -> String {
        format!("{}.safetensors", self.name())
    }

    /// Every part of a model, in order.
    pub fn all(n_layers: usize) -> Vec<Part> {
        let mut v = vec![Part::Begin];
        v.extend((0..n_layers).map(Part::Layer));
        v.push(Part::End);
        v
    }
}

/// Where a converter reads checkpoint tensors by their Hugging Face names.
pub trait TensorSource {
    fn get(&self, hf_name: &str) -> Result<HostTensor>;
    fn contains(&self, hf_name: &str) -> bool;
}

/// Parse an HF config.json of any supported family; the error names the file and field.
pub fn config_from_hf(json: &serde_json::Value, file: &str) -> Result<ModelConfig> {
    let model_type = json.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
    let archs: Vec<&str> =
        json.get("architectures").and_then(|a| a.as_array()).map(|a| a.iter().filter_map(|s| s.as_str()).collect()).unwrap_or_default();
    let cfg = match model_type {
        "falcon" | "RefinedWeb" | "RefinedWebModel" => falcon::config_from_hf(json, file)?,
        "llama" | "mistral" | "yi" => llama::config_from_hf(json, file)?,
        "qwen2" => qwen2::config_from_hf(json, file)?,
        _ if archs.iter().any(|a| a.starts_with("Falcon") || a.starts_with("RW")) => falcon::config_from_hf(json, file)?,
        _ if archs.iter().any(|a| a.starts_with("Llama") || a.starts_with("Mistral")) => llama::config_from_hf(json, file)?,
        _ if archs.contains(&"Qwen2ForCausalLM") => qwen2::config_from_hf(json, file)?,
        other => {
            return Err(ModelError::Config {
                file: file.into(),
                field: "model_type".into(),
                msg: format!("unsupported model type `{other}`; expected falcon, llama, mistral or qwen2"),
            })
        }
    };
    cfg.validate(file)?;
    Ok(cfg)
}

/// Keys and values of earlier tokens for one layer (generation).
pub struct LayerCache<B: KvCache> {
    /// (S, KV·D)
    pub k: Option<B::Cache>,
    /// (S, KV·D)
    pub v: Option<B::Cache>,
}

impl<B: KvCache> Default for LayerCache<B> {
    fn default() -> Self {
        LayerCache { k: None, v: None }
    }
}

/// What a layer needs to know about the rows it runs.
pub struct RowCtx<'a> {
    /// (T,) rotary positions
    pub positions: &'a [u32],
    /// (T,) attention spans over key rows
    pub spans: &'a [AttnSpan],
    /// Generation: the rows of [cache; this call's keys] that form the next cache, in order,
    /// so each sequence's keys stay contiguous (and finished sequences drop out).
    pub cache_order: Option<&'a [u32]>,
}

impl<'a> RowCtx<'a> {
    /// A micro-batch's rows (its prompts' handling goes with the store: kept::BatchPrompts).
    pub fn of_batch(b: &'a MicroBatch) -> RowCtx<'a> {
        RowCtx { positions: &b.positions, spans: &b.spans, cache_order: None }
    }
}

/// Self-attention shared by every family: fused qkv projection, rotary on q and k,
/// token-tree attention, output projection summed into `residual` (the GEMM adds it). A
/// generation cache gets this call's keys appended; extract's store keeps the rows the
/// batch names and puts the rows it attends before this call's keys.
/// x (T, C) normed, residual (T, C) -> residual + attention.
pub(crate) fn attention_block<B: KvCache>(
    b: &B,
    cfg: &ModelConfig,
    w: AttnRef<'_, B::Weight>,
    x: &B::Act,
    ctx: &RowCtx,
    keys: LayerKeys<'_, B>,
    residual: B::Act,
) -> Result<B::Act> {
    let (h, kv, d) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
    let ((qkv_w, qkv_b), (out_w, out_b)) = (w.qkv, w.out);
    // q (T, H D), k and v (T, KV D): the fused projection's three blocks of columns
    let [mut q, mut k, v] = b.linear_split(x, qkv_w, qkv_b, [h * d, kv * d, kv * d])?;
    // (D/2); recomputed per call because it is D/2 powf, nothing next to the projections.
    let inv_freq = cfg.rope_inv_freq();
    b.rope(&mut q, 0, h, d, ctx.positions, &inv_freq)?;
    b.rope(&mut k, 0, kv, d, ctx.positions, &inv_freq)?;
    let shape = AttnShape { heads: h, kv_heads: kv, head_dim: d, key_offset: 0 };
    let att = match keys {
        LayerKeys::Cache(cache) => cached_attention(b, &q, k, v, shape, ctx, cache)?,
        LayerKeys::Prompts(kept, batch) => {
            let (k, v, key_offset) = with_kept_rows(b, k, v, kept, batch)?; // (K + T, KV D)
            b.attention(&q, &k, &v, AttnShape { key_offset, ..shape }, ctx.spans)? // (T, H D)
        }
        LayerKeys::None => b.attention(&q, &k, &v, shape, ctx.spans)?, // (T, H D)
    };
    Ok(b.linear_residual(&att, out_w, out_b, residual)?)
}

/// Attention over a generation cache and this call's keys (T, KV D), which the cache gets
/// appended (regrouped by `ctx.cache_order`). q (T, H D) -> (T, H D).
fn cached_attention<B: KvCache>(
    b: &B,
    q: &B::Act,
    k: B::Act,
    v: B::Act,
    shape: AttnShape,
    ctx: &RowCtx,
    cache: &mut LayerCache<B>,
) -> Result<B::Act> {
    let (att, mut k, mut v) = match (cache.k.take(), cache.v.take()) {
        (Some(mut ck), Some(mut cv)) => {
            let key_offset = b.cache_len(&ck);
            b.cache_append(&mut ck, &k)?; // (S, KV D)
            b.cache_append(&mut cv, &v)?;
            (b.attention_cached(q, &ck, &cv, AttnShape { key_offset, ..shape }, ctx.spans)?, ck, cv) // (T, H D)
        }
        // A prompt: its attention reads this call's keys as they are, the cache keeps them.
        _ => {
            let att = b.attention(q, &k, &v, shape, ctx.spans)?; // (T, H D)
            (att, b.cache_from(k)?, b.cache_from(v)?)
        }
    };
    // One sequence (or nothing to regroup): the cache is already in order.
    if let Some(order) = ctx.cache_order.filter(|o| !is_identity(o, b.cache_len(&k))) {
        k = b.cache_rows(&k, order)?;
        v = b.cache_rows(&v, order)?;
    }
    cache.k = Some(k);
    cache.v = Some(v);
    Ok(att)
}

/// Extract's kept rows around this call's keys and values (T, KV D): each slot's batch rows
/// it names are kept, and its kept rows it attends (K in all, slot order) put before this
/// call's, as the batch's spans index them -> (keys, values) (K + T, KV D) and K.
fn with_kept_rows<B: KvCache>(b: &B, k: B::Act, v: B::Act, kept: &mut LayerPrompts<B>, batch: BatchPrompts) -> Result<(B::Act, B::Act, usize)> {
    // Gathered before this call's rows are kept: a slot attends only to earlier passes' rows.
    let mut before = Vec::with_capacity(batch.docs.len()); // per slot attending: (K_s, KV D) each
    for (&doc, p) in batch.docs.iter().zip(batch.prefix) {
        if let Prefix::Kept { attend, .. } = p {
            if !attend.is_empty() {
                before.push(kept.gather(b, doc, attend)?);
            }
        }
    }
    for (&doc, p) in batch.docs.iter().zip(batch.prefix) {
        if let Prefix::Kept { start, end, at, .. } = *p {
            if end > start {
                let rows: Vec<u32> = (start..end).collect();
                kept.keep(b, doc, at as usize, b.rows(&k, &rows)?, b.rows(&v, &rows)?)?; // (n, KV D) each
            }
        }
    }
    let (mut k, mut v, mut key_offset) = (k, v, 0);
    // Right to left, so the kept rows end up in slot order before this call's keys.
    for (pk, pv) in before.iter().rev() {
        k = b.concat_rows(pk, &k)?; // (rows + rows so far, KV D)
        v = b.concat_rows(pv, &v)?;
        key_offset += b.dims(pk).0;
    }
    Ok((k, v, key_offset))
}

/// x's rows `out` (in that order) where a layer goes on with those only, else x. Only hidden
/// states are gathered: a backend may keep a norm's or the attention's output narrower
/// (Kernels::Act) and refuse it to `rows`.
pub(crate) fn gather_out<B: Ops>(b: &B, x: B::Act, out: Option<&[u32]>) -> Result<B::Act> {
    match out {
        Some(rows) if !is_identity(rows, b.dims(&x).0) => Ok(b.rows(&x, rows)?),
        _ => Ok(x),
    }
}

/// Whether `order` lists rows 0..n in order: a gather by it would copy the matrix unchanged.
pub(crate) fn is_identity(order: &[u32], n: usize) -> bool {
    order.len() == n && order.iter().enumerate().all(|(i, &r)| r as usize == i)
}

/// begin: ids (T,) -> hidden (T, C)
pub fn begin_forward<B: Ops>(b: &B, w: &PartWeights<B>, ids: &[u32]) -> Result<B::Act> {
    Ok(b.embed(w.at(w.embed()?), ids)?)
}

/// One decoder layer: hidden (T, C) -> hidden (T, C), appending to a generation `cache`.
pub fn layer_forward<B: KvCache>(
    b: &B,
    cfg: &ModelConfig,
    w: &PartWeights<B>,
    x: B::Act,
    ctx: &RowCtx,
    cache: Option<&mut LayerCache<B>>,
) -> Result<B::Act> {
    layer_forward_rows(b, cfg, w, x, ctx, cache.map_or(LayerKeys::None, LayerKeys::Cache), None)
}

/// One decoder layer, with whatever keys it keeps beyond the call, whose output is read only
/// at rows `out` where given (the model's last layer, whose rows the head reads: llama.cpp's
/// `inp_out_ids`): the attention runs for every row (its keys and values are kept), the MLP
/// and the norm before it for those rows only.
/// hidden (T, C) -> (R, C), row i the batch's row out[i]; without `out`, (T, C).
pub fn layer_forward_rows<B: KvCache>(
    b: &B,
    cfg: &ModelConfig,
    w: &PartWeights<B>,
    x: B::Act,
    ctx: &RowCtx,
    keys: LayerKeys<'_, B>,
    out: Option<&[u32]>,
) -> Result<B::Act> {
    match w.view() {
        View::Falcon(l) => falcon::layer_forward(b, cfg, w, l, x, ctx, keys, out),
        View::Llama(l) => llama::layer_forward(b, cfg, w, l, x, ctx, keys, out),
        _ => Err(w.wrong_part("a decoder layer")),
    }
}

/// end: hidden (T, C) at `rows` -> logits (R, V).
pub fn end_logits<B: Ops>(b: &B, cfg: &ModelConfig, w: &PartWeights<B>, x: &B::Act, rows: &[u32]) -> Result<B::Act> {
    let end = w.end()?;
    // A pruned last layer's output is already the head's rows in order: no copy of it.
    let picked = match is_identity(rows, b.dims(x).0) {
        true => None,
        false => Some(b.rows(x, rows)?), // (R, C)
    };
    let picked = picked.as_ref().unwrap_or(x);
    let eps = cfg.norm_eps as f32;
    // Falcon's final norm is a layer norm (it has a shift), the others' RMS norms.
    let normed = match w.linear(end.norm) {
        (scale, Some(shift)) => b.layer_norm(picked, scale, shift, eps)?,
        (scale, None) => b.rms_norm(picked, scale, eps)?,
    };
    Ok(b.linear(&normed, w.at(end.head), None)?) // (R, V)
}

/// Small helpers for reading HF config.json fields with the file and field in errors.
pub(crate) struct HfJson<'a> {
    pub json: &'a serde_json::Value,
    pub file: &'a str,
}

impl HfJson<'_> {
    fn err(&self, field: &str, msg: impl Into<String>) -> ModelError {
        ModelError::Config { file: self.file.into(), field: field.into(), msg: msg.into() }
    }

    pub fn usize_opt(&self, field: &str) -> Result<Option<usize>> {
        match self.json.get(field) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| self.err(field, format!("expected a non-negative integer, found {v}"))),
        }
    }

    pub fn usize(&self, field: &str) -> Result<usize> {
        self.usize_opt(field)?.ok_or_else(|| self.err(field, "required field is missing"))
    }

    pub fn f64_opt(&self, field: &str) -> Result<Option<f64>> {
        match self.json.get(field) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.err(field, format!("expected a number, found {v}"))),
        }
    }

    pub fn bool_opt(&self, field: &str) -> Result<Option<bool>> {
        match self.json.get(field) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| self.err(field, format!("expected true or false, found {v}"))),
        }
    }

    /// rope_theta and its scaling, read as HF's RotaryEmbeddingConfigMixin does: the scaling dict
    /// is `rope_scaling` (Hub checkpoints) or else `rope_parameters` (transformers 5); rope_theta
    /// comes from that dict, else the top level, else `default_theta`. `max_position` is the
    /// model's max_position_embeddings, llama3's fallback for its original context.
    pub fn rope(&self, default_theta: f64, max_position: usize) -> Result<(f64, RopeScaling)> {
        let is_set = |v: &serde_json::Value| !v.is_null() && v.as_object().is_none_or(|o| !o.is_empty());
        let (dict_name, dict) = match (self.json.get("rope_scaling"), self.json.get("rope_parameters")) {
            (Some(rs), _) if is_set(rs) => ("rope_scaling", rs),
            (_, Some(rp)) if is_set(rp) => ("rope_parameters", rp),
            _ => ("rope_parameters", &serde_json::Value::Null),
        };
        if !dict.is_null() && !dict.is_object() {
            return Err(self.err(dict_name, format!("expected an object, found {dict}")));
        }
        let nested = HfJson { json: dict, file: self.file };
        // Errors about a key of the dict name it as `rope_scaling.factor`.
        let prefixed = |e: ModelError| match e {
            ModelError::Config { file, field, msg } => ModelError::Config { file, field: format!("{dict_name}.{field}"), msg },
            other => other,
        };
        let theta = match nested.f64_opt("rope_theta").map_err(prefixed)? {
            Some(t) => t,
            None => self.f64_opt("rope_theta")?.unwrap_or(default_theta),
        };
        // HF's scaled rope types rotate only the first partial_rotary_factor of each head; the
        // families here rotate whole heads.
        let partial = match nested.f64_opt("partial_rotary_factor").map_err(prefixed)? {
            Some(p) => Some((format!("{dict_name}.partial_rotary_factor"), p)),
            None => self.f64_opt("partial_rotary_factor")?.map(|p| ("partial_rotary_factor".to_string(), p)),
        };
        if let Some((field, p)) = partial {
            if p != 1.0 {
                return Err(self.err(&field, format!("partial rotary embeddings are not supported (only 1.0, the whole head), found {p}")));
            }
        }
        let type_key = if dict.get("rope_type").is_some() { "rope_type" } else { "type" };
        let rope_type = match dict.get(type_key) {
            None | Some(serde_json::Value::Null) => "default",
            Some(v) => v.as_str().ok_or_else(|| self.err(&format!("{dict_name}.{type_key}"), format!("expected a string, found {v}")))?,
        };
        let factor = || nested.f64_opt("factor").map_err(prefixed)?.ok_or_else(|| self.err(&format!("{dict_name}.factor"), format!("required for rope type `{rope_type}`")));
        let scaling = match rope_type {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: factor()? },
            "dynamic" => RopeScaling::Dynamic { factor: factor()? },
            "llama3" => {
                let required = |key: &str| {
                    nested.f64_opt(key).map_err(prefixed)?.ok_or_else(|| self.err(&format!("{dict_name}.{key}"), "required for rope type `llama3`"))
                };
                // HF lets a top-level original_max_position_embeddings win over the dict's.
                let original = match self.usize_opt("original_max_position_embeddings")? {
                    Some(o) => o,
                    None => nested.usize_opt("original_max_position_embeddings").map_err(prefixed)?.unwrap_or(max_position),
                };
                RopeScaling::Llama3 {
                    factor: factor()?,
                    low_freq_factor: required("low_freq_factor")?,
                    high_freq_factor: required("high_freq_factor")?,
                    original_max_position: original,
                }
            }
            other => {
                return Err(self.err(
                    &format!("{dict_name}.{type_key}"),
                    format!("rope scaling `{other}` is not supported (supported: default, linear, dynamic, llama3)"),
                ))
            }
        };
        Ok((theta, scaling))
    }

    /// A token id or a list of them (eos_token_id may be either).
    pub fn ids(&self, field: &str) -> Result<Vec<u32>> {
        match self.json.get(field) {
            None | Some(serde_json::Value::Null) => Ok(vec![]),
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|v| v.as_u64().map(|x| x as u32).ok_or_else(|| self.err(field, format!("expected token ids, found {v}"))))
                .collect(),
            Some(v) => v.as_u64().map(|x| vec![x as u32]).ok_or_else(|| self.err(field, format!("expected a token id, found {v}"))),
        }
    }
}
