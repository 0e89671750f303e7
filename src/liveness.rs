//! This process's progress stamp: docs/DESIGN.md, "Failure handling".
//!
//! A rank is alive when its work advances, not when some thread answers. Every place where
//! the work really moves on calls `advanced()`: a tensor read from a part file, a layer
//! computed, a group uploaded, a message delivered, a document read or written. The
//! pipeline's backstop (pipeline/cluster/backstop.rs) reads the stamp, and the peers' stamps that
//! heartbeats carry, and ends the process when none has moved for the peer timeout, so a
//! blocked MPI call, a hung device or a hung file system ends the job instead of keeping it
//! alive.
//!
//! A global rather than a handle passed around: reading a part, a layer forward and the
//! corpus reader all advance the same stamp, and none of them should know about MPI.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

static EPOCH: OnceLock<Instant> = OnceLock::new();
/// Milliseconds from EPOCH to the last advance.
static LAST_MS: AtomicU64 = AtomicU64::new(0);
/// Advances so far: peers compare counts, since their clocks are not ours.
static COUNT: AtomicU64 = AtomicU64::new(0);

/// The process's time origin for stamps (fixed at first use).
pub fn epoch() -> Instant {
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds since `epoch()`.
pub fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

/// The work moved on.
pub fn advanced() {
    COUNT.fetch_add(1, Ordering::Relaxed);
    LAST_MS.fetch_max(now_ms(), Ordering::Relaxed);
}

/// How many times the work has moved on.
pub fn count() -> u64 {
    COUNT.load(Ordering::Relaxed)
}

/// Milliseconds since `epoch()` of the last advance (0: none yet, i.e. the start).
pub fn last_ms() -> u64 {
    LAST_MS.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn advancing_moves_the_count_and_the_stamp() {
        epoch();
        let (c, t) = (count(), last_ms());
        std::thread::sleep(Duration::from_millis(5));
        advanced();
        assert!(count() > c);
        assert!(last_ms() >= t + 5);
    }
}
