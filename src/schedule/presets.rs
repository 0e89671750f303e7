//! Published dimensions of the models the planner knows by name, so `plan` can answer
//! "would this fit and how fast" before anyone downloads 360 GB of weights.

use crate::config::{FalconLayout, Family, ModelConfig, RopeScaling};

/// Names accepted by `--preset`.
pub const PRESETS: &[&str] = &["falcon-7b", "falcon-40b", "falcon-180b", "llama-2-70b"];

/// The preset's config and its storage dtype size in bytes (all bf16 or f16 checkpoints).
pub fn preset(name: &str) -> Option<(ModelConfig, usize)> {
    let falcon = |layers, hidden, heads, kv, new_arch: bool| ModelConfig {
        family: Family::Falcon,
        vocab_size: 65024,
        hidden_size: hidden,
        n_layers: layers,
        n_heads: heads,
        n_kv_heads: kv,
        head_dim: 64,
        intermediate_size: 4 * hidden,
        max_position: 2048,
        sliding_window: None,
        rope_theta: 10000.0,
        rope_scaling: RopeScaling::None,
        norm_eps: 1e-5,
        tied_embeddings: false,
        attention_bias: false,
        mlp_bias: false,
        falcon: Some(FalconLayout {
            new_decoder_architecture: new_arch,
            parallel_attn: true,
            num_ln_in_parallel_attn: if new_arch { 2 } else { 1 },
            bias: false,
        }),
        bos_token_id: None,
        eos_token_ids: vec![11],
    };
    let cfg = match name {
        // Falcon-7B is multi-query: one shared key/value head.
        "falcon-7b" => falcon(32, 4544, 71, 1, false),
        "falcon-40b" => falcon(60, 8192, 128, 8, true),
        "falcon-180b" => falcon(80, 14848, 232, 8, true),
        "llama-2-70b" => ModelConfig {
            family: Family::Llama,
            vocab_size: 32000,
            hidden_size: 8192,
            n_layers: 80,
            n_heads: 64,
            n_kv_heads: 8,
            head_dim: 128,
            intermediate_size: 28672,
            max_position: 4096,
            sliding_window: None,
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::None,
            norm_eps: 1e-5,
            tied_embeddings: false,
            attention_bias: false,
            mlp_bias: false,
            falcon: None,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
        },
        _ => return None,
    };
    Some((cfg, 2))
}
