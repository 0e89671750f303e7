//! `falcon-batch convert` and `falcon-batch inspect`: the model directory.

use crate::outln;
use anyhow::Result;
use falcon_batch::tensor::DType;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct ConvertArgs {
    /// HF checkpoint directory (config.json, *.safetensors, tokenizer.json) or a .gguf file.
    #[arg(long)]
    pub from: std::path::PathBuf,
    /// Output model directory.
    #[arg(long)]
    to: std::path::PathBuf,
    /// Storage dtype of the weights (default: the checkpoint's; f32 for dequantized GGUF).
    #[arg(long, value_parser = super::usage::dtype)]
    dtype: Option<DType>,
}

#[derive(clap::Args)]
pub struct InspectArgs {
    model: std::path::PathBuf,
    #[arg(long)]
    verify: bool,
}

pub fn convert(a: ConvertArgs) -> Result<ExitCode> {
    use falcon_batch::format::convert;
    let dtype = a.dtype;
    let ckpt = convert::open_checkpoint(&a.from)?;
    let cfg = ckpt.config();
    let out_dtype = dtype.unwrap_or_else(|| ckpt.native_dtype());
    outln!("{}: {} model, {} layers, writing {} to {}", ckpt.origin(), cfg.family.name(), cfg.n_layers, out_dtype.name(), a.to.display())?;
    let m = convert::convert_with(ckpt.as_ref(), &a.to, dtype, &mut |r| {
        // A reader gone from stdout does not stop the conversion: its end is reported below.
        let _ = outln!(
            "[{:>4}/{}] {:<10} {:>3} tensors {:>10} {:.1}s",
            r.index + 1,
            r.total,
            r.entry.name,
            r.tensors,
            human_bytes(r.entry.bytes),
            r.seconds
        );
    })?;
    outln!("wrote {} ({} in {} parts), model id {}", a.to.display(), human_bytes(m.total_bytes()), m.parts.len(), m.model_id)?;
    Ok(ExitCode::SUCCESS)
}

pub fn inspect(a: InspectArgs) -> Result<ExitCode> {
    let dir = falcon_batch::format::model_dir::ModelDir::open(&a.model)?;
    let m = dir.manifest();
    let c = &m.config;
    outln!("model      {}", a.model.display())?;
    outln!("family     {}", c.family.name())?;
    outln!("layers     {}", c.n_layers)?;
    outln!("hidden     {}", c.hidden_size)?;
    outln!("heads      {} (kv heads {}, head dim {})", c.n_heads, c.n_kv_heads, c.head_dim)?;
    outln!("ffn        {}", c.intermediate_size)?;
    outln!("vocab      {}", c.vocab_size)?;
    outln!("context    {}", c.context_limit())?;
    outln!("rope theta {}", c.rope_theta)?;
    outln!("rope scale {}", c.rope_scaling.describe())?;
    outln!("dtype      {}", m.dtype.name())?;
    outln!("model id   {}", m.model_id)?;
    outln!("source     {}", m.source)?;
    outln!("tokenizer  {}", m.tokenizer)?;
    for p in &m.parts {
        outln!("  {:<12} {:>10}", p.file, human_bytes(p.bytes))?;
    }
    outln!("total      {} in {} parts", human_bytes(m.total_bytes()), m.parts.len())?;
    if !a.verify {
        return Ok(ExitCode::SUCCESS);
    }
    let bad = dir.verify();
    if bad.is_empty() {
        outln!("verify     all {} parts match the manifest", m.parts.len())?;
        return Ok(ExitCode::SUCCESS);
    }
    for (part, problem) in &bad {
        eprintln!("verify: part {part} differs: {problem}");
    }
    eprintln!("verify: {} of {} parts differ from the manifest", bad.len(), m.parts.len());
    Ok(ExitCode::from(1))
}

/// Sizes as people read them (binary units).
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

