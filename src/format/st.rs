//! One safetensors file: mmap, parse and index the header, copy tensors out (or hand out ranges
//! of the shared map), write a part.
//!
//! Shared by the HF reader (hf.rs) and the model directory (model_dir.rs), so both treat
//! untrusted bytes the same way: every malformed header is an error naming the file.

use super::{FormatError, Result};
use crate::tensor::{Bytes, DType, HostTensor};
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::tensor::{Dtype, SafeTensors, View};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use xxhash_rust::xxh3::Xxh3;

/// Where one tensor lies in the mapped file.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file (header included in the offset).
    pub start: usize,
    pub end: usize,
}

/// Bytes copied out of the map between two releases of its pages (and hashed per watchdog beat).
const COPY_CHUNK: usize = 16 << 20;

/// A mapped, header-checked safetensors file. The header is parsed once at open; reads
/// slice the mapping by the recorded offsets, so no borrow of the map outlives a call.
pub(crate) struct StFile {
    path: PathBuf,
    /// Shared with the tensors `read_all_hashed` hands out.
    mmap: Arc<Mmap>,
    tensors: HashMap<String, TensorEntry>,
    /// Names in file (offset) order, for stable listings.
    order: Vec<String>,
}

/// Index the header of a safetensors file held in `bytes` (`path` names it in errors):
/// each tensor with its absolute byte range, in file (offset) order. Every range is checked
/// to lie inside `bytes`, so slicing by it cannot panic. This is the whole parse `StFile`
/// does on open, exposed so the fuzz target can run it on arbitrary bytes.
pub fn parse_bytes(bytes: &[u8], path: &Path) -> Result<Vec<(String, TensorEntry)>> {
    let malformed = |msg: String| FormatError::Malformed { path: path.display().to_string(), msg };
    let (header_len, meta) =
        SafeTensors::read_metadata(bytes).map_err(|e| malformed(format!("not a valid safetensors file: {e}")))?;
    // Offsets in the header count from the end of the header; 8 bytes of length precede it.
    let base = 8 + header_len;
    let mut entries = Vec::new();
    for (name, info) in meta.tensors() {
        let (s, e) = info.data_offsets;
        let (start, end) = (base.checked_add(s), base.checked_add(e));
        match (start, end) {
            (Some(start), Some(end)) if start <= end && end <= bytes.len() => {
                entries.push((name, TensorEntry { dtype: info.dtype, shape: info.shape.clone(), start, end }));
            }
            _ => {
                return Err(malformed(format!(
                    "tensor `{name}`: data offsets {s}..{e} after the {base} byte header lie outside the {} byte file",
                    bytes.len()
                )))
            }
        }
    }
    entries.sort_by_key(|(_, e)| e.start);
    Ok(entries)
}

pub(crate) fn dtype_from_st(d: Dtype) -> Option<DType> {
    match d {
        Dtype::F32 => Some(DType::F32),
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::Bf16),
        _ => None,
    }
}

fn dtype_to_st(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::Bf16 => Dtype::BF16,
    }
}

impl StFile {
    pub fn open(path: &Path) -> Result<StFile> {
        let file = File::open(path).map_err(|e| FormatError::io(path, e))?;
        // SAFETY: the map is read-only; a file truncated by another process while mapped
        // would fault, which no safe API can prevent. Model files are written once (convert
        // renames complete files into place) and never modified in place.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| FormatError::io(path, e))?;
        let entries = parse_bytes(&mmap, path)?;
        let order = entries.iter().map(|(n, _)| n.clone()).collect();
        Ok(StFile { path: path.to_path_buf(), mmap: Arc::new(mmap), tensors: entries.into_iter().collect(), order })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names in file order.
    pub fn names(&self) -> &[String] {
        &self.order
    }

    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.get(name)
    }

    /// Tensor `name`'s entry and its dtype (F32, F16 or BF16; others are refused).
    fn stored(&self, name: &str) -> Result<(&TensorEntry, DType)> {
        let path = self.path.display().to_string();
        let e = self
            .tensors
            .get(name)
            .ok_or_else(|| FormatError::Malformed { path: path.clone(), msg: format!("no tensor `{name}` in this file") })?;
        let dtype = dtype_from_st(e.dtype).ok_or_else(|| FormatError::Unsupported {
            path: path.clone(),
            msg: format!("tensor `{name}` has dtype {:?}; only F32, F16 and BF16 are supported", e.dtype),
        })?;
        Ok((e, dtype))
    }

    /// A copy of tensor `name` in its stored dtype (F32, F16 or BF16).
    pub fn read(&self, name: &str) -> Result<HostTensor> {
        let (e, dtype) = self.stored(name)?;
        // Touched pages of the map count toward our resident set until dropped, so copying a
        // whole tensor at once would hold it twice (mapped + copy) and reading a checkpoint
        // through one map would grow RSS toward its size. Copy in chunks and drop each
        // chunk's pages; the page cache keeps them, so re-reading stays cheap.
        let mut data = Vec::with_capacity(e.end - e.start);
        let mut at = e.start;
        while at < e.end {
            let stop = (at + COPY_CHUNK).min(e.end);
            data.extend_from_slice(&self.mmap[at..stop]);
            // SAFETY: nothing borrows this range any more (it was copied just above) and the
            // map is read-only and file-backed, so dropped pages fault back in from the file.
            let _ = unsafe { self.mmap.unchecked_advise_range(UncheckedAdvice::DontNeed, at, stop - at) };
            at = stop;
        }
        Ok(HostTensor { dtype, shape: e.shape.clone(), data: data.into() })
    }

    /// Every tensor in file order, as ranges of the map (no copy: the backend converts them
    /// anyway), and the fast content hash of the whole file (`content_hash` of the same
    /// bytes). The map's pages stay in the resident set until the last tensor is dropped:
    /// they are the file's page cache, which the kernel can reclaim, not memory of our own.
    /// The hash vouches for what the backend reads later from the same map because model files
    /// are never modified in place (see `open`).
    pub fn read_all_hashed(&self) -> Result<(HashMap<String, HostTensor>, String)> {
        let mut hasher = Xxh3::new();
        let mut out = HashMap::with_capacity(self.order.len());
        for name in &self.order {
            let (e, dtype) = self.stored(name)?;
            out.insert(name.clone(), HostTensor { dtype, shape: e.shape.clone(), data: Bytes::Mapped { map: self.mmap.clone(), range: e.start..e.end } });
        }
        // The header, the tensors and any padding between them, in chunks: each is progress
        // for the watchdog on a large part.
        for chunk in self.mmap.chunks(COPY_CHUNK) {
            hasher.update(chunk);
            crate::liveness::advanced();
        }
        Ok((out, hash_hex(&hasher)))
    }
}

/// The manifest's fast content hash: xxh3-128 of the whole file, 32 lowercase hex digits.
/// Fast enough (several GB/s) for every rank to check every part it loads; sha256 stays
/// for `inspect --verify` and the model id.
fn hash_hex(h: &Xxh3) -> String {
    format!("{:032x}", h.digest128())
}

/// What hashing a whole file gives: its size and both content hashes (the manifest records
/// them for the tokenizer; a part's entry carries the same three).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileHashes {
    pub bytes: u64,
    /// Lowercase hex sha256.
    pub sha256: String,
    /// xxh3-128, 32 lowercase hex digits.
    pub xxh3: String,
}

impl FileHashes {
    /// Size and hashes of bytes already in memory.
    pub fn of(bytes: &[u8]) -> FileHashes {
        let mut fast = Xxh3::new();
        fast.update(bytes);
        FileHashes { bytes: bytes.len() as u64, sha256: hex::encode(Sha256::digest(bytes)), xxh3: hash_hex(&fast) }
    }

    /// What differs from `recorded` (size first, then each hash), or None.
    pub fn differs_from(&self, recorded: &FileHashes) -> Option<String> {
        if self.bytes != recorded.bytes {
            Some(format!("{} bytes, the manifest records {}", self.bytes, recorded.bytes))
        } else if self.sha256 != recorded.sha256 {
            Some(format!("sha256 {}, the manifest records {}", self.sha256, recorded.sha256))
        } else if self.xxh3 != recorded.xxh3 {
            Some(format!("xxh3 {}, the manifest records {}", self.xxh3, recorded.xxh3))
        } else {
            None
        }
    }
}

/// A HostTensor as the safetensors writer sees it.
struct TensorRef<'a>(&'a HostTensor);

impl View for TensorRef<'_> {
    fn dtype(&self) -> Dtype {
        dtype_to_st(self.0.dtype)
    }
    fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.0.data)
    }
    fn data_len(&self) -> usize {
        self.0.data.len()
    }
}

/// Write `tensors` as one safetensors file; the crate streams the tensors through a buffered
/// writer, so no second copy of the part is made in memory.
pub(crate) fn write(path: &Path, tensors: &[(String, HostTensor)]) -> Result<()> {
    let views = tensors.iter().map(|(n, t)| (n.as_str(), TensorRef(t)));
    safetensors::serialize_to_file(views, None, path)
        .map_err(|e| FormatError::Malformed { path: path.display().to_string(), msg: format!("cannot write safetensors: {e}") })
}

/// Size, sha256 and xxh3-128 of a file in one read, 1 MiB at a time.
pub(crate) fn hash_file(path: &Path) -> Result<FileHashes> {
    let mut file = File::open(path).map_err(|e| FormatError::io(path, e))?;
    let mut sha = Sha256::new();
    let mut fast = Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(|e| FormatError::io(path, e))?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
        fast.update(&buf[..n]);
        total += n as u64;
    }
    Ok(FileHashes { bytes: total, sha256: hex::encode(sha.finalize()), xxh3: hash_hex(&fast) })
}
