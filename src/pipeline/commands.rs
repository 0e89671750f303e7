//! Rank 0's commands to the other ranks (a wave of micro-batches, a generation step, a cache
//! reset, stop) and `serve`, the loop in which every other rank follows them: each command
//! is followed by every rank running its share of the work it describes (worker.rs).

use super::rows::ForwardRows;
use super::transport::SendQueue;
use super::worker::{InFlight, Worker};
use super::PipelineError;
use crate::backend::Backend;
use crate::runner::StepBatch;
use crate::token_tree::MicroBatch;
use serde::{Deserialize, Serialize};

const TAG_COMMAND: i32 = 10;

#[derive(Serialize, Deserialize)]
pub(super) enum Command {
    Score(Vec<MicroBatch>),
    Step(StepBatch),
    Reset,
    Stop,
}

impl<B: Backend + 'static> Worker<B> {
    /// Rank 0: start sending `cmd` to every other rank. The returned sends must be waited
    /// for; a wave's command is waited for after rank 0's own share of the wave, so rank 0
    /// computes while the micro-batches travel.
    pub(super) fn send_command(&self, cmd: &Command) -> Result<SendQueue<u8>, PipelineError> {
        if self.rank != 0 {
            return Err(PipelineError::NotDriver(self.rank));
        }
        let (comm, _) = self.comm();
        let bytes = serde_json::to_vec(cmd).map_err(|source| PipelineError::Encode { what: "a command", source })?;
        let n = self.schedule().n_ranks();
        let mut sends = SendQueue::default();
        for peer in 1..n {
            sends.push(comm.isend(bytes.clone(), peer, TAG_COMMAND)?);
        }
        Ok(sends)
    }

    /// Rank 0: send `cmd` to every other rank and wait until each has it.
    pub(super) fn broadcast(&self, cmd: &Command) -> Result<(), PipelineError> {
        let mut sends = self.send_command(cmd)?;
        sends.wait_all(self.comm().1)
    }

    /// Rank 0: a command and its own share of the work it describes.
    pub(super) fn command_and_run<T>(&mut self, cmd: &Command, work: impl FnOnce(&mut Self) -> Result<T, PipelineError>) -> Result<T, PipelineError> {
        let mut sends = self.send_command(cmd)?;
        let out = work(self)?;
        sends.wait_all(self.comm().1)?;
        Ok(out)
    }

    /// Rank 0: tell every rank the job is over (their `serve` returns Ok, every rank's kept
    /// prompts freed).
    pub fn stop(&mut self) -> Result<(), PipelineError> {
        self.release_prompts(None);
        self.broadcast(&Command::Stop)
    }

    /// This rank's share of a score wave, its messages left in flight. The prompts the
    /// wave's micro-batches release are freed first: the driver names a document only once
    /// its last pass is back, so no batch of this wave or a later one attends to it.
    pub(super) fn score_start(&mut self, wave: &[MicroBatch]) -> Result<InFlight, PipelineError> {
        for b in wave {
            self.release_prompts(Some(&b.release));
        }
        let passes: Vec<ForwardRows> = wave.iter().map(ForwardRows::scoring).collect();
        self.start(&passes, false)
    }

    /// One generation step; on rank 0 the logits (R, V) flattened.
    pub(super) fn step(&mut self, batch: &StepBatch) -> Result<Vec<f64>, PipelineError> {
        Ok(self.run(&[ForwardRows::step(batch)], true)?.into_iter().next().unwrap_or_default())
    }
}

/// Every rank but 0: follow rank 0's commands until it says stop.
pub fn serve<B: Backend + 'static>(worker: &mut Worker<B>) -> Result<(), PipelineError> {
    if worker.rank == 0 {
        return Err(PipelineError::Mpi("rank 0 drives the pipeline; it must not call serve".into()));
    }
    loop {
        let (comm, waits) = worker.comm();
        let (_, bytes) = comm.recv_any_len::<u8>(Some(0), TAG_COMMAND, waits)?;
        let cmd: Command = serde_json::from_slice(&bytes).map_err(|e| PipelineError::BadMessage { from: 0, msg: format!("command: {e}") })?;
        match cmd {
            Command::Score(wave) => {
                let started = worker.score_start(&wave)?;
                worker.finish(started)?;
            }
            Command::Step(batch) => {
                worker.step(&batch)?;
            }
            Command::Reset => worker.reset_caches(),
            Command::Stop => {
                worker.release_prompts(None);
                return Ok(());
            }
        }
    }
}
