//! Llama family (Llama-2, Mistral, Yi, SmolLM): HF config, tensor table, decoder block.
//!
//! Shapes: T rows, C hidden, H query heads, KV key/value heads, D head dim, F intermediate.
//!     h = x + attn(rms(x));  out = h + down(silu(gate(rms(h))) * up(rms(h)))

use super::table::{Origin, GgufRows, Src, Table, ATTN_NORM, DOWN, EMBED, LM_HEAD, MLP_NORM, NORM, OUT, QKV, UP};
use super::weights::{Attn, Ix, PartWeights, Resolver, WeightBias};
use super::{attention_block, gather_out, HfJson, LayerKeys, ModelError, Result, RowCtx};
use crate::backend::{KvCache, Swiglu};
use crate::config::{Family, ModelConfig};

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

/// The one stem only this family's block has (the shared ones are in table.rs).
const GATE: &str = "mlp.gate";

/// Llama's tensors (Qwen2's too: its config sets the biases). GGUF names are llama.cpp's.
pub fn table(cfg: &ModelConfig) -> Table {
    let (c, v, f, qkv) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size, cfg.qkv_dim());
    let (hd, kvd) = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim);
    // llama.cpp permutes q/k rows for its rotary layout in llama files; qwen2 files keep HF's.
    let pairs = |heads| if cfg.family == Family::Llama { GgufRows::RopePairs(heads) } else { GgufRows::AsStored };
    let src = Src::new;
    let mut t = Table::default();
    let embed = src("model.embed_tokens", Some("token_embd"), &[v, c]);
    t.begin(EMBED, &[v, c], false, Origin::One(embed.clone()));
    t.end(NORM, &[c], false, Origin::One(src("model.norm", Some("output_norm"), &[c])));
    let head = if cfg.tied_embeddings { Origin::One(embed.clone()) } else { Origin::FirstOf(vec![src("lm_head", Some("output"), &[v, c]), embed]) };
    t.end(LM_HEAD, &[v, c], false, head);
    t.layer(ATTN_NORM, &[c], false, Origin::One(src("model.layers.{i}.input_layernorm", Some("blk.{i}.attn_norm"), &[c])));
    t.layer(MLP_NORM, &[c], false, Origin::One(src("model.layers.{i}.post_attention_layernorm", Some("blk.{i}.ffn_norm"), &[c])));
    let qkv_from = Origin::Stack(vec![
        src("model.layers.{i}.self_attn.q_proj", Some("blk.{i}.attn_q"), &[hd, c]).gguf_rows(pairs(cfg.n_heads)),
        src("model.layers.{i}.self_attn.k_proj", Some("blk.{i}.attn_k"), &[kvd, c]).gguf_rows(pairs(cfg.n_kv_heads)),
        src("model.layers.{i}.self_attn.v_proj", Some("blk.{i}.attn_v"), &[kvd, c]),
    ]);
    t.layer(QKV, &[qkv, c], cfg.attention_bias, qkv_from);
    t.layer(OUT, &[c, hd], cfg.attn_out_bias(), Origin::One(src("model.layers.{i}.self_attn.o_proj", Some("blk.{i}.attn_output"), &[c, hd])));
    t.layer(GATE, &[f, c], cfg.mlp_bias, Origin::One(src("model.layers.{i}.mlp.gate_proj", Some("blk.{i}.ffn_gate"), &[f, c])));
    t.layer(UP, &[f, c], cfg.mlp_bias, Origin::One(src("model.layers.{i}.mlp.up_proj", Some("blk.{i}.ffn_up"), &[f, c])));
    t.layer(DOWN, &[c, f], cfg.mlp_bias, Origin::One(src("model.layers.{i}.mlp.down_proj", Some("blk.{i}.ffn_down"), &[c, f])));
    t
}

/// A layer's weights, found once when the part is loaded.
pub struct Layer {
    attn_norm: Ix,
    mlp_norm: Ix,
    attn: Attn,
    gate: WeightBias,
    up: WeightBias,
    down: WeightBias,
}

impl Layer {
    pub(crate) fn resolve(r: &Resolver) -> Result<Layer> {
        Ok(Layer {
            attn_norm: r.weight(ATTN_NORM)?,
            mlp_norm: r.weight(MLP_NORM)?,
            attn: Attn::resolve(r)?,
            gate: r.linear(GATE)?,
            up: r.linear(UP)?,
            down: r.linear(DOWN)?,
        })
    }
}

/// x (T, C) -> (T, C), or (R, C) at rows `out` (model::layer_forward_rows)
#[allow(clippy::too_many_arguments)]
pub fn layer_forward<B: KvCache>(
    b: &B,
    cfg: &ModelConfig,
    w: &PartWeights<B>,
    l: &Layer,
    x: B::Act,
    ctx: &RowCtx,
    keys: LayerKeys<'_, B>,
    out: Option<&[u32]>,
) -> Result<B::Act> {
    let eps = cfg.norm_eps as f32;
    let attn_in = b.rms_norm(&x, w.at(l.attn_norm), eps)?; // (T, C)
    let x = attention_block(b, cfg, w.attn(l.attn), &attn_in, ctx, keys, x)?; // x + attention (T, C)
    let x = gather_out(b, x, out)?; // (T or R, C)
    let mlp_in = b.rms_norm(&x, w.at(l.mlp_norm), eps)?; // (T or R, C)
    let mlp = Swiglu { gate: w.linear(l.gate), up: w.linear(l.up), down: w.linear(l.down) };
    Ok(b.swiglu_residual(&mlp_in, mlp, x)?) // x + down(silu(gate) ⊙ up) (T or R, C)
}
