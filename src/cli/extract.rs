//! `falcon-batch extract`: the exact top-k spans of each document's source. Flags and a
//! thin RankJob; the job is falcon_batch::job::extract.

use super::ranks::{run_ranks, RankJob};
use super::score::{checked_paths, corpus_to_read, is_first_rank, report, resolve_defaults, RunFlags, MODEL_ENV};
use anyhow::{anyhow, Result};
use falcon_batch::backend::Backend;
use falcon_batch::format::model_dir::ModelDir;
use falcon_batch::job::extract::{self, ExtractOptions, SpanEnd};
use falcon_batch::job::launch::{LaunchOptions, Launched};
use falcon_batch::job::score::Prepared;
use falcon_batch::job::stop;
use falcon_batch::pipeline::PipelineScorer;
use falcon_batch::score::Norm;
use std::path::{Path, PathBuf};
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

pub fn run(a: ExtractArgs) -> Result<ExitCode> {
    let env_model = std::env::var_os(MODEL_ENV).filter(|v| !v.is_empty()).map(PathBuf::from);
    let docs = a.docs.ok_or_else(|| anyhow!("--docs is required"))?;
    let defaults = resolve_defaults(a.model, env_model, Path::new("models"), a.out, &docs, "extract.h5")?;
    if is_first_rank() {
        for line in &defaults.notes {
            eprintln!("falcon-batch: {line}");
        }
    }
    let docs = checked_paths(docs, &defaults.out, a.csv.as_deref())?;
    // Kept until the job ends: the copy is removed when this drops.
    let (docs, _spooled) = corpus_to_read(&docs)?;
    let opts = ExtractOptions {
        run: a.run.options(docs, defaults.out, a.csv, Norm::Sum, usize::MAX),
        top_k: a.top_k,
        max_span_units: a.max_span_units,
        span_end: a.span_end.clone(),
        exhaustive: a.exhaustive,
    };
    let launch = a.run.launch(
        defaults.model,
        serde_json::json!({
            "command": "extract",
            "top_k": a.top_k,
            "max_span_units": a.max_span_units,
            "span_end": a.span_end.name(),
            "exhaustive": a.exhaustive,
        }),
    );
    stop::install();
    run_ranks(&a.run.schedule, ExtractJob { opts, launch })
}

struct ExtractJob {
    opts: ExtractOptions,
    launch: LaunchOptions,
}

impl RankJob for ExtractJob {
    type Prepared = Prepared;

    fn launch_options(&self) -> &LaunchOptions {
        &self.launch
    }

    fn prepare(&self) -> Result<Prepared> {
        Ok(extract::prepare(&ModelDir::open_for(&self.launch.model, &[])?, &self.opts)?)
    }

    fn needs_weights(&self, prepared: &Prepared) -> bool {
        !prepared.nothing_to_do()
    }

    fn drive_without_weights(&self, prepared: Prepared) -> Result<u8> {
        let s = falcon_batch::job::score::finish_without_weights(&self.opts.run, prepared)?;
        Ok(report(&self.opts.run, &s))
    }

    fn drive<B: Backend + 'static>(&self, prepared: Prepared, launched: &mut Launched<B>) -> Result<u8> {
        let mut opts = self.opts.clone();
        opts.run.wave = launched.worker.schedule().wave;
        let mut scorer = PipelineScorer::new(&mut launched.worker)?;
        let s = extract::run(&launched.dir, &opts, prepared, &mut scorer)?;
        Ok(report(&self.opts.run, &s))
    }
}
