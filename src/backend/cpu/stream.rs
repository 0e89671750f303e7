//! The CPU backend's side of weight streaming: one copy thread plays the copy engine (groups
//! are copied one at a time, in request order), and each copy's event is a condition
//! variable the compute thread waits on. The copy writes into the slot's buffers, reusing
//! their memory, as a GPU copies into device memory freed by the previous group.
//!
//! Ordering faults: a slot only exists once `release` has taken back every weight of its
//! previous group (by value, checked by address), so the copy thread can never write memory
//! that compute still reads.

use super::{CpuBackend, CpuWeight};
use crate::backend::{BackendError, CopySpan, Result};
use crate::tensor::HostTensor;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

/// A group's weights as the backend holds them (weight.rs), made once, in `pin`'s order: every
/// copy of it is a plain copy.
pub struct CpuPinned {
    tensors: Vec<CpuWeight>,
}

impl CpuPinned {
    /// Bytes the group takes in a slot.
    pub fn bytes(&self) -> usize {
        self.tensors.iter().map(CpuWeight::bytes).sum()
    }
}

/// The memory of one group's weights, free for the next copy.
#[derive(Default)]
pub struct CpuSlot {
    bufs: Vec<CpuWeight>,
}

enum EventState {
    Pending,
    Done { weights: Result<Vec<CpuWeight>>, span: CopySpan },
    /// `wait` took the weights.
    Taken { span: CopySpan },
}

/// Set once by the copy thread, waited on by compute.
struct CopyEvent {
    state: Mutex<EventState>,
    cv: Condvar,
}

impl CopyEvent {
    fn lock(&self) -> MutexGuard<'_, EventState> {
        // A panic elsewhere while holding the lock leaves the state itself valid.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn complete(&self, weights: Result<Vec<CpuWeight>>, span: CopySpan) {
        *self.lock() = EventState::Done { weights, span };
        self.cv.notify_all();
    }
}

/// A copy started by `prefetch`; after `wait`, the addresses of the weights it handed out.
pub struct CpuTransfer {
    event: Arc<CopyEvent>,
    handed: Option<Vec<usize>>,
}

struct Job {
    /// Taken by the copy thread.
    group: Option<Arc<CpuPinned>>,
    slot: CpuSlot,
    event: Arc<CopyEvent>,
}

impl Drop for Job {
    /// A job dropped unfinished (the copy thread gone) must not leave its waiter blocked.
    fn drop(&mut self) {
        let mut st = self.event.lock();
        if matches!(*st, EventState::Pending) {
            let now = Instant::now();
            *st = EventState::Done { weights: Err(BackendError::Streaming("the copy thread stopped before this copy".into())), span: (now, now) };
            self.event.cv.notify_all();
        }
    }
}

/// The copy thread and its queue; started by the first prefetch.
pub(super) struct Copier {
    jobs: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Copier {
    fn drop(&mut self) {
        self.jobs = None; // ends the thread's loop once the queued copies are done
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn copy_into(group: &CpuPinned, slot: CpuSlot) -> Vec<CpuWeight> {
    let mut bufs = slot.bufs.into_iter();
    group.tensors.iter().map(|t| CpuWeight::copy_into(t, bufs.next())).collect()
}

fn start_copier() -> Result<Copier> {
    let (tx, rx) = channel::<Job>();
    let thread = std::thread::Builder::new()
        .name("weight-copy".into())
        .spawn(move || {
            for mut job in rx {
                let start = Instant::now();
                let slot = std::mem::take(&mut job.slot);
                let weights = match job.group.take().map(Arc::try_unwrap) {
                    // Nobody will copy this group again: its memory becomes the slot's.
                    Some(Ok(group)) => Ok(group.tensors),
                    Some(Err(shared)) => Ok(copy_into(&shared, slot)),
                    None => Err(BackendError::Streaming("a copy was queued without its group".into())),
                };
                job.event.complete(weights, (start, Instant::now()));
            }
        })
        .map_err(|e| BackendError::Unavailable(format!("cannot start the weight copy thread: {e}")))?;
    Ok(Copier { jobs: Some(tx), thread: Some(thread) })
}

impl CpuBackend {
    pub(super) fn stream_pin(&self, tensors: &[HostTensor]) -> Result<CpuPinned> {
        Ok(CpuPinned { tensors: tensors.iter().map(|t| CpuWeight::from_host(t, self.route)).collect() })
    }

    pub(super) fn stream_prefetch(&self, group: Arc<CpuPinned>, slot: Option<CpuSlot>) -> Result<CpuTransfer> {
        let event = Arc::new(CopyEvent { state: Mutex::new(EventState::Pending), cv: Condvar::new() });
        let mut copier = self.copier.lock().unwrap_or_else(|e| e.into_inner());
        if copier.is_none() {
            *copier = Some(start_copier()?);
        }
        let jobs = copier.as_ref().and_then(|c| c.jobs.as_ref()).ok_or_else(|| BackendError::Streaming("the copy thread is stopped".into()))?;
        let job = Job { group: Some(group), slot: slot.unwrap_or_default(), event: event.clone() };
        jobs.send(job).map_err(|_| BackendError::Streaming("the copy thread died".into()))?;
        Ok(CpuTransfer { event, handed: None })
    }

    pub(super) fn stream_wait(&self, transfer: &mut CpuTransfer) -> Result<Vec<CpuWeight>> {
        let mut st = transfer.event.lock();
        while matches!(*st, EventState::Pending) {
            st = transfer.event.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        let span = match &*st {
            EventState::Done { span, .. } | EventState::Taken { span } => *span,
            EventState::Pending => unreachable!("the loop above waits until the copy is done"),
        };
        match std::mem::replace(&mut *st, EventState::Taken { span }) {
            EventState::Done { weights, .. } => {
                let weights = weights?;
                transfer.handed = Some(weights.iter().map(CpuWeight::addr).collect());
                Ok(weights)
            }
            _ => Err(BackendError::Streaming("wait called twice: this transfer's weights were already handed out".into())),
        }
    }

    pub(super) fn stream_release(&self, transfer: CpuTransfer, weights: Vec<CpuWeight>) -> Result<(CpuSlot, Option<CopySpan>)> {
        let handed = transfer.handed.ok_or_else(|| BackendError::Streaming("release before wait: the copy may still be writing this slot".into()))?;
        let given: Vec<usize> = weights.iter().map(CpuWeight::addr).collect();
        if given != handed {
            return Err(BackendError::Streaming(format!(
                "release got {} weights that are not the {} this transfer handed out: the slot would be reused while its weights are in use",
                given.len(),
                handed.len()
            )));
        }
        let span = match &*transfer.event.lock() {
            EventState::Taken { span } | EventState::Done { span, .. } => Some(*span),
            EventState::Pending => None,
        };
        Ok((CpuSlot { bufs: weights }, span))
    }
}

#[cfg(test)]
mod tests {
    use crate::backend::cpu::CpuBackend;
    use crate::backend::{BackendError, WeightStream};
    use crate::tensor::HostTensor;
    use std::sync::Arc;

    fn group(b: &CpuBackend, seed: f32) -> Arc<super::CpuPinned> {
        let t = |shape: Vec<usize>, k: f32| {
            let n: usize = shape.iter().product();
            HostTensor::from_f32(shape, &(0..n).map(|i| seed * 1000.0 + k * 100.0 + i as f32).collect::<Vec<_>>())
        };
        Arc::new(b.pin(&[t(vec![4, 8], 1.0), t(vec![8], 2.0)]).expect("pin"))
    }

    fn refused<T>(r: crate::backend::Result<T>) -> bool {
        matches!(r, Err(BackendError::Streaming(_)))
    }

    #[test]
    fn copies_arrive_in_order_and_reuse_slot_memory() {
        let b = CpuBackend::new();
        let (g1, g2) = (group(&b, 1.0), group(&b, 2.0));
        let mut t1 = b.prefetch(g1.clone(), None).expect("prefetch");
        let mut t2 = b.prefetch(g2.clone(), None).expect("prefetch");
        let w1 = b.wait(&mut t1).expect("wait");
        assert_eq!(w1[0].to_rows()[3], 1103.0);
        let addr = w1[0].addr();
        let (slot, span) = b.release(t1, w1).expect("release");
        let (start, end) = span.expect("a finished copy has a span");
        assert!(end >= start);
        let w2 = b.wait(&mut t2).expect("wait");
        assert_eq!(w2[1].values().expect("a vector")[0], 2200.0);
        // Group 1 again, into the slot group 1 just left: same memory, group 1's values.
        let mut t3 = b.prefetch(g1.clone(), Some(slot)).expect("prefetch");
        let w3 = b.wait(&mut t3).expect("wait");
        assert_eq!(w3[0].addr(), addr, "the slot's memory is reused");
        assert_eq!((w3[0].to_rows()[0], w3[1].values().expect("a vector")[7]), (1100.0, 1207.0));
        b.release(t3, w3).expect("release");
        b.release(t2, w2).expect("release");
    }

    /// A group handed over by its last holder is moved into the slot, not copied; one still
    /// held elsewhere is copied.
    #[test]
    fn a_group_nobody_keeps_is_moved_not_copied() {
        let b = CpuBackend::new();
        let g = group(&b, 3.0);
        let addr = g.tensors[0].addr();
        let mut kept = b.prefetch(g.clone(), None).expect("prefetch");
        let w = b.wait(&mut kept).expect("wait");
        assert_ne!(w[0].addr(), addr, "a group still held elsewhere is copied");
        b.release(kept, w).expect("release");
        let mut moved = b.prefetch(g, None).expect("prefetch");
        let w = b.wait(&mut moved).expect("wait");
        assert_eq!(w[0].addr(), addr, "the last reference's memory becomes the slot's");
        assert_eq!(w[0].to_rows()[3], 3103.0);
        b.release(moved, w).expect("release");
    }

    /// Every way to hand a slot back while its weights may still be read or written is refused.
    #[test]
    fn ordering_faults_are_refused() {
        let b = CpuBackend::new();
        let (g1, g2) = (group(&b, 1.0), group(&b, 2.0));
        let (mut t1, mut t2) = (b.prefetch(g1.clone(), None).expect("prefetch"), b.prefetch(g2.clone(), None).expect("prefetch"));
        let (w1, w2) = (b.wait(&mut t1).expect("wait"), b.wait(&mut t2).expect("wait"));
        // A second wait would hand the same memory out twice.
        assert!(refused(b.wait(&mut t1)));
        // Another group's weights: the slot of t1 would be freed while w1 is still in use.
        assert!(refused(b.release(t1, w2)));
        // Part of a group: the rest would still read the slot.
        let mut w1 = w1;
        w1.pop();
        assert!(refused(b.release(t2, w1)));
        // Release before wait: the copy thread may still be writing.
        let t3 = b.prefetch(g1.clone(), None).expect("prefetch");
        assert!(refused(b.release(t3, vec![])));
    }
}
