//! The attention kernel's tile plan: for each block of (query row, head) pairs, the key tiles
//! some row of the block attends. Tiles a token tree masks for the whole block (other
//! documents, sibling choices) are never loaded; the kernel masks keys within a tile.
//!
//! Host-only and independent of the device, so it is unit-tested on any machine.

use crate::token_tree::AttnSpan;

/// Block b's tiles are `starts[offsets[b] .. offsets[b + 1]]`; a tile is keys
/// `[start, start + tile)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TilePlan {
    /// (n_blocks + 1)
    pub offsets: Vec<u32>,
    /// (tiles,)
    pub starts: Vec<u32>,
}

impl TilePlan {
    pub fn blocks(&self) -> usize {
        self.offsets.len() - 1
    }
}

/// Plans the kernel's blocks over `spans.len() * group` (query row, head of the group) pairs
/// in row-major order, `block_rows` pairs a block (kernels/attention.cu FA_BM), tiles of
/// `tile` keys (FA_BK). Row t's own keys end at t + key_offset.
pub fn plan_tiles(spans: &[AttnSpan], key_offset: usize, group: usize, block_rows: usize, tile: usize) -> TilePlan {
    let pairs = spans.len() * group;
    let n_blocks = pairs.div_ceil(block_rows);
    let mut offsets = Vec::with_capacity(n_blocks + 1);
    let mut starts = vec![];
    offsets.push(0);
    // (start, end) key intervals of one block, reused.
    let mut iv: Vec<(usize, usize)> = vec![];
    for b in 0..n_blocks {
        let t_lo = b * block_rows / group;
        let t_hi = ((b + 1) * block_rows).min(pairs).saturating_sub(1) / group;
        iv.clear();
        for (t, s) in spans.iter().enumerate().take(t_hi + 1).skip(t_lo) {
            if s.shared_end > s.shared_start {
                iv.push((s.shared_start as usize, s.shared_end as usize));
            }
            if s.path_end > s.path_start {
                iv.push((s.path_start as usize, s.path_end as usize));
            }
            iv.push((s.own_start as usize, t + key_offset + 1));
        }
        iv.sort_unstable();
        // Greedy cover: each tile starts at the first attended key past the previous tile.
        let mut covered = 0usize;
        for &(a, e) in iv.iter().filter(|(a, e)| a < e) {
            let mut k = a.max(covered);
            while k < e {
                starts.push(k as u32);
                k += tile;
            }
            covered = covered.max(k);
        }
        offsets.push(starts.len() as u32);
    }
    TilePlan { offsets, starts }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token_tree::{MicroBatch, TokenizedDoc};

    /// Every key any row of a block attends lies in one of its tiles, and no tile of a block
    /// is attended by none of its rows.
    fn check(spans: &[AttnSpan], ko: usize, group: usize, bm: usize, bk: usize) -> TilePlan {
        let p = plan_tiles(spans, ko, group, bm, bk);
        assert_eq!(p.blocks(), (spans.len() * group).div_ceil(bm));
        for b in 0..p.blocks() {
            let tiles = &p.starts[p.offsets[b] as usize..p.offsets[b + 1] as usize];
            let rows: Vec<usize> = (b * bm..((b + 1) * bm).min(spans.len() * group)).map(|m| m / group).collect();
            for &t in &rows {
                for key in 0..t + ko + 1 {
                    if spans[t].attends((t + ko) as u32, key as u32) {
                        assert!(tiles.iter().any(|&s| (s as usize..s as usize + bk).contains(&key)), "block {b} row {t} key {key} uncovered");
                    }
                }
            }
            for &s in tiles {
                let used = rows.iter().any(|&t| (s as usize..s as usize + bk).any(|k| spans[t].attends((t + ko) as u32, k as u32)));
                assert!(used, "block {b}: tile at {s} attended by no row");
            }
        }
        p
    }

    #[test]
    fn covers_token_trees_and_skips_what_they_mask() {
        let docs: Vec<TokenizedDoc> = (0..4)
            .map(|i| TokenizedDoc {
                index: i,
                id: format!("{i}"),
                prompt: (0..(40 + 70 * i as u32)).collect(),
                choices: vec![vec![1; 45], vec![2], vec![3; 50]],
            })
            .collect();
        let b = MicroBatch::build(&docs);
        for group in [1, 3, 29] {
            check(&b.spans, 0, group, 64, 32);
        }
        // 64 rows a block, group 1: a block inside the third choice of a document never loads
        // the second choice's keys, nor another document's.
        let p = check(&b.spans, 0, 1, 16, 32);
        let total: usize = p.blocks();
        let dense: usize = (0..total).map(|blk| (blk * 16 + 16).min(b.rows()).div_ceil(32)).sum();
        assert!(p.starts.len() < dense, "{} tiles planned, {dense} without skipping", p.starts.len());
    }

    #[test]
    fn causal_rows_with_a_cache_and_partial_last_block() {
        let spans = vec![AttnSpan::causal(0); 100];
        let p = check(&spans, 45, 1, 64, 32);
        // block 1: rows 64..99 attend keys 0..=144: ceil(145 / 32) tiles
        assert_eq!(p.offsets[2] - p.offsets[1], 5);
        check(&spans, 0, 7, 64, 32);
        assert_eq!(plan_tiles(&[], 0, 3, 64, 32), TilePlan { offsets: vec![0], starts: vec![] });
    }
}
