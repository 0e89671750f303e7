//! Point-to-point messages over raw MPI handles, every wait a polling loop.
//!
//! Why raw handles rather than rsmpi's scoped requests: a request here owns its buffer (a
//! hidden state is computed, sent and forgotten while the next micro-batch computes), which a
//! lexical `request::scope` cannot express without keeping every buffer of a wave alive.
//! Why polling: a blocking MPI wait on a dead peer never returns; `MPI_Test` in a loop lets
//! the wait notice the liveness backstop's verdict (cluster/backstop.rs) and give up with the
//! peer's name, and every completed message counts as progress (crate::liveness).
//!
//! Files: comm.rs (the communicator handle: post, probe, barrier, abort), pending.rs (a
//! message in flight and its buffer; a queue of sends), wait_state.rs (what the waits and the
//! backstop share), progress.rs (the thread that keeps sends moving).

mod comm;
mod pending;
mod progress;
mod wait_state;

pub use comm::Comm;
pub use pending::{Pending, SendQueue};
pub use progress::ProgressThread;
pub use wait_state::WaitState;

use super::PipelineError;
use mpi::ffi;
use std::os::raw::c_int;
use std::time::Duration;

fn check(code: c_int, what: &str) -> Result<(), PipelineError> {
    if code == ffi::MPI_SUCCESS as c_int {
        Ok(())
    } else {
        Err(PipelineError::Mpi(format!("{what} failed with MPI error code {code}")))
    }
}

fn empty_status() -> ffi::MPI_Status {
    ffi::MPI_Status { MPI_SOURCE: 0, MPI_TAG: 0, MPI_ERROR: 0, _cancelled: 0, _ucount: 0 }
}

/// How a poll loop waits between tests: spin briefly (a reply often is microseconds away),
/// then sleep so an idle rank leaves the core to the ones computing.
struct Backoff(u32);

impl Backoff {
    fn pause(&mut self) {
        self.0 += 1;
        if self.0 < 64 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

