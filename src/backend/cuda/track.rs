//! The ops queued on the compute stream since the host last waited on it. A kernel fault
//! (an illegal address, say) surfaces at the next wait, not at its launch; the error then
//! names the ops that may have caused it. With FALCON_CUDA_SYNC_EACH_OP=1 every op waits
//! for itself, so the error names exactly the one that failed (slow: for debugging); the
//! variable is read once at start (settings::Settings::from_env) and set here with
//! [`sync_each_op`] before a backend is made.

use super::{dev_err, BackendError, CudaBackend, Result};
use cudarc::driver::DriverError;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Names kept: the most recent ops are the likeliest culprits.
const KEPT: usize = 12;

/// Whether backends made from now on wait after every op (set at start; off by default).
static SYNC_EACH_OP: AtomicBool = AtomicBool::new(false);

/// Makes the backends created after this call wait after every op (`true`) or not.
pub fn sync_each_op(on: bool) {
    SYNC_EACH_OP.store(on, Ordering::Relaxed);
}

#[derive(Default)]
pub(crate) struct Queued {
    names: Mutex<(VecDeque<&'static str>, usize)>,
    pub sync_each_op: bool,
}

impl Queued {
    /// As [`sync_each_op`] last set it (the name is older than the setting's move out of
    /// the environment).
    pub fn from_env() -> Queued {
        Queued { names: Mutex::default(), sync_each_op: SYNC_EACH_OP.load(Ordering::Relaxed) }
    }

    fn push(&self, op: &'static str) {
        if let Ok(mut g) = self.names.lock() {
            let (names, total) = &mut *g;
            if names.len() == KEPT {
                names.pop_front();
            }
            names.push_back(op);
            *total += 1;
        }
    }

    fn clear(&self) {
        if let Ok(mut g) = self.names.lock() {
            *g = (VecDeque::new(), 0);
        }
    }

    /// "the last 3 of 40 ops queued since the last wait: linear, gelu, linear_residual"
    fn describe(&self) -> String {
        match self.names.lock() {
            Ok(g) if g.1 > 0 => {
                let names: Vec<&str> = g.0.iter().copied().collect();
                format!("the last {} of {} ops queued since the last wait: {}", names.len(), g.1, names.join(", "))
            }
            _ => "no op queued since the last wait".into(),
        }
    }
}

impl CudaBackend {
    /// Records a queued op (a kernel launch or library call) and maps its launch error.
    pub(crate) fn launched<T>(&self, op: &'static str, r: std::result::Result<T, DriverError>) -> Result<T> {
        let v = r.map_err(|e| dev_err(&format!("launching {op}"), e))?;
        self.queued.push(op);
        if self.queued.sync_each_op {
            self.stream.synchronize().map_err(|e| dev_err(&format!("{op} (FALCON_CUDA_SYNC_EACH_OP)"), e))?;
            self.queued.clear();
        }
        Ok(v)
    }

    /// Records an op whose errors are already BackendErrors (cuBLASLt).
    pub(crate) fn queued_op(&self, op: &'static str) {
        // Only the bookkeeping of `launched`; its error mapping does not apply.
        let _ = self.launched(op, Ok::<(), DriverError>(()));
    }

    /// Maps an error met where the host waits on the stream, naming the queued ops.
    pub(crate) fn wait_err(&self, what: &str, e: DriverError) -> BackendError {
        let err = dev_err(what, e);
        match err {
            BackendError::Device(msg) => BackendError::Device(format!("{msg} (a kernel fault shows here; {})", self.queued.describe())),
            other => other,
        }
    }

    /// The host has waited on the stream: the queued ops are done.
    pub(crate) fn waited(&self) {
        self.queued.clear();
    }
}
