//! falcon-batch command line: parse, call the library, map errors to exit codes.
//!
//! Exit codes: 0 success; 1 fatal error (nothing or nothing more was done);
//! 2 usage error; 3 finished, but some documents failed (recorded in the output).

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "falcon-batch", version, about = "Score documents against answer choices with big LLMs split by layers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert an HF checkpoint directory or a GGUF file into a per-layer model directory.
    Convert(ConvertArgs),
    /// Show a model directory; --verify re-hashes every part.
    Inspect(InspectArgs),
    /// Time decoder layers of a real model's shapes with synthetic weights (no files).
    Bench(BenchArgs),
}

#[derive(clap::Args)]
struct BenchArgs {
    /// auto, cpu, cuda or cuda:N
    #[arg(long, default_value = "auto")]
    device: falcon_batch::backend::select::DeviceChoice,
    /// falcon-180b, falcon-40b, falcon-7b, llama-2-70b, smollm2-135m or tiny
    #[arg(long)]
    synthetic: String,
    /// Layers in the streaming run (CUDA).
    #[arg(long, default_value_t = 16)]
    layers: usize,
    /// Layers resident on the device in the streaming run: two groups of window/2 (CUDA).
    #[arg(long, default_value_t = 4)]
    window: usize,
    /// Timed repetitions per shape (median reported), after one warm-up.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    #[arg(long, default_value = "results/bench.json")]
    out: std::path::PathBuf,
    /// Run presets whose layer is over 2 GB in f32 on the CPU.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args)]
struct ConvertArgs {
    /// HF checkpoint directory (config.json, *.safetensors, tokenizer.json) or a .gguf file.
    #[arg(long)]
    from: std::path::PathBuf,
    /// Output model directory.
    #[arg(long)]
    to: std::path::PathBuf,
    /// Storage dtype of the weights (default: the checkpoint's; f32 for dequantized GGUF).
    #[arg(long)]
    dtype: Option<String>,
}

#[derive(clap::Args)]
struct InspectArgs {
    model: std::path::PathBuf,
    #[arg(long)]
    verify: bool,
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Convert(_a) => anyhow::bail!("convert: not built yet"),
        Command::Inspect(_a) => anyhow::bail!("inspect: not built yet"),
        Command::Bench(a) => {
            let opts = falcon_batch::bench::BenchOptions {
                device: a.device,
                synthetic: a.synthetic,
                layers: a.layers,
                window: a.window,
                reps: a.reps,
                out: Some(a.out),
                force: a.force,
            };
            falcon_batch::bench::run(&opts)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
