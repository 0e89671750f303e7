//! What runs rows through the whole model: the scorer and decoder interfaces that the score
//! job and generation drive, and the rows of a decode step. They sit below the job, generation
//! and the pipeline, so each of those depends on them and none on another's.
//!
//! Implemented on one process (local.rs: LocalScorer, LocalDecoder) and over the MPI pipeline
//! (pipeline::PipelineScorer, pipeline::PipelineDecoder). Each reports its own error type; the
//! job and generation convert it into theirs.
//!
//! Shapes: T new rows of a step, S cached rows, R sequences, V vocabulary.

mod local;

pub use local::{LocalDecoder, LocalScorer};

use crate::token_tree::{AttnSpan, MicroBatch};
use serde::{Deserialize, Serialize};

/// Runs waves of micro-batches through the whole model. Waves are submitted and collected
/// in order; up to `depth` may be in flight, so the job reads and writes between the calls
/// while the model works.
pub trait BatchScorer {
    type Error: std::error::Error + Send + Sync + 'static;
    /// Start a wave (a scorer may compute all of it here).
    fn submit(&mut self, wave: &[MicroBatch]) -> Result<(), Self::Error>;
    /// The oldest submitted wave's results: for each micro-batch, log p(target) at its
    /// scored rows, in order.
    fn collect(&mut self) -> Result<Vec<Vec<f64>>, Self::Error>;
    /// Waves submitted before the oldest must be collected.
    fn depth(&self) -> usize {
        1
    }
}

/// One step's rows: the new tokens of every active sequence.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepBatch {
    /// (T,)
    pub tokens: Vec<u32>,
    /// (T,)
    pub positions: Vec<u32>,
    /// (T,) over key rows [cache (S); new (T)]
    pub spans: Vec<AttnSpan>,
    /// Rows of [cache; new] that form the next cache.
    pub cache_order: Vec<u32>,
    /// (R,) per active sequence, the row whose logits give its next token.
    pub last_rows: Vec<u32>,
}

/// Runs a step through the whole model and returns the logits (V,) at each `last_rows` row.
pub trait Decoder {
    type Error: std::error::Error + Send + Sync + 'static;
    fn step(&mut self, batch: &StepBatch) -> Result<Vec<Vec<f32>>, Self::Error>;
    /// Forget all cached keys (before a new batch of prompts).
    fn reset(&mut self);
}
