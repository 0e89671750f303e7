//! Typed reads of GGUF metadata: the model config and the tokenizer vocabulary.
//! Every error names the file and the key, and what type was expected.

use super::parse::Value;
use crate::config::{ConfigError, FalconLayout, Family, ModelConfig, RopeScaling};
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

    /// The model config; `has_tensor` tells which optional tensors (output, biases, norms) exist,
    /// `rope_freqs` holds the values of the file's `rope_freqs.weight` if it has one.
    pub fn config(&self, has_tensor: impl Fn(&str) -> bool, rope_freqs: Option<Vec<f32>>) -> Result<ModelConfig> {
        let arch = self.str("general.architecture")?.ok_or_else(|| self.malformed("required metadata `general.architecture` is missing".into()))?;
        let cfg = match arch {
            "llama" => self.llama_like(arch, Family::Llama, &has_tensor, rope_freqs)?,
            "qwen2" => self.llama_like(arch, Family::Qwen2, &has_tensor, rope_freqs)?,
            "falcon" => self.falcon(&has_tensor, rope_freqs)?,
            other => return Err(self.unsupported(format!("general.architecture `{other}` is not supported (expected llama, qwen2 or falcon)"))),
        };
        cfg.validate(self.origin).map_err(|e| match e {
            ConfigError::Invalid { msg, .. } => self.malformed(format!("config from metadata: {msg}")),
        })?;
        Ok(cfg)
    }

    /// The embedding rows: llama.cpp pads the token list to the model's vocabulary.
    fn vocab_size(&self, arch: &str) -> Result<usize> {
        match self.map.get("tokenizer.ggml.tokens").and_then(Value::as_array) {
            Some(tokens) => Ok(tokens.len()),
            None => self.usize(&format!("{arch}.vocab_size")),
        }
    }

    fn rope_theta(&self, arch: &str) -> Result<f64> {
        Ok(self.f64(&format!("{arch}.rope.freq_base"))?.unwrap_or(10000.0))
    }

    /// llama.cpp's reading: `rope.scaling.type` defaults to linear, its factor is
    /// `rope.scaling.factor` (or the older `rope.scale_linear`), type none turns scaling off, and
    /// `rope_freqs` divides each frequency on top of a linear factor.
    fn rope_scaling(&self, arch: &str, rope_freqs: Option<Vec<f32>>) -> Result<RopeScaling> {
        let type_key = format!("{arch}.rope.scaling.type");
        let kind = self.str(&type_key)?.unwrap_or("linear");
        let factor = match self.f64(&format!("{arch}.rope.scaling.factor"))? {
            Some(f) => Some(f),
            None => self.f64(&format!("{arch}.rope.scale_linear"))?,
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

    /// llama and qwen2: the same keys under their own prefix. Qwen2 is llama.cpp's llama
    /// block with q/k/v biases and HF's rotary layout; it has no sliding window there.
    fn llama_like(&self, arch: &str, family: Family, has_tensor: &dyn Fn(&str) -> bool, rope_freqs: Option<Vec<f32>>) -> Result<ModelConfig> {
        let k = |name: &str| format!("{arch}.{name}");
        let hidden = self.usize(&k("embedding_length"))?;
        let n_heads = self.usize(&k("attention.head_count"))?;
        let n_kv_heads = self.usize_opt(&k("attention.head_count_kv"))?.unwrap_or(n_heads);
        // validate() rejects the zero a missing or zero head count leaves here.
        let head_dim = self.usize_opt(&k("attention.key_length"))?.unwrap_or(hidden.checked_div(n_heads).unwrap_or(0));
        let norm_key = k("attention.layer_norm_rms_epsilon");
        if let Some(n_rot) = self.usize_opt(&k("rope.dimension_count"))? {
            if n_rot != head_dim {
                return Err(self.unsupported(format!(
                    "{arch}.rope.dimension_count {n_rot}: partial rotary embeddings are not supported (expected the head dim, {head_dim})"
                )));
            }
        }
        if family == Family::Llama && has_tensor("blk.0.attn_q.bias") && !has_tensor("blk.0.attn_output.bias") {
            return Err(self.unsupported(
                "blk.0.attn_q.bias without blk.0.attn_output.bias: biases on q/k/v only are not the Llama attention_bias layout (q, k, v and o)".into(),
            ));
        }
        Ok(ModelConfig {
            family,
            vocab_size: self.vocab_size(arch)?,
            hidden_size: hidden,
            n_layers: self.usize(&k("block_count"))?,
            n_heads,
            n_kv_heads,
            head_dim,
            intermediate_size: self.usize(&k("feed_forward_length"))?,
            max_position: self.usize(&k("context_length"))?,
            sliding_window: None,
            rope_theta: self.rope_theta(arch)?,
            rope_scaling: self.rope_scaling(arch, rope_freqs)?,
            norm_eps: self.f64(&norm_key)?.ok_or_else(|| self.malformed(format!("required metadata `{norm_key}` is missing")))?,
            // llama.cpp uses the embedding matrix as the head when there is no output.weight.
            tied_embeddings: !has_tensor("output.weight"),
            // Qwen2 always has them (HF builds q/k/v with bias); a file without them is
            // named by the converter when it looks for blk.N.attn_q.bias.
            attention_bias: family == Family::Qwen2 || has_tensor("blk.0.attn_q.bias"),
            mlp_bias: has_tensor("blk.0.ffn_gate.bias"),
            falcon: None,
            bos_token_id: self.id("tokenizer.ggml.bos_token_id")?,
            eos_token_ids: self.id("tokenizer.ggml.eos_token_id")?.into_iter().collect(),
        })
    }

    /// Falcon as llama.cpp stores it. llama.cpp's graph is always parallel attention + MLP;
    /// the layout follows from the tensors: `attn_norm_2` (ln_attn) exists only in the
    /// 40B/180B decoder with two norms, and more than one KV head means grouped attention
    /// (the new decoder architecture). The fused qkv rows are `[Q; K; V]` in every case.
    fn falcon(&self, has_tensor: &dyn Fn(&str) -> bool, rope_freqs: Option<Vec<f32>>) -> Result<ModelConfig> {
        let k = |name: &str| format!("falcon.{name}");
        if let Some(layout) = self.str(&k("tensor_data_layout"))? {
            if layout != "jploski" {
                return Err(self.unsupported(format!(
                    "metadata `falcon.tensor_data_layout` is `{layout}`; only llama.cpp's \"jploski\" qkv arrangement is known"
                )));
            }
        }
        if has_tensor("blk.0.ffn_norm.weight") {
            return Err(self.unsupported(
                "tensor blk.0.ffn_norm.weight: a sequential Falcon layout (parallel_attn=false) is not what llama.cpp's falcon \
                 architecture describes; convert the HF checkpoint instead"
                    .into(),
            ));
        }
        let hidden = self.usize(&k("embedding_length"))?;
        let n_heads = self.usize(&k("attention.head_count"))?;
        // Falcon-7B's converter writes 1; older files may leave it out, meaning multi-query.
        let n_kv_heads = self.usize_opt(&k("attention.head_count_kv"))?.unwrap_or(1);
        if n_heads == 0 || hidden % n_heads != 0 {
            return Err(self.malformed(format!("falcon.embedding_length {hidden} is not divisible by falcon.attention.head_count {n_heads}")));
        }
        let two_norms = has_tensor("blk.0.attn_norm_2.weight");
        let bias = has_tensor("blk.0.attn_qkv.bias");
        let norm_key = k("attention.layer_norm_epsilon");
        Ok(ModelConfig {
            family: Family::Falcon,
            vocab_size: self.vocab_size("falcon")?,
            hidden_size: hidden,
            n_layers: self.usize(&k("block_count"))?,
            n_heads,
            n_kv_heads,
            head_dim: hidden / n_heads,
            intermediate_size: self.usize(&k("feed_forward_length"))?,
            max_position: self.usize(&k("context_length"))?,
            sliding_window: None,
            rope_theta: self.rope_theta("falcon")?,
            rope_scaling: self.rope_scaling("falcon", rope_freqs)?,
            norm_eps: self.f64(&norm_key)?.ok_or_else(|| self.malformed(format!("required metadata `{norm_key}` is missing")))?,
            tied_embeddings: !has_tensor("output.weight"),
            attention_bias: false,
            mlp_bias: false,
            falcon: Some(FalconLayout {
                new_decoder_architecture: n_kv_heads > 1 || two_norms,
                parallel_attn: true,
                num_ln_in_parallel_attn: if two_norms { 2 } else { 1 },
                bias,
            }),
            bos_token_id: self.id("tokenizer.ggml.bos_token_id")?,
            eos_token_ids: self.id("tokenizer.ggml.eos_token_id")?.into_iter().collect(),
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
            pre: match self.str("tokenizer.ggml.pre")? {
                Some(pre) => Some(pre.to_string()),
                // Files converted before llama.cpp recorded the pre-tokenizer (mid-2024) lack
                // the key; for these architectures the vocabulary can only be their own.
                None => match self.str("general.architecture")? {
                    Some(arch @ ("falcon" | "qwen2")) => Some(arch.to_string()),
                    _ => None,
                },
            },
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

#[cfg(test)]
mod tests {
    use super::*;

    fn falcon_meta(kv: u32) -> HashMap<String, Value> {
        let mut m = HashMap::new();
        m.insert("general.architecture".to_string(), Value::Str("falcon".into()));
        m.insert("falcon.tensor_data_layout".to_string(), Value::Str("jploski".into()));
        for (k, v) in [("context_length", 2048), ("embedding_length", 64), ("feed_forward_length", 256), ("block_count", 2), ("attention.head_count", 8)] {
            m.insert(format!("falcon.{k}"), Value::U32(v));
        }
        m.insert("falcon.attention.head_count_kv".to_string(), Value::U32(kv));
        m.insert("falcon.attention.layer_norm_epsilon".to_string(), Value::F32(1e-5));
        m.insert("falcon.vocab_size".to_string(), Value::U32(100));
        m
    }

    fn config(map: &HashMap<String, Value>, tensors: &[&str]) -> Result<ModelConfig> {
        Meta { map, origin: "f.gguf" }.config(|n| tensors.contains(&n), None)
    }

    #[test]
    fn falcon_layout_follows_llama_cpps_tensors() {
        let seven = config(&falcon_meta(1), &["blk.0.attn_norm.weight", "output.weight"]).unwrap();
        let l = seven.falcon.unwrap();
        assert!(!l.new_decoder_architecture && l.parallel_attn && l.num_ln_in_parallel_attn == 1 && !l.bias);
        assert!(!seven.tied_embeddings && seven.n_kv_heads == 1 && seven.head_dim == 8);
        let forty = config(&falcon_meta(2), &["blk.0.attn_norm.weight", "blk.0.attn_norm_2.weight", "blk.0.attn_qkv.bias"]).unwrap();
        let l = forty.falcon.unwrap();
        assert!(l.new_decoder_architecture && l.num_ln_in_parallel_attn == 2 && l.bias && forty.tied_embeddings);
    }

    #[test]
    fn falcon_refusals_name_the_file_and_what_was_expected() {
        let mut m = falcon_meta(2);
        m.insert("falcon.tensor_data_layout".into(), Value::Str("plain".into()));
        let e = config(&m, &[]).unwrap_err().to_string();
        assert!(e.contains("f.gguf") && e.contains("tensor_data_layout") && e.contains("jploski"), "{e}");
        let e = config(&falcon_meta(2), &["blk.0.ffn_norm.weight"]).unwrap_err().to_string();
        assert!(e.contains("f.gguf") && e.contains("blk.0.ffn_norm.weight") && e.contains("parallel_attn=false"), "{e}");
        let mut m = falcon_meta(2);
        m.remove("falcon.attention.layer_norm_epsilon");
        let e = config(&m, &[]).unwrap_err().to_string();
        assert!(e.contains("falcon.attention.layer_norm_epsilon"), "{e}");
        m.insert("tokenizer.ggml.model".into(), Value::Str("gpt2".into()));
        assert_eq!(Meta { map: &m, origin: "f.gguf" }.vocab().unwrap().pre.as_deref(), Some("falcon"), "falcon's own split when the key is absent");
        m.insert("general.architecture".into(), Value::Str("bloom".into()));
        let e = config(&m, &[]).unwrap_err().to_string();
        assert!(e.contains("`bloom`") && e.contains("llama, qwen2 or falcon"), "{e}");
    }
}
