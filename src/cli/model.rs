//! `falcon-batch convert` and `falcon-batch inspect`: the model directory.

use crate::outln;
use anyhow::Result;
use falcon_batch::format::model_dir::{ModelDir, UpgradeError};
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
    /// Re-hash every part and the tokenizer against the manifest.
    #[arg(long)]
    verify: bool,
    /// Bring a directory from an older falcon-batch (format version 1) up to date: every part
    /// is checked against its recorded sha256, then the hashes it lacks (the tokenizer's, the
    /// parts' xxh3) and the new model id are recorded. The tokenizer is taken as it is.
    #[arg(long, conflicts_with = "verify")]
    upgrade: bool,
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
    if a.upgrade {
        return upgrade(&a.model);
    }
    let dir = ModelDir::open(&a.model)?;
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
    outln!("tokenizer  {} ({}, sha256 {})", m.tokenizer, human_bytes(m.tokenizer_hash.bytes), m.tokenizer_hash.sha256)?;
    for p in &m.parts {
        outln!("  {:<12} {:>10}", p.file, human_bytes(p.bytes))?;
    }
    outln!("total      {} in {} parts", human_bytes(m.total_bytes()), m.parts.len())?;
    if !a.verify {
        return Ok(ExitCode::SUCCESS);
    }
    let bad = dir.verify();
    if bad.is_empty() {
        outln!("verify     all {} parts and the tokenizer match the manifest", m.parts.len())?;
        return Ok(ExitCode::SUCCESS);
    }
    for (what, problem) in &bad {
        match what.as_str() {
            "tokenizer" => falcon_batch::error!("verify: the tokenizer differs: {problem}"),
            part => falcon_batch::error!("verify: part {part} differs: {problem}"),
        }
    }
    falcon_batch::error!("verify: {} of {} parts and the tokenizer differ from the manifest", bad.len(), m.parts.len() + 1);
    Ok(ExitCode::from(1))
}

fn upgrade(model: &std::path::Path) -> Result<ExitCode> {
    match ModelDir::upgrade(model) {
        Ok(u) => {
            let m = &u.manifest;
            outln!("upgrade    all {} parts match their recorded sha256; recorded their xxh3", m.parts.len())?;
            outln!(
                "upgrade    recorded the tokenizer {} as it is now (sha256 {}): the old manifest had no hash to check it against",
                m.tokenizer,
                m.tokenizer_hash.sha256
            )?;
            outln!("upgrade    model id {} -> {} (results files of the old id are not resumed)", u.old_id, m.model_id)?;
            Ok(ExitCode::SUCCESS)
        }
        Err(UpgradeError::PartsDiffer(bad)) => {
            for (part, problem) in &bad {
                falcon_batch::error!("upgrade: part {part} differs: {problem}");
            }
            falcon_batch::error!("upgrade: {} parts differ from the manifest's sha256; nothing was written: copy them again or convert again", bad.len());
            Ok(ExitCode::from(1))
        }
        // Run twice, the second finds nothing to do: not an error.
        Err(e @ UpgradeError::Current { .. }) => {
            outln!("upgrade    {}: {e}", model.display())?;
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(e.into()),
    }
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

