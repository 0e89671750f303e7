//! Fault injection for the restart tests: with FALCON_BATCH_KILL_AFTER_DOCS=N the process
//! SIGKILLs itself once N documents are written, exactly as an OOM killer or scancel would;
//! FALCON_BATCH_TERM_AFTER_DOCS=N sends itself SIGTERM instead, as Slurm preemption does;
//! FALCON_BATCH_HOLD_WAVE_MS=N holds the writer N ms before it collects each wave, as a big
//! model's slow waves would (a job that is still running, for the lock and flushing tests).

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

/// Called before each wave is collected.
pub(super) fn hold_wave() {
    if let Some(ms) = std::env::var("FALCON_BATCH_HOLD_WAVE_MS").ok().and_then(|v| v.parse::<u64>().ok()) {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}
