//! The per-rank pipeline over a Schedule (docs/DESIGN.md, "Schedule and planner" and "The
//! pipeline at run time"), and PipelineError, its error.
//!
//! Every rank computes the same Schedule. Rank 0 runs the job and calls the distributed
//! `PipelineScorer` (or `PipelineDecoder`); every other rank calls `serve`, which follows rank
//! 0's commands until told to stop. Per wave, rank 0 sends the wave's micro-batches to every
//! rank once; hidden states (T, C) then travel group g -> g+1 (rank (g+1) mod N) in the wire
//! dtype (f32 or bf16, wire.rs); only the last group's outputs come back to rank 0. Rank 0
//! keeps two score waves in flight (scorer.rs).
//!
//! Files: cluster/ (MPI start and end, the ranks' identity check, heartbeats, liveness
//! backstop), transport/ (non-blocking messages polled against the backstop), window.rs
//! (the groups resident on the device over the backend's streaming contract), wire.rs (the
//! hop's encoding), rows.rs (one pass's rows and outputs), worker.rs (one rank's share of a
//! wave), commands.rs (rank 0's commands, `serve`), scorer.rs and decoder.rs (the runner
//! traits over the pipeline), trace_gather.rs (the job's one trace).

mod cluster;
mod commands;
mod decoder;
mod rows;
mod scorer;
mod trace_gather;
mod transport;
mod window;
mod wire;
mod worker;

pub use cluster::{singleton_env, Cluster, ClusterSettings, Identity, EXIT_LOST};
pub use commands::serve;
pub use decoder::PipelineDecoder;
pub use scorer::PipelineScorer;
pub use trace_gather::gather_trace;
pub use window::{read_rank_groups, WeightWindow};
pub use worker::Worker;

use crate::model::ModelError;
use crate::schedule::ScheduleError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ScheduleMismatch {
    #[error("it plans {planned} ranks but the job has {ranks}")]
    Ranks { planned: usize, ranks: usize },
    #[error("rank {rank} was given layer groups {got:?}, the schedule gives it {expected:?}")]
    Groups { rank: usize, got: Vec<std::ops::Range<usize>>, expected: Vec<std::ops::Range<usize>> },
    #[error("it has no layer groups")]
    NoGroups,
}

#[derive(Debug, Error)]
pub enum PipelineError {
    #[error("lost contact with rank {peer} during {during}")]
    Lost { peer: usize, during: String },
    #[error("bad message from rank {from}: {msg}")]
    BadMessage { from: usize, msg: String },
    #[error("rank {rank} differs: {msg}; every rank must run the same model and options")]
    Mismatch { rank: usize, msg: String },
    #[error("MPI: {0}")]
    Mpi(String),
    /// The schedule a rank was handed does not fit the job it runs in.
    #[error("the schedule does not fit this job: {0}")]
    ScheduleMismatch(#[from] ScheduleMismatch),
    #[error("encoding {what}: {source}")]
    Encode { what: &'static str, source: serde_json::Error },
    #[error("cannot start the {name} thread: {source}")]
    Thread { name: &'static str, source: std::io::Error },
    #[error("this call belongs to rank 0, the driver; rank {0} must call pipeline::serve")]
    NotDriver(usize),
    #[error("collect without a wave in flight")]
    NothingInFlight,
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    #[error(transparent)]
    Model(#[from] ModelError),
}
