//! Jobs: the score command (corpus -> micro-batches -> scorer -> results) and what runs a
//! wave of micro-batches through the model, on this process or over the MPI pipeline.

pub mod launch;
pub mod progress;
pub mod score;
pub mod stop;

use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::layout::MicroBatch;
use crate::model::ModelError;
use crate::stage::{score_through, Stage};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum JobError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{0}")]
    Transport(String),
    #[error(transparent)]
    Format(#[from] crate::format::FormatError),
    #[error(transparent)]
    Schedule(#[from] crate::schedule::ScheduleError),
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
        wave.iter().map(|batch| Ok(score_through(self.stages, self.backend, self.cfg, batch)?)).collect()
    }
}
