//! Who runs which layers, and when (docs/DESIGN.md, "Schedule and planner"). Pure and
//! deterministic: every rank computes the same Schedule from the same inputs after an
//! allgather of capabilities.
//!
//! Files: plan.rs (cutting layers into groups under memory and speed), order.rs (each rank's
//! work order), cost.rs (cost model and workload), simulate.rs (discrete-event prediction),
//! tune.rs (choosing resident and group size by simulation), presets.rs (known models).

pub mod cost;
mod order;
mod plan;
pub mod presets;
pub mod simulate;
pub mod tune;
#[cfg(test)]
mod tests;

pub use order::Step;

use crate::config::{Family, ModelConfig};
use crate::model::{expected_tensors, Part};
use serde::Serialize;
use std::ops::Range;
use thiserror::Error;

/// What the planner needs to know about a model: sizes, not weights.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelShape {
    pub family: Family,
    pub n_layers: usize,
    /// Bytes of one decoder layer's weights (all layers of a family have the same shape).
    pub layer_bytes: u64,
    /// Embeddings.
    pub begin_bytes: u64,
    /// Final norm and LM head.
    pub end_bytes: u64,
    /// Parameters of one layer, for FLOP-derived costs.
    pub layer_params: u64,
    /// C
    pub hidden: usize,
    /// (H + 2 KV) D
    pub qkv_dim: usize,
    /// H D
    pub attn_dim: usize,
    /// F
    pub ffn: usize,
    /// V
    pub vocab: usize,
    /// Storage bytes per weight value.
    pub dtype_bytes: usize,
    pub max_position: usize,
}

impl ModelShape {
    /// Sizes from the family's own tensor table, so the planner never disagrees with the
    /// converter about what a part holds.
    pub fn from_config(cfg: &ModelConfig, dtype_bytes: usize) -> ModelShape {
        let params = |part| expected_tensors(cfg, part).iter().map(|(_, s)| s.iter().product::<usize>() as u64).sum::<u64>();
        let layer_params = params(Part::Layer(0));
        let bytes = |p: u64| p * dtype_bytes as u64;
        ModelShape {
            family: cfg.family,
            n_layers: cfg.n_layers,
            layer_bytes: bytes(layer_params),
            begin_bytes: bytes(params(Part::Begin)),
            end_bytes: bytes(params(Part::End)),
            layer_params,
            hidden: cfg.hidden_size,
            qkv_dim: cfg.qkv_dim(),
            attn_dim: cfg.n_heads * cfg.head_dim,
            ffn: cfg.intermediate_size,
            vocab: cfg.vocab_size,
            dtype_bytes,
            max_position: cfg.context_limit(),
        }
    }

    /// A model known by name (see presets::PRESETS).
    pub fn preset(name: &str) -> Option<ModelShape> {
        presets::preset(name).map(|(cfg, dt)| ModelShape::from_config(&cfg, dt))
    }

    pub fn total_bytes(&self) -> u64 {
        self.begin_bytes + self.end_bytes + self.layer_bytes * self.n_layers as u64
    }

    /// Peak device memory of one layer's forward over a micro-batch of `tokens` (f32
    /// activations): input, normed input, qkv, attention output, MLP inner and output, plus
    /// one head's score tile. Scoring keeps no KV cache between micro-batches, so the keys and
    /// values inside qkv are all the KV headroom it needs.
    pub fn working_bytes(&self, tokens: usize) -> u64 {
        let t = tokens as u64;
        let cols = (3 * self.hidden + self.qkv_dim + self.attn_dim + self.ffn) as u64;
        4 * t * cols + 4 * t * t
    }

    /// Bytes of one micro-batch's hidden states (f32), as received and sent.
    pub fn hidden_bytes(&self, tokens: usize) -> u64 {
        4 * tokens as u64 * self.hidden as u64
    }
}

/// One rank's capabilities, gathered from every rank before planning.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RankCaps {
    pub device_bytes: u64,
    /// Host memory this rank may pin; None when unknown (not checked).
    pub host_bytes: Option<u64>,
    /// Relative compute speed (1.0 = the reference device of the cost model).
    pub speed: f64,
    /// Device kind, for messages ("RTX 3090", "cpu").
    pub device: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ScheduleOptions {
    /// Most layers in one group; None: as many as fit `resident` times in device memory.
    pub group_layers: Option<usize>,
    /// Groups kept on the device at once per rank; 2 double-buffers (copy the next group
    /// while computing the current one).
    pub resident: usize,
    /// Micro-batches per wave; None: 4 per rank, enough to keep the ring full.
    pub wave: Option<usize>,
    /// Token budget of a micro-batch (sizes the activation memory).
    pub batch_tokens: usize,
    /// Per-rank speed overriding RankCaps::speed (heterogeneous ranks).
    pub rank_speed: Option<Vec<f64>>,
    /// Device memory kept free for the runtime (CUDA context, library workspaces).
    pub reserve_bytes: u64,
}

impl Default for ScheduleOptions {
    fn default() -> Self {
        ScheduleOptions { group_layers: None, resident: 2, wave: None, batch_tokens: 2048, rank_speed: None, reserve_bytes: 1 << 30 }
    }
}

/// Consecutive layers that run together on one rank; begin rides with the first group, end
/// with the last.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Group {
    pub index: usize,
    pub layers: Range<usize>,
    pub owner: usize,
    pub has_begin: bool,
    pub has_end: bool,
    pub bytes: u64,
}

impl Group {
    /// The model parts (files) this group reads, in order.
    pub fn parts(&self) -> Vec<Part> {
        let mut v = vec![];
        if self.has_begin {
            v.push(Part::Begin);
        }
        v.extend(self.layers.clone().map(Part::Layer));
        if self.has_end {
            v.push(Part::End);
        }
        v
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Schedule {
    pub shape: ModelShape,
    pub ranks: Vec<RankCaps>,
    /// Speeds the groups were balanced for.
    pub speeds: Vec<f64>,
    pub groups: Vec<Group>,
    /// Per rank: its groups in execution order (ascending: the order activations arrive).
    pub rank_groups: Vec<Vec<usize>>,
    pub resident: usize,
    pub wave: usize,
    pub batch_tokens: usize,
    /// Planned peak device bytes per rank: resident weights + activations + reserve.
    pub device_bytes: Vec<u64>,
    /// Planned host bytes per rank: pinned weights of swapped groups + waiting activations.
    pub host_bytes: Vec<u64>,
    /// Device bytes for activations of one micro-batch (working set and in/out buffers).
    pub activation_bytes: u64,
    /// The options it was planned with: planning again with these gives the same Schedule.
    pub options: ScheduleOptions,
}

#[derive(Debug, Error, PartialEq)]
pub enum ScheduleError {
    #[error("no ranks to plan for")]
    NoRanks,
    #[error("{option}: {msg}")]
    BadOption { option: &'static str, msg: String },
    #[error("{ranks} ranks but only {layers} layers: every rank needs at least one layer; use at most {layers} ranks")]
    TooManyRanks { ranks: usize, layers: usize },
    #[error("rank {rank}: {msg}")]
    DeviceTooSmall { rank: usize, msg: String },
    #[error("rank {rank}: --group-layers {requested} does not fit: at most {max} layers per group fit ({why})")]
    GroupTooLarge { rank: usize, requested: usize, max: usize, why: String },
    #[error("rank {rank}: needs {need} of host memory, has {have}; {hint}")]
    HostTooSmall { rank: usize, need: String, have: String, hint: String },
}

/// Bytes in decimal units, the ones people buy GPUs in (GB unless that would read 0.0).
pub fn gb(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e8 {
        format!("{:.1} GB", b / 1e9)
    } else if b >= 1e5 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.1} KB", b / 1e3)
    }
}

impl Schedule {
    /// Cut the model into groups and assign them to ranks; see plan.rs.
    pub fn plan(model: &ModelShape, ranks: &[RankCaps], opts: &ScheduleOptions) -> Result<Schedule, ScheduleError> {
        plan::plan(model, ranks, opts)
    }

    pub fn n_ranks(&self) -> usize {
        self.ranks.len()
    }

    /// Whether the rank's groups outnumber its device slots, so it copies weights every wave.
    pub fn swaps(&self, rank: usize) -> bool {
        self.rank_groups[rank].len() > self.resident
    }

    /// The rank that runs `group`.
    pub fn owner(&self, group: usize) -> usize {
        self.groups[group].owner
    }

    /// "rank r: layers a-b, c-d; resident n; host X GB; device Y GB"
    pub fn describe_rank(&self, rank: usize) -> String {
        format!("rank {rank}: {}", self.describe_layers(rank))
    }

    /// [`Schedule::describe_rank`] without the rank: for a line the message channel prefixes.
    pub fn describe_layers(&self, rank: usize) -> String {
        let ranges: Vec<String> = self.rank_groups[rank]
            .iter()
            .map(|&g| {
                let l = &self.groups[g].layers;
                if l.len() == 1 {
                    format!("{}", l.start)
                } else {
                    format!("{}-{}", l.start, l.end - 1)
                }
            })
            .collect();
        let resident = self.resident.min(self.rank_groups[rank].len());
        format!(
            "layers {}; resident {resident}; host {}; device {}",
            ranges.join(", "),
            gb(self.host_bytes[rank]),
            gb(self.device_bytes[rank])
        )
    }

    /// The model parts `rank` reads ("begin", "layer_007", "end"), in order.
    pub fn parts_for_rank(&self, rank: usize) -> Vec<String> {
        self.rank_groups[rank].iter().flat_map(|&g| self.groups[g].parts()).map(|p| p.name()).collect()
    }

    /// Micro-batches per wave for a run of `micro_batches`: full waves, then the remainder.
    pub fn wave_sizes(&self, micro_batches: usize) -> Vec<usize> {
        let mut v = vec![self.wave; micro_batches / self.wave];
        if micro_batches % self.wave != 0 {
            v.push(micro_batches % self.wave);
        }
        v
    }
}
