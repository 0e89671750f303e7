//! The liveness backstop: a thread that makes no MPI call at all. When neither this rank nor
//! any peer has advanced for the peer timeout, it names the rank it lost, makes every wait
//! fail with that name, and ends the process a moment later.

use super::heartbeat::{PeerView, NOBODY};
use super::{rank_name, say, EXIT_LOST};
use crate::liveness;
use crate::pipeline::transport::WaitState;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The backstop's view of the job. No MPI call in here.
pub(super) struct Backstop {
    pub rank: usize,
    pub size: usize,
    pub timeout: Duration,
    pub view: Arc<PeerView>,
    pub waits: WaitState,
    pub hosts: Arc<OnceLock<Vec<String>>>,
}

impl Backstop {
    pub fn run(&self, stop: &AtomicBool) {
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
            self.waits.mark_lost(lost);
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
            let waiting = match self.waits.waiting() {
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
        let mut next = self.waits.waiting().map(|(w, _)| w);
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
