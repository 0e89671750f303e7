//! The MPI job as this rank sees it: who we are, who the others are, and whether the job is
//! still moving (DESIGN.md, "Failure and liveness").
//!
//! Liveness is progress, not an answering thread. Two threads run beside the pipeline:
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

use super::transport::{Comm, Liveness, Pending};
use super::PipelineError;
use crate::liveness;
use crate::schedule::RankCaps;
use mpi::environment::{Threading, Universe};
use mpi::topology::{Communicator, SimpleCommunicator};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

const TAG_HEARTBEAT: i32 = 1;
const TAG_HELLO: i32 = 2;
/// Exit code of a rank that gave up on a lost peer or on a job that stopped moving.
pub const EXIT_LOST: i32 = 70;
const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);
/// How long `finish` waits for a thread to stop: one stuck inside MPI is left behind.
const THREAD_STOP_WAIT: Duration = Duration::from_secs(2);

/// What every rank must agree on before any work starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The manifest's model id (or any string naming the weights).
    pub model_id: String,
    /// Hash of the options that shape the schedule and the results.
    pub options_hash: String,
    /// How hidden states travel (f32, bf16): both ends of a hop must read the same bytes.
    pub wire_dtype: String,
}

/// One rank's introduction, exchanged at start.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Hello {
    rank: usize,
    host: String,
    identity: Identity,
    device: String,
    device_bytes: u64,
    host_bytes: Option<u64>,
    speed: f64,
}

/// What the heartbeat thread knows of each peer, in `liveness::now_ms()` milliseconds.
struct PeerView {
    /// When any heartbeat last came from the peer.
    heard_ms: Vec<AtomicU64>,
    /// When the peer's progress count last moved.
    advanced_ms: Vec<AtomicU64>,
    /// The rank the peer's main thread waits for, as its last heartbeat said (NOBODY: none).
    waits_for: Vec<AtomicU64>,
}

const NOBODY: u64 = u64::MAX;

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
    pub live: Liveness,
    /// Point-to-point traffic of the pipeline.
    pub(crate) data: Comm,
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
pub(crate) fn say(msg: &str) {
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

impl Cluster {
    /// Initialise MPI (a singleton when started without mpirun) and, with peers, start the
    /// heartbeat and backstop threads.
    pub fn init() -> Result<Cluster, PipelineError> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Multiple)
            .ok_or_else(|| PipelineError::Mpi("MPI was already initialised in this process".into()))?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        if size > 1 && threading != Threading::Multiple {
            return Err(PipelineError::Mpi(format!(
                "the MPI library grants {threading:?} threading; the pipeline needs Multiple for its heartbeat thread"
            )));
        }
        let local_rank = std::env::var("OMPI_COMM_WORLD_LOCAL_RANK")
            .or_else(|_| std::env::var("SLURM_LOCALID"))
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let data_comm = world.duplicate();
        let data = Comm::new(&data_comm, rank);
        data.errors_return()?;
        let live = Liveness::default();
        liveness::epoch();
        let hosts = Arc::new(OnceLock::new());
        let mut cluster =
            Cluster { rank, size, local_rank, live, data, hosts, heartbeat: None, backstop: None, comms: vec![data_comm], universe: Some(universe) };
        if size > 1 {
            let beat_comm = world.duplicate();
            let beat = Comm::new(&beat_comm, rank);
            beat.errors_return()?;
            cluster.comms.push(beat_comm);
            let view = Arc::new(PeerView {
                heard_ms: (0..size).map(|_| AtomicU64::new(0)).collect(),
                advanced_ms: (0..size).map(|_| AtomicU64::new(0)).collect(),
                waits_for: (0..size).map(|_| AtomicU64::new(NOBODY)).collect(),
            });
            let (v, l) = (view.clone(), cluster.live.clone());
            cluster.heartbeat = Some(Helper::spawn("mpi-heartbeat", move |stop| heartbeat(beat, size, &v, &l, &stop))?);
            let b = Backstop { rank, size, timeout: liveness::peer_timeout(), view, live: cluster.live.clone(), hosts: cluster.hosts.clone() };
            cluster.backstop = Some(Helper::spawn("liveness-backstop", move |stop| b.run(&stop))?);
        }
        Ok(cluster)
    }

    /// Exchange identities and capabilities with every rank. Every rank gets the same
    /// answer, so when one rank differs every rank refuses, naming it.
    pub fn exchange(&self, identity: &Identity, caps: &RankCaps) -> Result<Vec<RankCaps>, PipelineError> {
        let host = this_host();
        let mine = Hello {
            rank: self.rank,
            host,
            identity: identity.clone(),
            device: caps.device.clone(),
            device_bytes: caps.device_bytes,
            host_bytes: caps.host_bytes,
            speed: caps.speed,
        };
        let bytes = serde_json::to_vec(&mine).map_err(|e| PipelineError::Mpi(format!("encoding the rank's introduction: {e}")))?;
        let mut sends: Vec<Pending<u8>> = vec![];
        for peer in (0..self.size).filter(|&p| p != self.rank) {
            sends.push(self.data.isend(bytes.clone(), peer, TAG_HELLO)?);
        }
        let mut hellos: Vec<Option<Hello>> = vec![None; self.size];
        hellos[self.rank] = Some(mine);
        for peer in (0..self.size).filter(|&p| p != self.rank) {
            let (_, b) = self.data.recv_any_len::<u8>(Some(peer), TAG_HELLO, &self.live)?;
            let h: Hello = serde_json::from_slice(&b).map_err(|e| PipelineError::BadMessage { from: peer, msg: format!("introduction: {e}") })?;
            hellos[peer] = Some(h);
        }
        for s in sends {
            s.wait(&self.live)?;
        }
        let hellos: Vec<Hello> = hellos.into_iter().flatten().collect();
        let _ = self.hosts.set(hellos.iter().map(|h| h.host.clone()).collect());
        let reference = &hellos[0];
        for h in &hellos[1..] {
            if h.identity != reference.identity {
                return Err(PipelineError::Mismatch {
                    rank: h.rank,
                    msg: format!(
                        "rank {} ({}) sees model `{}` with options {} and --wire-dtype {}, rank 0 ({}) sees model `{}` with options {} and --wire-dtype {}",
                        h.rank,
                        h.host,
                        h.identity.model_id,
                        h.identity.options_hash,
                        h.identity.wire_dtype,
                        reference.host,
                        reference.identity.model_id,
                        reference.identity.options_hash,
                        reference.identity.wire_dtype
                    ),
                });
            }
        }
        Ok(hellos
            .into_iter()
            .map(|h| RankCaps { device_bytes: h.device_bytes, host_bytes: h.host_bytes, speed: h.speed, device: h.device })
            .collect())
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

/// The heartbeat loop; see the module comment. It never decides anything: it only reports.
fn heartbeat(beat: Comm, size: usize, view: &PeerView, live: &Liveness, stop: &AtomicBool) {
    let mut sends: Vec<Option<Pending<u64>>> = (0..size).map(|_| None).collect();
    let mut recvs: Vec<Pending<u64>> = vec![];
    let mut last_count = vec![0u64; size];
    let mut next_beat = liveness::now_ms();
    while !stop.load(Ordering::SeqCst) {
        let now = liveness::now_ms();
        if now >= next_beat {
            next_beat = now + HEARTBEAT_EVERY.as_millis() as u64;
            for peer in (0..size).filter(|&p| p != beat.rank) {
                // One heartbeat in flight per peer: a stuck one to a dead peer is not repeated.
                let done = match &mut sends[peer] {
                    Some(p) => matches!(p.try_finish(), Ok(Some(_))),
                    None => true,
                };
                if done {
                    let waits = live.waiting().map_or(NOBODY, |(w, _)| w as u64);
                    sends[peer] = beat.isend(vec![liveness::count(), waits], peer, TAG_HEARTBEAT).ok();
                }
            }
        }
        while let Ok(Some(p)) = beat.try_recv_any_len::<u64>(None, TAG_HEARTBEAT) {
            recvs.push(p);
        }
        let mut i = 0;
        while i < recvs.len() {
            let from = recvs[i].peer();
            match recvs[i].try_finish() {
                Ok(Some(beat)) => {
                    recvs.swap_remove(i);
                    if from < size {
                        let now = liveness::now_ms();
                        view.heard_ms[from].store(now, Ordering::SeqCst);
                        view.waits_for[from].store(beat.get(1).copied().unwrap_or(NOBODY), Ordering::SeqCst);
                        let c = beat.first().copied().unwrap_or(0);
                        if c > last_count[from] {
                            last_count[from] = c;
                            view.advanced_ms[from].store(now, Ordering::SeqCst);
                        }
                    }
                }
                Ok(None) => i += 1,
                Err(_) => {
                    recvs.swap_remove(i);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Unfinished heartbeats are small and eager; their buffers are leaked by Pending if MPI
    // still holds them, which costs a few bytes per peer once per run.
}

/// The liveness backstop; see the module comment. No MPI call in here.
struct Backstop {
    rank: usize,
    size: usize,
    timeout: Duration,
    view: Arc<PeerView>,
    live: Liveness,
    hosts: Arc<OnceLock<Vec<String>>>,
}

impl Backstop {
    fn run(&self, stop: &AtomicBool) {
        let timeout_ms = self.timeout.as_millis() as u64;
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
            let now = liveness::now_ms();
            let peers_ms = self.view.advanced_ms.iter().map(|a| a.load(Ordering::SeqCst)).max().unwrap_or(0);
            let last = liveness::last_ms().max(peers_ms);
            if now.saturating_sub(last) <= timeout_ms || stop.load(Ordering::SeqCst) {
                continue;
            }
            let (lost, msg) = self.verdict(now, now - last);
            say(&msg);
            self.live.mark_lost(lost);
            // The main thread's wait now fails with the same name and aborts through MPI;
            // should it be stuck (in MPI, a device call, a file system), end here.
            std::thread::sleep(Duration::from_secs(2));
            say(&format!("rank {}: ending the process (exit {EXIT_LOST})", self.rank));
            // SAFETY: _exit ends the process at once; nothing of ours needs unwinding.
            unsafe { libc::_exit(EXIT_LOST) };
        }
    }

    /// Which rank to blame, and the message: the peer silent longest when its silence stands
    /// out; else the end of the chain of waits from this rank (each rank's main thread waits
    /// for the next; the last waits for nobody: it is computing, or stuck in a call).
    fn verdict(&self, now: u64, stalled_ms: u64) -> (usize, String) {
        let name = |r: usize| rank_name(&self.hosts, r, self.rank);
        let me = name(self.rank);
        let stalled = stalled_ms as f64 / 1000.0;
        let silent = (0..self.size)
            .filter(|&p| p != self.rank)
            .map(|p| (p, now.saturating_sub(self.view.heard_ms[p].load(Ordering::SeqCst))))
            .max_by_key(|(_, s)| *s);
        let stands_out = (self.timeout.as_millis() as u64 / 2).max(1000);
        if let Some((p, s)) = silent.filter(|(_, s)| *s > stands_out) {
            let waiting = match self.live.waiting() {
                Some((w, what)) => format!("; waiting for a {what} from {}", name(w)),
                None => String::new(),
            };
            let msg = format!(
                "{me}: lost contact with {}: nothing heard from it for {:.1} s and no progress anywhere for {stalled:.1} s{waiting}; ending the job",
                name(p),
                s as f64 / 1000.0
            );
            return (p, msg);
        }
        let mut chain = vec![self.rank];
        let mut next = self.live.waiting().map(|(w, _)| w);
        while let Some(w) = next.filter(|w| *w < self.size && !chain.contains(w)) {
            chain.push(w);
            next = match self.view.waits_for[w].load(Ordering::SeqCst) {
                NOBODY => None,
                v => Some(v as usize),
            };
        }
        let end = chain.last().copied().unwrap_or(self.rank);
        if end == self.rank {
            return (
                end,
                format!("{me}: no progress for {stalled:.1} s and this rank waits for no peer (stuck in a device call, an MPI call or the file system?); ending the job"),
            );
        }
        let waits: Vec<String> = chain.iter().map(|r| format!("rank {r}")).collect();
        let msg = format!(
            "{me}: lost contact with {}: no progress anywhere for {stalled:.1} s; the waits go {}, and rank {end} answers but waits for no peer (stuck in a call?); ending the job",
            name(end),
            waits.join(" -> ")
        );
        (end, msg)
    }
}
