//! CSV export, one row per choice, written from the HDF5 file so a resumed run's CSV
//! holds the documents of every run, not only the last.

use std::path::Path;

use super::{read_results, ResultsError};

/// Write `csv_path` from the results file at `h5_path`; returns the rows written. Failed
/// documents have no choices and so no rows (their errors are in the HDF5 file and log).
pub fn export_csv(h5_path: &Path, csv_path: &Path) -> Result<usize, ResultsError> {
    let docs = read_results(h5_path)?;
    let name = csv_path.display().to_string();
    // Write next to the target and rename: a reader never sees half a CSV.
    let mut tmp = csv_path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let written = write_rows(&docs, Path::new(&tmp), &name);
    if written.is_err() {
        // A full disk must not leave a half CSV beside the real one.
        let _ = std::fs::remove_file(&tmp);
    }
    let rows = written?;
    std::fs::rename(&tmp, csv_path).map_err(|source| ResultsError::Io { path: name.clone(), source })?;
    Ok(rows)
}

/// The header and one row per choice into `tmp`; `name` is the CSV path for messages.
fn write_rows(docs: &[super::DocResult], tmp: &Path, name: &str) -> Result<usize, ResultsError> {
    let err = |source| ResultsError::Csv { path: name.to_string(), source };
    let mut w = csv::Writer::from_path(tmp).map_err(err)?;
    w.write_record(["id", "choice", "text", "n_tokens", "logprob", "logprob_mean", "logprob_per_char", "prob", "is_best"])
        .map_err(err)?;
    let mut rows = 0;
    for d in docs {
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
            ])
            .map_err(err)?;
            rows += 1;
        }
    }
    w.flush().map_err(|source| ResultsError::Io { path: name.to_string(), source })?;
    Ok(rows)
}
