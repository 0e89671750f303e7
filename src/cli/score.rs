//! `falcon-batch score` and `falcon-batch show`.

use anyhow::{anyhow, Context, Result};
use super::ranks::{run_ranks, RankJob, ScheduleArgs};
use super::usage::UsageError;
use falcon_batch::backend::select::{cuda_available, DeviceChoice};
use falcon_batch::backend::{Backend, ComputeDtype};
use falcon_batch::corpus::{reads_once, spool, Limits, Spooled};
use falcon_batch::format::model_dir::ModelDir;
use falcon_batch::job::launch::{LaunchOptions, Launched};
use falcon_batch::job::score::{self, ScoreOptions, ScoreSummary};
use falcon_batch::job::paths::{check_distinct, PathError};
use falcon_batch::job::stop;
use falcon_batch::pipeline::PipelineScorer;
use falcon_batch::score::Norm;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

pub use super::show::{show, ShowArgs};

/// Exit status when the run finished but some documents failed (they are in the output).
pub const EXIT_SOME_FAILED: u8 = 3;

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
    /// A document with more choices fails, untokenised.
    #[arg(long, default_value_t = Limits::DEFAULT_CHOICES, value_parser = super::usage::at_least_one)]
    max_choices: usize,
    /// A document whose prompt and choices together make more tokens fails.
    #[arg(long, default_value_t = Limits::DEFAULT_DOC_TOKENS, value_parser = super::usage::at_least_one)]
    max_doc_tokens: usize,
    #[command(flatten)]
    schedule: ScheduleArgs,
}

pub fn score(a: ScoreArgs) -> Result<ExitCode> {
    run_score(a.model, a.docs, a.out, a.rest)
}

/// No subcommand: score, with the model and output defaults printed first.
pub fn score_by_default(a: DefaultScoreArgs) -> Result<ExitCode> {
    let env_model = std::env::var_os(MODEL_ENV).filter(|v| !v.is_empty()).map(PathBuf::from);
    let docs = a.docs.ok_or_else(|| anyhow!("--docs is required"))?;
    let defaults = resolve_defaults(a.model, env_model, Path::new("models"), a.out, &docs)?;
    if is_first_rank() {
        for line in &defaults.notes {
            falcon_batch::info!("{line}");
        }
    }
    run_score(defaults.model, docs, defaults.out, a.rest)
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
/// with a manifest.json) under `models`; `--out`, else results/<corpus file stem>.h5.
pub fn resolve_defaults(model: Option<PathBuf>, env_model: Option<PathBuf>, models: &Path, out: Option<PathBuf>, docs: &Path) -> Result<Defaults> {
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
            let o = Path::new("results").join(stem).with_extension("h5");
            notes.push(format!("--out {} (results/<corpus name>.h5)", o.display()));
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

/// Rank 0 under mpirun or srun, or no launcher: the defaults are printed once per job.
fn is_first_rank() -> bool {
    ["OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"]
        .iter()
        .find_map(|v| std::env::var(v).ok())
        .is_none_or(|r| r.trim() == "0")
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
fn corpus_to_read(docs: &Path) -> Result<(PathBuf, Option<Spooled>)> {
    if !is_first_rank() || !reads_once(docs) {
        return Ok((docs.to_path_buf(), None));
    }
    let spooled = spool(docs, &std::env::temp_dir())?;
    Ok((spooled.path().to_path_buf(), Some(spooled)))
}

fn run_score(model: PathBuf, docs: PathBuf, out: PathBuf, a: ScoreFlags) -> Result<ExitCode> {
    let norm = a.norm;
    check_distinct(&docs, &out, a.csv.as_deref()).map_err(|e| match &e {
        // The flag of the file that would be written over.
        PathError::Same { b, .. } => UsageError::new(b, e.to_string()),
        _ => UsageError::new("--out", e.to_string()),
    })?;
    // Kept until the job ends: the copy is removed when this drops.
    let (docs, _spooled) = corpus_to_read(&docs)?;
    let opts = ScoreOptions {
        docs,
        out,
        csv: a.csv.clone(),
        norm,
        template: a.template.clone(),
        delimiter: a.target_delimiter.clone(),
        batch_tokens: a.batch_tokens,
        // The schedule's wave once every rank has planned it (see drive).
        wave: a.wave.unwrap_or(0),
        overwrite: a.overwrite,
        rescore_changed: a.rescore_changed,
        retry_failed: a.retry_failed,
        wire: a.schedule.wire_dtype,
        compute: compute_name(&a.schedule),
        quiet: a.quiet,
        limits: Limits { line_bytes: a.max_line_bytes, choices: a.max_choices, doc_tokens: a.max_doc_tokens },
        batch_job: std::env::var("SLURM_JOB_ID").ok().filter(|v| !v.is_empty()),
    };
    let launch = LaunchOptions {
        model,
        schedule: a.schedule.options(a.wave, a.batch_tokens),
        wire: a.schedule.wire_dtype,
        job_options: serde_json::json!({
            "command": "score",
            "norm": norm.name(),
            "template": a.template.as_ref().map(|p| p.to_string_lossy().into_owned()),
            "delimiter": a.target_delimiter,
            "batch_tokens": a.batch_tokens,
            "compute_dtype": a.schedule.compute_dtype.map(|d| d.to_string()),
        }),
        trace: a.schedule.trace.is_some(),
    };
    stop::install();
    run_ranks(&a.schedule, ScoreJob { opts, launch })
}

/// The arithmetic the scores come from, as the results file records it: CUDA computes in
/// bf16; the CPU in --compute-dtype (f32 by default). `auto` is decided as rank 0's device is.
fn compute_name(schedule: &ScheduleArgs) -> String {
    let cuda = match schedule.device {
        DeviceChoice::Cpu => false,
        DeviceChoice::Cuda(_) => true,
        DeviceChoice::Auto => cuda_available().is_ok(),
    };
    if cuda { ComputeDtype::Bf16 } else { schedule.compute_dtype.unwrap_or_default() }.to_string()
}

struct ScoreJob {
    opts: ScoreOptions,
    launch: LaunchOptions,
}

impl RankJob for ScoreJob {
    type Prepared = score::Prepared;

    fn launch_options(&self) -> &LaunchOptions {
        &self.launch
    }

    /// The corpus, tokenizer and template, the output file and what to resume, checked
    /// before any weight is read.
    fn prepare(&self) -> Result<score::Prepared> {
        Ok(score::prepare(&ModelDir::open_for(&self.launch.model, &[])?, &self.opts)?)
    }

    fn needs_weights(&self, prepared: &score::Prepared) -> bool {
        !prepared.nothing_to_do()
    }

    fn drive_without_weights(&self, prepared: score::Prepared) -> Result<u8> {
        let s = score::finish_without_weights(&self.opts, prepared)?;
        Ok(self.report(&s))
    }

    fn drive<B: Backend + 'static>(&self, prepared: score::Prepared, launched: &mut Launched<B>) -> Result<u8> {
        let opts = ScoreOptions { wave: launched.worker.schedule().wave, ..self.opts.clone() };
        let mut scorer = PipelineScorer::new(&mut launched.worker)?;
        let s = score::run(&launched.dir, &opts, prepared, &mut scorer)?;
        Ok(self.report(&s))
    }
}

impl ScoreJob {
    /// The run's summary on stderr, and its exit code: 3 whenever the file holds failed
    /// documents (from this run or an earlier one).
    fn report(&self, s: &ScoreSummary) -> u8 {
        if !self.opts.quiet {
            falcon_batch::info!(
                "{}: {} documents ({} failed); this run added {} ({} resumed) in {:.1} s, {:.0} tokens/s",
                self.opts.out.display(),
                s.docs_in_file,
                s.failed_in_file,
                s.added,
                s.resumed,
                s.seconds,
                s.tokens as f64 / s.seconds.max(1e-9)
            );
            if s.failed_in_file > 0 {
                falcon_batch::info!(
                    "{0}: `falcon-batch show --failed {0}` lists the failed documents; a rerun retries those whose \
                     corpus line changed (--retry-failed: all of them)",
                    self.opts.out.display()
                );
            }
        }
        if s.stopped {
            falcon_batch::warn!(
                "{}: stopped by {} with {} documents in the file (every finished document is kept); run the same command again to resume",
                self.opts.out.display(),
                stop::signal_name().unwrap_or("a signal"),
                s.docs_in_file
            );
            return stop::EXIT_STOPPED;
        }
        if s.failed_in_file > 0 { EXIT_SOME_FAILED } else { 0 }
    }
}

