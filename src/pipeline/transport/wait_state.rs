//! What the main thread's waits and the liveness backstop share: the rank given up on and
//! the peer waited for now.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// What the main thread's waits and the liveness backstop (cluster/backstop.rs) share: the rank the
/// backstop gave up on (every wait then fails naming it), and the peer the main thread is
/// waiting for right now (the backstop names it).
#[derive(Clone, Debug)]
pub struct WaitState {
    /// `usize::MAX` while every peer counts as alive, else the rank given up on.
    lost: Arc<AtomicUsize>,
    /// `usize::MAX` when not waiting, else peer * 2 + 1 for a receive, peer * 2 for a send.
    waiting: Arc<AtomicUsize>,
    /// `liveness::now_ms()` of the wait loop's last poll: a wait that stopped polling is a
    /// thread stuck in a call, not one waiting for a peer.
    polled_ms: Arc<AtomicU64>,
}

/// A waiting thread polls every 200 us; one silent for this long is stuck in a call.
const POLL_STALE_MS: u64 = 1000;

impl Default for WaitState {
    fn default() -> Self {
        WaitState {
            lost: Arc::new(AtomicUsize::new(usize::MAX)),
            waiting: Arc::new(AtomicUsize::new(usize::MAX)),
            polled_ms: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl WaitState {
    pub fn mark_lost(&self, rank: usize) {
        let _ = self.lost.compare_exchange(usize::MAX, rank, Ordering::SeqCst, Ordering::SeqCst);
    }

    pub fn lost(&self) -> Option<usize> {
        match self.lost.load(Ordering::SeqCst) {
            usize::MAX => None,
            r => Some(r),
        }
    }

    pub(super) fn waiting_for(&self, peer: usize, receive: bool) {
        self.polled();
        self.waiting.store(peer * 2 + usize::from(receive), Ordering::SeqCst);
    }

    pub(super) fn polled(&self) {
        self.polled_ms.store(crate::liveness::now_ms(), Ordering::Relaxed);
    }

    pub(super) fn done_waiting(&self) {
        self.waiting.store(usize::MAX, Ordering::SeqCst);
    }

    /// The peer the main thread waits for now, and whether for a "receive" or a "send";
    /// None when it is not waiting, or has stopped polling (stuck inside a call).
    pub fn waiting(&self) -> Option<(usize, &'static str)> {
        let fresh = crate::liveness::now_ms().saturating_sub(self.polled_ms.load(Ordering::Relaxed)) < POLL_STALE_MS;
        match self.waiting.load(Ordering::SeqCst) {
            usize::MAX => None,
            _ if !fresh => None,
            w => Some((w / 2, if w % 2 == 1 { "receive" } else { "send" })),
        }
    }
}

