//! How weights reach the device: uploaded once (`upload_weight`), or streamed group by group
//! through a few device slots (docs/DESIGN.md, "Weight streaming").

use super::ops::Ops;
use super::{uniform_bf16, CopySpan, Result};
use crate::tensor::HostTensor;
use std::sync::Arc;

/// pin (once per group, at start) -> prefetch into a free slot (returns at once) -> wait where
/// compute reaches the group -> compute -> release after its last op, which makes the slot free
/// for the next prefetch. A slot is a value: it exists only while no weight reads its memory
/// (release consumes the weights), so a copy can never overwrite weights still in use.
pub trait WeightStream: Ops {
    /// A group's weights in host memory, converted once to what the device computes with
    /// (CPU: f32; CUDA: bf16 matrices and f32 vectors, page-locked), read by every copy.
    type Pinned: Send + Sync;
    /// Device memory for one group, handed from one copy to the next.
    type Slot: Send;
    /// A copy into a slot, started by `prefetch`: the event compute waits on, then the
    /// group's record of residency until `release`.
    type Transfer: Send;

    /// A weight kept on the device for the whole run.
    fn upload_weight(&self, t: &HostTensor) -> Result<Self::Weight>;

    /// A synthetic weight of `shape`, uniform in [lo, hi) from a hash of (seed, index),
    /// values rounded to bf16: every backend makes the same values (`uniform_bf16`).
    /// Backends override this to make them where they live (no host traffic).
    fn random_weight(&self, shape: &[usize], seed: u64, lo: f32, hi: f32) -> Result<Self::Weight> {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n as u64).map(|i| uniform_bf16(seed, i, lo, hi)).collect();
        self.upload_weight(&HostTensor::from_f32(shape.to_vec(), &values))
    }

    /// Converts `tensors` (a group's, in a fixed order) for streaming. Costs host time and
    /// memory once per group.
    fn pin(&self, tensors: &[HostTensor]) -> Result<Self::Pinned>;
    /// Starts copying `group` into `slot` (None: fresh memory) off the compute path (the
    /// CPU's copy thread, CUDA's copy stream) and returns at once. A caller that will not
    /// copy the group again hands over its last reference: the CPU then moves the group into
    /// the slot instead of copying it (CUDA copies either way).
    fn prefetch(&self, group: Arc<Self::Pinned>, slot: Option<Self::Slot>) -> Result<Self::Transfer>;
    /// Called where compute reaches the group: orders what follows after the copy (the CPU
    /// blocks until its copy thread is done; CUDA's compute stream waits on the copy's
    /// event, the host does not) and hands over the weights, in `pin`'s order. A second
    /// call on the same transfer is refused.
    fn wait(&self, transfer: &mut Self::Transfer) -> Result<Vec<Self::Weight>>;
    /// After the last op that reads `weights` (all of the transfer's, as `wait` gave them):
    /// their memory becomes a slot again. CUDA records an event on the compute stream here,
    /// which the next copy into the slot waits for. Weights of another transfer, or missing
    /// ones, are refused. Also returns when the copy ran on the host clock, where known.
    fn release(&self, transfer: Self::Transfer, weights: Vec<Self::Weight>) -> Result<(Self::Slot, Option<CopySpan>)>;
}
