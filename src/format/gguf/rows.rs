//! The row rearrangements llama.cpp's converter applies, undone (which tensor has which is
//! written in each family's table, src/model/<family>.rs, beside its GGUF name).
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
//! for the layout the config describes, which Falcon's table then reads as from HF.

use crate::config::ModelConfig;
use crate::model::falcon;
use crate::model::table::GgufRows as Rows;
use crate::tensor::HostTensor;

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
