//! Jobs: the score command (corpus -> micro-batches -> scorer -> results) and what runs a
//! wave of micro-batches through the model, on this process or over the MPI pipeline.

pub mod progress;
pub mod score;

use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::layout::MicroBatch;
use crate::model::ModelError;
use crate::stage::Stage;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum JobError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{0}")]
    Transport(String),
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Output(String),
}

/// Runs waves of micro-batches through the whole model.
pub trait BatchScorer {
    /// For each micro-batch of the wave, log p(target) at its scored rows, in order.
    fn score_wave(&mut self, wave: &[MicroBatch]) -> Result<Vec<Vec<f64>>, JobError>;
}

/// Every stage on this process, run one after another.
pub struct LocalScorer<'a, B: Backend> {
    pub backend: &'a B,
    pub cfg: &'a ModelConfig,
    pub stages: &'a [Stage<B>],
}

impl<B: Backend> BatchScorer for LocalScorer<'_, B> {
    fn score_wave(&mut self, wave: &[MicroBatch]) -> Result<Vec<Vec<f64>>, JobError> {
        let b = self.backend;
        let mut out = vec![];
        for batch in wave {
            let ctx = crate::model::RowCtx { positions: &batch.positions, spans: &batch.spans, cache_order: None };
            let (first, last) = match (self.stages.first(), self.stages.last()) {
                (Some(f), Some(l)) => (f, l),
                _ => return Err(JobError::Model(ModelError::Unsupported("no stages loaded".into()))),
            };
            let mut x = first.embed(b, &batch.tokens)?;
            for s in self.stages {
                x = s.run_layers(b, self.cfg, x, &ctx, None)?;
            }
            out.push(last.scored_logprobs(b, self.cfg, &x, &batch.scored)?);
        }
        Ok(out)
    }
}
