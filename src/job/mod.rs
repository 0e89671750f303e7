//! Jobs on the writer rank and what every rank does to start one: the score command (corpus ->
//! micro-batches -> a runner::BatchScorer -> results) and the start-up of a rank's pipeline
//! worker; JobError, their error.
//!
//! Files: launch.rs (every rank's start-up), resources.rs (a CPU rank's share of its node),
//! score.rs (the score job), waves.rs (waves in flight on the scorer), in_order.rs (results
//! written in input order), progress.rs (progress on stderr), stop.rs (SIGTERM, SIGINT), output_lock.rs (one job per
//! results file), paths.rs (the outputs checked and claimed before any work), fault.rs
//! (fault injection for the restart tests).

mod fault;
mod in_order;
pub mod launch;
pub mod output_lock;
pub mod paths;
pub mod progress;
pub mod resources;
pub mod score;
pub mod stop;
mod waves;

use crate::model::ModelError;
use crate::pipeline::PipelineError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum JobError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Format(#[from] crate::format::FormatError),
    #[error(transparent)]
    Schedule(#[from] crate::schedule::ScheduleError),
    #[error(transparent)]
    Paths(#[from] paths::PathError),
    /// The corpus or the template (the input side of the job).
    #[error(transparent)]
    Corpus(#[from] crate::corpus::CorpusError),
    /// The results file (the output side).
    #[error(transparent)]
    Results(#[from] crate::results::ResultsError),
    #[error("--csv: {0}")]
    CsvTarget(#[source] crate::results::ResultsError),
    /// The CSV failed after the results file was complete.
    #[error("{source}; {out} holds every document: run the same command again to write the CSV")]
    Csv { out: String, source: crate::results::ResultsError },
    #[error("the schedule options as JSON: {0}")]
    ScheduleOptions(#[source] serde_json::Error),
}
