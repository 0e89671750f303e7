//! The generate job over the ranks: one prompt streamed to stdout, or a prompts file as a
//! batch, decoded through the pipeline (the sampling loop itself is crate::generate).

use super::launch::{launch, LaunchOptions};
use super::rank::RankJob;
use super::resources::DeviceInfo;
use super::JobError;
use crate::backend::{Backend, KvDtype};
use crate::config::ModelConfig;
use crate::format::model_dir::ModelDir;
use crate::generate::{generate, GenOptions, GenOutput, GenRequest};
use crate::pipeline::{Cluster, PipelineDecoder, Worker};
use crate::runner::{Decoder, StepBatch};
use crate::sample::SamplingOptions;
use crate::schedule::cost::WireDtype;
use crate::schedule::ScheduleOptions;
use crate::tokenizer::Tokenizer;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// What to generate and how, as the command's flags give it.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub model: PathBuf,
    /// One prompt; its text is streamed to stdout as it is made (when `out` is None).
    pub prompt: Option<String>,
    /// JSONL of {"id", "prompt"}: all prompts advance together.
    pub prompts: Option<PathBuf>,
    /// JSONL output, one line per prompt [None: stdout].
    pub out: Option<PathBuf>,
    /// Replace an existing `out`.
    pub overwrite: bool,
    pub max_new_tokens: usize,
    /// The sampler's options as given (its seed: `seed`, else 0).
    pub sampling: SamplingOptions,
    /// None: the writer draws one when sampling (and says it); greedy decoding needs none.
    pub seed: Option<u64>,
    /// Stop when the text contains one of these; it is not included.
    pub stop: Vec<String>,
    /// Do not stop at the model's end-of-sequence token.
    pub ignore_eos: bool,
    /// What the generation cache keeps keys and values as (CPU only).
    pub kv_cache: KvDtype,
}

pub struct GenerateJob {
    opts: GenerateOptions,
    launch: LaunchOptions,
}

impl GenerateJob {
    /// `compute_dtype` is the flag as given, which every rank must agree on.
    pub fn new(opts: GenerateOptions, schedule: ScheduleOptions, wire: Option<WireDtype>, compute_dtype: Option<String>, trace: bool) -> GenerateJob {
        let launch = LaunchOptions {
            model: opts.model.clone(),
            schedule,
            wire,
            job_options: serde_json::json!({
                "command": "generate",
                // The flags as given: every rank must agree on them, and only the writer draws a
                // seed that was left out.
                "sampling": opts.sampling,
                "seed": opts.seed,
                "max_new_tokens": opts.max_new_tokens,
                "stop": opts.stop,
                "ignore_eos": opts.ignore_eos,
                "kv_cache": opts.kv_cache.to_string(),
                "compute_dtype": compute_dtype,
            }),
            trace,
        };
        GenerateJob { opts, launch }
    }

    /// The prompts, tokenized; on the writer rank only, before any weight is read.
    fn requests(&self, tok: &Tokenizer) -> Result<Vec<GenRequest>, JobError> {
        let pairs = match (&self.opts.prompt, &self.opts.prompts) {
            (Some(p), _) => vec![("prompt".to_string(), p.clone())],
            (None, Some(path)) => read_prompts(path)?,
            (None, None) => return Err(JobError::Usage { flag: "--prompt", msg: "give --prompt or --prompts".into() }),
        };
        pairs.into_iter().map(|(id, prompt)| Ok(GenRequest { prompt_ids: tok.encode(&prompt, true)?, id, prompt })).collect()
    }

    /// --out must not replace a file by accident: it is refused unless --overwrite.
    fn check_out(&self) -> Result<(), JobError> {
        match &self.opts.out {
            Some(path) if !self.opts.overwrite && std::fs::symlink_metadata(path).is_ok() => Err(JobError::Usage {
                flag: "--out",
                msg: format!("{} exists; pass --overwrite to replace it, or name another file", path.display()),
            }),
            _ => Ok(()),
        }
    }

    /// --seed, or for sampling without one a random seed, said on stderr so the text can be
    /// made again (without this every such run gave seed 0's text). Greedy decoding uses no seed.
    fn seed(&self) -> u64 {
        match self.opts.seed {
            Some(s) => s,
            None if self.opts.sampling.temperature == 0.0 => 0,
            None => {
                let s = random_seed();
                crate::info!("generate: seed {s}; pass --seed {s} to repeat");
                s
            }
        }
    }

    fn write(&self, outputs: &[GenOutput], streamed: bool) -> Result<(), JobError> {
        match &self.opts.out {
            Some(path) => {
                let file_err = |what| move |source| JobError::File { path: path.clone(), what, source };
                let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(file_err("cannot create"))?);
                for o in outputs {
                    writeln!(f, "{}", serde_json::to_string(o)?).map_err(file_err("cannot write"))?;
                }
                f.flush().map_err(file_err("cannot write"))?;
                crate::info!("wrote {} generations to {}", outputs.len(), path.display());
            }
            None if !streamed => {
                for o in outputs {
                    print_line(&serde_json::to_string(o)?)?;
                }
            }
            // The streamed text has no newline of its own; end it before stderr's lines.
            None => print_line("")?,
        }
        if let (Some(_), [o]) = (&self.opts.prompt, outputs) {
            crate::info!("generate: finish {} after {} new tokens", o.finish.name(), o.tokens.len());
        }
        Ok(())
    }
}

/// A line to stdout, flushed, so a closed pipe is noticed at the line that met it.
fn print_line(line: &str) -> Result<(), JobError> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|_| out.flush()).map_err(JobError::Stdout)
}

/// (id, prompt) pairs of a prompts file. Output lines are matched to prompts by id, so every
/// line needs one of its own; the first bad line is an error naming the file, line and field.
fn read_prompts(path: &Path) -> Result<Vec<(String, String)>, JobError> {
    let text = std::fs::read_to_string(path).map_err(|source| JobError::File { path: path.to_path_buf(), what: "cannot read", source })?;
    let mut out = vec![];
    let mut first_line: HashMap<String, usize> = HashMap::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = format!("{}:{}", path.display(), i + 1);
        let v: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(source) => return Err(JobError::LineJson { at, source }),
        };
        let bad = |msg: String| JobError::Line { at: at.clone(), msg };
        let prompt = v.get("prompt").and_then(|p| p.as_str()).ok_or_else(|| bad("field \"prompt\": expected a string".into()))?;
        let id = match v.get("id") {
            Some(serde_json::Value::String(s)) if !s.trim().is_empty() => s.clone(),
            None => return Err(bad("field \"id\": missing, expected a non-empty string naming this prompt's output line".into())),
            Some(other) => return Err(bad(format!("field \"id\": expected a non-empty string, found {other}"))),
        };
        if let Some(first) = first_line.insert(id.clone(), i + 1) {
            return Err(bad(format!("field \"id\": {id:?} was already used on line {first}; every prompt needs its own id")));
        }
        out.push((id, prompt.to_string()));
    }
    Ok(out)
}

/// A seed from the OS's randomness (std's per-process random hash keys), kept to 2^53 so
/// it survives a round trip through JSON tools that read numbers as doubles.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish() >> 11
}

impl RankJob for GenerateJob {
    /// The tokenizer, the tokenized prompts, the model's config and the sampler's seed.
    type Prepared = (Tokenizer, Vec<GenRequest>, ModelConfig, u64);

    fn kv_dtype(&self) -> KvDtype {
        self.opts.kv_cache
    }

    fn prepare(&self) -> Result<Self::Prepared, JobError> {
        self.check_out()?;
        let dir = ModelDir::open_for(&self.opts.model, &[])?;
        let tok = dir.tokenizer()?;
        let reqs = self.requests(&tok)?;
        Ok((tok, reqs, dir.config().clone(), self.seed()))
    }

    fn launch<B: Backend + 'static>(&self, cluster: &Cluster, backend: B, device: DeviceInfo) -> Result<Worker<B>, JobError> {
        Ok(launch(cluster, backend, device, &self.launch)?.worker)
    }

    fn drive<B: Backend + 'static>(&self, (tok, reqs, cfg, seed): Self::Prepared, worker: &mut Worker<B>) -> Result<u8, JobError> {
        let opts = GenOptions {
            max_new_tokens: self.opts.max_new_tokens,
            sampling: SamplingOptions { seed, ..self.opts.sampling.clone() },
            stop: self.opts.stop.clone(),
            eos: if self.opts.ignore_eos { vec![] } else { cfg.eos_token_ids.clone() },
            max_position: cfg.max_position,
        };
        let stream = self.opts.prompt.is_some() && self.opts.out.is_none();
        let mut stdout = std::io::stdout();
        let mut dec = Timed::new(PipelineDecoder::new(worker)?);
        let outputs = generate(&mut dec, &tok, &reqs, &opts, |_, delta| {
            if stream {
                let _ = write!(stdout, "{delta}");
                let _ = stdout.flush();
            }
        })?;
        self.write(&outputs, stream)?;
        crate::info!("{}", dec.summary());
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
