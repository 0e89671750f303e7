//! The per-rank pipeline over a Schedule (DESIGN.md, "Schedule" and "Data flow").
//!
//! Every rank computes the same Schedule. Rank 0 runs the job driver and calls the
//! distributed `PipelineScorer` (or `PipelineDecoder`); every other rank calls `serve`, which
//! follows rank 0's commands until told to stop. Per wave, rank 0 sends the micro-batch
//! layouts to every rank once; hidden states (T, C) then travel group g -> g+1 (rank
//! (g+1) mod N) in the wire dtype (f32 or bf16, wire.rs); only the last group's outputs come
//! back to rank 0. Rank 0 keeps two score waves in flight (driver.rs).
//!
//! Files: cluster.rs (MPI init, identity check, heartbeats, liveness backstop,
//! abort/finalize), transport.rs (non-blocking messages polled against the backstop),
//! weights.rs (host groups and the resident window over the backend's streaming contract),
//! wire.rs (the hop's encoding), worker.rs (one rank's share of a wave), driver.rs (the
//! scorer, the decoder, serve, the trace gather).

mod cluster;
mod driver;
mod transport;
mod weights;
mod wire;
mod worker;

pub use cluster::{Cluster, Identity, EXIT_LOST};
pub use driver::{gather_trace, serve, PipelineDecoder, PipelineScorer};
pub use weights::{read_rank_groups, WeightWindow};
pub use worker::Worker;

use crate::generate::GenerateError;
use crate::job::JobError;
use crate::model::ModelError;
use crate::schedule::ScheduleError;
use thiserror::Error;

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
    #[error("this call belongs to rank 0, the driver; rank {0} must call pipeline::serve")]
    NotDriver(usize),
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    #[error(transparent)]
    Model(#[from] ModelError),
}

impl From<PipelineError> for JobError {
    fn from(e: PipelineError) -> JobError {
        match e {
            PipelineError::Model(m) => JobError::Model(m),
            other => JobError::Transport(other.to_string()),
        }
    }
}

impl From<PipelineError> for GenerateError {
    fn from(e: PipelineError) -> GenerateError {
        match e {
            PipelineError::Model(m) => GenerateError::Model(m),
            other => GenerateError::Transport(other.to_string()),
        }
    }
}
