//! Typed reads of GGUF metadata: the model config and the tokenizer vocabulary.
//! Every error names the file and the key, and what type was expected.

use super::parse::Value;
use crate::config::{ConfigError, Family, ModelConfig, RopeScaling};
use crate::format::{FormatError, Result};
use crate::tokenizer::gguf::GgufVocab;
use std::collections::HashMap;

pub(super) struct Meta<'a> {
    pub map: &'a HashMap<String, Value>,
    pub origin: &'a str,
}

impl Meta<'_> {
    fn malformed(&self, msg: String) -> FormatError {
        FormatError::Malformed { path: self.origin.to_string(), msg }
    }

    fn unsupported(&self, msg: String) -> FormatError {
        FormatError::Unsupported { path: self.origin.to_string(), msg }
    }

    fn expected(&self, key: &str, what: &str, found: &Value) -> FormatError {
        self.malformed(format!("metadata `{key}`: expected {what}, found {}", found.type_name()))
    }

    fn u64(&self, key: &str) -> Result<Option<u64>> {
        self.map.get(key).map(|v| v.as_u64().ok_or_else(|| self.expected(key, "a non-negative integer", v))).transpose()
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        self.u64(key)?.map(|v| usize::try_from(v).map_err(|_| self.malformed(format!("metadata `{key}`: {v} is too large")))).transpose()
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?.ok_or_else(|| self.malformed(format!("required metadata `{key}` is missing")))
    }

    fn f64(&self, key: &str) -> Result<Option<f64>> {
        self.map.get(key).map(|v| v.as_f64().ok_or_else(|| self.expected(key, "a number", v))).transpose()
    }

    fn str(&self, key: &str) -> Result<Option<&str>> {
        self.map.get(key).map(|v| v.as_str().ok_or_else(|| self.expected(key, "a string", v))).transpose()
    }

    fn flag(&self, key: &str) -> Result<bool> {
        Ok(self.map.get(key).map(|v| v.as_bool().ok_or_else(|| self.expected(key, "a bool", v))).transpose()?.unwrap_or(false))
    }

    fn id(&self, key: &str) -> Result<Option<u32>> {
        self.u64(key)?.map(|v| u32::try_from(v).map_err(|_| self.malformed(format!("metadata `{key}`: token id {v} is too large")))).transpose()
    }

    fn array(&self, key: &str) -> Result<&[Value]> {
        match self.map.get(key) {
            None => Ok(&[]),
            Some(v) => v.as_array().ok_or_else(|| self.expected(key, "an array", v)),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.array(key)?.iter().map(|x| x.as_str().map(str::to_string).ok_or_else(|| self.expected(key, "an array of strings", x))).collect()
    }

    /// The model config; `has_tensor` tells which optional tensors (output, biases) exist,
    /// `rope_freqs` holds the values of the file's `rope_freqs.weight` if it has one.
    pub fn config(&self, has_tensor: impl Fn(&str) -> bool, rope_freqs: Option<Vec<f32>>) -> Result<ModelConfig> {
        let arch = self.str("general.architecture")?.ok_or_else(|| self.malformed("required metadata `general.architecture` is missing".into()))?;
        if arch != "llama" {
            return Err(self.unsupported(format!("general.architecture `{arch}` is not supported (expected llama)")));
        }
        let k = |name: &str| format!("llama.{name}");
        let hidden = self.usize(&k("embedding_length"))?;
        let n_heads = self.usize(&k("attention.head_count"))?;
        let n_kv_heads = self.usize_opt(&k("attention.head_count_kv"))?.unwrap_or(n_heads);
        // validate() below rejects the zero a missing or zero head count leaves here.
        let head_dim = self.usize_opt(&k("attention.key_length"))?.unwrap_or(hidden.checked_div(n_heads).unwrap_or(0));
        let vocab_size = match self.map.get("tokenizer.ggml.tokens").and_then(Value::as_array) {
            Some(tokens) => tokens.len(),
            None => self.usize(&k("vocab_size"))?,
        };
        let norm_key = k("attention.layer_norm_rms_epsilon");
        if let Some(n_rot) = self.usize_opt(&k("rope.dimension_count"))? {
            if n_rot != head_dim {
                return Err(self.unsupported(format!(
                    "llama.rope.dimension_count {n_rot}: partial rotary embeddings are not supported (expected the head dim, {head_dim})"
                )));
            }
        }
        let attention_bias = has_tensor("blk.0.attn_q.bias");
        if attention_bias && !has_tensor("blk.0.attn_output.bias") {
            return Err(self.unsupported(
                "blk.0.attn_q.bias without blk.0.attn_output.bias: biases on q/k/v only are not the Llama attention_bias layout (q, k, v and o)".into(),
            ));
        }
        let cfg = ModelConfig {
            family: Family::Llama,
            vocab_size,
            hidden_size: hidden,
            n_layers: self.usize(&k("block_count"))?,
            n_heads,
            n_kv_heads,
            head_dim,
            intermediate_size: self.usize(&k("feed_forward_length"))?,
            max_position: self.usize(&k("context_length"))?,
            sliding_window: None,
            rope_theta: self.f64(&k("rope.freq_base"))?.unwrap_or(10000.0),
            rope_scaling: self.rope_scaling(rope_freqs)?,
            norm_eps: self.f64(&norm_key)?.ok_or_else(|| self.malformed(format!("required metadata `{norm_key}` is missing")))?,
            // llama.cpp uses the embedding matrix as the head when there is no output.weight.
            tied_embeddings: !has_tensor("output.weight"),
            attention_bias,
            mlp_bias: has_tensor("blk.0.ffn_gate.bias"),
            falcon: None,
            bos_token_id: self.id("tokenizer.ggml.bos_token_id")?,
            eos_token_ids: self.id("tokenizer.ggml.eos_token_id")?.into_iter().collect(),
        };
        cfg.validate(self.origin).map_err(|e| match e {
            ConfigError::Invalid { msg, .. } => self.malformed(format!("config from metadata: {msg}")),
        })?;
        Ok(cfg)
    }

    /// llama.cpp's reading: `rope.scaling.type` defaults to linear, its factor is
    /// `rope.scaling.factor` (or the older `rope.scale_linear`), type none turns scaling off, and
    /// `rope_freqs` divides each frequency on top of a linear factor.
    fn rope_scaling(&self, rope_freqs: Option<Vec<f32>>) -> Result<RopeScaling> {
        let type_key = "llama.rope.scaling.type";
        let kind = self.str(type_key)?.unwrap_or("linear");
        let factor = match self.f64("llama.rope.scaling.factor")? {
            Some(f) => Some(f),
            None => self.f64("llama.rope.scale_linear")?,
        };
        let linear = match kind {
            "none" => 1.0,
            // llama.cpp reads a factor of 0 (or none) as no scaling.
            "linear" => factor.filter(|f| *f != 0.0).unwrap_or(1.0),
            other => return Err(self.unsupported(format!("metadata `{type_key}`: rope scaling `{other}` is not supported (supported: none, linear)"))),
        };
        Ok(match rope_freqs {
            Some(factors) => RopeScaling::Freqs { factors: factors.iter().map(|f| f * linear as f32).collect() },
            None if linear == 1.0 => RopeScaling::None,
            None => RopeScaling::Linear { factor: linear },
        })
    }

    pub fn vocab(&self) -> Result<GgufVocab> {
        let type_key = "tokenizer.ggml.token_type";
        let token_types = self
            .array(type_key)?
            .iter()
            .map(|x| x.as_i64().and_then(|t| i32::try_from(t).ok()).ok_or_else(|| self.expected(type_key, "an array of i32", x)))
            .collect::<Result<_>>()?;
        let model = self.str("tokenizer.ggml.model")?.ok_or_else(|| self.malformed("required metadata `tokenizer.ggml.model` is missing".into()))?;
        Ok(GgufVocab {
            model: model.to_string(),
            pre: self.str("tokenizer.ggml.pre")?.map(str::to_string),
            tokens: self.strings("tokenizer.ggml.tokens")?,
            token_types,
            merges: self.strings("tokenizer.ggml.merges")?,
            bos: self.id("tokenizer.ggml.bos_token_id")?,
            eos: self.id("tokenizer.ggml.eos_token_id")?,
            unk: self.id("tokenizer.ggml.unknown_token_id")?,
            pad: self.id("tokenizer.ggml.padding_token_id")?,
            add_bos: self.flag("tokenizer.ggml.add_bos_token")?,
            add_eos: self.flag("tokenizer.ggml.add_eos_token")?,
        })
    }
}
