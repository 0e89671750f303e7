//! `falcon-batch bench`: decoder layers of a real model's shapes with synthetic weights.
//! The command's own code (synthetic.rs: layers, attention, decode, streaming; gemm.rs: GEMM
//! rates): the library has no use for it, so it lives with the CLI.

mod gemm;
mod synthetic;

use anyhow::Result;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// auto, cpu, cuda or cuda:N
    #[arg(long, default_value = "auto")]
    device: falcon_batch::backend::select::DeviceChoice,
    /// falcon-180b, falcon-40b, falcon-7b, llama-2-70b, smollm2-135m or tiny
    #[arg(long, required_unless_present = "gemm")]
    synthetic: Option<String>,
    /// Instead of layers: GEMM GFLOP/s of `linear` and of the gemm crate at these shapes
    /// (TxKxN, comma-separated), as JSON on stdout.
    #[arg(long)]
    gemm: Option<String>,
    /// Layers in the streaming run (CUDA).
    #[arg(long, default_value_t = 16, value_parser = crate::cli::usage::at_least_one)]
    layers: usize,
    /// Layers resident on the device in the streaming run: two groups of window/2 (CUDA).
    #[arg(long, default_value_t = 4, value_parser = crate::cli::usage::at_least_one)]
    window: usize,
    /// Timed repetitions per shape (median reported), after one warm-up.
    #[arg(long, default_value_t = 3, value_parser = crate::cli::usage::at_least_one)]
    reps: usize,
    #[arg(long, default_value = "results/bench.json")]
    out: std::path::PathBuf,
    /// Run presets whose layer is over 2 GB in f32 on the CPU.
    #[arg(long)]
    force: bool,
    /// What the CPU's GEMMs multiply in, f32 or bf16 (as `score --compute-dtype`): the layer
    /// times `plan --costs` reads are that route's.
    #[arg(long, default_value = "f32")]
    compute_dtype: falcon_batch::backend::ComputeDtype,
}

pub fn run(a: BenchArgs) -> Result<ExitCode> {
    if let Some(shapes) = &a.gemm {
        let shapes = gemm::parse_shapes(shapes)?;
        let rows = gemm::run(&shapes, a.reps)?;
        crate::outln!("{}", serde_json::to_string(&rows)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let Some(synthetic) = a.synthetic else { anyhow::bail!("--synthetic is required") };
    let opts = synthetic::BenchOptions {
        device: a.device,
        synthetic,
        layers: a.layers,
        window: a.window,
        reps: a.reps,
        out: Some(a.out),
        force: a.force,
        compute_dtype: a.compute_dtype,
    };
    synthetic::run(&opts)?;
    Ok(ExitCode::SUCCESS)
}
