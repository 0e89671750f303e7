//! Shared test helpers: small random models built in memory; launching processes with a
//! hard limit (proc); test hosts on network namespaces (hosts).
#![allow(dead_code, unused_imports)]

pub mod hosts;
pub mod proc;

use falcon_batch::config::ModelConfig;
pub use falcon_batch::testing::{rand_values, random_group, random_part};

pub fn falcon_config(new_arch: bool, parallel: bool, bias: bool) -> ModelConfig {
    falcon_batch::testing::falcon_config(3, new_arch, parallel, bias).unwrap()
}

pub fn llama_config() -> ModelConfig {
    falcon_batch::testing::llama_config(3).unwrap()
}

/// A word-level tokenizer over "t0" .. "t{n-1}" (ids = indices), split on whitespace.
pub fn word_tokenizer(n: usize) -> falcon_batch::tokenizer::Tokenizer {
    falcon_batch::testing::word_tokenizer(n).unwrap()
}
