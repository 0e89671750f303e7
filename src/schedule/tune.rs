//! Choosing resident and group size by simulation. Memory alone prefers the biggest groups
//! that fit `resident` times, but which `resident` wins depends on the links: double buffering
//! hides weight copies, yet halves the group size, which doubles the activation hops between
//! ranks. On 1 GbE the hops cost more than the copies, on a fast network the opposite.

use super::cost::{CostModel, Workload};
use super::simulate::{simulate, SimError, SimReport};
use super::{Schedule, ScheduleError, ScheduleOptions};
use super::{ModelShape, RankCaps};
use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum TuneError {
    /// No candidate fits; the error of the first one says why.
    #[error(transparent)]
    Plan(#[from] ScheduleError),
    #[error(transparent)]
    Sim(#[from] SimError),
}

/// One configuration tried.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub resident: usize,
    pub group_layers: usize,
    pub docs_per_hour: f64,
}

pub struct Tuned {
    pub schedule: Schedule,
    pub report: SimReport,
    /// Every configuration that fits, best first.
    pub candidates: Vec<Candidate>,
}

/// Residents to consider when the caller leaves it open: beyond 3 a slot holds so little
/// that hops dominate everywhere.
const RESIDENTS: [usize; 3] = [1, 2, 3];

/// Best throughput over `residents` (or the given one) and every group size that fits
/// (or the given cap). Near-ties go to the earlier candidate, so the choice is deterministic.
pub fn tune(
    model: &ModelShape,
    ranks: &[RankCaps],
    opts: &ScheduleOptions,
    cost: &CostModel,
    work: &Workload,
    free_resident: bool,
    free_group: bool,
) -> Result<Tuned, TuneError> {
    let residents: Vec<usize> = if free_resident { RESIDENTS.to_vec() } else { vec![opts.resident] };
    let mut first_err = None;
    let mut best: Option<(Schedule, SimReport)> = None;
    let mut candidates = vec![];
    for resident in residents {
        let base = ScheduleOptions { resident, ..opts.clone() };
        let biggest = match Schedule::plan(model, ranks, &base) {
            Ok(s) => s.groups.iter().map(|g| g.layers.len()).max().unwrap_or(1),
            Err(e) => {
                first_err.get_or_insert(e);
                continue;
            }
        };
        let sizes: Vec<Option<usize>> = if free_group { (1..=biggest).rev().map(Some).collect() } else { vec![opts.group_layers] };
        for group_layers in sizes {
            let o = ScheduleOptions { group_layers, ..base.clone() };
            let s = match Schedule::plan(model, ranks, &o) {
                Ok(s) => s,
                Err(e) => {
                    first_err.get_or_insert(e);
                    continue;
                }
            };
            let rep = simulate(&s, cost, work)?;
            let k = group_layers.unwrap_or_else(|| s.groups.iter().map(|g| g.layers.len()).max().unwrap_or(1));
            candidates.push(Candidate { resident, group_layers: k, docs_per_hour: rep.docs_per_hour });
            // Within half a percent the earlier (bigger) groups stay: fewer hops and copies
            // leave more margin when the real links are slower than modelled.
            if best.as_ref().is_none_or(|(_, b)| rep.docs_per_hour > b.docs_per_hour * 1.005) {
                best = Some((s, rep));
            }
        }
    }
    candidates.sort_by(|a, b| b.docs_per_hour.total_cmp(&a.docs_per_hour));
    candidates.dedup_by(|a, b| a.resident == b.resident && a.group_layers == b.group_layers);
    match best {
        Some((schedule, report)) => Ok(Tuned { schedule, report, candidates }),
        None => Err(first_err.map(TuneError::Plan).unwrap_or(TuneError::Plan(ScheduleError::NoRanks))),
    }
}
