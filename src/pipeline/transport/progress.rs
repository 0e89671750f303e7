//! The thread that keeps sends moving between this rank's own MPI calls.

use super::Comm;
use crate::pipeline::PipelineError;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// A thread that calls `Comm::progress` every `every` while it lives, so a large hop keeps
/// moving while this rank computes or rank 0 reads and writes files.
pub struct ProgressThread {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl ProgressThread {
    /// None when `every` is zero (progress only inside the pipeline's own calls).
    pub fn start(comm: Comm, every: Duration) -> Result<Option<ProgressThread>, PipelineError> {
        if every.is_zero() {
            return Ok(None);
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::Builder::new()
            .name("mpi-progress".into())
            .spawn(move || {
                while !s.load(Ordering::SeqCst) {
                    comm.progress();
                    std::thread::sleep(every);
                }
            })
            .map_err(|source| PipelineError::Thread { name: "MPI progress", source })?;
        Ok(Some(ProgressThread { stop, handle: Some(handle) }))
    }
}

impl Drop for ProgressThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
