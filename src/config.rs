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

/// Rotary frequency scaling, as HF's rope initialisation (modeling_rope_utils) or llama.cpp's
/// `rope_freqs` tensor defines it. Every variant yields the (D/2) table `ModelConfig::rope_inv_freq`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// inv_freq_i = theta^(-2i/D)
    #[default]
    None,
    /// Llama-2 era position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// Llama-3.1: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position: usize },
    /// HF dynamic NTK: the base grows only once a sequence passes max_position, which the
    /// context limit never lets happen, so within it the table is the unscaled one.
    Dynamic { factor: f64 },
    /// llama.cpp `rope_freqs.weight` (D/2): frequency i divided by factors[i].
    Freqs { factors: Vec<f32> },
}

impl RopeScaling {
    pub fn is_none(&self) -> bool {
        *self == RopeScaling::None
    }

    fn check(&self, head_dim: usize) -> Result<(), String> {
        let positive = |name: &str, v: f64| if v > 0.0 && v.is_finite() { Ok(()) } else { Err(format!("rope scaling {name} must be a positive number, got {v}")) };
        match self {
            RopeScaling::None => Ok(()),
            RopeScaling::Linear { factor } | RopeScaling::Dynamic { factor } => positive("factor", *factor),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position } => {
                positive("factor", *factor)?;
                positive("low_freq_factor", *low_freq_factor)?;
                positive("high_freq_factor", *high_freq_factor)?;
                if high_freq_factor <= low_freq_factor {
                    return Err(format!("llama3 rope scaling needs high_freq_factor > low_freq_factor, got {high_freq_factor} and {low_freq_factor}"));
                }
                if *original_max_position == 0 {
                    return Err("llama3 rope scaling original_max_position_embeddings must be positive, got 0".into());
                }
                Ok(())
            }
            RopeScaling::Freqs { factors } => {
                if factors.len() != head_dim / 2 {
                    return Err(format!("rope frequency factors: expected head_dim / 2 = {} values, got {}", head_dim / 2, factors.len()));
                }
                match factors.iter().find(|f| !(**f > 0.0 && f.is_finite())) {
                    Some(f) => Err(format!("rope frequency factors must be positive, found {f}")),
                    None => Ok(()),
                }
            }
        }
    }

    /// Short description for `model info`.
    pub fn describe(&self) -> String {
        match self {
            RopeScaling::None => "none".into(),
            RopeScaling::Linear { factor } => format!("linear, factor {factor}"),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position } => format!(
                "llama3, factor {factor}, low_freq_factor {low_freq_factor}, high_freq_factor {high_freq_factor}, original context {original_max_position}"
            ),
            RopeScaling::Dynamic { factor } => format!("dynamic NTK, factor {factor} (inactive within the context limit)"),
            RopeScaling::Freqs { factors } => format!("explicit per-frequency factors ({} values, GGUF rope_freqs)", factors.len()),
        }
    }
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
    /// How the rotary frequencies derived from rope_theta are rescaled. Absent from manifests
    /// written before scaling existed (and from default-rope ones, so their model ids stay).
    #[serde(default, skip_serializing_if = "RopeScaling::is_none")]
    pub rope_scaling: RopeScaling,
    pub norm_eps: f64,
    pub tied_embeddings: bool,
    /// The q, k and v projections carry biases (HF Llama's attention_bias, and every Qwen2);
    /// whether the output projection does too is `attn_out_bias`.
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
    /// The attention output projection carries a bias: HF Llama's attention_bias covers q, k,
    /// v and o, while Qwen2 biases q, k and v only.
    pub fn attn_out_bias(&self) -> bool {
        self.attention_bias && self.family == Family::Llama
    }

    /// Width of the fused qkv projection output: (H + 2 KV) D.
    pub fn qkv_dim(&self) -> usize {
        (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
    }

    /// HF's inverse rotary frequencies (D/2), in f32 step by step as torch computes them, so
    /// both backends rotate by the same angles the goldens were made with.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let theta = self.rope_theta as f32;
        let base: Vec<f32> = (0..d / 2).map(|i| 1.0 / theta.powf((2 * i) as f32 / d as f32)).collect();
        match &self.rope_scaling {
            RopeScaling::None | RopeScaling::Dynamic { .. } => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / *factor as f32).collect(),
            RopeScaling::Freqs { factors } => base.iter().zip(factors).map(|(f, s)| f / s).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position } => {
                let (factor, low, high) = (*factor as f32, *low_freq_factor as f32, *high_freq_factor as f32);
                let old_ctx = *original_max_position as f32;
                let (low_wavelen, high_wavelen) = (old_ctx / low, old_ctx / high);
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old_ctx / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
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
        self.rope_scaling.check(self.head_dim).or_else(bad)?;
        if self.family == Family::Falcon && self.falcon.is_none() {
            return bad("falcon config without its layout".into());
        }
        Ok(())
    }
}
