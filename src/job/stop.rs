//! Stop requests: SIGTERM (Slurm preemption, `scontrol requeue`, scancel, mpirun forwarding
//! a TERM) asks the score job to stop after the micro-batch in flight, with every finished
//! document flushed, instead of dying in the middle of a write.
//!
//! Every rank of the job gets the signal; only the writer acts on it. The other ranks keep
//! serving until the writer's stop message, so no rank leaves a peer waiting.

use std::sync::atomic::{AtomicBool, Ordering};

/// Exit code of a score job stopped by SIGTERM before it finished (sysexits' EX_TEMPFAIL:
/// run the same command again and it resumes).
pub const EXIT_STOPPED: u8 = 75;

static REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_signal: libc::c_int) {
    // Only an atomic store: the one thing a signal handler may safely do here.
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Route SIGTERM to a stop request for the rest of the process.
pub fn install() {
    // SAFETY: the handler only stores to an atomic; sigaction is given a zeroed, valid struct.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_term as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGTERM, &action, std::ptr::null_mut());
    }
}

/// True once SIGTERM has arrived.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}
