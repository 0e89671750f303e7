//! Small random models built in memory, for tests and self-checks. Every process that calls
//! these with the same seed gets bit-identical weights, so MPI ranks can build the same model
//! without sharing files.

use crate::config::ModelConfig;
use crate::model::{self, ModelError, Part};
use crate::group::HostGroup;
use crate::tensor::HostTensor;
use std::convert::Infallible;
use std::ops::Range;

/// `n` values uniform in [-scale, scale) from a xorshift stream seeded by `seed`.
pub fn rand_values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Seed of a part: every part of a model draws from its own stream.
fn part_seed(part: Part, seed: u64) -> u64 {
    seed + match part {
        Part::Begin => 0,
        Part::Layer(i) => i as u64 + 1,
        Part::End => 9999,
    }
}

/// Random weights of the right shapes for a part (norm weights near 1), drawn from `seed`
/// exactly as given (random_model_part derives a per-part seed first).
pub fn random_part(cfg: &ModelConfig, part: Part, seed: u64) -> Vec<(String, HostTensor)> {
    model::expected_tensors(cfg, part)
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n = shape.iter().product();
            let mut v = rand_values(n, seed * 1000 + i as u64 + 1, 0.3);
            if name.contains("norm") && name.ends_with("weight") {
                v.iter_mut().for_each(|x| *x += 1.0);
            }
            (name, HostTensor::from_f32(shape, &v))
        })
        .collect()
}

/// Part `part` of the random model `seed`: the same tensors whichever group asks for it.
pub fn random_model_part(cfg: &ModelConfig, part: Part, seed: u64) -> Vec<(String, HostTensor)> {
    random_part(cfg, part, part_seed(part, seed))
}

/// The layers `layers` (with begin/end when in range) of the random model `seed`.
pub fn random_group(cfg: &ModelConfig, layers: Range<usize>, seed: u64) -> HostGroup {
    let read = |p| Ok::<_, Infallible>(random_model_part(cfg, p, seed));
    match HostGroup::read(layers, cfg.n_layers, read) {
        Ok(g) => g,
        Err(never) => match never {},
    }
}

/// A tiny Falcon (hidden 32, 4 heads, vocabulary 50) with the given layout switches.
pub fn falcon_config(n_layers: usize, new_arch: bool, parallel: bool, bias: bool) -> Result<ModelConfig, ModelError> {
    let json = serde_json::json!({
        "model_type": "falcon", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": n_layers,
        "num_kv_heads": if new_arch { 2 } else { 4 }, "new_decoder_architecture": new_arch,
        "multi_query": false, "parallel_attn": parallel, "bias": bias, "vocab_size": 50,
        "max_position_embeddings": 64,
    });
    model::config_from_hf(&json, "test")
}

/// A tiny Llama (hidden 32, 4 heads, 2 KV heads, vocabulary 50).
pub fn llama_config(n_layers: usize) -> Result<ModelConfig, ModelError> {
    let json = serde_json::json!({
        "model_type": "llama", "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": n_layers, "intermediate_size": 48, "vocab_size": 50, "max_position_embeddings": 64,
    });
    model::config_from_hf(&json, "test")
}

/// A word-level tokenizer over "t0" .. "t{n-1}" (ids = indices), split on whitespace.
pub fn word_tokenizer(n: usize) -> Result<crate::tokenizer::Tokenizer, crate::tokenizer::TokenizerError> {
    let vocab: serde_json::Map<String, serde_json::Value> = (0..n).map(|i| (format!("t{i}"), serde_json::json!(i))).collect();
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
    });
    crate::tokenizer::Tokenizer::from_bytes(json.to_string().as_bytes(), "test tokenizer")
}
