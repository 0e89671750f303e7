//! The results file's schema on disk: the datasets with their meaning and units, how an
//! empty file is made, what a resumed one must match, the closed-cleanly mark, and which
//! prefix of a file is whole documents.

use std::path::{Path, PathBuf};

use hdf5::types::VarLenUnicode;
use hdf5::{File, Group};

use super::h5::{create_set, read_str_attr, set_str_attr};
use super::{At, ResultsError, RunMeta, EXTRACT_SCHEMA, SCHEMA};

// ~1024 documents or 4096 choice rows per chunk: a few appends per chunk at typical batch
// sizes, and small enough that the last, partly filled chunk costs little.
pub(super) const DOC_CHUNK: usize = 1024;

pub(super) const CHOICE_CHUNK: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Str,
    I32,
    I64,
    U64,
    F64,
}

/// One dataset: its name, element type, and the `description` and `units` attributes it
/// carries so the file explains itself.
pub(super) struct SetSpec {
    pub name: &'static str,
    pub kind: Kind,
    pub description: &'static str,
    pub units: &'static str,
}

const fn set(name: &'static str, kind: Kind, description: &'static str, units: &'static str) -> SetSpec {
    SetSpec { name, kind, description, units }
}

pub(super) const DOC_SETS: [SetSpec; 9] = [
    set("id", Kind::Str, "the document's id from the corpus, or line:N for a line without a usable id", ""),
    set("status", Kind::Str, "ok, or error (then error says why and the document has no choice rows)", ""),
    set("error", Kind::Str, "why the document failed, as file:line: field: what was expected; empty when ok", ""),
    set(
        "input_hash",
        Kind::Str,
        "xxh3-128 of the rendered prompt and the choices, length-prefixed (of the raw line when it did not parse); \
         a resumed run compares it with the corpus",
        "32 hex digits",
    ),
    set(
        "record_check",
        Kind::U64,
        "xxh3-64 of the document's whole record (its /docs fields and its /choices rows), checked on every read: \
         HDF5's Fletcher32 covers the numeric chunks but neither variable-length strings nor the index that finds a chunk",
        "",
    ),
    set("n_prompt_tokens", Kind::I32, "tokens in the prompt", "tokens"),
    set("best", Kind::I32, "the best choice under the file's norm, 0-based within the document; -1 on error", "choice index"),
    set("choice_offset", Kind::I64, "the document's first row in /choices", "row index"),
    set("n_choices", Kind::I32, "the document's rows in /choices (0 on error)", "rows"),
];

pub(super) const CHOICE_SETS: [SetSpec; 7] = [
    set("doc", Kind::I64, "the row's document: an index into /docs", "row index"),
    set("text", Kind::Str, "the choice as given in the corpus", ""),
    set("n_tokens", Kind::I32, "tokens of the choice's continuation", "tokens"),
    set("logprob", Kind::F64, "sum of the continuation's token log-probabilities", "natural log (nats)"),
    set("logprob_mean", Kind::F64, "logprob / n_tokens", "nats per token"),
    set("logprob_per_char", Kind::F64, "logprob / characters of the continuation (with its leading space or delimiter)", "nats per character"),
    set(
        "prob",
        Kind::F64,
        "softmax over the document's choices of the file's norm: sum: logprob; mean: logprob_mean; \
         char: logprob_per_char; sums to 1 within a document",
        "probability",
    ),
];

/// An extract file's /docs columns beyond the scores layout's.
pub(super) const EXTRACT_DOC_SETS: [SetSpec; 4] = [
    set("passes", Kind::I32, "passes over the document: 1 (bounds: the prompt), then one per round of the best-first search of the spans' token tree (2 with --exhaustive); 0 on error", "passes"),
    set("tree_tokens", Kind::I64, "rows run beyond the prompt over all passes (the spans' token tree)", "tokens"),
    set("n_candidates", Kind::I64, "distinct candidate spans of the source", "spans"),
    set("answer", Kind::Str, "the corpus's \"answer\", or empty", ""),
];

/// An extract file's /choices columns beyond the scores layout's: its rows are the top-k
/// spans, best first (text: the span; n_tokens: its tokens; logprob: its score, span and
/// end; prob: exp(logprob)).
pub(super) const EXTRACT_ROW_SETS: [SetSpec; 3] = [
    set("start", Kind::I64, "where the span starts in the source", "Unicode code points"),
    set("end", Kind::I64, "where the span ends in the source, exclusive", "Unicode code points"),
    set("span_logprob", Kind::F64, "sum of the span's token log-probabilities, without the end term", "natural log (nats)"),
];

/// Names of /docs and /choices datasets of a file of this layout.
pub(super) fn set_names(extract: bool) -> (Vec<&'static str>, Vec<&'static str>) {
    let mut docs: Vec<&str> = DOC_SETS.iter().map(|s| s.name).collect();
    let mut rows: Vec<&str> = CHOICE_SETS.iter().map(|s| s.name).collect();
    if extract {
        docs.extend(EXTRACT_DOC_SETS.iter().map(|s| s.name));
        rows.extend(EXTRACT_ROW_SETS.iter().map(|s| s.name));
    }
    (docs, rows)
}

/// Root attribute: 1 when the last writer closed the file, 0 while one has it open. HDF5
/// (1.10, no SWMR) updates metadata in place, so a job killed mid-append can leave the
/// file readable but not safely writable; a file found not closed cleanly is rebuilt
/// from what it holds before anything is appended. A damaged read in a file marked 1 is
/// damage on disk, not a torn tail.
const CLOSED_ATTR: &str = "closed_cleanly";

pub(super) fn set_closed(file: &File, closed: bool, path: &str) -> Result<(), ResultsError> {
    let what = format!("marking the file {}", if closed { "closed" } else { "open" });
    let attr = match file.attr(CLOSED_ATTR) {
        Ok(a) => a,
        Err(_) => file.new_attr::<u8>().shape(()).create(CLOSED_ATTR).at(path, &what)?,
    };
    attr.write_scalar(&u8::from(closed)).at(path, &what)?;
    file.flush().at(path, &what)
}

pub(super) fn closed_cleanly(file: &File) -> bool {
    file.attr(CLOSED_ATTR).and_then(|a| a.read_scalar::<u8>()).is_ok_and(|v| v == 1)
}

/// The longest prefix of documents whose status was written (the commit marker, written
/// last) and whose choice rows are contiguous and present: (documents, choice rows).
pub(super) fn valid_prefix(status: &[VarLenUnicode], offsets: &[i64], counts: &[i32], choice_rows: usize) -> (usize, usize) {
    let mut end = 0usize;
    for (i, ((s, &off), &n)) in status.iter().zip(offsets).zip(counts).enumerate() {
        let ok_status = matches!(s.as_str(), "ok" | "error");
        let next = usize::try_from(n).ok().map(|n| end + n);
        match next {
            Some(next) if ok_status && off == end as i64 && next <= choice_rows => end = next,
            _ => return (i, end),
        }
    }
    (status.len().min(offsets.len()).min(counts.len()), end)
}

/// The root attributes a resumed run must match: every option that changes a score.
pub(super) fn identity(meta: &RunMeta) -> Vec<(&'static str, String)> {
    let mut v = vec![
        ("model", meta.model_id.clone()),
        ("norm", meta.norm.name().to_string()),
        ("template", meta.template.clone()),
        ("target_delimiter", meta.delimiter.clone()),
        ("wire_dtype", meta.wire_dtype.clone()),
        ("compute", meta.compute.clone()),
    ];
    if let Some(x) = &meta.extract {
        v.push(("top_k", x.top_k.to_string()));
        v.push(("max_span_units", x.max_span_units.to_string()));
        v.push(("span_end", x.span_end.clone()));
    }
    v
}

/// The schema attribute says this is a results file this build reads; true for an
/// extract file.
pub(super) fn check_schema(file: &File, path: &str) -> Result<bool, ResultsError> {
    match read_str_attr(file, "schema") {
        Some(s) if s == SCHEMA => Ok(false),
        Some(s) if s == EXTRACT_SCHEMA => Ok(true),
        Some(s) if s.starts_with("falcon-batch/scores/") => Err(ResultsError::OldSchema { path: path.into(), found: s }),
        Some(s) => Err(ResultsError::NotResults { path: path.into(), why: format!("schema {s:?}, expected {SCHEMA:?}") }),
        None => Err(ResultsError::NotResults { path: path.into(), why: "no schema attribute".into() }),
    }
}

pub(super) fn check_meta(file: &File, meta: &RunMeta, path: &str) -> Result<(), ResultsError> {
    let extract = check_schema(file, path)?;
    if extract != meta.extract.is_some() {
        let (found, wanted) = if extract { (EXTRACT_SCHEMA, SCHEMA) } else { (SCHEMA, EXTRACT_SCHEMA) };
        return Err(ResultsError::Mismatch { path: path.into(), attr: "schema", found: found.into(), wanted: wanted.into() });
    }
    for (attr, want) in identity(meta) {
        let want = want.as_str();
        let Some(found) = read_str_attr(file, attr) else {
            return Err(ResultsError::Unrecorded { path: path.into(), attr, wanted: want.to_string() });
        };
        if found != super::h5::stored(want) {
            return Err(ResultsError::Mismatch { path: path.into(), attr, found, wanted: want.to_string() });
        }
    }
    Ok(())
}

/// Where the latest documents came from (see `RunAbout`); rewritten by every run.
pub(super) fn write_about(file: &File, meta: &RunMeta, path: &str) -> Result<(), ResultsError> {
    let a = &meta.about;
    for (attr, value) in [
        ("model_name", a.model_name.as_str()),
        ("model_dir", a.model_dir.as_str()),
        ("model_source", a.model_source.as_str()),
        ("corpus", a.corpus.as_str()),
        ("corpus_xxh3", a.corpus_hash.as_str()),
        ("version", env!("CARGO_PKG_VERSION")),
    ] {
        set_str_attr(file, attr, value, path)?;
    }
    Ok(())
}

/// Build the empty file under a temporary name and rename it into place, so the path
/// never holds a half-created file (and --overwrite replaces the old one atomically).
pub(super) fn create(path: &Path, meta: &RunMeta) -> Result<(), ResultsError> {
    let name = path.display().to_string();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| ResultsError::Io { path: dir.display().to_string(), source })?;
    }
    let tmp = tmp_path(path);
    if let Err(e) = build_empty(&tmp, meta, None) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|source| ResultsError::Io { path: name, source })
}

fn create_sets(group: &Group, sets: &[SetSpec], chunk: usize, path: &str) -> Result<(), ResultsError> {
    for s in sets {
        let ds = match s.kind {
            Kind::Str => create_set::<VarLenUnicode>(group, s.name, chunk, false, path)?,
            Kind::I32 => create_set::<i32>(group, s.name, chunk, true, path)?,
            Kind::I64 => create_set::<i64>(group, s.name, chunk, true, path)?,
            Kind::U64 => create_set::<u64>(group, s.name, chunk, true, path)?,
            Kind::F64 => create_set::<f64>(group, s.name, chunk, true, path)?,
        };
        set_str_attr(&ds, "description", s.description, path)?;
        if !s.units.is_empty() {
            set_str_attr(&ds, "units", s.units, path)?;
        }
    }
    Ok(())
}

/// A closed, empty results file at `path`; `created` keeps the original run's date.
pub(super) fn build_empty(path: &Path, meta: &RunMeta, created: Option<&str>) -> Result<(), ResultsError> {
    let name = path.display().to_string();
    let file = File::create(path).at(&name, "creating")?;
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    set_str_attr(&file, "schema", meta.schema(), &name)?;
    for (attr, value) in identity(meta) {
        set_str_attr(&file, attr, &value, &name)?;
    }
    set_str_attr(&file, "created", created.unwrap_or(&now), &name)?;
    let description = if meta.extract.is_some() {
        "falcon-batch extract: per document (/docs) its source's top_k spans, each (/choices, best first) with \
         its score (logprob: log P(span, then the span end | prompt)), offsets in the source and span-only \
         log-probability; the root attributes model, norm, template, target_delimiter, wire_dtype, compute, \
         top_k, max_span_units and span_end identify the run (a resume must match them); \
         closed_cleanly is 1 when the last writer closed the file, 0 while one has it open or was killed"
    } else {
        "falcon-batch scores: per document (/docs) the best choice under `norm`, per choice (/choices) its \
         log-probability given the rendered prompt; the root attributes model, norm, template, \
         target_delimiter, wire_dtype and compute identify the run (a resume must match them); \
         closed_cleanly is 1 when the last writer closed the file, 0 while one has it open or was killed"
    };
    set_str_attr(&file, "description", description, &name)?;
    write_about(&file, meta, &name)?;
    let docs = file.create_group("docs").at(&name, "creating /docs")?;
    create_sets(&docs, &DOC_SETS, DOC_CHUNK, &name)?;
    let choices = file.create_group("choices").at(&name, "creating /choices")?;
    create_sets(&choices, &CHOICE_SETS, CHOICE_CHUNK, &name)?;
    if meta.extract.is_some() {
        create_sets(&docs, &EXTRACT_DOC_SETS, DOC_CHUNK, &name)?;
        create_sets(&choices, &EXTRACT_ROW_SETS, CHOICE_CHUNK, &name)?;
    }
    set_closed(&file, true, &name)
}

pub(super) fn tmp_path(path: &Path) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    PathBuf::from(tmp)
}
