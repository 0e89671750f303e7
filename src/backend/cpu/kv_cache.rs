//! The CPU's generation cache: the keys or values (S, KV·D) of earlier tokens, kept as f32
//! (the reference) or rounded to f16 (`KvDtype::F16`: half the bytes each decode step reads).
//!
//! A cache starts as a prompt's f32 keys (or values), so the prompt's own attention never sees
//! the rounding; rows are rounded as they enter the cache.

use super::elem::Elem;
use super::gemm::{self, Kernel};
use super::{gather, gather_rows, shape_err, Mat};
use crate::backend::{KvDtype, Result};
use half::f16;
use half::slice::HalfFloatSliceExt;

/// Keys or values (rows, cols) of earlier tokens, row-major.
pub enum KvCache {
    F32(Mat),
    F16 { rows: usize, cols: usize, data: Vec<f16> },
}

/// A cache's rows as the decode kernels read them: (rows, cols) values of type E, row-major.
#[derive(Clone, Copy)]
pub(super) struct CacheView<'a, E> {
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [E],
}

impl<E: Elem> CacheView<'_, E> {
    /// The rows widened to an f32 matrix.
    pub(super) fn widen(&self) -> Mat {
        let mut data = Vec::new();
        gemm::widen_into(Kernel::detect(), self.data, &mut data);
        Mat { rows: self.rows, cols: self.cols, data }
    }
}

impl<'a> From<&'a Mat> for CacheView<'a, f32> {
    fn from(m: &'a Mat) -> Self {
        CacheView { rows: m.rows, cols: m.cols, data: &m.data }
    }
}

impl KvCache {
    /// A cache of x's rows, kept as `dtype`.
    pub(super) fn new(x: Mat, dtype: KvDtype) -> KvCache {
        match dtype {
            KvDtype::F32 => KvCache::F32(x),
            KvDtype::F16 => KvCache::F16 { rows: x.rows, cols: x.cols, data: narrow(&x.data) },
        }
    }

    pub(super) fn len(&self) -> usize {
        match self {
            KvCache::F32(m) => m.rows,
            KvCache::F16 { rows, .. } => *rows,
        }
    }

    fn cols(&self) -> usize {
        match self {
            KvCache::F32(m) => m.cols,
            KvCache::F16 { cols, .. } => *cols,
        }
    }

    /// The dtype the values are kept as.
    pub(super) fn dtype(&self) -> KvDtype {
        match self {
            KvCache::F32(_) => KvDtype::F32,
            KvCache::F16 { .. } => KvDtype::F16,
        }
    }

    /// new's rows appended, in place (amortised: the rows already there are not copied).
    pub(super) fn append(&mut self, new: &Mat) -> Result<()> {
        if self.cols() != new.cols {
            return Err(shape_err("cache_append", format!("{} vs {} columns", self.cols(), new.cols)));
        }
        match self {
            KvCache::F32(m) => {
                m.data.extend_from_slice(&new.data);
                m.rows += new.rows;
            }
            KvCache::F16 { rows, data, .. } => {
                let at = data.len();
                data.resize(at + new.data.len(), f16::ZERO);
                data[at..].convert_from_f32_slice(&new.data);
                *rows += new.rows;
            }
        }
        Ok(())
    }

    /// The given rows, in order.
    pub(super) fn rows(&self, order: &[u32]) -> Result<KvCache> {
        if let Some(&r) = order.iter().find(|&&r| r as usize >= self.len()) {
            return Err(shape_err("cache_rows", format!("row {r} of {}", self.len())));
        }
        let cols = self.cols();
        Ok(match self {
            KvCache::F32(m) => KvCache::F32(gather_rows(order.len(), cols, |i| m.row(order[i] as usize))),
            KvCache::F16 { data, .. } => {
                let data = gather(order.len(), cols, |i| &data[order[i] as usize * cols..][..cols]);
                KvCache::F16 { rows: order.len(), cols, data }
            }
        })
    }
}

/// Values rounded to the nearest f16 (vectorised where the CPU converts in hardware).
fn narrow(x: &[f32]) -> Vec<f16> {
    let mut out = vec![f16::ZERO; x.len()];
    out.convert_from_f32_slice(x);
    out
}
