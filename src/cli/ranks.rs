//! What every multi-rank command shares: MPI start-up, choosing this rank's backend, the
//! schedule flags, and ending the job so no rank hangs.

use anyhow::Result;
use falcon_batch::backend::cpu::{keep_freed_buffers, CpuBackend, CpuRoute};
use falcon_batch::backend::cuda::CudaBackend;
use falcon_batch::backend::select::{cuda_available, DeviceChoice};
use falcon_batch::backend::{Backend, ComputeDtype, KvDtype};
use falcon_batch::job::launch::{launch, LaunchOptions, Launched};
use falcon_batch::job::resources::{cpu_memory_per_rank, cpu_threads_per_rank, DeviceInfo};
use falcon_batch::pipeline::{gather_trace, serve, Cluster};
use falcon_batch::schedule::cost::WireDtype;
use falcon_batch::schedule::ScheduleOptions;
use falcon_batch::trace::Trace;
use std::path::PathBuf;
use std::process::ExitCode;

/// Flags that shape the schedule; every rank must be given the same ones.
#[derive(clap::Args, Debug, Clone)]
pub struct ScheduleArgs {
    /// auto (CUDA when a GPU is present, GPU = local rank), cpu, cuda or cuda:N
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Memory for weights per rank, as given to `falcon-batch plan` (e.g. 24GB) [default:
    /// the device's free memory]. Give the same value to staging and scoring.
    #[arg(long, value_parser = super::usage::size)]
    pub device_mem: Option<u64>,
    /// Most layers per group [default: as many as fit the device].
    #[arg(long, value_parser = super::usage::at_least_one)]
    pub group_layers: Option<usize>,
    /// Groups kept on the device per rank; 2 copies the next group in while computing.
    #[arg(long, default_value_t = 2, value_parser = super::usage::at_least_one)]
    pub resident: usize,
    /// Relative speed of each rank, comma-separated (heterogeneous ranks).
    #[arg(long, value_delimiter = ',', value_parser = super::usage::positive)]
    pub rank_speed: Option<Vec<f64>>,
    /// Hidden states between ranks travel as f32 or bf16 [default: bf16 when the weights are
    /// bf16 or narrower, f32 otherwise]. Every rank must be given the same.
    #[arg(long)]
    pub wire_dtype: Option<WireDtype>,
    /// What the CPU's GEMMs multiply in: f32 (the reference) or bf16 (GEMM inputs rounded to
    /// bf16 where the CUDA backend rounds them, products summed in f32; AVX512-BF16 dot
    /// products where the CPU has them) [default: f32]. The CUDA backend computes in bf16.
    #[arg(long)]
    pub compute_dtype: Option<ComputeDtype>,
    /// One Chrome trace of the whole job, a process track per rank, written by rank 0 (open
    /// in Perfetto).
    #[arg(long)]
    pub trace: Option<PathBuf>,
}

impl ScheduleArgs {
    pub fn options(&self, wave: Option<usize>, batch_tokens: usize) -> ScheduleOptions {
        ScheduleOptions {
            group_layers: self.group_layers,
            resident: self.resident,
            wave,
            batch_tokens,
            rank_speed: self.rank_speed.clone(),
            ..Default::default()
        }
    }
}

/// A multi-rank command: the writer rank prepares and drives it; the other ranks serve.
pub trait RankJob {
    /// What the writer needs, made before any weight is read so bad inputs fail first.
    type Prepared;
    fn launch_options(&self) -> &LaunchOptions;
    fn prepare(&self) -> Result<Self::Prepared>;
    /// What generation caches keep keys and values as (jobs without a cache: f32, unused).
    fn kv_dtype(&self) -> KvDtype {
        KvDtype::F32
    }
    /// The writer's work over the pipeline, and the process's exit code; the worker is
    /// stopped afterwards.
    fn drive<B: Backend + 'static>(&self, prepared: Self::Prepared, launched: &mut Launched<B>) -> Result<u8>;
    /// False when what `prepare` found leaves nothing for the model to do: then no rank
    /// reads a weight and the writer runs [`RankJob::drive_without_weights`] instead.
    fn needs_weights(&self, _prepared: &Self::Prepared) -> bool {
        true
    }
    fn drive_without_weights(&self, _prepared: Self::Prepared) -> Result<u8> {
        Ok(0)
    }
}

/// An error on one rank of a multi-rank job ends every rank at once, before anything local
/// is torn down: dropping a Worker joins its weight loader, which finishes its queue first,
/// and the peers must not wait on that. A single process just returns the error.
fn or_abort<T>(cluster: &Cluster, r: Result<T>) -> Result<T> {
    match r {
        Err(e) if cluster.size > 1 => cluster.abort(&format!("{e:#}")),
        other => other,
    }
}

/// One rank's part of a job: prepare (writer), launch, then drive (writer) or serve (others).
fn run_job<B: Backend + 'static>(cluster: &Cluster, backend: B, device: DeviceInfo, job: &impl RankJob) -> Result<(u8, Trace)> {
    let prepared = if cluster.rank == 0 { Some(or_abort(cluster, job.prepare())?) } else { None };
    let wanted = prepared.as_ref().is_none_or(|p| job.needs_weights(p));
    if !or_abort(cluster, cluster.agree_to_launch(wanted).map_err(anyhow::Error::from))? {
        let code = match prepared {
            Some(p) => or_abort(cluster, job.drive_without_weights(p))?,
            None => 0,
        };
        return Ok((code, Trace::disabled()));
    }
    let mut launched = or_abort(cluster, launch(cluster, backend, device, job.launch_options()).map_err(anyhow::Error::from))?;
    let code = match prepared {
        None => {
            or_abort(cluster, serve(&mut launched.worker).map_err(anyhow::Error::from))?;
            0
        }
        Some(p) => {
            let code = or_abort(cluster, job.drive(p, &mut launched))?;
            or_abort(cluster, launched.worker.stop().map_err(anyhow::Error::from))?;
            code
        }
    };
    Ok((code, std::mem::take(&mut launched.worker.trace)))
}

fn run_on_device(cluster: &Cluster, args: &ScheduleArgs, job: &impl RankJob) -> Result<(u8, Trace)> {
    let (choice, device_mem) = (args.device, args.device_mem);
    let cuda = match choice {
        DeviceChoice::Cpu => None,
        DeviceChoice::Cuda(n) => Some(n),
        DeviceChoice::Auto => cuda_available().ok().map(|count| cluster.local_rank % count),
    };
    match cuda {
        None => {
            // One pool per rank sized from the ranks on this node; an error means the pool was
            // built already (a second job in one process), which then keeps its size.
            let share = cpu_threads_per_rank();
            if let Some(w) = &share.warning {
                falcon_batch::warn!(rank cluster.rank; "{w}");
            }
            // This thread (which runs the job) is the pool's worker 0: its parallel ops start
            // in the pool instead of handing each op to a worker and sleeping until it is done,
            // which costs a wake-up per op (hundreds per decoded token).
            let _ = rayon::ThreadPoolBuilder::new().num_threads(share.threads).use_current_thread().build_global();
            keep_freed_buffers();
            let info = DeviceInfo { name: "cpu".into(), memory_bytes: device_mem.unwrap_or_else(cpu_memory_per_rank) };
            let route = CpuRoute::detect(args.compute_dtype.unwrap_or_default());
            falcon_batch::info!(rank cluster.rank; "cpu compute {route}");
            run_job(cluster, CpuBackend::with_route(job.kv_dtype(), route), info, job)
        }
        Some(n) => {
            if job.kv_dtype() != KvDtype::F32 {
                let e = anyhow::anyhow!("--kv-cache {} is for the CPU backend (--device cpu); on cuda:{n} the generation cache is kept as the device's activations", job.kv_dtype());
                return or_abort(cluster, Err(e));
            }
            if args.compute_dtype == Some(ComputeDtype::F32) {
                let e = anyhow::anyhow!("--compute-dtype f32 is for the CPU backend (--device cpu); cuda:{n} computes in bf16");
                return or_abort(cluster, Err(e));
            }
            let b = or_abort(cluster, CudaBackend::new(n).map_err(anyhow::Error::from))?;
            let (free, _total) = or_abort(cluster, b.memory().map_err(anyhow::Error::from))?;
            let info = DeviceInfo { name: format!("cuda:{n}"), memory_bytes: device_mem.unwrap_or(free as u64) };
            run_job(cluster, b, info, job)
        }
    }
}

/// Start MPI (a singleton without mpirun), run the job on this rank, and end cleanly: an
/// error on any rank of a multi-rank job aborts them all, so none waits for it forever, and
/// the job's exit code survives MPI_Finalize.
pub fn run_ranks(args: &ScheduleArgs, job: impl RankJob) -> Result<ExitCode> {
    let mut cluster = Cluster::init()?;
    let (code, t) = run_on_device(&cluster, args, &job)?;
    if let Some(path) = &args.trace {
        // Every rank took part in the job, so every rank takes part in the gather, still
        // under the liveness backstop.
        match gather_trace(&cluster, t) {
            Ok(Some(all)) => all.write(path).map_err(|e| anyhow::anyhow!("--trace: {}: {e}", path.display()))?,
            Ok(None) => {}
            Err(e) if cluster.size > 1 => cluster.abort(&format!("gathering the trace: {e}")),
            Err(e) => return Err(e.into()),
        }
    }
    cluster.stop_liveness();
    cluster.finish(code);
    Ok(ExitCode::from(code))
}
