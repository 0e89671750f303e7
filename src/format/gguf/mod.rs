//! llama.cpp's GGUF as a convertible checkpoint: tensors dequantized to f32 under HF names,
//! the config from its metadata, and a tokenizer.json rebuilt from its vocabulary.
//!
//! Files: parse.rs (container), dequant.rs (ggml types), meta.rs (config and vocabulary from
//! metadata), rows.rs (llama's Q/K permutation and Falcon's fused QKV order, undone). Which HF
//! tensor is which GGUF tensor is written in each family's table (src/model/table.rs).

pub mod dequant;
mod meta;
pub mod rows;
pub mod parse;

pub use dequant::GgmlType;
pub use parse::{GgufHeader, TensorInfo, Value};

use crate::config::ModelConfig;
use crate::format::{Checkpoint, FormatError, Result};
use crate::model::table::{self, GgufRows, GgufSource};
use crate::model::{self, ModelError, TensorSource};
use crate::tensor::{DType, HostTensor};
use crate::tokenizer::gguf::GgufVocab;
use crate::tokenizer::TokenizerError;
use memmap2::Mmap;
use meta::Meta;
use std::collections::HashMap;
use std::path::Path;

/// A GGUF file, mapped, with its header parsed and its config derived.
pub struct GgufCheckpoint {
    origin: String,
    mmap: Mmap,
    header: GgufHeader,
    by_name: HashMap<String, usize>,
    config: ModelConfig,
}

/// The model config a parsed header's metadata gives (`origin` names the file in errors).
/// The model config of a parsed header; `file` is the whole file, for the tensors the config
/// reads (Llama-3.x files carry their rope scaling as llama.cpp's per-frequency divisors).
pub fn header_config(header: &GgufHeader, file: &[u8], origin: &str) -> Result<ModelConfig> {
    let has_tensor = |n: &str| header.tensors.iter().any(|t| t.name == n);
    let rope_freqs = match header.tensors.iter().find(|t| t.name == ROPE_FREQS) {
        Some(info) => Some(read_f32(file, info, origin)?.to_f32()),
        None => None,
    };
    Meta { map: &header.metadata, origin }.config(has_tensor, rope_freqs)
}

/// The tokenizer fields of a parsed header's metadata, checked for type.
pub fn header_vocab(header: &GgufHeader, origin: &str) -> Result<GgufVocab> {
    Meta { map: &header.metadata, origin }.vocab()
}

/// Open a GGUF checkpoint for conversion (the converter's entry point).
pub fn open(path: &Path) -> Result<Box<dyn Checkpoint>> {
    Ok(Box::new(GgufCheckpoint::open(path)?))
}

impl GgufCheckpoint {
    pub fn open(path: &Path) -> Result<GgufCheckpoint> {
        let origin = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|e| FormatError::io(path, e))?;
        // Safety: the map is read-only; like every mmap'd model file we rely on nobody
        // truncating it while we read (the same contract the safetensors parts have).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| FormatError::io(path, e))?;
        let header = parse::parse(&mmap, &origin)?;
        let by_name = header.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        let config = header_config(&header, &mmap, &origin)?;
        Ok(GgufCheckpoint { origin, mmap, header, by_name, config })
    }

    pub fn header(&self) -> &GgufHeader {
        &self.header
    }

    pub fn metadata(&self, key: &str) -> Option<&Value> {
        self.header.metadata.get(key)
    }

    pub fn tensor_info(&self, gguf_name: &str) -> Option<&TensorInfo> {
        self.by_name.get(gguf_name).map(|&i| &self.header.tensors[i])
    }

    fn malformed(&self, msg: String) -> FormatError {
        FormatError::Malformed { path: self.origin.clone(), msg }
    }

    fn unsupported(&self, msg: String) -> FormatError {
        FormatError::Unsupported { path: self.origin.clone(), msg }
    }

    /// A tensor by its GGUF name, dequantized to f32, row-major, as stored (not unpermuted).
    pub fn tensor_f32(&self, gguf_name: &str) -> Result<HostTensor> {
        let info = self.tensor_info(gguf_name).ok_or_else(|| self.malformed(format!("no tensor named {gguf_name}")))?;
        read_f32(&self.mmap, info, &self.origin)
    }

    /// The tokenizer fields of the metadata, checked for type.
    pub fn vocab(&self) -> Result<GgufVocab> {
        header_vocab(&self.header, &self.origin)
    }

    fn hf_tensor(&self, hf_name: &str) -> Result<HostTensor> {
        let gname = gguf_source(&self.config, hf_name).ok_or_else(|| self.malformed(format!("no GGUF tensor corresponds to `{hf_name}`")))?;
        let t = self.tensor_f32(&gname.name)?;
        let shape = t.shape.clone();
        rows::to_hf_rows(t, gname.rows, &self.config).ok_or_else(|| {
            let want = match gname.rows {
                GgufRows::RopePairs(heads) => format!("{heads} heads of even size"),
                _ => format!("{} rows of q, k and v", self.config.qkv_dim()),
            };
            self.malformed(format!("tensor {}: shape {shape:?} does not split into {want}", gname.name))
        })
    }
}

/// Where `cfg`'s family table puts the HF tensor `hf` in a GGUF.
fn gguf_source(cfg: &ModelConfig, hf: &str) -> Option<GgufSource> {
    table::table(cfg).gguf_source(hf)
}

/// llama.cpp's rope frequency divisors (D/2), written for Llama-3.x rope scaling.
const ROPE_FREQS: &str = "rope_freqs.weight";

/// One tensor of the mapped file, dequantized to f32.
fn read_f32(mmap: &[u8], info: &TensorInfo, origin: &str) -> Result<HostTensor> {
    let name = &info.name;
    let bytes = mmap.get(info.start..info.end).ok_or_else(|| FormatError::Malformed {
        path: origin.to_string(),
        msg: format!("tensor {name}: data range {}..{} outside the mapped file", info.start, info.end),
    })?;
    let values = dequant::dequantize(info.ggml_type, bytes).ok_or_else(|| FormatError::Unsupported {
        path: origin.to_string(),
        msg: format!("tensor {name} has type {}; only F32, F16, BF16, Q8_0, Q4_0 and Q4_1 can be read", info.ggml_type.name()),
    })?;
    Ok(HostTensor::from_f32(info.shape.clone(), &values))
}

impl TensorSource for GgufCheckpoint {
    fn get(&self, hf_name: &str) -> model::Result<HostTensor> {
        self.hf_tensor(hf_name).map_err(|e| ModelError::Checkpoint(Box::new(e)))
    }

    fn contains(&self, hf_name: &str) -> bool {
        gguf_source(&self.config, hf_name).is_some_and(|g| self.tensor_info(&g.name).is_some())
    }
}

impl Checkpoint for GgufCheckpoint {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn tokenizer_json(&self) -> Result<Vec<u8>> {
        crate::tokenizer::gguf::tokenizer_json(&self.vocab()?, &self.origin).map_err(|e| match e {
            TokenizerError::Load { msg, .. } => self.unsupported(msg),
            other => self.unsupported(other.to_string()),
        })
    }

    fn native_dtype(&self) -> DType {
        // Quantized blocks have no dense dtype; everything is handed out dequantized.
        DType::F32
    }

    fn origin(&self) -> String {
        self.origin.clone()
    }
}
