//! Results: one HDF5 file per run (schema "falcon-batch/scores/2"), appended as batches
//! finish and flushed each time, resumable, checked when read, with a CSV export.
//!
//! Layout (all 1-D, chunked, extendable; the numeric datasets' chunks under HDF5's Fletcher32
//! checksum, every record under /docs/record_check; see schema.rs for each dataset's meaning
//! and units, which the file carries as attributes):
//!   /docs/{id, status, error, input_hash, record_check, n_prompt_tokens, best, choice_offset, n_choices}
//!   /choices/{doc, text, n_tokens, logprob, logprob_mean, logprob_per_char, prob}
//! Document i owns rows choice_offset[i] .. choice_offset[i] + n_choices[i] of /choices,
//! and those rows hold doc = i.
//!
//! Files: schema.rs (layout, identity attributes, creation), writer.rs (append, resume,
//! torn tail), recover.rs (rebuilding a file), read.rs (reading back, checked), plan.rs
//! (what a resumed run scores), csv_export.rs, h5.rs (typed HDF5 access), reserve.rs (room
//! held for the next append).

mod csv_export;
mod h5;
mod plan;
mod read;
mod recover;
mod reserve;
mod schema;
mod writer;

use thiserror::Error;

use crate::corpus::ReadyDoc;
use crate::score::{DocScores, Norm};

pub use csv_export::{check_csv_target, export_csv, write_csv, CSV_HEADER, EXTRACT_CSV_HEADER};
pub use plan::{plan_resume, ResumeOptions, ResumePlan};
pub use read::{read_file, read_results, ResultsFile};
pub use writer::ResultsWriter;

pub const SCHEMA: &str = "falcon-batch/scores/2";

/// The schema of `falcon-batch extract`'s files: the scores layout, its /choices rows being
/// each document's top-k spans best first, with the extract columns added (schema.rs).
pub const EXTRACT_SCHEMA: &str = "falcon-batch/extract/1";

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
    #[error("{path}: not a falcon-batch results file (cannot open it as HDF5: {source}); pass --overwrite to replace it, or choose another output file")]
    NotHdf5 { path: String, source: hdf5::Error },
    #[error(
        "{path}: written by an older falcon-batch (schema {found:?}; this one reads and writes {SCHEMA:?}, \
         which records each document's input hash so that a resume can tell an edited document from a \
         scored one); pass --overwrite to score into a new file there, or choose another output file"
    )]
    OldSchema { path: String, found: String },
    #[error("{path}: {msg}")]
    Corrupt { path: String, msg: String },
    /// A read failed or disagreed with its checksum in a file its writer closed cleanly: not
    /// a killed run's tail, but bytes changed on disk.
    #[error(
        "{path}: the file is damaged at {at}: {msg}; its last writer closed it cleanly, so this is not the tail \
         of a killed run: restore it from a copy, or pass --overwrite to score again"
    )]
    Damaged { path: String, at: String, msg: String },
    /// [`ResultsError::Damaged`] found by the HDF5 library: `what` failed there.
    #[error(
        "{path}: the file is damaged at {at}: {what}: {source}; its last writer closed it cleanly, so this is not the tail \
         of a killed run: restore it from a copy, or pass --overwrite to score again"
    )]
    DamagedHdf5 { path: String, at: String, what: &'static str, source: hdf5::Error },
    /// What a resume found in the file that this corpus does not explain (see plan.rs).
    #[error("{path}: {msg}")]
    Resume { path: String, msg: String },
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
/// Every option that changes a score belongs here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunMeta {
    pub model_id: String,
    pub norm: Norm,
    /// The prompt template's source text (`corpus::Template::source`).
    pub template: String,
    /// Put between a prompt and a choice where neither side has whitespace (`--target-delimiter`).
    pub delimiter: String,
    /// How hidden states travel between ranks ("f32", "bf16"): bf16 moves scores by up to
    /// ~0.02 nats, so files of the two are not mixed.
    pub wire_dtype: String,
    /// The arithmetic the ranks compute in ("f32"); the caller fills it.
    pub compute: String,
    /// Where the scores came from, for a reader of the file; not compared on resume.
    pub about: RunAbout,
    /// An extract run's options (its file has [`EXTRACT_SCHEMA`]); None for score.
    pub extract: Option<ExtractMeta>,
}

impl RunMeta {
    pub fn schema(&self) -> &'static str {
        if self.extract.is_some() {
            EXTRACT_SCHEMA
        } else {
            SCHEMA
        }
    }
}

/// What identifies an extract run beyond a score run's identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtractMeta {
    pub top_k: usize,
    pub max_span_units: usize,
    /// `--span-end` as given ("\n", or "eos").
    pub span_end: String,
}

/// An extract document's own fields (its spans are its `choices`, best first, with these
/// per-row extras in the same order).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExtractDoc {
    /// Passes over the document (1 to 3).
    pub passes: usize,
    /// Rows run beyond the prompt, over all passes.
    pub tree_tokens: usize,
    /// Distinct candidate spans of the source.
    pub candidates: usize,
    /// The corpus's "answer", or empty.
    pub answer: String,
    pub spans: Vec<SpanRow>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SpanRow {
    /// In the source, in Unicode code points, end exclusive.
    pub start: usize,
    pub end: usize,
    /// Log-prob of the span's ids alone (the score without the end term).
    pub span_logprob: f64,
}

/// Descriptive root attributes, rewritten by every run that appends (so they say where
/// the latest documents came from).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunAbout {
    /// The model directory's name (e.g. "falcon-180b").
    pub model_name: String,
    pub model_dir: String,
    /// What the directory was converted from (the manifest's `source`: an HF directory or a GGUF file).
    pub model_source: String,
    /// The corpus path as given, and the xxh3-128 of its bytes.
    pub corpus: String,
    pub corpus_hash: String,
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
    /// `corpus::document_hash` of its prompt and choices (or the raw line's hash).
    pub input_hash: String,
    pub status: DocStatus,
    /// Empty when ok.
    pub error: String,
    pub n_prompt_tokens: usize,
    /// Index of the best choice; None on error (stored as -1).
    pub best: Option<usize>,
    /// Empty on error.
    pub choices: Vec<ChoiceRow>,
    /// In an extract file, the extract fields (Some for every document there).
    pub extract: Option<ExtractDoc>,
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
            input_hash: doc.input_hash.clone(),
            status: DocStatus::Ok,
            error: String::new(),
            n_prompt_tokens: doc.n_prompt_tokens,
            best: Some(scores.best),
            choices,
            extract: None,
        })
    }

    /// A document that could not be scored (bad corpus line, too long, ...).
    pub fn failed(id: &str, input_hash: &str, message: &str) -> DocResult {
        DocResult {
            id: id.to_string(),
            input_hash: input_hash.to_string(),
            status: DocStatus::Error,
            error: message.to_string(),
            n_prompt_tokens: 0,
            best: None,
            choices: Vec::new(),
            extract: None,
        }
    }

    pub fn is_ok(&self) -> bool {
        self.status == DocStatus::Ok
    }

    /// The same scores ranked under another norm: `prob` and `best` recomputed from the
    /// stored per-choice log-probabilities, as the score run would have set them.
    pub fn reranked(&self, norm: Norm) -> DocResult {
        let mut d = self.clone();
        if d.choices.is_empty() {
            return d;
        }
        let keys: Vec<f64> = d
            .choices
            .iter()
            .map(|c| match norm {
                Norm::Sum => c.logprob,
                Norm::Mean => c.logprob_mean,
                Norm::Char => c.logprob_per_char,
            })
            .collect();
        let (probs, best) = crate::score::rank(&keys);
        for (c, p) in d.choices.iter_mut().zip(probs) {
            c.prob = p;
        }
        d.best = Some(best);
        d
    }
}

/// xxh3-64 over a document's whole record, every field length-prefixed or fixed-size
/// (`/docs/record_check`): HDF5 puts no checksum on variable-length strings (they live in
/// its global heap), nor on the index that finds a chunk, so a damaged file could otherwise
/// read back other strings or a chunk of fill values as if they had been written.
pub(crate) fn record_check(d: &DocResult) -> u64 {
    use xxhash_rust::xxh3::Xxh3;
    let mut h = Xxh3::new();
    let put = |h: &mut Xxh3, s: &str| {
        let s = h5::stored(s);
        h.update(&(s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    };
    let num = |h: &mut Xxh3, x: u64| h.update(&x.to_le_bytes());
    put(&mut h, &d.id);
    put(&mut h, d.status.as_str());
    put(&mut h, &d.error);
    put(&mut h, &d.input_hash);
    // As stored: the counts are i32 on disk, best -1 when there is none.
    num(&mut h, h5::int32(d.n_prompt_tokens) as u64);
    num(&mut h, d.best.map_or(-1, h5::int32) as u64);
    num(&mut h, d.choices.len() as u64);
    for c in &d.choices {
        put(&mut h, &c.text);
        num(&mut h, h5::int32(c.n_tokens) as u64);
        for x in [c.logprob, c.logprob_mean, c.logprob_per_char, c.prob] {
            num(&mut h, x.to_bits());
        }
    }
    if let Some(x) = &d.extract {
        for n in [x.passes, x.tree_tokens, x.candidates] {
            num(&mut h, n as u64);
        }
        put(&mut h, &x.answer);
        num(&mut h, x.spans.len() as u64);
        for s in &x.spans {
            num(&mut h, s.start as u64);
            num(&mut h, s.end as u64);
            num(&mut h, s.span_logprob.to_bits());
        }
    }
    h.digest()
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
