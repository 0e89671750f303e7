//! The flags every multi-rank command shares (device and schedule), as the library's
//! RankSettings and ScheduleOptions; the rank's run itself is falcon_batch::job::rank.

use anyhow::Result;
use falcon_batch::backend::select::DeviceChoice;
use falcon_batch::backend::ComputeDtype;
use falcon_batch::job::rank::{self, RankJob, RankSettings};
use falcon_batch::schedule::cost::WireDtype;
use falcon_batch::schedule::ScheduleOptions;
use falcon_batch::settings::Settings;
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

    /// How this rank runs: these flags over what the environment said.
    pub fn rank_settings(&self, env: &Settings) -> RankSettings {
        RankSettings { device: self.device, device_mem: self.device_mem, compute_dtype: self.compute_dtype, trace: self.trace.clone(), ..RankSettings::new(env) }
    }
}

/// Run `job` on this rank (falcon_batch::job::rank::run) and turn its code into the process's.
pub fn run_ranks(settings: &RankSettings, job: &impl RankJob) -> Result<ExitCode> {
    Ok(ExitCode::from(rank::run(settings, job)?))
}
