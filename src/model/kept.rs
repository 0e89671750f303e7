//! Extract's kept prompts: a rank's keys and values (after rope) of the prompt rows of the
//! documents whose search is under way, per layer it runs and per document, so a document's
//! later passes send only their branch rows (token_tree::Prefix). The job's driver decides
//! what is kept and when it is freed; this store only holds it.
//!
//! Shapes: P prompt rows, KV·D key (or value) columns.

use super::{LayerCache, ModelError, Result};
use crate::backend::{KvCache, Ops};
use crate::token_tree::{MicroBatch, Prefix};
use std::collections::{BTreeMap, HashMap};

/// One layer's kept prompts, by corpus index of the document: (keys, values), each (P, KV·D).
pub struct LayerPrompts<B: Ops> {
    layer: usize,
    docs: HashMap<usize, (B::Act, B::Act)>,
}

impl<B: Ops> LayerPrompts<B> {
    pub fn keep(&mut self, doc: usize, k: B::Act, v: B::Act) {
        self.docs.insert(doc, (k, v));
    }

    /// Document `doc`'s kept (keys, values), which must hold `len` rows.
    pub fn get(&self, b: &B, doc: usize, len: usize) -> Result<&(B::Act, B::Act)> {
        let kept = self.docs.get(&doc).ok_or(ModelError::PromptNotKept { doc, layer: self.layer })?;
        let rows = b.dims(&kept.0).0;
        if rows != len {
            return Err(ModelError::PromptLength { doc, layer: self.layer, kept: rows, expected: len });
        }
        Ok(kept)
    }
}

/// A rank's kept prompts, keyed by global layer index, so a rank cycling several layer groups
/// (weight streaming) finds each group's own.
pub struct PromptStore<B: Ops> {
    layers: BTreeMap<usize, LayerPrompts<B>>,
}

impl<B: Ops> Default for PromptStore<B> {
    fn default() -> Self {
        PromptStore { layers: BTreeMap::new() }
    }
}

impl<B: Ops> PromptStore<B> {
    pub fn layer_mut(&mut self, layer: usize) -> &mut LayerPrompts<B> {
        self.layers.entry(layer).or_insert_with(|| LayerPrompts { layer, docs: HashMap::new() })
    }

    /// Frees every layer's kept prompt of each of `docs` (a document kept nowhere is skipped).
    pub fn release(&mut self, docs: &[usize]) {
        for l in self.layers.values_mut() {
            for d in docs {
                l.docs.remove(d);
            }
        }
        self.layers.retain(|_, l| !l.docs.is_empty());
    }

    /// Frees everything (the job ended or was aborted).
    pub fn clear(&mut self) {
        self.layers.clear();
    }

    /// Documents kept on at least one layer.
    pub fn documents(&self) -> usize {
        let mut docs: Vec<usize> = self.layers.values().flat_map(|l| l.docs.keys().copied()).collect();
        docs.sort_unstable();
        docs.dedup();
        docs.len()
    }

    /// Key rows held, summed over layers (each has as many value rows).
    pub fn rows(&self, b: &B) -> usize {
        self.layers.values().flat_map(|l| l.docs.values()).map(|(k, _)| b.dims(k).0).sum()
    }
}

/// A micro-batch's documents (corpus indexes) and how each one's prompt is attended.
#[derive(Clone, Copy)]
pub struct BatchPrompts<'a> {
    pub docs: &'a [usize],
    pub prefix: &'a [Prefix],
}

impl<'a> BatchPrompts<'a> {
    pub fn of(b: &'a MicroBatch) -> BatchPrompts<'a> {
        BatchPrompts { docs: &b.docs, prefix: &b.prefix }
    }
}

/// What a layer keeps beyond its call: nothing, generation's cache, or extract's kept prompts
/// with the batch's use of them.
pub enum LayerKeys<'a, B: KvCache> {
    None,
    Cache(&'a mut LayerCache<B>),
    Prompts(&'a mut LayerPrompts<B>, BatchPrompts<'a>),
}

/// The same for a group's layers: one cache per layer of the group, or the rank's store.
pub enum GroupKeys<'a, B: KvCache> {
    None,
    Caches(&'a mut [LayerCache<B>]),
    Prompts(&'a mut PromptStore<B>, BatchPrompts<'a>),
}

impl<B: KvCache> GroupKeys<'_, B> {
    /// The keys of the group's `i`-th layer, global layer `layer`.
    pub fn layer(&mut self, i: usize, layer: usize) -> LayerKeys<'_, B> {
        match self {
            GroupKeys::None => LayerKeys::None,
            GroupKeys::Caches(c) => c.get_mut(i).map_or(LayerKeys::None, LayerKeys::Cache),
            GroupKeys::Prompts(s, batch) => LayerKeys::Prompts(s.layer_mut(layer), *batch),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    #[test]
    fn kept_rows_are_found_by_layer_and_document_and_freed() {
        let b = CpuBackend::new();
        let m = |rows: usize| b.upload(&vec![0.5; rows * 4], rows, 4).unwrap(); // (rows, KV·D)
        let mut s = PromptStore::<CpuBackend>::default();
        for layer in [3, 7] {
            s.layer_mut(layer).keep(1, m(5), m(5));
            s.layer_mut(layer).keep(2, m(2), m(2));
        }
        assert_eq!((s.documents(), s.rows(&b)), (2, 14));
        assert!(s.layer_mut(7).get(&b, 1, 5).is_ok());
        assert!(matches!(s.layer_mut(7).get(&b, 1, 4), Err(ModelError::PromptLength { doc: 1, layer: 7, kept: 5, expected: 4 })));
        assert!(matches!(s.layer_mut(4).get(&b, 1, 5), Err(ModelError::PromptNotKept { doc: 1, layer: 4 })));
        s.release(&[1, 9]);
        assert_eq!((s.documents(), s.rows(&b)), (1, 4));
        assert!(matches!(s.layer_mut(3).get(&b, 1, 5), Err(ModelError::PromptNotKept { doc: 1, layer: 3 })));
        s.release(&[2]);
        assert_eq!((s.documents(), s.rows(&b), s.layers.len()), (0, 0, 0));
    }
}
