//! `falcon-batch plan`: plan a schedule and predict its throughput before loading a weight.
//! The CLI glue around schedule/: reads the model's manifest or a preset, an optional cost
//! file, prints the plan and the simulation, writes the trace.

use falcon_batch::format::manifest::Manifest;
use falcon_batch::schedule::cost::{CostModel, ExtractWork, LayerCost, MeasuredCosts, WireDtype, Workload, DEFAULT_EFFICIENCY, TCP_PAYLOAD_SHARE};
use falcon_batch::schedule::simulate::{simulate, simulate_traced, SimReport};
use falcon_batch::schedule::tune::{tune, Candidate};
use falcon_batch::schedule::{gb, presets, ModelShape, RankCaps, Schedule, ScheduleOptions};
use falcon_batch::trace::Trace;
use super::usage::{self, UsageError};
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["model", "preset"])))]
#[command(after_help = "Compute cost: with --tflops a layer over a micro-batch of T tokens costs \
2 x (layer parameters) x T FLOPs for its matmuls plus 4 x L^2 x C for the attention of each \
document of L tokens (hidden size C, no causal saving), at --efficiency of the peak (default 0.5), \
plus 0.2 ms of kernel launches; the LM head costs 2 x C x V per scored position. With --costs the \
layer time is interpolated from measured (tokens, seconds) points instead. Sizes: 24GB = 24e9 \
bytes, 24GiB = 24 x 2^30; bandwidths: 24GB/s (bytes), 1Gbit or 10Gbit/s (bits).")]
pub struct PlanArgs {
    /// Model directory (reads manifest.json's "config" and "dtype").
    #[arg(long)]
    model: Option<PathBuf>,
    /// A known model instead of a directory: falcon-7b, falcon-40b, falcon-180b, llama-2-70b.
    #[arg(long)]
    preset: Option<String>,
    /// Number of ranks (one per GPU).
    #[arg(long, value_parser = usage::at_least_one)]
    ranks: usize,
    /// Device memory per rank, e.g. 24GB or 24GiB (the unit is required).
    #[arg(long, value_parser = usage::size)]
    device_mem: u64,
    /// Host memory each rank may pin (a node's memory divided by its GPUs); unchecked if absent.
    #[arg(long, value_parser = usage::size)]
    host_mem: Option<u64>,
    /// Host-to-device bandwidth (pinned copies) [default: 24GB/s, or the cost file's].
    #[arg(long, value_parser = usage::rate)]
    h2d: Option<f64>,
    /// Network bandwidth between ranks [default: 1Gbit, or the cost file's].
    #[arg(long, value_parser = usage::rate)]
    net: Option<f64>,
    /// Network latency per message [default: 50us, or the cost file's].
    #[arg(long, value_parser = usage::duration)]
    net_latency: Option<f64>,
    /// Peak dense bf16 TFLOPS of one device; compute cost derived from FLOPs (see below).
    #[arg(long, value_parser = usage::positive)]
    tflops: Option<f64>,
    /// Fraction of --tflops large matmuls reach, in (0, 1].
    #[arg(long, default_value_t = DEFAULT_EFFICIENCY, value_parser = usage::fraction)]
    efficiency: f64,
    /// Measured costs from `falcon-batch bench` (JSON: layer_seconds [[tokens, seconds], ...],
    /// h2d_bytes_per_s, net_bytes_per_s, net_latency_s).
    #[arg(long)]
    costs: Option<PathBuf>,
    /// Documents to score.
    #[arg(long, default_value_t = 100_000, value_parser = usage::at_least_one)]
    docs: usize,
    /// Prompt tokens per document.
    #[arg(long, default_value_t = 1500, value_parser = usage::at_least_one)]
    doc_tokens: usize,
    /// Answer choices per document.
    #[arg(long, default_value_t = 4, value_parser = usage::at_least_one)]
    choices: usize,
    /// Tokens per choice.
    #[arg(long, default_value_t = 4, value_parser = usage::at_least_one)]
    choice_tokens: usize,
    /// Predict `extract` (the document's best spans) beside `score` of the same prompts.
    #[arg(long)]
    extract: bool,
    /// With --extract: rows run beyond the prompt per document, over all passes (extract's
    /// /docs/tree_tokens; scripts/bench_extract.py prints its mean).
    #[arg(long, default_value_t = DEFAULT_TREE_ROWS, value_parser = usage::at_least_one, requires = "extract")]
    tree_rows: usize,
    /// With --extract: passes per document, the prompt's included (extract's /docs/passes).
    #[arg(long, default_value_t = DEFAULT_PASSES, value_parser = usage::at_least_one, requires = "extract")]
    passes: usize,
    /// Most layers per group [default: chosen by simulation among the sizes that fit].
    #[arg(long, value_parser = usage::at_least_one)]
    group_layers: Option<usize>,
    /// Groups kept on the device per rank; 2 copies the next group while computing
    /// [default: chosen by simulation among 1-3; 2 without a cost model].
    #[arg(long, value_parser = usage::at_least_one)]
    resident: Option<usize>,
    /// Micro-batches per wave [default: 4 per rank].
    #[arg(long, value_parser = usage::at_least_one)]
    wave: Option<usize>,
    /// Token budget of a micro-batch (whole documents with their choices).
    #[arg(long, default_value_t = 2048, value_parser = usage::at_least_one)]
    batch_tokens: usize,
    /// Relative speed of each rank, comma-separated (heterogeneous ranks).
    #[arg(long, value_delimiter = ',', value_parser = usage::positive)]
    rank_speed: Option<Vec<f64>>,
    /// Device memory kept free for the runtime.
    #[arg(long, default_value = "1GiB", value_parser = usage::size)]
    reserve: u64,
    /// Activations on the wire: f32 (as computed) or bf16 (half the bytes) [default: bf16
    /// when the weights are bf16 or narrower, f32 otherwise].
    #[arg(long)]
    wire_dtype: Option<WireDtype>,
    /// Write the simulated timeline as Chrome trace JSON (open in Perfetto).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Print the schedule and prediction as JSON.
    #[arg(long)]
    json: bool,
    /// Print only the part files rank R reads, one per line (for slurm/stage-parts.sh).
    #[arg(long, value_name = "R")]
    parts_for_rank: Option<usize>,
}

struct Model {
    label: String,
    shape: ModelShape,
    /// Part name -> file name, from the manifest.
    files: HashMap<String, String>,
}

fn load_model(args: &PlanArgs) -> Result<Model> {
    if let Some(name) = &args.preset {
        let Some(shape) = ModelShape::preset(name) else {
            return Err(UsageError::new("--preset", format!("unknown model `{name}`; known: {}", presets::PRESETS.join(", "))).into());
        };
        return Ok(Model { label: name.clone(), shape, files: HashMap::new() });
    }
    let Some(dir) = &args.model else { bail!("give --model DIR or --preset NAME") };
    // The one manifest reader (format::manifest), with the checks every other command makes.
    let m = Manifest::load(dir).with_context(|| "--model")?;
    let files = m.parts.iter().map(|p| (p.name.clone(), p.file.clone())).collect();
    let shape = ModelShape::from_config(&m.config, m.dtype.size());
    Ok(Model { label: dir.display().to_string(), shape, files })
}

fn flag<T, E: std::fmt::Display>(name: &str, r: std::result::Result<T, E>) -> Result<T> {
    r.map_err(|e| anyhow::anyhow!("{name}: {e}"))
}

fn options(args: &PlanArgs) -> Result<(Vec<RankCaps>, ScheduleOptions)> {
    let rank_speed = args.rank_speed.clone();
    let ranks = (0..args.ranks)
        .map(|r| RankCaps {
            device_bytes: args.device_mem,
            host_bytes: args.host_mem,
            speed: rank_speed.as_ref().and_then(|s| s.get(r).copied()).unwrap_or(1.0),
            device: "gpu".into(),
        })
        .collect();
    let opts = ScheduleOptions {
        group_layers: args.group_layers,
        resident: args.resident.unwrap_or(2),
        wave: args.wave,
        batch_tokens: args.batch_tokens,
        rank_speed,
        reserve_bytes: args.reserve,
    };
    Ok((ranks, opts))
}

/// The cost model and a line saying where it came from. Explicit flags beat the cost file,
/// which beats the defaults.
fn cost_model(args: &PlanArgs, shape: &ModelShape) -> Result<(CostModel, String)> {
    let measured = match &args.costs {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("--costs: {}", p.display()))?;
            Some(flag("--costs", MeasuredCosts::parse(&text)).with_context(|| p.display().to_string())?)
        }
        None => None,
    };
    let h2d = args.h2d.or(measured.as_ref().and_then(|m| m.h2d_bytes_per_s)).unwrap_or(DEFAULT_H2D);
    let net = args.net.or(measured.as_ref().and_then(|m| m.net_bytes_per_s)).unwrap_or(DEFAULT_NET);
    let latency = args.net_latency.or(measured.as_ref().and_then(|m| m.net_latency_s)).unwrap_or(DEFAULT_LATENCY);
    let (mut cost, source) = match (&measured, args.tflops) {
        (Some(m), _) => {
            let tflops = args.tflops.unwrap_or(0.0);
            let mut c = CostModel::from_flops(shape, tflops.max(1.0), args.efficiency, h2d, net, latency);
            c.layer = LayerCost::Table(m.layer_seconds.clone());
            c.head_row_s = m.head_row_s.unwrap_or(if tflops > 0.0 { c.head_row_s } else { 0.0 });
            (c, format!("measured layer costs ({} points)", m.layer_seconds.len()))
        }
        (None, Some(t)) => {
            (CostModel::from_flops(shape, t, args.efficiency, h2d, net, latency), format!("{t} TFLOPS x {} efficiency", args.efficiency))
        }
        (None, None) => return Err(no_cost_model().into()),
    };
    let wire = wire_dtype(args, shape);
    cost.wire_bytes = wire.bytes();
    let line = format!(
        "{source}; h2d {:.1} GB/s; net {:.3} GB/s ({:.3} GB/s of TCP payload), latency {:.0} us; activations sent as {}",
        h2d / 1e9,
        net / 1e9,
        net * TCP_PAYLOAD_SHARE / 1e9,
        latency * 1e6,
        wire.name()
    );
    Ok((cost, line))
}

/// --wire-dtype, or the default `score` takes for these weights.
fn wire_dtype(args: &PlanArgs, shape: &ModelShape) -> WireDtype {
    args.wire_dtype.unwrap_or(WireDtype::default_for(shape.dtype_bytes))
}

/// Extract's search per document as measured on a ~1500-token document (`make bench` run 33,
/// bench_extract.py's long row: 179 tree rows in 5 passes; 94 in 5.6 on the ~185-token
/// sample documents). Per document, not per token: the best-first search deepens bounds only
/// where a span can still enter the top-k.
const DEFAULT_TREE_ROWS: usize = 179;
const DEFAULT_PASSES: usize = 5;

/// The workload to predict: score's, or with --extract extract's of the same prompts.
fn workload(args: &PlanArgs, extract: bool) -> Workload {
    Workload {
        docs: args.docs,
        doc_tokens: args.doc_tokens,
        choices: args.choices,
        choice_tokens: args.choice_tokens,
        batch_tokens: args.batch_tokens,
        extract: extract.then_some(ExtractWork { tree_rows: args.tree_rows, passes: args.passes }),
    }
}

/// --passes and --tree-rows that no search can give: a pass after the first runs a row at least.
fn check_extract(args: &PlanArgs) -> Result<(), UsageError> {
    if args.passes < 2 {
        return Err(UsageError::new("--passes", format!("extract makes at least 2 passes (the prompt, then its tree), got {}", args.passes)));
    }
    if args.tree_rows < args.passes - 1 {
        return Err(UsageError::new(
            "--tree-rows",
            format!("{} tree rows cannot fill {} passes after the first (at least a row each)", args.tree_rows, args.passes - 1),
        ));
    }
    Ok(())
}

/// Defaults of the cost model's links, written as a user would give them.
const DEFAULT_H2D: f64 = 24e9; // 24GB/s
const DEFAULT_NET: f64 = 125e6; // 1Gbit
const DEFAULT_LATENCY: f64 = 50e-6; // 50us

fn no_cost_model() -> UsageError {
    UsageError::new("--tflops", "give --tflops (peak of one device) or --costs (measured) to predict throughput")
}

/// Run the subcommand; returns what to print. --resident and --group-layers left open are
/// chosen by simulation whenever a cost model is given, with or without --parts-for-rank, so
/// staging and planning with the same flags agree.
pub fn run(args: &PlanArgs) -> Result<String> {
    let model = load_model(args)?;
    let (ranks, opts) = options(args)?;
    if args.extract {
        check_extract(args)?;
    }
    let work = workload(args, args.extract);
    let has_cost = args.tflops.is_some() || args.costs.is_some();
    let (sched, cost, candidates) = if has_cost {
        let (cost, line) = cost_model(args, &model.shape)?;
        let (sched, candidates) = planned(args, &model.shape, &ranks, &opts, &cost, &work)?;
        (sched, Some((cost, line)), candidates)
    } else {
        (Schedule::plan(&model.shape, &ranks, &opts)?, None, vec![])
    };
    if let Some(r) = args.parts_for_rank {
        if r >= sched.n_ranks() {
            return Err(UsageError::new("--parts-for-rank", format!("rank {r} does not exist (ranks 0-{})", sched.n_ranks() - 1)).into());
        }
        let files: Vec<String> = sched
            .parts_for_rank(r)
            .into_iter()
            .map(|name| model.files.get(&name).cloned().unwrap_or_else(|| format!("{name}.safetensors")))
            .collect();
        return Ok(files.iter().map(|f| format!("{f}\n")).collect());
    }
    let Some((cost, cost_line)) = cost else {
        return Err(no_cost_model().into());
    };
    let mut trace = if args.trace.is_some() { Trace::for_rank(0) } else { Trace::disabled() };
    let report = simulate_traced(&sched, &cost, &work, &mut trace)?;
    if let Some(path) = &args.trace {
        trace.write(path).with_context(|| format!("--trace: {}", path.display()))?;
    }
    // Score of the same prompts, planned as `plan` without --extract plans it, so the two
    // figures are each command's own best.
    let score = match work.extract {
        Some(x) => {
            let score_work = workload(args, false);
            let (s, _) = planned(args, &model.shape, &ranks, &opts, &cost, &score_work)?;
            Some((x, simulate(&s, &cost, &score_work)?))
        }
        None => None,
    };
    if args.json {
        let mut v = serde_json::json!({"model": model.label, "schedule": sched, "cost": cost_line, "report": report});
        if let Some((x, sc)) = &score {
            v["extract"] = serde_json::json!({
                "passes": x.passes, "tree_rows": x.tree_rows, "score_report": sc,
                "extract_over_score": sc.docs_per_hour / report.docs_per_hour,
            });
        }
        return Ok(format!("{}\n", serde_json::to_string_pretty(&v)?));
    }
    let mut out = render(&model, &sched, &work, &cost_line, &report, wire_dtype(args, &model.shape));
    if let Some((x, sc)) = &score {
        render_extract(&mut out, &sched, &work, x, &report, sc);
    }
    if !candidates.is_empty() {
        let _ = writeln!(out, "\nchosen by simulation among (documents/hour):");
        for c in &candidates {
            let Candidate { resident, group_layers, docs_per_hour } = c;
            let _ = writeln!(out, "  --resident {resident} --group-layers {group_layers}: {docs_per_hour:.0}");
        }
    }
    Ok(out)
}

/// The schedule for `work`: --resident and --group-layers left open are chosen by simulation.
fn planned(args: &PlanArgs, shape: &ModelShape, ranks: &[RankCaps], opts: &ScheduleOptions, cost: &CostModel, work: &Workload) -> Result<(Schedule, Vec<Candidate>)> {
    let free = (args.resident.is_none(), args.group_layers.is_none());
    if free.0 || free.1 {
        let t = tune(shape, ranks, opts, cost, work, free.0, free.1)?;
        Ok((t.schedule, t.candidates))
    } else {
        Ok((Schedule::plan(shape, ranks, opts)?, vec![]))
    }
}

/// Extract's own lines: its passes and tree rows, and its rate beside score's.
fn render_extract(o: &mut String, s: &Schedule, work: &Workload, x: &ExtractWork, ext: &SimReport, score: &SimReport) {
    let (piece, pieces, _) = work.tree_packing();
    let _ = writeln!(o, "\nextract (the same {} documents of {} prompt tokens):", work.docs, work.doc_tokens);
    let _ = writeln!(
        o,
        "  passes per document: {}; tree tokens per document: {} ({} per pass after the first; micro-batches of {pieces} x {piece} rows, each row reading the {} prompt keys kept from pass 1)",
        x.passes,
        x.tree_rows,
        x.rows_per_pass(),
        work.doc_tokens
    );
    // The keys and values each rank keeps from pass 1 for the document's later passes: the
    // K and V columns of qkv (f32), over the layers of the rank that holds the most.
    let layers = (0..s.n_ranks()).map(|r| s.rank_groups[r].iter().map(|&g| s.groups[g].layers.len()).sum::<usize>()).max().unwrap_or(0);
    let m = &s.shape;
    let kv = 4 * work.doc_tokens as u64 * (m.qkv_dim - m.attn_dim) as u64 * layers as u64;
    let _ = writeln!(o, "  prompt keys/values kept per document: {} on the rank with the most layers ({layers})", gb(kv));
    let _ = writeln!(o, "  extract documents/hour: {:.0} ({:.2} s per document)", ext.docs_per_hour, ext.total_s / ext.docs as f64);
    let _ = writeln!(o, "  score documents/hour: {:.0} ({} choices x {} tokens, its own plan)", score.docs_per_hour, work.choices, work.choice_tokens);
    let _ = writeln!(o, "  extract / score time per document: {:.2}", score.docs_per_hour / ext.docs_per_hour.max(1e-12));
}

/// "3", or "2-3" where the group count is not a multiple of the ranks'.
fn groups_per_rank(s: &Schedule) -> String {
    let counts = s.rank_groups.iter().map(Vec::len);
    let (lo, hi) = (counts.clone().min().unwrap_or(0), counts.max().unwrap_or(0));
    if lo == hi {
        lo.to_string()
    } else {
        format!("{lo}-{hi}")
    }
}

fn render(model: &Model, s: &Schedule, work: &Workload, cost_line: &str, rep: &SimReport, wire: WireDtype) -> String {
    let m = &s.shape;
    let mut o = String::new();
    let sizes: Vec<usize> = s.groups.iter().map(|g| g.layers.len()).collect();
    let (lo, hi) = (sizes.iter().min().copied().unwrap_or(0), sizes.iter().max().copied().unwrap_or(0));
    let _ = writeln!(
        o,
        "model {}: {} {} layers x {}, begin {}, end {}, {} in all",
        model.label,
        m.family.name(),
        m.n_layers,
        gb(m.layer_bytes),
        gb(m.begin_bytes),
        gb(m.end_bytes),
        gb(m.total_bytes())
    );
    let _ = writeln!(
        o,
        "schedule: {} ranks, {} groups of {lo}-{hi} layers ({} per rank), resident {}, wave {} micro-batches; activations {} per micro-batch",
        s.n_ranks(),
        s.groups.len(),
        groups_per_rank(s),
        s.resident,
        s.wave,
        gb(s.activation_bytes)
    );
    for r in 0..s.n_ranks() {
        let _ = writeln!(o, "{}", s.describe_rank(r));
    }
    let k = s.options.group_layers.unwrap_or(hi);
    let _ = writeln!(
        o,
        "flags for this plan: --resident {} --group-layers {k} --wave {} --batch-tokens {} --wire-dtype {}",
        s.resident,
        s.wave,
        s.batch_tokens,
        wire.name()
    );
    let _ = writeln!(o, "\nprediction ({cost_line}):");
    let what = match work.extract {
        None => format!("{} tokens ({} + {} choices x {})", work.seq_tokens(), work.doc_tokens, work.choices, work.choice_tokens),
        Some(x) => format!("{} prompt tokens + {} tree rows in {} passes (extract)", work.doc_tokens, x.tree_rows, x.passes),
    };
    let _ = writeln!(
        o,
        "  {} documents of {what}, {} per micro-batch: {} micro-batches in {} waves{}",
        rep.docs,
        rep.docs_per_micro,
        rep.micro_batches,
        rep.waves,
        if rep.simulated_waves < rep.waves { format!(" ({} simulated, the rest extrapolated)", rep.simulated_waves) } else { String::new() }
    );
    let _ = writeln!(o, "  total {:.1} h, {:.0} documents/hour, {:.2} s per document", rep.total_s / 3600.0, rep.docs_per_hour, rep.total_s / rep.docs as f64);
    let _ = writeln!(o, "  bottleneck: {}", rep.bottleneck.describe());
    let _ = writeln!(o, "  network: {} per document between ranks", gb(rep.net_bytes_per_doc as u64));
    let _ = writeln!(o, "  share of the first {:.0} s:  compute   copy   send   wait-input   wait-weights", rep.simulated_s);
    for (r, t) in rep.ranks.iter().enumerate() {
        let pct = |x: f64| 100.0 * x / rep.simulated_s.max(1e-12);
        let _ = writeln!(
            o,
            "    rank {r:<3} {:>24.0}% {:>5.0}% {:>5.0}% {:>11.0}% {:>13.0}%",
            pct(t.compute_s),
            pct(t.copy_s),
            pct(t.send_s),
            pct(t.wait_input_s),
            pct(t.wait_weights_s)
        );
    }
    o
}
