//! Each rank's order of work: FlexGen's zig-zag. A rank runs every micro-batch of a wave
//! through its current group before moving to its next group, so one weight copy serves the
//! whole wave; the copy of a later group is issued as soon as a slot frees, and runs on the
//! copy engine while this rank computes and while the others hold the activations.

use super::Schedule;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Start copying `group`'s weights from host memory into device slot `slot`, replacing
    /// the group that was there. Asynchronous: only the first Compute on `group` waits for it.
    Load { group: usize, slot: usize },
    /// Run micro-batch `micro` of wave `wave` through `group`. Its input comes from the
    /// previous group's owner (none for group 0); its output goes to the next group's owner.
    Compute { group: usize, wave: usize, micro: usize },
}

impl Schedule {
    /// Every step `rank` takes over a run whose waves hold `wave_sizes` micro-batches each
    /// (see `wave_sizes`). The pipeline executes this list and the simulator replays it, so
    /// the prediction is of the order that actually runs.
    pub fn work_order(&self, rank: usize, wave_sizes: &[usize]) -> Vec<Step> {
        let mine = &self.rank_groups[rank];
        let k = mine.len();
        let r = self.resident;
        let mut out = vec![];
        if k == 0 {
            return out;
        }
        // Position j in the rank's cyclic sequence of groups across waves lives in slot j mod r.
        let total = if k > r { k * wave_sizes.len() } else { k };
        for j in 0..r.min(total) {
            out.push(Step::Load { group: mine[j % k], slot: j % r });
        }
        for (w, &micro_batches) in wave_sizes.iter().enumerate() {
            for (i, &group) in mine.iter().enumerate() {
                out.extend((0..micro_batches).map(|micro| Step::Compute { group, wave: w, micro }));
                let next = w * k + i + r;
                if k > r && next < total {
                    out.push(Step::Load { group: mine[next % k], slot: next % r });
                }
            }
        }
        out
    }
}
