//! This rank's weights: every group it owns in host memory, at most `resident` of them
//! uploaded to the backend, and the next ones uploaded by a loader thread while the current
//! one computes.
//!
//! The loader thread is where a CUDA backend's copy stream plugs in: `Stage::upload` runs
//! there, off the compute thread (on the CPU backend it is the conversion to f32). Uploads run
//! one at a time in request order, as a single copy engine would.

use crate::backend::Backend;
use crate::model::{ModelError, Part};
use crate::schedule::Schedule;
use crate::stage::{HostGroup, Stage};
use crate::tensor::HostTensor;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Read the host copies of `rank`'s groups, in its execution order, touching only the parts
/// those groups hold (a rank's node stores only its own part files).
pub fn read_rank_groups<E>(
    schedule: &Schedule,
    rank: usize,
    mut read: impl FnMut(Part) -> Result<Vec<(String, HostTensor)>, E>,
) -> Result<Vec<HostGroup>, E> {
    let n_layers = schedule.shape.n_layers;
    schedule.rank_groups[rank].iter().map(|&g| HostGroup::read(schedule.groups[g].layers.clone(), n_layers, &mut read)).collect()
}

/// A finished upload, timed for the trace.
struct Loaded<B: Backend> {
    /// Index into the rank's groups.
    idx: usize,
    stage: Result<Stage<B>, ModelError>,
    start: Instant,
    end: Instant,
}

/// One weight upload that happened, for the trace: (index into the rank's groups, start, end).
pub type CopySpan = (usize, Instant, Instant);

pub struct WeightWindow<B: Backend> {
    host_len: usize,
    host: Vec<Arc<HostGroup>>,
    resident: usize,
    /// Uploaded groups: (index into the rank's groups, stage).
    slots: Vec<(usize, Stage<B>)>,
    /// Requested uploads not yet received, in request order.
    loading: VecDeque<usize>,
    jobs: Option<Sender<(usize, Arc<HostGroup>)>>,
    done: Receiver<Loaded<B>>,
    thread: Option<JoinHandle<()>>,
    /// Set when the window goes away: the loader skips the uploads still queued.
    closing: Arc<AtomicBool>,
    pub copies: Vec<CopySpan>,
}

impl<B: Backend + 'static> WeightWindow<B> {
    pub fn new(backend: Arc<B>, host: Vec<HostGroup>, resident: usize) -> Result<WeightWindow<B>, ModelError> {
        let (jobs, rx) = channel::<(usize, Arc<HostGroup>)>();
        let (tx, done) = channel::<Loaded<B>>();
        let closing = Arc::new(AtomicBool::new(false));
        let stop = closing.clone();
        let thread = std::thread::Builder::new()
            .name("weight-loader".into())
            .spawn(move || {
                for (idx, group) in rx {
                    if stop.load(Ordering::SeqCst) {
                        break; // the window is closing: the rest of the queue is not wanted
                    }
                    let start = Instant::now();
                    let stage = Stage::upload(&*backend, &group);
                    if tx.send(Loaded { idx, stage, start, end: Instant::now() }).is_err() {
                        break; // the window is gone: nobody wants the rest
                    }
                }
            })
            .map_err(|e| ModelError::Unsupported(format!("cannot start the weight loader thread: {e}")))?;
        Ok(WeightWindow {
            host_len: host.len(),
            host: host.into_iter().map(Arc::new).collect(),
            resident: resident.max(1),
            slots: vec![],
            loading: VecDeque::new(),
            jobs: Some(jobs),
            done,
            thread: Some(thread),
            closing,
            copies: vec![],
        })
    }

    fn request(&mut self, idx: usize) -> Result<(), ModelError> {
        let jobs = self.jobs.as_ref().ok_or_else(|| ModelError::Unsupported("weight loader already stopped".into()))?;
        jobs.send((idx, self.host[idx].clone())).map_err(|_| ModelError::Unsupported("the weight loader thread died".into()))?;
        self.loading.push_back(idx);
        Ok(())
    }

    fn receive(&mut self, loaded: Loaded<B>) -> Result<(), ModelError> {
        self.loading.retain(|&i| i != loaded.idx);
        self.copies.push((loaded.idx, loaded.start, loaded.end));
        self.slots.push((loaded.idx, loaded.stage?));
        Ok(())
    }

    fn is_resident(&self, idx: usize) -> bool {
        self.slots.iter().any(|(i, _)| *i == idx)
    }

    /// The stage of the rank's `idx`-th group, uploading it if needed, and how long that
    /// waited. Groups outside the next `resident` in execution order (cyclic: after the
    /// last comes the next wave's first) are dropped, and the free slots start uploading the
    /// following groups, so they load while this one computes.
    pub fn acquire(&mut self, idx: usize) -> Result<(&Stage<B>, Duration), ModelError> {
        let k = self.host_len;
        let window: Vec<usize> = (0..self.resident.min(k)).map(|j| (idx + j) % k).collect();
        self.slots.retain(|(i, _)| window.contains(i));
        for &g in &window {
            let busy = self.slots.len() + self.loading.len();
            if !self.is_resident(g) && !self.loading.contains(&g) && (g == idx || busy < window.len()) {
                self.request(g)?;
            }
        }
        while let Ok(l) = self.done.try_recv() {
            self.receive(l)?;
        }
        let start = Instant::now();
        while !self.is_resident(idx) {
            let l = self.done.recv().map_err(|_| ModelError::Unsupported("the weight loader thread died".into()))?;
            self.receive(l)?;
        }
        let waited = start.elapsed();
        let stage = self.slots.iter().find(|(i, _)| *i == idx).map(|(_, s)| s);
        stage.map(|s| (s, waited)).ok_or_else(|| ModelError::Unsupported(format!("group {idx} vanished from the weight window")))
    }

    /// How many groups are uploaded now (tests check the `resident` bound with it).
    pub fn uploaded(&self) -> usize {
        self.slots.len()
    }
}

impl<B: Backend> Drop for WeightWindow<B> {
    fn drop(&mut self) {
        self.closing.store(true, Ordering::SeqCst);
        self.jobs = None; // ends the loader's loop
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::testing::{llama_config, random_group};

    #[test]
    fn window_keeps_at_most_resident_groups_and_prefetches_the_next() {
        let cfg = match llama_config(3) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        for resident in [1, 2, 3] {
            let host: Vec<HostGroup> = (0..3).map(|l| random_group(&cfg, l..l + 1, 1)).collect();
            let mut w = WeightWindow::new(Arc::new(CpuBackend::new()), host, resident).expect("window");
            for idx in [0, 1, 2, 0, 1, 2] {
                let (stage, _) = w.acquire(idx).expect("acquire");
                assert_eq!(stage.layers, idx..idx + 1);
                assert!(w.uploaded() + w.loading.len() <= resident, "resident {resident}: {} uploaded", w.uploaded());
            }
            // Two waves over three groups: every acquire loads unless all three stay resident;
            // with two slots the next wave's first group is already on its way.
            let loads = w.copies.len() + w.loading.len();
            let expected = if resident >= 3 { 3 } else { 6 + usize::from(resident == 2) };
            assert_eq!(loads, expected, "resident {resident}");
        }
    }

}
