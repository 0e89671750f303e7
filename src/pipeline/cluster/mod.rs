//! This process's place in the MPI job: MPI start and end, who we are, and the two threads
//! that tell whether the job is still moving (docs/DESIGN.md, "Failure handling").
//!
//! WaitState is progress, not an answering thread. Two threads run beside the pipeline:
//! - the heartbeat thread tells every peer, twice a second, how far this rank's work has come
//!   (its `liveness::count()`) and which peer its main thread waits for, and notes when it
//!   last heard from each peer, when each last advanced and whom each waits for. A heartbeat
//!   whose count has not moved keeps nobody alive.
//! - the backstop makes no MPI call at all. When neither this rank nor any peer has advanced
//!   for the peer timeout, it prints which rank and host it lost (the one silent longest;
//!   else the end of the chain of waits that starts here: the rank that waits for nobody,
//!   stuck in a call), makes every wait fail with that name, and ends the process a moment
//!   later. A blocked MPI call, a dead peer, a cut link, a hung device or
//!   file system all end the job this way instead of hanging it; mpirun then ends the rest.
//!
//! Files: identity.rs (the ranks' introduction and identity check), heartbeat.rs (the
//! heartbeat thread), backstop.rs (the liveness backstop).

mod backstop;
mod heartbeat;
mod go;
mod identity;

pub use identity::Identity;

use super::transport::{Comm, WaitState};
use super::PipelineError;
use crate::liveness;
use backstop::Backstop;
use heartbeat::{heartbeat, PeerView};
use mpi::environment::{Threading, Universe};
use mpi::topology::{Communicator, SimpleCommunicator};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Exit code of a rank that gave up on a lost peer or on a job that stopped moving.
pub const EXIT_LOST: i32 = 70;
/// How long `finish` waits for a thread to stop: one stuck inside MPI is left behind.
const THREAD_STOP_WAIT: Duration = Duration::from_secs(2);

/// A helper thread and how to stop it.
struct Helper {
    stop: Arc<AtomicBool>,
    /// Gets a message (or hangs up) when the thread has ended.
    ended: Receiver<()>,
}

impl Helper {
    fn spawn(name: &str, body: impl FnOnce(Arc<AtomicBool>) + Send + 'static) -> Result<Helper, PipelineError> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, ended) = channel();
        let s = stop.clone();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                body(s);
                let _ = tx.send(());
            })
            .map_err(|e| PipelineError::Mpi(format!("cannot start the {name} thread: {e}")))?;
        Ok(Helper { stop, ended })
    }

    /// Ask the thread to end and wait a little: one stuck in a call is left behind (it dies
    /// with the process) rather than hanging the exit.
    fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.ended.recv_timeout(THREAD_STOP_WAIT);
    }
}

/// This process's place in the MPI job.
pub struct Cluster {
    pub rank: usize,
    pub size: usize,
    /// Rank among the processes on this node (which GPU to take).
    pub local_rank: usize,
    pub waits: WaitState,
    /// Point-to-point traffic of the pipeline.
    pub(crate) data: Comm,
    /// How often a worker's progress thread drives MPI (zero: no progress thread).
    pub(crate) progress_every: Duration,
    /// Every rank's host name, once the ranks have introduced themselves.
    hosts: Arc<OnceLock<Vec<String>>>,
    heartbeat: Option<Helper>,
    backstop: Option<Helper>,
    /// The communicators behind `data` and the heartbeats'; freed before MPI is finalized.
    comms: Vec<SimpleCommunicator>,
    universe: Option<Universe>,
}

/// One line to stderr in a single write, so lines of ranks sharing mpirun's output do not
/// interleave mid-line.
fn say(msg: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("{msg}\n").as_bytes());
}

/// Prints `msg` and ends the process with `code` after `after`, unless it has ended by then: the
/// backstop for MPI calls that might never return (abort, finalize) with a peer gone.
fn exit_after(after: Duration, code: i32, msg: String) {
    std::thread::spawn(move || {
        std::thread::sleep(after);
        say(&msg);
        // SAFETY: _exit ends the process at once; nothing of ours needs unwinding.
        unsafe { libc::_exit(code) };
    });
}

/// This node's host name.
fn this_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "unknown host".into())
}

/// "rank R (host)" as far as the host is known.
fn rank_name(hosts: &OnceLock<Vec<String>>, rank: usize, me: usize) -> String {
    match hosts.get().and_then(|h| h.get(rank)) {
        Some(h) => format!("rank {rank} ({h})"),
        None if rank == me => format!("rank {rank} ({})", this_host()),
        None => format!("rank {rank} (host unknown: lost before the ranks introduced themselves)"),
    }
}

/// A process started without a launcher becomes an MPI singleton: Open MPI forks an `orted`
/// for it, and PMIx authenticates the two through munge when munge is installed. They are
/// parent and child on one machine, so that buys nothing, and where munge's socket is left
/// behind by a stopped daemon PMIx retries it for 2.25 s at start and again at the end
/// (a one-document score: 6.2 s instead of 1.5). Use PMIx's native (uid) check instead,
/// unless the user chose one. Under mpirun or srun the launcher's choice stands.
///
/// A singleton has no peer either, so it also skips loading and probing the network
/// transports (the InfiniPath/PSM, OFI and UCX components each open their libraries and look
/// for hardware): only the self one. One-document score 1.35-1.5 s -> 1.05-1.2 s here. Each
/// setting only where the user has not made it: `is_set` says which variables the
/// environment holds (settings::Settings::from_env asks it once at start).
///
/// Nor does it fork the `orted` at all (`ess_singleton_isolated`): the daemon is there for
/// MPI_Comm_spawn, which falcon-batch never calls, and MPI_Finalize waited ~40 ms on it.
/// One-document score 0.63 s -> 0.49 s here (start 0.09 -> 0.03 s, the end 0.09 -> 0.03 s).
pub fn singleton_env(is_set: impl Fn(&str) -> bool) -> Vec<(&'static str, &'static str)> {
    let launched = ["OMPI_COMM_WORLD_SIZE", "PMIX_NAMESPACE", "PMIX_RANK", "PMI_RANK"].iter().any(|v| is_set(v));
    if launched {
        return vec![];
    }
    // pml ob1 alone: cm (and with it every MTL) and ucx are never opened; btl self alone.
    SINGLETON_DEFAULTS.iter().copied().filter(|(name, _)| !is_set(name)).collect()
}

const SINGLETON_DEFAULTS: [(&str, &str); 4] = [("PMIX_MCA_psec", "native"), ("OMPI_MCA_pml", "ob1"), ("OMPI_MCA_btl", "self"), ("OMPI_MCA_ess_singleton_isolated", "1")];

/// What MPI start-up and the pipeline take from the environment, read once at start by
/// settings::Settings::from_env; [`Default`] is a process with nothing set (no launcher).
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    /// Rank among the processes on this node, as the launcher says (OMPI_COMM_WORLD_LOCAL_RANK,
    /// else SLURM_LOCALID; 0 without one): which GPU `--device auto` takes.
    pub local_rank: usize,
    /// How long a job may make no progress before its ranks give up
    /// (FALCON_BATCH_PEER_TIMEOUT_S). It must exceed the longest step that cannot report
    /// progress (one tensor read from disk, one layer of one micro-batch, one message).
    pub peer_timeout: Duration,
    /// How often the progress thread drives MPI (FALCON_BATCH_PROGRESS_US; zero turns it off,
    /// to measure what it buys): 500 us by default, in which a 1 GbE link moves ~60 kB, well
    /// within a socket buffer, so the link never idles for want of a call.
    pub progress_every: Duration,
    /// Open MPI's settings for a process started without a launcher ([`singleton_env`]), set
    /// in the environment just before MPI starts (MPI reads them there).
    pub singleton_env: Vec<(&'static str, &'static str)>,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            local_rank: 0,
            peer_timeout: Duration::from_secs(10),
            progress_every: Duration::from_micros(500),
            singleton_env: SINGLETON_DEFAULTS.to_vec(),
        }
    }
}

impl Cluster {
    /// Initialise MPI (a singleton when started without mpirun) and, with peers, start the
    /// heartbeat and backstop threads.
    pub fn init(settings: &ClusterSettings) -> Result<Cluster, PipelineError> {
        for &(name, value) in &settings.singleton_env {
            // Called before MPI starts any thread; ours start after it.
            std::env::set_var(name, value);
        }
        let (universe, threading) = mpi::initialize_with_threading(Threading::Multiple)
            .ok_or_else(|| PipelineError::Mpi("MPI was already initialised in this process".into()))?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        if size > 1 && threading != Threading::Multiple {
            return Err(PipelineError::Mpi(format!(
                "the MPI library grants {threading:?} threading; the pipeline needs Multiple for its heartbeat thread"
            )));
        }
        let local_rank = settings.local_rank;
        let data_comm = world.duplicate();
        let data = Comm::new(&data_comm, rank);
        data.errors_return()?;
        let waits = WaitState::default();
        liveness::epoch();
        let hosts = Arc::new(OnceLock::new());
        let progress_every = settings.progress_every;
        let mut cluster = Cluster {
            rank,
            size,
            local_rank,
            waits,
            data,
            progress_every,
            hosts,
            heartbeat: None,
            backstop: None,
            comms: vec![data_comm],
            universe: Some(universe),
        };
        if size > 1 {
            let beat_comm = world.duplicate();
            let beat = Comm::new(&beat_comm, rank);
            beat.errors_return()?;
            cluster.comms.push(beat_comm);
            let view = Arc::new(PeerView::new(size));
            let (v, l) = (view.clone(), cluster.waits.clone());
            cluster.heartbeat = Some(Helper::spawn("mpi-heartbeat", move |stop| heartbeat(beat, size, &v, &l, &stop))?);
            let b = Backstop { rank, size, timeout: settings.peer_timeout, view, waits: cluster.waits.clone(), hosts: cluster.hosts.clone() };
            cluster.backstop = Some(Helper::spawn("liveness-backstop", move |stop| b.run(&stop))?);
        }
        Ok(cluster)
    }

    /// Print `msg` and end every rank with a non-zero code; returns only never. Call it
    /// before tearing down any local state (a loader draining its queue, buffers being
    /// freed), so the other ranks stop at once instead of waiting on this one.
    pub fn abort(&self, msg: &str) -> ! {
        say(&format!("{}: {msg}", rank_name(&self.hosts, self.rank, self.rank)));
        // MPI_Abort asks the launcher to end the job; should that stall, leave anyway.
        exit_after(Duration::from_secs(5), EXIT_LOST, format!("rank {}: MPI_Abort did not return; exiting", self.rank));
        self.data.abort(EXIT_LOST)
    }

    /// Stop the heartbeats and the backstop: the job's work is over (a trace may take a
    /// while to write, and the peers stop their heartbeats as they finish).
    pub fn stop_liveness(&mut self) {
        if let Some(b) = self.backstop.take() {
            b.stop();
        }
        if let Some(h) = self.heartbeat.take() {
            h.stop();
        }
    }

    /// Finalize MPI, never hanging there: finalize is a collective step with peers that may
    /// be gone, so after 20 s the process exits anyway, with `code`, the job's exit code.
    pub fn finish(mut self, code: u8) {
        self.stop_liveness();
        exit_after(Duration::from_secs(20), i32::from(code), format!("rank {}: MPI_Finalize did not return in 20 s; exiting", self.rank));
        drop(self);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_liveness();
        // MPI_Comm_free is illegal after MPI_Finalize: communicators first, then the universe.
        self.comms.clear();
        drop(self.universe.take());
    }
}
