//! RoPE's cos and sin per position, kept for the layers that follow: every layer of a
//! micro-batch rotates the same positions by the same frequencies, and two libm calls per
//! (position, frequency) in each of them cost more than the rotation itself.
//!
//! Shapes: T positions, D head dim (D/2 frequencies).

use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Tables kept: the micro-batches of a wave (4 per rank by default) go through a layer one after
/// another, each with its own positions, then through the next layer in the same order.
const KEPT: usize = 8;

/// cos and sin of `positions` × `inv_freq`.
pub(super) struct RopeTable {
    positions: Vec<u32>,
    inv_freq: Vec<f32>,
    /// (T, D): per position, cos of each frequency (D/2) then sin (D/2).
    values: Vec<f32>,
}

impl RopeTable {
    fn new(positions: &[u32], inv_freq: &[f32]) -> RopeTable {
        let half = inv_freq.len();
        let mut values = vec![0f32; positions.len() * 2 * half];
        if half > 0 {
            values.par_chunks_mut(2 * half).zip(positions).for_each(|(row, &pos)| {
                let (cos, sin) = row.split_at_mut(half);
                for ((c, s), f) in cos.iter_mut().zip(sin).zip(inv_freq) {
                    (*s, *c) = (pos as f32 * f).sin_cos();
                }
            });
        }
        RopeTable { positions: positions.to_vec(), inv_freq: inv_freq.to_vec(), values }
    }

    /// (cos, sin) of row t's position, D/2 each.
    pub(super) fn row(&self, t: usize) -> (&[f32], &[f32]) {
        let half = self.inv_freq.len();
        self.values[t * 2 * half..][..2 * half].split_at(half)
    }
}

/// The most recently used tables, newest first.
#[derive(Default)]
pub(super) struct RopeTables {
    recent: Mutex<Vec<Arc<RopeTable>>>,
}

impl RopeTables {
    /// The table of `positions` and `inv_freq`: a kept one with the same values, or a new one.
    pub(super) fn get(&self, positions: &[u32], inv_freq: &[f32]) -> Arc<RopeTable> {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = recent.iter().position(|t| t.positions == positions && t.inv_freq == inv_freq) {
            let table = recent.remove(i);
            recent.insert(0, table.clone());
            return table;
        }
        let table = Arc::new(RopeTable::new(positions, inv_freq));
        recent.insert(0, table.clone());
        recent.truncate(KEPT);
        table
    }
}
