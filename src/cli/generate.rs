//! `falcon-batch generate`: one prompt streamed to stdout, or a prompts file as a batch job.

use anyhow::{anyhow, bail, Context, Result};
use falcon_batch::backend::cpu::CpuBackend;
use falcon_batch::format::model_dir::ModelDir;
use falcon_batch::generate::{generate, GenOptions, GenRequest, LocalDecoder};
use falcon_batch::sample::SamplingOptions;
use falcon_batch::stage::{HostGroup, Stage};
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
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// 0 = greedy (the default, reproducible without a seed).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep only the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the text contains this string (repeatable); it is not included.
    #[arg(long)]
    stop: Vec<String>,
    /// Do not stop at the model's end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
}

/// (id, prompt) pairs of a prompts file; a bad line is an error naming the file and line.
fn read_prompts(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut out = vec![];
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = format!("{}:{}", path.display(), i + 1);
        let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{at}: invalid JSON"))?;
        let prompt = v.get("prompt").and_then(|p| p.as_str()).ok_or_else(|| anyhow!("{at}: field \"prompt\": expected a string"))?;
        let id = match v.get("id") {
            Some(serde_json::Value::String(s)) => s.clone(),
            None => format!("line:{}", i + 1),
            Some(other) => bail!("{at}: field \"id\": expected a string, found {other}"),
        };
        out.push((id, prompt.to_string()));
    }
    Ok(out)
}

fn validate(a: &GenerateArgs) -> Result<SamplingOptions> {
    if !(a.temperature >= 0.0) {
        bail!("--temperature must be 0 or more, found {}", a.temperature);
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1], found {}", a.top_p);
    }
    if !(a.repetition_penalty > 0.0) {
        bail!("--repetition-penalty must be positive, found {}", a.repetition_penalty);
    }
    Ok(SamplingOptions { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, repetition_penalty: a.repetition_penalty, seed: a.seed })
}

pub fn run(a: GenerateArgs) -> Result<ExitCode> {
    let sampling = validate(&a)?;
    let dir = ModelDir::open(&a.model)?;
    let cfg = dir.config().clone();
    let tok = Tokenizer::from_file(&dir.tokenizer_path())?;
    let pairs = match (&a.prompt, &a.prompts) {
        (Some(p), _) => vec![("prompt".to_string(), p.clone())],
        (None, Some(path)) => read_prompts(path)?,
        (None, None) => bail!("give --prompt or --prompts"),
    };
    let reqs = pairs
        .into_iter()
        .map(|(id, prompt)| Ok(GenRequest { prompt_ids: tok.encode(&prompt, true)?, id, prompt }))
        .collect::<Result<Vec<_>>>()?;
    let opts = GenOptions {
        max_new_tokens: a.max_new_tokens,
        sampling,
        stop: a.stop.clone(),
        eos: if a.ignore_eos { vec![] } else { cfg.eos_token_ids.clone() },
        max_position: cfg.max_position,
    };
    let backend = CpuBackend::new();
    let stages = vec![Stage::upload(&backend, &HostGroup::from_dir(&dir, 0..cfg.n_layers)?)?];
    let mut dec = LocalDecoder::new(&backend, &cfg, &stages);
    let stream = a.prompt.is_some() && a.out.is_none();
    let mut stdout = std::io::stdout();
    let outputs = generate(&mut dec, &tok, &reqs, &opts, |_, delta| {
        if stream {
            let _ = write!(stdout, "{delta}");
            let _ = stdout.flush();
        }
    })?;
    if stream {
        println!();
    }
    match &a.out {
        Some(path) => {
            let mut f = std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("{}: cannot create", path.display()))?);
            for o in &outputs {
                writeln!(f, "{}", serde_json::to_string(o)?)?;
            }
            f.flush()?;
            eprintln!("wrote {} generations to {}", outputs.len(), path.display());
        }
        None if !stream => {
            for o in &outputs {
                println!("{}", serde_json::to_string(o)?);
            }
        }
        None => {}
    }
    Ok(ExitCode::SUCCESS)
}
