//! Hugging Face checkpoints: a directory with config.json, tokenizer.json and the weights in
//! model.safetensors, or sharded as model.safetensors.index.json + the shards it names.

use super::manifest::is_plain_file_name;
use super::st::{dtype_from_st, StFile};
use super::{Checkpoint, FormatError, Result};
use crate::config::ModelConfig;
use crate::model::{self, ModelError, TensorSource};
use crate::tensor::{DType, HostTensor};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "config.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// An opened HF checkpoint. Shards stay mapped; tensors are copied out one at a time.
pub struct HfCheckpoint {
    dir: PathBuf,
    config: ModelConfig,
    shards: Vec<StFile>,
    /// HF tensor name -> index into `shards`.
    index: HashMap<String, usize>,
    native_dtype: DType,
}

fn malformed(path: &Path, msg: impl Into<String>) -> FormatError {
    FormatError::Malformed { path: path.display().to_string(), msg: msg.into() }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let bytes = std::fs::read(path).map_err(|e| FormatError::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|source| FormatError::Json { path: path.display().to_string(), what: "invalid JSON".into(), source })
}

/// A config error already names its file; keep it once in the message.
pub(crate) fn model_error(path: &Path, e: ModelError) -> FormatError {
    match e {
        ModelError::Config { file, field, msg } => FormatError::Malformed { path: file, msg: format!("field `{field}`: {msg}") },
        other => FormatError::Model { path: path.display().to_string(), source: other },
    }
}

/// A shard name from an index file must stay inside the checkpoint directory.
fn plain_file_name(index: &Path, name: &str) -> Result<()> {
    if !is_plain_file_name(name) {
        return Err(malformed(index, format!("field `weight_map`: shard `{name}` must be a file name in the same directory")));
    }
    Ok(())
}

/// HF tensor name -> shard file name, from model.safetensors.index.json.
type WeightMap = HashMap<String, String>;

/// The shard files of a checkpoint directory and, for sharded ones, the expected tensor -> shard map.
fn shard_files(dir: &Path) -> Result<(Vec<String>, Option<WeightMap>)> {
    let index_path = dir.join(INDEX_FILE);
    if index_path.exists() {
        let json = read_json(&index_path)?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| malformed(&index_path, "field `weight_map`: required object is missing"))?;
        let mut weight_map = HashMap::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| malformed(&index_path, format!("field `weight_map.{name}`: expected a file name, found {file}")))?;
            plain_file_name(&index_path, file)?;
            weight_map.insert(name.clone(), file.to_string());
        }
        let files: BTreeSet<String> = weight_map.values().cloned().collect();
        return Ok((files.into_iter().collect(), Some(weight_map)));
    }
    if dir.join(SINGLE_FILE).exists() {
        return Ok((vec![SINGLE_FILE.to_string()], None));
    }
    // Some exports use other names for an unsharded file; take every safetensors file then.
    let entries = std::fs::read_dir(dir).map_err(|e| FormatError::io(dir, e))?;
    let mut files: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(malformed(dir, format!("no weights: expected {SINGLE_FILE}, {INDEX_FILE} or *.safetensors files")));
    }
    Ok((files, None))
}

impl HfCheckpoint {
    pub fn open(dir: &Path) -> Result<HfCheckpoint> {
        if !dir.is_dir() {
            return Err(FormatError::io(dir, std::io::Error::new(std::io::ErrorKind::NotFound, "not a checkpoint directory")));
        }
        let config_path = dir.join(CONFIG_FILE);
        let json = read_json(&config_path)?;
        let config = model::config_from_hf(&json, &config_path.display().to_string()).map_err(|e| model_error(&config_path, e))?;

        let (files, weight_map) = shard_files(dir)?;
        let mut shards = Vec::with_capacity(files.len());
        let mut index: HashMap<String, usize> = HashMap::new();
        for (i, file) in files.iter().enumerate() {
            let shard = StFile::open(&dir.join(file))?;
            for name in shard.names() {
                if let Some(&other) = index.get(name) {
                    let first: &StFile = &shards[other];
                    return Err(malformed(shard.path(), format!("tensor `{name}` is also stored in {}", first.path().display())));
                }
                index.insert(name.clone(), i);
            }
            shards.push(shard);
        }
        if let Some(map) = &weight_map {
            for (name, file) in map {
                let found = index.get(name).map(|&i| shards[i].path());
                if found != Some(dir.join(file).as_path()) {
                    return Err(malformed(&dir.join(INDEX_FILE), format!("field `weight_map`: tensor `{name}` is not in shard {file}")));
                }
            }
        }
        let native_dtype = config_dtype(&json).or_else(|| majority_dtype(&shards)).unwrap_or(DType::F32);
        Ok(HfCheckpoint { dir: dir.to_path_buf(), config, shards, index, native_dtype })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every HF tensor name in the checkpoint, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.index.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }
}

/// `torch_dtype` (older transformers) or `dtype` (newer), when it names a dtype we store.
fn config_dtype(json: &serde_json::Value) -> Option<DType> {
    ["torch_dtype", "dtype"].iter().find_map(|f| json.get(*f).and_then(|v| v.as_str()).and_then(DType::parse))
}

/// The float dtype holding most of the weight bytes (norms are sometimes kept in f32).
fn majority_dtype(shards: &[StFile]) -> Option<DType> {
    let kinds = [DType::Bf16, DType::F16, DType::F32];
    let mut bytes = [0usize; 3];
    for shard in shards {
        for e in shard.names().iter().filter_map(|n| shard.entry(n)) {
            if let Some(k) = dtype_from_st(e.dtype).and_then(|d| kinds.iter().position(|&x| x == d)) {
                bytes[k] += e.end - e.start;
            }
        }
    }
    let (k, &n) = bytes.iter().enumerate().max_by_key(|&(_, n)| *n)?;
    (n > 0).then_some(kinds[k])
}

impl TensorSource for HfCheckpoint {
    fn get(&self, hf_name: &str) -> model::Result<HostTensor> {
        let shard = self
            .index
            .get(hf_name)
            .map(|&i| &self.shards[i])
            .ok_or_else(|| ModelError::Source(format!("{}: no tensor `{hf_name}` in the checkpoint", self.dir.display())))?;
        shard.read(hf_name).map_err(|e| ModelError::Checkpoint(Box::new(e)))
    }

    fn contains(&self, hf_name: &str) -> bool {
        self.index.contains_key(hf_name)
    }
}

impl Checkpoint for HfCheckpoint {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn tokenizer_json(&self) -> Result<Vec<u8>> {
        let path = self.dir.join(TOKENIZER_FILE);
        std::fs::read(&path).map_err(|e| {
            let msg = format!("cannot read the HF tokenizer ({e}); a model directory needs the checkpoint's tokenizer.json");
            FormatError::io(&path, std::io::Error::new(e.kind(), msg))
        })
    }

    fn native_dtype(&self) -> DType {
        self.native_dtype
    }

    fn origin(&self) -> String {
        self.dir.display().to_string()
    }
}
