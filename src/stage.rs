//! A layer range as a module: the weights of layers a..b (with begin/end when in range) and
//! the forward pass over them. Weights arrive as a HostGroup (host memory) and are uploaded
//! to a backend; the pipeline decides when (resident, or streamed in ahead of use).
//!
//! Shapes: T rows of a micro-batch, C hidden, S scored rows, V vocabulary.

use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::layout::{MicroBatch, ScoredRow};
use crate::model::{self, LayerCache, ModelError, Part, RowCtx, Weights};
use crate::tensor::HostTensor;
use std::ops::Range;

/// The parts of a layer range: begin goes with layer 0, end with the last layer.
pub fn parts_of(layers: &Range<usize>, n_layers: usize) -> Vec<Part> {
    let mut parts = vec![];
    if layers.start == 0 {
        parts.push(Part::Begin);
    }
    parts.extend(layers.clone().map(Part::Layer));
    if layers.end == n_layers {
        parts.push(Part::End);
    }
    parts
}

/// A layer range's weights in host memory, part by part.
pub struct HostGroup {
    pub layers: Range<usize>,
    pub parts: Vec<(Part, Vec<(String, HostTensor)>)>,
}

impl HostGroup {
    /// Read every part of `layers` with `read` (a model directory's reader).
    pub fn read<E>(layers: Range<usize>, n_layers: usize, mut read: impl FnMut(Part) -> Result<Vec<(String, HostTensor)>, E>) -> Result<HostGroup, E> {
        let mut parts = vec![];
        for part in parts_of(&layers, n_layers) {
            parts.push((part, read(part)?));
        }
        Ok(HostGroup { layers, parts })
    }

    /// Read the parts of `layers` from a model directory (only those files are opened).
    pub fn from_dir(dir: &crate::format::model_dir::ModelDir, layers: Range<usize>) -> crate::format::Result<HostGroup> {
        let n_layers = dir.config().n_layers;
        HostGroup::read(layers, n_layers, |p| dir.read_part(p))
    }

    pub fn bytes(&self) -> usize {
        self.parts.iter().flat_map(|(_, ts)| ts.iter().map(|(_, t)| t.data.len())).sum()
    }

    /// The tensors in one flat order (what a backend pins), and the layout naming them.
    pub fn split(self) -> (GroupLayout, Vec<HostTensor>) {
        let mut parts = vec![];
        let mut tensors = vec![];
        for (part, ts) in self.parts {
            let (names, ts): (Vec<String>, Vec<HostTensor>) = ts.into_iter().unzip();
            parts.push((part, names));
            tensors.extend(ts);
        }
        (GroupLayout { layers: self.layers, parts }, tensors)
    }
}

/// Names of a group's tensors in their flat (pinned) order, part by part.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupLayout {
    pub layers: Range<usize>,
    pub parts: Vec<(Part, Vec<String>)>,
}

impl GroupLayout {
    pub fn len(&self) -> usize {
        self.parts.iter().map(|(_, n)| n.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct Stage<B: Backend> {
    pub layers: Range<usize>,
    begin: Option<Weights<B>>,
    blocks: Vec<Weights<B>>,
    end: Option<Weights<B>>,
}

impl<B: Backend> Stage<B> {
    pub fn upload(b: &B, host: &HostGroup) -> Result<Stage<B>, ModelError> {
        let mut stage = Stage { layers: host.layers.clone(), begin: None, blocks: vec![], end: None };
        for (part, tensors) in &host.parts {
            stage.put(Weights::upload(b, *part, tensors)?);
            crate::liveness::advanced();
        }
        Ok(stage)
    }

    /// A stage over weights already on the backend, in `layout`'s flat order (a streamed
    /// group after `Backend::wait`).
    pub fn from_weights(layout: &GroupLayout, weights: Vec<B::Weight>) -> Result<Stage<B>, ModelError> {
        if weights.len() != layout.len() {
            return Err(ModelError::Unsupported(format!("layers {:?}: {} weights for {} tensors", layout.layers, weights.len(), layout.len())));
        }
        let mut stage = Stage { layers: layout.layers.clone(), begin: None, blocks: vec![], end: None };
        let mut it = weights.into_iter();
        for (part, names) in &layout.parts {
            let map = names.iter().cloned().zip(it.by_ref().take(names.len())).collect();
            stage.put(Weights::from_map(*part, map));
        }
        Ok(stage)
    }

    /// The weights back in `layout`'s flat order (for `Backend::release`).
    pub fn into_weights(self, layout: &GroupLayout) -> Result<Vec<B::Weight>, ModelError> {
        let mut by_part: Vec<Weights<B>> = self.begin.into_iter().chain(self.blocks).chain(self.end).collect();
        let mut out = Vec::with_capacity(layout.len());
        for (part, names) in &layout.parts {
            let i = by_part.iter().position(|w| w.part == *part).ok_or_else(|| ModelError::Unsupported(format!("layers {:?}: part {} is not in this stage", layout.layers, part.name())))?;
            let mut map = by_part.swap_remove(i).into_map();
            for name in names {
                out.push(map.remove(name).ok_or_else(|| ModelError::MissingTensor { part: part.name(), name: name.clone() })?);
            }
        }
        Ok(out)
    }

    fn put(&mut self, w: Weights<B>) {
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

    fn begin(&self) -> Result<&Weights<B>, ModelError> {
        self.begin.as_ref().ok_or_else(|| ModelError::Unsupported(format!("layers {:?} do not include the embeddings", self.layers)))
    }

    fn end(&self) -> Result<&Weights<B>, ModelError> {
        self.end.as_ref().ok_or_else(|| ModelError::Unsupported(format!("layers {:?} do not include the LM head", self.layers)))
    }

    /// ids (T,) -> hidden (T, C)
    pub fn embed(&self, b: &B, ids: &[u32]) -> Result<B::Act, ModelError> {
        model::begin_forward(b, self.begin()?, ids)
    }

    /// hidden (T, C) -> hidden (T, C) through every layer of the range. With `caches`
    /// (one per layer of the range), keys and values are appended for generation.
    pub fn run_layers(
        &self,
        b: &B,
        cfg: &ModelConfig,
        mut x: B::Act,
        ctx: &RowCtx,
        mut caches: Option<&mut [LayerCache<B>]>,
    ) -> Result<B::Act, ModelError> {
        for (i, w) in self.blocks.iter().enumerate() {
            let cache = caches.as_deref_mut().map(|c| &mut c[i]);
            x = model::layer_forward(b, cfg, w, x, ctx, cache)?;
            crate::liveness::advanced();
        }
        Ok(x)
    }

    /// hidden (T, C) -> logits (R, V) at `rows`.
    pub fn logits(&self, b: &B, cfg: &ModelConfig, x: &B::Act, rows: &[u32]) -> Result<B::Act, ModelError> {
        model::end_logits(b, cfg, self.end()?, x, rows)
    }

    /// hidden (T, C) -> log p(target | row) at each scored row (S,).
    pub fn scored_logprobs(&self, b: &B, cfg: &ModelConfig, x: &B::Act, scored: &[ScoredRow]) -> Result<Vec<f64>, ModelError> {
        let rows: Vec<u32> = scored.iter().map(|s| s.row).collect();
        let targets: Vec<u32> = scored.iter().map(|s| s.target).collect();
        let logits = self.logits(b, cfg, x, &rows)?; // (S, V)
        Ok(b.log_softmax_at(&logits, &targets)?)
    }

    /// A whole micro-batch through this stage when it holds the entire model.
    pub fn score_batch(&self, b: &B, cfg: &ModelConfig, batch: &MicroBatch) -> Result<Vec<f64>, ModelError> {
        score_through(std::slice::from_ref(self), b, cfg, batch)
    }
}

/// A micro-batch through consecutive stages that together hold the whole model:
/// log p(target) at its scored rows (S,).
pub fn score_through<B: Backend>(stages: &[Stage<B>], b: &B, cfg: &ModelConfig, batch: &MicroBatch) -> Result<Vec<f64>, ModelError> {
    let (first, last) = match (stages.first(), stages.last()) {
        (Some(f), Some(l)) => (f, l),
        _ => return Err(ModelError::Unsupported("no stages loaded".into())),
    };
    let ctx = RowCtx { positions: &batch.positions, spans: &batch.spans, cache_order: None };
    let mut x = first.embed(b, &batch.tokens)?; // (T, C)
    for s in stages {
        x = s.run_layers(b, cfg, x, &ctx, None)?;
    }
    last.scored_logprobs(b, cfg, &x, &batch.scored)
}
