//! A group's weights on a backend and the forward pass over them: embed (begin), its layers,
//! the LM head (end). Weights arrive as a HostGroup and are uploaded, or come streamed in
//! ahead of use through the weight window (pipeline::WeightWindow).
//!
//! Shapes: T rows of a micro-batch, C hidden, S scored rows, R logit rows, V vocabulary.

use super::{GroupTensorNames, HostGroup};
use crate::backend::{KvCache, Ops, WeightStream};
use crate::config::ModelConfig;
use crate::model::{self, BatchPrompts, GroupKeys, LayerCache, ModelError, Part, PartWeights, PromptStore, RowCtx};
use crate::token_tree::{MicroBatch, ScoredRow};
use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;

/// A group on a backend: begin, one `PartWeights` per layer, end (each part's tensors typed
/// by its family).
pub struct DeviceGroup<B: Ops> {
    pub layers: Range<usize>,
    begin: Option<PartWeights<B>>,
    blocks: Vec<PartWeights<B>>,
    end: Option<PartWeights<B>>,
}

impl<B: WeightStream> DeviceGroup<B> {
    pub fn upload(b: &B, cfg: &ModelConfig, host: &HostGroup) -> Result<DeviceGroup<B>, ModelError> {
        let mut group = DeviceGroup { layers: host.layers.clone(), begin: None, blocks: vec![], end: None };
        for (part, tensors) in &host.parts {
            group.put(PartWeights::upload(b, cfg, *part, tensors)?);
            crate::liveness::advanced();
        }
        Ok(group)
    }
}

impl<B: Ops> DeviceGroup<B> {
    /// A group over weights already on the backend, in `names`' flat order (a streamed
    /// group after `WeightStream::wait`).
    pub fn from_weights(cfg: &ModelConfig, names: &GroupTensorNames, weights: Vec<B::Weight>) -> Result<DeviceGroup<B>, ModelError> {
        if weights.len() != names.len() {
            return Err(ModelError::Unsupported(format!("layers {:?}: {} weights for {} tensors", names.layers, weights.len(), names.len())));
        }
        let mut group = DeviceGroup { layers: names.layers.clone(), begin: None, blocks: vec![], end: None };
        let mut it = weights.into_iter();
        for (part, part_names) in &names.parts {
            let named = part_names.iter().cloned().zip(it.by_ref().take(part_names.len())).collect();
            group.put(PartWeights::new(cfg, *part, named)?);
        }
        Ok(group)
    }

    /// The weights back in `names`' flat order (for `WeightStream::release`).
    pub fn into_weights(self, names: &GroupTensorNames) -> Result<Vec<B::Weight>, ModelError> {
        let mut by_part: Vec<PartWeights<B>> = self.begin.into_iter().chain(self.blocks).chain(self.end).collect();
        let mut out = Vec::with_capacity(names.len());
        for (part, part_names) in &names.parts {
            let i = by_part.iter().position(|w| w.part == *part).ok_or_else(|| ModelError::Unsupported(format!("layers {:?}: part {} is not in this group", names.layers, part.name())))?;
            let mut map: HashMap<String, B::Weight> = by_part.swap_remove(i).into_named().collect();
            for name in part_names {
                out.push(map.remove(name).ok_or_else(|| ModelError::MissingTensor { part: part.name(), name: name.clone() })?);
            }
        }
        Ok(out)
    }

    fn put(&mut self, w: PartWeights<B>) {
        match w.part {
            Part::Begin => self.begin = Some(w),
            Part::Layer(_) => self.blocks.push(w),
            Part::End => self.end = Some(w),
        }
    }

    pub fn has_begin(&self) -> bool {
        self.begin.is_some()
    }

    pub fn has_end(&self) -> bool {
        self.end.is_some()
    }

    fn begin(&self) -> Result<&PartWeights<B>, ModelError> {
        self.begin.as_ref().ok_or_else(|| ModelError::Unsupported(format!("layers {:?} do not include the embeddings", self.layers)))
    }

    fn end(&self) -> Result<&PartWeights<B>, ModelError> {
        self.end.as_ref().ok_or_else(|| ModelError::Unsupported(format!("layers {:?} do not include the LM head", self.layers)))
    }

    /// ids (T,) -> hidden (T, C)
    pub fn embed(&self, b: &B, ids: &[u32]) -> Result<B::Act, ModelError> {
        model::begin_forward(b, self.begin()?, ids)
    }
}

impl<B: KvCache> DeviceGroup<B> {
    /// hidden (T, C) -> hidden (T, C) through every layer of the range. With `caches`
    /// (one per layer of the range), keys and values are appended for generation.
    pub fn run_layers(&self, b: &B, cfg: &ModelConfig, x: B::Act, ctx: &RowCtx, caches: Option<&mut [LayerCache<B>]>) -> Result<B::Act, ModelError> {
        self.run_layers_keys(b, cfg, x, ctx, caches.map_or(GroupKeys::None, GroupKeys::Caches))
    }

    /// The same with whatever keys the layers keep: with a prompt store, extract's prompts
    /// are kept and attended to under each layer's global index.
    pub fn run_layers_keys(&self, b: &B, cfg: &ModelConfig, x: B::Act, ctx: &RowCtx, keys: GroupKeys<'_, B>) -> Result<B::Act, ModelError> {
        self.run_layers_rows(b, cfg, x, ctx, keys, None)
    }

    /// The same, the group's last layer read only at rows `out` (model::layer_forward_rows):
    /// hidden (T, C) -> (R, C), row i the batch's row out[i]; without `out`, (T, C).
    pub fn run_layers_rows(
        &self,
        b: &B,
        cfg: &ModelConfig,
        mut x: B::Act,
        ctx: &RowCtx,
        mut keys: GroupKeys<'_, B>,
        out: Option<&[u32]>,
    ) -> Result<B::Act, ModelError> {
        let last = self.blocks.len().saturating_sub(1);
        for (i, w) in self.blocks.iter().enumerate() {
            let layer = match w.part {
                Part::Layer(l) => l,
                _ => self.layers.start + i,
            };
            x = model::layer_forward_rows(b, cfg, w, x, ctx, keys.layer(i, layer), out.filter(|_| i == last))?;
            crate::liveness::advanced();
        }
        Ok(x)
    }

    /// Whether this group runs the model's last layer and the head: then that layer need only
    /// be computed for the rows the head reads (`run_to_head`). Where the head is another
    /// group's, every row's hidden state travels on.
    pub fn prunes_last_layer(&self, cfg: &ModelConfig) -> bool {
        self.has_end() && cfg.n_layers > 0 && self.blocks.last().is_some_and(|w| w.part == Part::Layer(cfg.n_layers - 1))
    }

    /// hidden (T, C) through the group's layers for a head that reads `rows` of it: the
    /// hidden state and the rows of it the head reads. Where this group prunes its last
    /// layer (`prunes_last_layer`) that layer runs for `rows` only and they come out as rows
    /// 0..R, in order; otherwise all T rows and `rows` as given.
    pub fn run_to_head<'r>(
        &self,
        b: &B,
        cfg: &ModelConfig,
        x: B::Act,
        ctx: &RowCtx,
        keys: GroupKeys<'_, B>,
        rows: &'r [u32],
    ) -> Result<(B::Act, Cow<'r, [u32]>), ModelError> {
        // Every row read (a prompt of one token, a decode step): nothing to leave out. No row
        // read: the layer's kernels are not asked for empty products.
        if model::is_identity(rows, ctx.positions.len()) || rows.is_empty() || !self.prunes_last_layer(cfg) {
            return Ok((self.run_layers_keys(b, cfg, x, ctx, keys)?, Cow::Borrowed(rows)));
        }
        let x = self.run_layers_rows(b, cfg, x, ctx, keys, Some(rows))?; // (R, C)
        Ok((x, Cow::Owned((0..rows.len() as u32).collect())))
    }

    /// hidden (T, C) -> logits (R, V) at `rows`, through the group's layers and its head.
    pub fn run_logits(&self, b: &B, cfg: &ModelConfig, x: B::Act, ctx: &RowCtx, keys: GroupKeys<'_, B>, rows: &[u32]) -> Result<B::Act, ModelError> {
        let (x, at) = self.run_to_head(b, cfg, x, ctx, keys, rows)?;
        self.logits(b, cfg, &x, &at)
    }

    /// hidden (T, C) -> log p(target | row) at each scored row (S,), through the group's
    /// layers and its head.
    pub fn run_scored(&self, b: &B, cfg: &ModelConfig, x: B::Act, ctx: &RowCtx, keys: GroupKeys<'_, B>, scored: &[ScoredRow]) -> Result<Vec<f64>, ModelError> {
        let read = HeadRows::of(scored);
        let (x, at) = self.run_to_head(b, cfg, x, ctx, keys, &read.rows)?;
        self.logprobs_at(b, cfg, &x, &at, &read, scored)
    }

    /// hidden (T, C) -> logits (R, V) at `rows`.
    pub fn logits(&self, b: &B, cfg: &ModelConfig, x: &B::Act, rows: &[u32]) -> Result<B::Act, ModelError> {
        model::end_logits(b, cfg, self.end()?, x, rows)
    }

    /// hidden (T, C) -> log p(target | row) at each scored row (S,).
    pub fn scored_logprobs(&self, b: &B, cfg: &ModelConfig, x: &B::Act, scored: &[ScoredRow]) -> Result<Vec<f64>, ModelError> {
        let read = HeadRows::of(scored);
        self.logprobs_at(b, cfg, x, &read.rows, &read, scored)
    }

    /// The head at `at` (x's rows holding `read.rows`) -> log p(target) at each scored row (S,).
    fn logprobs_at(&self, b: &B, cfg: &ModelConfig, x: &B::Act, at: &[u32], read: &HeadRows, scored: &[ScoredRow]) -> Result<Vec<f64>, ModelError> {
        let targets: Vec<u32> = scored.iter().map(|s| s.target).collect();
        let logits = self.logits(b, cfg, x, at)?; // (U, V)
        let logits = if read.rows.len() < scored.len() { b.rows(&logits, &read.of)? } else { logits }; // (S, V)
        Ok(b.log_softmax_at(&logits, &targets)?)
    }

    /// A whole micro-batch through this group when it holds the entire model.
    pub fn score_batch(&self, b: &B, cfg: &ModelConfig, batch: &MicroBatch) -> Result<Vec<f64>, ModelError> {
        score_through(std::slice::from_ref(self), b, cfg, batch)
    }
}

/// The distinct rows the head reads for a pass's scored rows: it runs once per row, as every
/// choice's first target, and every first id of an extract's pass 1 (thousands), is scored at
/// the prompt's last row.
struct HeadRows {
    /// (U,) distinct rows, in first-scored order.
    rows: Vec<u32>,
    /// (S,) per scored row, its row's index in `rows`.
    of: Vec<u32>,
}

impl HeadRows {
    fn of(scored: &[ScoredRow]) -> HeadRows {
        let mut rows: Vec<u32> = vec![];
        let mut at: HashMap<u32, u32> = HashMap::new();
        let of = scored
            .iter()
            .map(|s| {
                *at.entry(s.row).or_insert_with(|| {
                    rows.push(s.row);
                    rows.len() as u32 - 1
                })
            })
            .collect();
        HeadRows { rows, of }
    }
}

/// A micro-batch through consecutive groups that together hold the whole model:
/// log p(target) at its scored rows (S,). Nothing is kept past the call.
pub fn score_through<B: KvCache>(groups: &[DeviceGroup<B>], b: &B, cfg: &ModelConfig, batch: &MicroBatch) -> Result<Vec<f64>, ModelError> {
    score_keeping(groups, b, cfg, batch, &mut PromptStore::default())
}

/// The same, `prompts` first freeing the batch's `release` documents, then keeping and
/// serving its extract prompts (token_tree::Prefix).
pub fn score_keeping<B: KvCache>(
    groups: &[DeviceGroup<B>],
    b: &B,
    cfg: &ModelConfig,
    batch: &MicroBatch,
    prompts: &mut PromptStore<B>,
) -> Result<Vec<f64>, ModelError> {
    let (first, last) = match (groups.first(), groups.last()) {
        (Some(f), Some(l)) => (f, l),
        _ => return Err(ModelError::Unsupported("no groups loaded".into())),
    };
    prompts.release(&batch.release);
    let ctx = RowCtx::of_batch(batch);
    let mut x = first.embed(b, &batch.tokens)?; // (T, C)
    for g in &groups[..groups.len() - 1] {
        x = g.run_layers_keys(b, cfg, x, &ctx, GroupKeys::Prompts(prompts, BatchPrompts::of(batch)))?;
    }
    last.run_scored(b, cfg, x, &ctx, GroupKeys::Prompts(prompts, BatchPrompts::of(batch)), &batch.scored)
}
