//! falcon-batch: score documents against answer choices with big unquantized language models
//! split by layers over MPI ranks. See docs/DESIGN.md and README.md.

pub mod backend;
pub mod config;
pub mod corpus;
pub mod extract;
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
pub mod stop;
pub mod results;
pub mod runner;
pub mod score;
pub mod settings;
pub mod tensor;
/// Random in-memory models and configs for tests and the pipeline_check example (the
/// `testing` feature, which the tests and examples enable through the dev-dependency on this
/// crate); not shipped in a plain build.
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod token_tree;
pub mod tokenizer;
pub mod trace;
pub mod units;
