//! `falcon-batch extract`: the exact top-k spans of each document's source. Its own flags
//! beside score's RunFlags; the job is falcon_batch::job::extract (its RankJob:
//! job::corpus_rank).

use super::score::{announced_defaults, RunFlags};
use anyhow::Result;
use falcon_batch::job::extract::{ExtractOptions, SpanEnd};
use falcon_batch::score::Norm;
use falcon_batch::settings::Settings;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct ExtractArgs {
    /// Model directory made by `falcon-batch convert` [default: $FALCON_BATCH_MODEL, else
    /// the only model directory under models/].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Corpus: JSONL, one document per line: {"id", "text", "question"} (the source is
    /// "text") or {"id", "prompt", "source"}; an optional "answer" is kept for `show`.
    #[arg(long, required = true)]
    docs: Option<PathBuf>,
    /// HDF5 results [default: results/<corpus name>.extract.h5]; an existing file from the
    /// same run is resumed.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write one CSV row per (document, rank) here.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Spans kept per document, best first.
    #[arg(long, default_value_t = 5, value_parser = super::usage::at_least_one)]
    top_k: usize,
    /// Longest span, in units of the source (\w+ or one other non-space character).
    #[arg(long, default_value_t = 16, value_parser = super::usage::at_least_one)]
    max_span_units: usize,
    /// What must follow a span, scored with it: text (encoded alone, without special
    /// tokens) or `eos` (the tokenizer's end-of-sequence token) [default: "\n"].
    #[arg(long, default_value = "\n", hide_default_value = true, allow_hyphen_values = true, value_parser = span_end)]
    span_end: SpanEnd,
    /// Score every candidate (no pruning by bounds): the same top-k, slower; for tests.
    #[arg(long, hide = true)]
    exhaustive: bool,
    #[command(flatten)]
    run: RunFlags,
}

fn span_end(s: &str) -> Result<SpanEnd, String> {
    match s {
        "" => Err("expected text that makes at least one token, or eos".into()),
        "eos" => Ok(SpanEnd::Eos),
        t => Ok(SpanEnd::Text(t.to_string())),
    }
}

pub fn run(a: ExtractArgs, env: &Settings) -> Result<ExitCode> {
    let (docs, defaults) = announced_defaults(a.model, a.docs, a.out, env, "extract.h5")?;
    let job = serde_json::json!({
        "command": "extract",
        "top_k": a.top_k,
        "max_span_units": a.max_span_units,
        "span_end": a.span_end.name(),
        "exhaustive": a.exhaustive,
    });
    let (top_k, max_span_units, span_end, exhaustive) = (a.top_k, a.max_span_units, a.span_end, a.exhaustive);
    a.run.run(defaults.model, docs, defaults.out, a.csv, Norm::Sum, usize::MAX, env, job, |run| ExtractOptions { run, top_k, max_span_units, span_end, exhaustive })
}
