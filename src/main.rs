//! falcon-batch command line: parse, call the library, map errors to exit codes.
//!
//! Exit codes: 0 success; 1 fatal error (nothing, or nothing more, was done);
//! 2 usage error; 3 finished, but some documents failed (they are recorded in the output).

mod cli;

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
    Convert(cli::model::ConvertArgs),
    /// Show a model directory; --verify re-hashes every part.
    Inspect(cli::model::InspectArgs),
    /// Generate text from prompts.
    Generate(cli::generate::GenerateArgs),
    /// Plan the schedule for a model on a cluster and predict its throughput.
    Plan(falcon_batch::plan_cmd::PlanArgs),
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Convert(a) => cli::model::convert(a),
        Command::Inspect(a) => cli::model::inspect(a),
        Command::Generate(a) => cli::generate::run(a),
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
