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
    /// Plan the schedule for a model on a cluster and predict its throughput.
    Plan(falcon_batch::plan_cmd::PlanArgs),
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
        Command::Plan(a) => {
            print!("{}", falcon_batch::plan_cmd::run(&a)?);
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
