//! The CPU backend's weights: vectors (norms, biases) widened to f32, matrices packed once for
//! gemm.rs's micro-kernel in the dtype their file stores. A bf16 or f16 matrix stays half
//! precision in memory and is widened (exactly) as the kernel loads it: half the memory a
//! widened copy takes, and half the bytes a decode step reads, with the same values.
//! The bf16 compute route (route.rs) keeps every matrix in bf16, rounded once here.

use super::gemm::{self, Kernel};
use super::{gemm_bf16, round, CpuRoute};
use crate::tensor::{DType, HostTensor};
use half::{bf16, f16};

/// A weight with its logical shape.
pub struct CpuWeight {
    pub shape: Vec<usize>,
    data: Data,
}

/// What a weight holds.
#[derive(Clone)]
enum Data {
    /// Anything but a matrix: the values, row-major, as f32.
    Values(Vec<f32>),
    /// A matrix (N, K): packed for `Kernel::detect()`.
    Panels(Panels),
    /// A matrix (N, K) rounded to bf16 and packed in pairs for gemm_bf16.rs.
    Pairs(Vec<bf16>),
}

/// A packed matrix in one of the stored dtypes.
#[derive(Clone)]
pub(super) enum Panels {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
}

/// Runs `$body` with `$w` bound to the panels' slice, whichever dtype they are.
macro_rules! with_panels {
    ($panels:expr, $w:ident => $body:expr) => {
        match $panels {
            $crate::backend::cpu::weight::Panels::F32($w) => $body,
            $crate::backend::cpu::weight::Panels::F16($w) => $body,
            $crate::backend::cpu::weight::Panels::Bf16($w) => $body,
        }
    };
}
pub(super) use with_panels;

impl CpuWeight {
    /// `values` in row-major order for `shape`; a matrix (2 dimensions) is packed here, once.
    pub fn new(shape: Vec<usize>, values: Vec<f32>) -> CpuWeight {
        let data = match shape[..] {
            [n, k] => Data::Panels(Panels::F32(gemm::pack(Kernel::detect(), &values, n, k))),
            _ => Data::Values(values),
        };
        CpuWeight { shape, data }
    }

    /// A tensor as the backend holds it for `route`: on the f32 route a matrix packed from the
    /// file's bytes in the file's dtype (no widened copy between); on the bf16 routes a matrix
    /// in bf16 (rounded once where the file's values are wider); anything else widened.
    pub(super) fn from_host(t: &HostTensor, route: CpuRoute) -> CpuWeight {
        let (n, k) = match t.shape[..] {
            [n, k] => (n, k),
            _ => return CpuWeight::new(t.shape.clone(), t.to_f32()),
        };
        let kernel = Kernel::detect();
        let bf16_values = || -> Vec<bf16> {
            match t.dtype {
                DType::Bf16 => t.data.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]])).collect(),
                _ => {
                    let wide = t.to_f32();
                    let mut v = vec![bf16::ZERO; wide.len()];
                    round::round_into(&wide, &mut v);
                    v
                }
            }
        };
        let data = match (route, t.dtype) {
            (CpuRoute::F32, DType::F32) => Data::Panels(Panels::F32(pack_bytes(kernel, &t.data, n, k, f32::from_le_bytes))),
            (CpuRoute::F32, DType::F16) => Data::Panels(Panels::F16(pack_bytes(kernel, &t.data, n, k, f16::from_le_bytes))),
            (CpuRoute::F32 | CpuRoute::Bf16Widened, DType::Bf16) => Data::Panels(Panels::Bf16(pack_bytes(kernel, &t.data, n, k, bf16::from_le_bytes))),
            (CpuRoute::Bf16Widened, _) => Data::Panels(Panels::Bf16(gemm::pack(kernel, &bf16_values(), n, k))),
            (CpuRoute::Bf16Dot, DType::Bf16) => Data::Pairs(gemm_bf16::pack_le_bytes(&t.data, n, k)),
            (CpuRoute::Bf16Dot, _) => Data::Pairs(gemm_bf16::pack(&bf16_values(), n, k)),
        };
        CpuWeight { shape: t.shape.clone(), data }
    }

    /// (N, K) of a matrix.
    pub(super) fn matrix(&self) -> Option<(usize, usize)> {
        match (&self.shape[..], &self.data) {
            ([n, k], Data::Panels(_) | Data::Pairs(_)) => Some((*n, *k)),
            _ => None,
        }
    }

    /// A matrix's packed values for gemm.rs.
    pub(super) fn panels(&self) -> Option<&Panels> {
        match &self.data {
            Data::Panels(p) => Some(p),
            Data::Values(_) | Data::Pairs(_) => None,
        }
    }

    /// A matrix's packed values for gemm_bf16.rs.
    pub(super) fn pairs(&self) -> Option<&[bf16]> {
        match &self.data {
            Data::Pairs(p) => Some(p),
            Data::Values(_) | Data::Panels(_) => None,
        }
    }

    /// The values of anything but a matrix.
    pub fn values(&self) -> Option<&[f32]> {
        match &self.data {
            Data::Values(v) => Some(v),
            Data::Panels(_) | Data::Pairs(_) => None,
        }
    }

    /// The stored dtype: f32 for anything but a half-precision matrix.
    pub fn dtype(&self) -> DType {
        match &self.data {
            Data::Values(_) | Data::Panels(Panels::F32(_)) => DType::F32,
            Data::Panels(Panels::F16(_)) => DType::F16,
            Data::Panels(Panels::Bf16(_)) | Data::Pairs(_) => DType::Bf16,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match &self.data {
            Data::Values(v) => v.len() * 4,
            Data::Panels(p) => with_panels!(p, w => std::mem::size_of_val(&w[..])),
            Data::Pairs(w) => std::mem::size_of_val(&w[..]),
        }
    }

    /// Where the values live: the identity `release` checks a slot's weights by.
    pub(super) fn addr(&self) -> usize {
        match &self.data {
            Data::Values(v) => v.as_ptr() as usize,
            Data::Panels(p) => with_panels!(p, w => w.as_ptr() as usize),
            Data::Pairs(w) => w.as_ptr() as usize,
        }
    }

    /// Row `r` of a matrix (a value of anything else) appended to `out`, as f32.
    pub(super) fn push_row(&self, r: usize, out: &mut Vec<f32>) {
        match (&self.data, self.matrix()) {
            (Data::Panels(p), Some((_, k))) => with_panels!(p, w => gemm::unpack_row(Kernel::detect(), w, k, r, out)),
            (Data::Pairs(w), Some((_, k))) => gemm_bf16::unpack_row(w, k, r, out),
            (Data::Values(v), _) => out.push(v[r]),
            (Data::Panels(_) | Data::Pairs(_), None) => unreachable!("panels are made for matrices only"),
        }
    }

    /// The values in row-major order, as f32, whatever the layout.
    pub fn to_rows(&self) -> Vec<f32> {
        let rows = self.shape.first().copied().unwrap_or(1);
        let mut out = Vec::with_capacity(self.shape.iter().product());
        match &self.data {
            Data::Panels(_) | Data::Pairs(_) => (0..rows).for_each(|r| self.push_row(r, &mut out)),
            Data::Values(v) => out.extend_from_slice(v),
        }
        out
    }

    /// A copy of `src` in `buf`'s memory when it has the same kind and enough room (a streamed
    /// slot taking the next group of the same shapes copies without allocating).
    pub(super) fn copy_into(src: &CpuWeight, buf: Option<CpuWeight>) -> CpuWeight {
        fn reuse<T: Copy>(mut buf: Vec<T>, src: &[T]) -> Vec<T> {
            buf.clear();
            buf.extend_from_slice(src);
            buf
        }
        let data = match (&src.data, buf.map(|b| b.data)) {
            (Data::Values(s), Some(Data::Values(b))) => Data::Values(reuse(b, s)),
            (Data::Panels(Panels::F32(s)), Some(Data::Panels(Panels::F32(b)))) => Data::Panels(Panels::F32(reuse(b, s))),
            (Data::Panels(Panels::F16(s)), Some(Data::Panels(Panels::F16(b)))) => Data::Panels(Panels::F16(reuse(b, s))),
            (Data::Panels(Panels::Bf16(s)), Some(Data::Panels(Panels::Bf16(b)))) => Data::Panels(Panels::Bf16(reuse(b, s))),
            (Data::Pairs(s), Some(Data::Pairs(b))) => Data::Pairs(reuse(b, s)),
            (s, _) => s.clone(),
        };
        CpuWeight { shape: src.shape.clone(), data }
    }
}

/// `gemm::pack` of a little-endian (n, k) matrix of T in `bytes`: straight from the file's
/// bytes when they are aligned for T, else through one decoded copy.
fn pack_bytes<T: bytemuck::Pod + Default + Send + Sync, const B: usize>(kernel: Kernel, bytes: &[u8], n: usize, k: usize, decode: fn([u8; B]) -> T) -> Vec<T> {
    #[cfg(target_endian = "little")]
    if let Ok(values) = bytemuck::try_cast_slice::<u8, T>(bytes) {
        return gemm::pack(kernel, values, n, k);
    }
    let values: Vec<T> = bytes.chunks_exact(B).map(|b| decode(b.try_into().unwrap_or([0; B]))).collect();
    gemm::pack(kernel, &values, n, k)
}
