//! Fault injection for the restart tests: with FALCON_BATCH_KILL_AFTER_DOCS=N the process
//! SIGKILLs itself once N documents are written, exactly as an OOM killer or scancel would;
//! FALCON_BATCH_TERM_AFTER_DOCS=N sends itself SIGTERM instead, as Slurm preemption does;
//! FALCON_BATCH_HOLD_WAVE_MS=N holds the writer N ms before it collects each wave, as a big
//! model's slow waves would (a job that is still running, for the lock and flushing tests).
//! The variables are read once at start (settings::Settings::from_env) into [`Faults`].

/// The hooks' settings; the default injects nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// SIGKILL this process once this many documents are written.
    pub kill_after_docs: Option<usize>,
    /// SIGTERM this process once this many documents are written.
    pub term_after_docs: Option<usize>,
    /// Hold the writer this many ms before it collects each wave.
    pub hold_wave_ms: Option<u64>,
}

impl Faults {
    /// Called after each write with the documents this run has written so far.
    pub(super) fn crash_point(&self, written: usize) {
        for (after, signal) in [(self.kill_after_docs, libc::SIGKILL), (self.term_after_docs, libc::SIGTERM)] {
            if after.is_some_and(|n| written >= n) {
                // SAFETY: raise only sends a signal to this process.
                unsafe {
                    libc::raise(signal);
                }
            }
        }
    }

    /// Called before each wave is collected.
    pub(super) fn hold_wave(&self) {
        if let Some(ms) = self.hold_wave_ms {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
    }
}
