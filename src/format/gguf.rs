//! GGUF checkpoints (llama.cpp). Placeholder until the GGUF reader lands: convert.rs only
//! needs `open`, which the real module provides.

use super::{Checkpoint, FormatError, Result};
use std::path::Path;

/// Open a .gguf file as a convertible checkpoint.
pub fn open(path: &Path) -> Result<Box<dyn Checkpoint>> {
    Err(FormatError::Unsupported { path: path.display().to_string(), msg: "GGUF reading is not built into this binary yet".into() })
}
