//! The subcommands, one file per group of commands. Binary-only: the library has no CLI.

pub mod model;
pub mod generate;
pub mod score;
pub mod extract;
pub mod show;
pub mod bench;
pub mod ranks;
pub mod plan;
pub mod out;
pub mod usage;
