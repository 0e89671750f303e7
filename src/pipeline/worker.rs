//! A rank's worker: its groups' weights and generation caches, and its part of each wave:
//! every pass through each of its groups in turn (FlexGen's zig-zag: the whole wave through
//! one group before the next group's weights are needed), with hidden states arriving from
//! the previous group's owner and leaving for the next one's.
//!
//! Overlap: the receive of micro-batch m+1 is posted before m computes, sends are not waited
//! for until the wave ends, and the next group's weights upload on the loader thread.
//!
//! Shapes: T rows of a micro-batch, C hidden, S scored rows, R logit rows, V vocabulary.

use super::cluster::Cluster;
use super::rows::{run_out, ForwardRows};
use super::transport::{Comm, WaitState, Pending, ProgressThread, SendQueue};
use super::window::WeightWindow;
use super::wire::{decode, encode};
use super::{PipelineError, ScheduleMismatch};
use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::group::HostGroup;
use crate::model::{GroupKeys, LayerCache, ModelError, PromptStore};
use crate::schedule::cost::WireDtype;
use crate::schedule::Schedule;
use crate::trace::{Trace, Track};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

/// Tag of the last group's outputs on their way to rank 0.
const TAG_RESULT: i32 = 11;
/// Hidden states entering group g travel under TAG_HIDDEN + g, so a message can never be
/// taken for another group's input.
const TAG_HIDDEN: i32 = 1000;

/// A wave this rank has done its compute for, with its messages still in flight.
#[derive(Default)]
pub(crate) struct InFlight {
    /// Rank 0: the last group's outputs, one receive per pass.
    result_recvs: Vec<Pending<f64>>,
    /// Rank 0 when it owns the last group: the outputs computed here.
    local: Vec<Vec<f64>>,
    /// Hidden states (wire bytes) on their way to the next group's owner.
    sends: SendQueue<u8>,
    /// The last group's outputs on their way to rank 0.
    result_sends: SendQueue<f64>,
    /// Rank 0: the command describing the wave, on its way to every rank.
    pub(crate) command: Option<SendQueue<u8>>,
}

/// A rank's state across waves: its weights, its generation caches and its timeline.
pub struct Worker<B: Backend> {
    pub rank: usize,
    backend: Arc<B>,
    cfg: ModelConfig,
    schedule: Schedule,
    comm: Comm,
    waits: WaitState,
    window: WeightWindow<B>,
    /// Generation: per group this rank owns, one cache per layer of the group. The caches
    /// stay on this rank with their group even when its weights are swapped out.
    caches: HashMap<usize, Vec<LayerCache<B>>>,
    /// Extract: the prompts' keys and values of documents under search, per global layer
    /// this rank runs; freed as the waves' `release` lists say, and at the job's stop.
    prompts: PromptStore<B>,
    pub trace: Trace,
    /// Trace time zero, taken as every rank leaves one barrier: all ranks' clocks line up.
    t0: Instant,
    wire: WireDtype,
    /// Keeps sends moving between this rank's own MPI calls (None: ClusterSettings::progress_every zero).
    _progress: Option<ProgressThread>,
}

impl<B: Backend + 'static> Worker<B> {
    /// `host` holds this rank's groups in execution order (see window::read_rank_groups).
    /// The worker uses the cluster's communicator: keep the Cluster alive while it runs.
    pub fn new(
        cluster: &Cluster,
        backend: Arc<B>,
        cfg: ModelConfig,
        schedule: Schedule,
        host: Vec<HostGroup>,
        trace: Trace,
        wire: WireDtype,
    ) -> Result<Worker<B>, PipelineError> {
        let rank = cluster.rank;
        if schedule.n_ranks() != cluster.size {
            return Err(ScheduleMismatch::Ranks { planned: schedule.n_ranks(), ranks: cluster.size }.into());
        }
        let expected: Vec<_> = schedule.rank_groups[rank].iter().map(|&g| schedule.groups[g].layers.clone()).collect();
        let got: Vec<_> = host.iter().map(|h| h.layers.clone()).collect();
        if expected != got {
            return Err(ScheduleMismatch::Groups { rank, got, expected }.into());
        }
        let window = WeightWindow::new(backend.clone(), &cfg, host, schedule.resident)?;
        let progress = if cluster.size > 1 { ProgressThread::start(cluster.data, cluster.progress_every)? } else { None };
        cluster.data.barrier(&cluster.waits)?;
        let t0 = Instant::now();
        Ok(Worker {
            rank,
            backend,
            cfg,
            schedule,
            comm: cluster.data,
            waits: cluster.waits.clone(),
            window,
            caches: HashMap::new(),
            prompts: PromptStore::default(),
            trace,
            t0,
            wire,
            _progress: progress,
        })
    }

    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    pub(crate) fn comm(&self) -> (&Comm, &WaitState) {
        (&self.comm, &self.waits)
    }

    /// Forget every generation cache.
    pub fn reset_caches(&mut self) {
        self.caches.clear();
    }

    /// Extract's kept prompts on this rank.
    pub fn prompts(&self) -> &PromptStore<B> {
        &self.prompts
    }

    /// Free the kept prompts of `docs` (a wave's `release` lists), or all of them (None: the
    /// job is over).
    pub(crate) fn release_prompts(&mut self, docs: Option<&[usize]>) {
        match docs {
            Some(d) => self.prompts.release(d),
            None => self.prompts.clear(),
        }
    }

    /// Groups uploaded to the backend right now.
    pub fn uploaded_groups(&self) -> usize {
        self.window.uploaded()
    }

    /// Run `passes` through this rank's groups. On rank 0 the result is the last group's
    /// output for each pass, in order; elsewhere it is empty.
    pub(crate) fn run(&mut self, passes: &[ForwardRows], with_cache: bool) -> Result<Vec<Vec<f64>>, PipelineError> {
        let wave = self.start(passes, with_cache)?;
        self.finish(wave)
    }

    /// This rank's share of the compute of `passes`; the wave's sends and (on rank 0) the
    /// receives of its results stay in flight in the returned InFlight, so rank 0 can begin
    /// the next wave, read and write files while the rest of the ring works on this one.
    pub(crate) fn start(&mut self, passes: &[ForwardRows], with_cache: bool) -> Result<InFlight, PipelineError> {
        let (rank, vocab, c) = (self.rank, self.cfg.vocab_size, self.cfg.hidden_size);
        let wire = self.wire;
        let last_group = self.schedule.groups.len().checked_sub(1).ok_or(ScheduleMismatch::NoGroups)?;
        let last_owner = self.schedule.owner(last_group);
        let mut wave = InFlight::default();
        // Rank 0 posts the receives of the results now, so they land while it computes.
        if rank == 0 && last_owner != 0 {
            for pass in passes {
                wave.result_recvs.push(self.comm.irecv::<f64>(pass.out_len(vocab), last_owner, TAG_RESULT)?);
            }
        }
        let mine = self.schedule.rank_groups[rank].clone();
        for (idx, &g) in mine.iter().enumerate() {
            let planned = self.schedule.groups[g].clone();
            let prev_owner = (!planned.has_begin).then(|| self.schedule.owner(g - 1));
            let next_owner = (!planned.has_end).then(|| self.schedule.owner(g + 1));
            // The receive of pass m's input from the previous group's owner, if it has one.
            let recv_input = |comm: &Comm, m: usize| -> Result<Option<Pending<u8>>, PipelineError> {
                match (prev_owner, passes.get(m)) {
                    (Some(p), Some(pass)) => Ok(Some(comm.irecv::<u8>(pass.tokens.len() * c * wire.bytes(), p, TAG_HIDDEN + g as i32)?)),
                    _ => Ok(None),
                }
            };
            let mut next_recv = recv_input(&self.comm, 0)?;
            let acquired_at = Instant::now();
            let (group, waited) = self.window.acquire(idx)?;
            if waited.as_secs_f64() > 0.0 {
                self.trace.span(Track::Wait, &format!("weights g{g}"), since(self.t0, acquired_at), since(self.t0, acquired_at) + waited.as_secs_f64(), &[]);
            }
            let mut caches = if with_cache {
                Some(self.caches.remove(&g).unwrap_or_else(|| planned.layers.clone().map(|_| LayerCache::default()).collect::<Vec<_>>()))
            } else {
                None
            };
            for (m, pass) in passes.iter().enumerate() {
                let t = pass.tokens.len();
                let x = match next_recv.take() {
                    Some(recv) => {
                        next_recv = recv_input(&self.comm, m + 1)?;
                        let (posted, wait_start) = (recv.posted, Instant::now());
                        let bytes = recv.wait(&self.waits)?;
                        let end = Instant::now();
                        self.trace.span(Track::Recv, &format!("g{g} mb{m}"), since(self.t0, posted), since(self.t0, end), &[("bytes", bytes.len() as f64)]);
                        self.trace.span(Track::Wait, &format!("input g{g} mb{m}"), since(self.t0, wait_start), since(self.t0, end), &[]);
                        let data = decode(&bytes, wire); // (T, C)
                        self.backend.upload(&data, t, c).map_err(ModelError::from)?
                    }
                    None => group.embed(&*self.backend, pass.tokens)?,
                };
                let start = Instant::now();
                let keys = match (caches.as_deref_mut(), pass.prompts) {
                    (Some(c), _) => GroupKeys::Caches(c),
                    (None, Some(p)) => GroupKeys::Prompts(&mut self.prompts, p),
                    (None, None) => GroupKeys::None,
                };
                match next_owner {
                    Some(next) => {
                        let x = group.run_layers_keys(&*self.backend, &self.cfg, x, &pass.ctx(), keys)?;
                        let data = self.backend.download(&x).map_err(ModelError::from)?; // (T, C)
                        wave.sends.push(self.comm.isend(encode(&data, wire), next, TAG_HIDDEN + g as i32 + 1)?);
                    }
                    None => {
                        let out = run_out(&*self.backend, &self.cfg, group, x, &pass.ctx(), keys, pass.outputs)?;
                        if rank == 0 {
                            wave.local.push(out);
                        } else {
                            wave.result_sends.push(self.comm.isend(out, 0, TAG_RESULT)?);
                        }
                    }
                }
                self.trace.span(Track::Compute, &format!("g{g} mb{m}"), since(self.t0, start), since(self.t0, Instant::now()), &[("tokens", t as f64)]);
                wave.sends.poll()?;
            }
            if let Some(c) = caches {
                self.caches.insert(g, c);
            }
        }
        Ok(wave)
    }

    /// Wait for a started wave's sends and (rank 0) its results.
    pub(crate) fn finish(&mut self, mut wave: InFlight) -> Result<Vec<Vec<f64>>, PipelineError> {
        if let Some(mut command) = wave.command.take() {
            command.wait_all(&self.waits)?;
        }
        wave.sends.wait_all(&self.waits)?;
        wave.result_sends.wait_all(&self.waits)?;
        self.record_copies_and_sends(&wave.sends, &wave.result_sends);
        if self.rank != 0 {
            return Ok(vec![]);
        }
        if wave.result_recvs.is_empty() {
            return Ok(wave.local);
        }
        let mut out = vec![];
        for r in wave.result_recvs {
            let posted = r.posted;
            out.push(r.wait(&self.waits)?);
            self.trace.span(Track::Recv, "results", since(self.t0, posted), since(self.t0, Instant::now()), &[]);
        }
        Ok(out)
    }

    fn record_copies_and_sends(&mut self, sends: &SendQueue<u8>, result_sends: &SendQueue<f64>) {
        if !self.trace.is_enabled() {
            self.window.copies.clear();
            return;
        }
        let mine = self.schedule.rank_groups[self.rank].clone();
        for (idx, start, end) in std::mem::take(&mut self.window.copies) {
            let g = mine.get(idx).copied().unwrap_or(idx);
            let (s, e) = (since(self.t0, start), since(self.t0, end));
            self.trace.span(Track::Copy, &format!("load g{g}"), s, e, &[]);
        }
        for (posted, done, peer) in sends.finished.iter().chain(result_sends.finished.iter()) {
            let (s, e) = (since(self.t0, *posted), since(self.t0, *done));
            self.trace.span(Track::Send, &format!("to rank {peer}"), s, e, &[]);
        }
    }
}

/// Seconds from `t0` to `t`: trace times.
fn since(t0: Instant, t: Instant) -> f64 {
    t.duration_since(t0).as_secs_f64()
}
