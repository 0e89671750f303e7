//! Stop requests: SIGTERM (Slurm preemption, `scontrol requeue`, scancel, mpirun forwarding
//! a TERM) and SIGINT (Ctrl-C, alone or forwarded by mpirun) ask the score job to stop after
//! the micro-batch in flight, with every finished document flushed and the output's reserve
//! and lock files removed, instead of dying in the middle of a write.
//!
//! Every rank of the job gets the signal; only the writer acts on it. The other ranks keep
//! serving until the writer's stop message, so no rank leaves a peer waiting.

use std::sync::atomic::{AtomicI32, Ordering};

/// Exit code of a score job stopped by SIGTERM or SIGINT before it finished (sysexits'
/// EX_TEMPFAIL: run the same command again and it resumes).
pub const EXIT_STOPPED: u8 = 75;

/// The signal that asked for the stop; 0 for none yet.
static REQUESTED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(signal: libc::c_int) {
    // Only an atomic store: the one thing a signal handler may safely do here.
    REQUESTED.store(signal, Ordering::SeqCst);
}

/// Route SIGTERM and SIGINT to a stop request for the rest of the process.
pub fn install() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic; sigaction is given a zeroed, valid struct.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

/// True once SIGTERM or SIGINT has arrived.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst) != 0
}

/// The name of the signal that asked for the stop ("SIGTERM", "SIGINT"), if one did.
pub fn signal_name() -> Option<&'static str> {
    match REQUESTED.load(Ordering::SeqCst) {
        0 => None,
        libc::SIGINT => Some("SIGINT"),
        libc::SIGTERM => Some("SIGTERM"),
        _ => Some("a signal"),
    }
}
