//! Self-check of the MPI pipeline on a small random model that every rank builds from the
//! same seed: waves of micro-batches through PipelineScorer must give LocalScorer's log-probs,
//! and greedy generation through PipelineDecoder LocalDecoder's tokens.
//!
//!     mpirun --oversubscribe -np 3 target/debug/examples/pipeline_check --layers 6 --group-layers 1
//!
//! With --parts DIR each rank reads its weights from DIR/rank<R>/<part>.safetensors, written
//! beforehand by `pipeline_check --write-parts DIR --ranks N` (each rank's folder holds only
//! that rank's parts). --kill-rank R makes rank R SIGKILL itself after --kill-after-ms while
//! rank 0 keeps scoring: the other ranks must then exit non-zero naming rank R. --stall-rank R
//! freezes rank R's main thread instead, its heartbeats still going: the job must end too.
//!
//! The check is a job kind like `score`: it runs through the library's one rank entry
//! (falcon_batch::job::rank::run), on the CPU, so start-up, abort and the end of the job are
//! the ones every command has. --trace writes one Chrome trace of every rank (from rank 0).

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use falcon_batch::backend::cpu::CpuBackend;
use falcon_batch::backend::select::DeviceChoice;
use falcon_batch::backend::Backend;
use falcon_batch::config::ModelConfig;
use falcon_batch::generate::{generate, GenOptions, GenRequest};
use falcon_batch::job::rank::{self, RankJob, RankSettings};
use falcon_batch::job::resources::DeviceInfo;
use falcon_batch::job::{describe, JobError};
use falcon_batch::runner::{BatchScorer, LocalDecoder, LocalScorer};
use falcon_batch::settings::Settings;
use falcon_batch::token_tree::{MicroBatch, TokenizedDoc};
use falcon_batch::model::Part;
use falcon_batch::pipeline::{read_rank_groups, Cluster, Identity, PipelineDecoder, PipelineScorer, Worker};
use falcon_batch::sample::SamplingOptions;
use falcon_batch::schedule::cost::WireDtype;
use falcon_batch::schedule::{ModelShape, RankCaps, Schedule, ScheduleOptions};
use falcon_batch::group::DeviceGroup;
use falcon_batch::tensor::{DType, HostTensor};
use falcon_batch::testing::{falcon_config, llama_config, rand_values, random_group, random_model_part, word_tokenizer};
use falcon_batch::trace::Trace;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SEED: u64 = 11;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "llama")]
    family: String,
    #[arg(long, default_value_t = 6)]
    layers: usize,
    #[arg(long, default_value_t = 1)]
    group_layers: usize,
    #[arg(long, default_value_t = 1)]
    resident: usize,
    #[arg(long, default_value_t = 2)]
    waves: usize,
    /// Micro-batches per wave.
    #[arg(long, default_value_t = 3)]
    wave: usize,
    #[arg(long)]
    generate: bool,
    #[arg(long)]
    parts: Option<PathBuf>,
    #[arg(long)]
    write_parts: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    ranks: usize,
    #[arg(long)]
    kill_rank: Option<usize>,
    #[arg(long, default_value_t = 1500)]
    kill_after_ms: u64,
    /// Freeze this rank's main thread after --kill-after-ms, as a hung device call or file
    /// system would, while its other threads (the heartbeats) carry on.
    #[arg(long)]
    stall_rank: Option<usize>,
    /// Pretend this rank loaded a different model (tests the identity check).
    #[arg(long)]
    odd_model_on_rank: Option<usize>,
    #[arg(long)]
    trace: Option<PathBuf>,
}

fn config(a: &Args) -> Result<ModelConfig> {
    Ok(match a.family.as_str() {
        "llama" => llama_config(a.layers)?,
        "falcon" => falcon_config(a.layers, true, true, false)?,
        other => bail!("unknown family {other}"),
    })
}

fn options(a: &Args) -> ScheduleOptions {
    ScheduleOptions { group_layers: Some(a.group_layers), resident: a.resident, wave: Some(a.wave), batch_tokens: 64, ..Default::default() }
}

/// A CPU rank with room to spare: the check is about data flow, not memory.
fn cpu_caps() -> RankCaps {
    RankCaps { device_bytes: 64 << 30, host_bytes: None, speed: 1.0, device: "cpu".into() }
}

fn plan(cfg: &ModelConfig, a: &Args, ranks: &[RankCaps]) -> Result<Schedule> {
    Ok(Schedule::plan(&ModelShape::from_config(cfg, 4), ranks, &options(a))?)
}

fn part_path(dir: &Path, rank: usize, part: Part) -> PathBuf {
    dir.join(format!("rank{rank}")).join(part.file_name())
}

fn write_parts(cfg: &ModelConfig, a: &Args, dir: &Path) -> Result<()> {
    let sched = plan(cfg, a, &vec![cpu_caps(); a.ranks])?;
    for rank in 0..a.ranks {
        for &g in &sched.rank_groups[rank] {
            for part in sched.groups[g].parts() {
                let path = part_path(dir, rank, part);
                std::fs::create_dir_all(path.parent().context("part path has a folder")?)?;
                let tensors = random_model_part(cfg, part, SEED);
                let views = tensors
                    .iter()
                    .map(|(n, t)| Ok((n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, t.shape.clone(), &t.data)?)))
                    .collect::<Result<Vec<_>>>()?;
                safetensors::tensor::serialize_to_file(views, None, &path)?;
            }
        }
    }
    Ok(())
}

fn read_part(path: &Path) -> Result<Vec<(String, HostTensor)>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok(st.tensors().into_iter().map(|(n, v)| (n, HostTensor { dtype: DType::F32, shape: v.shape().to_vec(), data: v.data().to_vec().into() })).collect())
}

/// Deterministic documents: prompts of 3..10 tokens, 2..3 choices of 1..4 tokens.
fn waves(cfg: &ModelConfig, a: &Args) -> Vec<Vec<MicroBatch>> {
    let r = rand_values(10_000, 5, 1.0);
    let mut k = 0;
    let mut next = |n: usize| {
        k += 1;
        ((r[k % r.len()] + 1.0) * 0.5 * n as f32) as usize % n
    };
    let mut out = vec![];
    for _ in 0..a.waves {
        let mut wave = vec![];
        for _ in 0..a.wave {
            let docs: Vec<TokenizedDoc> = (0..2)
                .map(|i| TokenizedDoc {
                    index: i,
                    id: format!("d{i}"),
                    prompt: (0..3 + next(8)).map(|_| next(cfg.vocab_size) as u32).collect(),
                    choices: (0..2 + next(2)).map(|_| (0..1 + next(4)).map(|_| next(cfg.vocab_size) as u32).collect()).collect(),
                })
                .collect();
            wave.push(MicroBatch::build(&docs));
        }
        out.push(wave);
    }
    out
}

fn max_diff(a: &[Vec<f64>], b: &[Vec<f64>]) -> Result<f64> {
    if a.len() != b.len() || a.iter().zip(b).any(|(x, y)| x.len() != y.len()) {
        bail!("result shapes differ");
    }
    Ok(a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max))
}

/// Rank 0: score (and generate) through the pipeline and compare with one process.
fn drive<B: Backend + 'static>(worker: &mut Worker<B>, cfg: &ModelConfig, a: &Args) -> Result<()> {
    let b = CpuBackend::new();
    let whole = [DeviceGroup::upload(&b, cfg, &random_group(cfg, 0..cfg.n_layers, SEED))?];
    let mut local = LocalScorer::new(&b, cfg, &whole);
    let waves = waves(cfg, a);
    let start = Instant::now();
    let mut scorer = PipelineScorer::new(worker)?;
    let mut worst = 0.0f64;
    // Waves go in as the score job sends them: up to the scorer's depth (two) in flight.
    let mut in_flight: VecDeque<usize> = VecDeque::new();
    let mut check = |i: usize, got: Vec<Vec<f64>>, worst: &mut f64| -> Result<()> {
        local.submit(&waves[i])?;
        let want = local.collect()?;
        *worst = worst.max(max_diff(&got, &want)?);
        if *worst > 1e-6 {
            bail!("wave {i}: pipeline log-probs differ from the local scorer by {worst:e}");
        }
        Ok(())
    };
    for (i, wave) in waves.iter().enumerate().cycle() {
        if in_flight.len() >= scorer.depth() {
            let oldest = in_flight.pop_front().unwrap_or(i);
            let got = scorer.collect()?;
            check(oldest, got, &mut worst)?;
        }
        scorer.submit(wave)?;
        in_flight.push_back(i);
        // A kill test keeps the ring busy until the killed rank is noticed.
        let more = (a.kill_rank.is_some() || a.stall_rank.is_some()) && start.elapsed() < Duration::from_secs(60);
        if i + 1 == waves.len() && !more {
            break;
        }
    }
    while let Some(oldest) = in_flight.pop_front() {
        let got = scorer.collect()?;
        check(oldest, got, &mut worst)?;
    }
    println!("pipeline_check: {} waves of {} scored within {worst:e} of the local scorer", waves.len(), a.wave);
    if a.generate {
        let tok = word_tokenizer(cfg.vocab_size)?;
        let reqs: Vec<GenRequest> = [vec![1u32, 5, 9], vec![3, 3, 7, 2, 8], vec![4]]
            .iter()
            .enumerate()
            .map(|(i, ids)| GenRequest { id: format!("p{i}"), prompt: String::new(), prompt_ids: ids.clone() })
            .collect();
        let opts = GenOptions { max_new_tokens: 6, sampling: SamplingOptions::default(), stop: vec![], eos: vec![], max_position: cfg.max_position };
        let mut dec = PipelineDecoder::new(worker)?;
        let got = generate(&mut dec, &tok, &reqs, &opts, |_, _| {})?;
        let want = generate(&mut LocalDecoder::new(&b, cfg, &whole), &tok, &reqs, &opts, |_, _| {})?;
        for (g, w) in got.iter().zip(&want) {
            if g.tokens != w.tokens {
                bail!("prompt {}: pipeline generated {:?}, local {:?}", g.id, g.tokens, w.tokens);
            }
        }
        println!("pipeline_check: greedy generation equals the local decoder ({} prompts)", reqs.len());
    }
    Ok(())
}

/// Every rank: agree on the random model, plan, read this rank's parts (random or from
/// --parts) and build its worker; then the fault a test asked this rank for.
fn launch<B: Backend + 'static>(cluster: &Cluster, backend: B, cfg: &ModelConfig, a: &Args) -> Result<Worker<B>> {
    let model_id = match a.odd_model_on_rank {
        Some(r) if r == cluster.rank => "some-other-model".to_string(),
        _ => format!("random-{}-{}-seed{SEED}", a.family, a.layers),
    };
    let identity = Identity { model_id, options: serde_json::to_value(options(a))?, wire_dtype: WireDtype::F32.name().to_string() };
    let ranks = cluster.exchange(&identity, &cpu_caps())?;
    let sched = plan(cfg, a, &ranks)?;
    if cluster.rank == 0 {
        (0..cluster.size).for_each(|r| eprintln!("{}", sched.describe_rank(r)));
    }
    let host = match &a.parts {
        Some(dir) => read_rank_groups(&sched, cluster.rank, |p| read_part(&part_path(dir, cluster.rank, p)))?,
        None => read_rank_groups(&sched, cluster.rank, |p| Ok::<_, anyhow::Error>(random_model_part(cfg, p, SEED)))?,
    };
    let trace = if a.trace.is_some() { Trace::for_rank(cluster.rank) } else { Trace::disabled() };
    let worker = Worker::new(cluster, Arc::new(backend), cfg.clone(), sched, host, trace, WireDtype::F32)?;
    if a.kill_rank == Some(cluster.rank) {
        let after = Duration::from_millis(a.kill_after_ms);
        std::thread::spawn(move || {
            std::thread::sleep(after);
            // SAFETY: signalling our own process.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        });
    }
    if a.stall_rank == Some(cluster.rank) {
        stall_main_thread_after(Duration::from_millis(a.kill_after_ms));
    }
    Ok(worker)
}

/// The check as a job kind: rank 0 drives (scores, generates, compares), the others serve.
struct Check {
    cfg: ModelConfig,
    args: Args,
}

/// The check's own errors, kept whole (with their causes) inside the job's error.
fn failed(e: anyhow::Error) -> JobError {
    JobError::Other(e.into())
}

impl RankJob for Check {
    type Prepared = ();

    fn prepare(&self) -> Result<(), JobError> {
        Ok(())
    }

    fn launch<B: Backend + 'static>(&self, cluster: &Cluster, backend: B, _device: DeviceInfo) -> Result<Worker<B>, JobError> {
        launch(cluster, backend, &self.cfg, &self.args).map_err(failed)
    }

    fn drive<B: Backend + 'static>(&self, (): (), worker: &mut Worker<B>) -> Result<u8, JobError> {
        drive(worker, &self.cfg, &self.args).map_err(failed)?;
        Ok(0)
    }

    /// No rank kept more groups on its device than --resident allows.
    fn finished<B: Backend + 'static>(&self, worker: &Worker<B>) -> Result<(), JobError> {
        if worker.uploaded_groups() > self.args.resident {
            let msg = format!("rank {}: {} groups uploaded, more than --resident {}", worker.rank, worker.uploaded_groups(), self.args.resident);
            return Err(failed(anyhow!(msg)));
        }
        Ok(())
    }
}

/// A signal handler that never returns: the thread it interrupts is stuck for good.
extern "C" fn stall_forever(_: libc::c_int) {
    loop {
        // SAFETY: sleep is async-signal-safe.
        unsafe { libc::sleep(1000) };
    }
}

/// After `after`, interrupt the calling thread with a handler that never returns.
fn stall_main_thread_after(after: Duration) {
    // SAFETY: installing a handler and signalling a live thread of this process.
    let main = unsafe { libc::pthread_self() };
    unsafe { libc::signal(libc::SIGUSR1, stall_forever as extern "C" fn(libc::c_int) as libc::sighandler_t) };
    let main = main as usize; // pthread_t is an integer on Linux; carried across the thread
    std::thread::spawn(move || {
        std::thread::sleep(after);
        unsafe { libc::pthread_kill(main as libc::pthread_t, libc::SIGUSR1) };
    });
}

fn main() -> std::process::ExitCode {
    let a = Args::parse();
    let cfg = match config(&a) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    if let Some(dir) = &a.write_parts {
        return match write_parts(&cfg, &a, dir) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::ExitCode::from(1)
            }
        };
    }
    let env = Settings::from_env();
    let trace = a.trace.clone();
    let settings = RankSettings { device: DeviceChoice::Cpu, trace, ..RankSettings::new(&env) };
    match rank::run(&settings, &Check { cfg, args: a }) {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            std::process::ExitCode::from(1)
        }
    }
}
