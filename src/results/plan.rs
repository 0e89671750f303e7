//! What a resumed run scores, decided before any weight is read, from the results file
//! (read whole and checked) and a pass over the corpus without tokenizing.
//!
//! Each document in the file is matched with the corpus line of the same id:
//!   - same input hash, ok: done, skipped;
//!   - same input hash, failed: kept as failed (it would fail again), or retried under
//!     `--retry-failed`;
//!   - another input hash, ok: its prompt or choices were edited since it was scored: the run
//!     is refused, or under `--rescore-changed` the old record is removed and it is scored;
//!   - another input hash, failed: the line was edited (perhaps fixed): retried;
//!   - not in the corpus, failed: a stale failure (e.g. `line:N` of a line since fixed):
//!     removed;
//!   - not in the corpus, ok: the file holds another corpus's results: refused.
//!
//! Removed records are dropped by rewriting the file, so one id never has two records.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use hdf5::File;

use super::read::read_file;
use super::schema::check_meta;
use super::{DocResult, ResultsError, RunMeta};
use crate::corpus::Scan;

/// The score flags that shape a resume.
#[derive(Clone, Copy, Debug, Default)]
pub struct ResumeOptions {
    /// Replace the file: nothing in it is kept.
    pub overwrite: bool,
    /// Score again the documents whose input changed since they were scored.
    pub rescore_changed: bool,
    /// Score again every failed document, not only those whose line changed.
    pub retry_failed: bool,
}

#[derive(Clone, Debug, Default)]
pub struct ResumePlan {
    /// Ids whose records stay as they are: the corpus reader skips them.
    pub skip: HashSet<String>,
    /// Ids whose records are removed before this run appends (they are scored again).
    pub drop: HashSet<String>,
    /// Corpus documents this run scores (or records as failed).
    pub to_score: usize,
    /// Of `drop`: documents scored again because their input changed.
    pub changed: usize,
    /// Of `drop`: failed documents tried again.
    pub retried: usize,
    /// Failed records kept as they are.
    pub failed_kept: usize,
}

impl ResumePlan {
    /// The file already holds every corpus document as this run would score it: no weight
    /// needs to be read (records to drop, stale failures, go without the model).
    pub fn nothing_to_do(&self) -> bool {
        self.to_score == 0
    }
}

/// "a, b, c and 4 more"
fn first_ids(ids: &[&str]) -> String {
    const SHOWN: usize = 5;
    let head: Vec<String> = ids.iter().take(SHOWN).map(|id| format!("{id:?}")).collect();
    match ids.len().saturating_sub(SHOWN) {
        0 => head.join(", "),
        more => format!("{} and {more} more", head.join(", ")),
    }
}

/// Plan the run that appends `corpus` (scanned from `corpus_name`) to the results file at
/// `out`. A missing, empty or overwritten file: everything is scored. A file of another
/// run (model, norm, ...), another corpus, with edited documents (without
/// `rescore_changed`), or damaged, is an error here, before any weight is read.
pub fn plan_resume(out: &Path, meta: &RunMeta, corpus: &Scan, corpus_name: &str, opts: ResumeOptions) -> Result<ResumePlan, ResultsError> {
    let p = out.display().to_string();
    let fresh = ResumePlan { to_score: corpus.docs.len(), ..Default::default() };
    let existing = match std::fs::metadata(out) {
        Ok(m) => m.is_file() && m.len() > 0,
        Err(_) => false, // missing; anything else the writer reports when it opens the path
    };
    if opts.overwrite || !existing {
        return Ok(fresh);
    }
    {
        let file = File::open(out).map_err(|source| ResultsError::NotHdf5 { path: p.clone(), source })?;
        check_meta(&file, meta, &p)?;
    }
    let held = read_file(out)?.docs;
    classify(&held, corpus, corpus_name, &p, opts)
}

fn classify(held: &[DocResult], corpus: &Scan, corpus_name: &str, p: &str, opts: ResumeOptions) -> Result<ResumePlan, ResultsError> {
    let wanted: HashMap<&str, &str> = corpus.docs.iter().map(|d| (d.id.as_str(), d.input_hash.as_str())).collect();
    let mut plan = ResumePlan::default();
    let (mut changed, mut foreign) = (vec![], vec![]);
    for d in held {
        let id = d.id.as_str();
        match (wanted.get(id), d.is_ok()) {
            (Some(&hash), true) if hash == d.input_hash => {
                plan.skip.insert(d.id.clone());
            }
            (Some(&hash), false) if hash == d.input_hash && !opts.retry_failed => {
                plan.failed_kept += 1;
                plan.skip.insert(d.id.clone());
            }
            (Some(_), true) => changed.push(id),
            (Some(_), false) => {
                plan.retried += 1;
                plan.drop.insert(d.id.clone());
            }
            (None, false) => {
                plan.drop.insert(d.id.clone());
            }
            (None, true) => foreign.push(id),
        }
    }
    if !foreign.is_empty() {
        let msg = format!(
            "{} of its {} documents are not in {corpus_name} (first ids: {}): it holds another corpus's results; \
             choose another --out, or pass --overwrite to replace it",
            foreign.len(),
            held.len(),
            first_ids(&foreign)
        );
        return Err(ResultsError::Resume { path: p.into(), msg });
    }
    if !changed.is_empty() {
        if !opts.rescore_changed {
            let (n, s) = (changed.len(), if changed.len() == 1 { "" } else { "s" });
            let msg = format!(
                "{n} document{s} changed since scored (first ids: {}): the prompt or choices in {corpus_name} \
                 are not what was scored; pass --rescore-changed to score them again, or choose another --out",
                first_ids(&changed)
            );
            return Err(ResultsError::Resume { path: p.into(), msg });
        }
        plan.changed = changed.len();
        plan.drop.extend(changed.iter().map(|id| id.to_string()));
    }
    plan.to_score = corpus.docs.iter().filter(|d| !plan.skip.contains(&d.id)).count();
    Ok(plan)
}
