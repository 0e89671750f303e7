//! Results: one HDF5 file per run (schema "falcon-batch/scores/1"), appended as batches
//! finish and flushed each time, resumable, with a CSV export.
//!
//! Layout (all 1-D, chunked, extendable):
//!   /docs/{id, status, error, n_prompt_tokens, best, choice_offset, n_choices}
//!   /choices/{text, n_tokens, logprob, logprob_mean, logprob_per_char, prob}
//! Document i owns rows choice_offset[i] .. choice_offset[i] + n_choices[i] of /choices.

mod csv_export;
mod h5;
mod read;
mod recover;
mod reserve;
mod schema;
mod writer;

use thiserror::Error;

use crate::corpus::ReadyDoc;
use crate::score::{DocScores, Norm};

pub use csv_export::export_csv;
pub use read::read_results;
pub use writer::ResultsWriter;

pub const SCHEMA: &str = "falcon-batch/scores/1";

#[derive(Debug, Error)]
pub enum ResultsError {
    #[error("{path}: {what}: {source}")]
    Hdf5 {
        path: String,
        what: String,
        #[source]
        source: hdf5::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot write CSV: {source}")]
    Csv {
        path: String,
        #[source]
        source: csv::Error,
    },
    #[error(
        "{path}: was written with {attr} {found:?} but this run uses {attr} {wanted:?}; \
         pass --overwrite to replace it, or choose another output file"
    )]
    Mismatch { path: String, attr: &'static str, found: String, wanted: String },
    #[error(
        "{path}: records no {attr} (made by an older falcon-batch) but this run uses {attr} {wanted:?}; \
         pass --overwrite to replace it, or choose another output file"
    )]
    Unrecorded { path: String, attr: &'static str, wanted: String },
    #[error("{path}: not a falcon-batch results file ({why}); pass --overwrite to replace it, or choose another output file")]
    NotResults { path: String, why: String },
    #[error("{path}: {msg}")]
    Corrupt { path: String, msg: String },
    /// The output's file system (or quota) is full. `kept` documents are in the file, whole.
    #[error(
        "{path}: no space left on device: {what}; the file holds the {kept} documents finished so far; \
         free space and run the same command again to resume"
    )]
    NoSpace { path: String, what: String, kept: usize },
    #[error("document {id:?}: {scores} scores for {choices} choices")]
    ScoreCount { id: String, scores: usize, choices: usize },
}

/// What identifies a run's results: a file written with other values is not resumed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunMeta {
    pub model_id: String,
    pub norm: Norm,
    /// The prompt template's source text (`corpus::Template::source`).
    pub template: String,
    /// Put between a prompt and a choice where neither side has whitespace (`--target-delimiter`).
    pub delimiter: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DocStatus {
    Ok,
    Error,
}

impl DocStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DocStatus::Ok => "ok",
            DocStatus::Error => "error",
        }
    }

    pub fn parse(s: &str) -> Option<DocStatus> {
        match s {
            "ok" => Some(DocStatus::Ok),
            "error" => Some(DocStatus::Error),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ChoiceRow {
    pub text: String,
    pub n_tokens: usize,
    pub logprob: f64,
    pub logprob_mean: f64,
    pub logprob_per_char: f64,
    pub prob: f64,
}

/// One document's row in the results file.
#[derive(Clone, Debug, PartialEq)]
pub struct DocResult {
    pub id: String,
    pub status: DocStatus,
    /// Empty when ok.
    pub error: String,
    pub n_prompt_tokens: usize,
    /// Index of the best choice; None on error (stored as -1).
    pub best: Option<usize>,
    /// Empty on error.
    pub choices: Vec<ChoiceRow>,
}

impl DocResult {
    /// A scored document; fails if the scores do not match its choices one to one (a bug
    /// upstream, never silently truncated).
    pub fn scored(doc: &ReadyDoc, scores: &DocScores) -> Result<DocResult, ResultsError> {
        if scores.choices.len() != doc.choices.len() || scores.best >= doc.choices.len() {
            return Err(ResultsError::ScoreCount {
                id: doc.doc.id.clone(),
                scores: scores.choices.len(),
                choices: doc.choices.len(),
            });
        }
        let choices = doc
            .choices
            .iter()
            .zip(&scores.choices)
            .map(|(text, s)| ChoiceRow {
                text: text.clone(),
                n_tokens: s.n_tokens,
                logprob: s.logprob,
                logprob_mean: s.logprob_mean,
                logprob_per_char: s.logprob_per_char,
                prob: s.prob,
            })
            .collect();
        Ok(DocResult {
            id: doc.doc.id.clone(),
            status: DocStatus::Ok,
            error: String::new(),
            n_prompt_tokens: doc.n_prompt_tokens,
            best: Some(scores.best),
            choices,
        })
    }

    /// A document that could not be scored (bad corpus line, too long, ...).
    pub fn failed(id: &str, message: &str) -> DocResult {
        DocResult {
            id: id.to_string(),
            status: DocStatus::Error,
            error: message.to_string(),
            n_prompt_tokens: 0,
            best: None,
            choices: Vec::new(),
        }
    }

    pub fn is_ok(&self) -> bool {
        self.status == DocStatus::Ok
    }
}

/// Attach the file and the operation to an HDF5 error.
pub(crate) trait At<T> {
    fn at(self, path: &str, what: &str) -> Result<T, ResultsError>;
}

impl<T> At<T> for hdf5::Result<T> {
    fn at(self, path: &str, what: &str) -> Result<T, ResultsError> {
        self.map_err(|source| ResultsError::Hdf5 { path: path.to_string(), what: what.to_string(), source })
    }
}
