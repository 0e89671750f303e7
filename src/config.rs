//! ModelConfig: a family and its dimensions, the one description every part of the program shares.
//!
//! Shape legend used across the crate: T rows (tokens) of a micro-batch, C hidden size,
//! H query heads, KV key/value heads, D head dim, F MLP inner size, V vocabulary.

use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Falcon,
    Llama,
    Qwen2,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Falcon => "falcon",
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
        }
    }
}

/// Falcon's layout switches (HF FalconConfig).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FalconLayout {
    /// Falcon-40B/180B: grouped KV heads and (usually) separate ln_attn / ln_mlp.
    pub new_decoder_architecture: bool,
    /// Attention and MLP read the same normed input and their outputs are summed.
    pub parallel_attn: bool,
    /// With the new architecture: 2 = ln_attn + ln_mlp, 1 = one shared input_layernorm.
    pub num_ln_in_parallel_attn: usize,
    /// Linear layers carry biases.
    pub bias: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub family: Family,
    /// V
    pub vocab_size: usize,
    /// C
    pub hidden_size: usize,
    pub n_layers: usize,
    /// H
    pub n_heads: usize,
    /// KV
    pub n_kv_heads: usize,
    /// D
    pub head_dim: usize,
    /// F
    pub intermediate_size: usize,
    /// The longest sequence the model was trained for.
    pub max_position: usize,
    /// Mistral: keys further back than this are not attended.
    pub sliding_window: Option<usize>,
    pub rope_theta: f64,
    pub norm_eps: f64,
    pub tied_embeddings: bool,
    /// Llama family: q/k/v projections carry biases (Qwen-style); never set for Llama-2.
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub falcon: Option<FalconLayout>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{file}: {msg}")]
    Invalid { file: String, msg: String },
}

impl ModelConfig {
    /// Width of the fused qkv projection output: (H + 2 KV) D.
    pub fn qkv_dim(&self) -> usize {
        (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
    }

    /// Context a document must fit (positions are 0-based).
    pub fn context_limit(&self) -> usize {
        match self.sliding_window {
            Some(w) => w.min(self.max_position),
            None => self.max_position,
        }
    }

    pub fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let bad = |msg: String| Err(ConfigError::Invalid { file: file.to_string(), msg });
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.n_layers),
            ("num_attention_heads", self.n_heads),
            ("num_key_value_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position),
        ];
        for (name, v) in positive {
            if v == 0 {
                return bad(format!("field `{name}` must be a positive integer, got 0"));
            }
        }
        if self.n_heads % self.n_kv_heads != 0 {
            return bad(format!(
                "num_attention_heads ({}) must be a multiple of the key/value heads ({})",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.head_dim % 2 != 0 {
            return bad(format!("head_dim must be even for rotary embeddings, got {}", self.head_dim));
        }
        if !(self.rope_theta > 0.0) {
            return bad(format!("rope_theta must be positive, got {}", self.rope_theta));
        }
        if self.family == Family::Falcon && self.falcon.is_none() {
            return bad("falcon config without its layout".into());
        }
        Ok(())
    }
}
