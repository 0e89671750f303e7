//! Cutting the layers into groups.
//!
//! Each rank's device holds `resident` equal slots after the reserve and the activations;
//! a group must fit one slot of its owner (the first group carries begin, the last end). The
//! planner takes the fewest groups that fit: bigger groups mean fewer weight copies and fewer
//! network hops per document. Within that, layer counts follow rank speed so every group takes
//! about the same time, which keeps the ring from waiting on its slowest member. Group g runs
//! on rank g mod N. Counts that are a multiple of N come first, as every rank then carries
//! its share of groups; where none fits (5 layers of one layer per group on 2 ranks, 80 on 3)
//! the other counts follow, ranks owning one group more or less: 5 groups, 3 on rank 0 and 2
//! on rank 1.

use super::{gb, Group, ModelShape, RankCaps, Schedule, ScheduleError, ScheduleOptions};

pub(super) fn plan(model: &ModelShape, ranks: &[RankCaps], opts: &ScheduleOptions) -> Result<Schedule, ScheduleError> {
    let n = ranks.len();
    if n == 0 {
        return Err(ScheduleError::NoRanks);
    }
    check_options(model, ranks, opts)?;
    if n > model.n_layers {
        return Err(ScheduleError::TooManyRanks { ranks: n, layers: model.n_layers });
    }
    let speeds: Vec<f64> = match &opts.rank_speed {
        Some(s) => s.clone(),
        None => ranks.iter().map(|r| r.speed).collect(),
    };
    let wave = opts.wave.unwrap_or(4 * n);
    let r = opts.resident;
    // Two hidden-state buffers: the micro-batch being received and the one being sent.
    let activation_bytes = model.working_bytes(opts.batch_tokens) + 2 * model.hidden_bytes(opts.batch_tokens);
    let slots: Vec<u64> = ranks
        .iter()
        .enumerate()
        .map(|(i, rank)| slot_bytes(model, rank, i, opts, activation_bytes))
        .collect::<Result<_, _>>()?;
    let mut caps: Vec<usize> = slots.iter().map(|s| (s / model.layer_bytes) as usize).collect();
    if let Some(k) = opts.group_layers {
        for (rank, &cap) in caps.iter().enumerate() {
            if k > cap {
                let why = format!("{} per layer, {} of device memory, resident {r}", gb(model.layer_bytes), gb(ranks[rank].device_bytes));
                return Err(ScheduleError::GroupTooLarge { rank, requested: k, max: cap, why });
            }
        }
        caps.iter_mut().for_each(|c| *c = k);
    }

    // First the fewest groups whose speed-proportional sizes fit every rank's cap; if speeds
    // are too uneven for that, the fewest groups that fit at all.
    let mut last_err = None;
    let counts: Vec<usize> = (1..=model.n_layers / n).map(|k| k * n).chain((n..=model.n_layers).filter(|g| g % n != 0)).collect();
    for balanced in [true, false] {
        for &g_count in &counts {
            match cut(model, &speeds, &caps, &slots, g_count, balanced) {
                Ok(sizes) => {
                    let sched = assemble(model, ranks, speeds, &sizes, opts, wave, activation_bytes);
                    check_host(model, &sched)?;
                    return Ok(sched);
                }
                Err(e) => last_err = last_err.or(e),
            }
        }
    }
    Err(last_err.unwrap_or(ScheduleError::TooManyRanks { ranks: n, layers: model.n_layers }))
}

fn check_options(model: &ModelShape, ranks: &[RankCaps], opts: &ScheduleOptions) -> Result<(), ScheduleError> {
    let bad = |option, msg: String| Err(ScheduleError::BadOption { option, msg });
    if opts.resident == 0 {
        return bad("--resident", "must be at least 1".into());
    }
    if opts.wave == Some(0) {
        return bad("--wave", "must be at least 1".into());
    }
    if opts.group_layers == Some(0) {
        return bad("--group-layers", "must be at least 1".into());
    }
    if opts.batch_tokens == 0 {
        return bad("--batch-tokens", "must be at least 1".into());
    }
    if opts.batch_tokens > model.max_position * 64 {
        return bad("--batch-tokens", format!("{} is implausibly large for a context of {}", opts.batch_tokens, model.max_position));
    }
    if let Some(s) = &opts.rank_speed {
        if s.len() != ranks.len() {
            return bad("--rank-speed", format!("{} speeds for {} ranks", s.len(), ranks.len()));
        }
    }
    let speeds = opts.rank_speed.clone().unwrap_or_else(|| ranks.iter().map(|r| r.speed).collect());
    if let Some(s) = speeds.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
        return bad("--rank-speed", format!("speeds must be positive, got {s}"));
    }
    Ok(())
}

/// Device bytes of one weight slot on `rank`; an error says what would fit instead.
fn slot_bytes(model: &ModelShape, rank: &RankCaps, i: usize, opts: &ScheduleOptions, act: u64) -> Result<u64, ScheduleError> {
    let fixed = opts.reserve_bytes + act;
    let weights = rank.device_bytes.saturating_sub(fixed);
    let slot = weights / opts.resident as u64;
    if slot >= model.layer_bytes {
        return Ok(slot);
    }
    let need = fixed + model.layer_bytes * opts.resident as u64;
    let mut msg = format!(
        "{} of device memory holds no group: {} resident x one layer ({}) + activations ({} at --batch-tokens {}) + reserve ({}) need {}",
        gb(rank.device_bytes),
        opts.resident,
        gb(model.layer_bytes),
        gb(act),
        opts.batch_tokens,
        gb(opts.reserve_bytes),
        gb(need)
    );
    if opts.resident > 1 && weights >= model.layer_bytes {
        msg.push_str("; --resident 1 would fit");
    }
    Err(ScheduleError::DeviceTooSmall { rank: i, msg })
}

/// Layer counts of `g_count` groups (at least one per rank): proportional to the owner's
/// speed, within each group's cap (the first and last groups lose room to begin and end).
/// With `balanced`, a target beyond its rank's cap rejects this group count (Err(None): try
/// more groups).
fn cut(
    model: &ModelShape,
    speeds: &[f64],
    caps: &[usize],
    slots: &[u64],
    g_count: usize,
    balanced: bool,
) -> Result<Vec<usize>, Option<ScheduleError>> {
    let n = speeds.len();
    let last = g_count - 1;
    let mut cap: Vec<usize> = (0..g_count).map(|g| caps[g % n]).collect();
    for (g, extra, what) in [(0, model.begin_bytes, "begin"), (last, model.end_bytes, "end")] {
        let room = slots[g % n].saturating_sub(extra + if g == 0 && last == 0 { model.end_bytes } else { 0 });
        cap[g] = cap[g].min((room / model.layer_bytes) as usize);
        if cap[g] == 0 {
            let msg = format!(
                "a weight slot of {} cannot hold {what} ({}) and one layer ({}); give that rank more device memory or lower --resident",
                gb(slots[g % n]),
                gb(extra),
                gb(model.layer_bytes)
            );
            return Err(Some(ScheduleError::DeviceTooSmall { rank: g % n, msg }));
        }
    }
    let total_speed: f64 = (0..g_count).map(|g| speeds[g % n]).sum();
    let target: Vec<f64> = (0..g_count).map(|g| model.n_layers as f64 * speeds[g % n] / total_speed).collect();
    if balanced && (0..g_count).any(|g| target[g] > caps[g % n] as f64) {
        return Err(None);
    }
    let mut size: Vec<usize> = (0..g_count).map(|g| (target[g].floor() as usize).clamp(1, cap[g])).collect();
    let mut assigned: usize = size.iter().sum();
    // Hand out the remainder one layer at a time to the group furthest below its target
    // (ties to the lower index, so every rank computes the same cut).
    while assigned < model.n_layers {
        let pick = (0..g_count).filter(|&g| size[g] < cap[g]).max_by(|&a, &b| {
            let (da, db) = (target[a] - size[a] as f64, target[b] - size[b] as f64);
            da.total_cmp(&db).then(b.cmp(&a))
        });
        match pick {
            Some(g) => size[g] += 1,
            None => {
                let max = caps.iter().max().copied().unwrap_or(0);
                let msg = format!("{g_count} groups of at most {max} layers cannot hold {} layers", model.n_layers);
                return Err(Some(ScheduleError::DeviceTooSmall { rank: 0, msg }));
            }
        }
        assigned += 1;
    }
    while assigned > model.n_layers {
        let pick = (0..g_count).filter(|&g| size[g] > 1).max_by(|&a, &b| {
            let (da, db) = (size[a] as f64 - target[a], size[b] as f64 - target[b]);
            da.total_cmp(&db).then(b.cmp(&a))
        });
        match pick {
            Some(g) => size[g] -= 1,
            None => return Err(Some(ScheduleError::TooManyRanks { ranks: n, layers: model.n_layers })),
        }
        assigned -= 1;
    }
    Ok(size)
}

fn assemble(
    model: &ModelShape,
    ranks: &[RankCaps],
    speeds: Vec<f64>,
    sizes: &[usize],
    opts: &ScheduleOptions,
    wave: usize,
    activation_bytes: u64,
) -> Schedule {
    let n = ranks.len();
    let mut groups = Vec::with_capacity(sizes.len());
    let mut start = 0;
    for (g, &len) in sizes.iter().enumerate() {
        let (has_begin, has_end) = (g == 0, g + 1 == sizes.len());
        let bytes = len as u64 * model.layer_bytes
            + if has_begin { model.begin_bytes } else { 0 }
            + if has_end { model.end_bytes } else { 0 };
        groups.push(Group { index: g, layers: start..start + len, owner: g % n, has_begin, has_end, bytes });
        start += len;
    }
    let rank_groups: Vec<Vec<usize>> = (0..n).map(|r| (r..groups.len()).step_by(n).collect()).collect();
    let waiting = wave as u64 * model.hidden_bytes(opts.batch_tokens);
    let mut device_bytes = vec![];
    let mut host_bytes = vec![];
    for mine in &rank_groups {
        let k = mine.len();
        let window = opts.resident.min(k);
        // Peak resident weights: the heaviest run of `window` consecutive groups in the
        // rank's cyclic order (the last group of a wave sits next to the first of the next).
        let peak = (0..k).map(|i| (0..window).map(|j| groups[mine[(i + j) % k]].bytes).sum::<u64>()).max().unwrap_or(0);
        device_bytes.push(peak + activation_bytes + opts.reserve_bytes);
        let pinned: u64 = if k > opts.resident { mine.iter().map(|&g| groups[g].bytes).sum() } else { 0 };
        host_bytes.push(pinned + waiting);
    }
    Schedule {
        shape: model.clone(),
        ranks: ranks.to_vec(),
        speeds,
        groups,
        rank_groups,
        resident: opts.resident,
        wave,
        batch_tokens: opts.batch_tokens,
        device_bytes,
        host_bytes,
        activation_bytes,
        options: opts.clone(),
    }
}

fn check_host(model: &ModelShape, s: &Schedule) -> Result<(), ScheduleError> {
    for (rank, caps) in s.ranks.iter().enumerate() {
        let Some(have) = caps.host_bytes else { continue };
        let need = s.host_bytes[rank];
        if need <= have {
            continue;
        }
        // Each rank must pin its share of the weights beyond what its device keeps.
        let min_ranks = model.total_bytes().div_ceil(have.max(1));
        let hint = format!(
            "with {} per rank at least {min_ranks} ranks are needed, or keep all of a rank's groups on the device (--resident {})",
            gb(have),
            s.rank_groups[rank].len()
        );
        return Err(ScheduleError::HostTooSmall { rank, need: gb(need), have: gb(have), hint });
    }
    Ok(())
}
