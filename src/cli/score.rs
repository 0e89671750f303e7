//! `falcon-batch score` and `falcon-batch show`.

use anyhow::{anyhow, Context, Result};
use super::ranks::{run_ranks, RankJob, ScheduleArgs};
use falcon_batch::backend::Backend;
use falcon_batch::format::model_dir::ModelDir;
use falcon_batch::job::launch::{LaunchOptions, Launched};
use falcon_batch::job::score::{self, ScoreOptions};
use falcon_batch::job::stop;
use falcon_batch::pipeline::PipelineScorer;
use falcon_batch::results::read_results;
use falcon_batch::score::Norm;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Exit status when the run finished but some documents failed (they are in the output).
pub const EXIT_SOME_FAILED: u8 = 3;

/// `falcon-batch score`: the model and the output named.
#[derive(clap::Args)]
pub struct ScoreArgs {
    /// Model directory made by `falcon-batch convert`.
    #[arg(long)]
    model: PathBuf,
    /// Corpus: JSONL, one document per line.
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
    #[arg(long, default_value = "sum")]
    norm: String,
    /// Prompt template file with {text} and {question}.
    #[arg(long)]
    template: Option<PathBuf>,
    /// Put between the prompt and a choice where neither side has whitespace (lm-eval's
    /// target_delimiter) [default: " ", one space; "" for none].
    #[arg(long, default_value = " ", hide_default_value = true, allow_hyphen_values = true)]
    target_delimiter: String,
    /// Most tokens in one micro-batch.
    #[arg(long, default_value_t = 2048)]
    batch_tokens: usize,
    /// Micro-batches per wave [default: the planner's, 4 per rank].
    #[arg(long)]
    wave: Option<usize>,
    /// Replace an output file made with another model, template, norm or delimiter.
    #[arg(long)]
    overwrite: bool,
    /// No progress output.
    #[arg(long)]
    quiet: bool,
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
            eprintln!("falcon-batch: {line}");
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
            let stem = docs.file_stem().filter(|s| !s.is_empty()).ok_or_else(|| anyhow!("--docs {}: expected a file name to name the output after; pass --out", docs.display()))?;
            let o = Path::new("results").join(stem).with_extension("h5");
            notes.push(format!("--out {} (results/<corpus name>.h5)", o.display()));
            o
        }
    };
    Ok(Defaults { model, out, notes })
}

/// The single directory under `models` holding a manifest.json, or an error listing what is there.
fn only_model_dir(models: &Path) -> Result<PathBuf> {
    let hint = format!("pass --model DIR or set ${MODEL_ENV}");
    let entries = std::fs::read_dir(models).with_context(|| format!("no --model given and {}/ cannot be read; {hint}", models.display()))?;
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
    match dirs.len() {
        1 => Ok(dirs.remove(0)),
        0 if others.is_empty() => Err(anyhow!("no --model given and {}/ holds no model directory (one with a manifest.json, made by `falcon-batch convert`); {hint}", models.display())),
        0 => Err(anyhow!(
            "no --model given and {}/ holds no model directory (one with a manifest.json, made by `falcon-batch convert`), only: {}; {hint}",
            models.display(),
            list(&others)
        )),
        _ => Err(anyhow!("no --model given and {}/ holds several model directories: {}; {hint}", models.display(), list(&dirs))),
    }
}

/// Rank 0 under mpirun or srun, or no launcher: the defaults are printed once per job.
fn is_first_rank() -> bool {
    ["OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"]
        .iter()
        .find_map(|v| std::env::var(v).ok())
        .is_none_or(|r| r.trim() == "0")
}

fn run_score(model: PathBuf, docs: PathBuf, out: PathBuf, a: ScoreFlags) -> Result<ExitCode> {
    let norm = Norm::parse(&a.norm).ok_or_else(|| anyhow!("--norm: expected sum, mean or char, found `{}`", a.norm))?;
    if a.batch_tokens == 0 {
        return Err(anyhow!("--batch-tokens must be at least 1"));
    }
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
        quiet: a.quiet,
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

struct ScoreJob {
    opts: ScoreOptions,
    launch: LaunchOptions,
}

impl RankJob for ScoreJob {
    type Prepared = score::Prepared;

    fn launch_options(&self) -> &LaunchOptions {
        &self.launch
    }

    /// The corpus, tokenizer and template, checked before any weight is read.
    fn prepare(&self) -> Result<score::Prepared> {
        Ok(score::prepare(&ModelDir::open_for(&self.launch.model, &[])?, &self.opts)?)
    }

    fn drive<B: Backend + 'static>(&self, prepared: score::Prepared, launched: &mut Launched<B>) -> Result<u8> {
        let opts = ScoreOptions { wave: launched.worker.schedule().wave, ..self.opts.clone() };
        let mut scorer = PipelineScorer::new(&mut launched.worker)?;
        let s = score::run(&launched.dir, &opts, prepared, &mut scorer)?;
        if !self.opts.quiet {
            eprintln!(
                "{}: {} documents ({} failed); this run added {} ({} resumed) in {:.1} s, {:.0} tokens/s",
                self.opts.out.display(),
                s.docs_in_file,
                s.failed_in_file,
                s.added,
                s.resumed,
                s.seconds,
                s.tokens as f64 / s.seconds.max(1e-9)
            );
        }
        if s.stopped {
            eprintln!(
                "{}: stopped by SIGTERM with {} documents in the file; run the same command again to resume",
                self.opts.out.display(),
                s.docs_in_file
            );
            return Ok(stop::EXIT_STOPPED);
        }
        Ok(if s.failed_in_file > 0 { EXIT_SOME_FAILED } else { 0 })
    }
}

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
}

/// id -> "answer" of every corpus line that has one (other lines are ignored here).
fn answers(path: &PathBuf) -> Result<HashMap<String, String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v.get("id")?.as_str()?.to_string(), v.get("answer")?.as_str()?.to_string())))
        .collect())
}

fn clip(s: &str, n: usize) -> String {
    let s = s.replace('\n', " ");
    if s.chars().count() <= n {
        s
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

pub fn show(a: ShowArgs) -> Result<ExitCode> {
    let docs = read_results(&a.results)?;
    let answers = match &a.docs {
        Some(p) => answers(p)?,
        None => HashMap::new(),
    };
    println!("{:<16} {:<6} {:<28} {:>6}  {}", "id", "status", "best choice", "prob", if answers.is_empty() { "" } else { "answer" });
    let (mut judged, mut right) = (0, 0);
    for (i, d) in docs.iter().enumerate() {
        let best = d.best.and_then(|b| d.choices.get(b));
        let verdict = match (answers.get(&d.id), best) {
            (Some(ans), Some(c)) => {
                judged += 1;
                let ok = &c.text == ans;
                right += ok as usize;
                format!("{} {}", if ok { "✓" } else { "✗" }, clip(ans, 24))
            }
            (Some(ans), None) => {
                judged += 1;
                format!("✗ {}", clip(ans, 24))
            }
            _ => String::new(),
        };
        if a.limit.is_none_or(|l| i < l) {
            match best {
                Some(c) => println!("{:<16} {:<6} {:<28} {:>6.3}  {verdict}", clip(&d.id, 16), "ok", clip(&c.text, 28), c.prob),
                None => println!("{:<16} {:<6} {}", clip(&d.id, 16), "error", clip(&d.error, 70)),
            }
        }
    }
    let failed = docs.iter().filter(|d| !d.is_ok()).count();
    println!("{} documents, {} failed", docs.len(), failed);
    if judged > 0 {
        println!("accuracy {right}/{judged} = {:.1}%", 100.0 * right as f64 / judged as f64);
    }
    Ok(ExitCode::SUCCESS)
}
