//! Discrete-event prediction of a Schedule: each rank is a compute engine, a copy engine and
//! an outgoing link, all replaying the rank's work order (order.rs). A compute starts when
//! its engine is free, its group's weights are on the device and its input has arrived; a
//! copy starts when the copy engine is free and the slot's previous group has finished; a send
//! starts when the link is free. Long runs are periodic after the ring fills, so only the
//! first waves are simulated and the rest extrapolated from their steady rate.

use super::cost::{CostError, CostModel, Micro, Workload, TCP_PAYLOAD_SHARE};
use super::{Schedule, Step};
use crate::trace::{Trace, Track};
use serde::Serialize;
use std::collections::VecDeque;
use thiserror::Error;

/// Waves simulated event by event before extrapolating.
const SIM_WAVES: usize = 24;
/// Spans kept in a trace; beyond this the timeline is long enough to read.
const TRACE_LIMIT: usize = 400_000;
/// Open MPI's TCP eager limit (btl_tcp_eager_limit, 64 KiB): a larger message moves only once
/// its receive is posted.
const EAGER_BYTES: f64 = 65536.0;

#[derive(Debug, Error, PartialEq)]
pub enum SimError {
    #[error(transparent)]
    Cost(#[from] CostError),
    #[error("--batch-tokens {work} exceeds the {planned} tokens the schedule reserved activation memory for")]
    BatchTooLarge { work: usize, planned: usize },
    #[error("simulation stalled at rank {rank} (a bug in the work order)")]
    Stalled { rank: usize },
}

/// Seconds each rank spent per activity over the simulated span.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RankTime {
    pub compute_s: f64,
    pub copy_s: f64,
    pub send_s: f64,
    /// Compute engine idle, waiting for activations from the previous rank.
    pub wait_input_s: f64,
    /// Compute engine idle, waiting for its weights to arrive on the device.
    pub wait_weights_s: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Bottleneck {
    Compute,
    Copy,
    Network,
    /// No resource is saturated: ranks sit waiting for each other (too few micro-batches
    /// in flight).
    Pipeline,
}

impl Bottleneck {
    pub fn describe(self) -> &'static str {
        match self {
            Bottleneck::Compute => "compute-bound",
            Bottleneck::Copy => "copy-bound (host-to-device weight copies)",
            Bottleneck::Network => "network-bound (activations between ranks)",
            Bottleneck::Pipeline => "pipeline-bound (ranks idle waiting on each other; raise --wave)",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SimReport {
    pub docs: usize,
    pub docs_per_micro: usize,
    pub micro_batches: usize,
    pub waves: usize,
    /// Waves simulated event by event (the rest are extrapolated).
    pub simulated_waves: usize,
    /// Length of the simulated span, which `ranks` covers.
    pub simulated_s: f64,
    pub total_s: f64,
    pub docs_per_hour: f64,
    pub ranks: Vec<RankTime>,
    pub bottleneck: Bottleneck,
    /// Activation bytes one document sends between ranks over its whole pass.
    pub net_bytes_per_doc: f64,
}

pub fn simulate(s: &Schedule, cost: &CostModel, work: &Workload) -> Result<SimReport, SimError> {
    simulate_traced(s, cost, work, &mut Trace::disabled())
}

/// As `simulate`, recording the simulated timeline into `trace`.
pub fn simulate_traced(s: &Schedule, cost: &CostModel, work: &Workload, trace: &mut Trace) -> Result<SimReport, SimError> {
    cost.check()?;
    work.check(s.shape.max_position)?;
    if work.batch_tokens > s.batch_tokens {
        return Err(SimError::BatchTooLarge { work: work.batch_tokens, planned: s.batch_tokens });
    }
    let per_micro = work.docs_per_micro();
    let micro_batches = work.micro_batches();
    let all_waves = s.wave_sizes(micro_batches);
    let sim_waves: Vec<usize> = if all_waves.len() <= SIM_WAVES { all_waves.clone() } else { vec![s.wave; SIM_WAVES] };
    let run = Run::new(s, cost, work, &sim_waves);
    let (ranks, wave_done) = run.go(trace)?;
    let simulated_s = wave_done.last().copied().unwrap_or(0.0);
    let total_s = if sim_waves.len() == all_waves.len() {
        simulated_s
    } else {
        let half = SIM_WAVES / 2;
        let per_wave = (wave_done[SIM_WAVES - 1] - wave_done[half - 1]) / (SIM_WAVES - half) as f64;
        let remaining = (micro_batches - SIM_WAVES * s.wave) as f64 / s.wave as f64;
        simulated_s + remaining * per_wave
    };
    let hops = (0..s.groups.len().saturating_sub(1)).filter(|&g| s.owner(g) != s.owner(g + 1)).count();
    let net_bytes_per_doc = (hops * work.rows_per_doc() * s.shape.hidden * cost.wire_bytes) as f64;
    Ok(SimReport {
        docs: work.docs,
        docs_per_micro: per_micro,
        micro_batches,
        waves: all_waves.len(),
        simulated_waves: sim_waves.len(),
        simulated_s,
        total_s,
        docs_per_hour: work.docs as f64 / total_s.max(1e-12) * 3600.0,
        bottleneck: bottleneck(&ranks, simulated_s),
        ranks,
        net_bytes_per_doc,
    })
}

fn bottleneck(ranks: &[RankTime], span: f64) -> Bottleneck {
    let frac = |f: fn(&RankTime) -> f64| ranks.iter().map(f).fold(0.0, f64::max) / span.max(1e-12);
    let (c, cp, n) = (frac(|r| r.compute_s), frac(|r| r.copy_s), frac(|r| r.send_s));
    let top = c.max(cp).max(n);
    // Below this, the busiest engine still idles a third of the time: the ring is starved.
    if top < 0.66 {
        Bottleneck::Pipeline
    } else if top == c {
        Bottleneck::Compute
    } else if top == n {
        Bottleneck::Network
    } else {
        Bottleneck::Copy
    }
}

struct RankState {
    steps: Vec<Step>,
    pos: usize,
    compute_free: f64,
    copy_free: f64,
    link_free: f64,
    /// When each group's latest load finishes.
    loaded: Vec<f64>,
    /// Arrival times of inputs, in the order this rank consumes them.
    inbox: VecDeque<f64>,
    time: RankTime,
}

struct Run<'a> {
    s: &'a Schedule,
    cost: &'a CostModel,
    work: &'a Workload,
    waves: &'a [usize],
    ranks: Vec<RankState>,
    wave_done: Vec<f64>,
}

impl<'a> Run<'a> {
    fn new(s: &'a Schedule, cost: &'a CostModel, work: &'a Workload, waves: &'a [usize]) -> Run<'a> {
        let ranks = (0..s.n_ranks())
            .map(|r| RankState {
                steps: s.work_order(r, waves),
                pos: 0,
                compute_free: 0.0,
                copy_free: 0.0,
                link_free: 0.0,
                loaded: vec![f64::INFINITY; s.groups.len()],
                inbox: VecDeque::new(),
                time: RankTime::default(),
            })
            .collect();
        Run { s, cost, work, waves, ranks, wave_done: vec![0.0; waves.len()] }
    }

    fn micro_at(&self, wave: usize, micro: usize) -> Micro {
        self.work.micro(self.waves[..wave].iter().sum::<usize>() + micro)
    }

    /// Replay every rank's steps until all are done; a rank advances until it needs an
    /// input that has not been sent yet.
    fn go(mut self, trace: &mut Trace) -> Result<(Vec<RankTime>, Vec<f64>), SimError> {
        loop {
            let mut progress = false;
            let mut done = true;
            for r in 0..self.ranks.len() {
                while let Some(&step) = self.ranks[r].steps.get(self.ranks[r].pos) {
                    if !self.step(r, step, trace) {
                        break;
                    }
                    self.ranks[r].pos += 1;
                    progress = true;
                }
                done &= self.ranks[r].pos == self.ranks[r].steps.len();
            }
            if done {
                break;
            }
            if !progress {
                let rank = self.ranks.iter().position(|st| st.pos < st.steps.len()).unwrap_or(0);
                return Err(SimError::Stalled { rank });
            }
        }
        Ok((self.ranks.into_iter().map(|st| st.time).collect(), self.wave_done))
    }

    /// Execute one step of rank `r`; false when it must wait for another rank.
    fn step(&mut self, r: usize, step: Step, trace: &mut Trace) -> bool {
        let tracing = trace.is_enabled() && trace.len() < TRACE_LIMIT;
        match step {
            Step::Load { group, slot } => {
                let st = &mut self.ranks[r];
                // The slot frees when the group before it has run its last micro-batch, which is
                // the compute just issued on this rank.
                let start = st.copy_free.max(st.compute_free);
                let dur = self.s.groups[group].bytes as f64 / self.cost.h2d_bytes_per_s;
                st.copy_free = start + dur;
                st.loaded[group] = start + dur;
                st.time.copy_s += dur;
                if tracing {
                    trace.span_on(r, Track::Copy, &format!("load g{group}"), start, start + dur, &[("slot", slot as f64)]);
                }
                true
            }
            Step::Compute { group, wave, micro } => {
                let s = self.s;
                let needs_input = group > 0 && s.owner(group - 1) != r;
                if needs_input && self.ranks[r].inbox.is_empty() {
                    return false;
                }
                let m = self.micro_at(wave, micro);
                let g = &s.groups[group];
                let speed = s.speeds[r];
                let mut dur = g.layers.len() as f64 * self.cost.layer.micro_seconds(&m) / speed;
                if g.has_end {
                    dur += m.scored as f64 * self.cost.head_row_s / speed;
                }
                let hop_s = self.hop_seconds(m.rows);
                let large = (m.rows * s.shape.hidden * self.cost.wire_bytes) as f64 > EAGER_BYTES;
                let st = &mut self.ranks[r];
                let mut input = if needs_input { st.inbox.pop_front().unwrap_or(0.0) } else { 0.0 };
                // The pipeline posts the receive of a group's first micro-batch when it starts
                // that group (the next wave's only once it has the wave's command); a large
                // message waits for that receive, so a hop that was ready earlier still has to
                // cross the link after it. Later micro-batches' receives are posted a step ahead.
                if needs_input && micro == 0 && large {
                    input = input.max(st.compute_free + hop_s);
                }
                let weights = st.loaded[group];
                let start = st.compute_free.max(input).max(weights);
                let idle = start - st.compute_free;
                if idle > 0.0 {
                    if weights >= input {
                        st.time.wait_weights_s += idle;
                    } else {
                        st.time.wait_input_s += idle;
                    }
                    if tracing {
                        let why = if weights >= input { "wait weights" } else { "wait input" };
                        trace.span_on(r, Track::Wait, why, st.compute_free, start, &[]);
                    }
                }
                let end = start + dur;
                st.compute_free = end;
                st.time.compute_s += dur;
                if tracing {
                    let name = format!("g{group} w{wave} mb{micro}");
                    trace.span_on(r, Track::Compute, &name, start, end, &[("rows", m.rows as f64), ("layers", g.layers.len() as f64)]);
                }
                if g.has_end {
                    self.wave_done[wave] = self.wave_done[wave].max(end);
                } else {
                    let to = s.owner(group + 1);
                    if to != r {
                        self.send(r, to, end, m.rows, tracing.then_some((group, wave, micro)), trace);
                    }
                }
                true
            }
        }
    }

    /// Seconds one hop of `tokens` hidden rows takes on an idle link: the link's rate counts
    /// the TCP/IP and Ethernet framing too, of which the activations get TCP_PAYLOAD_SHARE.
    fn hop_seconds(&self, tokens: usize) -> f64 {
        let bytes = (tokens * self.s.shape.hidden * self.cost.wire_bytes) as f64;
        self.cost.net_latency_s + bytes / (self.cost.net_bytes_per_s * TCP_PAYLOAD_SHARE)
    }

    fn send(&mut self, from: usize, to: usize, ready: f64, tokens: usize, label: Option<(usize, usize, usize)>, trace: &mut Trace) {
        let bytes = (tokens * self.s.shape.hidden * self.cost.wire_bytes) as f64;
        let dur = self.hop_seconds(tokens);
        let st = &mut self.ranks[from];
        let start = st.link_free.max(ready);
        st.link_free = start + dur;
        st.time.send_s += dur;
        self.ranks[to].inbox.push_back(start + dur);
        if let Some((g, w, m)) = label {
            let name = format!("g{g}->g{} w{w} mb{m}", g + 1);
            trace.span_on(from, Track::Send, &name, start, start + dur, &[("bytes", bytes), ("to", to as f64)]);
            trace.span_on(to, Track::Recv, &name, start, start + dur, &[("bytes", bytes), ("from", from as f64)]);
        }
    }
}
