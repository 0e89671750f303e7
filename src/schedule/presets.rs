//! Published dimensions of the models known by name: `plan --preset` answers "would this fit
//! and how fast" before anyone downloads 360 GB of weights, and `bench --synthetic` times
//! layers of the same shapes. The one table of them, written as the HF config.json each
//! checkpoint ships, read by the same reader as a real checkpoint's.

use crate::config::ModelConfig;
use serde_json::{json, Value};

/// Names accepted by `plan --preset` and `bench --synthetic`.
pub const PRESETS: &[&str] = &["falcon-180b", "falcon-40b", "falcon-7b", "llama-2-70b", "smollm2-135m", "tiny"];

/// Bytes per weight of every preset's checkpoint (all are bf16 or f16).
pub const DTYPE_BYTES: usize = 2;

/// The preset's HF config.json (layer count included).
fn hf_config(name: &str) -> Option<Value> {
    let falcon_new = |h: usize, heads: usize, kv: usize, layers: usize| {
        json!({"model_type": "falcon", "hidden_size": h, "num_attention_heads": heads, "num_kv_heads": kv,
               "num_hidden_layers": layers, "new_decoder_architecture": true, "parallel_attn": true,
               "bias": false, "vocab_size": 65024, "max_position_embeddings": 2048, "eos_token_id": 11})
    };
    let llama = |h: usize, heads: usize, kv: usize, ffn: usize, layers: usize, vocab: usize, theta: f64| {
        json!({"model_type": "llama", "hidden_size": h, "num_attention_heads": heads, "num_key_value_heads": kv,
               "intermediate_size": ffn, "num_hidden_layers": layers, "vocab_size": vocab, "rope_theta": theta,
               "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2})
    };
    Some(match name {
        "falcon-180b" => falcon_new(14848, 232, 8, 80),
        "falcon-40b" => falcon_new(8192, 128, 8, 60),
        // Falcon-7B is multi-query: one shared key/value head.
        "falcon-7b" => json!({"model_type": "falcon", "hidden_size": 4544, "num_attention_heads": 71, "num_hidden_layers": 32,
                              "multi_query": true, "parallel_attn": true, "bias": false, "vocab_size": 65024,
                              "max_position_embeddings": 2048, "eos_token_id": 11}),
        "llama-2-70b" => llama(8192, 64, 8, 28672, 80, 32000, 10000.0),
        "smollm2-135m" => llama(576, 9, 3, 1536, 30, 49152, 100000.0),
        "tiny" => falcon_new(256, 8, 2, 4),
        _ => return None,
    })
}

/// The preset's config; None for a name not in [`PRESETS`].
pub fn config(name: &str) -> Option<ModelConfig> {
    // A preset's JSON is ours, checked for every name by the test below.
    hf_config(name).and_then(|j| crate::model::config_from_hf(&j, &format!("<preset {name}>")).ok())
}

/// The preset's config and its storage dtype size in bytes.
pub fn preset(name: &str) -> Option<(ModelConfig, usize)> {
    config(name).map(|c| (c, DTYPE_BYTES))
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_preset_is_a_valid_config() {
        for p in super::PRESETS {
            let j = super::hf_config(p).unwrap();
            if let Err(e) = crate::model::config_from_hf(&j, p) {
                panic!("{p}: {e}");
            }
        }
        assert!(super::config("falcon-999b").is_none());
    }
}
