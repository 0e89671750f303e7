//! falcon-batch: score documents against answer choices with big unquantized language models
//! split by layers over MPI ranks. See shared DESIGN.md and README.md.

pub mod backend;
pub mod bench;
pub mod config;
pub mod format;
pub mod layout;
pub mod model;
pub mod score;
pub mod tensor;
pub mod tokenizer;
