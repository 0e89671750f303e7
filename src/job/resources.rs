//! A rank's share of its node, and what it offers the planner: the device's name and the
//! memory it has for weights; for CPU ranks, threads and memory split among the node's ranks.

/// What a rank offers: its device and the memory it has for weights.
pub struct DeviceInfo {
    pub name: String,
    pub memory_bytes: u64,
    /// Bytes the backend keeps per weight element when that differs from the manifest's dtype
    /// (the CPU backend widens every weight to f32: 4); None: stored as in the files.
    pub held_weight_bytes: Option<usize>,
}

/// Ranks of this job on this node (Open MPI tells each process; 1 without mpirun).
pub fn local_ranks() -> u64 {
    std::env::var("OMPI_COMM_WORLD_LOCAL_SIZE").ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or(1).max(1)
}

/// Threads for a CPU rank: the node's cores shared by its ranks, so that several ranks per
/// node do not each take every core. RAYON_NUM_THREADS, when set, wins.
pub fn cpu_threads_per_rank() -> usize {
    if let Some(n) = std::env::var("RAYON_NUM_THREADS").ok().and_then(|v| v.parse::<usize>().ok()).filter(|&n| n > 0) {
        return n;
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    (cores / local_ranks() as usize).max(1)
}

/// Memory a CPU rank may use for weights: what the node has available, shared by its ranks.
pub fn cpu_memory_per_rank() -> u64 {
    let available_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find(|l| l.starts_with("MemAvailable:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .unwrap_or(8 << 20);
    available_kb * 1024 / local_ranks()
}

/// Memory of `bytes` for weights held at `held` bytes per element, counted in `stored`-byte
/// elements as the schedule counts them.
pub fn scale_for_widening(bytes: u64, stored: usize, held: usize) -> u64 {
    (bytes as u128 * stored as u128 / held.max(1) as u128) as u64
}

#[cfg(test)]
mod tests {
    use super::scale_for_widening;

    #[test]
    fn widened_weights_count_in_stored_bytes() {
        // 64 GiB holding bf16 weights widened to f32 fits 32 GiB of bf16 files.
        assert_eq!(scale_for_widening(64 << 30, 2, 4), 32 << 30);
        assert_eq!(scale_for_widening(64 << 30, 4, 4), 64 << 30);
    }
}
