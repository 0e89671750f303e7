//! Falcon (7B / 40B / 180B and relatives): HF config, tensor table, decoder block.
//!
//! Shapes: T rows, C hidden, H query heads, KV key/value heads, D head dim, F = ffn_hidden_size.
//! Layer layouts (HF FalconDecoderLayer):
//!   parallel, one norm (7B, and new arch with num_ln_in_parallel_attn = 1):
//!       out = x + attn(ln(x)) + mlp(ln(x))
//!   parallel, two norms (new_decoder_architecture: 40B, 180B):
//!       out = x + attn(ln_attn(x)) + mlp(ln_mlp(x))
//!   sequential (parallel_attn = false):
//!       r = x + attn(ln(x)); out = r + mlp(ln_post(r))

use super::table::{Origin, GgufRows, Src, Table, ATTN_NORM, DOWN, EMBED, LM_HEAD, MLP_NORM, NORM, OUT, QKV, UP};
use super::weights::{Attn, Norm, PartWeights, Resolver, WeightBias};
use super::{attention_block, gather_out, HfJson, LayerKeys, ModelError, Result, RowCtx};
use crate::backend::KvCache;
use crate::config::{FalconLayout, Family, ModelConfig};

pub fn config_from_hf(json: &serde_json::Value, file: &str) -> Result<ModelConfig> {
    let j = HfJson { json, file };
    let err = |field: &str, msg: &str| ModelError::Config { file: file.into(), field: field.into(), msg: msg.into() };
    if j.bool_opt("alibi")?.unwrap_or(false) {
        return Err(err("alibi", "ALiBi position biases are not supported (only rotary Falcon models); this checkpoint uses alibi=true"));
    }
    let hidden = match j.usize_opt("hidden_size")? {
        Some(h) => h,
        None => j.usize_opt("n_embed")?.ok_or_else(|| err("hidden_size", "required field is missing"))?,
    };
    let n_heads = match j.usize_opt("num_attention_heads")? {
        Some(h) => h,
        None => j.usize_opt("n_head")?.ok_or_else(|| err("num_attention_heads", "required field is missing"))?,
    };
    let n_layers = match j.usize_opt("num_hidden_layers")? {
        Some(h) => h,
        None => j.usize_opt("n_layer")?.ok_or_else(|| err("num_hidden_layers", "required field is missing"))?,
    };
    if n_heads == 0 || hidden % n_heads != 0 {
        return Err(err("num_attention_heads", &format!("hidden_size {hidden} is not divisible by {n_heads} heads")));
    }
    let new_arch = j.bool_opt("new_decoder_architecture")?.unwrap_or(false);
    let multi_query = j.bool_opt("multi_query")?.unwrap_or(true);
    let parallel_attn = j.bool_opt("parallel_attn")?.unwrap_or(true);
    let config_kv = match j.usize_opt("num_kv_heads")? {
        Some(k) => k,
        None => j.usize_opt("n_head_kv")?.unwrap_or(n_heads),
    };
    let n_kv_heads = if new_arch || !multi_query { config_kv } else { 1 };
    let num_ln = j.usize_opt("num_ln_in_parallel_attn")?.unwrap_or(if new_arch { 2 } else { 1 });
    if new_arch && !parallel_attn {
        return Err(err("parallel_attn", "new_decoder_architecture requires parallel_attn=true (HF cannot run this layout either)"));
    }
    if new_arch && !(num_ln == 1 || num_ln == 2) {
        return Err(err("num_ln_in_parallel_attn", "expected 1 or 2"));
    }
    if let Some(act) = json.get("activation").and_then(|v| v.as_str()) {
        if act != "gelu" {
            return Err(err("activation", &format!("only \"gelu\" is supported, found \"{act}\"")));
        }
    }
    let eos = j.ids("eos_token_id")?;
    let max_position = j.usize_opt("max_position_embeddings")?.unwrap_or(2048);
    let (rope_theta, rope_scaling) = j.rope(10000.0, max_position)?;
    Ok(ModelConfig {
        family: Family::Falcon,
        vocab_size: j.usize_opt("vocab_size")?.unwrap_or(65024),
        hidden_size: hidden,
        n_layers,
        n_heads,
        n_kv_heads,
        head_dim: hidden / n_heads,
        intermediate_size: j.usize_opt("ffn_hidden_size")?.unwrap_or(4 * hidden),
        max_position,
        sliding_window: None,
        rope_theta,
        rope_scaling,
        norm_eps: j.f64_opt("layer_norm_epsilon")?.unwrap_or(1e-5),
        tied_embeddings: j.bool_opt("tie_word_embeddings")?.unwrap_or(true),
        attention_bias: false,
        mlp_bias: false,
        falcon: Some(FalconLayout {
            new_decoder_architecture: new_arch,
            parallel_attn,
            num_ln_in_parallel_attn: if new_arch { num_ln } else { 1 },
            bias: j.bool_opt("bias")?.unwrap_or(false),
        }),
        bos_token_id: j.usize_opt("bos_token_id")?.map(|x| x as u32).or(Some(11)),
        eos_token_ids: if json.get("eos_token_id").is_some() { eos } else { vec![11] },
    })
}

fn layout(cfg: &ModelConfig) -> FalconLayout {
    cfg.falcon.expect("validated falcon config carries its layout")
}

/// Which HF head block (of D rows) holds each row block of our [Q; K; V] order.
/// HF fuses q, k, v per KV group (new arch), per head (multi-head) or as [Q; k; v] (multi-query).
fn qkv_block_order(cfg: &ModelConfig) -> Vec<usize> {
    let (h, kv) = (cfg.n_heads, cfg.n_kv_heads);
    let (mut q, mut k, mut v) = (vec![], vec![], vec![]);
    let l = layout(cfg);
    if l.new_decoder_architecture {
        let r = h / kv;
        for g in 0..kv {
            let base = g * (r + 2);
            q.extend(base..base + r);
            k.push(base + r);
            v.push(base + r + 1);
        }
    } else if kv == h {
        for i in 0..h {
            q.push(3 * i);
            k.push(3 * i + 1);
            v.push(3 * i + 2);
        }
    } else {
        q.extend(0..h);
        k.push(h);
        v.push(h + 1);
    }
    q.into_iter().chain(k).chain(v).collect()
}

/// For each row of our [Q; K; V] order, the HF row it comes from.
pub(crate) fn qkv_row_order(cfg: &ModelConfig) -> Vec<usize> {
    let d = cfg.head_dim;
    qkv_block_order(cfg).into_iter().flat_map(|b| b * d..(b + 1) * d).collect()
}

/// Whether a layer of this layout has a norm of its own before the MLP.
fn has_mlp_norm(l: FalconLayout) -> bool {
    !l.parallel_attn || (l.new_decoder_architecture && l.num_ln_in_parallel_attn == 2)
}

/// Falcon's tensors. GGUF names follow gguf-py's tensor map: ln_mlp (40B/180B) and
/// input_layernorm (7B) are `attn_norm`, the norm that feeds the MLP in llama.cpp's graph;
/// ln_attn is `attn_norm_2`; llama.cpp has no sequential layout (post_attention_layernorm).
pub fn table(cfg: &ModelConfig) -> Table {
    let (c, v, f, qkv) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size, cfg.qkv_dim());
    let l = layout(cfg);
    let src = Src::new;
    let mut t = Table::default();
    let embed = src("transformer.word_embeddings", Some("token_embd"), &[v, c]);
    t.begin(EMBED, &[v, c], false, Origin::One(embed.clone()));
    t.end(NORM, &[c], true, Origin::One(src("transformer.ln_f", Some("output_norm"), &[c])));
    t.end(LM_HEAD, &[v, c], false, Origin::One(if cfg.tied_embeddings { embed } else { src("lm_head", Some("output"), &[v, c]) }));
    let norms = match (has_mlp_norm(l), l.parallel_attn) {
        (true, true) => vec![(ATTN_NORM, "transformer.h.{i}.ln_attn", Some("blk.{i}.attn_norm_2")), (MLP_NORM, "transformer.h.{i}.ln_mlp", Some("blk.{i}.attn_norm"))],
        (false, _) => vec![(ATTN_NORM, "transformer.h.{i}.input_layernorm", Some("blk.{i}.attn_norm"))],
        (true, false) => vec![(ATTN_NORM, "transformer.h.{i}.input_layernorm", Some("blk.{i}.attn_norm")), (MLP_NORM, "transformer.h.{i}.post_attention_layernorm", None)],
    };
    for (short, hf, gguf) in norms {
        t.layer(short, &[c], true, Origin::One(src(hf, gguf, &[c])));
    }
    let fused = src("transformer.h.{i}.self_attention.query_key_value", Some("blk.{i}.attn_qkv"), &[qkv, c]).gguf_rows(GgufRows::FalconQkv);
    t.layer(QKV, &[qkv, c], l.bias, Origin::Reordered(fused, qkv_row_order));
    t.layer(OUT, &[c, c], l.bias, Origin::One(src("transformer.h.{i}.self_attention.dense", Some("blk.{i}.attn_output"), &[c, c])));
    t.layer(UP, &[f, c], l.bias, Origin::One(src("transformer.h.{i}.mlp.dense_h_to_4h", Some("blk.{i}.ffn_up"), &[f, c])));
    t.layer(DOWN, &[c, f], l.bias, Origin::One(src("transformer.h.{i}.mlp.dense_4h_to_h", Some("blk.{i}.ffn_down"), &[c, f])));
    t
}

/// A layer's weights, found once when the part is loaded.
pub struct Layer {
    attn_norm: Norm,
    /// Layouts with a norm of their own before the MLP.
    mlp_norm: Option<Norm>,
    attn: Attn,
    up: WeightBias,
    down: WeightBias,
}

impl Layer {
    pub(crate) fn resolve(cfg: &ModelConfig, r: &Resolver) -> Result<Layer> {
        Ok(Layer {
            attn_norm: r.norm(ATTN_NORM)?,
            mlp_norm: if has_mlp_norm(layout(cfg)) { Some(r.norm(MLP_NORM)?) } else { None },
            attn: Attn::resolve(r)?,
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
    let parallel = layout(cfg).parallel_attn;
    let norm = |x: &B::Act, n: Norm| b.layer_norm(x, w.at(n.weight), w.at(n.bias), eps);
    let attn_in = norm(&x, l.attn_norm)?; // (T, C)
    // Parallel attention: the MLP reads the layer's input as well, so its norm (its own, or the
    // attention's) is taken before the attention is summed into x; of the rows going on only,
    // normed again from the gathered input (a norm's output may be kept narrower: model::gather_out).
    let parallel_mlp_in = match (parallel, out) {
        (true, Some(rows)) => Some(norm(&b.rows(&x, rows)?, l.mlp_norm.unwrap_or(l.attn_norm))?), // (R, C)
        (true, None) => l.mlp_norm.map(|n| norm(&x, n)).transpose()?,
        (false, _) => None,
    };
    let x = attention_block(b, cfg, w.attn(l.attn), &attn_in, ctx, keys, x)?; // x + attention (T, C)
    let x = gather_out(b, x, out)?; // (T or R, C)
    let mlp_in = match (parallel_mlp_in, l.mlp_norm) {
        (Some(m), _) => m,
        (None, None) => attn_in,
        (None, Some(n)) => norm(&x, n)?,
    }; // (T or R, C)
    let (up, up_bias) = w.linear(l.up);
    let mut up = b.linear(&mlp_in, up, up_bias)?; // (T or R, F)
    b.gelu(&mut up)?;
    let (down, down_bias) = w.linear(l.down);
    Ok(b.linear_residual(&up, down, down_bias, x)?) // (T or R, C)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(new_arch: bool, h: usize, kv: usize) -> ModelConfig {
        let json = serde_json::json!({
            "model_type": "falcon", "hidden_size": h * 2, "num_attention_heads": h, "num_hidden_layers": 1,
            "num_kv_heads": kv, "new_decoder_architecture": new_arch, "multi_query": kv == 1, "vocab_size": 10,
        });
        config_from_hf(&json, "config.json").unwrap()
    }

    #[test]
    fn qkv_order_groups_heads_by_kv_group() {
        // 4 query heads, 2 kv groups: HF blocks per group are [q q k v]
        assert_eq!(qkv_block_order(&cfg(true, 4, 2)), vec![0, 1, 4, 5, 2, 6, 3, 7]);
        // multi-head: per head [q k v]
        assert_eq!(qkv_block_order(&cfg(false, 2, 2)), vec![0, 3, 1, 4, 2, 5]);
        // multi-query: [Q.. k v] already in order
        assert_eq!(qkv_block_order(&cfg(false, 3, 1)), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn alibi_is_refused_by_name() {
        let json = serde_json::json!({"model_type": "falcon", "alibi": true});
        let e = config_from_hf(&json, "x/config.json").unwrap_err().to_string();
        assert!(e.contains("x/config.json") && e.contains("alibi"), "{e}");
    }
}
