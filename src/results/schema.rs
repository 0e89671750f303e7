//! The results file's schema on disk: how an empty file is made, what a resumed one must
//! match, the closed-cleanly mark, and which prefix of a file is whole documents.

use std::path::{Path, PathBuf};

use hdf5::types::VarLenUnicode;
use hdf5::File;

use super::h5::{create_set, read_str_attr, write_str_attr};
use super::{At, ResultsError, RunMeta, SCHEMA};

// ~1024 documents or 4096 choice rows per chunk: a few appends per chunk at typical batch
// sizes, and small enough that the last, partly filled chunk costs little.
pub(super) const DOC_CHUNK: usize = 1024;

pub(super) const CHOICE_CHUNK: usize = 4096;

pub(super) const DOC_SETS: [&str; 7] = ["id", "status", "error", "n_prompt_tokens", "best", "choice_offset", "n_choices"];

pub(super) const CHOICE_SETS: [&str; 6] = ["text", "n_tokens", "logprob", "logprob_mean", "logprob_per_char", "prob"];

/// Root attribute: 1 when the last writer closed the file, 0 while one has it open. HDF5
/// (1.10, no SWMR) updates metadata in place, so a job killed mid-append can leave the
/// file readable but not safely writable; a file found not closed cleanly is rebuilt
/// from what it holds before anything is appended.
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

pub(super) fn check_meta(file: &File, meta: &RunMeta, path: &str) -> Result<(), ResultsError> {
    match read_str_attr(file, "schema") {
        Some(s) if s == SCHEMA => {}
        Some(s) => return Err(ResultsError::NotResults { path: path.into(), why: format!("schema {s:?}, expected {SCHEMA:?}") }),
        None => return Err(ResultsError::NotResults { path: path.into(), why: "no schema attribute".into() }),
    }
    let wanted = [
        ("model", meta.model_id.as_str()),
        ("norm", meta.norm.name()),
        ("template", meta.template.as_str()),
        ("target_delimiter", meta.delimiter.as_str()),
    ];
    for (attr, want) in wanted {
        let Some(found) = read_str_attr(file, attr) else {
            return Err(ResultsError::Unrecorded { path: path.into(), attr, wanted: want.to_string() });
        };
        if found != want {
            return Err(ResultsError::Mismatch { path: path.into(), attr, found, wanted: want.to_string() });
        }
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

/// A closed, empty results file at `path`; `created` keeps the original run's date.
pub(super) fn build_empty(path: &Path, meta: &RunMeta, created: Option<&str>) -> Result<(), ResultsError> {
    let name = path.display().to_string();
    let file = File::create(path).at(&name, "creating")?;
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    for (attr, value) in [
        ("schema", SCHEMA),
        ("model", meta.model_id.as_str()),
        ("norm", meta.norm.name()),
        ("template", meta.template.as_str()),
        ("target_delimiter", meta.delimiter.as_str()),
        ("created", created.unwrap_or(&now)),
        ("version", env!("CARGO_PKG_VERSION")),
    ] {
        write_str_attr(&file, attr, value, &name)?;
    }
    let docs = file.create_group("docs").at(&name, "creating /docs")?;
    create_set::<VarLenUnicode>(&docs, "id", DOC_CHUNK, &name)?;
    create_set::<VarLenUnicode>(&docs, "status", DOC_CHUNK, &name)?;
    create_set::<VarLenUnicode>(&docs, "error", DOC_CHUNK, &name)?;
    create_set::<i32>(&docs, "n_prompt_tokens", DOC_CHUNK, &name)?;
    create_set::<i32>(&docs, "best", DOC_CHUNK, &name)?;
    create_set::<i64>(&docs, "choice_offset", DOC_CHUNK, &name)?;
    create_set::<i32>(&docs, "n_choices", DOC_CHUNK, &name)?;
    let choices = file.create_group("choices").at(&name, "creating /choices")?;
    create_set::<VarLenUnicode>(&choices, "text", CHOICE_CHUNK, &name)?;
    create_set::<i32>(&choices, "n_tokens", CHOICE_CHUNK, &name)?;
    for set in ["logprob", "logprob_mean", "logprob_per_char", "prob"] {
        create_set::<f64>(&choices, set, CHOICE_CHUNK, &name)?;
    }
    set_closed(&file, true, &name)
}

pub(super) fn tmp_path(path: &Path) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    PathBuf::from(tmp)
}
