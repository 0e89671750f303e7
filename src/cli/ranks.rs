//! What every multi-rank command shares: MPI start-up, choosing this rank's backend, the
//! schedule flags, and ending the job so no rank hangs.

use anyhow::Result;
use falcon_batch::backend::cpu::CpuBackend;
use falcon_batch::backend::cuda::CudaBackend;
use falcon_batch::backend::select::{cuda_available, DeviceChoice};
use falcon_batch::backend::Backend;
use falcon_batch::job::launch::{cpu_memory_per_rank, cpu_threads_per_rank, launch, DeviceInfo, LaunchOptions, Launched};
use falcon_batch::pipeline::{serve, Cluster};
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
    #[arg(long, value_parser = parse_device_mem)]
    pub device_mem: Option<u64>,
    /// Most layers per group [default: as many as fit the device].
    #[arg(long)]
    pub group_layers: Option<usize>,
    /// Groups kept on the device per rank; 2 copies the next group in while computing.
    #[arg(long, default_value_t = 2)]
    pub resident: usize,
    /// Relative speed of each rank, comma-separated (heterogeneous ranks).
    #[arg(long, value_delimiter = ',')]
    pub rank_speed: Option<Vec<f64>>,
    /// Chrome trace of each rank's timeline: FILE.rank<R>.json (open in Perfetto).
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

fn parse_device_mem(s: &str) -> Result<u64, String> {
    falcon_batch::units::parse_bytes(s).map_err(|e| e.to_string())
}

/// A multi-rank command: the writer rank prepares and drives it; the other ranks serve.
pub trait RankJob {
    /// What the writer needs, made before any weight is read so bad inputs fail first.
    type Prepared;
    fn launch_options(&self) -> &LaunchOptions;
    fn prepare(&self) -> Result<Self::Prepared>;
    /// The writer's work over the pipeline; the worker is stopped afterwards either way.
    fn drive<B: Backend + 'static>(&self, prepared: Self::Prepared, launched: &mut Launched<B>) -> Result<ExitCode>;
}

/// One rank's part of a job: prepare (writer), launch, then drive (writer) or serve (others).
fn run_job<B: Backend + 'static>(cluster: &Cluster, backend: B, device: DeviceInfo, job: &impl RankJob) -> Result<(ExitCode, Trace)> {
    let prepared = if cluster.rank == 0 { Some(job.prepare()?) } else { None };
    let mut launched = launch(cluster, backend, device, job.launch_options())?;
    let code = match prepared {
        None => {
            serve(&mut launched.worker)?;
            ExitCode::SUCCESS
        }
        Some(p) => {
            let result = job.drive(p, &mut launched);
            launched.worker.stop()?;
            result?
        }
    };
    Ok((code, std::mem::take(&mut launched.worker.trace)))
}

fn run_on_device(cluster: &Cluster, choice: DeviceChoice, device_mem: Option<u64>, job: &impl RankJob) -> Result<(ExitCode, Trace)> {
    let cuda = match choice {
        DeviceChoice::Cpu => None,
        DeviceChoice::Cuda(n) => Some(n),
        DeviceChoice::Auto => cuda_available().ok().map(|count| cluster.local_rank % count),
    };
    match cuda {
        None => {
            // One pool per rank sized from the ranks on this node; an error means the pool was
            // built already (a second job in one process), which then keeps its size.
            let _ = rayon::ThreadPoolBuilder::new().num_threads(cpu_threads_per_rank()).build_global();
            let info = DeviceInfo { name: "cpu".into(), memory_bytes: device_mem.unwrap_or_else(cpu_memory_per_rank), held_weight_bytes: Some(4) };
            run_job(cluster, CpuBackend::new(), info, job)
        }
        Some(n) => {
            let b = CudaBackend::new(n)?;
            let (free, _total) = b.memory()?;
            let info = DeviceInfo { name: format!("cuda:{n}"), memory_bytes: device_mem.unwrap_or(free as u64), held_weight_bytes: None };
            run_job(cluster, b, info, job)
        }
    }
}

/// Start MPI (a singleton without mpirun), run the job on this rank, and end cleanly: an
/// error on any rank of a multi-rank job aborts them all, so none waits for it forever.
pub fn run_ranks(args: &ScheduleArgs, job: impl RankJob) -> Result<ExitCode> {
    let cluster = Cluster::init()?;
    match run_on_device(&cluster, args.device, args.device_mem, &job) {
        Ok((code, t)) => {
            if let Some(path) = &args.trace {
                let path = path.with_extension(format!("rank{}.json", cluster.rank));
                t.write(&path)?;
            }
            cluster.finish();
            Ok(code)
        }
        Err(e) if cluster.size > 1 => cluster.abort(&format!("{e:#}")),
        Err(e) => Err(e),
    }
}
