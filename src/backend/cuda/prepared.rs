//! Row data every layer of a micro-batch reads again (rotary positions and frequencies,
//! attention spans with their tile plan), uploaded once per micro-batch instead of once per
//! layer: each op finds its host data by content among the last few uploads.
//!
//! By content, not through a handle the model passes: the Backend trait and the callers
//! that build a micro-batch's rows stay as they are, and comparing a few KB of host memory
//! costs far less than an upload. Device copies are never written after upload, so an
//! equal key always means equal device data.

use super::attn_plan::plan_tiles;
use super::kernels::{ATTN_BLOCK_ROWS, ATTN_TILE_KEYS};
use super::{CudaBackend, Result};
use crate::token_tree::AttnSpan;
use cudarc::driver::CudaSlice;
use std::sync::{Arc, Mutex};

/// Uploads kept per kind: two waves in flight each alternate a prefill micro-batch with
/// decode steps, so a few entries keep every live one.
const KEEP: usize = 4;

/// The most recently used values by key, newest first.
struct Recent<V> {
    entries: Vec<(Vec<u32>, Arc<V>)>,
}

impl<V> Recent<V> {
    fn get_or_make(&mut self, key: &[u32], make: impl FnOnce() -> Result<V>) -> Result<Arc<V>> {
        if let Some(i) = self.entries.iter().position(|(k, _)| k.as_slice() == key) {
            let hit = self.entries.remove(i);
            let v = hit.1.clone();
            self.entries.insert(0, hit);
            return Ok(v);
        }
        let v = Arc::new(make()?);
        self.entries.insert(0, (key.to_vec(), v.clone()));
        // Dropping an evicted buffer frees it after the kernels queued to read it (cudarc
        // orders the free after the buffer's recorded reads).
        self.entries.truncate(KEEP);
        Ok(v)
    }
}

impl<V> Default for Recent<V> {
    fn default() -> Self {
        Recent { entries: vec![] }
    }
}

/// Attention's per-row device data for one (spans, key_offset, group size).
pub(crate) struct AttnRows {
    /// (T, 5) shared_start, shared_end, path_start, path_end, own_start
    pub spans: CudaSlice<u32>,
    /// (blocks + 1)
    pub tile_off: CudaSlice<u32>,
    /// (tiles,)
    pub tile_start: CudaSlice<u32>,
    pub blocks: usize,
}

#[derive(Default)]
pub(crate) struct Prepared {
    positions: Mutex<Recent<CudaSlice<u32>>>,
    freqs: Mutex<Recent<CudaSlice<f32>>>,
    attn: Mutex<Recent<AttnRows>>,
}

fn poisoned(what: &str) -> super::BackendError {
    super::BackendError::Device(format!("{what}: a thread panicked while holding the upload cache"))
}

impl Prepared {
    /// (T,) rotary positions on the device.
    pub fn positions(&self, b: &CudaBackend, positions: &[u32]) -> Result<Arc<CudaSlice<u32>>> {
        let mut m = self.positions.lock().map_err(|_| poisoned("rope positions"))?;
        m.get_or_make(positions, || b.upload_u32(positions, "rope positions"))
    }

    /// (D/2,) rotary inverse frequencies on the device.
    pub fn freqs(&self, b: &CudaBackend, inv_freq: &[f32]) -> Result<Arc<CudaSlice<f32>>> {
        let key: Vec<u32> = inv_freq.iter().map(|f| f.to_bits()).collect();
        let mut m = self.freqs.lock().map_err(|_| poisoned("rope frequencies"))?;
        m.get_or_make(&key, || b.upload_f32(inv_freq, "rope frequencies"))
    }

    /// Spans (checked by the caller) and the tile plan for `group` query heads per KV head.
    pub fn attention(&self, b: &CudaBackend, spans: &[AttnSpan], key_offset: usize, group: usize) -> Result<Arc<AttnRows>> {
        let mut key = Vec::with_capacity(spans.len() * 5 + 2);
        for s in spans {
            key.extend_from_slice(&[s.shared_start, s.shared_end, s.path_start, s.path_end, s.own_start]);
        }
        let flat_len = key.len();
        // Both fit u32: the caller checked key_offset + T against the key rows it indexes.
        key.extend_from_slice(&[key_offset as u32, group as u32]);
        let mut m = self.attn.lock().map_err(|_| poisoned("attention spans"))?;
        m.get_or_make(&key, || {
            let plan = plan_tiles(spans, key_offset, group, ATTN_BLOCK_ROWS, ATTN_TILE_KEYS);
            Ok(AttnRows {
                spans: b.upload_u32(&key[..flat_len], "attention spans")?,
                tile_off: b.upload_u32(&plan.offsets, "attention tile offsets")?,
                tile_start: b.upload_u32(&plan.starts, "attention tiles")?,
                blocks: plan.blocks(),
            })
        })
    }
}
