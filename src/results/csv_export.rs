//! CSV export, one row per choice and one per failed document, written from the HDF5 file
//! so a resumed run's CSV holds the documents of every run, not only the last.

use std::path::Path;

use super::{read_file, DocResult, ResultsError, EXTRACT_SCHEMA};

/// The columns, in order: the choice's scores, then the document's status and error (a
/// failed document has one row with its choice columns empty).
pub const CSV_HEADER: [&str; 11] =
    ["id", "choice", "text", "n_tokens", "logprob", "logprob_mean", "logprob_per_char", "prob", "is_best", "status", "error"];

/// An extract file's columns: one row per (document, rank), rank 1 the best span; a
/// failed document has no row.
pub const EXTRACT_CSV_HEADER: [&str; 9] = ["id", "rank", "text", "start", "end", "score", "span_logprob", "tokens", "prob"];

/// Write `csv_path` from the results file at `h5_path` (a scores or an extract file, each
/// with its own columns); returns the rows written.
pub fn export_csv(h5_path: &Path, csv_path: &Path) -> Result<usize, ResultsError> {
    let file = read_file(h5_path)?;
    if file.attrs.get("schema").is_some_and(|s| s == EXTRACT_SCHEMA) {
        write_with(&file.docs, csv_path, write_extract_rows)
    } else {
        write_csv(&file.docs, csv_path)
    }
}

/// Make sure a CSV can be written at `csv_path` (before a run spends hours scoring): not a
/// directory, and a file can be created beside it (it is written there, then renamed).
pub fn check_csv_target(csv_path: &Path) -> Result<(), ResultsError> {
    let name = csv_path.display().to_string();
    if csv_path.is_dir() {
        return Err(ResultsError::Io { path: name, source: std::io::Error::other("is a directory, expected a CSV file path") });
    }
    let mut tmp = csv_path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    std::fs::File::create(&tmp).map_err(|source| ResultsError::Io { path: name, source })?;
    let _ = std::fs::remove_file(&tmp);
    Ok(())
}

/// Write `docs` to `csv_path` (beside it first, then renamed: a reader never sees half a CSV).
pub fn write_csv(docs: &[DocResult], csv_path: &Path) -> Result<usize, ResultsError> {
    write_with(docs, csv_path, write_rows)
}

fn write_with(docs: &[DocResult], csv_path: &Path, rows: fn(&[DocResult], &Path, &str) -> Result<usize, ResultsError>) -> Result<usize, ResultsError> {
    let name = csv_path.display().to_string();
    let mut tmp = csv_path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let written = rows(docs, Path::new(&tmp), &name);
    if written.is_err() {
        // A full disk must not leave a half CSV beside the real one.
        let _ = std::fs::remove_file(&tmp);
    }
    let rows = written?;
    std::fs::rename(&tmp, csv_path).map_err(|source| ResultsError::Io { path: name.clone(), source })?;
    Ok(rows)
}

/// The header and the rows into `tmp`; `name` is the CSV path for messages.
fn write_rows(docs: &[DocResult], tmp: &Path, name: &str) -> Result<usize, ResultsError> {
    let err = |source| ResultsError::Csv { path: name.to_string(), source };
    let mut w = csv::Writer::from_path(tmp).map_err(err)?;
    w.write_record(CSV_HEADER).map_err(err)?;
    let mut rows = 0;
    for d in docs {
        let status = d.status.as_str();
        if d.choices.is_empty() {
            w.write_record([d.id.as_str(), "", "", "", "", "", "", "", "", status, &d.error]).map_err(err)?;
            rows += 1;
        }
        for (i, c) in d.choices.iter().enumerate() {
            let is_best = d.best == Some(i);
            w.write_record([
                d.id.as_str(),
                &i.to_string(),
                &c.text,
                &c.n_tokens.to_string(),
                &c.logprob.to_string(),
                &c.logprob_mean.to_string(),
                &c.logprob_per_char.to_string(),
                &c.prob.to_string(),
                if is_best { "1" } else { "0" },
                status,
                &d.error,
            ])
            .map_err(err)?;
            rows += 1;
        }
    }
    w.flush().map_err(|source| ResultsError::Io { path: name.to_string(), source })?;
    Ok(rows)
}

/// An extract file's rows into `tmp`; `name` is the CSV path for messages.
fn write_extract_rows(docs: &[DocResult], tmp: &Path, name: &str) -> Result<usize, ResultsError> {
    let err = |source| ResultsError::Csv { path: name.to_string(), source };
    let mut w = csv::Writer::from_path(tmp).map_err(err)?;
    w.write_record(EXTRACT_CSV_HEADER).map_err(err)?;
    let mut rows = 0;
    for d in docs {
        let spans = d.extract.as_ref().map_or(&[][..], |x| &x.spans[..]);
        for (rank, (c, s)) in d.choices.iter().zip(spans).enumerate() {
            w.write_record([
                d.id.as_str(),
                &(rank + 1).to_string(),
                &c.text,
                &s.start.to_string(),
                &s.end.to_string(),
                &c.logprob.to_string(),
                &s.span_logprob.to_string(),
                &c.n_tokens.to_string(),
                &c.prob.to_string(),
            ])
            .map_err(err)?;
            rows += 1;
        }
    }
    w.flush().map_err(|source| ResultsError::Io { path: name.to_string(), source })?;
    Ok(rows)
}
