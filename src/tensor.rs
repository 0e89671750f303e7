//! Host-side tensors: the unit that moves between files, host memory and a backend.

use half::{bf16, f16};
use serde::{Deserialize, Serialize};
use std::ops::{Deref, Range};
use std::sync::Arc;

/// Storage dtypes of weights. Activations are always f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    Bf16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
        }
    }

    pub fn parse(s: &str) -> Option<DType> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Some(DType::F32),
            "f16" | "float16" => Some(DType::F16),
            "bf16" | "bfloat16" => Some(DType::Bf16),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
        }
    }
}

/// A tensor's bytes: its own, or a range of a read-only file map shared by the tensors of one
/// file. A model part's tensors stay in the map until the backend converts them (the CPU packs
/// f32 panels, CUDA pinned bf16), so loading writes every byte once, not twice: the copy out
/// of the map was half of a CPU rank's start (621 MB memmove and 155k page faults for SmolLM2).
#[derive(Clone)]
pub enum Bytes {
    Owned(Vec<u8>),
    Mapped { map: Arc<memmap2::Mmap>, range: Range<usize> },
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Owned(v) => v,
            Bytes::Mapped { map, range } => &map[range.clone()],
        }
    }
}

impl From<Vec<u8>> for Bytes {
    fn from(v: Vec<u8>) -> Bytes {
        Bytes::Owned(v)
    }
}

impl PartialEq for Bytes {
    fn eq(&self, other: &Bytes) -> bool {
        **self == **other
    }
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes", self.len())
    }
}

/// A dense row-major tensor in host memory, little-endian bytes in `dtype`.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Bytes,
}

impl HostTensor {
    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> HostTensor {
        debug_assert_eq!(shape.iter().product::<usize>(), values.len());
        HostTensor { dtype: DType::F32, shape, data: bytemuck::cast_slice(values).to_vec().into() }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Values widened to f32 (bf16 and f16 convert exactly).
    pub fn to_f32(&self) -> Vec<f32> {
        match self.dtype {
            DType::F32 => self.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            DType::F16 => self.data.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            DType::Bf16 => self.data.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        }
    }

    /// The same values stored as `dtype` (round to nearest even when narrowing).
    pub fn to_dtype(&self, dtype: DType) -> HostTensor {
        if dtype == self.dtype {
            return self.clone();
        }
        let values = self.to_f32();
        let data = match dtype {
            DType::F32 => bytemuck::cast_slice(&values).to_vec(),
            DType::F16 => values.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect(),
            DType::Bf16 => values.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect(),
        };
        HostTensor { dtype, shape: self.shape.clone(), data: data.into() }
    }

    /// Rows `order[i]` of a 2-D (or 1-D) tensor, in that order: used to re-lay fused projections.
    pub fn select_rows(&self, order: &[usize]) -> HostTensor {
        let row_bytes = self.data.len() / self.shape[0].max(1);
        let mut data = Vec::with_capacity(order.len() * row_bytes);
        for &r in order {
            data.extend_from_slice(&self.data[r * row_bytes..(r + 1) * row_bytes]);
        }
        let mut shape = self.shape.clone();
        shape[0] = order.len();
        HostTensor { dtype: self.dtype, shape, data: data.into() }
    }

    /// Stack tensors along dim 0 (all must share dtype and trailing dims).
    pub fn concat_rows(parts: &[HostTensor]) -> HostTensor {
        let mut shape = parts[0].shape.clone();
        shape[0] = parts.iter().map(|p| p.shape[0]).sum();
        let data: Vec<u8> = parts.iter().flat_map(|p| p.data.iter().copied()).collect();
        HostTensor { dtype: parts[0].dtype, shape, data: data.into() }
    }
}
