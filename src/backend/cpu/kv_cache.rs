//! The CPU's generation cache: the keys or values (S, KV·D) of earlier tokens, kept as f32
//! (the reference), or rounded to f16 or bf16 (`KvDtype`: half the bytes each decode step
//! reads).
//!
//! A cache starts as a prompt's f32 keys (or values), so the prompt's own attention never sees
//! the rounding; rows are rounded as they enter the cache.

use super::elem::Elem;
use super::gemm::{self, Kernel};
use super::{gather, gather_rows, round, Mat};
use crate::backend::KvDtype;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// Keys or values (rows, cols) of earlier tokens, row-major.
pub enum CpuCache {
    F32(Mat),
    F16(Narrow<f16>),
    Bf16(Narrow<bf16>),
}

/// (rows, cols) values rounded to a 16-bit float type E, row-major.
pub struct Narrow<E> {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<E>,
}

/// A 16-bit float type a cache keeps: f32 values rounded to nearest even into it.
pub(super) trait Narrowed: Elem {
    fn round_from(src: &[f32], dst: &mut [Self]);
}

impl Narrowed for f16 {
    fn round_from(src: &[f32], dst: &mut [f16]) {
        // Vectorised where the CPU converts in hardware.
        dst.convert_from_f32_slice(src);
    }
}

impl Narrowed for bf16 {
    fn round_from(src: &[f32], dst: &mut [bf16]) {
        // The bf16 route's own rounding, so a bf16 cache holds what it reads from an f32 one.
        round::round_into(src, dst);
    }
}

impl<E: Copy> Narrow<E> {
    /// x rounded. The bounds sit on the methods, not the impl: `Narrowed` is the backend's own,
    /// `Narrow` is public (the cache type is the backend's `Cache`).
    fn new(x: &Mat) -> Narrow<E>
    where
        E: Narrowed,
    {
        let mut data = vec![E::default(); x.data.len()];
        E::round_from(&x.data, &mut data);
        Narrow { rows: x.rows, cols: x.cols, data }
    }

    fn append(&mut self, new: &Mat)
    where
        E: Narrowed,
    {
        let at = self.data.len();
        self.data.resize(at + new.data.len(), E::default());
        E::round_from(&new.data, &mut self.data[at..]);
        self.rows += new.rows;
    }

    fn rows(&self, order: &[u32]) -> Narrow<E>
    where
        E: Send + Sync,
    {
        let cols = self.cols;
        let data = gather(order.len(), cols, |i| &self.data[order[i] as usize * cols..][..cols]);
        Narrow { rows: order.len(), cols, data }
    }

    pub(super) fn view(&self) -> CacheView<'_, E> {
        CacheView { rows: self.rows, cols: self.cols, data: &self.data }
    }
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
            KvDtype::F16 => CpuCache::F16(Narrow::new(&x)),
            KvDtype::Bf16 => CpuCache::Bf16(Narrow::new(&x)),
        }
    }

    pub(super) fn len(&self) -> usize {
        match self {
            CpuCache::F32(m) => m.rows,
            CpuCache::F16(n) => n.rows,
            CpuCache::Bf16(n) => n.rows,
        }
    }

    pub(super) fn cols(&self) -> usize {
        match self {
            CpuCache::F32(m) => m.cols,
            CpuCache::F16(n) => n.cols,
            CpuCache::Bf16(n) => n.cols,
        }
    }

    /// The dtype the values are kept as.
    pub(super) fn dtype(&self) -> KvDtype {
        match self {
            CpuCache::F32(_) => KvDtype::F32,
            CpuCache::F16(_) => KvDtype::F16,
            CpuCache::Bf16(_) => KvDtype::Bf16,
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
            CpuCache::F16(n) => n.append(new),
            CpuCache::Bf16(n) => n.append(new),
        }
    }

    /// The given rows, in order; each below `len` (`shapes::rows`).
    pub(super) fn rows(&self, order: &[u32]) -> CpuCache {
        match self {
            CpuCache::F32(m) => CpuCache::F32(gather_rows(order.len(), m.cols, |i| m.row(order[i] as usize))),
            CpuCache::F16(n) => CpuCache::F16(n.rows(order)),
            CpuCache::Bf16(n) => CpuCache::Bf16(n.rows(order)),
        }
    }
}
