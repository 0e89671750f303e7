//! Fault injection for the restart tests: with FALCON_BATCH_KILL_AFTER_DOCS=N the process
//! SIGKILLs itself once N documents are written, exactly as an OOM killer or scancel would;
//! FALCON_BATCH_TERM_AFTER_DOCS=N sends itself SIGTERM instead, as Slurm preemption does;
//! FALCON_BATCH_HOLD_WAVE_MS=N holds the writer N ms before it collects each wave, as a big
//! model's slow waves would (a job that is still running, for the lock and flushing tests).

/// The hooks' settings, read from the environment once per process: they are consulted on
/// every write and every wave.
struct Faults {
    kill_after: Option<usize>,
    term_after: Option<usize>,
    hold_wave_ms: Option<u64>,
}

fn faults() -> &'static Faults {
    static FAULTS: std::sync::OnceLock<Faults> = std::sync::OnceLock::new();
    FAULTS.get_or_init(|| {
        let var = |name: &str| std::env::var(name).ok();
        Faults {
            kill_after: var("FALCON_BATCH_KILL_AFTER_DOCS").and_then(|v| v.parse().ok()),
            term_after: var("FALCON_BATCH_TERM_AFTER_DOCS").and_then(|v| v.parse().ok()),
            hold_wave_ms: var("FALCON_BATCH_HOLD_WAVE_MS").and_then(|v| v.parse().ok()),
        }
    })
}

/// Called after each write with the documents this run has written so far.
pub(super) fn crash_point(written: usize) {
    let f = faults();
    for (after, signal) in [(f.kill_after, libc::SIGKILL), (f.term_after, libc::SIGTERM)] {
        if after.is_some_and(|n| written >= n) {
            // SAFETY: raise only sends a signal to this process.
            unsafe {
                libc::raise(signal);
            }
        }
    }
}

/// Called before each wave is collected.
pub(super) fn hold_wave() {
    if let Some(ms) = faults().hold_wave_ms {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}
