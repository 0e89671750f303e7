//! The extract job over the ranks: its [`RankJob`], the same sequence as the score job's
//! (score_rank.rs) with extract.rs's passes as the writer's work.

use super::extract::{self, ExtractOptions};
use super::launch::{launch, LaunchOptions};
use super::rank::RankJob;
use super::resources::DeviceInfo;
use super::score::{self, Prepared};
use super::score_rank::report;
use super::JobError;
use crate::backend::Backend;
use crate::format::model_dir::ModelDir;
use crate::pipeline::{Cluster, PipelineScorer, Worker};

pub struct ExtractJob {
    opts: ExtractOptions,
    launch: LaunchOptions,
}

impl ExtractJob {
    /// `opts.run.wave` 0 takes the schedule's wave; `launch` from score_rank::job_launch.
    pub fn new(opts: ExtractOptions, launch: LaunchOptions) -> ExtractJob {
        ExtractJob { opts, launch }
    }
}

impl RankJob for ExtractJob {
    /// The model's manifest (for its context and tokenizer), and what extract.rs prepared.
    type Prepared = (ModelDir, Prepared);

    fn prepare(&self) -> Result<Self::Prepared, JobError> {
        let dir = ModelDir::open_for(&self.launch.model, &[])?;
        let prepared = extract::prepare(&dir, &self.opts)?;
        Ok((dir, prepared))
    }

    fn launch<B: Backend + 'static>(&self, cluster: &Cluster, backend: B, device: DeviceInfo) -> Result<Worker<B>, JobError> {
        Ok(launch(cluster, backend, device, &self.launch)?.worker)
    }

    fn needs_weights(&self, (_, prepared): &Self::Prepared) -> bool {
        !prepared.nothing_to_do()
    }

    fn drive_without_weights(&self, (_, prepared): Self::Prepared) -> Result<u8, JobError> {
        let s = score::finish_without_weights(&self.opts.run, prepared)?;
        Ok(report(&self.opts.run, &s))
    }

    fn drive<B: Backend + 'static>(&self, (dir, prepared): Self::Prepared, worker: &mut Worker<B>) -> Result<u8, JobError> {
        let mut opts = self.opts.clone();
        opts.run.wave = worker.schedule().wave;
        let mut scorer = PipelineScorer::new(worker)?;
        let s = extract::run(&dir, &opts, prepared, &mut scorer)?;
        Ok(report(&self.opts.run, &s))
    }
}
