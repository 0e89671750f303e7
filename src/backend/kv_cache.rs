//! The generation cache: keys and values of earlier tokens kept between decode steps, and
//! attention over them. Its shapes are checked here (shapes.rs) before the backend's kernel.

use super::kernels::Kernels;
use super::ops::Ops;
use super::{shapes, AttnShape, Result};
use crate::token_tree::AttnSpan;

/// A backend's generation cache. Implemented once, for every `Kernels`.
pub trait KvCache: Ops {
    /// See `Kernels::Cache`.
    type Cache: Send;

    /// `Ops::attention` with k and v from a generation cache (this call's keys already appended).
    fn attention_cached(&self, q: &Self::Act, k: &Self::Cache, v: &Self::Cache, shape: AttnShape, spans: &[AttnSpan]) -> Result<Self::Act>;
    /// A generation cache holding x's rows (S, KV·D): the keys or values of a prompt.
    fn cache_from(&self, x: Self::Act) -> Result<Self::Cache>;
    /// cache <- cache stacked on top of new: a cache growing by a step's rows.
    fn cache_append(&self, cache: &mut Self::Cache, new: &Self::Act) -> Result<()>;
    /// The given rows of a cache, in order (sequences regrouped, finished ones dropped).
    fn cache_rows(&self, cache: &Self::Cache, rows: &[u32]) -> Result<Self::Cache>;
    /// Rows in a cache.
    fn cache_len(&self, cache: &Self::Cache) -> usize;
}

impl<K: Kernels> KvCache for K {
    type Cache = K::Cache;

    fn attention_cached(&self, q: &K::Act, k: &K::Cache, v: &K::Cache, shape: AttnShape, spans: &[AttnSpan]) -> Result<K::Act> {
        shapes::attention("attention_cached", Kernels::dims(self, q), self.cache_dims(k), self.cache_dims(v), shape, spans)?;
        Kernels::attention_cached(self, q, k, v, shape, spans)
    }

    fn cache_from(&self, x: K::Act) -> Result<K::Cache> {
        Kernels::cache_from(self, x)
    }

    fn cache_append(&self, cache: &mut K::Cache, new: &K::Act) -> Result<()> {
        shapes::stack("cache_append", self.cache_dims(cache).1, Kernels::dims(self, new).1)?;
        Kernels::cache_append(self, cache, new)
    }

    fn cache_rows(&self, cache: &K::Cache, rows: &[u32]) -> Result<K::Cache> {
        shapes::rows("cache_rows", self.cache_dims(cache).0, rows)?;
        Kernels::cache_rows(self, cache, rows)
    }

    fn cache_len(&self, cache: &K::Cache) -> usize {
        self.cache_dims(cache).0
    }
}
