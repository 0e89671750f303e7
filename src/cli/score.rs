//! `falcon-batch score` and `falcon-batch show`.

use anyhow::{anyhow, Context, Result};
use super::ranks::{run_ranks, RankJob, ScheduleArgs};
use falcon_batch::backend::Backend;
use falcon_batch::format::model_dir::ModelDir;
use falcon_batch::job::launch::{LaunchOptions, Launched};
use falcon_batch::job::score::{self, ScoreOptions};
use falcon_batch::pipeline::PipelineScorer;
use falcon_batch::results::read_results;
use falcon_batch::score::Norm;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit status when the run finished but some documents failed (they are in the output).
pub const EXIT_SOME_FAILED: u8 = 3;

#[derive(clap::Args)]
pub struct ScoreArgs {
    /// Model directory made by `falcon-batch convert`.
    #[arg(long)]
    model: PathBuf,
    /// Corpus: JSONL, one document per line.
    #[arg(long)]
    docs: PathBuf,
    /// HDF5 results; an existing file from the same model and template is resumed.
    #[arg(long)]
    out: PathBuf,
    /// Also write one CSV row per choice here.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Score that picks the best choice: sum, mean (per token) or char (per character).
    #[arg(long, default_value = "sum")]
    norm: String,
    /// Prompt template file with {text} and {question}.
    #[arg(long)]
    template: Option<PathBuf>,
    /// Most tokens in one micro-batch.
    #[arg(long, default_value_t = 2048)]
    batch_tokens: usize,
    /// Micro-batches per wave [default: the planner's, 4 per rank].
    #[arg(long)]
    wave: Option<usize>,
    /// Replace an output file made with another model, template or norm.
    #[arg(long)]
    overwrite: bool,
    /// No progress output.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    schedule: ScheduleArgs,
}

pub fn score(a: ScoreArgs) -> Result<ExitCode> {
    let norm = Norm::parse(&a.norm).ok_or_else(|| anyhow!("--norm: expected sum, mean or char, found `{}`", a.norm))?;
    if a.batch_tokens == 0 {
        return Err(anyhow!("--batch-tokens must be at least 1"));
    }
    let opts = ScoreOptions {
        docs: a.docs.clone(),
        out: a.out.clone(),
        csv: a.csv.clone(),
        norm,
        template: a.template.clone(),
        batch_tokens: a.batch_tokens,
        // The schedule's wave once every rank has planned it (see drive).
        wave: a.wave.unwrap_or(0),
        overwrite: a.overwrite,
        quiet: a.quiet,
    };
    let launch = LaunchOptions {
        model: a.model.clone(),
        schedule: a.schedule.options(a.wave, a.batch_tokens),
        wire: a.schedule.wire_dtype,
        job_options: format!("score norm={} template={:?} batch_tokens={}", norm.name(), a.template, a.batch_tokens),
        trace: a.schedule.trace.is_some(),
    };
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

    fn drive<B: Backend + 'static>(&self, prepared: score::Prepared, launched: &mut Launched<B>) -> Result<ExitCode> {
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
        Ok(if s.failed_in_file > 0 { ExitCode::from(EXIT_SOME_FAILED) } else { ExitCode::SUCCESS })
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
