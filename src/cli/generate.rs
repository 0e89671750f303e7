//! `falcon-batch generate`: one prompt streamed to stdout, or a prompts file as a batch job.

use anyhow::{anyhow, bail, Context, Result};
use super::ranks::{run_ranks, RankJob, ScheduleArgs};
use super::usage::UsageError;
use crate::outln;
use std::collections::HashMap;
use falcon_batch::backend::{Backend, KvDtype};
use falcon_batch::format::model_dir::ModelDir;
use falcon_batch::generate::{generate, GenOptions, GenOutput, GenRequest};
use falcon_batch::config::ModelConfig;
use falcon_batch::job::launch::{LaunchOptions, Launched};
use falcon_batch::pipeline::PipelineDecoder;
use falcon_batch::runner::{Decoder, StepBatch};
use falcon_batch::sample::SamplingOptions;
use falcon_batch::tokenizer::Tokenizer;
use std::io::Write;
use std::path::{Path, PathBuf};
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
    /// What the generation cache keeps keys and values as: f32 (the reference) or f16 (half
    /// the bytes each step reads, most of them at long contexts; llama.cpp's default). CPU only.
    #[arg(long, default_value = "f32")]
    kv_cache: KvDtype,
    #[command(flatten)]
    schedule: ScheduleArgs,
}

/// (id, prompt) pairs of a prompts file. Output lines are matched to prompts by id, so every
/// line needs one of its own; the first bad line is an error naming the file, line and field.
fn read_prompts(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut out = vec![];
    let mut first_line: HashMap<String, usize> = HashMap::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = format!("{}:{}", path.display(), i + 1);
        let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{at}: invalid JSON"))?;
        let prompt = v.get("prompt").and_then(|p| p.as_str()).ok_or_else(|| anyhow!("{at}: field \"prompt\": expected a string"))?;
        let id = match v.get("id") {
            Some(serde_json::Value::String(s)) if !s.trim().is_empty() => s.clone(),
            None => bail!("{at}: field \"id\": missing, expected a non-empty string naming this prompt's output line"),
            Some(other) => bail!("{at}: field \"id\": expected a non-empty string, found {other}"),
        };
        if let Some(first) = first_line.insert(id.clone(), i + 1) {
            bail!("{at}: field \"id\": {id:?} was already used on line {first}; every prompt needs its own id");
        }
        out.push((id, prompt.to_string()));
    }
    Ok(out)
}

/// --out must not replace a file by accident: it is refused unless --overwrite.
fn check_out(a: &GenerateArgs) -> Result<(), UsageError> {
    match &a.out {
        Some(path) if !a.overwrite && std::fs::symlink_metadata(path).is_ok() => {
            Err(UsageError::new("--out", format!("{} exists; pass --overwrite to replace it, or name another file", path.display())))
        }
        _ => Ok(()),
    }
}

/// The sampler's options as given; a seed left out is drawn by the writer (`seed`).
fn sampling(a: &GenerateArgs) -> SamplingOptions {
    SamplingOptions { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, repetition_penalty: a.repetition_penalty, seed: a.seed.unwrap_or(0) }
}

/// --seed, or for sampling without one a random seed, said on stderr so the text can be made
/// again (without this every such run gave seed 0's text). Greedy decoding uses no seed.
fn seed(a: &GenerateArgs) -> u64 {
    match a.seed {
        Some(s) => s,
        None if a.temperature == 0.0 => 0,
        None => {
            let s = random_seed();
            eprintln!("generate: seed {s}; pass --seed {s} to repeat");
            s
        }
    }
}

/// A seed from the OS's randomness (std's per-process random hash keys), kept to 2^53 so
/// it survives a round trip through JSON tools that read numbers as doubles.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish() >> 11
}

pub fn run(a: GenerateArgs) -> Result<ExitCode> {
    let sampling = sampling(&a);
    let launch = LaunchOptions {
        model: a.model.clone(),
        schedule: a.schedule.options(Some(1), 2048),
        wire: a.schedule.wire_dtype,
        job_options: serde_json::json!({
            "command": "generate",
            // The flags as given: every rank must agree on them, and only the writer draws a
            // seed that was left out.
            "sampling": sampling,
            "seed": a.seed,
            "max_new_tokens": a.max_new_tokens,
            "stop": a.stop,
            "ignore_eos": a.ignore_eos,
            "kv_cache": a.kv_cache.to_string(),
            "compute_dtype": a.schedule.compute_dtype.map(|d| d.to_string()),
        }),
        trace: a.schedule.trace.is_some(),
    };
    let schedule = a.schedule.clone();
    run_ranks(&schedule, GenerateJob { args: a, sampling, launch })
}

struct GenerateJob {
    args: GenerateArgs,
    sampling: SamplingOptions,
    launch: LaunchOptions,
}

impl GenerateJob {
    /// The prompts, tokenized; on the writer rank only, before any weight is read.
    fn requests(&self, tok: &Tokenizer) -> Result<Vec<GenRequest>> {
        let pairs = match (&self.args.prompt, &self.args.prompts) {
            (Some(p), _) => vec![("prompt".to_string(), p.clone())],
            (None, Some(path)) => read_prompts(path)?,
            (None, None) => bail!("give --prompt or --prompts"),
        };
        pairs.into_iter().map(|(id, prompt)| Ok(GenRequest { prompt_ids: tok.encode(&prompt, true)?, id, prompt })).collect()
    }

    fn write(&self, outputs: &[GenOutput], streamed: bool) -> Result<()> {
        match &self.args.out {
            Some(path) => {
                let mut f = std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("{}: cannot create", path.display()))?);
                for o in outputs {
                    writeln!(f, "{}", serde_json::to_string(o)?)?;
                }
                f.flush().with_context(|| format!("{}: cannot write", path.display()))?;
                eprintln!("wrote {} generations to {}", outputs.len(), path.display());
            }
            None if !streamed => {
                for o in outputs {
                    outln!("{}", serde_json::to_string(o)?)?;
                }
            }
            // The streamed text has no newline of its own; end it before stderr's lines.
            None => outln!()?,
        }
        if let (Some(_), [o]) = (&self.args.prompt, outputs) {
            eprintln!("generate: finish {} after {} new tokens", o.finish.name(), o.tokens.len());
        }
        Ok(())
    }
}

impl RankJob for GenerateJob {
    /// The tokenizer, the tokenized prompts, the model's config and the sampler's seed.
    type Prepared = (Tokenizer, Vec<GenRequest>, ModelConfig, u64);

    fn launch_options(&self) -> &LaunchOptions {
        &self.launch
    }

    fn kv_dtype(&self) -> KvDtype {
        self.args.kv_cache
    }

    fn prepare(&self) -> Result<Self::Prepared> {
        check_out(&self.args)?;
        let dir = ModelDir::open_for(&self.args.model, &[])?;
        let tok = dir.tokenizer()?;
        let reqs = self.requests(&tok)?;
        Ok((tok, reqs, dir.config().clone(), seed(&self.args)))
    }

    fn drive<B: Backend + 'static>(&self, (tok, reqs, cfg, seed): Self::Prepared, launched: &mut Launched<B>) -> Result<u8> {
        let opts = GenOptions {
            max_new_tokens: self.args.max_new_tokens,
            sampling: SamplingOptions { seed, ..self.sampling.clone() },
            stop: self.args.stop.clone(),
            eos: if self.args.ignore_eos { vec![] } else { cfg.eos_token_ids.clone() },
            max_position: cfg.max_position,
        };
        let stream = self.args.prompt.is_some() && self.args.out.is_none();
        let mut stdout = std::io::stdout();
        let mut dec = Timed::new(PipelineDecoder::new(&mut launched.worker)?);
        let outputs = generate(&mut dec, &tok, &reqs, &opts, |_, delta| {
            if stream {
                let _ = write!(stdout, "{delta}");
                let _ = stdout.flush();
            }
        })?;
        self.write(&outputs, stream)?;
        eprintln!("{}", dec.summary());
        Ok(0)
    }
}

/// A decoder whose steps are timed: the first runs the prompts (prefill), the rest one token
/// per sequence each, so a user (and `make bench`) sees the decode rate apart from the prefill.
struct Timed<D> {
    inner: D,
    /// (rows, seconds) of each step
    steps: Vec<(usize, f64)>,
}

impl<D: Decoder> Timed<D> {
    fn new(inner: D) -> Self {
        Timed { inner, steps: vec![] }
    }

    fn summary(&self) -> String {
        let Some(&(prompt_rows, prefill)) = self.steps.first() else { return "generate: no steps ran".into() };
        let rest = &self.steps[1..];
        let decode: f64 = rest.iter().map(|s| s.1).sum();
        let per_step = if rest.is_empty() { String::new() } else { format!(": {:.2} ms per step", 1e3 * decode / rest.len() as f64) };
        format!("generate: prefill {prompt_rows} prompt tokens in {prefill:.3} s; {} decode steps in {decode:.3} s{per_step}", rest.len())
    }
}

impl<D: Decoder> Decoder for Timed<D> {
    type Error = D::Error;

    fn step(&mut self, batch: &StepBatch) -> Result<Vec<Vec<f32>>, Self::Error> {
        let started = std::time::Instant::now();
        let logits = self.inner.step(batch)?;
        self.steps.push((batch.tokens.len(), started.elapsed().as_secs_f64()));
        Ok(logits)
    }

    fn reset(&mut self) {
        self.inner.reset();
        self.steps.clear();
    }
}
