//! Stop requests: SIGTERM (Slurm preemption, `scontrol requeue`, scancel, mpirun forwarding
//! a TERM) and SIGINT (Ctrl-C, alone or forwarded by mpirun) ask the score job to stop after
//! the micro-batch in flight, with every finished document flushed and the output's reserve
//! and lock files removed, instead of dying in the middle of a write.
//!
//! Only the writer acts on a stop; the other ranks keep serving until the writer's stop
//! message, so no rank leaves a peer waiting. A signal may reach one rank only (a `kill` of
//! one process, Slurm signalling one node's step): every rank's heartbeats carry its stop
//! request (pipeline/cluster/heartbeat.rs), and a request heard from a peer counts as this
//! rank's own, so the writer stops within a heartbeat of any rank's signal.
//!
//! Process-wide, like liveness.rs: the signal handler, the job and the heartbeat thread all
//! reach the one request.

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

/// The signal number of this process's stop request, 0 for none (what heartbeats carry).
pub fn requested_signal() -> i32 {
    REQUESTED.load(Ordering::SeqCst)
}

/// A peer's heartbeat says it was asked to stop by `signal`: the first request stays.
pub fn request_from_peer(signal: i32) {
    if signal != 0 {
        let _ = REQUESTED.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
    }
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
