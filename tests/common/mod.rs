//! Shared test helpers: small random models built in memory.
#![allow(dead_code)]

use falcon_batch::config::ModelConfig;
use falcon_batch::model::{self, Part};
use falcon_batch::stage::HostGroup;
use falcon_batch::tensor::HostTensor;
use std::ops::Range;

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

/// Random weights of the right shapes for every part (norm weights near 1).
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

pub fn random_group(cfg: &ModelConfig, layers: Range<usize>, seed: u64) -> HostGroup {
    HostGroup::read::<()>(layers, cfg.n_layers, |p| {
        let key = match p {
            Part::Begin => 0,
            Part::Layer(i) => i as u64 + 1,
            Part::End => 9999,
        };
        Ok(random_part(cfg, p, seed + key))
    })
    .unwrap()
}

pub fn falcon_config(new_arch: bool, parallel: bool, bias: bool) -> ModelConfig {
    let json = serde_json::json!({
        "model_type": "falcon", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 3,
        "num_kv_heads": if new_arch { 2 } else { 4 }, "new_decoder_architecture": new_arch,
        "multi_query": false, "parallel_attn": parallel, "bias": bias, "vocab_size": 50,
        "max_position_embeddings": 64,
    });
    model::config_from_hf(&json, "test").unwrap()
}

pub fn llama_config() -> ModelConfig {
    let json = serde_json::json!({
        "model_type": "llama", "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 3, "intermediate_size": 48, "vocab_size": 50, "max_position_embeddings": 64,
    });
    model::config_from_hf(&json, "test").unwrap()
}

/// A word-level tokenizer over "t0" .. "t{n-1}" (ids = indices), split on whitespace.
pub fn word_tokenizer(n: usize) -> falcon_batch::tokenizer::Tokenizer {
    let vocab: serde_json::Map<String, serde_json::Value> = (0..n).map(|i| (format!("t{i}"), serde_json::json!(i))).collect();
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
    });
    falcon_batch::tokenizer::Tokenizer::from_bytes(json.to_string().as_bytes(), "test tokenizer").unwrap()
}
