//! Checkpoint -> model directory, one part at a time.
//!
//! Memory: a part is read, cast, written and hashed, then dropped before the next one, so
//! the peak is about one part (the largest layer or the embeddings), never the model.
//! Crash safety: everything is written into a hidden sibling directory that is renamed to
//! the target only after manifest.json, so a directory at the target name is complete.

use super::hf::{model_error, HfCheckpoint};
use super::manifest::{check_sizes, compute_model_id, Manifest, PartEntry, FORMAT_VERSION};
use super::{gguf, st, Checkpoint, FormatError, Result};
use crate::model::{self, Part};
use crate::tensor::{DType, HostTensor};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Progress of a conversion, reported after each part is on disk.
pub struct PartReport<'a> {
    pub entry: &'a PartEntry,
    /// 0-based position of the part and the number of parts.
    pub index: usize,
    pub total: usize,
    pub tensors: usize,
    pub seconds: f64,
}

/// Open a source checkpoint: a directory is an HF checkpoint, a `.gguf` file a GGUF one.
pub fn open_checkpoint(from: &Path) -> Result<Box<dyn Checkpoint>> {
    let is_gguf = from.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if is_gguf && from.is_file() {
        return gguf::open(from);
    }
    if from.is_dir() {
        return Ok(Box::new(HfCheckpoint::open(from)?));
    }
    let msg = if from.exists() { "expected an HF checkpoint directory or a .gguf file" } else { "no such file or directory" };
    Err(FormatError::io(from, std::io::Error::new(std::io::ErrorKind::NotFound, msg)))
}

/// Convert the checkpoint at `from` into the model directory `to`.
pub fn convert_path(from: &Path, to: &Path, dtype: Option<DType>) -> Result<Manifest> {
    let ckpt = open_checkpoint(from)?;
    convert(ckpt.as_ref(), to, dtype)
}

/// Write `ckpt` as a model directory at `out`, storing weights as `dtype` (default: native).
pub fn convert(ckpt: &dyn Checkpoint, out: &Path, dtype: Option<DType>) -> Result<Manifest> {
    convert_with(ckpt, out, dtype, &mut |_| {})
}

/// `convert`, calling `on_part` after each part is written.
pub fn convert_with(ckpt: &dyn Checkpoint, out: &Path, dtype: Option<DType>, on_part: &mut dyn FnMut(&PartReport)) -> Result<Manifest> {
    if out.exists() {
        let e = std::io::Error::new(std::io::ErrorKind::AlreadyExists, "already exists; remove it or choose another output directory");
        return Err(FormatError::io(out, e));
    }
    let tmp = staging_dir(out)?;
    std::fs::create_dir_all(&tmp).map_err(|e| FormatError::io(&tmp, e))?;
    let result = write_all(ckpt, &tmp, dtype.unwrap_or_else(|| ckpt.native_dtype()), on_part)
        .and_then(|m| std::fs::rename(&tmp, out).map(|_| m).map_err(|e| FormatError::io(out, e)));
    if result.is_err() {
        // Best effort: the staging name never looks like a model directory anyway.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// `.NAME.partial-PID` beside the target: same file system, so the final rename is atomic.
fn staging_dir(out: &Path) -> Result<PathBuf> {
    let name = out.file_name().and_then(|n| n.to_str()).ok_or_else(|| FormatError::Malformed {
        path: out.display().to_string(),
        msg: "the output directory needs a plain UTF-8 name".into(),
    })?;
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Ok(parent.join(format!(".{name}.partial-{}", std::process::id())))
}

fn write_all(ckpt: &dyn Checkpoint, dir: &Path, dtype: DType, on_part: &mut dyn FnMut(&PartReport)) -> Result<Manifest> {
    let cfg = ckpt.config();
    let origin = PathBuf::from(ckpt.origin());
    check_sizes(cfg, &origin)?;
    // Fail on a missing tokenizer before gigabytes are written.
    let tokenizer = ckpt.tokenizer_json()?;
    let tokenizer_hash = st::FileHashes::of(&tokenizer);
    let tok_path = dir.join(TOKENIZER_FILE);
    std::fs::write(&tok_path, tokenizer).map_err(|e| FormatError::io(&tok_path, e))?;

    // Built lazily: n_layers comes from an untrusted config.
    let n = cfg.n_layers;
    let parts = std::iter::once(Part::Begin).chain((0..n).map(Part::Layer)).chain(std::iter::once(Part::End));
    let mut entries = Vec::new();
    for (index, part) in parts.enumerate() {
        let started = Instant::now();
        let (entry, tensors) = write_part(ckpt, dir, part, dtype, &origin)?;
        let report = PartReport { entry: &entry, index, total: n + 2, tensors, seconds: started.elapsed().as_secs_f64() };
        on_part(&report);
        entries.push(entry);
    }

    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        family: cfg.family,
        config: cfg.clone(),
        dtype,
        model_id: compute_model_id(cfg, &entries, Some(&tokenizer_hash.sha256)),
        parts: entries,
        tokenizer: TOKENIZER_FILE.into(),
        tokenizer_hash,
        source: ckpt.origin(),
    };
    manifest.save(dir)?;
    Ok(manifest)
}

/// Convert, cast, write and hash one part; returns its entry and tensor count. Every tensor
/// of the part is dropped before this returns.
fn write_part(ckpt: &dyn Checkpoint, dir: &Path, part: Part, dtype: DType, origin: &Path) -> Result<(PartEntry, usize)> {
    let tensors = model::convert_part(ckpt.config(), part, ckpt).map_err(|e| model_error(origin, e))?;
    // Consuming the list frees each source tensor as soon as its cast copy exists.
    let tensors: Vec<_> = tensors.into_iter().map(|(n, t)| (n, cast(t, dtype))).collect();
    let count = tensors.len();
    let path = dir.join(part.file_name());
    st::write(&path, &tensors)?;
    drop(tensors);
    // Durable before the manifest that vouches for it is written.
    std::fs::File::open(&path).and_then(|f| f.sync_all()).map_err(|e| FormatError::io(&path, e))?;
    let h = st::hash_file(&path)?;
    Ok((PartEntry { name: part.name(), file: part.file_name(), bytes: h.bytes, sha256: h.sha256, xxh3: Some(h.xxh3) }, count))
}

/// Elements cast per step: `HostTensor::to_dtype` widens its whole input to f32 first, which
/// for a vocabulary-sized tensor would be a second full copy.
const CAST_CHUNK: usize = 1 << 20;

/// `t` stored as `dtype`, with at most one chunk of scratch beyond the input and output.
fn cast(t: HostTensor, dtype: DType) -> HostTensor {
    if t.dtype == dtype {
        return t;
    }
    let mut data = Vec::with_capacity(t.numel() * dtype.size());
    for chunk in t.data.chunks(CAST_CHUNK * t.dtype.size()) {
        let piece = HostTensor { dtype: t.dtype, shape: vec![chunk.len() / t.dtype.size()], data: chunk.to_vec().into() };
        data.extend_from_slice(&piece.to_dtype(dtype).data);
    }
    HostTensor { dtype, shape: t.shape, data: data.into() }
}
