//! falcon-batch command line: parse, call the library, map errors to exit codes.
//!
//! Exit codes: 0 success (also when stdout's reader went away, as in `show … | head`);
//! 1 fatal error (nothing, or nothing more, was done); 2 usage error (a flag's value, or
//! flags that cannot go together: clap's own refusals and cli::usage::UsageError);
//! 3 finished, but some documents failed (they are recorded in the output).

mod cli;

use anyhow::Result;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Subcommand};
use falcon_batch::job::describe;
use falcon_batch::settings::Settings;
use std::process::ExitCode;

/// Without a subcommand falcon-batch scores (`mpirun -np 8 falcon-batch --docs corpus.jsonl`),
/// with the model and output found when not given; `falcon-batch score` names them.
#[derive(clap::Parser)]
#[command(
    name = "falcon-batch",
    version,
    about = "Score documents against answer choices with big LLMs split by layers",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    override_usage = "falcon-batch [--model DIR] --docs corpus.jsonl [--out results/NAME.h5] [SCORE OPTIONS]\n       falcon-batch <COMMAND>"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    score: cli::score::DefaultScoreArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Convert an HF checkpoint directory or a GGUF file into a per-layer model directory.
    Convert(cli::model::ConvertArgs),
    /// Show a model directory; --verify re-hashes every part.
    Inspect(cli::model::InspectArgs),
    /// Score each document's answer choices; results to HDF5 (resumable).
    Score(cli::score::ScoreArgs),
    /// Extract each document's most probable spans of its source, exactly (top-k); results to HDF5.
    Extract(cli::extract::ExtractArgs),
    /// Print a results file as a table (with accuracy when the corpus has answers).
    Show(cli::score::ShowArgs),
    /// Generate text from prompts.
    Generate(cli::generate::GenerateArgs),
    /// Time decoder layers of a real model's shapes with synthetic weights (no files).
    Bench(cli::bench::BenchArgs),
    /// Plan the schedule for a model on a cluster and predict its throughput.
    Plan(cli::plan::PlanArgs),
}

fn run(cli: Cli, env: &Settings) -> Result<ExitCode> {
    let Some(command) = cli.command else {
        return cli::score::score_by_default(cli.score, env);
    };
    match command {
        Command::Convert(a) => cli::model::convert(a),
        Command::Inspect(a) => cli::model::inspect(a),
        Command::Score(a) => cli::score::score(a, env),
        Command::Extract(a) => cli::extract::run(a, env),
        Command::Show(a) => cli::score::show(a),
        Command::Generate(a) => cli::generate::run(a, env),
        Command::Bench(a) => cli::bench::run(a),
        Command::Plan(a) => {
            cli::out::print(format_args!("{}", cli::plan::run(&a)?))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    let matches = Cli::command().get_matches();
    // Set before anything runs, so that every info line of the command (on every rank) obeys it.
    falcon_batch::report::set_quiet(quiet(&matches));
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // The only read of the environment: everything below is handed these values.
    let env = Settings::from_env();
    match run(cli, &env) {
        Ok(code) => code,
        Err(e) if cli::out::is_closed(&e) => ExitCode::SUCCESS,
        Err(e) if cli::usage::is_usage(&e) => {
            falcon_batch::error!("{}", describe(e.as_ref()));
            ExitCode::from(2)
        }
        Err(e) => {
            falcon_batch::error!("{}", describe(e.as_ref()));
            ExitCode::from(1)
        }
    }
}

/// `--quiet` given to the command (the default score or a subcommand that has the flag).
fn quiet(m: &ArgMatches) -> bool {
    let flag = |m: &ArgMatches| matches!(m.try_get_one::<bool>("quiet"), Ok(Some(true)));
    flag(m) || m.subcommand().is_some_and(|(_, sub)| flag(sub))
}

/// glibc hands blocks over 128 KiB (growing up to 32 MiB as they are freed) straight back to
/// the kernel, and a model's every op allocates and frees such activations: each next one is
/// faulted in again page by page (8% of an extract run's samples). Keep freed blocks up to
/// 32 MiB in the heap instead, and the heap's top untrimmed.
fn keep_freed_memory() {
    // SAFETY: mallopt only sets glibc's allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}
