//! The weight window: every group this rank owns pinned in host memory (converted once, at
//! start, to what the backend computes with), at most `resident` of them in device slots, and
//! the next ones copied in while the current one computes, through the backend's streaming
//! contract (`WeightStream::pin / prefetch / wait / release`, docs/DESIGN.md "Weight streaming").
//! The same window runs on the CPU backend (a copy thread) and on CUDA (a copy stream).
//!
//! A slot is freed only by `release`, which takes the group's weights back by value, and the
//! group the caller computes with is borrowed from the window: while it is in use, the window
//! cannot be asked for another group, so no copy can overwrite it. This does not compile:
//!
//! ```compile_fail,E0499
//! # use falcon_batch::pipeline::WeightWindow;
//! # use falcon_batch::backend::cpu::CpuBackend;
//! # fn f(w: &mut WeightWindow<CpuBackend>) {
//! let (current, _) = w.acquire(0).unwrap();
//! let (next, _) = w.acquire(1).unwrap(); // may reuse group 0's slot
//! let _ = (current.layers.clone(), next.layers.clone()); // group 0 still in use
//! # }
//! ```

use crate::backend::WeightStream;
use crate::config::ModelConfig;
use crate::model::{ModelError, Part};
use crate::schedule::Schedule;
use crate::group::{DeviceGroup, GroupTensorNames, HostGroup};
use crate::tensor::HostTensor;
use std::sync::Arc;
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

/// One weight copy that happened, for the trace: (index into the rank's groups, start, end).
pub type GroupCopy = (usize, Instant, Instant);

/// A group in a slot: its copy in flight, or arrived and computing.
enum Held<B: WeightStream> {
    Loading(B::Transfer),
    /// Boxed: a group's typed weights make it far larger than a transfer in flight.
    Ready(B::Transfer, Box<DeviceGroup<B>>),
}

pub struct WeightWindow<B: WeightStream> {
    backend: Arc<B>,
    /// The model's config, to type each arriving group's weights.
    cfg: ModelConfig,
    /// Per group, its tensors' names in pinned order.
    names: Vec<GroupTensorNames>,
    /// The rank's groups, pinned once. When every group stays resident, each is handed to its
    /// one copy instead (and so dropped, or moved into its slot).
    pinned: Vec<Option<Arc<B::Pinned>>>,
    resident: usize,
    /// Groups in slots: (index into the rank's groups, state).
    held: Vec<(usize, Held<B>)>,
    /// Released slots, reused by the next copies (slots never used yet are made on demand).
    free: Vec<B::Slot>,
    /// Copies whose groups were released, for the trace.
    pub copies: Vec<GroupCopy>,
}

impl<B: WeightStream> WeightWindow<B> {
    /// Pins every group (the host copies are converted once here and then dropped).
    pub fn new(backend: Arc<B>, cfg: &ModelConfig, host: Vec<HostGroup>, resident: usize) -> Result<WeightWindow<B>, ModelError> {
        let mut names = vec![];
        let mut pinned = vec![];
        for group in host {
            let (group_names, tensors) = group.split();
            pinned.push(Arc::new(backend.pin(&tensors)?));
            names.push(group_names);
        }
        WeightWindow::from_pinned(backend, cfg, names, pinned, resident)
    }

    /// A window over groups already pinned; one pinned group may serve several groups of
    /// the same shapes (the synthetic benchmark streams many layers from two host copies).
    pub fn from_pinned(
        backend: Arc<B>,
        cfg: &ModelConfig,
        names: Vec<GroupTensorNames>,
        pinned: Vec<Arc<B::Pinned>>,
        resident: usize,
    ) -> Result<WeightWindow<B>, ModelError> {
        if names.len() != pinned.len() {
            return Err(ModelError::Unsupported(format!("weight window: {} groups named for {} pinned groups", names.len(), pinned.len())));
        }
        Ok(WeightWindow { backend, cfg: cfg.clone(), names, pinned: pinned.into_iter().map(Some).collect(), resident: resident.max(1), held: vec![], free: vec![], copies: vec![] })
    }

    fn slots(&self) -> usize {
        self.resident.min(self.names.len())
    }

    fn position(&self, idx: usize) -> Option<usize> {
        self.held.iter().position(|(i, _)| *i == idx)
    }

    /// Starts copying group `idx` into a free slot.
    fn start(&mut self, idx: usize) -> Result<(), ModelError> {
        let missing = || ModelError::Unsupported(format!("group {idx} was dropped from host memory as always resident, yet it is needed again"));
        // A group that stays resident for good is never copied again: hand over the host
        // copy itself (the CPU then moves it instead of copying).
        let group = if self.slots() == self.names.len() { self.pinned[idx].take() } else { self.pinned[idx].clone() };
        let transfer = self.backend.prefetch(group.ok_or_else(missing)?, self.free.pop())?;
        self.held.push((idx, Held::Loading(transfer)));
        Ok(())
    }

    /// Gives a group's slot back after its last use (a group still in flight is waited for:
    /// its copy must finish before the slot can be written again).
    fn evict(&mut self, idx: usize, held: Held<B>) -> Result<(), ModelError> {
        let (transfer, weights) = match held {
            Held::Ready(t, group) => (t, group.into_weights(&self.names[idx])?),
            Held::Loading(mut t) => {
                let w = self.backend.wait(&mut t)?;
                (t, w)
            }
        };
        let (slot, span) = self.backend.release(transfer, weights)?;
        self.free.push(slot);
        if let Some((s, e)) = span {
            self.copies.push((idx, s, e));
        }
        Ok(())
    }

    /// The rank's `idx`-th group, and how long compute waited for its copy.
    /// Groups outside the next `resident` in execution order (cyclic: after the last comes
    /// the next wave's first) give their slots back, and the free slots start copying the
    /// following groups, so they arrive while this one computes.
    pub fn acquire(&mut self, idx: usize) -> Result<(&DeviceGroup<B>, Duration), ModelError> {
        let k = self.names.len();
        if idx >= k {
            return Err(ModelError::Unsupported(format!("weight window: group {idx} asked for, the rank has {k}")));
        }
        let window: Vec<usize> = (0..self.slots()).map(|j| (idx + j) % k).collect();
        let mut i = 0;
        while i < self.held.len() {
            if window.contains(&self.held[i].0) {
                i += 1;
            } else {
                let (g, h) = self.held.swap_remove(i);
                self.evict(g, h)?;
            }
        }
        for &g in &window {
            if self.position(g).is_none() && self.held.len() < self.slots() {
                self.start(g)?;
            }
        }
        let pos = self.position(idx).ok_or_else(|| ModelError::Unsupported(format!("group {idx} found no free slot in the weight window")))?;
        let started = Instant::now();
        if let (_, Held::Loading(_)) = &self.held[pos] {
            let (g, held) = self.held.swap_remove(pos);
            let Held::Loading(mut t) = held else {
                return Err(ModelError::Unsupported(format!("group {g} changed state in the weight window")));
            };
            let weights = self.backend.wait(&mut t)?;
            let group = DeviceGroup::from_weights(&self.cfg, &self.names[g], weights)?;
            self.held.push((g, Held::Ready(t, Box::new(group))));
        }
        let waited = started.elapsed();
        match self.held.iter().find(|(i, _)| *i == idx) {
            Some((_, Held::Ready(_, group))) => Ok((group, waited)),
            _ => Err(ModelError::Unsupported(format!("group {idx} vanished from the weight window"))),
        }
    }

    /// How many slots hold a group now, arrived or in flight (tests check `resident` with it).
    pub fn uploaded(&self) -> usize {
        self.held.len()
    }
}

impl<B: WeightStream> Drop for WeightWindow<B> {
    fn drop(&mut self) {
        // Copies in flight end before their slots' memory goes (CPU: the copy thread
        // finishes its queue; CUDA: the pinned group's drop waits for its last copy).
        for (g, h) in std::mem::take(&mut self.held) {
            let _ = self.evict(g, h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::group::score_through;
    use crate::testing::{llama_config, random_group};
    use crate::token_tree::{MicroBatch, TokenizedDoc};

    fn cfg(layers: usize) -> crate::config::ModelConfig {
        match llama_config(layers) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn window_keeps_at_most_resident_groups_and_prefetches_the_next() {
        let cfg = cfg(3);
        for resident in [1, 2, 3] {
            let host: Vec<HostGroup> = (0..3).map(|l| random_group(&cfg, l..l + 1, 1)).collect();
            let mut w = WeightWindow::new(Arc::new(CpuBackend::new()), &cfg, host, resident).expect("window");
            let mut copies = 0;
            for idx in [0, 1, 2, 0, 1, 2] {
                let before: Vec<usize> = w.held.iter().map(|(i, _)| *i).collect();
                let (group, _) = w.acquire(idx).expect("acquire");
                assert_eq!(group.layers, idx..idx + 1);
                assert!(w.uploaded() <= resident, "resident {resident}: {} in slots", w.uploaded());
                copies += w.held.iter().filter(|(i, _)| !before.contains(i)).count();
                if resident == 2 {
                    // The next group is on its way while this one computes.
                    assert!(w.position((idx + 1) % 3).is_some(), "group {} not prefetched", (idx + 1) % 3);
                }
            }
            // Two waves over three groups: every acquire copies unless all three stay resident;
            // with two slots the next wave's first group is already on its way.
            let expected = if resident >= 3 { 3 } else { 6 + usize::from(resident == 2) };
            assert_eq!(copies, expected, "resident {resident}");
        }
    }

    #[test]
    fn streamed_scores_equal_all_resident_and_slots_are_reused() {
        let cfg = cfg(5);
        let b = Arc::new(CpuBackend::new());
        let ranges = [0..1, 1..3, 3..4, 4..5];
        let groups: Vec<DeviceGroup<CpuBackend>> = ranges.iter().map(|r| DeviceGroup::upload(&*b, &cfg, &random_group(&cfg, r.clone(), 9)).expect("upload")).collect();
        let doc = |i: usize| TokenizedDoc { index: i, id: format!("d{i}"), prompt: (1..17).collect(), choices: vec![vec![3, 4, 5], vec![6, 7]] };
        let batch = MicroBatch::build(&[doc(0), doc(1)]);
        let want = score_through(&groups, &*b, &cfg, &batch).expect("resident");
        for resident in [1, 2, 3, 4] {
            let host: Vec<HostGroup> = ranges.iter().map(|r| random_group(&cfg, r.clone(), 9)).collect();
            let mut w = WeightWindow::new(b.clone(), &cfg, host, resident).expect("window");
            for wave in 0..3 {
                let ctx = crate::model::RowCtx { positions: &batch.positions, spans: &batch.spans, cache_order: None };
                let (first, _) = w.acquire(0).expect("acquire");
                let mut x = first.embed(&*b, &batch.tokens).expect("embed");
                let mut got = vec![];
                for idx in 0..ranges.len() {
                    let (group, _) = w.acquire(idx).expect("acquire");
                    x = group.run_layers(&*b, &cfg, x, &ctx, None).expect("layers");
                    if idx + 1 == ranges.len() {
                        got = group.scored_logprobs(&*b, &cfg, &x, &batch.scored).expect("head");
                    }
                }
                assert_eq!(got, want, "resident {resident}, wave {wave}: streamed scores differ");
            }
            if resident < ranges.len() {
                assert!(!w.copies.is_empty(), "resident {resident}: released copies are traced");
            }
        }
    }
}
