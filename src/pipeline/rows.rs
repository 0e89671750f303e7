//! One forward pass as a rank's layers see it: the rows of a micro-batch or of a generation
//! step, and what the last group reads out of them.
//!
//! Shapes: T rows, S scored rows, R logit rows, V vocabulary.

use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::group::DeviceGroup;
use crate::model::{BatchPrompts, GroupKeys, ModelError, RowCtx};
use crate::runner::StepBatch;
use crate::token_tree::{AttnSpan, MicroBatch, ScoredRow};

/// What the last group computes for a pass.
#[derive(Clone, Copy)]
pub(crate) enum OutputRows<'a> {
    /// log p(target) at the scored rows (S,).
    Scored(&'a [ScoredRow]),
    /// Logits (R, V) at these rows, flattened.
    Logits(&'a [u32]),
}

/// The rows of one forward pass: a micro-batch or a generation step.
pub(crate) struct ForwardRows<'a> {
    /// (T,)
    pub tokens: &'a [u32],
    /// (T,)
    pub positions: &'a [u32],
    /// (T,)
    pub spans: &'a [AttnSpan],
    /// Generation: the rows of [cache; new] that form the next cache.
    pub cache_order: Option<&'a [u32]>,
    /// A micro-batch's documents and how their prompts are attended (kept prompts).
    pub prompts: Option<BatchPrompts<'a>>,
    pub outputs: OutputRows<'a>,
}

impl<'a> ForwardRows<'a> {
    /// A scoring pass over a micro-batch's token tree.
    pub fn scoring(b: &'a MicroBatch) -> ForwardRows<'a> {
        ForwardRows { tokens: &b.tokens, positions: &b.positions, spans: &b.spans, cache_order: None, prompts: Some(BatchPrompts::of(b)), outputs: OutputRows::Scored(&b.scored) }
    }

    /// A generation step: logits at each sequence's last row.
    pub fn step(s: &'a StepBatch) -> ForwardRows<'a> {
        ForwardRows { tokens: &s.tokens, positions: &s.positions, spans: &s.spans, cache_order: Some(&s.cache_order), prompts: None, outputs: OutputRows::Logits(&s.last_rows) }
    }

    pub fn ctx(&self) -> RowCtx<'_> {
        RowCtx { positions: self.positions, spans: self.spans, cache_order: self.cache_order }
    }

    /// Values the last group returns for this pass.
    pub fn out_len(&self, vocab: usize) -> usize {
        match self.outputs {
            OutputRows::Scored(s) => s.len(),
            OutputRows::Logits(rows) => rows.len() * vocab,
        }
    }
}

/// The last group's layers and head over one pass's hidden state (T, C): its output, as f64
/// (log-probs, or logits widened exactly). The model's last layer runs for the rows the head
/// reads only where this group has it (DeviceGroup::run_to_head).
pub(crate) fn run_out<B: Backend>(b: &B, cfg: &ModelConfig, group: &DeviceGroup<B>, x: B::Act, ctx: &RowCtx, keys: GroupKeys<'_, B>, outputs: OutputRows) -> Result<Vec<f64>, ModelError> {
    match outputs {
        OutputRows::Scored(scored) => group.run_scored(b, cfg, x, ctx, keys, scored),
        OutputRows::Logits(rows) => {
            let logits = group.run_logits(b, cfg, x, ctx, keys, rows)?; // (R, V)
            Ok(b.download(&logits)?.into_iter().map(f64::from).collect())
        }
    }
}
