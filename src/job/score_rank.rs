//! The score job over the ranks: its [`RankJob`] (the writer prepares the corpus, output and
//! resume plan, then drives waves through the pipeline) and the run's summary with its exit
//! code. The writer's own work is score.rs.

use super::launch::{launch, LaunchOptions};
use super::rank::RankJob;
use super::resources::DeviceInfo;
use super::score::{self, ScoreOptions, ScoreSummary};
use super::{stop, JobError};
use crate::backend::Backend;
use crate::format::model_dir::ModelDir;
use crate::pipeline::{Cluster, PipelineScorer, Worker};
use crate::schedule::ScheduleOptions;
use std::path::PathBuf;

/// Exit status when the run finished but some documents failed (they are in the output).
pub const EXIT_SOME_FAILED: u8 = 3;

pub struct ScoreJob {
    opts: ScoreOptions,
    launch: LaunchOptions,
}

impl ScoreJob {
    /// `opts.wave` 0 takes the schedule's wave; `launch` from [`job_launch`].
    pub fn new(opts: ScoreOptions, launch: LaunchOptions) -> ScoreJob {
        ScoreJob { opts, launch }
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
pub(super) fn report(opts: &ScoreOptions, s: &ScoreSummary) -> u8 {
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

impl RankJob for ScoreJob {
    /// The model's manifest (for its context), and what score.rs prepared.
    type Prepared = (ModelDir, score::Prepared);

    /// The corpus, tokenizer and template, the output file and what to resume, checked
    /// before any weight is read.
    fn prepare(&self) -> Result<Self::Prepared, JobError> {
        let dir = ModelDir::open_for(&self.launch.model, &[])?;
        let prepared = score::prepare(&dir, &self.opts)?;
        Ok((dir, prepared))
    }

    fn launch<B: Backend + 'static>(&self, cluster: &Cluster, backend: B, device: DeviceInfo) -> Result<Worker<B>, JobError> {
        Ok(launch(cluster, backend, device, &self.launch)?.worker)
    }

    fn needs_weights(&self, (_, prepared): &Self::Prepared) -> bool {
        !prepared.nothing_to_do()
    }

    fn drive_without_weights(&self, (_, prepared): Self::Prepared) -> Result<u8, JobError> {
        let s = score::finish_without_weights(&self.opts, prepared)?;
        Ok(report(&self.opts, &s))
    }

    fn drive<B: Backend + 'static>(&self, (dir, prepared): Self::Prepared, worker: &mut Worker<B>) -> Result<u8, JobError> {
        let opts = ScoreOptions { wave: worker.schedule().wave, ..self.opts.clone() };
        let mut scorer = PipelineScorer::new(worker)?;
        let s = score::run(&dir, &opts, prepared, &mut scorer)?;
        Ok(report(&self.opts, &s))
    }
}
