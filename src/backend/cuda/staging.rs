//! Activations between host and device through reused page-locked buffers.
//!
//! A copy from pageable memory makes the driver stage it in its own pinned bounce buffer
//! chunk by chunk, so the host thread waits while the stream works through everything
//! queued before the copy. Here the host writes into a pinned buffer (its own memcpy, not
//! ordered after the GPU's queue), queues the DMA and returns: an upload overlaps the
//! kernels still running. Each buffer carries the event after its last copy, and is
//! written again only once that has passed.

use super::{dev_err, CudaBackend, Result};
use cudarc::driver::{CudaEvent, CudaSlice, PinnedHostSlice};
use std::sync::Mutex;

/// Below this many values the driver's own staging is as fast (and needs no pool).
pub(crate) const MIN_STAGED: usize = 1 << 14;
/// Buffers kept: an upload and a download in flight per wave, two waves.
const KEEP: usize = 4;

struct Staged {
    host: PinnedHostSlice<f32>,
    /// After the last copy that reads or writes `host`.
    done: Option<CudaEvent>,
}

#[derive(Default)]
pub(crate) struct Staging {
    free: Mutex<Vec<Staged>>,
}

fn idle(s: &Staged) -> bool {
    s.done.as_ref().is_none_or(|e| e.try_is_complete().unwrap_or(false))
}

fn poisoned() -> super::BackendError {
    super::BackendError::Device("activation staging: a thread panicked while holding the pinned buffers".into())
}

impl Staging {
    /// An idle buffer of at least `n` values, else a new one: waiting for a busy one
    /// would wait for the whole stream before its copy.
    fn take(&self, b: &CudaBackend, n: usize) -> Result<Staged> {
        {
            let mut free = self.free.lock().map_err(|_| poisoned())?;
            if let Some(i) = free.iter().position(|s| s.host.len() >= n && idle(s)) {
                return Ok(free.swap_remove(i));
            }
        }
        // Rounded up so row counts that vary a little between micro-batches reuse buffers.
        let len = n.next_multiple_of(1 << 18);
        let what = format!("pinning {} bytes for activation copies", len * 4);
        // SAFETY: the first n values are written (upload) or copied into (download) before
        // any are read.
        let host = unsafe { b.ctx.alloc_pinned::<f32>(len) }.map_err(|e| dev_err(&what, e))?;
        Ok(Staged { host, done: None })
    }

    /// Keeps at most KEEP buffers, dropping only idle ones (the smallest first): freeing
    /// pinned memory a queued DMA still reads would be a use after free.
    fn give_back(&self, s: Staged) -> Result<()> {
        let mut free = self.free.lock().map_err(|_| poisoned())?;
        free.push(s);
        while free.len() > KEEP {
            let Some(i) = (0..free.len()).filter(|&i| idle(&free[i])).min_by_key(|&i| free[i].host.len()) else { break };
            free.swap_remove(i);
        }
        Ok(())
    }

    /// data -> a new device buffer; returns once the copy is queued.
    pub fn upload(&self, b: &CudaBackend, data: &[f32]) -> Result<CudaSlice<f32>> {
        let n = data.len();
        let mut s = self.take(b, n)?;
        // as_mut_slice waits on cudarc's own event, which our raw-slice copies never record.
        s.host.as_mut_slice().map_err(|e| dev_err("activation staging buffer", e))?[..n].copy_from_slice(data);
        let mut dev = b.alloc_f32(n, "upload")?;
        let host = s.host.as_slice().map_err(|e| dev_err("activation staging buffer", e))?;
        b.stream.memcpy_htod(&host[..n], &mut dev).map_err(|e| dev_err("upload", e))?;
        s.done = Some(b.stream.record_event(None).map_err(|e| dev_err("upload", e))?);
        self.give_back(s)?;
        Ok(dev)
    }

    /// The first n values of x; waits for the stream (the host needs them).
    pub fn download(&self, b: &CudaBackend, x: &CudaSlice<f32>, n: usize) -> Result<Vec<f32>> {
        let mut s = self.take(b, n)?;
        {
            let host = s.host.as_mut_slice().map_err(|e| dev_err("activation staging buffer", e))?;
            b.stream.memcpy_dtoh(&x.slice(0..n), &mut host[..n]).map_err(|e| b.wait_err("download", e))?;
        }
        b.synchronize()?;
        let v = s.host.as_slice().map_err(|e| dev_err("activation staging buffer", e))?[..n].to_vec();
        s.done = None;
        self.give_back(s)?;
        Ok(v)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Ok(free) = self.free.get_mut() {
            for s in free.iter() {
                if let Some(ev) = &s.done {
                    // The DMA must be done reading before the pinned pages are freed; at
                    // teardown there is no one to report a failure to.
                    let _ = ev.synchronize();
                }
            }
        }
    }
}
