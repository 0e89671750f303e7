//! The heartbeat thread: it tells every peer, twice a second, how far this rank's work has
//! come, whom its main thread waits for and whether it was asked to stop, and notes what it
//! hears of each peer. It never decides anything: the backstop reads what it noted, and a
//! peer's stop request becomes this process's (stop.rs), for the writer to act on.

use crate::{liveness, stop};
use crate::pipeline::transport::{Comm, WaitState, Pending};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

const TAG_HEARTBEAT: i32 = 1;
const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);

/// What the heartbeat thread knows of each peer, in `liveness::now_ms()` milliseconds.
pub(super) struct PeerView {
    /// When any heartbeat last came from the peer.
    pub heard_ms: Vec<AtomicU64>,
    /// When the peer's progress count last moved.
    pub advanced_ms: Vec<AtomicU64>,
    /// The rank the peer's main thread waits for, as its last heartbeat said (NOBODY: none).
    pub waits_for: Vec<AtomicU64>,
}

impl PeerView {
    pub fn new(size: usize) -> PeerView {
        PeerView {
            heard_ms: (0..size).map(|_| AtomicU64::new(0)).collect(),
            advanced_ms: (0..size).map(|_| AtomicU64::new(0)).collect(),
            waits_for: (0..size).map(|_| AtomicU64::new(NOBODY)).collect(),
        }
    }
}

/// `waits_for` of a peer that waits for nobody.
pub(super) const NOBODY: u64 = u64::MAX;

/// The heartbeat loop, until `quit`.
pub(super) fn heartbeat(beat: Comm, size: usize, view: &PeerView, waits: &WaitState, quit: &AtomicBool) {
    let mut sends: Vec<Option<Pending<u64>>> = (0..size).map(|_| None).collect();
    let mut recvs: Vec<Pending<u64>> = vec![];
    let mut last_count = vec![0u64; size];
    let mut next_beat = liveness::now_ms();
    while !quit.load(Ordering::SeqCst) {
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
                    let waits = waits.waiting().map_or(NOBODY, |(w, _)| w as u64);
                    sends[peer] = beat.isend(vec![liveness::count(), waits, stop::requested_signal() as u64], peer, TAG_HEARTBEAT).ok();
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
                        stop::request_from_peer(beat.get(2).map_or(0, |&s| s as i32));
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
