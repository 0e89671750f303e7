//! A job over a corpus (score, extract) as a [`RankJob`]: the writer prepares the corpus,
//! output and resume plan before any weight is read, then drives waves through the
//! pipeline; the run's summary and its exit code. The writers' own work is score.rs and
//! extract.rs, each behind [`CorpusWork`].

use super::extract::{self, ExtractOptions};
use super::launch::{launch, LaunchOptions};
use super::rank::RankJob;
use super::resources::DeviceInfo;
use super::score::{self, ScoreOptions, ScoreSummary};
use super::{stop, JobError};
use crate::backend::Backend;
use crate::format::model_dir::ModelDir;
use crate::pipeline::{Cluster, PipelineScorer, Worker};
use crate::runner::BatchScorer;
use crate::schedule::ScheduleOptions;
use std::path::PathBuf;

/// Exit status when the run finished but some documents failed (they are in the output).
pub const EXIT_SOME_FAILED: u8 = 3;

/// What a kind of corpus job does on the writer rank: its options are this type.
pub trait CorpusWork: Clone {
    /// The options every corpus job has (output, resume, limits...).
    fn run_options(&self) -> &ScoreOptions;
    /// The same options with the schedule's wave.
    fn with_wave(&self, wave: usize) -> Self;
    /// The corpus, tokenizer and template, the output file and what to resume, checked
    /// before any weight is read.
    fn prepare(&self, dir: &ModelDir) -> Result<score::Prepared, JobError>;
    /// The writer's work over the scorer.
    fn run<S: BatchScorer + ?Sized>(&self, dir: &ModelDir, prepared: score::Prepared, scorer: &mut S) -> Result<ScoreSummary, JobError>
    where
        JobError: From<S::Error>;
}

impl CorpusWork for ScoreOptions {
    fn run_options(&self) -> &ScoreOptions {
        self
    }
    fn with_wave(&self, wave: usize) -> Self {
        ScoreOptions { wave, ..self.clone() }
    }
    fn prepare(&self, dir: &ModelDir) -> Result<score::Prepared, JobError> {
        score::prepare(dir, self)
    }
    fn run<S: BatchScorer + ?Sized>(&self, dir: &ModelDir, prepared: score::Prepared, scorer: &mut S) -> Result<ScoreSummary, JobError>
    where
        JobError: From<S::Error>,
    {
        score::run(dir, self, prepared, scorer)
    }
}

impl CorpusWork for ExtractOptions {
    fn run_options(&self) -> &ScoreOptions {
        &self.run
    }
    fn with_wave(&self, wave: usize) -> Self {
        ExtractOptions { run: self.run.with_wave(wave), ..self.clone() }
    }
    fn prepare(&self, dir: &ModelDir) -> Result<score::Prepared, JobError> {
        extract::prepare(dir, self)
    }
    fn run<S: BatchScorer + ?Sized>(&self, dir: &ModelDir, prepared: score::Prepared, scorer: &mut S) -> Result<ScoreSummary, JobError>
    where
        JobError: From<S::Error>,
    {
        extract::run(dir, self, prepared, scorer)
    }
}

/// A corpus job of kind `W` on the ranks.
pub struct CorpusJob<W: CorpusWork> {
    work: W,
    launch: LaunchOptions,
}

pub type ScoreJob = CorpusJob<ScoreOptions>;
pub type ExtractJob = CorpusJob<ExtractOptions>;

impl<W: CorpusWork> CorpusJob<W> {
    /// A run wave of 0 takes the schedule's wave; `launch` from [`job_launch`].
    pub fn new(work: W, launch: LaunchOptions) -> CorpusJob<W> {
        CorpusJob { work, launch }
    }
}

/// How every rank of a job over the corpus (score, extract) starts: `job` names the command
/// and its own options, to which the prompt and batching options are added for the ranks to
/// agree on; `schedule.wave` is the wave asked for (None: the planner's); `compute_dtype` is
/// the flag as given.
pub fn job_launch(model: PathBuf, opts: &ScoreOptions, mut job: serde_json::Value, schedule: ScheduleOptions, compute_dtype: Option<String>, trace: bool) -> LaunchOptions {
    job["template"] = serde_json::json!(opts.template.as_ref().map(|p| p.to_string_lossy().into_owned()));
    job["delimiter"] = serde_json::json!(opts.delimiter);
    job["batch_tokens"] = serde_json::json!(opts.batch_tokens);
    job["compute_dtype"] = serde_json::json!(compute_dtype);
    LaunchOptions { model, wire: opts.wire, job_options: job, schedule, trace }
}

/// The run's summary on stderr, and its exit code: 3 whenever the file holds failed
/// documents (from this run or an earlier one), 75 when a signal stopped it.
fn report(opts: &ScoreOptions, s: &ScoreSummary) -> u8 {
    if !opts.quiet {
        crate::info!(
            "{}: {} documents ({} failed); this run added {} ({} resumed) in {:.1} s, {:.0} tokens/s",
            opts.out.display(),
            s.docs_in_file,
            s.failed_in_file,
            s.added,
            s.resumed,
            s.seconds,
            s.tokens as f64 / s.seconds.max(1e-9)
        );
        if s.failed_in_file > 0 {
            crate::info!(
                "{0}: `falcon-batch show --failed {0}` lists the failed documents; a rerun retries those whose \
                 corpus line changed (--retry-failed: all of them)",
                opts.out.display()
            );
        }
    }
    if s.stopped {
        crate::warn!(
            "{}: stopped by {} with {} documents in the file (every finished document is kept); run the same command again to resume",
            opts.out.display(),
            stop::signal_name().unwrap_or("a signal"),
            s.docs_in_file
        );
        return stop::EXIT_STOPPED;
    }
    if s.failed_in_file > 0 { EXIT_SOME_FAILED } else { 0 }
}

impl<W: CorpusWork> RankJob for CorpusJob<W> {
    /// The model's manifest (for its context and tokenizer), and what the writer prepared.
    type Prepared = (ModelDir, score::Prepared);

    fn prepare(&self) -> Result<Self::Prepared, JobError> {
        let dir = ModelDir::open_for(&self.launch.model, &[])?;
        let prepared = self.work.prepare(&dir)?;
        Ok((dir, prepared))
    }

    fn launch<B: Backend + 'static>(&self, cluster: &Cluster, backend: B, device: DeviceInfo) -> Result<Worker<B>, JobError> {
        Ok(launch(cluster, backend, device, &self.launch)?.worker)
    }

    fn needs_weights(&self, (_, prepared): &Self::Prepared) -> bool {
        !prepared.nothing_to_do()
    }

    fn drive_without_weights(&self, (_, prepared): Self::Prepared) -> Result<u8, JobError> {
        let s = score::finish_without_weights(self.work.run_options(), prepared)?;
        Ok(report(self.work.run_options(), &s))
    }

    fn drive<B: Backend + 'static>(&self, (dir, prepared): Self::Prepared, worker: &mut Worker<B>) -> Result<u8, JobError> {
        let work = self.work.with_wave(worker.schedule().wave);
        let mut scorer = PipelineScorer::new(worker)?;
        let s = work.run(&dir, prepared, &mut scorer)?;
        Ok(report(self.work.run_options(), &s))
    }
}
