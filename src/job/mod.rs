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
use std::collections::VecDeque;
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

/// Runs waves of micro-batches through the whole model. Waves are submitted and collected
/// in order; up to `depth` may be in flight, so the job reads and writes between the calls
/// while the model works.
pub trait BatchScorer {
    /// Start a wave (a scorer may compute all of it here).
    fn submit(&mut self, wave: &[MicroBatch]) -> Result<(), JobError>;
    /// The oldest submitted wave's results: for each micro-batch, log p(target) at its
    /// scored rows, in order.
    fn collect(&mut self) -> Result<Vec<Vec<f64>>, JobError>;
    /// Waves submitted before the oldest must be collected.
    fn depth(&self) -> usize {
        1
    }
}

/// Every stage on this process, run one after another.
pub struct LocalScorer<'a, B: Backend> {
    pub backend: &'a B,
    pub cfg: &'a ModelConfig,
    pub stages: &'a [Stage<B>],
    pub done: VecDeque<Vec<Vec<f64>>>,
}

impl<B: Backend> BatchScorer for LocalScorer<'_, B> {
    fn submit(&mut self, wave: &[MicroBatch]) -> Result<(), JobError> {
        let out = wave.iter().map(|batch| Ok(score_through(self.stages, self.backend, self.cfg, batch)?)).collect::<Result<_, JobError>>()?;
        self.done.push_back(out);
        Ok(())
    }

    fn collect(&mut self) -> Result<Vec<Vec<f64>>, JobError> {
        self.done.pop_front().ok_or_else(|| JobError::Transport("collect without a wave in flight".into()))
    }
}
