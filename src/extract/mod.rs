//! What `falcon-batch extract` computes, without a model: a source's units and candidate
//! spans (units.rs, candidates.rs), the exact top-k search over them in passes (search.rs, over the trie of trie.rs),
//! each pass as a token tree packed into micro-batches (tree.rs), and SQuAD's answer
//! comparison for `show` (squad.rs). The job that drives
//! them through a scorer is job::extract.

pub mod candidates;
pub mod search;
pub mod squad;
pub mod tree;
mod trie;
pub mod units;

pub use candidates::{candidates, Candidate};
pub use search::{Ranked, Search, SearchError, Step};
pub use tree::{build, Branch, Slot, Target, TreeError, Work};
