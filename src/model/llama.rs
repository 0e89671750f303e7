//! Llama family (Llama-2, Mistral, Yi, SmolLM): HF config, tensor-name table, decoder block.
//!
//! Shapes: T rows, C hidden, H query heads, KV key/value heads, D head dim, F intermediate.
//!     h = x + attn(rms(x));  out = h + down(silu(gate(rms(h))) * up(rms(h)))

use super::{attention_block, get_checked, HfJson, LayerCache, ModelError, Part, Result, RowCtx, TensorSource, PartWeights};
use crate::backend::Backend;
use crate::config::{Family, ModelConfig};
use crate::tensor::HostTensor;

pub fn config_from_hf(json: &serde_json::Value, file: &str) -> Result<ModelConfig> {
    let j = HfJson { json, file };
    let err = |field: &str, msg: String| ModelError::Config { file: file.into(), field: field.into(), msg };
    let hidden = j.usize("hidden_size")?;
    let n_heads = j.usize("num_attention_heads")?;
    if n_heads == 0 {
        return Err(err("num_attention_heads", "must be positive".into()));
    }
    match json.get("hidden_act") {
        None | Some(serde_json::Value::Null) => {}
        // HF's ACT2FN maps both names to SiLU.
        Some(serde_json::Value::String(act)) if act == "silu" || act == "swish" => {}
        Some(other) => return Err(err("hidden_act", format!("only \"silu\" is supported, found {other}"))),
    }
    let is_mistral = json.get("model_type").and_then(|v| v.as_str()) == Some("mistral");
    // HF's defaults: LlamaConfig 2048, MistralConfig 4096 * 32.
    let max_position = j.usize_opt("max_position_embeddings")?.unwrap_or(if is_mistral { 4096 * 32 } else { 2048 });
    // HF Llama has no sliding window whatever config.json says; MistralConfig defaults to 4096
    // when the key is absent (Mistral-7B-v0.1) and an explicit null turns it off (v0.2 on).
    let sliding_window = match (is_mistral, json.get("sliding_window")) {
        (false, _) => None,
        (true, None) => Some(4096),
        (true, Some(_)) => j.usize_opt("sliding_window")?,
    };
    // HF Mistral builds every projection without a bias; Llama reads the two flags.
    let bias_flag = |field: &str| -> Result<bool> { if is_mistral { Ok(false) } else { Ok(j.bool_opt(field)?.unwrap_or(false)) } };
    let (rope_theta, rope_scaling) = j.rope(10000.0, max_position)?;
    Ok(ModelConfig {
        family: Family::Llama,
        vocab_size: j.usize_opt("vocab_size")?.unwrap_or(32000),
        hidden_size: hidden,
        n_layers: j.usize("num_hidden_layers")?,
        n_heads,
        n_kv_heads: j.usize_opt("num_key_value_heads")?.unwrap_or(n_heads),
        head_dim: j.usize_opt("head_dim")?.unwrap_or(hidden / n_heads),
        intermediate_size: j.usize("intermediate_size")?,
        max_position,
        sliding_window,
        rope_theta,
        rope_scaling,
        norm_eps: j.f64_opt("rms_norm_eps")?.unwrap_or(1e-6),
        tied_embeddings: j.bool_opt("tie_word_embeddings")?.unwrap_or(false),
        attention_bias: bias_flag("attention_bias")?,
        mlp_bias: bias_flag("mlp_bias")?,
        falcon: None,
        bos_token_id: j.usize_opt("bos_token_id")?.map(|x| x as u32),
        eos_token_ids: j.ids("eos_token_id")?,
    })
}

pub fn expected_tensors(cfg: &ModelConfig, part: Part) -> Vec<(String, Vec<usize>)> {
    let (c, v, f, qkv) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size, cfg.qkv_dim());
    let hd = cfg.n_heads * cfg.head_dim;
    let mut out: Vec<(String, Vec<usize>)> = vec![];
    match part {
        Part::Begin => out.push(("embed.weight".into(), vec![v, c])),
        Part::End => {
            out.push(("norm.weight".into(), vec![c]));
            out.push(("lm_head.weight".into(), vec![v, c]));
        }
        Part::Layer(_) => {
            out.push(("attn_norm.weight".into(), vec![c]));
            out.push(("mlp_norm.weight".into(), vec![c]));
            out.push(("attn.qkv.weight".into(), vec![qkv, c]));
            if cfg.attention_bias {
                out.push(("attn.qkv.bias".into(), vec![qkv]));
            }
            out.push(("attn.out.weight".into(), vec![c, hd]));
            if cfg.attn_out_bias() {
                out.push(("attn.out.bias".into(), vec![c]));
            }
            for (name, rows, cols) in [("mlp.gate", f, c), ("mlp.up", f, c), ("mlp.down", c, f)] {
                out.push((format!("{name}.weight"), vec![rows, cols]));
                if cfg.mlp_bias {
                    out.push((format!("{name}.bias"), vec![rows]));
                }
            }
        }
    }
    out
}

pub fn convert_part(cfg: &ModelConfig, part: Part, src: &dyn TensorSource) -> Result<Vec<(String, HostTensor)>> {
    let (c, v, f, d) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size, cfg.head_dim);
    let (hd, kvd) = (cfg.n_heads * d, cfg.n_kv_heads * d);
    let embed = "model.embed_tokens.weight";
    let mut out = vec![];
    match part {
        Part::Begin => out.push(("embed.weight".into(), get_checked(src, embed, &[v, c])?)),
        Part::End => {
            out.push(("norm.weight".into(), get_checked(src, "model.norm.weight", &[c])?));
            let head = if cfg.tied_embeddings || !src.contains("lm_head.weight") { embed } else { "lm_head.weight" };
            out.push(("lm_head.weight".into(), get_checked(src, head, &[v, c])?));
        }
        Part::Layer(i) => {
            let p = format!("model.layers.{i}");
            out.push(("attn_norm.weight".into(), get_checked(src, &format!("{p}.input_layernorm.weight"), &[c])?));
            out.push(("mlp_norm.weight".into(), get_checked(src, &format!("{p}.post_attention_layernorm.weight"), &[c])?));
            let proj = |n: &str, suffix: &str, shape: &[usize]| get_checked(src, &format!("{p}.self_attn.{n}_proj.{suffix}"), shape);
            out.push((
                "attn.qkv.weight".into(),
                HostTensor::concat_rows(&[proj("q", "weight", &[hd, c])?, proj("k", "weight", &[kvd, c])?, proj("v", "weight", &[kvd, c])?]),
            ));
            if cfg.attention_bias {
                out.push((
                    "attn.qkv.bias".into(),
                    HostTensor::concat_rows(&[proj("q", "bias", &[hd])?, proj("k", "bias", &[kvd])?, proj("v", "bias", &[kvd])?]),
                ));
            }
            out.push(("attn.out.weight".into(), proj("o", "weight", &[c, hd])?));
            if cfg.attn_out_bias() {
                out.push(("attn.out.bias".into(), proj("o", "bias", &[c])?));
            }
            for (short, hf, shape) in [("mlp.gate", "gate_proj", [f, c]), ("mlp.up", "up_proj", [f, c]), ("mlp.down", "down_proj", [c, f])] {
                out.push((format!("{short}.weight"), get_checked(src, &format!("{p}.mlp.{hf}.weight"), &shape)?));
                if cfg.mlp_bias {
                    out.push((format!("{short}.bias"), get_checked(src, &format!("{p}.mlp.{hf}.bias"), &shape[..1])?));
                }
            }
        }
    }
    Ok(out)
}

/// x (T, C) -> (T, C)
pub fn layer_forward<B: Backend>(
    b: &B,
    cfg: &ModelConfig,
    w: &PartWeights<B>,
    x: B::Act,
    ctx: &RowCtx,
    cache: Option<&mut LayerCache<B>>,
) -> Result<B::Act> {
    let eps = cfg.norm_eps as f32;
    let attn_in = b.rms_norm(&x, w.get("attn_norm.weight")?, eps)?; // (T, C)
    let x = attention_block(b, cfg, w, &attn_in, ctx, cache, x)?; // x + attention (T, C)
    let mlp_in = b.rms_norm(&x, w.get("mlp_norm.weight")?, eps)?; // (T, C)
    let (gate, up) = (w.get("mlp.gate.weight")?, w.get("mlp.up.weight")?);
    let act = b.linear_silu_mul(&mlp_in, gate, w.opt("mlp.gate.bias"), up, w.opt("mlp.up.bias"))?; // (T, F)
    Ok(b.linear_residual(&act, w.get("mlp.down.weight")?, w.opt("mlp.down.bias"), x)?) // (T, C)
}
