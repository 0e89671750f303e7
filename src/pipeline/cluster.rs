//! The MPI job as this rank sees it: who we are, who the others are, and whether they are
//! still there.
//!
//! A watchdog thread sends a heartbeat to every peer twice a second on its own communicator
//! and notes when it last heard from each. Silence longer than the timeout means the peer is
//! gone (killed, crashed, its node lost): the watchdog marks it lost so every wait in
//! transport.rs returns an error naming it, prints "rank R: lost contact with rank Q", and
//! aborts the job a moment later even if the main thread is busy elsewhere (rank 0 inside the
//! job driver). A thread is needed because a rank may compute, or rank 0 write results, for
//! longer than any sensible timeout without touching MPI.

use super::transport::{Comm, Liveness, Pending};
use super::PipelineError;
use crate::schedule::RankCaps;
use mpi::environment::{Threading, Universe};
use mpi::topology::{Communicator, SimpleCommunicator};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const TAG_HEARTBEAT: i32 = 1;
const TAG_HELLO: i32 = 2;
/// Exit code of a rank that gave up on a lost peer.
pub const EXIT_LOST: i32 = 70;
const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);

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

/// This process's place in the MPI job.
pub struct Cluster {
    pub rank: usize,
    pub size: usize,
    /// Rank among the processes on this node (which GPU to take).
    pub local_rank: usize,
    pub live: Liveness,
    /// Point-to-point traffic of the pipeline.
    pub(crate) data: Comm,
    watchdog: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
    /// The communicators behind `data` and the watchdog's; freed before MPI is finalized.
    comms: Vec<SimpleCommunicator>,
    universe: Option<Universe>,
}

/// Seconds of silence after which a peer counts as lost: FALCON_BATCH_PEER_TIMEOUT_S, else 10.
fn peer_timeout() -> Duration {
    let s = std::env::var("FALCON_BATCH_PEER_TIMEOUT_S").ok().and_then(|v| v.parse::<f64>().ok()).filter(|s| *s > 0.0);
    Duration::from_secs_f64(s.unwrap_or(10.0))
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

impl Cluster {
    /// Initialise MPI (a singleton when started without mpirun) and start the watchdog.
    pub fn init() -> Result<Cluster, PipelineError> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Multiple)
            .ok_or_else(|| PipelineError::Mpi("MPI was already initialised in this process".into()))?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        if size > 1 && threading != Threading::Multiple {
            return Err(PipelineError::Mpi(format!(
                "the MPI library grants {threading:?} threading; the pipeline needs Multiple for its watchdog thread"
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
        let mut cluster = Cluster { rank, size, local_rank, live, data, watchdog: None, comms: vec![data_comm], universe: Some(universe) };
        if size > 1 {
            let beat_comm = world.duplicate();
            let beat = Comm::new(&beat_comm, rank);
            beat.errors_return()?;
            let stop = Arc::new(AtomicBool::new(false));
            let (s, l) = (stop.clone(), cluster.live.clone());
            let handle = std::thread::Builder::new()
                .name("mpi-watchdog".into())
                .spawn(move || watchdog(beat, size, peer_timeout(), s, l))
                .map_err(|e| PipelineError::Mpi(format!("cannot start the watchdog thread: {e}")))?;
            cluster.watchdog = Some((stop, handle));
            cluster.comms.push(beat_comm);
        }
        Ok(cluster)
    }

    /// Exchange identities and capabilities with every rank. Every rank gets the same
    /// answer, so when one rank differs every rank refuses, naming it.
    pub fn exchange(&self, identity: &Identity, caps: &RankCaps) -> Result<Vec<RankCaps>, PipelineError> {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
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

    /// Print `msg` and end every rank with a non-zero code; returns only never.
    pub fn abort(&self, msg: &str) -> ! {
        say(&format!("rank {}: {msg}", self.rank));
        // MPI_Abort asks the launcher to end the job; should that stall, leave anyway.
        exit_after(Duration::from_secs(5), EXIT_LOST, format!("rank {}: MPI_Abort did not return; exiting", self.rank));
        self.data.abort(EXIT_LOST)
    }

    /// Stop the watchdog and finalize MPI, never hanging there: finalize is a collective
    /// step with peers that may be gone.
    pub fn finish(mut self) {
        self.stop_watchdog();
        exit_after(Duration::from_secs(20), 0, format!("rank {}: MPI_Finalize did not return in 20 s; exiting", self.rank));
        drop(self);
    }

    fn stop_watchdog(&mut self) {
        if let Some((stop, handle)) = self.watchdog.take() {
            stop.store(true, Ordering::SeqCst);
            let _ = handle.join();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_watchdog();
        // MPI_Comm_free is illegal after MPI_Finalize: communicators first, then the universe.
        self.comms.clear();
        drop(self.universe.take());
    }
}

/// The watchdog loop; see the module comment.
fn watchdog(beat: Comm, size: usize, timeout: Duration, stop: Arc<AtomicBool>, live: Liveness) {
    let start = Instant::now();
    let mut last_seen = vec![start; size];
    let mut sends: Vec<Option<Pending<u8>>> = (0..size).map(|_| None).collect();
    let mut next_beat = start;
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now >= next_beat {
            next_beat = now + HEARTBEAT_EVERY;
            for peer in (0..size).filter(|&p| p != beat.rank) {
                // One heartbeat in flight per peer: a stuck one to a dead peer is not repeated.
                let done = match &mut sends[peer] {
                    Some(p) => matches!(p.try_finish(), Ok(Some(_))),
                    None => true,
                };
                if done {
                    sends[peer] = beat.isend(vec![0u8], peer, TAG_HEARTBEAT).ok();
                }
            }
        }
        while let Ok(Some(p)) = beat.try_recv_any_len::<u8>(None, TAG_HEARTBEAT) {
            let from = p.peer();
            if p.wait(&live).is_ok() && from < size {
                last_seen[from] = Instant::now();
            }
        }
        let now = Instant::now();
        if let Some((peer, seen)) = last_seen.iter().enumerate().filter(|(p, _)| *p != beat.rank).min_by_key(|(_, t)| **t) {
            let silent = now.duration_since(*seen);
            if silent > timeout {
                live.mark_lost(peer);
                say(&format!("rank {}: lost contact with rank {peer} (no heartbeat for {:.1} s); aborting", beat.rank, silent.as_secs_f64()));
                // Give the main thread a moment to fail its own wait with the same name, then
                // end the job ourselves in case it is busy outside MPI.
                std::thread::sleep(Duration::from_secs(1));
                exit_after(Duration::from_secs(3), EXIT_LOST, format!("rank {}: MPI_Abort did not return; exiting", beat.rank));
                beat.abort(EXIT_LOST);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Unfinished heartbeats are small and eager; their buffers are leaked by Pending if MPI
    // still holds them, which costs a byte per peer once per run.
}
