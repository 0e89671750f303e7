//! `falcon-batch show`: a results file as a table (with accuracy against the corpus's
//! answers), its failed documents, a re-ranking under another norm, a CSV export, or a
//! check of every byte HDF5 and the text checks cover. All printing goes through one
//! writer that ends quietly when the reader goes away (`show ... | head`).

use anyhow::{Context, Result};
use falcon_batch::corpus::FileHasher;
use falcon_batch::extract::squad;
use falcon_batch::results::{export_csv, read_file, write_csv, DocResult, ResultsFile, EXTRACT_SCHEMA};
use falcon_batch::score::Norm;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct ShowArgs {
    /// HDF5 results file.
    results: PathBuf,
    /// The corpus, to compare with its "answer" fields.
    #[arg(long)]
    docs: Option<PathBuf>,
    /// Rows to print (all by default).
    #[arg(long)]
    limit: Option<usize>,
    /// Full ids, choice texts and errors, not cut to the columns.
    #[arg(long)]
    wide: bool,
    /// Only the failed documents, each with its whole error.
    #[arg(long)]
    failed: bool,
    /// Rank the choices under this norm (sum, mean or char) instead of the file's, from the
    /// stored per-choice log-probabilities: no rescoring.
    #[arg(long, value_parser = super::usage::norm)]
    norm: Option<Norm>,
    /// Write one CSV row per choice (and per failed document) here instead of the table.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Read every dataset and check every checksum; say whether the file is whole (exit 1
    /// when it is damaged or was not closed cleanly).
    #[arg(long)]
    verify: bool,
}

/// id -> "answer" of every corpus line that has one (other lines are ignored here).
fn answers(path: &Path) -> Result<HashMap<String, String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v.get("id")?.as_str()?.to_string(), v.get("answer")?.as_str()?.to_string())))
        .collect())
}

/// Accuracy against a corpus other than the one scored would judge stale scores: say so.
fn warn_if_other_corpus(path: &Path, file: &ResultsFile) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut h = FileHasher::default();
    h.update(&bytes);
    if let Some(scored) = file.attrs.get("corpus_xxh3").filter(|&x| *x != h.finish()) {
        let from = file.attrs.get("corpus").map_or("?", String::as_str);
        falcon_batch::warn!(
            "{} is not the corpus these scores were made from ({from}, xxh3 {scored}): documents edited since are judged by their old scores",
            path.display()
        );
    }
    Ok(())
}

/// `s` on one line, cut to `n` characters unless `wide`.
fn clip(s: &str, n: usize, wide: bool) -> String {
    let s = s.replace('\n', " ");
    if wide || s.chars().count() <= n {
        s
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

pub fn show(a: ShowArgs) -> Result<ExitCode> {
    let norm = a.norm;
    let mut file = read_file(&a.results)?;
    if a.verify {
        return verify(&a.results, &file);
    }
    if !file.closed_cleanly {
        falcon_batch::warn!(
            "{}: not closed cleanly (a run is writing it, or was killed): showing its {} whole documents",
            a.results.display(),
            file.docs.len()
        );
    }
    if let Some(norm) = norm {
        file.docs = file.docs.iter().map(|d| d.reranked(norm)).collect();
    }
    let extract = file.attrs.get("schema").is_some_and(|s| s == EXTRACT_SCHEMA);
    if let Some(csv) = &a.csv {
        // An extract file has its own columns (one row per span), written from the file.
        let rows = if extract { export_csv(&a.results, csv)? } else { write_csv(&file.docs, csv)? };
        falcon_batch::info!("{}: {rows} rows", csv.display());
        return Ok(ExitCode::SUCCESS);
    }
    let mut answers = match &a.docs {
        Some(p) => {
            warn_if_other_corpus(p, &file)?;
            answers(p)?
        }
        None => HashMap::new(),
    };
    if extract && a.docs.is_none() {
        // An extract file keeps each document's answer.
        answers = file.docs.iter().filter_map(|d| d.extract.as_ref().filter(|x| !x.answer.is_empty()).map(|x| (d.id.clone(), x.answer.clone()))).collect();
    }
    let mut out = std::io::stdout().lock();
    // A reader that left (`| head`) is OutError::Closed, which main ends quietly.
    table(&mut out, &a, &file, norm, &answers).and_then(|()| out.flush()).map_err(super::out::OutError::from)?;
    Ok(ExitCode::SUCCESS)
}

/// `--verify`: the file was read whole and checked by `read_file`; say so.
fn verify(path: &Path, file: &ResultsFile) -> Result<ExitCode> {
    let rows: usize = file.docs.iter().map(|d| d.choices.len()).sum();
    if !file.closed_cleanly {
        falcon_batch::error!(
            "{}: not closed cleanly (a run is writing it, or was killed); its first {} documents are whole; \
             run the score command again to repair the tail",
            path.display(),
            file.docs.len()
        );
        return Ok(ExitCode::from(1));
    }
    crate::outln!(
        "{}: whole: {} documents and {rows} choice rows read, every chunk's checksum and every document's text check match",
        path.display(),
        file.docs.len()
    )?;
    Ok(ExitCode::SUCCESS)
}

fn table(out: &mut impl Write, a: &ShowArgs, file: &ResultsFile, norm: Option<Norm>, answers: &HashMap<String, String>) -> std::io::Result<()> {
    let w = a.wide;
    let attr = |k: &str| file.attrs.get(k).map_or("?", String::as_str);
    let ranked = match norm {
        Some(n) if n.name() != attr("norm") => format!("{} (re-ranked; the file's is {})", n.name(), attr("norm")),
        _ => attr("norm").to_string(),
    };
    let extract = attr("schema") == EXTRACT_SCHEMA;
    if extract {
        writeln!(out, "# model {} ({}), extract top {} spans, corpus {}", attr("model_name"), attr("model"), attr("top_k"), attr("corpus"))?;
    } else {
        writeln!(out, "# model {} ({}), norm {ranked}, corpus {}", attr("model_name"), attr("model"), attr("corpus"))?;
    }
    if a.failed {
        writeln!(out, "{:<16} error", "id")?;
    } else {
        let best = if extract { "best span" } else { "best choice" };
        writeln!(out, "{:<16} {:<6} {:<28} {:>6}  {}", "id", "status", best, "prob", if answers.is_empty() { "" } else { "answer" })?;
    }
    let (mut judged, mut right, mut printed, mut f1) = (0, 0, 0, 0.0);
    for d in &file.docs {
        let best = d.best.and_then(|b| d.choices.get(b));
        let verdict = match (answers.get(&d.id), best) {
            (Some(ans), Some(c)) => {
                judged += 1;
                // A span is judged as SQuAD judges answers; a choice must be the answer.
                let ok = if extract { squad::exact_match(&c.text, ans) } else { &c.text == ans };
                f1 += if extract { squad::token_f1(&c.text, ans) } else { 0.0 };
                right += ok as usize;
                format!("{} {}", if ok { "✓" } else { "✗" }, clip(ans, 24, w))
            }
            (Some(ans), None) => {
                judged += 1;
                format!("✗ {}", clip(ans, 24, w))
            }
            _ => String::new(),
        };
        if a.failed && d.is_ok() || a.limit.is_some_and(|l| printed >= l) {
            continue;
        }
        printed += 1;
        row(out, d, best, &verdict, a)?;
    }
    let failed = file.docs.iter().filter(|d| !d.is_ok()).count();
    writeln!(out, "{} documents, {} failed", file.docs.len(), failed)?;
    if judged > 0 && extract {
        let (em, f1) = (100.0 * right as f64 / judged as f64, 100.0 * f1 / judged as f64);
        writeln!(out, "exact match {right}/{judged} = {em:.1}%, token F1 {f1:.1}% (SQuAD normalisation)")?;
    } else if judged > 0 {
        writeln!(out, "accuracy {right}/{judged} = {:.1}%", 100.0 * right as f64 / judged as f64)?;
    }
    Ok(())
}

fn row(out: &mut impl Write, d: &DocResult, best: Option<&falcon_batch::results::ChoiceRow>, verdict: &str, a: &ShowArgs) -> std::io::Result<()> {
    let w = a.wide;
    if a.failed {
        return writeln!(out, "{:<16} {}", clip(&d.id, 16, w), d.error.replace('\n', " "));
    }
    match best {
        Some(c) => writeln!(out, "{:<16} {:<6} {:<28} {:>6.3}  {verdict}", clip(&d.id, 16, w), "ok", clip(&c.text, 28, w), c.prob),
        None => writeln!(out, "{:<16} {:<6} {}", clip(&d.id, 16, w), "error", clip(&d.error, 70, w)),
    }
}
