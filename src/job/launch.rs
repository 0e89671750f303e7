//! Start-up of every rank of a job: agree on the model and options, plan the schedule, read
//! only this rank's parts, and build its pipeline worker.

use super::resources::DeviceInfo;
use super::JobError;
use crate::backend::Backend;
use crate::format::model_dir::ModelDir;
use crate::model::Part;
use crate::tensor::HostTensor;
use crate::pipeline::{read_rank_groups, Cluster, Identity, Worker};
use crate::schedule::cost::WireDtype;
use crate::schedule::{ModelShape, RankCaps, Schedule, ScheduleOptions};
use crate::trace::Trace;
use rayon::prelude::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

pub struct LaunchOptions {
    pub model: PathBuf,
    pub schedule: ScheduleOptions,
    /// Everything else every rank must agree on (norm, template, sampling...), as JSON.
    pub job_options: Value,
    pub trace: bool,
    /// Hidden states between ranks; None: the default for the manifest's dtype.
    pub wire: Option<WireDtype>,
}

pub struct Launched<B: Backend> {
    /// The model directory, checked for this rank's parts only.
    pub dir: ModelDir,
    pub worker: Worker<B>,
}

pub fn launch<B: Backend + 'static>(cluster: &Cluster, backend: B, device: DeviceInfo, opts: &LaunchOptions) -> Result<Launched<B>, JobError> {
    let manifest_only = ModelDir::open_for(&opts.model, &[])?;
    let cfg = manifest_only.config().clone();
    let wire = opts.wire.unwrap_or(WireDtype::default_for(manifest_only.manifest().dtype.size()));
    let schedule_options = serde_json::to_value(&opts.schedule).map_err(JobError::ScheduleOptions)?;
    let identity = Identity {
        model_id: manifest_only.manifest().model_id.clone(),
        // The trace is gathered by every rank at the end, so all must agree to write one.
        options: json!({"schedule": schedule_options, "job": opts.job_options, "trace": opts.trace}),
        wire_dtype: wire.name().to_string(),
    };
    // Both backends hold matrices in the manifest's dtype (the CPU widens only vectors), so the
    // memory a rank offers is counted in the files' bytes, as the schedule counts weights.
    let caps = RankCaps { device_bytes: device.memory_bytes, host_bytes: None, speed: 1.0, device: device.name };
    let ranks = cluster.exchange(&identity, &caps)?;
    // Sizes from the manifest's dtype, as `falcon-batch plan --model` computes them: every
    // rank (CPU or GPU) and the Slurm staging step must arrive at the same schedule.
    let shape = ModelShape::from_config(&cfg, manifest_only.manifest().dtype.size());
    let schedule = Schedule::plan(&shape, &ranks, &opts.schedule)?;
    crate::info!(rank cluster.rank; "{}", schedule.describe_layers(cluster.rank));
    let parts: Vec<Part> = schedule.rank_groups[cluster.rank].iter().flat_map(|&g| schedule.groups[g].parts()).collect();
    let dir = ModelDir::open_for(&opts.model, &parts)?;
    let started = std::time::Instant::now();
    dir.prefetch(&parts);
    // Parts are read (hashed over their file map, tensors left as ranges of it) on the rank's
    // threads at once, then handed to the groups in execution order.
    let mut read: HashMap<Part, Vec<(String, HostTensor)>> =
        parts.par_iter().map(|&p| dir.read_part(p).map(|t| (p, t))).collect::<Result<_, _>>()?;
    let host = read_rank_groups(&schedule, cluster.rank, |p| match read.remove(&p) {
        Some(tensors) => Ok(tensors),
        None => dir.read_part(p), // a part two groups share
    })?;
    let bytes: u64 = parts.iter().filter_map(|&p| dir.manifest().part(p)).map(|e| e.bytes).sum();
    crate::info!(
        rank cluster.rank;
        "read {} parts, {:.1} MiB in {:.2} s (content hashes checked)",
        parts.len(),
        bytes as f64 / (1 << 20) as f64,
        started.elapsed().as_secs_f64()
    );
    let trace = if opts.trace { Trace::for_rank(cluster.rank) } else { Trace::disabled() };
    let worker = Worker::new(cluster, Arc::new(backend), cfg, schedule, host, trace, wire)?;
    Ok(Launched { dir, worker })
}
