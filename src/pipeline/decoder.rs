//! The distributed runner::Decoder, used by generation on rank 0. Each rank keeps the
//! key/value caches of its own layers.
//!
//! Shapes: R sequences, V vocabulary.

use super::commands::Command;
use super::worker::Worker;
use super::PipelineError;
use crate::backend::Backend;
use crate::runner::{Decoder, StepBatch};

pub struct PipelineDecoder<'w, B: Backend> {
    worker: &'w mut Worker<B>,
    vocab: usize,
    /// A reset that could not be sent: Decoder::reset cannot fail, so the next step reports it.
    failed_reset: Option<PipelineError>,
}

impl<'w, B: Backend + 'static> PipelineDecoder<'w, B> {
    pub fn new(worker: &'w mut Worker<B>) -> Result<Self, PipelineError> {
        if worker.rank != 0 {
            return Err(PipelineError::NotDriver(worker.rank));
        }
        let vocab = worker.schedule().shape.vocab;
        Ok(PipelineDecoder { worker, vocab, failed_reset: None })
    }
}

impl<B: Backend + 'static> Decoder for PipelineDecoder<'_, B> {
    type Error = PipelineError;

    fn step(&mut self, batch: &StepBatch) -> Result<Vec<Vec<f32>>, PipelineError> {
        if let Some(e) = self.failed_reset.take() {
            return Err(e);
        }
        let flat = self.worker.command_and_run(&Command::Step(batch.clone()), |w| w.step(batch))?; // (R, V)
        // Logits were widened from f32 for the trip; narrowing gives back the same values.
        Ok(flat.chunks(self.vocab.max(1)).map(|r| r.iter().map(|&v| v as f32).collect()).collect())
    }

    fn reset(&mut self) {
        self.worker.reset_caches();
        if let Err(e) = self.worker.broadcast(&Command::Reset) {
            self.failed_reset = Some(e);
        }
    }
}
