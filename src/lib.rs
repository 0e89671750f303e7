//! falcon-batch: score documents against answer choices with big unquantized language models
//! split by layers over MPI ranks. See docs/DESIGN.md and README.md.

pub mod backend;
pub mod bench;
pub mod config;
pub mod corpus;
pub mod format;
pub mod generate;
pub mod group;
pub mod job;
pub mod liveness;
pub mod model;
pub mod pipeline;
pub mod report;
pub mod sample;
pub mod schedule;
pub mod results;
pub mod runner;
pub mod score;
pub mod tensor;
pub mod testing;
pub mod token_tree;
pub mod tokenizer;
pub mod trace;
pub mod units;
