//! The environment, read once. Every variable the program itself reads is read here, by
//! [`Settings::from_env`], which main calls once at start; the library is handed the values
//! (README.md, "Environment variables", lists them all).

use crate::job::fault::Faults;
use crate::job::resources::NodeShare;
use crate::pipeline::{singleton_env, ClusterSettings};
use std::path::PathBuf;
use std::time::Duration;

/// Everything the environment says to this process.
#[derive(Clone, Debug)]
pub struct Settings {
    /// MPI start-up: local rank, peer timeout, MPI progress, a singleton's Open MPI settings.
    pub cluster: ClusterSettings,
    /// This node's share: ranks on it, threads forced.
    pub node: NodeShare,
    /// Every CUDA op waits for itself, so a fault names the op (FALCON_CUDA_SYNC_EACH_OP=1).
    pub cuda_sync_each_op: bool,
    /// The restart tests' fault hooks.
    pub faults: Faults,
    /// The model when `--model` is not given (FALCON_BATCH_MODEL; empty = unset).
    pub model: Option<PathBuf>,
    /// The batch scheduler's job id (SLURM_JOB_ID; empty = unset): a requeued job takes over
    /// the output lock its previous run left.
    pub batch_job: Option<String>,
    /// This process is rank 0 of its launcher (OMPI_COMM_WORLD_RANK, PMIX_RANK, PMI_RANK or
    /// SLURM_PROCID, the first one set), or was started without one: it prints the job's
    /// one-time lines and reads a corpus from standard input.
    pub first_rank: bool,
    /// Where a corpus read once (standard input, a pipe) is copied (TMPDIR, else /tmp).
    pub temp_dir: PathBuf,
}

impl Default for Settings {
    /// A process started alone with nothing set.
    fn default() -> Self {
        Settings {
            cluster: ClusterSettings::default(),
            node: NodeShare::default(),
            cuda_sync_each_op: false,
            faults: Faults::default(),
            model: None,
            batch_job: None,
            first_rank: true,
            temp_dir: PathBuf::from("/tmp"),
        }
    }
}

impl Settings {
    /// Read the environment; main calls this once, before anything else runs.
    pub fn from_env() -> Settings {
        Settings::from_vars(|name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned()))
    }

    /// The settings `var` (a variable's value, None when unset) gives: the rules, apart from
    /// where the values come from.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Settings {
        let parsed = |name: &str| var(name).and_then(|v| v.parse::<u64>().ok());
        let non_empty = |name: &str| var(name).filter(|v| !v.is_empty());
        let defaults = Settings::default();
        let cluster = ClusterSettings {
            local_rank: var("OMPI_COMM_WORLD_LOCAL_RANK").or_else(|| var("SLURM_LOCALID")).and_then(|v| v.parse().ok()).unwrap_or(0),
            peer_timeout: var("FALCON_BATCH_PEER_TIMEOUT_S")
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|s| *s > 0.0 && s.is_finite())
                .map(Duration::from_secs_f64)
                .unwrap_or(defaults.cluster.peer_timeout),
            progress_every: parsed("FALCON_BATCH_PROGRESS_US").map(Duration::from_micros).unwrap_or(defaults.cluster.progress_every),
            singleton_env: singleton_env(|name| var(name).is_some()),
        };
        let node = NodeShare {
            local_ranks: parsed("OMPI_COMM_WORLD_LOCAL_SIZE").map(|n| (n as usize).max(1)).unwrap_or(1),
            forced_threads: var("RAYON_NUM_THREADS").and_then(|v| v.parse::<usize>().ok()).filter(|&n| n > 0),
        };
        let faults = Faults {
            kill_after_docs: var("FALCON_BATCH_KILL_AFTER_DOCS").and_then(|v| v.parse().ok()),
            term_after_docs: var("FALCON_BATCH_TERM_AFTER_DOCS").and_then(|v| v.parse().ok()),
            hold_wave_ms: var("FALCON_BATCH_HOLD_WAVE_MS").and_then(|v| v.parse().ok()),
        };
        let first_rank = ["OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"].iter().find_map(|v| var(v)).is_none_or(|r| r.trim() == "0");
        Settings {
            cluster,
            node,
            cuda_sync_each_op: var("FALCON_CUDA_SYNC_EACH_OP").is_some_and(|v| v == "1"),
            faults,
            model: non_empty("FALCON_BATCH_MODEL").map(PathBuf::from),
            batch_job: non_empty("SLURM_JOB_ID"),
            first_rank,
            temp_dir: var("TMPDIR").map(PathBuf::from).unwrap_or(defaults.temp_dir),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(vars: &[(&str, &str)]) -> Settings {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Settings::from_vars(|name| map.get(name).cloned())
    }

    #[test]
    fn nothing_set_is_a_lone_process() {
        let s = from(&[]);
        assert_eq!((s.cluster.local_rank, s.cluster.peer_timeout, s.cluster.progress_every), (0, Duration::from_secs(10), Duration::from_micros(500)));
        assert_eq!(s.cluster.singleton_env.len(), 4);
        assert_eq!(s.node, NodeShare::default());
        assert!(s.first_rank && !s.cuda_sync_each_op && s.model.is_none() && s.batch_job.is_none());
        assert_eq!(s.faults, Faults::default());
    }

    #[test]
    fn a_launched_rank_reads_its_launcher() {
        let s = from(&[
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_RANK", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
            ("RAYON_NUM_THREADS", "3"),
            ("FALCON_BATCH_PEER_TIMEOUT_S", "2.5"),
            ("FALCON_BATCH_PROGRESS_US", "0"),
            ("FALCON_BATCH_MODEL", ""),
            ("SLURM_JOB_ID", "77"),
        ]);
        assert!(s.cluster.singleton_env.is_empty() && !s.first_rank);
        assert_eq!((s.cluster.local_rank, s.cluster.peer_timeout, s.cluster.progress_every), (1, Duration::from_millis(2500), Duration::ZERO));
        assert_eq!(s.node, NodeShare { local_ranks: 2, forced_threads: Some(3) });
        assert_eq!((s.model, s.batch_job.as_deref()), (None, Some("77")));
    }

    #[test]
    fn a_user_made_mpi_setting_stands() {
        let s = from(&[("OMPI_MCA_btl", "tcp,self"), ("FALCON_BATCH_PEER_TIMEOUT_S", "-1")]);
        assert!(s.cluster.singleton_env.iter().all(|(n, _)| *n != "OMPI_MCA_btl"));
        assert_eq!(s.cluster.peer_timeout, Duration::from_secs(10));
    }
}
