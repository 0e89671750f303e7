//! The distributed runner::BatchScorer, used by the score job on rank 0, with two waves in
//! flight.

use super::commands::Command;
use super::worker::{InFlight, Worker};
use super::PipelineError;
use crate::backend::Backend;
use crate::runner::BatchScorer;
use crate::token_tree::MicroBatch;
use std::collections::VecDeque;

/// Once rank 0 has computed its share of a wave it returns to the job, which reads and
/// tokenises the next documents, submits the next wave and writes finished results while the
/// other ranks still work on this one, so the ring never drains between waves.
pub struct PipelineScorer<'w, B: Backend> {
    worker: &'w mut Worker<B>,
    in_flight: VecDeque<InFlight>,
}

impl<'w, B: Backend + 'static> PipelineScorer<'w, B> {
    pub fn new(worker: &'w mut Worker<B>) -> Result<Self, PipelineError> {
        if worker.rank != 0 {
            return Err(PipelineError::NotDriver(worker.rank));
        }
        Ok(PipelineScorer { worker, in_flight: VecDeque::new() })
    }
}

impl<B: Backend + 'static> BatchScorer for PipelineScorer<'_, B> {
    type Error = PipelineError;

    fn submit(&mut self, wave: &[MicroBatch]) -> Result<(), PipelineError> {
        let command = self.worker.send_command(&Command::Score(wave.to_vec()))?;
        let mut started = self.worker.score_start(wave)?;
        started.command = Some(command);
        self.in_flight.push_back(started);
        Ok(())
    }

    fn collect(&mut self) -> Result<Vec<Vec<f64>>, PipelineError> {
        let oldest = self.in_flight.pop_front().ok_or(PipelineError::NothingInFlight)?;
        self.worker.finish(oldest)
    }

    fn depth(&self) -> usize {
        2
    }
}
