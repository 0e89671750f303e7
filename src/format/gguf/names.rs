//! HF tensor names <-> llama.cpp's GGUF names, and the row rearrangements llama.cpp's
//! converter applies, undone.
//!
//! llama: convert_hf_to_gguf.py reorders the rows of q_proj and k_proj within each head from
//! HF's rotate-half rotary layout (first half of the head, then second) to GGML's interleaved
//! layout (pairs): `w.reshape(n_head, 2, D/2, cols).swapaxes(1, 2)`. The model families here
//! use HF's layout, so those rows are put back. Qwen2 keeps HF's layout (llama.cpp runs it
//! with NEOX rotary), so nothing is undone there.
//!
//! falcon: HF fuses q, k and v per KV group (`[q.. k v]` per group; the old multi-query
//! layout is the one-group case); llama.cpp's converter rewrites the fused rows as
//! `[all q; all k; all v]` (its "jploski" data layout). The rows are put back in HF's order
//! for the layout the config describes, which falcon::convert_part then reads as from HF.

use crate::config::{Family, ModelConfig};
use crate::model::falcon;
use crate::tensor::HostTensor;

/// How the rows of a GGUF tensor differ from the HF tensor's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rows {
    AsStored,
    /// llama q/k projections: undo the rotary pair permutation with this many heads.
    RopePairs(usize),
    /// Falcon's fused qkv: `[Q; K; V]` back to HF's per-group order.
    FalconQkv,
}

/// Where an HF tensor lives in a GGUF.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufName {
    pub name: String,
    pub rows: Rows,
}

/// The GGUF name of an HF tensor of `cfg`'s family, or None for a name such GGUFs do not hold.
pub fn gguf_name(hf: &str, cfg: &ModelConfig) -> Option<GgufName> {
    match cfg.family {
        Family::Llama | Family::Qwen2 => llama_name(hf, cfg),
        Family::Falcon => falcon_name(hf),
    }
}

fn plain(name: &str) -> Option<GgufName> {
    Some(GgufName { name: name.into(), rows: Rows::AsStored })
}

/// (layer, HF stem, "weight" | "bias") of a per-layer HF name under `prefix`.
fn layer_parts<'a>(hf: &'a str, prefix: &str) -> Option<(usize, &'a str, &'a str)> {
    let (layer, rest) = hf.strip_prefix(prefix)?.split_once('.')?;
    let i: usize = layer.parse().ok()?;
    let (stem, suffix) = rest.rsplit_once('.')?;
    (suffix == "weight" || suffix == "bias").then_some((i, stem, suffix))
}

fn llama_name(hf: &str, cfg: &ModelConfig) -> Option<GgufName> {
    match hf {
        "model.embed_tokens.weight" => return plain("token_embd.weight"),
        "model.norm.weight" => return plain("output_norm.weight"),
        "lm_head.weight" => return plain("output.weight"),
        _ => {}
    }
    let (i, stem, suffix) = layer_parts(hf, "model.layers.")?;
    let pairs = |heads: usize| if cfg.family == Family::Llama { Rows::RopePairs(heads) } else { Rows::AsStored };
    let (short, rows) = match stem {
        "input_layernorm" => ("attn_norm", Rows::AsStored),
        "post_attention_layernorm" => ("ffn_norm", Rows::AsStored),
        "self_attn.q_proj" => ("attn_q", pairs(cfg.n_heads)),
        "self_attn.k_proj" => ("attn_k", pairs(cfg.n_kv_heads)),
        "self_attn.v_proj" => ("attn_v", Rows::AsStored),
        "self_attn.o_proj" => ("attn_output", Rows::AsStored),
        "mlp.gate_proj" => ("ffn_gate", Rows::AsStored),
        "mlp.up_proj" => ("ffn_up", Rows::AsStored),
        "mlp.down_proj" => ("ffn_down", Rows::AsStored),
        _ => return None,
    };
    Some(GgufName { name: format!("blk.{i}.{short}.{suffix}"), rows })
}

/// gguf-py's tensor map for Falcon: ln_mlp (40B/180B) and input_layernorm (7B) are
/// `attn_norm`, the norm that feeds the MLP in llama.cpp's graph; ln_attn is `attn_norm_2`.
fn falcon_name(hf: &str) -> Option<GgufName> {
    match hf {
        "transformer.word_embeddings.weight" => return plain("token_embd.weight"),
        "transformer.ln_f.weight" => return plain("output_norm.weight"),
        "transformer.ln_f.bias" => return plain("output_norm.bias"),
        "lm_head.weight" => return plain("output.weight"),
        _ => {}
    }
    let (i, stem, suffix) = layer_parts(hf, "transformer.h.")?;
    let (short, rows) = match stem {
        "input_layernorm" | "ln_mlp" => ("attn_norm", Rows::AsStored),
        "ln_attn" => ("attn_norm_2", Rows::AsStored),
        "self_attention.query_key_value" => ("attn_qkv", Rows::FalconQkv),
        "self_attention.dense" => ("attn_output", Rows::AsStored),
        "mlp.dense_h_to_4h" => ("ffn_up", Rows::AsStored),
        "mlp.dense_4h_to_h" => ("ffn_down", Rows::AsStored),
        _ => return None,
    };
    Some(GgufName { name: format!("blk.{i}.{short}.{suffix}"), rows })
}

/// `t` (as stored in the GGUF) with its rows in HF's order; None when its rows do not split
/// as `rows` needs.
pub fn to_hf_rows(t: HostTensor, rows: Rows, cfg: &ModelConfig) -> Option<HostTensor> {
    match rows {
        Rows::AsStored => Some(t),
        Rows::RopePairs(heads) => unpermute(&t, heads),
        Rows::FalconQkv => {
            if t.shape.first() != Some(&cfg.qkv_dim()) {
                return None;
            }
            // falcon's order lists, for each of our [Q; K; V] rows, the HF row it came from,
            // which is also where the GGUF's [Q; K; V] row goes back to.
            let to_ours = falcon::qkv_row_order(cfg);
            let mut to_hf = vec![0; to_ours.len()];
            for (ours, &hf) in to_ours.iter().enumerate() {
                to_hf[hf] = ours;
            }
            Some(t.select_rows(&to_hf))
        }
    }
}

/// Row order (for `HostTensor::select_rows`) mapping llama.cpp's layout back to HF's;
/// None when the rows do not split into `n_head` heads of even size.
pub fn unpermute_order(rows: usize, n_head: usize) -> Option<Vec<usize>> {
    let d = rows.checked_div(n_head).filter(|d| d * n_head == rows && d % 2 == 0)?;
    let half = d / 2;
    let mut order = vec![0; rows];
    for h in 0..n_head {
        for i in 0..2 {
            for j in 0..half {
                // HF row (h, i, j) was written to GGUF row (h, j, i).
                order[h * d + i * half + j] = h * d + 2 * j + i;
            }
        }
    }
    Some(order)
}

/// The inverse of `unpermute_order`: what llama.cpp's converter does (used to test the undo).
pub fn permute_order(rows: usize, n_head: usize) -> Option<Vec<usize>> {
    let forward = unpermute_order(rows, n_head)?;
    let mut inverse = vec![0; rows];
    for (hf_row, &gguf_row) in forward.iter().enumerate() {
        inverse[gguf_row] = hf_row;
    }
    Some(inverse)
}

/// `t` with llama.cpp's Q/K permutation undone along its rows.
pub fn unpermute(t: &HostTensor, n_head: usize) -> Option<HostTensor> {
    let rows = *t.shape.first()?;
    Some(t.select_rows(&unpermute_order(rows, n_head)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_are_inverse_permutations() {
        let (fwd, inv) = (unpermute_order(24, 3).unwrap(), permute_order(24, 3).unwrap());
        for k in 0..24 {
            assert_eq!(fwd[inv[k]], k);
        }
        assert_eq!(&fwd[..8], &[0, 2, 4, 6, 1, 3, 5, 7]);
        assert!(unpermute_order(24, 5).is_none());
        assert!(unpermute_order(6, 2).is_none());
    }

    /// llama.cpp's rewrite of HF's fused rows, as convert_hf_to_gguf.py states it: view the
    /// rows as (KV groups, H/KV + 2 heads, D) and take every group's queries, then every
    /// group's key, then every group's value. Returns HF row indices in GGUF order.
    fn llama_cpp_falcon_rows(h: usize, kv: usize, d: usize) -> Vec<usize> {
        let per = h / kv + 2;
        let hf_row = |g: usize, slot: usize, r: usize| (g * per + slot) * d + r;
        let mut out = vec![];
        for g in 0..kv {
            for slot in 0..per - 2 {
                out.extend((0..d).map(|r| hf_row(g, slot, r)));
            }
        }
        for slot in [per - 2, per - 1] {
            for g in 0..kv {
                out.extend((0..d).map(|r| hf_row(g, slot, r)));
            }
        }
        out
    }

    #[test]
    fn falcon_qkv_goes_back_to_hf_rows() {
        // grouped (new architecture, 4 heads / 2 kv) and per-head (old multi-head) layouts
        for new_arch in [true, false] {
            let cfg = crate::testing::falcon_config(1, new_arch, true, false).unwrap();
            let (h, kv, d) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
            let rows = cfg.qkv_dim();
            let hf: Vec<f32> = (0..rows).map(|r| r as f32).collect();
            let gguf: Vec<f32> = llama_cpp_falcon_rows(h, kv, d).into_iter().map(|r| hf[r]).collect();
            let back = to_hf_rows(HostTensor::from_f32(vec![rows], &gguf), Rows::FalconQkv, &cfg).unwrap();
            assert_eq!(back.to_f32(), hf, "new_arch={new_arch}");
            assert!(to_hf_rows(HostTensor::from_f32(vec![rows - 1], &gguf[1..]), Rows::FalconQkv, &cfg).is_none());
        }
    }
}
