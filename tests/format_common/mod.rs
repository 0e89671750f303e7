//! Small random HF checkpoints written in the test itself (safetensors + config.json +
//! a WordLevel tokenizer.json), for both families, sharded or not.
#![allow(dead_code)]

use falcon_batch::tensor::{DType, HostTensor};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// Deterministic values in [-1, 1): tests must not depend on a random crate's version.
pub fn random_tensor(shape: &[usize], dtype: DType, seed: u64) -> HostTensor {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    HostTensor::from_f32(shape.to_vec(), &values).to_dtype(dtype)
}

fn st_dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::Bf16 => Dtype::BF16,
    }
}

/// Llama GQA: 4 query heads, 2 kv heads, head dim 4, hidden 16, ffn 24, vocab 12.
pub fn llama_config(layers: usize) -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 16, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": layers, "intermediate_size": 24, "vocab_size": 12,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 50000.0,
        "tie_word_embeddings": false, "torch_dtype": "bfloat16", "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": 2
    })
}

/// Falcon new architecture (40B/180B layout): 4 heads, 2 kv heads, ln_attn + ln_mlp, tied head.
pub fn falcon_config(layers: usize) -> Value {
    json!({
        "architectures": ["FalconForCausalLM"], "model_type": "falcon",
        "hidden_size": 16, "num_attention_heads": 4, "num_kv_heads": 2,
        "new_decoder_architecture": true, "num_hidden_layers": layers, "vocab_size": 12,
        "parallel_attn": true, "bias": false, "alibi": false, "torch_dtype": "float32"
    })
}

fn usize_of(cfg: &Value, k: &str, default: usize) -> usize {
    cfg.get(k).and_then(Value::as_u64).map(|v| v as usize).unwrap_or(default)
}

/// HF names and shapes of a Llama checkpoint with `cfg`'s dims.
pub fn llama_shapes(cfg: &Value) -> Vec<(String, Vec<usize>)> {
    let (c, h, l) = (usize_of(cfg, "hidden_size", 0), usize_of(cfg, "num_attention_heads", 0), usize_of(cfg, "num_hidden_layers", 0));
    let kv = usize_of(cfg, "num_key_value_heads", h);
    let (f, v, d) = (usize_of(cfg, "intermediate_size", 0), usize_of(cfg, "vocab_size", 32000), c / h);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, c])];
    for i in 0..l {
        let p = format!("model.layers.{i}");
        for (n, s) in [
            ("input_layernorm.weight", vec![c]),
            ("post_attention_layernorm.weight", vec![c]),
            ("self_attn.q_proj.weight", vec![h * d, c]),
            ("self_attn.k_proj.weight", vec![kv * d, c]),
            ("self_attn.v_proj.weight", vec![kv * d, c]),
            ("self_attn.o_proj.weight", vec![c, h * d]),
            ("mlp.gate_proj.weight", vec![f, c]),
            ("mlp.up_proj.weight", vec![f, c]),
            ("mlp.down_proj.weight", vec![c, f]),
        ] {
            out.push((format!("{p}.{n}"), s));
        }
    }
    out.push(("model.norm.weight".into(), vec![c]));
    if !cfg.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false) {
        out.push(("lm_head.weight".into(), vec![v, c]));
    }
    out
}

/// HF names and shapes of a new-architecture Falcon checkpoint (no biases, tied head).
pub fn falcon_shapes(cfg: &Value) -> Vec<(String, Vec<usize>)> {
    let (c, h, l) = (usize_of(cfg, "hidden_size", 0), usize_of(cfg, "num_attention_heads", 0), usize_of(cfg, "num_hidden_layers", 0));
    let (kv, v, d) = (usize_of(cfg, "num_kv_heads", h), usize_of(cfg, "vocab_size", 65024), c / h);
    let f = usize_of(cfg, "ffn_hidden_size", 4 * c);
    let mut out = vec![("transformer.word_embeddings.weight".to_string(), vec![v, c])];
    for i in 0..l {
        let p = format!("transformer.h.{i}");
        for (n, s) in [
            ("ln_attn.weight", vec![c]),
            ("ln_attn.bias", vec![c]),
            ("ln_mlp.weight", vec![c]),
            ("ln_mlp.bias", vec![c]),
            ("self_attention.query_key_value.weight", vec![(h + 2 * kv) * d, c]),
            ("self_attention.dense.weight", vec![c, c]),
            ("mlp.dense_h_to_4h.weight", vec![f, c]),
            ("mlp.dense_4h_to_h.weight", vec![c, f]),
        ] {
            out.push((format!("{p}.{n}"), s));
        }
    }
    out.push(("transformer.ln_f.weight".into(), vec![c]));
    out.push(("transformer.ln_f.bias".into(), vec![c]));
    out
}

pub fn random_tensors(shapes: &[(String, Vec<usize>)], dtype: DType) -> BTreeMap<String, HostTensor> {
    shapes.iter().enumerate().map(|(i, (n, s))| (n.clone(), random_tensor(s, dtype, i as u64 + 1))).collect()
}

pub fn write_safetensors(path: &Path, tensors: &[(&String, &HostTensor)]) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, t)| ((*n).clone(), TensorView::new(st_dtype(t.dtype), t.shape.clone(), &t.data).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// A WordLevel tokenizer over `vocab` tokens named t0, t1, ... (t0 is the unknown token).
pub fn tokenizer_json(vocab: usize) -> Value {
    let vocab: serde_json::Map<String, Value> = (0..vocab).map(|i| (format!("t{i}"), json!(i))).collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
    })
}

/// Write config.json, tokenizer.json and the tensors, as one file or as `shards` shards
/// with model.safetensors.index.json.
pub fn write_checkpoint(dir: &Path, config: &Value, tensors: &BTreeMap<String, HostTensor>, shards: usize) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(config).unwrap()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json(12).to_string()).unwrap();
    let all: Vec<(&String, &HostTensor)> = tensors.iter().collect();
    if shards <= 1 {
        write_safetensors(&dir.join("model.safetensors"), &all);
        return;
    }
    let mut weight_map = serde_json::Map::new();
    let per = all.len().div_ceil(shards);
    for (k, chunk) in all.chunks(per).enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, shards);
        write_safetensors(&dir.join(&file), chunk);
        for (n, _) in chunk {
            weight_map.insert((*n).clone(), json!(file));
        }
    }
    let index = json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

/// A Llama checkpoint in `dir` with `layers` layers; returns the tensors written.
pub fn llama_checkpoint(dir: &Path, layers: usize, dtype: DType, shards: usize) -> BTreeMap<String, HostTensor> {
    let cfg = llama_config(layers);
    let tensors = random_tensors(&llama_shapes(&cfg), dtype);
    write_checkpoint(dir, &cfg, &tensors, shards);
    tensors
}

pub fn falcon_checkpoint(dir: &Path, layers: usize, dtype: DType, shards: usize) -> BTreeMap<String, HostTensor> {
    let cfg = falcon_config(layers);
    let tensors = random_tensors(&falcon_shapes(&cfg), dtype);
    write_checkpoint(dir, &cfg, &tensors, shards);
    tensors
}
