//! The CPU's generation cache: the keys or values (S, KV·D) of earlier tokens, kept as f32
//! (the reference) or rounded to f16 (`KvDtype::F16`: half the bytes each decode step reads).
//!
//! A cache starts as a prompt's f32 keys (or values), so the prompt's own attention never sees
//! the rounding; rows are rounded as they enter the cache.

use super::elem::Elem;
use super::gemm::{self, Kernel};
use super::{gather, gather_rows, Mat};
use crate::backend::KvDtype;
use half::f16;
use half::slice::HalfFloatSliceExt;

/// Keys or values (rows, cols) of earlier tokens, row-major.
pub enum CpuCache {
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
        Mat::new(self.rows, self.cols, data)
    }
}

impl<'a> From<&'a Mat> for CacheView<'a, f32> {
    fn from(m: &'a Mat) -> Self {
        CacheView { rows: m.rows, cols: m.cols, data: &m.data }
    }
}

impl CpuCache {
    /// A cache of x's rows, kept as `dtype`.
    pub(super) fn new(x: Mat, dtype: KvDtype) -> CpuCache {
        match dtype {
            KvDtype::F32 => CpuCache::F32(x),
            KvDtype::F16 => CpuCache::F16 { rows: x.rows, cols: x.cols, data: narrow(&x.data) },
        }
    }

    pub(super) fn len(&self) -> usize {
        match self {
            CpuCache::F32(m) => m.rows,
            CpuCache::F16 { rows, .. } => *rows,
        }
    }

    pub(super) fn cols(&self) -> usize {
        match self {
            CpuCache::F32(m) => m.cols,
            CpuCache::F16 { cols, .. } => *cols,
        }
    }

    /// The dtype the values are kept as.
    pub(super) fn dtype(&self) -> KvDtype {
        match self {
            CpuCache::F32(_) => KvDtype::F32,
            CpuCache::F16 { .. } => KvDtype::F16,
        }
    }

    /// new's rows appended, in place (amortised: the rows already there are not copied).
    /// new's columns are the cache's (`shapes::stack`).
    pub(super) fn append(&mut self, new: &Mat) {
        match self {
            CpuCache::F32(m) => {
                m.data.extend_from_slice(&new.data);
                m.rows += new.rows;
            }
            CpuCache::F16 { rows, data, .. } => {
                let at = data.len();
                data.resize(at + new.data.len(), f16::ZERO);
                data[at..].convert_from_f32_slice(&new.data);
                *rows += new.rows;
            }
        }
    }

    /// The given rows, in order; each below `len` (`shapes::rows`).
    pub(super) fn rows(&self, order: &[u32]) -> CpuCache {
        let cols = self.cols();
        match self {
            CpuCache::F32(m) => CpuCache::F32(gather_rows(order.len(), cols, |i| m.row(order[i] as usize))),
            CpuCache::F16 { data, .. } => {
                let data = gather(order.len(), cols, |i| &data[order[i] as usize * cols..][..cols]);
                CpuCache::F16 { rows: order.len(), cols, data }
            }
        }
    }
}

/// Values rounded to the nearest f16 (vectorised where the CPU converts in hardware).
fn narrow(x: &[f32]) -> Vec<f16> {
    let mut out = vec![f16::ZERO; x.len()];
    out.convert_from_f32_slice(x);
    out
}
