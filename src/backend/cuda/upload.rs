//! Weight streaming: a group's weights wait in pinned (page-locked) host memory and are
//! copied to the device on the copy stream, so the next group's upload overlaps the
//! current group's compute on the compute stream.
//!
//! ```text
//! let group = Arc::new(backend.pin(&tensors)?);   // once: convert + page-lock
//! let pending = backend.prefetch(&group)?;         // async H2D on the copy stream
//! ... compute the current group ...
//! let weights = pending.wait()?;                   // compute stream waits on the copy
//! ```
//!
//! `wait` orders on the GPU (the compute stream waits on the copy's event); it does not
//! block the host.

use super::{dev_err, CudaBackend, CudaWeight, WeightBuf};
use crate::backend::Result;
use crate::tensor::{DType, HostTensor};
use cudarc::driver::{CudaEvent, CudaStream, PinnedHostSlice};
use half::{bf16, f16};
use std::sync::{Arc, Mutex};

/// Writes `t` as bf16 bit patterns (round to nearest even when narrowing from f32).
fn write_bf16(t: &HostTensor, out: &mut [u16]) {
    match t.dtype {
        DType::Bf16 => out.iter_mut().zip(t.data.chunks_exact(2)).for_each(|(o, b)| *o = u16::from_le_bytes([b[0], b[1]])),
        DType::F32 => out
            .iter_mut()
            .zip(t.data.chunks_exact(4))
            .for_each(|(o, b)| *o = bf16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]])).to_bits()),
        DType::F16 => out
            .iter_mut()
            .zip(t.data.chunks_exact(2))
            .for_each(|(o, b)| *o = bf16::from_f32(f16::from_le_bytes([b[0], b[1]]).to_f32()).to_bits()),
    }
}

pub(crate) fn to_bf16_bits(t: &HostTensor) -> Vec<u16> {
    let mut v = vec![0u16; t.numel()];
    write_bf16(t, &mut v);
    v
}

/// Where one tensor sits in a group's pinned buffers.
struct Slot {
    shape: Vec<usize>,
    /// Offset and length in `bf16` (matrices) or `f32` (vectors), in elements.
    offset: usize,
    len: usize,
    matrix: bool,
}

/// A group's weights in pinned host memory, already in device storage dtype.
pub struct PinnedGroup {
    slots: Vec<Slot>,
    bf16: PinnedHostSlice<u16>,
    f32: PinnedHostSlice<f32>,
    /// The last copy out of this group; dropping the group waits for it, because the DMA
    /// reads these pages after the host has moved on.
    last_copy: Mutex<Option<CudaEvent>>,
}

impl PinnedGroup {
    /// Bytes this group takes on the device.
    pub fn device_bytes(&self) -> usize {
        self.slots.iter().map(|s| s.len * if s.matrix { 2 } else { 4 }).sum()
    }
}

impl Drop for PinnedGroup {
    fn drop(&mut self) {
        if let Ok(mut g) = self.last_copy.lock() {
            if let Some(ev) = g.take() {
                // Nothing to report to at teardown; the wait itself is what matters.
                let _ = ev.synchronize();
            }
        }
    }
}

/// Copies in flight on the copy stream; `wait` hands the weights to the compute stream.
pub struct PendingUpload {
    weights: Vec<CudaWeight>,
    done: CudaEvent,
    compute: Arc<CudaStream>,
    bytes: usize,
    _group: Arc<PinnedGroup>,
}

impl PendingUpload {
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether the copies have finished (never blocks).
    pub fn is_ready(&self) -> bool {
        self.done.is_complete()
    }

    /// Blocks the host until the copies are done (for timing).
    pub fn wait_host(&self) -> Result<()> {
        self.done.synchronize().map_err(|e| dev_err("waiting for weight upload", e))
    }

    /// Orders the compute stream after the copies and returns the weights, in the order
    /// they were given to `pin`.
    pub fn wait(self) -> Result<Vec<CudaWeight>> {
        self.compute.wait(&self.done).map_err(|e| dev_err("ordering compute after weight upload", e))?;
        Ok(self.weights)
    }
}

impl CudaBackend {
    /// Converts `tensors` to device dtypes (matrices bf16, vectors f32) in freshly
    /// page-locked host memory. Costs host time and pinned memory, once per group.
    pub fn pin(&self, tensors: &[HostTensor]) -> Result<PinnedGroup> {
        let (mut n16, mut n32) = (0usize, 0usize);
        let mut slots = Vec::with_capacity(tensors.len());
        for t in tensors {
            let matrix = t.shape.len() >= 2;
            let offset = if matrix { n16 } else { n32 };
            if matrix {
                n16 += t.numel();
            } else {
                n32 += t.numel();
            }
            slots.push(Slot { shape: t.shape.clone(), offset, len: t.numel(), matrix });
        }
        let what = format!("pinning {} bytes of host memory", n16 * 2 + n32 * 4);
        // SAFETY: every element is written below before any copy reads it.
        let mut b16 = unsafe { self.ctx.alloc_pinned::<u16>(n16.max(1)) }.map_err(|e| dev_err(&what, e))?;
        let mut b32 = unsafe { self.ctx.alloc_pinned::<f32>(n32.max(1)) }.map_err(|e| dev_err(&what, e))?;
        {
            let h16 = b16.as_mut_slice().map_err(|e| dev_err(&what, e))?;
            let h32 = b32.as_mut_slice().map_err(|e| dev_err(&what, e))?;
            for (t, s) in tensors.iter().zip(&slots) {
                if s.matrix {
                    write_bf16(t, &mut h16[s.offset..s.offset + s.len]);
                } else {
                    h32[s.offset..s.offset + s.len].copy_from_slice(&t.to_f32());
                }
            }
        }
        Ok(PinnedGroup { slots, bf16: b16, f32: b32, last_copy: Mutex::new(None) })
    }

    /// Starts copying `group` to the device on the copy stream and returns at once.
    /// The copy stream does not wait for queued compute: the destination buffers are new
    /// allocations, so the upload may run under the current group's kernels.
    pub fn prefetch(&self, group: &Arc<PinnedGroup>) -> Result<PendingUpload> {
        let cs = &self.copy_stream;
        let h16 = group.bf16.as_slice().map_err(|e| dev_err("pinned buffer", e))?;
        let h32 = group.f32.as_slice().map_err(|e| dev_err("pinned buffer", e))?;
        let mut weights = Vec::with_capacity(group.slots.len());
        for s in &group.slots {
            let what = format!("uploading weight {:?}", s.shape);
            let n = s.len.max(1);
            let buf = if s.matrix {
                let mut d = unsafe { cs.alloc::<u16>(n) }.map_err(|e| dev_err(&what, e))?;
                if s.len > 0 {
                    cs.memcpy_htod(&h16[s.offset..s.offset + s.len], &mut d).map_err(|e| dev_err(&what, e))?;
                }
                WeightBuf::Bf16(d)
            } else {
                let mut d = unsafe { cs.alloc::<f32>(n) }.map_err(|e| dev_err(&what, e))?;
                if s.len > 0 {
                    cs.memcpy_htod(&h32[s.offset..s.offset + s.len], &mut d).map_err(|e| dev_err(&what, e))?;
                }
                WeightBuf::F32(d)
            };
            weights.push(CudaWeight { shape: s.shape.clone(), buf });
        }
        let done = cs.record_event(None).map_err(|e| dev_err("recording upload event", e))?;
        let guard = cs.record_event(None).map_err(|e| dev_err("recording upload event", e))?;
        if let Ok(mut g) = group.last_copy.lock() {
            *g = Some(guard);
        }
        Ok(PendingUpload { weights, done, compute: self.stream.clone(), bytes: group.device_bytes(), _group: group.clone() })
    }

    /// `pin` then `prefetch`, for a group that is uploaded once.
    pub fn prefetch_tensors(&self, tensors: &[HostTensor]) -> Result<PendingUpload> {
        let group = Arc::new(self.pin(tensors)?);
        self.prefetch(&group)
    }
}
