//! Extract's kept rows: a rank's keys and values (after rope) of the documents whose search
//! is under way, per layer it runs and per document: the prompt, then every branch row of the
//! later passes in the order they were sent, so a document's next pass sends only its new
//! rows and attends to its prompt and its branches' paths here (token_tree::Prefix). The
//! job's driver decides what is kept and when it is freed; this store only holds it.
//!
//! Shapes: R kept rows of a document, KV·D key (or value) columns.

use super::{LayerCache, ModelError, Result};
use crate::backend::{KvCache, Ops};
use crate::token_tree::{MicroBatch, Prefix};
use std::collections::{BTreeMap, HashMap};

/// One layer's kept rows, by corpus index of the document: (keys, values), each (R, KV·D).
pub struct LayerPrompts<B: Ops> {
    layer: usize,
    docs: HashMap<usize, (B::Act, B::Act)>,
}

impl<B: Ops> LayerPrompts<B> {
    /// Keeps `k` and `v` (n, KV·D) as document `doc`'s rows from `at` on: at 0 its first
    /// rows (whatever was kept for it before is dropped), else after the `at` it holds.
    pub fn keep(&mut self, b: &B, doc: usize, at: usize, k: B::Act, v: B::Act) -> Result<()> {
        if at == 0 {
            self.docs.insert(doc, (k, v));
            return Ok(());
        }
        let (ok, ov) = self.docs.get(&doc).ok_or(ModelError::PromptNotKept { doc, layer: self.layer })?;
        let kept = b.dims(ok).0;
        if kept != at {
            return Err(ModelError::KeptRows { doc, layer: self.layer, kept, wanted: at });
        }
        let joined = (b.concat_rows(ok, &k)?, b.concat_rows(ov, &v)?); // (R + n, KV·D) each
        self.docs.insert(doc, joined);
        Ok(())
    }

    /// Document `doc`'s kept (keys, values) rows of `runs` ([a, b) each, in order), each
    /// (Σ b - a, KV·D).
    pub fn gather(&self, b: &B, doc: usize, runs: &[(u32, u32)]) -> Result<(B::Act, B::Act)> {
        let (k, v) = self.docs.get(&doc).ok_or(ModelError::PromptNotKept { doc, layer: self.layer })?;
        let kept = b.dims(k).0;
        if let Some(&(_, end)) = runs.iter().find(|&&(a, e)| a > e || e as usize > kept) {
            return Err(ModelError::KeptRows { doc, layer: self.layer, kept, wanted: end as usize });
        }
        let rows: Vec<u32> = runs.iter().flat_map(|&(a, e)| a..e).collect();
        Ok((b.rows(k, &rows)?, b.rows(v, &rows)?))
    }
}

/// A rank's kept rows, keyed by global layer index, so a rank cycling several layer groups
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

    /// Frees every layer's kept rows of each of `docs` (a document kept nowhere is skipped).
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
    fn kept_rows_are_found_by_layer_and_document_appended_and_freed() {
        let b = CpuBackend::new();
        let m = |rows: usize, x: f32| b.upload(&vec![x; rows * 4], rows, 4).unwrap(); // (rows, KV·D)
        let mut s = PromptStore::<CpuBackend>::default();
        for layer in [3, 7] {
            s.layer_mut(layer).keep(&b, 1, 0, m(5, 0.5), m(5, 0.5)).unwrap();
            s.layer_mut(layer).keep(&b, 2, 0, m(2, 0.5), m(2, 0.5)).unwrap();
        }
        assert_eq!((s.documents(), s.rows(&b)), (2, 14));
        // Rows appended after the 5 kept, and gathered by runs across both.
        s.layer_mut(7).keep(&b, 1, 5, m(2, 2.0), m(2, 2.0)).unwrap();
        let (k, _) = s.layer_mut(7).gather(&b, 1, &[(0, 1), (5, 7)]).unwrap();
        assert_eq!(b.download(&k).unwrap().chunks(4).map(|r| r[0]).collect::<Vec<_>>(), [0.5, 2.0, 2.0]);
        assert!(matches!(s.layer_mut(7).keep(&b, 1, 5, m(1, 1.0), m(1, 1.0)), Err(ModelError::KeptRows { doc: 1, layer: 7, kept: 7, wanted: 5 })));
        assert!(matches!(s.layer_mut(7).gather(&b, 1, &[(0, 8)]), Err(ModelError::KeptRows { doc: 1, layer: 7, kept: 7, wanted: 8 })));
        assert!(matches!(s.layer_mut(4).gather(&b, 1, &[(0, 5)]), Err(ModelError::PromptNotKept { doc: 1, layer: 4 })));
        s.release(&[1, 9]);
        assert_eq!((s.documents(), s.rows(&b)), (1, 4));
        assert!(matches!(s.layer_mut(3).gather(&b, 1, &[(0, 5)]), Err(ModelError::PromptNotKept { doc: 1, layer: 3 })));
        s.release(&[2]);
        assert_eq!((s.documents(), s.rows(&b), s.layers.len()), (0, 0, 0));
    }
}
