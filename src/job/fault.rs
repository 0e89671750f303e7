//! Fault injection for the restart tests: with FALCON_BATCH_KILL_AFTER_DOCS=N the process
//! SIGKILLs itself once N documents are written, exactly as an OOM killer or scancel would;
//! FALCON_BATCH_TERM_AFTER_DOCS=N sends itself SIGTERM instead, as Slurm preemption does.

/// Called after each write with the documents this run has written so far.
pub(super) fn crash_point(written: usize) {
    let after = |var: &str| std::env::var(var).ok().and_then(|v| v.parse::<usize>().ok()).is_some_and(|n| written >= n);
    for (var, signal) in [("FALCON_BATCH_KILL_AFTER_DOCS", libc::SIGKILL), ("FALCON_BATCH_TERM_AFTER_DOCS", libc::SIGTERM)] {
        if after(var) {
            // SAFETY: raise only sends a signal to this process.
            unsafe {
                libc::raise(signal);
            }
        }
    }
}
