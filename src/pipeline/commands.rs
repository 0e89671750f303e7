//! Rank 0 drives, the other ranks serve: rank 0 sends each rank a command (a wave of
//! micro-batch layouts, a generation step, a cache reset, stop), then every rank runs its
//! share of it (worker.rs).

use super::cluster::Cluster;
use super::transport::SendQueue;
use super::worker::{Head, InFlight, Item, Worker};
use super::PipelineError;
use crate::backend::Backend;
use crate::generate::{Decoder, GenerateError, StepBatch};
use crate::job::{BatchScorer, JobError};
use crate::token_tree::MicroBatch;
use crate::trace::Trace;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

const TAG_COMMAND: i32 = 10;
const TAG_TRACE: i32 = 12;

#[derive(Serialize, Deserialize)]
enum Command {
    Score(Vec<MicroBatch>),
    Step(StepBatch),
    Reset,
    Stop,
}

impl<B: Backend + 'static> Worker<B> {
    /// Rank 0: start sending `cmd` to every other rank. The returned sends must be waited
    /// for; a wave's command is waited for after rank 0's own share of the wave, so rank 0
    /// computes while the layouts travel.
    fn post(&self, cmd: &Command) -> Result<SendQueue<u8>, PipelineError> {
        if self.rank != 0 {
            return Err(PipelineError::NotDriver(self.rank));
        }
        let (comm, _) = self.comm();
        let bytes = serde_json::to_vec(cmd).map_err(|e| PipelineError::Mpi(format!("encoding a command: {e}")))?;
        let n = self.schedule().n_ranks();
        let mut sends = SendQueue::default();
        for peer in 1..n {
            sends.push(comm.isend(bytes.clone(), peer, TAG_COMMAND)?);
        }
        Ok(sends)
    }

    /// Rank 0: send `cmd` to every other rank and wait until each has it.
    fn broadcast(&self, cmd: &Command) -> Result<(), PipelineError> {
        let mut sends = self.post(cmd)?;
        sends.wait_all(self.comm().1)
    }

    /// Rank 0: a command and its own share of the work it describes.
    fn post_and_run<T>(&mut self, cmd: &Command, work: impl FnOnce(&mut Self) -> Result<T, PipelineError>) -> Result<T, PipelineError> {
        let mut sends = self.post(cmd)?;
        let out = work(self)?;
        sends.wait_all(self.comm().1)?;
        Ok(out)
    }

    /// Rank 0: tell every rank the job is over (their `serve` returns Ok).
    pub fn stop(&self) -> Result<(), PipelineError> {
        self.broadcast(&Command::Stop)
    }

    fn score(&mut self, wave: &[MicroBatch]) -> Result<Vec<Vec<f64>>, PipelineError> {
        let started = self.score_start(wave)?;
        self.finish(started)
    }

    fn score_start(&mut self, wave: &[MicroBatch]) -> Result<InFlight, PipelineError> {
        let items: Vec<Item> = wave
            .iter()
            .map(|b| Item { tokens: &b.tokens, positions: &b.positions, spans: &b.spans, cache_order: None, head: Head::Score(&b.scored) })
            .collect();
        self.start(&items, false)
    }

    /// One generation step; on rank 0 the logits (R, V) flattened.
    fn step(&mut self, batch: &StepBatch) -> Result<Vec<f64>, PipelineError> {
        let item = Item {
            tokens: &batch.tokens,
            positions: &batch.positions,
            spans: &batch.spans,
            cache_order: Some(&batch.cache_order),
            head: Head::Logits(&batch.last_rows),
        };
        Ok(self.run(&[item], true)?.into_iter().next().unwrap_or_default())
    }
}

/// Every rank but 0: follow rank 0's commands until it says stop.
pub fn serve<B: Backend + 'static>(worker: &mut Worker<B>) -> Result<(), PipelineError> {
    if worker.rank == 0 {
        return Err(PipelineError::Mpi("rank 0 drives the pipeline; it must not call serve".into()));
    }
    loop {
        let (comm, live) = worker.comm();
        let (_, bytes) = comm.recv_any_len::<u8>(Some(0), TAG_COMMAND, live)?;
        let cmd: Command = serde_json::from_slice(&bytes).map_err(|e| PipelineError::BadMessage { from: 0, msg: format!("command: {e}") })?;
        match cmd {
            Command::Score(wave) => {
                worker.score(&wave)?;
            }
            Command::Step(batch) => {
                worker.step(&batch)?;
            }
            Command::Reset => worker.reset_caches(),
            Command::Stop => return Ok(()),
        }
    }
}

/// The distributed BatchScorer, used by the job driver on rank 0. It keeps two waves in
/// flight: once rank 0 has computed its share of a wave it returns to the job, which reads and
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
    fn submit(&mut self, wave: &[MicroBatch]) -> Result<(), JobError> {
        let command = self.worker.post(&Command::Score(wave.to_vec()))?;
        let mut started = self.worker.score_start(wave)?;
        started.command = Some(command);
        self.in_flight.push_back(started);
        Ok(())
    }

    fn collect(&mut self) -> Result<Vec<Vec<f64>>, JobError> {
        let oldest = self.in_flight.pop_front().ok_or_else(|| JobError::Transport("collect without a wave in flight".into()))?;
        Ok(self.worker.finish(oldest)?)
    }

    fn depth(&self) -> usize {
        2
    }
}

/// The distributed generate::Decoder, used on rank 0. Each rank keeps the key/value caches
/// of its own layers.
pub struct PipelineDecoder<'w, B: Backend> {
    worker: &'w mut Worker<B>,
    vocab: usize,
    /// A reset that could not be sent: Decoder::reset cannot fail, so the next step reports it.
    failed_reset: Option<String>,
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
    fn step(&mut self, batch: &StepBatch) -> Result<Vec<Vec<f32>>, GenerateError> {
        if let Some(e) = self.failed_reset.take() {
            return Err(GenerateError::Transport(e));
        }
        let flat = self.worker.post_and_run(&Command::Step(batch.clone()), |w| w.step(batch))?; // (R, V)
        // Logits were widened from f32 for the trip; narrowing gives back the same values.
        Ok(flat.chunks(self.vocab.max(1)).map(|r| r.iter().map(|&v| v as f32).collect()).collect())
    }

    fn reset(&mut self) {
        self.worker.reset_caches();
        if let Err(e) = self.worker.broadcast(&Command::Reset) {
            self.failed_reset = Some(e.to_string());
        }
    }
}

/// The end of a traced job: every rank sends its recorder to rank 0, which returns all of them
/// merged (one process track per rank; their clocks share the worker's start barrier).
/// Other ranks return None.
pub fn gather_trace(cluster: &Cluster, mine: Trace) -> Result<Option<Trace>, PipelineError> {
    let (comm, live) = (&cluster.data, &cluster.live);
    if cluster.rank != 0 {
        let bytes = serde_json::to_vec(&mine).map_err(|e| PipelineError::Mpi(format!("encoding the trace: {e}")))?;
        comm.isend(bytes, 0, TAG_TRACE)?.wait(live)?;
        return Ok(None);
    }
    let mut all = mine;
    for peer in 1..cluster.size {
        let (_, bytes) = comm.recv_any_len::<u8>(Some(peer), TAG_TRACE, live)?;
        let t: Trace = serde_json::from_slice(&bytes).map_err(|e| PipelineError::BadMessage { from: peer, msg: format!("trace: {e}") })?;
        all.merge(t);
    }
    Ok(Some(all))
}
