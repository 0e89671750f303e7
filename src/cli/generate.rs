//! `falcon-batch generate`: its flags, as the library's generate job (job/generate.rs).

use anyhow::Result;
use super::ranks::{run_ranks, ScheduleArgs};
use falcon_batch::backend::KvDtype;
use falcon_batch::job::generate::{GenerateJob, GenerateOptions};
use falcon_batch::sample::SamplingOptions;
use falcon_batch::settings::Settings;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "prompts"])))]
pub struct GenerateArgs {
    #[arg(long)]
    model: PathBuf,
    /// One prompt; its text is streamed to stdout as it is made.
    #[arg(long)]
    prompt: Option<String>,
    /// JSONL of {"id", "prompt"}: all prompts advance together.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// JSONL output, one line per prompt: {"id", "prompt", "text", "tokens", "finish"}.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Replace an existing --out file.
    #[arg(long)]
    overwrite: bool,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// 0 = greedy (the default, reproducible without a seed).
    #[arg(long, default_value_t = 0.0, value_parser = super::usage::non_negative)]
    temperature: f32,
    /// Keep only the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p, in (0, 1].
    #[arg(long, default_value_t = 1.0, value_parser = super::usage::probability)]
    top_p: f32,
    /// Divides the logit of every token already in the text (above 0; 1 = off).
    #[arg(long, default_value_t = 1.0, value_parser = super::usage::positive_f32)]
    repetition_penalty: f32,
    /// Seed of the sampler [default: a random one, printed so the run can be repeated].
    /// Greedy decoding (--temperature 0) needs none.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when the text contains this string (repeatable); it is not included.
    #[arg(long)]
    stop: Vec<String>,
    /// Do not stop at the model's end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// What the generation cache keeps keys and values as: f32 (the reference), f16 (half
    /// the bytes each step reads, most of them at long contexts; llama.cpp's default) or bf16
    /// (half the bytes too; with --compute-dtype bf16 it changes no result, as that route rounds
    /// keys and values to bf16 anyway, and saves that rounding at every step). CPU only.
    #[arg(long, default_value = "f32")]
    kv_cache: KvDtype,
    #[command(flatten)]
    schedule: ScheduleArgs,
}

pub fn run(a: GenerateArgs, env: &Settings) -> Result<ExitCode> {
    // The sampler's options as given; a seed left out is drawn by the writer.
    let sampling = SamplingOptions { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, repetition_penalty: a.repetition_penalty, seed: a.seed.unwrap_or(0) };
    let rank = a.schedule.rank_settings(env);
    let schedule = a.schedule.options(Some(1), 2048);
    let compute_dtype = a.schedule.compute_dtype.map(|d| d.to_string());
    let (wire, trace) = (a.schedule.wire_dtype, a.schedule.trace.is_some());
    let opts = GenerateOptions {
        model: a.model,
        prompt: a.prompt,
        prompts: a.prompts,
        out: a.out,
        overwrite: a.overwrite,
        max_new_tokens: a.max_new_tokens,
        sampling,
        seed: a.seed,
        stop: a.stop,
        ignore_eos: a.ignore_eos,
        kv_cache: a.kv_cache,
    };
    run_ranks(&rank, &GenerateJob::new(opts, schedule, wire, compute_dtype, trace))
}
