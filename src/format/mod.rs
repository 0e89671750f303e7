//! The model directory and the checkpoints it is made from (docs/DESIGN.md, "The model directory").
//!
//! Files: manifest.rs (manifest.json), model_dir.rs (open, read parts, verify),
//! hf.rs (HF safetensors checkpoints), gguf.rs (llama.cpp's GGUF), convert.rs (checkpoint -> dir).
//! st.rs (one safetensors file: map, index, copy out or hand out ranges of the map, write).

pub mod convert;
pub mod gguf;
pub mod hf;
pub mod manifest;
pub mod model_dir;
pub mod st;

use crate::config::ModelConfig;
use crate::model::{ModelError, TensorSource};
use crate::tensor::DType;
use thiserror::Error;

/// Every error of reading or writing model files names the file.
#[derive(Debug, Error)]
pub enum FormatError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    /// The file's bytes do not follow its format (truncated, malformed header or JSON...).
    #[error("{path}: {msg}")]
    Malformed { path: String, msg: String },
    /// JSON that does not parse, or a field of it that is not of its type.
    #[error("{path}: {what}: {source}")]
    Json { path: String, what: String, source: serde_json::Error },
    #[error("{path}: {msg}")]
    Unsupported { path: String, msg: String },
    /// Written by an older falcon-batch in a form this one no longer trusts; the message
    /// says how to bring it up to date.
    #[error("{path}: {msg}")]
    Outdated { path: String, msg: String },
    /// The file is well-formed but differs from what the manifest records.
    #[error("{path}: {msg}")]
    Mismatch { path: String, msg: String },
    #[error("{path}: {source}")]
    Model { path: String, source: ModelError },
    /// The manifest's config breaks a rule of the model; its message names the file.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Its message names the file.
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
}

pub type Result<T> = std::result::Result<T, FormatError>;

impl FormatError {
    pub fn io(path: &std::path::Path, source: std::io::Error) -> FormatError {
        FormatError::Io { path: path.display().to_string(), source }
    }
}

/// A source checkpoint that can be converted: tensors by HF names, its config and tokenizer.
pub trait Checkpoint: TensorSource {
    fn config(&self) -> &ModelConfig;
    /// The HF tokenizer.json to store beside the parts.
    fn tokenizer_json(&self) -> Result<Vec<u8>>;
    /// The dtype the weights are stored in; the default output dtype.
    fn native_dtype(&self) -> DType;
    /// Where it was read from, for the manifest and messages.
    fn origin(&self) -> String;
}
