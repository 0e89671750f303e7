//! Qwen2 / Qwen2.5 (`model_type: qwen2`): HF config and its defaults (transformers' Qwen2Config).
//!
//! The block is Llama's (src/model/llama.rs) with biases on the q, k and v projections and
//! none on the output projection; the config records that (`attention_bias`), so the tensor
//! table (whose GGUF q/k rows it leaves as stored) and the layer are Llama's own:
//!     h = x + attn(rms(x));  out = h + down(silu(gate(rms(h))) * up(rms(h)))
//! What is Qwen2's own is the config: rope_theta 1e6 in the checkpoints (HF's default is
//! 10000), tied heads in the small sizes, and a sliding window that is off unless
//! `use_sliding_window` is true.

use super::{HfJson, ModelError, Result};
use crate::config::{Family, ModelConfig};

pub use super::llama::{layer_forward, table};

pub fn config_from_hf(json: &serde_json::Value, file: &str) -> Result<ModelConfig> {
    let j = HfJson { json, file };
    let err = |field: &str, msg: String| ModelError::Config { file: file.into(), field: field.into(), msg };
    if let Some(act) = json.get("hidden_act").and_then(|v| v.as_str()) {
        if act != "silu" {
            return Err(err("hidden_act", format!("only \"silu\" is supported, found \"{act}\"")));
        }
    }
    if j.bool_opt("use_mrope")?.unwrap_or(false) {
        return Err(err("use_mrope", "multimodal rotary embeddings (Qwen2-VL) are not supported; expected false".into()));
    }
    let hidden = j.usize_opt("hidden_size")?.unwrap_or(4096);
    let n_heads = j.usize_opt("num_attention_heads")?.unwrap_or(32);
    if n_heads == 0 || hidden % n_heads != 0 {
        return Err(err("num_attention_heads", format!("hidden_size {hidden} is not divisible by {n_heads} heads")));
    }
    let n_layers = j.usize_opt("num_hidden_layers")?.unwrap_or(32);
    let max_position = j.usize_opt("max_position_embeddings")?.unwrap_or(32768);
    let (rope_theta, rope_scaling) = j.rope(10000.0, max_position)?;
    Ok(ModelConfig {
        family: Family::Qwen2,
        vocab_size: j.usize_opt("vocab_size")?.unwrap_or(151936),
        hidden_size: hidden,
        n_layers,
        n_heads,
        n_kv_heads: j.usize_opt("num_key_value_heads")?.unwrap_or(n_heads),
        head_dim: j.usize_opt("head_dim")?.unwrap_or(hidden / n_heads),
        intermediate_size: j.usize_opt("intermediate_size")?.unwrap_or(22016),
        max_position,
        sliding_window: sliding_window(&j, n_layers)?,
        rope_theta,
        rope_scaling,
        norm_eps: j.f64_opt("rms_norm_eps")?.unwrap_or(1e-6),
        tied_embeddings: j.bool_opt("tie_word_embeddings")?.unwrap_or(false),
        // Qwen2Attention builds q/k/v with bias=True and o_proj without, whatever the config says.
        attention_bias: true,
        mlp_bias: false,
        falcon: None,
        bos_token_id: j.usize_opt("bos_token_id")?.map(|x| x as u32),
        eos_token_ids: j.ids("eos_token_id")?,
    })
}

/// HF's rule: without `use_sliding_window` no layer has a window, whatever `sliding_window`
/// says; with it, the layers named "sliding_attention" in `layer_types` (by default those
/// from `max_window_layers` on) attend to the last `sliding_window` keys. One window for
/// every layer is what the model directory can describe; a mix is refused.
fn sliding_window(j: &HfJson, n_layers: usize) -> Result<Option<usize>> {
    let err = |field: &str, msg: String| ModelError::Config { file: j.file.into(), field: field.into(), msg };
    if !j.bool_opt("use_sliding_window")?.unwrap_or(false) {
        return Ok(None);
    }
    let window = match j.json.get("sliding_window") {
        Some(serde_json::Value::Null) => return Ok(None),
        None => 4096,
        Some(_) => j.usize("sliding_window")?,
    };
    let windowed: Vec<bool> = match j.json.get("layer_types").filter(|v| !v.is_null()) {
        Some(v) => {
            let kinds = v.as_array().ok_or_else(|| err("layer_types", format!("expected a list of strings, found {v}")))?;
            if kinds.len() != n_layers {
                return Err(err("layer_types", format!("has {} entries for {n_layers} layers", kinds.len())));
            }
            kinds
                .iter()
                .map(|k| match k.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => Err(err("layer_types", format!("expected \"full_attention\" or \"sliding_attention\", found {k}"))),
                })
                .collect::<Result<_>>()?
        }
        None => {
            let first = j.usize_opt("max_window_layers")?.unwrap_or(28);
            (0..n_layers).map(|i| i >= first).collect()
        }
    };
    match windowed.iter().filter(|&&w| w).count() {
        0 => Ok(None),
        n if n == n_layers => Ok(Some(window)),
        n => Err(err(
            "use_sliding_window",
            format!(
                "{n} of {n_layers} layers use a sliding window of {window} and the others full attention \
                 (max_window_layers / layer_types); only one window for all layers is supported"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn hub_form() -> serde_json::Value {
        // Qwen2.5-0.5B's config.json, as the Hub carries it.
        json!({
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
            "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14, "num_key_value_heads": 2,
            "num_hidden_layers": 24, "max_position_embeddings": 32768, "max_window_layers": 24,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "sliding_window": 32768, "use_sliding_window": false,
            "use_mrope": false, "tie_word_embeddings": true, "torch_dtype": "bfloat16", "vocab_size": 151936,
            "bos_token_id": 151643, "eos_token_id": 151643,
        })
    }

    fn with(mut j: serde_json::Value, key: &str, v: serde_json::Value) -> serde_json::Value {
        j[key] = v;
        j
    }

    #[test]
    fn hub_config_reads_as_hf_does() {
        let cfg = super::super::config_from_hf(&hub_form(), "config.json").unwrap();
        assert_eq!(cfg.family, Family::Qwen2);
        assert_eq!((cfg.n_heads, cfg.n_kv_heads, cfg.head_dim), (14, 2, 64));
        assert_eq!(cfg.rope_theta, 1e6);
        assert!(cfg.tied_embeddings && cfg.attention_bias && !cfg.mlp_bias);
        // use_sliding_window false: no window although sliding_window is set.
        assert_eq!(cfg.sliding_window, None);
        assert_eq!(cfg.eos_token_ids, vec![151643]);
    }

    #[test]
    fn sliding_window_follows_hfs_layer_rule() {
        let on = with(hub_form(), "use_sliding_window", json!(true));
        // max_window_layers 24 of 24 layers: no layer is windowed.
        assert_eq!(config_from_hf(&on, "c.json").unwrap().sliding_window, None);
        let all = with(on.clone(), "max_window_layers", json!(0));
        assert_eq!(config_from_hf(&all, "c.json").unwrap().sliding_window, Some(32768));
        let listed = with(on.clone(), "layer_types", json!(vec!["sliding_attention"; 24]));
        assert_eq!(config_from_hf(&listed, "c.json").unwrap().sliding_window, Some(32768));
        let mixed = with(on, "max_window_layers", json!(20));
        let e = config_from_hf(&mixed, "x/config.json").unwrap_err().to_string();
        assert!(e.contains("x/config.json") && e.contains("use_sliding_window") && e.contains("4 of 24"), "{e}");
    }

    #[test]
    fn refusals_name_the_field() {
        for (key, v, want) in [
            ("use_mrope", json!(true), "use_mrope"),
            ("hidden_act", json!("gelu"), "hidden_act"),
        ] {
            let e = config_from_hf(&with(hub_form(), key, v), "q/config.json").unwrap_err().to_string();
            assert!(e.contains("q/config.json") && e.contains(want), "{e}");
        }
    }
}
