//! Weight streaming (the Backend contract): a group's weights wait in pinned (page-locked)
//! host memory, converted once to the device's storage dtypes, and are copied into a slot's
//! device buffers on the copy stream, so the next group's copy overlaps the current group's
//! kernels on the compute stream.
//!
//! ```text
//! pin:      convert + page-lock, once per group
//! prefetch: copy stream waits for the slot's release event (its last readers), records
//!           `start`, copies every tensor, records `done`; the host returns at once
//! wait:     compute stream waits on `done` (cuStreamWaitEvent); the host does not block
//! release:  records `readers_done` on the compute stream after the group's last kernel;
//!           the buffers go back into the slot, and the next copy into it waits for that
//! ```

use super::{dev_err, CudaBackend, CudaWeight, WeightBuf};
use crate::backend::{BackendError, CopySpan, Result};
use crate::tensor::{DType, HostTensor};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, PinnedHostSlice};
use half::{bf16, f16};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
struct Entry {
    shape: Vec<usize>,
    /// Offset and length in `bf16` (matrices) or `f32` (vectors), in elements.
    offset: usize,
    len: usize,
    matrix: bool,
}

/// A group's weights in pinned host memory, already in device storage dtype.
pub struct PinnedGroup {
    entries: Vec<Entry>,
    bf16: PinnedHostSlice<u16>,
    f32: PinnedHostSlice<f32>,
    /// The last copy out of this group; dropping the group waits for it, because the DMA
    /// reads these pages after the host has moved on.
    last_copy: Mutex<Option<CudaEvent>>,
}

impl PinnedGroup {
    /// Bytes this group takes on the device.
    pub fn device_bytes(&self) -> usize {
        self.entries.iter().map(|s| s.len * if s.matrix { 2 } else { 4 }).sum()
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

/// Device buffers of a released group, and the event after its last readers.
#[derive(Default)]
pub struct CudaSlot {
    bufs: Vec<WeightBuf>,
    readers_done: Option<CudaEvent>,
}

/// A copy on the copy stream; after `wait`, the shapes it handed to compute.
pub struct CudaTransfer {
    weights: Option<Vec<CudaWeight>>,
    handed: Option<Vec<Vec<usize>>>,
    start: CudaEvent,
    done: CudaEvent,
    /// The pinned pages must outlive the DMA that reads them.
    _group: Arc<PinnedGroup>,
}

/// A timing event (the default flags disable timing).
fn timed_event(stream: &cudarc::driver::CudaStream, what: &str) -> Result<CudaEvent> {
    stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| dev_err(what, e))
}

/// A buffer of the slot with exactly this kind and length (layers of one model have the
/// same shapes, so a slot is reused without allocating), taken out of it.
fn take_buf(bufs: &mut Vec<WeightBuf>, matrix: bool, len: usize) -> Option<WeightBuf> {
    let i = bufs.iter().position(|b| match b {
        WeightBuf::Bf16(d) => matrix && d.len() == len,
        WeightBuf::F32(d) => !matrix && d.len() == len,
    })?;
    Some(bufs.swap_remove(i))
}

impl CudaBackend {
    /// Converts `tensors` to device dtypes (matrices bf16, vectors f32) in freshly
    /// page-locked host memory. Costs host time and pinned memory, once per group.
    pub(super) fn stream_pin(&self, tensors: &[HostTensor]) -> Result<PinnedGroup> {
        let (mut n16, mut n32) = (0usize, 0usize);
        let mut entries = Vec::with_capacity(tensors.len());
        for t in tensors {
            let matrix = t.shape.len() >= 2;
            let offset = if matrix { n16 } else { n32 };
            if matrix {
                n16 += t.numel();
            } else {
                n32 += t.numel();
            }
            entries.push(Entry { shape: t.shape.clone(), offset, len: t.numel(), matrix });
        }
        let what = format!("pinning {} bytes of host memory", n16 * 2 + n32 * 4);
        // SAFETY: every element is written below before any copy reads it.
        let mut b16 = unsafe { self.ctx.alloc_pinned::<u16>(n16.max(1)) }.map_err(|e| dev_err(&what, e))?;
        let mut b32 = unsafe { self.ctx.alloc_pinned::<f32>(n32.max(1)) }.map_err(|e| dev_err(&what, e))?;
        {
            let h16 = b16.as_mut_slice().map_err(|e| dev_err(&what, e))?;
            let h32 = b32.as_mut_slice().map_err(|e| dev_err(&what, e))?;
            for (t, s) in tensors.iter().zip(&entries) {
                if s.matrix {
                    write_bf16(t, &mut h16[s.offset..s.offset + s.len]);
                } else {
                    h32[s.offset..s.offset + s.len].copy_from_slice(&t.to_f32());
                }
            }
        }
        Ok(PinnedGroup { entries, bf16: b16, f32: b32, last_copy: Mutex::new(None) })
    }

    /// Queues the copies of `group` into `slot` on the copy stream and returns at once.
    pub(super) fn stream_prefetch(&self, group: &Arc<PinnedGroup>, slot: Option<CudaSlot>) -> Result<CudaTransfer> {
        let cs = &self.copy_stream;
        let CudaSlot { mut bufs, readers_done } = slot.unwrap_or_default();
        if let Some(ev) = &readers_done {
            // The slot's previous group may still be read by queued kernels.
            cs.wait(ev).map_err(|e| dev_err("ordering a weight copy after the slot's last readers", e))?;
        }
        let h16 = group.bf16.as_slice().map_err(|e| dev_err("pinned buffer", e))?;
        let h32 = group.f32.as_slice().map_err(|e| dev_err("pinned buffer", e))?;
        let start = timed_event(cs, "recording a weight copy's start")?;
        let mut weights = Vec::with_capacity(group.entries.len());
        for s in &group.entries {
            let what = format!("copying weight {:?} to the device", s.shape);
            let n = s.len.max(1);
            let buf = if s.matrix {
                let mut d = match take_buf(&mut bufs, true, n) {
                    Some(WeightBuf::Bf16(d)) => d,
                    _ => unsafe { cs.alloc::<u16>(n) }.map_err(|e| dev_err(&what, e))?,
                };
                if s.len > 0 {
                    cs.memcpy_htod(&h16[s.offset..s.offset + s.len], &mut d).map_err(|e| dev_err(&what, e))?;
                }
                WeightBuf::Bf16(d)
            } else {
                let mut d = match take_buf(&mut bufs, false, n) {
                    Some(WeightBuf::F32(d)) => d,
                    _ => unsafe { cs.alloc::<f32>(n) }.map_err(|e| dev_err(&what, e))?,
                };
                if s.len > 0 {
                    cs.memcpy_htod(&h32[s.offset..s.offset + s.len], &mut d).map_err(|e| dev_err(&what, e))?;
                }
                WeightBuf::F32(d)
            };
            weights.push(CudaWeight { shape: s.shape.clone(), buf });
        }
        // Buffers of other sizes left in the slot are freed here, after their readers
        // (cudarc orders a buffer's free after its recorded reads).
        drop(bufs);
        let done = timed_event(cs, "recording a weight copy's end")?;
        let guard = cs.record_event(None).map_err(|e| dev_err("recording a weight copy's end", e))?;
        if let Ok(mut g) = group.last_copy.lock() {
            *g = Some(guard);
        }
        Ok(CudaTransfer { weights: Some(weights), handed: None, start, done, _group: group.clone() })
    }

    /// Orders the compute stream after the copies and hands over the weights.
    pub(super) fn stream_wait(&self, t: &mut CudaTransfer) -> Result<Vec<CudaWeight>> {
        let weights = t.weights.take().ok_or_else(|| BackendError::Streaming("wait called twice: this transfer's weights were already handed out".into()))?;
        self.stream.wait(&t.done).map_err(|e| dev_err("ordering compute after a weight copy", e))?;
        t.handed = Some(weights.iter().map(|w| w.shape.clone()).collect());
        Ok(weights)
    }

    /// Marks the end of the group's reads on the compute stream and returns its buffers.
    pub(super) fn stream_release(&self, t: CudaTransfer, weights: Vec<CudaWeight>) -> Result<(CudaSlot, Option<CopySpan>)> {
        let handed = t.handed.as_ref().ok_or_else(|| BackendError::Streaming("release before wait: the copy may still be writing this slot".into()))?;
        let given: Vec<&Vec<usize>> = weights.iter().map(|w| &w.shape).collect();
        if given.len() != handed.len() || given.iter().zip(handed).any(|(a, b)| *a != b) {
            return Err(BackendError::Streaming(format!(
                "release got {} weights that are not the {} this transfer handed out: the slot would be reused while its weights are in use",
                given.len(),
                handed.len()
            )));
        }
        let readers_done = self.stream.record_event(None).map_err(|e| dev_err("recording the end of a group's compute", e))?;
        let span = self.host_span(&t.start, &t.done);
        Ok((CudaSlot { bufs: weights.into_iter().map(|w| w.buf).collect(), readers_done: Some(readers_done) }, span))
    }

    /// When the copy between `start` and `done` ran on the host clock, if it has finished
    /// (never blocks: an unfinished copy has no span yet).
    fn host_span(&self, start: &CudaEvent, done: &CudaEvent) -> Option<CopySpan> {
        if !done.try_is_complete().ok()? {
            return None;
        }
        let (anchor, at) = &self.clock;
        let to_host = |ev: &CudaEvent| -> Option<Instant> {
            let ms = anchor.elapsed_ms(ev).ok()?;
            Some(*at + Duration::from_secs_f64(f64::from(ms.max(0.0)) / 1e3))
        };
        Some((to_host(start)?, to_host(done)?))
    }
}
