//! Start-up of every rank of a job: agree on the model and options, plan the schedule, read
//! only this rank's parts, and build its pipeline worker.

use super::JobError;
use crate::backend::Backend;
use crate::format::model_dir::ModelDir;
use crate::model::Part;
use crate::pipeline::{read_rank_groups, Cluster, Identity, Worker};
use crate::schedule::cost::WireDtype;
use crate::schedule::{ModelShape, RankCaps, Schedule, ScheduleOptions};
use crate::trace::Trace;
use std::path::PathBuf;
use std::sync::Arc;

pub struct LaunchOptions {
    pub model: PathBuf,
    pub schedule: ScheduleOptions,
    /// Everything else every rank must agree on (norm, template, sampling...), as text.
    pub job_options: String,
    pub trace: bool,
    /// Hidden states between ranks; None: the default for the manifest's dtype.
    pub wire: Option<WireDtype>,
}

/// What a rank offers: its device and the memory it has for weights.
pub struct DeviceInfo {
    pub name: String,
    pub memory_bytes: u64,
    /// Bytes the backend keeps per weight element when that differs from the manifest's dtype
    /// (the CPU backend widens every weight to f32: 4); None: stored as in the files.
    pub held_weight_bytes: Option<usize>,
}

pub struct Launched<B: Backend> {
    /// The model directory, checked for this rank's parts only.
    pub dir: ModelDir,
    pub worker: Worker<B>,
}

/// Ranks of this job on this node (Open MPI tells each process; 1 without mpirun).
pub fn local_ranks() -> u64 {
    std::env::var("OMPI_COMM_WORLD_LOCAL_SIZE").ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or(1).max(1)
}

/// Threads for a CPU rank: the node's cores shared by its ranks, so that several ranks per
/// node do not each take every core. RAYON_NUM_THREADS, when set, wins.
pub fn cpu_threads_per_rank() -> usize {
    if let Some(n) = std::env::var("RAYON_NUM_THREADS").ok().and_then(|v| v.parse::<usize>().ok()).filter(|&n| n > 0) {
        return n;
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    (cores / local_ranks() as usize).max(1)
}

/// Memory a CPU rank may use for weights: what the node has available, shared by its ranks.
pub fn cpu_memory_per_rank() -> u64 {
    let available_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find(|l| l.starts_with("MemAvailable:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .unwrap_or(8 << 20);
    available_kb * 1024 / local_ranks()
}

/// Memory of `bytes` for weights held at `held` bytes per element, counted in `stored`-byte
/// elements as the schedule counts them.
pub fn scale_for_widening(bytes: u64, stored: usize, held: usize) -> u64 {
    (bytes as u128 * stored as u128 / held.max(1) as u128) as u64
}

pub fn launch<B: Backend + 'static>(cluster: &Cluster, backend: B, device: DeviceInfo, opts: &LaunchOptions) -> Result<Launched<B>, JobError> {
    let manifest_only = ModelDir::open_for(&opts.model, &[])?;
    let cfg = manifest_only.config().clone();
    let wire = opts.wire.unwrap_or(WireDtype::default_for(manifest_only.manifest().dtype.size()));
    let identity = Identity {
        model_id: manifest_only.manifest().model_id.clone(),
        // The trace is gathered by every rank at the end, so all must agree to write one.
        options_hash: format!("{:?} {} trace={}", opts.schedule, opts.job_options, opts.trace),
        wire_dtype: wire.name().to_string(),
    };
    // The schedule counts weights in the manifest's dtype (every rank and the Slurm staging step
    // must plan alike), so a backend that holds them wider offers proportionally fewer of those
    // bytes: a CPU rank with bf16 weights fits half as many layers as its memory in bf16.
    let dtype_bytes = manifest_only.manifest().dtype.size();
    let device_bytes = match device.held_weight_bytes {
        Some(held) if held > dtype_bytes => scale_for_widening(device.memory_bytes, dtype_bytes, held),
        _ => device.memory_bytes,
    };
    let caps = RankCaps { device_bytes, host_bytes: None, speed: 1.0, device: device.name };
    let ranks = cluster.exchange(&identity, &caps)?;
    // Sizes from the manifest's dtype, as `falcon-batch plan --model` computes them: every
    // rank (CPU or GPU) and the Slurm staging step must arrive at the same schedule.
    let shape = ModelShape::from_config(&cfg, manifest_only.manifest().dtype.size());
    let schedule = Schedule::plan(&shape, &ranks, &opts.schedule)?;
    eprintln!("{}", schedule.describe_rank(cluster.rank));
    let parts: Vec<Part> = schedule.rank_groups[cluster.rank].iter().flat_map(|&g| schedule.groups[g].parts()).collect();
    let dir = ModelDir::open_for(&opts.model, &parts)?;
    let started = std::time::Instant::now();
    let host = read_rank_groups(&schedule, cluster.rank, |p| dir.read_part(p))?;
    let bytes: u64 = parts.iter().filter_map(|&p| dir.manifest().part(p)).map(|e| e.bytes).sum();
    let checked = if dir.manifest().has_fast_hashes() { "content hashes checked" } else { "not checked: no fast hashes" };
    eprintln!(
        "rank {}: read {} parts, {:.1} MiB in {:.2} s ({checked})",
        cluster.rank,
        parts.len(),
        bytes as f64 / (1 << 20) as f64,
        started.elapsed().as_secs_f64()
    );
    let trace = if opts.trace { Trace::for_rank(cluster.rank) } else { Trace::disabled() };
    let worker = Worker::new(cluster, Arc::new(backend), cfg, schedule, host, trace, wire)?;
    Ok(Launched { dir, worker })
}

#[cfg(test)]
mod tests {
    use super::scale_for_widening;

    #[test]
    fn widened_weights_count_in_stored_bytes() {
        // 64 GiB holding bf16 weights widened to f32 fits 32 GiB of bf16 files.
        assert_eq!(scale_for_widening(64 << 30, 2, 4), 32 << 30);
        assert_eq!(scale_for_widening(64 << 30, 4, 4), 64 << 30);
    }
}
