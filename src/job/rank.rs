//! One rank's run of a job, the same for every job kind: MPI start-up, this rank's backend
//! (CPU or CUDA; the CPU's thread pool), prepare on the writer rank, launch, drive (writer)
//! or serve (the others), and an end that leaves no rank hanging. The command line, the
//! pipeline example and in-process tests all run jobs through [`run`] or [`run_on_this_rank`];
//! a job kind is a [`RankJob`].

use super::resources::{cpu_memory_per_rank, cpu_threads_per_rank, DeviceInfo, NodeShare};
use super::{describe, JobError};
use crate::backend::cpu::{keep_freed_buffers, CpuBackend, CpuRoute};
use crate::backend::cuda::{sync_each_op, CudaBackend};
use crate::backend::select::{cuda_available, DeviceChoice};
use crate::backend::{Backend, ComputeDtype, KvDtype};
use crate::pipeline::{gather_trace, serve, Cluster, ClusterSettings, Worker};
use crate::settings::Settings;
use crate::trace::Trace;
use std::path::PathBuf;

/// How this rank runs: its device (from the command's flags) and what the environment said
/// (from [`Settings`]). Plain data: the command line fills it from its flags.
#[derive(Clone, Debug)]
pub struct RankSettings {
    /// auto (CUDA when a GPU is present, GPU = local rank), cpu, or cuda:N.
    pub device: DeviceChoice,
    /// Memory for weights on this rank [None: the device's free memory; a CPU rank's share of
    /// the node's available memory].
    pub device_mem: Option<u64>,
    /// What the CPU's GEMMs multiply in [None: f32]; the CUDA backend computes in bf16.
    pub compute_dtype: Option<ComputeDtype>,
    /// One Chrome trace of the whole job, written by rank 0.
    pub trace: Option<PathBuf>,
    pub cluster: ClusterSettings,
    pub node: NodeShare,
    /// Every CUDA op waits for itself (FALCON_CUDA_SYNC_EACH_OP).
    pub cuda_sync_each_op: bool,
}

impl RankSettings {
    /// The default device (auto) with what the environment said.
    pub fn new(env: &Settings) -> RankSettings {
        RankSettings {
            device: DeviceChoice::Auto,
            device_mem: None,
            compute_dtype: None,
            trace: None,
            cluster: env.cluster.clone(),
            node: env.node,
            cuda_sync_each_op: env.cuda_sync_each_op,
        }
    }

    /// The arithmetic the results come from, as a results file records it: CUDA computes in
    /// bf16; the CPU in `compute_dtype` (f32 by default). `auto` is decided as rank 0's device is.
    pub fn compute_name(&self) -> String {
        let cuda = match self.device {
            DeviceChoice::Cpu => false,
            DeviceChoice::Cuda(_) => true,
            DeviceChoice::Auto => cuda_available().is_ok(),
        };
        if cuda { ComputeDtype::Bf16 } else { self.compute_dtype.unwrap_or_default() }.to_string()
    }
}

/// A kind of job over the ranks: the writer rank (0) prepares and drives it; the others serve.
pub trait RankJob {
    /// What the writer needs, made before any weight is read so bad inputs fail first.
    type Prepared;
    /// On the writer only, before any rank reads a weight.
    fn prepare(&self) -> Result<Self::Prepared, JobError>;
    /// Every rank: agree on the model and options, plan, read this rank's weights and build
    /// its pipeline worker (most jobs: [`super::launch::launch`] with their LaunchOptions).
    fn launch<B: Backend + 'static>(&self, cluster: &Cluster, backend: B, device: DeviceInfo) -> Result<Worker<B>, JobError>;
    /// What generation caches keep keys and values as (jobs without a cache: f32, unused).
    fn kv_dtype(&self) -> KvDtype {
        KvDtype::F32
    }
    /// The writer's work over the pipeline, and the process's exit code; the worker is
    /// stopped afterwards.
    fn drive<B: Backend + 'static>(&self, prepared: Self::Prepared, worker: &mut Worker<B>) -> Result<u8, JobError>;
    /// False when what `prepare` found leaves nothing for the model to do: then no rank
    /// reads a weight and the writer runs [`RankJob::drive_without_weights`] instead.
    fn needs_weights(&self, _prepared: &Self::Prepared) -> bool {
        true
    }
    fn drive_without_weights(&self, _prepared: Self::Prepared) -> Result<u8, JobError> {
        Ok(0)
    }
    /// Every rank, once its part is done (driven or served) and before its trace is taken:
    /// the job's own checks of the worker.
    fn finished<B: Backend + 'static>(&self, _worker: &Worker<B>) -> Result<(), JobError> {
        Ok(())
    }
}

/// An error on one rank of a multi-rank job ends every rank at once, before anything local
/// is torn down: dropping a Worker joins its weight loader, which finishes its queue first,
/// and the peers must not wait on that. A single process just returns the error.
fn or_abort<T>(cluster: &Cluster, r: Result<T, JobError>) -> Result<T, JobError> {
    match r {
        Err(e) if cluster.size > 1 => cluster.abort(&describe(&e)),
        other => other,
    }
}

/// One rank's part of a job: prepare (writer), launch, then drive (writer) or serve (others).
fn run_job<B: Backend + 'static>(cluster: &Cluster, backend: B, device: DeviceInfo, job: &impl RankJob) -> Result<(u8, Trace), JobError> {
    let prepared = if cluster.rank == 0 { Some(or_abort(cluster, job.prepare())?) } else { None };
    let wanted = prepared.as_ref().is_none_or(|p| job.needs_weights(p));
    if !or_abort(cluster, cluster.agree_to_launch(wanted).map_err(JobError::from))? {
        let code = match prepared {
            Some(p) => or_abort(cluster, job.drive_without_weights(p))?,
            None => 0,
        };
        return Ok((code, Trace::disabled()));
    }
    let mut worker = or_abort(cluster, job.launch(cluster, backend, device))?;
    let code = match prepared {
        None => {
            or_abort(cluster, serve(&mut worker).map_err(JobError::from))?;
            0
        }
        Some(p) => {
            let code = or_abort(cluster, job.drive(p, &mut worker))?;
            or_abort(cluster, worker.stop().map_err(JobError::from))?;
            code
        }
    };
    or_abort(cluster, job.finished(&worker))?;
    Ok((code, std::mem::take(&mut worker.trace)))
}

/// This rank's part of `job` on the device `settings` choose, in a started cluster: the exit
/// code and this rank's trace. An error on one rank of several aborts them all.
pub fn run_on_this_rank(cluster: &Cluster, settings: &RankSettings, job: &impl RankJob) -> Result<(u8, Trace), JobError> {
    let cuda = match settings.device {
        DeviceChoice::Cpu => None,
        DeviceChoice::Cuda(n) => Some(n),
        DeviceChoice::Auto => cuda_available().ok().map(|count| cluster.local_rank % count),
    };
    match cuda {
        None => {
            // One pool per rank sized from the ranks on this node; an error means the pool was
            // built already (a second job in one process), which then keeps its size.
            let share = cpu_threads_per_rank(&settings.node);
            if let Some(w) = &share.warning {
                crate::warn!(rank cluster.rank; "{w}");
            }
            // This thread (which runs the job) is the pool's worker 0: its parallel ops start
            // in the pool instead of handing each op to a worker and sleeping until it is done,
            // which costs a wake-up per op (hundreds per decoded token).
            let _ = rayon::ThreadPoolBuilder::new().num_threads(share.threads).use_current_thread().build_global();
            keep_freed_buffers();
            let info = DeviceInfo { name: "cpu".into(), memory_bytes: settings.device_mem.unwrap_or_else(|| cpu_memory_per_rank(&settings.node)) };
            let route = CpuRoute::detect(settings.compute_dtype.unwrap_or_default());
            crate::info!(rank cluster.rank; "cpu compute {route}");
            run_job(cluster, CpuBackend::with_route(job.kv_dtype(), route), info, job)
        }
        Some(n) => {
            if job.kv_dtype() != KvDtype::F32 {
                let why = format!("on cuda:{n} the generation cache is kept as the device's activations");
                return or_abort(cluster, Err(JobError::CpuOnly { flag: "--kv-cache", value: job.kv_dtype().to_string(), why }));
            }
            if settings.compute_dtype == Some(ComputeDtype::F32) {
                let why = format!("cuda:{n} computes in bf16");
                return or_abort(cluster, Err(JobError::CpuOnly { flag: "--compute-dtype", value: "f32".into(), why }));
            }
            sync_each_op(settings.cuda_sync_each_op);
            let b = or_abort(cluster, CudaBackend::new(n).map_err(JobError::from))?;
            let (free, _total) = or_abort(cluster, b.memory().map_err(JobError::from))?;
            let info = DeviceInfo { name: format!("cuda:{n}"), memory_bytes: settings.device_mem.unwrap_or(free as u64) };
            run_job(cluster, b, info, job)
        }
    }
}

/// The whole of one process's job: start MPI (a singleton without mpirun), run `job` on this
/// rank, write the trace, and end cleanly: an error on any rank of a multi-rank job aborts
/// them all, so none waits for it forever. Returns the job's exit code, which MPI_Finalize
/// keeps (past a hung finalize the process exits with it).
pub fn run(settings: &RankSettings, job: &impl RankJob) -> Result<u8, JobError> {
    let mut cluster = Cluster::init(&settings.cluster)?;
    let (code, t) = run_on_this_rank(&cluster, settings, job)?;
    if let Some(path) = &settings.trace {
        // Every rank took part in the job, so every rank takes part in the gather, still
        // under the liveness backstop.
        match gather_trace(&cluster, t) {
            Ok(Some(all)) => all.write(path).map_err(|source| JobError::Trace { path: path.clone(), source })?,
            Ok(None) => {}
            Err(e) if cluster.size > 1 => cluster.abort(&format!("gathering the trace: {e}")),
            Err(e) => return Err(e.into()),
        }
    }
    cluster.stop_liveness();
    cluster.finish(code);
    Ok(code)
}
