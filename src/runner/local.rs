//! The whole model on this process: its groups run one after another, for the score job
//! (LocalScorer) and generation (LocalDecoder). The reference the pipeline is checked against.
//!
//! Shapes: T rows, C hidden, R logit rows, V vocabulary.

use super::{BatchScorer, Decoder, StepBatch};
use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::group::{score_keeping, DeviceGroup};
use crate::model::{GroupKeys, LayerCache, ModelError, PromptStore, RowCtx};
use crate::token_tree::MicroBatch;
use std::collections::VecDeque;

/// Every group on this process, run one after another; a wave is computed when submitted.
pub struct LocalScorer<'a, B: Backend> {
    pub backend: &'a B,
    pub cfg: &'a ModelConfig,
    pub groups: &'a [DeviceGroup<B>],
    /// Results of the waves submitted and not yet collected, oldest first.
    pub done: VecDeque<Vec<Vec<f64>>>,
    /// Extract's kept prompts (token_tree::Prefix).
    pub prompts: PromptStore<B>,
}

impl<'a, B: Backend> LocalScorer<'a, B> {
    /// A scorer over `groups` (the whole model, in order), nothing submitted or kept yet.
    pub fn new(backend: &'a B, cfg: &'a ModelConfig, groups: &'a [DeviceGroup<B>]) -> Self {
        LocalScorer { backend, cfg, groups, done: VecDeque::new(), prompts: PromptStore::default() }
    }
}

impl<B: Backend> BatchScorer for LocalScorer<'_, B> {
    type Error = ModelError;

    fn submit(&mut self, wave: &[MicroBatch]) -> Result<(), ModelError> {
        let out = wave.iter().map(|batch| score_keeping(self.groups, self.backend, self.cfg, batch, &mut self.prompts)).collect::<Result<_, _>>()?;
        self.done.push_back(out);
        Ok(())
    }

    fn collect(&mut self) -> Result<Vec<Vec<f64>>, ModelError> {
        self.done.pop_front().ok_or_else(|| ModelError::Unsupported("collect without a wave in flight".into()))
    }
}

/// All groups on this process, run one after another, each layer keeping its cache.
pub struct LocalDecoder<'a, B: Backend> {
    pub backend: &'a B,
    pub cfg: &'a ModelConfig,
    pub groups: &'a [DeviceGroup<B>],
    /// Per group, one cache per layer of the group.
    caches: Vec<Vec<LayerCache<B>>>,
}

impl<'a, B: Backend> LocalDecoder<'a, B> {
    pub fn new(backend: &'a B, cfg: &'a ModelConfig, groups: &'a [DeviceGroup<B>]) -> Self {
        let mut d = LocalDecoder { backend, cfg, groups, caches: vec![] };
        d.reset();
        d
    }
}

impl<B: Backend> Decoder for LocalDecoder<'_, B> {
    type Error = ModelError;

    fn step(&mut self, batch: &StepBatch) -> Result<Vec<Vec<f32>>, ModelError> {
        let b = self.backend;
        let ctx = RowCtx { positions: &batch.positions, spans: &batch.spans, cache_order: Some(&batch.cache_order) };
        let no_groups = || ModelError::Unsupported("no groups".into());
        let (last, before) = self.groups.split_last().ok_or_else(no_groups)?;
        let (last_caches, caches_before) = self.caches.split_last_mut().ok_or_else(no_groups)?;
        let first = before.first().unwrap_or(last);
        let mut x = first.embed(b, &batch.tokens)?; // (T, C)
        for (group, caches) in before.iter().zip(caches_before) {
            x = group.run_layers(b, self.cfg, x, &ctx, Some(caches))?;
        }
        let logits = last.run_logits(b, self.cfg, x, &ctx, GroupKeys::Caches(last_caches), &batch.last_rows)?; // (R, V)
        let flat = b.download(&logits)?;
        Ok(flat.chunks(self.cfg.vocab_size).map(|r| r.to_vec()).collect())
    }

    fn reset(&mut self) {
        self.caches = self.groups.iter().map(|g| (0..g.layers.len()).map(|_| LayerCache::default()).collect()).collect();
    }
}
