//! Every kind of job and how a rank runs one: the score job (corpus -> micro-batches -> a
//! runner::BatchScorer -> results), generation, and the one entry that runs any of them on
//! this rank (rank.rs); JobError, their error.
//!
//! Files: rank.rs (a rank's run of any job: device, prepare, launch, drive or serve, end),
//! launch.rs (every rank's start-up), resources.rs (a CPU rank's share of its node),
//! score.rs (the score job's writer side), corpus_rank.rs (score and extract over the ranks),
//! extract.rs (the extract job: score's machinery, spans searched in passes),
//! generate.rs (the generate job), waves.rs (waves in flight on the scorer), in_order.rs (results
//! written in input order), progress.rs (progress on stderr), output_lock.rs (one job per
//! results file), paths.rs (the outputs checked and claimed before any work), fault.rs
//! (fault injection for the restart tests).

pub mod corpus_rank;
pub mod extract;
pub mod fault;
pub mod generate;
mod in_order;
pub mod launch;
pub mod output_lock;
pub mod paths;
pub mod progress;
pub mod resources;
pub mod rank;
pub mod score;
/// Stop requests are process-wide (the heartbeat thread relays them); the jobs reach them here.
pub use crate::stop;
mod waves;

use crate::model::ModelError;
use crate::pipeline::PipelineError;
use std::path::PathBuf;
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
    /// Extract's search was given log-probs that do not fit the pass it asked for.
    #[error("document {id:?}")]
    Search { id: String, source: crate::extract::SearchError },
    /// A flag's value, or flags together, cannot work: the command line exits 2.
    #[error("{flag}: {msg}")]
    Usage { flag: &'static str, msg: String },
    /// A flag's value that only the CPU backend takes, given for a GPU.
    #[error("{flag} {value} is for the CPU backend (--device cpu); {why}")]
    CpuOnly { flag: &'static str, value: String, why: String },
    #[error(transparent)]
    Backend(#[from] crate::backend::BackendError),
    #[error(transparent)]
    Generate(#[from] crate::generate::GenerateError),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    /// A file the job reads or writes, and what was being done to it.
    #[error("{}: {what}", path.display())]
    File { path: PathBuf, what: &'static str, source: std::io::Error },
    /// A line of an input file (path:line) and what is wrong with it.
    #[error("{at}: {msg}")]
    Line { at: String, msg: String },
    #[error("{at}: invalid JSON")]
    LineJson { at: String, source: serde_json::Error },
    #[error("--trace: {}", path.display())]
    Trace { path: PathBuf, source: std::io::Error },
    /// Standard output failed (BrokenPipe: its reader went away, which is no failure).
    #[error("cannot write to stdout")]
    Stdout(#[source] std::io::Error),
    /// A record the job writes could not be made.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// A job's own error (the pipeline example's checks).
    #[error(transparent)]
    Other(Box<dyn std::error::Error + Send + Sync>),
}

/// An error and its causes on one line, leaving out a cause its parent's message already
/// quotes ("a: b: c").
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = String::new();
    let mut next = Some(e);
    while let Some(cause) = next {
        let text = cause.to_string();
        if !msg.contains(&text) {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&text);
        }
        next = cause.source();
    }
    msg
}
