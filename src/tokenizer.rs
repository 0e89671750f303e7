//! The model's tokenizer: HF `tokenizers` loaded from tokenizer.json.
//! gguf.rs builds that tokenizer.json from a GGUF file's metadata.

pub mod gguf;

use std::path::Path;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TokenizerError {
    #[error("{path}: cannot load tokenizer: {msg}")]
    Load { path: String, msg: String },
    #[error("cannot encode text: {0}")]
    Encode(String),
    #[error("cannot decode ids: {0}")]
    Decode(String),
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Tokenizer, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| TokenizerError::Load { path: path.display().to_string(), msg: e.to_string() })?;
        Ok(Tokenizer { inner })
    }

    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Tokenizer, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| TokenizerError::Load { path: origin.to_string(), msg: e.to_string() })?;
        Ok(Tokenizer { inner })
    }

    /// Token ids of `text`; `add_special` adds what the tokenizer's post-processor adds (e.g. BOS).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self.inner.encode(text, add_special).map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        self.inner.decode(ids, skip_special).map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
