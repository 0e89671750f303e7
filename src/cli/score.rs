//! `falcon-batch score` and `falcon-batch show`.

use anyhow::{anyhow, Context, Result};
use super::ranks::{run_ranks, ScheduleArgs};
use super::usage::UsageError;
use falcon_batch::corpus::{reads_once, spool, Limits, Spooled};
use falcon_batch::job::score::ScoreOptions;
use falcon_batch::job::rank::RankSettings;
use falcon_batch::job::corpus_rank::{job_launch, CorpusJob, CorpusWork};
use falcon_batch::job::paths::{check_distinct, PathError};
use falcon_batch::job::stop;
use falcon_batch::score::Norm;
use falcon_batch::settings::Settings;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

pub use super::show::{show, ShowArgs};

/// `falcon-batch score`: the model and the output named.
#[derive(clap::Args)]
pub struct ScoreArgs {
    /// Model directory made by `falcon-batch convert`.
    #[arg(long)]
    model: PathBuf,
    /// Corpus: JSONL, one document per line; `-` (standard input) or a pipe is copied to a
    /// temporary file first.
    #[arg(long)]
    docs: PathBuf,
    /// HDF5 results; an existing file from the same model, template, norm and delimiter is resumed.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    rest: ScoreFlags,
}

/// `falcon-batch --docs corpus.jsonl` (no subcommand): score, with the model and output
/// found when not given (see [`resolve_defaults`]).
#[derive(clap::Args)]
pub struct DefaultScoreArgs {
    /// Model directory made by `falcon-batch convert` [default: $FALCON_BATCH_MODEL, else
    /// the only model directory under models/].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Corpus: JSONL, one document per line.
    // Required here, but an Option so that a subcommand (which negates it) still parses.
    #[arg(long, required = true)]
    docs: Option<PathBuf>,
    /// HDF5 results [default: results/<corpus name>.h5]; an existing file from the same run is resumed.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    rest: ScoreFlags,
}

/// Every score flag but the model, the corpus and the output.
#[derive(clap::Args)]
pub struct ScoreFlags {
    /// Also write one CSV row per choice here.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Score that picks the best choice: sum, mean (per token) or char (per character).
    #[arg(long, default_value = "sum", value_parser = super::usage::norm)]
    norm: Norm,
    /// A document with more choices fails, untokenised.
    #[arg(long, default_value_t = Limits::DEFAULT_CHOICES, value_parser = super::usage::at_least_one)]
    max_choices: usize,
    #[command(flatten)]
    run: RunFlags,
}

/// The flags score and extract share: the prompt, batching, resume, limits and schedule.
#[derive(clap::Args)]
pub struct RunFlags {
    /// Prompt template file with {text} and {question}.
    #[arg(long)]
    template: Option<PathBuf>,
    /// Put between the prompt and a choice where neither side has whitespace (lm-eval's
    /// target_delimiter) [default: " ", one space; "" for none].
    #[arg(long, default_value = " ", hide_default_value = true, allow_hyphen_values = true)]
    target_delimiter: String,
    /// Most tokens in one micro-batch.
    #[arg(long, default_value_t = 2048, value_parser = super::usage::at_least_one)]
    batch_tokens: usize,
    /// Micro-batches per wave [default: the planner's, 4 per rank].
    #[arg(long, value_parser = super::usage::at_least_one)]
    wave: Option<usize>,
    /// Replace an output file made with another model, template, norm, delimiter, wire dtype
    /// or corpus.
    #[arg(long)]
    overwrite: bool,
    /// Score again the documents whose prompt or choices changed since the output file
    /// scored them (without it such a run is refused); their old records are removed.
    #[arg(long)]
    rescore_changed: bool,
    /// Score again every failed document in the output file (by default only those whose
    /// corpus line changed).
    #[arg(long)]
    retry_failed: bool,
    /// No progress output.
    #[arg(long)]
    quiet: bool,
    /// A longer line fails as a document, unread (a size: 16MiB) [Limits::DEFAULT_LINE_BYTES].
    #[arg(long, default_value = "4MiB", value_parser = line_bytes)]
    max_line_bytes: usize,
    /// A document whose prompt and choices together make more tokens fails (extract: its prompt).
    #[arg(long, default_value_t = Limits::DEFAULT_DOC_TOKENS, value_parser = super::usage::at_least_one)]
    max_doc_tokens: usize,
    #[command(flatten)]
    pub schedule: ScheduleArgs,
}

impl RunFlags {
    /// The job's options; `norm` and `max_choices` are score's own (extract: sum, unused).
    fn options(&self, docs: PathBuf, out: PathBuf, csv: Option<PathBuf>, norm: Norm, max_choices: usize, rank: &RankSettings, env: &Settings) -> ScoreOptions {
        ScoreOptions {
            docs,
            out,
            csv,
            norm,
            template: self.template.clone(),
            delimiter: self.target_delimiter.clone(),
            batch_tokens: self.batch_tokens,
            // The schedule's wave once every rank has planned it (see the job's drive).
            wave: self.wave.unwrap_or(0),
            overwrite: self.overwrite,
            rescore_changed: self.rescore_changed,
            retry_failed: self.retry_failed,
            wire: self.schedule.wire_dtype,
            compute: rank.compute_name(),
            quiet: self.quiet,
            limits: Limits { line_bytes: self.max_line_bytes, choices: max_choices, doc_tokens: self.max_doc_tokens },
            batch_job: env.batch_job.clone(),
            faults: env.faults,
        }
    }

    /// Run a job over the corpus `docs` on every rank: the three paths checked, a corpus
    /// that reads only once copied for the run, the options (`work` adds the job's own to
    /// the common ones), and how every rank starts with what they must agree on (`job`: the
    /// command and its own options).
    #[allow(clippy::too_many_arguments)]
    pub fn run<W: CorpusWork>(
        &self,
        model: PathBuf,
        docs: PathBuf,
        out: PathBuf,
        csv: Option<PathBuf>,
        norm: Norm,
        max_choices: usize,
        env: &Settings,
        job: serde_json::Value,
        work: impl FnOnce(ScoreOptions) -> W,
    ) -> Result<ExitCode> {
        let docs = checked_paths(docs, &out, csv.as_deref())?;
        // Kept until the job ends: the copy is removed when this drops.
        let (docs, _spooled) = corpus_to_read(&docs, env)?;
        let rank = self.schedule.rank_settings(env);
        let opts = self.options(docs, out, csv, norm, max_choices, &rank, env);
        let compute_dtype = self.schedule.compute_dtype.map(|d| d.to_string());
        let launch = job_launch(model, &opts, job, self.schedule.options(self.wave, self.batch_tokens), compute_dtype, self.schedule.trace.is_some());
        stop::install();
        run_ranks(&rank, &CorpusJob::new(work(opts), launch))
    }
}

pub fn score(a: ScoreArgs, env: &Settings) -> Result<ExitCode> {
    run_score(a.model, a.docs, a.out, a.rest, env)
}

/// No subcommand: score, with the model and output defaults printed first.
pub fn score_by_default(a: DefaultScoreArgs, env: &Settings) -> Result<ExitCode> {
    let (docs, defaults) = announced_defaults(a.model, a.docs, a.out, env, "h5")?;
    run_score(defaults.model, docs, defaults.out, a.rest, env)
}

/// The corpus (required) and the model and output defaults of a command without `--model` /
/// `--out` (`ext`: the output's extension), each default taken said once per job.
pub fn announced_defaults(model: Option<PathBuf>, docs: Option<PathBuf>, out: Option<PathBuf>, env: &Settings, ext: &str) -> Result<(PathBuf, Defaults)> {
    let docs = docs.ok_or_else(|| anyhow!("--docs is required"))?;
    let defaults = resolve_defaults(model, env.model.clone(), Path::new("models"), out, &docs, ext)?;
    if env.first_rank {
        for line in &defaults.notes {
            falcon_batch::info!("{line}");
        }
    }
    Ok((docs, defaults))
}

/// The environment variable naming the model when `--model` is not given.
pub const MODEL_ENV: &str = "FALCON_BATCH_MODEL";

/// The model and output of a run without `--model` / `--out`, and a line per default taken.
#[derive(Debug, PartialEq)]
pub struct Defaults {
    pub model: PathBuf,
    pub out: PathBuf,
    pub notes: Vec<String>,
}

/// `--model`, else `env_model` ($FALCON_BATCH_MODEL), else the only model directory (one
/// with a manifest.json) under `models`; `--out`, else results/<corpus file stem>.<ext>.
pub fn resolve_defaults(model: Option<PathBuf>, env_model: Option<PathBuf>, models: &Path, out: Option<PathBuf>, docs: &Path, ext: &str) -> Result<Defaults> {
    let mut notes = vec![];
    let model = match (model, env_model) {
        (Some(m), _) => m,
        (None, Some(m)) => {
            notes.push(format!("--model {} (from ${MODEL_ENV})", m.display()));
            m
        }
        (None, None) => {
            let m = only_model_dir(models)?;
            notes.push(format!("--model {} (the only model directory under {}/)", m.display(), models.display()));
            m
        }
    };
    let out = match out {
        Some(o) => o,
        None => {
            let stem = docs.file_stem().filter(|s| !s.is_empty() && *s != "-").ok_or_else(|| UsageError::new("--out", format!("not given, and --docs {} has no file name to name the output after", docs.display())))?;
            let o = Path::new("results").join(stem).with_extension(ext);
            notes.push(format!("--out {} (results/<corpus name>.{ext})", o.display()));
            o
        }
    };
    Ok(Defaults { model, out, notes })
}

/// The single directory under `models` holding a manifest.json, or a usage error (exit 2:
/// the user is to name one) listing what is there.
fn only_model_dir(models: &Path) -> Result<PathBuf> {
    let hint = format!("pass --model DIR or set ${MODEL_ENV}");
    let usage = |msg: String| anyhow::Error::from(UsageError::new("--model", format!("not given, and {}/ {msg}; {hint}", models.display())));
    let entries = std::fs::read_dir(models).map_err(|e| usage(format!("cannot be read ({e})")))?;
    let mut dirs = vec![];
    let mut others = vec![];
    for e in entries {
        let path = e.with_context(|| format!("{}: cannot list", models.display()))?.path();
        if path.join("manifest.json").is_file() {
            dirs.push(path);
        } else {
            others.push(path);
        }
    }
    dirs.sort();
    others.sort();
    let list = |v: &[PathBuf]| v.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
    let none = "holds no model directory (one with a manifest.json, made by `falcon-batch convert`)";
    match dirs.len() {
        1 => Ok(dirs.remove(0)),
        0 if others.is_empty() => Err(usage(none.to_string())),
        0 => Err(usage(format!("{none}, only: {}", list(&others)))),
        _ => Err(usage(format!("holds several model directories: {}", list(&dirs)))),
    }
}

/// A size in bytes with its unit (`16MiB`), at least one byte.
fn line_bytes(s: &str) -> Result<usize, String> {
    let n = super::usage::size(s)?;
    match usize::try_from(n) {
        Ok(0) => Err("must be at least 1 byte".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{n} bytes is more than this machine can address")),
    }
}

/// The corpus the job reads: `docs` itself, or on the writer rank a copy of a corpus that can
/// be read only once (standard input, a pipe), removed when the returned Spooled drops. The
/// other ranks never read the corpus (mpirun gives standard input to rank 0 alone).
fn corpus_to_read(docs: &Path, env: &Settings) -> Result<(PathBuf, Option<Spooled>)> {
    if !env.first_rank || !reads_once(docs) {
        return Ok((docs.to_path_buf(), None));
    }
    let spooled = spool(docs, &env.temp_dir)?;
    Ok((spooled.path().to_path_buf(), Some(spooled)))
}

fn run_score(model: PathBuf, docs: PathBuf, out: PathBuf, a: ScoreFlags, env: &Settings) -> Result<ExitCode> {
    let job = serde_json::json!({"command": "score", "norm": a.norm.name()});
    a.run.run(model, docs, out, a.csv, a.norm, a.max_choices, env, job, |opts| opts)
}

/// The corpus, output and CSV must be three files: the flag of the one that would be
/// written over is the usage error's.
fn checked_paths(docs: PathBuf, out: &Path, csv: Option<&Path>) -> Result<PathBuf> {
    check_distinct(&docs, out, csv).map_err(|e| match &e {
        PathError::Same { b, .. } => UsageError::new(b, e.to_string()),
        _ => UsageError::new("--out", e.to_string()),
    })?;
    Ok(docs)
}
