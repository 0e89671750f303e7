//! `falcon-batch bench`: per-layer forward time of real layer shapes with synthetic
//! weights (made where they live, no files), host-to-device bandwidth from pinned memory,
//! and weight streaming through a small resident window. The JSON is what the planner's
//! cost model reads (docs/DESIGN.md, "Schedule and planner").

use falcon_batch::backend::cpu::CpuBackend;
use falcon_batch::backend::cuda::CudaBackend;
use falcon_batch::pipeline::WeightWindow;
use falcon_batch::group::GroupTensorNames;
use falcon_batch::backend::select::{DeviceChoice, Resolved};
use falcon_batch::backend::{Backend, Ops};
use falcon_batch::config::ModelConfig;
use falcon_batch::token_tree::{AttnSpan, MicroBatch, TokenizedDoc};
use falcon_batch::model::{self, LayerCache, Part, RowCtx, PartWeights};
use falcon_batch::tensor::{DType, HostTensor};
use thiserror::Error;


#[derive(Debug, Error)]
pub enum BenchError {
    #[error("{what}: {source}")]
    Backend { what: String, source: falcon_batch::backend::BackendError },
    #[error("{what}: {source}")]
    Model { what: String, source: falcon_batch::model::ModelError },
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}

impl From<falcon_batch::backend::BackendError> for BenchError {
    fn from(source: falcon_batch::backend::BackendError) -> Self {
        BenchError::Backend { what: "bench".into(), source }
    }
}

impl From<falcon_batch::model::ModelError> for BenchError {
    fn from(source: falcon_batch::model::ModelError) -> Self {
        BenchError::Model { what: "bench".into(), source }
    }
}

/// Names the step that failed (the backend's message alone does not say which).
trait During<T> {
    fn during(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Into<BenchError>> During<T> for std::result::Result<T, E> {
    fn during(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| match e.into() {
            BenchError::Backend { source, .. } => BenchError::Backend { what: what(), source },
            BenchError::Model { source, .. } => BenchError::Model { what: what(), source },
            other => other,
        })
    }
}

pub type Result<T> = std::result::Result<T, BenchError>;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

pub use falcon_batch::schedule::presets::PRESETS;

pub struct BenchOptions {
    pub device: DeviceChoice,
    pub synthetic: String,
    /// Layers of the streaming run.
    pub layers: usize,
    /// Layers resident on the device during the streaming run (two groups of window / 2).
    pub window: usize,
    pub reps: usize,
    pub out: Option<PathBuf>,
    /// Allow presets whose f32 CPU layer is larger than 2 GB.
    pub force: bool,
    /// What the CPU's GEMMs multiply in (`--compute-dtype`): the report's layer times and bytes
    /// are then that route's, for `plan --costs`.
    pub compute_dtype: falcon_batch::backend::ComputeDtype,
}

/// One timed forward: `label` (e.g. "4x2048"), total rows, median seconds per layer.
#[derive(Clone, Debug, Serialize)]
pub struct LayerTiming {
    pub label: String,
    pub tokens: usize,
    pub seconds: f64,
}

/// The attention op alone on a shape's token tree: median seconds, and the multiply-adds
/// of the (query, key) pairs it attends as TFLOP/s (4 D flops a pair and head).
#[derive(Clone, Debug, Serialize)]
pub struct AttnTiming {
    pub label: String,
    pub tokens: usize,
    pub seconds: f64,
    pub tflops: f64,
}

/// One generation step of one layer: a single new token over `context` cached tokens.
#[derive(Clone, Debug, Serialize)]
pub struct DecodeTiming {
    pub context: usize,
    pub seconds: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct StreamResult {
    pub layers: usize,
    pub window: usize,
    pub tokens: usize,
    pub seconds: f64,
    /// layers x resident per-layer time at the same token count
    pub resident_seconds: f64,
    /// resident_seconds / seconds: 1.0 means the copies hide entirely under compute.
    pub relative_throughput: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub device: String,
    pub backend: String,
    pub model: String,
    /// Bytes of one layer in the backend's storage (bf16 on CUDA, f32 on the CPU).
    pub layer_bytes: usize,
    /// [[tokens, seconds per layer], ...]: what the planner reads.
    pub layer_seconds: Vec<(usize, f64)>,
    pub timings: Vec<LayerTiming>,
    /// Per-layer decode step (generation) at each context length.
    pub decode: Vec<DecodeTiming>,
    /// The attention op alone at each shape.
    pub attention: Vec<AttnTiming>,
    pub h2d_seconds_per_layer: Option<f64>,
    pub h2d_bytes_per_s: Option<f64>,
    /// One layer-sized tensor copied in one piece: the pinned copy's ceiling.
    pub h2d_peak_bytes_per_s: Option<f64>,
    pub stream: Option<StreamResult>,
}

/// A preset's config (the planner's table, falcon_batch::schedule::presets).
pub fn preset(name: &str) -> Result<ModelConfig> {
    falcon_batch::schedule::presets::config(name)
        .ok_or_else(|| BenchError::Invalid(format!("unknown synthetic model `{name}`; expected one of {}", PRESETS.join(", "))))
}

/// A micro-batch of `docs` documents of `rows_per_doc` rows each, as a token tree:
/// a prompt plus 4 choices of 3 tokens (2 rows each), like the scoring workload.
pub fn synthetic_batch(docs: usize, rows_per_doc: usize) -> MicroBatch {
    let choice_rows = if rows_per_doc > 16 { 8 } else { 0 };
    let docs: Vec<TokenizedDoc> = (0..docs)
        .map(|d| TokenizedDoc {
            index: d,
            id: format!("synthetic-{d}"),
            prompt: (0..(rows_per_doc - choice_rows) as u32).map(|t| t % 1000 + 1).collect(),
            choices: if choice_rows > 0 { (0..4).map(|c| vec![c + 1, c + 2, c + 3]).collect() } else { vec![vec![1]] },
        })
        .collect();
    MicroBatch::build(&docs)
}

fn weight_range(name: &str, shape: &[usize]) -> (f32, f32) {
    if name.ends_with("norm.weight") {
        (0.9, 1.1)
    } else if name.ends_with(".bias") {
        (-0.02, 0.02)
    } else {
        let a = 1.0 / (*shape.last().unwrap_or(&1) as f32).sqrt();
        (-a, a)
    }
}

/// One layer's synthetic weights, made by the backend.
pub fn synthetic_layer<B: Backend>(b: &B, cfg: &ModelConfig, layer: usize) -> Result<PartWeights<B>> {
    let mut named = vec![];
    for (i, (name, shape)) in model::expected_tensors(cfg, Part::Layer(layer)).into_iter().enumerate() {
        let (lo, hi) = weight_range(&name, &shape);
        let w = b.random_weight(&shape, (layer as u64) << 16 | i as u64, lo, hi).during(|| format!("weight {name}"))?;
        named.push((name, w));
    }
    Ok(PartWeights::new(cfg, Part::Layer(layer), named)?)
}

fn layer_params(cfg: &ModelConfig) -> usize {
    model::expected_tensors(cfg, Part::Layer(0)).iter().map(|(_, s)| s.iter().product::<usize>()).sum()
}

fn input<B: Backend>(b: &B, rows: usize, cols: usize) -> Result<B::Act> {
    let v: Vec<f32> = (0..rows * cols).map(|i| falcon_batch::backend::uniform_bf16(7, i as u64, -1.0, 1.0)).collect();
    Ok(b.upload(&v, rows, cols)?)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median seconds of one layer forward over `reps` runs, after one warm-up.
fn time_layer<B: Backend>(b: &B, cfg: &ModelConfig, w: &PartWeights<B>, batch: &MicroBatch, reps: usize) -> Result<f64> {
    let ctx = RowCtx { positions: &batch.positions, spans: &batch.spans, cache_order: None };
    let mut x = input(b, batch.rows(), cfg.hidden_size)?;
    let mut times = vec![];
    for r in 0..=reps {
        b.sync()?;
        let t0 = Instant::now();
        x = model::layer_forward(b, cfg, w, x, &ctx, None)?;
        b.sync()?;
        if r > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    Ok(median(times))
}

/// Median seconds of one layer's decode step: the KV cache is filled with `context` rows by a
/// prefill, then single tokens run against it (each appending its key, as generation does).
fn time_decode<B: Backend>(b: &B, cfg: &ModelConfig, w: &PartWeights<B>, context: usize, reps: usize) -> Result<f64> {
    let positions: Vec<u32> = (0..context as u32).collect();
    let spans = vec![AttnSpan::causal(0); context];
    let mut cache = LayerCache::default();
    let prefill = RowCtx { positions: &positions, spans: &spans, cache_order: None };
    model::layer_forward(b, cfg, w, input(b, context, cfg.hidden_size)?, &prefill, Some(&mut cache))?;
    let mut times = vec![];
    for r in 0..=reps {
        let pos = [(context + r) as u32];
        let span = [AttnSpan::causal(0)];
        let step = RowCtx { positions: &pos, spans: &span, cache_order: None };
        let x = input(b, 1, cfg.hidden_size)?;
        b.sync()?;
        let t0 = Instant::now();
        model::layer_forward(b, cfg, w, x, &step, Some(&mut cache))?;
        b.sync()?;
        if r > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    Ok(median(times))
}

const DECODE_CONTEXTS: &[usize] = &[100, 2048];

fn decode_timings<B: Backend>(b: &B, cfg: &ModelConfig, reps: usize) -> Result<Vec<DecodeTiming>> {
    let w = synthetic_layer(b, cfg, 0)?;
    let mut out = vec![];
    for &context in DECODE_CONTEXTS {
        let seconds = time_decode(b, cfg, &w, context, reps).during(|| format!("timing a decode step at context {context}"))?;
        falcon_batch::info!("  decode at {context:>5} context: {:9.3} ms per layer", seconds * 1e3);
        out.push(DecodeTiming { context, seconds });
    }
    Ok(out)
}

const SHAPES: &[(&str, usize, usize)] = &[("100", 1, 100), ("512", 1, 512), ("2048", 1, 2048), ("4x2048", 4, 2048)];

fn layer_timings<B: Backend>(b: &B, cfg: &ModelConfig, reps: usize) -> Result<Vec<LayerTiming>> {
    let w = synthetic_layer(b, cfg, 0)?;
    let mut out = vec![];
    for &(label, docs, rows) in SHAPES {
        let batch = synthetic_batch(docs, rows);
        let seconds = time_layer(b, cfg, &w, &batch, reps).during(|| format!("timing a layer at {label} tokens"))?;
        falcon_batch::info!("  {label:>7} tokens: {:9.3} ms per layer", seconds * 1e3);
        out.push(LayerTiming { label: label.into(), tokens: batch.rows(), seconds });
    }
    Ok(out)
}

fn attention_timings<B: Backend>(b: &B, cfg: &ModelConfig, reps: usize) -> Result<Vec<AttnTiming>> {
    let (h, kv, d) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
    let shape = falcon_batch::backend::AttnShape { heads: h, kv_heads: kv, head_dim: d, key_offset: 0 };
    let mut out = vec![];
    for &(label, docs, rows) in SHAPES {
        let batch = synthetic_batch(docs, rows);
        let t = batch.rows();
        let pairs: usize = batch.spans.iter().enumerate().map(|(r, s)| (s.shared_end - s.shared_start) as usize + (r + 1 - s.own_start as usize)).sum();
        let (q, k, v) = (input(b, t, h * d)?, input(b, t, kv * d)?, input(b, t, kv * d)?);
        let mut times = vec![];
        for r in 0..=reps {
            b.sync()?;
            let t0 = Instant::now();
            let o = b.attention(&q, &k, &v, shape, &batch.spans)?;
            b.sync()?;
            drop(o);
            if r > 0 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        let seconds = median(times);
        let tflops = (4 * d * h * pairs) as f64 / seconds / 1e12;
        falcon_batch::info!("  attention {label:>7} tokens: {:9.3} ms ({tflops:.3} TFLOP/s)", seconds * 1e3);
        out.push(AttnTiming { label: label.into(), tokens: t, seconds, tflops });
    }
    Ok(out)
}

/// One layer's host tensors in bf16, each tiling a short random block (weights' range):
/// realistic values (zeros can run faster than real data) at memcpy speed even for
/// Falcon-180B's 4.4 GB layers.
fn host_layer(cfg: &ModelConfig) -> Vec<(String, HostTensor)> {
    const BLOCK: usize = 1 << 16;
    model::expected_tensors(cfg, Part::Layer(0))
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let (lo, hi) = weight_range(&name, &shape);
            let block: Vec<u8> = (0..BLOCK as u64).flat_map(|j| half::bf16::from_f32(falcon_batch::backend::uniform_bf16(i as u64, j, lo, hi)).to_le_bytes()).collect();
            let n: usize = shape.iter().product();
            let mut data = Vec::with_capacity(n * 2);
            while data.len() < n * 2 {
                let k = (n * 2 - data.len()).min(block.len());
                data.extend_from_slice(&block[..k]);
            }
            (name, HostTensor { dtype: DType::Bf16, shape, data: data.into() })
        })
        .collect()
}

/// Seconds of one copy of `group` into a slot, until compute could use it (best of 3),
/// through the streaming contract. Also the device bytes moved.
fn time_copy<B: Backend>(b: &B, group: &Arc<B::Pinned>, n_tensors: usize) -> Result<f64> {
    let mut best = f64::INFINITY;
    let mut slot = None;
    for _ in 0..3 {
        b.sync()?;
        let t0 = Instant::now();
        let mut t = b.prefetch(group.clone(), slot.take())?;
        let w = b.wait(&mut t)?;
        b.sync()?; // the compute stream has waited for the copy
        best = best.min(t0.elapsed().as_secs_f64());
        if w.len() != n_tensors {
            return Err(BenchError::Invalid(format!("a copy of {n_tensors} tensors returned {}", w.len())));
        }
        slot = Some(b.release(t, w)?.0);
    }
    Ok(best)
}

/// Seconds to copy one pinned layer to the device, and its bytes there.
fn h2d_layer<B: Backend>(b: &B, cfg: &ModelConfig, bytes_per: usize) -> Result<(f64, usize)> {
    let tensors: Vec<HostTensor> = host_layer(cfg).into_iter().map(|(_, t)| t).collect();
    let group = Arc::new(b.pin(&tensors)?);
    Ok((time_copy(b, &group, tensors.len())?, layer_params(cfg) * bytes_per))
}

/// Bytes per second of one large pinned tensor (as many elements as a layer) copied in one
/// piece: the ceiling a layer's copy (dozens of tensors) is compared with.
fn h2d_peak<B: Backend>(b: &B, cfg: &ModelConfig, bytes_per: usize) -> Result<f64> {
    let n = layer_params(cfg);
    let t = HostTensor { dtype: DType::Bf16, shape: vec![n / 4096, 4096], data: vec![0x3fu8; (n / 4096) * 4096 * 2].into() };
    let group = Arc::new(b.pin(std::slice::from_ref(&t))?);
    Ok(((n / 4096) * 4096 * bytes_per) as f64 / time_copy(b, &group, 1)?)
}

/// `layers` layers through a window of `window` resident layers (two groups of window/2
/// layers) by the real jobs' WeightWindow: the next group's copy overlaps the current
/// group's compute. Two pinned groups serve every group (same shapes), so host memory stays
/// at two groups.
fn stream_run<B: Backend>(b: &Arc<B>, cfg: &ModelConfig, layers: usize, window: usize, batch: &MicroBatch) -> Result<f64> {
    let per_group = (window / 2).max(1);
    let groups = layers.div_ceil(per_group);
    let (names, tensors): (Vec<String>, Vec<HostTensor>) = host_layer(cfg).into_iter().unzip();
    let mut group_tensors = vec![];
    for _ in 0..per_group {
        group_tensors.extend(tensors.iter().cloned());
    }
    drop(tensors);
    let pinned = [Arc::new(b.pin(&group_tensors)?), Arc::new(b.pin(&group_tensors)?)];
    drop(group_tensors);
    let layouts: Vec<GroupTensorNames> = (0..groups)
        .map(|g| {
            let ls = g * per_group..((g + 1) * per_group).min(layers);
            GroupTensorNames { layers: ls.clone(), parts: ls.map(|l| (Part::Layer(l), names.clone())).collect() }
        })
        .collect();
    // A short last group cannot share a full group's host copy.
    if let Some(last) = layouts.last().filter(|l| l.layers.len() < per_group) {
        return Err(BenchError::Invalid(format!("--layers {layers} is not a multiple of the group size {per_group} (last group {:?})", last.layers)));
    }
    let host: Vec<Arc<B::Pinned>> = (0..groups).map(|g| pinned[g % 2].clone()).collect();
    let mut w = WeightWindow::from_pinned(b.clone(), cfg, layouts, host, 2)?;
    let ctx = RowCtx { positions: &batch.positions, spans: &batch.spans, cache_order: None };
    let mut x = input(&**b, batch.rows(), cfg.hidden_size)?;
    b.sync()?;
    let t0 = Instant::now();
    for g in 0..groups {
        let (group, _) = w.acquire(g)?;
        x = group.run_layers(&**b, cfg, x, &ctx, None)?;
    }
    b.sync()?;
    Ok(t0.elapsed().as_secs_f64())
}

/// One layer's copy, the one-tensor copy ceiling, and `o.layers` layers streamed through a
/// window of `o.window` against all resident at the token count of `batch` (one of SHAPES).
fn stream_figures<B: Backend>(b: Arc<B>, cfg: &ModelConfig, o: &BenchOptions, r: &mut BenchReport, bytes_per: usize, batch: MicroBatch) -> Result<()> {
    let (secs, bytes) = h2d_layer(&*b, cfg, bytes_per).during(|| "timing host-to-device copies".into())?;
    r.h2d_seconds_per_layer = Some(secs);
    r.h2d_bytes_per_s = Some(bytes as f64 / secs);
    r.h2d_peak_bytes_per_s = Some(h2d_peak(&*b, cfg, bytes_per).during(|| "timing the pinned copy ceiling".into())?);
    let seconds = stream_run(&b, cfg, o.layers, o.window, &batch).during(|| "streaming run".into())?;
    let per_layer = r
        .timings
        .iter()
        .find(|t| t.tokens == batch.rows())
        .map(|t| t.seconds)
        .ok_or_else(|| BenchError::Invalid(format!("no resident layer timing at {} tokens", batch.rows())))?;
    let resident = per_layer * o.layers as f64;
    r.stream = Some(StreamResult { layers: o.layers, window: o.window, tokens: batch.rows(), seconds, resident_seconds: resident, relative_throughput: resident / seconds });
    Ok(())
}

fn report_from(b: &impl Backend, cfg: &ModelConfig, name: &str, backend: &str, timings: Vec<LayerTiming>, bytes_per: usize) -> BenchReport {
    BenchReport {
        device: b.name(),
        backend: backend.into(),
        model: name.into(),
        layer_bytes: layer_params(cfg) * bytes_per,
        layer_seconds: timings.iter().map(|t| (t.tokens, t.seconds)).collect(),
        timings,
        decode: vec![],
        attention: vec![],
        h2d_seconds_per_layer: None,
        h2d_bytes_per_s: None,
        h2d_peak_bytes_per_s: None,
        stream: None,
    }
}

pub fn run(o: &BenchOptions) -> Result<BenchReport> {
    let cfg = preset(&o.synthetic)?;
    let report = match o.device.resolve() {
        Resolved::Cpu => {
            let f32_bytes = layer_params(&cfg) * 4;
            if f32_bytes > 2_000_000_000 && !o.force {
                return Err(BenchError::Invalid(format!(
                    "a {} layer is {:.1} GB in f32 on the CPU; use --synthetic smollm2-135m or tiny, or --force",
                    o.synthetic,
                    f32_bytes as f64 / 1e9
                )));
            }
            let route = falcon_batch::backend::cpu::CpuRoute::detect(o.compute_dtype);
            let b = CpuBackend::with_route(falcon_batch::backend::KvDtype::F32, route);
            falcon_batch::info!("bench {} on {}", o.synthetic, b.name());
            let t = layer_timings(&b, &cfg, o.reps.max(1))?;
            // bf16 routes hold every matrix in bf16.
            let mut r = report_from(&b, &cfg, &o.synthetic, "cpu", t, if route.rounds() { 2 } else { 4 });
            r.decode = decode_timings(&b, &cfg, o.reps.max(1))?;
            r.attention = attention_timings(&b, &cfg, o.reps.max(1)).during(|| "timing attention".into())?;
            // The copy thread's figures: a memcpy per group, and 512 tokens so it stays short.
            stream_figures(Arc::new(b), &cfg, o, &mut r, 4, synthetic_batch(1, 512))?;
            r
        }
        Resolved::Cuda(n) => {
            let b = CudaBackend::new(n).during(|| "opening the CUDA backend".into())?;
            falcon_batch::info!("bench {} on {}", o.synthetic, b.name());
            let t = layer_timings(&b, &cfg, o.reps.max(1))?;
            let mut r = report_from(&b, &cfg, &o.synthetic, "cuda", t, 2);
            r.decode = decode_timings(&b, &cfg, o.reps.max(1))?;
            r.attention = attention_timings(&b, &cfg, o.reps.max(1)).during(|| "timing attention".into())?;
            stream_figures(Arc::new(b), &cfg, o, &mut r, 2, synthetic_batch(4, 2048))?;
            r
        }
    };
    print_table(&report);
    if let Some(path) = &o.out {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| BenchError::Io { path: dir.display().to_string(), source })?;
        }
        let json = serde_json::to_string_pretty(&report).map_err(|e| BenchError::Invalid(format!("bench report: {e}")))?;
        std::fs::write(path, json + "\n").map_err(|source| BenchError::Io { path: path.display().to_string(), source })?;
        falcon_batch::info!("wrote {}", path.display());
    }
    Ok(report)
}

pub fn print_table(r: &BenchReport) {
    println!("device: {}   model: {} (synthetic)   layer: {:.1} MB", r.device, r.model, r.layer_bytes as f64 / 1e6);
    println!("{:>10} {:>8} {:>14} {:>14}", "batch", "tokens", "ms / layer", "tokens / s");
    for t in &r.timings {
        println!("{:>10} {:>8} {:>14.3} {:>14.0}", t.label, t.tokens, t.seconds * 1e3, t.tokens as f64 / t.seconds);
    }
    for d in &r.decode {
        println!("{:>10} {:>8} {:>14.3} {:>14.1}", format!("decode@{}", d.context), 1, d.seconds * 1e3, 1.0 / d.seconds);
    }
    for a in &r.attention {
        println!("{:>10} {:>8} {:>14.3} {:>14} attention only, {:.3} TFLOP/s", a.label, a.tokens, a.seconds * 1e3, "", a.tflops);
    }
    if let (Some(s), Some(bw)) = (r.h2d_seconds_per_layer, r.h2d_bytes_per_s) {
        println!("host-to-device (pinned): {:.1} ms per layer, {:.2} GB/s", s * 1e3, bw / 1e9);
    }
    if let (Some(peak), Some(bw)) = (r.h2d_peak_bytes_per_s, r.h2d_bytes_per_s) {
        println!("pinned copy ceiling (one tensor): {:.2} GB/s; a layer's copy reaches {:.0}% of it", peak / 1e9, 100.0 * bw / peak);
    }
    if let Some(s) = &r.stream {
        println!(
            "streaming {} layers through {} resident at {} tokens: {:.3} s vs {:.3} s resident -> {:.2}x of resident throughput",
            s.layers, s.window, s.tokens, s.seconds, s.resident_seconds, s.relative_throughput
        );
    }
}
