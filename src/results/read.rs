//! Reading a results file back, checked: in a file its writer closed cleanly every dataset
//! is read whole (HDF5 verifies each chunk's Fletcher32), the documents must tile the
//! choice rows and match their text checks, and anything else is reported as damage naming
//! the dataset. A file not closed cleanly (a killed writer) is read up to its torn tail.

use std::collections::BTreeMap;
use std::path::Path;

use hdf5::types::VarLenUnicode;
use hdf5::{Dataset, File, Group, H5Type};

use super::h5::{dataset, read_readable, read_whole};
use super::schema::{check_schema, closed_cleanly, set_names, valid_prefix};
use super::{record_check, ChoiceRow, DocResult, DocStatus, ExtractDoc, ResultsError, SpanRow};

/// A results file's documents and root attributes.
#[derive(Clone, Debug)]
pub struct ResultsFile {
    /// Every whole document, in the order written.
    pub docs: Vec<DocResult>,
    /// Its root string attributes (schema, model, norm, corpus, ...).
    pub attrs: BTreeMap<String, String>,
    /// False when the last writer was killed: `docs` stops at the torn tail.
    pub closed_cleanly: bool,
}

/// Every whole document in the file, in the order written (see [`read_file`]).
pub fn read_results(path: &Path) -> Result<Vec<DocResult>, ResultsError> {
    Ok(read_file(path)?.docs)
}

/// Read and check the whole file; the file is not modified. Damage in a file closed
/// cleanly is an error ([`ResultsError::Damaged`]); a killed writer's torn tail,
/// including blocks HDF5 cannot read back, is left out, as a resume would cut it.
pub fn read_file(path: &Path) -> Result<ResultsFile, ResultsError> {
    let p = path.display().to_string();
    let file = File::open(path).map_err(|source| ResultsError::NotHdf5 { path: p.clone(), source })?;
    let extract = check_schema(&file, &p)?;
    let strict = closed_cleanly(&file);
    let group = |name: &str| {
        file.group(name).map_err(|source| ResultsError::DamagedHdf5 { path: p.clone(), at: format!("/{name}"), what: "missing group", source })
    };
    let file_len = std::fs::metadata(path).map_err(|source| ResultsError::Io { path: p.clone(), source })?.len();
    let cols = Columns::read(&group("docs")?, &group("choices")?, &p, strict, file_len, extract)?;
    let docs = cols.documents(&p, strict)?;
    let attrs = file
        .attr_names()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|n| {
            let v = file.attr(&n).ok()?.read_scalar::<VarLenUnicode>().ok()?;
            Some((n, v.as_str().to_string()))
        })
        .collect();
    Ok(ResultsFile { docs, attrs, closed_cleanly: strict })
}

/// The datasets as read: whole (strict) or up to what is readable.
struct Columns {
    ids: Vec<VarLenUnicode>,
    status: Vec<VarLenUnicode>,
    errors: Vec<VarLenUnicode>,
    hashes: Vec<VarLenUnicode>,
    checks: Vec<u64>,
    n_prompt: Vec<i32>,
    best: Vec<i32>,
    offsets: Vec<i64>,
    counts: Vec<i32>,
    doc_of: Vec<i64>,
    texts: Vec<VarLenUnicode>,
    n_tokens: Vec<i32>,
    logprob: Vec<f64>,
    mean: Vec<f64>,
    per_char: Vec<f64>,
    prob: Vec<f64>,
    /// An extract file's columns.
    extract: Option<ExtractColumns>,
}

struct ExtractColumns {
    passes: Vec<i32>,
    tree_tokens: Vec<i64>,
    candidates: Vec<i64>,
    answer: Vec<VarLenUnicode>,
    start: Vec<i64>,
    end: Vec<i64>,
    span_logprob: Vec<f64>,
}

impl ExtractColumns {
    fn docs(&self) -> usize {
        [self.passes.len(), self.tree_tokens.len(), self.candidates.len(), self.answer.len()].into_iter().min().unwrap_or(0)
    }

    fn rows(&self) -> usize {
        [self.start.len(), self.end.len(), self.span_logprob.len()].into_iter().min().unwrap_or(0)
    }

    fn doc(&self, i: usize, rows: std::ops::Range<usize>) -> ExtractDoc {
        let n = |x: i64| usize::try_from(x).unwrap_or(0);
        ExtractDoc {
            passes: usize::try_from(self.passes[i]).unwrap_or(0),
            tree_tokens: n(self.tree_tokens[i]),
            candidates: n(self.candidates[i]),
            answer: self.answer[i].as_str().to_string(),
            spans: rows.map(|r| SpanRow { start: n(self.start[r]), end: n(self.end[r]), span_logprob: self.span_logprob[r] }).collect(),
        }
    }
}

fn read<T: H5Type + Clone>(ds: &Dataset, n: usize, path: &str, strict: bool) -> Result<Vec<T>, ResultsError> {
    if strict {
        read_whole(ds, path)
    } else {
        Ok(read_readable(ds, n))
    }
}

impl Columns {
    fn read(docs: &Group, choices: &Group, p: &str, strict: bool, file_len: u64, extract: bool) -> Result<Columns, ResultsError> {
        let d = |name: &str| dataset(docs, name, p);
        let c = |name: &str| dataset(choices, name, p);
        let (doc_names, row_names) = set_names(extract);
        let doc_lens = doc_names.iter().map(|s| d(s).map(|ds| ds.size())).collect::<Result<Vec<_>, _>>()?;
        let row_lens = row_names.iter().map(|s| c(s).map(|ds| ds.size())).collect::<Result<Vec<_>, _>>()?;
        if strict && (doc_lens.iter().any(|&l| l != doc_lens[0]) || row_lens.iter().any(|&l| l != row_lens[0])) {
            let msg = format!("datasets of unequal lengths ({doc_lens:?} documents, {row_lens:?} choice rows)");
            return Err(ResultsError::Damaged { path: p.into(), at: "/docs".into(), msg });
        }
        let n = doc_lens.iter().copied().min().unwrap_or(0);
        let rows = row_lens.iter().copied().min().unwrap_or(0);
        // Every row takes at least 4 bytes of the file in each numeric dataset: a larger
        // extent is a damaged header, not a reason to allocate it.
        if (n.max(rows) as u64).saturating_mul(4) > file_len {
            let msg = format!("{n} documents and {rows} choice rows cannot fit in a file of {file_len} bytes");
            return Err(ResultsError::Damaged { path: p.into(), at: "/docs".into(), msg });
        }
        let extract = if extract {
            Some(ExtractColumns {
                passes: read(&d("passes")?, n, p, strict)?,
                tree_tokens: read(&d("tree_tokens")?, n, p, strict)?,
                candidates: read(&d("n_candidates")?, n, p, strict)?,
                answer: read(&d("answer")?, n, p, strict)?,
                start: read(&c("start")?, rows, p, strict)?,
                end: read(&c("end")?, rows, p, strict)?,
                span_logprob: read(&c("span_logprob")?, rows, p, strict)?,
            })
        } else {
            None
        };
        Ok(Columns {
            extract,
            ids: read(&d("id")?, n, p, strict)?,
            status: read(&d("status")?, n, p, strict)?,
            errors: read(&d("error")?, n, p, strict)?,
            hashes: read(&d("input_hash")?, n, p, strict)?,
            checks: read(&d("record_check")?, n, p, strict)?,
            n_prompt: read(&d("n_prompt_tokens")?, n, p, strict)?,
            best: read(&d("best")?, n, p, strict)?,
            offsets: read(&d("choice_offset")?, n, p, strict)?,
            counts: read(&d("n_choices")?, n, p, strict)?,
            doc_of: read(&c("doc")?, rows, p, strict)?,
            texts: read(&c("text")?, rows, p, strict)?,
            n_tokens: read(&c("n_tokens")?, rows, p, strict)?,
            logprob: read(&c("logprob")?, rows, p, strict)?,
            mean: read(&c("logprob_mean")?, rows, p, strict)?,
            per_char: read(&c("logprob_per_char")?, rows, p, strict)?,
            prob: read(&c("prob")?, rows, p, strict)?,
        })
    }

    /// The whole documents; in a strict read, any document that does not check is damage.
    fn documents(&self, p: &str, strict: bool) -> Result<Vec<DocResult>, ResultsError> {
        let n = [&self.ids, &self.status, &self.errors, &self.hashes].iter().map(|v| v.len()).min().unwrap_or(0);
        let n = [n, self.checks.len(), self.n_prompt.len(), self.best.len(), self.offsets.len(), self.counts.len()].into_iter().min().unwrap_or(0);
        let n = self.extract.as_ref().map_or(n, |x| n.min(x.docs()));
        let rows = [self.doc_of.len(), self.texts.len(), self.n_tokens.len(), self.logprob.len(), self.mean.len(), self.per_char.len(), self.prob.len()]
            .into_iter()
            .min()
            .unwrap_or(0);
        let rows = self.extract.as_ref().map_or(rows, |x| rows.min(x.rows()));
        let (whole, used) = valid_prefix(&self.status[..n], &self.offsets[..n], &self.counts[..n], rows);
        let damaged = |at: &str, msg: String| ResultsError::Damaged { path: p.into(), at: at.into(), msg };
        if strict && (whole != n || used != rows) {
            let msg = format!("document {whole} of {n} has no valid status or choice rows ({used} of {rows} rows accounted for)");
            return Err(damaged("/docs/choice_offset", msg));
        }
        let mut out = Vec::with_capacity(whole);
        for i in 0..whole {
            // valid_prefix checked offsets and counts against `rows`, so these ranges hold.
            let start = usize::try_from(self.offsets[i]).unwrap_or(0);
            let end = start + usize::try_from(self.counts[i]).unwrap_or(0);
            let status = DocStatus::parse(self.status[i].as_str()).unwrap_or(DocStatus::Error);
            let best = usize::try_from(self.best[i]).ok();
            let problem = if (start..end).any(|r| self.doc_of[r] != i as i64) {
                Some(("/choices/doc", format!("rows {start}..{end} do not all name document {i}")))
            } else if match status {
                DocStatus::Ok => best.is_none_or(|b| b >= end - start),
                DocStatus::Error => best.is_some(),
            } {
                Some(("/docs/best", format!("row {i}: {} is not a choice of the document's {}", self.best[i], end - start)))
            } else {
                None
            };
            let doc = DocResult {
                id: self.ids[i].as_str().to_string(),
                input_hash: self.hashes[i].as_str().to_string(),
                status,
                error: self.errors[i].as_str().to_string(),
                n_prompt_tokens: usize::try_from(self.n_prompt[i]).unwrap_or(0),
                best,
                choices: (start..end)
                    .map(|r| ChoiceRow {
                        text: self.texts[r].as_str().to_string(),
                        n_tokens: usize::try_from(self.n_tokens[r]).unwrap_or(0),
                        logprob: self.logprob[r],
                        logprob_mean: self.mean[r],
                        logprob_per_char: self.per_char[r],
                        prob: self.prob[r],
                    })
                    .collect(),
                extract: self.extract.as_ref().map(|x| x.doc(i, start..end)),
            };
            let problem = problem.or_else(|| {
                (record_check(&doc) != self.checks[i])
                    .then(|| ("/docs/record_check", format!("row {i}: document {:?} does not match its check", doc.id)))
            });
            match problem {
                Some((at, msg)) if strict => return Err(damaged(at, msg)),
                Some(_) => break, // a torn tail: keep what checks before it
                None => out.push(doc),
            }
        }
        Ok(out)
    }
}
