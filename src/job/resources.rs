//! A rank's share of its node, and what it offers the planner: the device's name and the
//! memory it has for weights; for CPU ranks, threads and memory split among the node's ranks.

/// What a rank offers: its device and the memory it has for weights.
pub struct DeviceInfo {
    pub name: String,
    pub memory_bytes: u64,
}

/// What the launcher and the user said about this node's share, read once at start
/// (settings::Settings::from_env); the default is one rank alone, nothing forced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeShare {
    /// Ranks of this job on this node (Open MPI's OMPI_COMM_WORLD_LOCAL_SIZE; 1 without mpirun).
    pub local_ranks: usize,
    /// Threads a CPU rank computes with, when the user chose (RAYON_NUM_THREADS).
    pub forced_threads: Option<usize>,
}

impl Default for NodeShare {
    fn default() -> Self {
        NodeShare { local_ranks: 1, forced_threads: None }
    }
}

/// The threads a CPU rank computes with, and a warning when the launcher left it fewer CPUs
/// than its share of the node.
pub struct CpuShare {
    pub threads: usize,
    pub warning: Option<String>,
}

/// Threads for a CPU rank. A rank bound to its own CPUs (srun's binding, or Open MPI's
/// `--bind-to core`) uses them all; ranks that share one CPU set (no binding, or a job's
/// cgroup) split it by the node's rank count. RAYON_NUM_THREADS, when set, wins.
pub fn cpu_threads_per_rank(node: &NodeShare) -> CpuShare {
    let allowed = allowed_cpus();
    let offered = offered_cpus().max(allowed.len());
    cpu_share(&allowed, offered, node.local_ranks, node.forced_threads)
}

/// The rule behind cpu_threads_per_rank: `allowed` the CPUs this process may run on,
/// `offered` how many the node gives the job's processes, `local` the job's ranks on the node.
pub fn cpu_share(allowed: &[usize], offered: usize, local: usize, forced: Option<usize>) -> CpuShare {
    let (a, local) = (allowed.len().max(1), local.max(1));
    // A set narrower than the node's, with room for every local rank to have one like it:
    // the launcher bound this rank to CPUs of its own.
    let own_set = a < offered && a * local <= offered;
    let threads = forced.unwrap_or(if own_set { a } else { (a / local).max(1) });
    let share = (offered / local).max(1);
    let warning = (a < share).then(|| {
        format!(
            "this rank may run only on CPU {} ({a} of the {offered} this node offers; its share is {share}), so it \
             computes with {threads} thread{}: the launcher bound it (Open MPI binds each rank to one core when -np \
             is 2 or less); pass --bind-to none to mpirun, or give srun --cpus-per-task={share}",
            cpu_list_text(allowed),
            if threads == 1 { "" } else { "s" }
        )
    });
    CpuShare { threads, warning }
}

/// The CPUs this process may run on (its affinity mask).
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it for this process (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return (0..std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)).collect();
        }
        (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
    }
}

/// How many CPUs the node gives this job's processes: the cgroup's cpuset when there is one
/// (a Slurm job's, a container's), else every online CPU.
fn offered_cpus() -> usize {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok().and_then(|c| {
        let path = c.lines().find_map(|l| l.strip_prefix("0::"))?.trim().to_string();
        std::fs::read_to_string(format!("/sys/fs/cgroup{path}/cpuset.cpus.effective")).ok()
    });
    match cgroup.as_deref().map(parse_cpu_list) {
        Some(cpus) if !cpus.is_empty() => cpus.len(),
        // SAFETY: sysconf reads a system constant.
        _ => usize::try_from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }).unwrap_or(1).max(1),
    }
}

/// "0-3,8,10-11" as the CPUs it names.
fn parse_cpu_list(text: &str) -> Vec<usize> {
    let mut cpus = vec![];
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(lo), Ok(hi)) = (lo.trim().parse::<usize>(), hi.trim().parse::<usize>()) {
            cpus.extend(lo..=hi);
        }
    }
    cpus
}

/// CPUs written as ranges: [0, 1, 2, 5] as "0-2,5".
fn cpu_list_text(cpus: &[usize]) -> String {
    let mut parts: Vec<String> = vec![];
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        parts.push(if i == j { cpus[i].to_string() } else { format!("{}-{}", cpus[i], cpus[j]) });
        i = j + 1;
    }
    parts.join(",")
}

/// Memory a CPU rank may use for weights: what the node has available, shared by its ranks.
pub fn cpu_memory_per_rank(node: &NodeShare) -> u64 {
    let available_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find(|l| l.starts_with("MemAvailable:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .unwrap_or(8 << 20);
    available_kb * 1024 / node.local_ranks.max(1) as u64
}

#[cfg(test)]
mod tests {
    use super::{cpu_list_text, cpu_share, parse_cpu_list};

    #[test]
    fn cpu_lists_read_and_write() {
        assert_eq!(parse_cpu_list("0-2,5\n"), vec![0, 1, 2, 5]);
        assert_eq!(cpu_list_text(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
    }

    #[test]
    fn ranks_sharing_the_node_split_it() {
        let all: Vec<usize> = (0..16).collect();
        let s = cpu_share(&all, 16, 4, None);
        assert_eq!((s.threads, s.warning.is_none()), (4, true));
    }

    #[test]
    fn a_rank_bound_to_its_own_cpus_uses_them() {
        // srun --cpus-per-task=4 with 4 tasks on a 16-CPU node: each task's own 4 CPUs.
        let s = cpu_share(&[4, 5, 6, 7], 16, 4, None);
        assert_eq!((s.threads, s.warning.is_none()), (4, true));
    }

    #[test]
    fn a_rank_bound_to_one_core_of_its_share_is_told() {
        // mpirun -np 2 on two 16-CPU hosts: Open MPI binds each rank to core 0.
        let s = cpu_share(&[0], 16, 1, None);
        assert_eq!(s.threads, 1);
        let w = s.warning.expect("a warning");
        assert!(w.contains("CPU 0 (1 of the 16") && w.contains("--bind-to none"), "{w}");
        // RAYON_NUM_THREADS decides the threads, not whether the binding is worth a word.
        assert!(cpu_share(&[0], 2, 1, Some(1)).warning.is_some());
        assert!(cpu_share(&[0], 2, 2, Some(1)).warning.is_none());
    }
}
