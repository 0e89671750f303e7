//! The model's tokenizer: HF `tokenizers` loaded from tokenizer.json.
//! gguf.rs builds that tokenizer.json from a GGUF file's metadata.

pub mod gguf;

use std::path::Path;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TokenizerError {
    /// A tokenizer this crate builds (from GGUF metadata) that cannot be.
    #[error("{path}: cannot load tokenizer: {msg}")]
    Load { path: String, msg: String },
    /// The tokenizers library refused the file.
    #[error("{path}: cannot load tokenizer: {source}")]
    Read { path: String, source: tokenizers::Error },
    #[error("cannot encode text: {0}")]
    Encode(#[source] tokenizers::Error),
    #[error("cannot decode ids: {0}")]
    Decode(#[source] tokenizers::Error),
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Tokenizer, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|source| TokenizerError::Read { path: path.display().to_string(), source })?;
        Ok(Tokenizer { inner })
    }

    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Tokenizer, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|source| TokenizerError::Read { path: origin.to_string(), source })?;
        Ok(Tokenizer { inner })
    }

    /// Token ids of `text`; `add_special` adds what the tokenizer's post-processor adds (e.g. BOS).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self.inner.encode(text, add_special).map_err(TokenizerError::Encode)?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        self.inner.decode(ids, skip_special).map_err(TokenizerError::Decode)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
