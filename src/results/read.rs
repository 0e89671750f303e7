//! Reading a results file back (CSV export, tests, the demo's accuracy).

use std::path::Path;

use hdf5::types::VarLenUnicode;
use hdf5::File;

use super::h5::{dataset, read_readable, read_str_attr};
use super::schema::{valid_prefix, CHOICE_SETS, DOC_SETS};
use super::{ChoiceRow, DocResult, DocStatus, ResultsError, SCHEMA};

fn strings(v: Vec<VarLenUnicode>) -> Vec<String> {
    v.iter().map(|s| s.as_str().to_string()).collect()
}

/// Every whole document in the file, in the order written. A torn tail (the file of a
/// killed job), including blocks HDF5 cannot read back, is left out, as a resume would
/// cut it; the file is not modified.
pub fn read_results(path: &Path) -> Result<Vec<DocResult>, ResultsError> {
    let p = path.display().to_string();
    let file = File::open(path).map_err(|e| ResultsError::NotResults { path: p.clone(), why: format!("cannot open it as HDF5: {e}") })?;
    match read_str_attr(&file, "schema") {
        Some(s) if s == SCHEMA => {}
        other => {
            let why = other.map_or("no schema attribute".to_string(), |s| format!("schema {s:?}, expected {SCHEMA:?}"));
            return Err(ResultsError::NotResults { path: p, why });
        }
    }
    let docs = file.group("docs").map_err(|e| ResultsError::Corrupt { path: p.clone(), msg: format!("missing group /docs: {e}") })?;
    let choices = file.group("choices").map_err(|e| ResultsError::Corrupt { path: p.clone(), msg: format!("missing group /choices: {e}") })?;
    let d = |name: &str| dataset(&docs, name, &p);
    let c = |name: &str| dataset(&choices, name, &p);

    let n = DOC_SETS.iter().map(|s| d(s).map(|ds| ds.size())).collect::<Result<Vec<_>, _>>()?.into_iter().min().unwrap_or(0);
    let rows = CHOICE_SETS.iter().map(|s| c(s).map(|ds| ds.size())).collect::<Result<Vec<_>, _>>()?.into_iter().min().unwrap_or(0);
    // Read what is readable, then keep the whole documents within it (see valid_prefix).
    let ids = strings(read_readable(&d("id")?, n));
    let status: Vec<VarLenUnicode> = read_readable(&d("status")?, n);
    let errors = strings(read_readable(&d("error")?, n));
    let n_prompt: Vec<i32> = read_readable(&d("n_prompt_tokens")?, n);
    let best: Vec<i32> = read_readable(&d("best")?, n);
    let offsets: Vec<i64> = read_readable(&d("choice_offset")?, n);
    let counts: Vec<i32> = read_readable(&d("n_choices")?, n);
    let texts = strings(read_readable(&c("text")?, rows));
    let n_tokens: Vec<i32> = read_readable(&c("n_tokens")?, rows);
    let logprob: Vec<f64> = read_readable(&c("logprob")?, rows);
    let mean: Vec<f64> = read_readable(&c("logprob_mean")?, rows);
    let per_char: Vec<f64> = read_readable(&c("logprob_per_char")?, rows);
    let prob: Vec<f64> = read_readable(&c("prob")?, rows);
    let n = [ids.len(), status.len(), errors.len(), n_prompt.len(), best.len(), offsets.len(), counts.len()].into_iter().min().unwrap_or(0);
    let rows = [texts.len(), n_tokens.len(), logprob.len(), mean.len(), per_char.len(), prob.len()].into_iter().min().unwrap_or(0);
    let (n, _) = valid_prefix(&status[..n], &offsets[..n], &counts[..n], rows);

    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        // valid_prefix checked offsets and counts against `rows`, so these ranges hold.
        let start = usize::try_from(offsets[i]).unwrap_or(0);
        let end = start + usize::try_from(counts[i]).unwrap_or(0);
        let choices = (start..end)
            .map(|r| ChoiceRow {
                text: texts[r].clone(),
                n_tokens: usize::try_from(n_tokens[r]).unwrap_or(0),
                logprob: logprob[r],
                logprob_mean: mean[r],
                logprob_per_char: per_char[r],
                prob: prob[r],
            })
            .collect();
        out.push(DocResult {
            id: ids[i].clone(),
            status: DocStatus::parse(status[i].as_str()).unwrap_or(DocStatus::Error),
            error: errors[i].clone(),
            n_prompt_tokens: usize::try_from(n_prompt[i]).unwrap_or(0),
            best: usize::try_from(best[i]).ok(),
            choices,
        });
    }
    Ok(out)
}
