//! HF tensor names <-> llama.cpp's GGUF names, and llama.cpp's Q/K row permutation.
//!
//! convert_hf_to_gguf.py reorders the rows of q_proj and k_proj within each head from HF's
//! rotate-half rotary layout (first half of the head, then second) to GGML's interleaved
//! layout (pairs): `w.reshape(n_head, 2, D/2, cols).swapaxes(1, 2)`. The model families
//! here use HF's layout, so those rows are put back.

use crate::config::ModelConfig;
use crate::tensor::HostTensor;

/// Where an HF tensor lives in a llama GGUF.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufName {
    pub name: String,
    /// Set for q/k projections: undo llama.cpp's permutation with this many heads.
    pub permuted_heads: Option<usize>,
}

/// The GGUF name of an HF llama tensor, or None for a name llama GGUFs do not hold.
pub fn gguf_name(hf: &str, cfg: &ModelConfig) -> Option<GgufName> {
    let plain = |n: String| Some(GgufName { name: n, permuted_heads: None });
    match hf {
        "model.embed_tokens.weight" => return plain("token_embd.weight".into()),
        "model.norm.weight" => return plain("output_norm.weight".into()),
        "lm_head.weight" => return plain("output.weight".into()),
        _ => {}
    }
    let (layer, rest) = hf.strip_prefix("model.layers.")?.split_once('.')?;
    let i: usize = layer.parse().ok()?;
    let (stem, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let (short, permuted_heads) = match stem {
        "input_layernorm" => ("attn_norm", None),
        "post_attention_layernorm" => ("ffn_norm", None),
        "self_attn.q_proj" => ("attn_q", Some(cfg.n_heads)),
        "self_attn.k_proj" => ("attn_k", Some(cfg.n_kv_heads)),
        "self_attn.v_proj" => ("attn_v", None),
        "self_attn.o_proj" => ("attn_output", None),
        "mlp.gate_proj" => ("ffn_gate", None),
        "mlp.up_proj" => ("ffn_up", None),
        "mlp.down_proj" => ("ffn_down", None),
        _ => return None,
    };
    Some(GgufName { name: format!("blk.{i}.{short}.{suffix}"), permuted_heads })
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
}
