//! The communicator handle: start sends and receives, probe, barrier and abort, every wait
//! polled against the liveness backstop.

use super::{check, empty_status, Backoff, WaitState, Pending};
use crate::pipeline::PipelineError;
use mpi::ffi;
use mpi::raw::AsRaw;
use mpi::traits::Equivalence;
use std::os::raw::c_int;
use std::time::Instant;

/// A communicator handle that MPI_THREAD_MULTIPLE lets any thread use. The rsmpi communicator
/// it came from is owned by the Cluster and outlives every Comm.
#[derive(Clone, Copy, Debug)]
pub struct Comm {
    raw: ffi::MPI_Comm,
    pub rank: usize,
}

// SAFETY: an MPI communicator is a process-wide handle; the Cluster only hands Comms out after
// MPI granted MPI_THREAD_MULTIPLE, under which any thread may call MPI with it.
unsafe impl Send for Comm {}
unsafe impl Sync for Comm {}

/// A tag no message carries: probing for it only drives MPI's progress.
const TAG_NEVER: i32 = 9;

pub(super) fn datatype<T: Equivalence>() -> ffi::MPI_Datatype {
    T::equivalent_datatype().as_raw()
}

impl Comm {
    /// Wraps a communicator that stays alive for as long as the returned Comm is used.
    pub fn new(comm: &impl AsRaw<Raw = ffi::MPI_Comm>, rank: usize) -> Comm {
        Comm { raw: comm.as_raw(), rank }
    }

    /// Errors on this communicator come back as codes instead of killing the process, so a
    /// failed send to a dead peer becomes our own message naming it.
    pub fn errors_return(&self) -> Result<(), PipelineError> {
        // SAFETY: raw is a valid communicator; the error handler is a library constant.
        check(unsafe { ffi::MPI_Comm_set_errhandler(self.raw, ffi::RSMPI_ERRORS_RETURN) }, "MPI_Comm_set_errhandler")
    }

    /// Start sending `buf` to `peer`; the Pending owns the buffer until it completes.
    pub fn isend<T: Equivalence>(&self, buf: Vec<T>, peer: usize, tag: i32) -> Result<Pending<T>, PipelineError> {
        let mut req = unsafe { ffi::RSMPI_REQUEST_NULL };
        let count = count_of(buf.len())?;
        // SAFETY: the buffer's heap storage does not move when the Vec moves into Pending, and
        // Pending keeps it alive (or leaks it) until MPI reports completion.
        check(
            unsafe { ffi::MPI_Isend(buf.as_ptr() as *const _, count, datatype::<T>(), peer as c_int, tag, self.raw, &mut req) },
            "send",
        )?;
        Ok(Pending { req, buf: Some(buf), peer, what: "send", posted: Instant::now() })
    }

    /// Post a receive of exactly `len` values from `peer`.
    pub fn irecv<T: Equivalence + Default + Clone>(&self, len: usize, peer: usize, tag: i32) -> Result<Pending<T>, PipelineError> {
        let mut buf = vec![T::default(); len];
        let mut req = unsafe { ffi::RSMPI_REQUEST_NULL };
        let count = count_of(len)?;
        // SAFETY: as in isend; the buffer is owned by the Pending.
        check(
            unsafe { ffi::MPI_Irecv(buf.as_mut_ptr() as *mut _, count, datatype::<T>(), peer as c_int, tag, self.raw, &mut req) },
            "receive",
        )?;
        Ok(Pending { req, buf: Some(buf), peer, what: "receive", posted: Instant::now() })
    }

    /// Receive a message of any length from `peer` (None: any rank): probe until one is
    /// there, then receive exactly that message. Returns (source, values).
    pub fn recv_any_len<T: Equivalence + Default + Clone>(
        &self,
        peer: Option<usize>,
        tag: i32,
        waits: &WaitState,
    ) -> Result<(usize, Vec<T>), PipelineError> {
        if let Some(p) = peer {
            waits.waiting_for(p, true);
        }
        let found = self.probe_until_found(peer, tag, waits);
        waits.done_waiting();
        let found = found?;
        let source = found.peer;
        Ok((source, found.wait(waits)?))
    }

    fn probe_until_found<T: Equivalence + Default + Clone>(&self, peer: Option<usize>, tag: i32, waits: &WaitState) -> Result<Pending<T>, PipelineError> {
        let mut backoff = Backoff(0);
        loop {
            if let Some(found) = self.try_recv_any_len(peer, tag)? {
                return Ok(found);
            }
            if let Some(rank) = waits.lost() {
                return Err(PipelineError::Lost { peer: rank, during: "receive".into() });
            }
            waits.polled();
            backoff.pause();
        }
    }

    /// A receive of the first matching message, if one has arrived.
    pub fn try_recv_any_len<T: Equivalence + Default + Clone>(&self, peer: Option<usize>, tag: i32) -> Result<Option<Pending<T>>, PipelineError> {
        let mut flag: c_int = 0;
        let mut msg = unsafe { ffi::RSMPI_MESSAGE_NULL };
        let mut status = empty_status();
        let source = match peer {
            Some(p) => p as c_int,
            None => unsafe { ffi::RSMPI_ANY_SOURCE },
        };
        // SAFETY: plain out-parameters.
        check(unsafe { ffi::MPI_Improbe(source, tag, self.raw, &mut flag, &mut msg, &mut status) }, "probe")?;
        if flag == 0 {
            return Ok(None);
        }
        let mut count: c_int = 0;
        check(unsafe { ffi::MPI_Get_count(&status, datatype::<T>(), &mut count) }, "probe")?;
        let mut buf = vec![T::default(); count.max(0) as usize];
        let mut req = unsafe { ffi::RSMPI_REQUEST_NULL };
        // SAFETY: msg is the matched message; the buffer has room for exactly its count.
        check(unsafe { ffi::MPI_Imrecv(buf.as_mut_ptr() as *mut _, count, datatype::<T>(), &mut msg, &mut req) }, "receive")?;
        let from = status.MPI_SOURCE.max(0) as usize;
        Ok(Some(Pending { req, buf: Some(buf), peer: from, what: "receive", posted: Instant::now() }))
    }

    /// Wait until every rank has reached this point (a polled MPI_Ibarrier, so a dead peer
    /// ends the wait with its name). Ranks leave within about one network latency of each
    /// other, which is what aligns their trace clocks.
    pub fn barrier(&self, waits: &WaitState) -> Result<(), PipelineError> {
        let mut req = unsafe { ffi::RSMPI_REQUEST_NULL };
        // SAFETY: raw is a valid communicator; req is an out-parameter.
        check(unsafe { ffi::MPI_Ibarrier(self.raw, &mut req) }, "barrier")?;
        let mut backoff = Backoff(0);
        loop {
            let mut flag: c_int = 0;
            let mut status = empty_status();
            // SAFETY: req came from MPI_Ibarrier above.
            check(unsafe { ffi::MPI_Test(&mut req, &mut flag, &mut status) }, "barrier")?;
            if flag != 0 {
                return Ok(());
            }
            if let Some(rank) = waits.lost() {
                return Err(PipelineError::Lost { peer: rank, during: "barrier".into() });
            }
            backoff.pause();
        }
    }

    /// Let MPI move the bytes of messages in flight. Open MPI's TCP transport only writes to
    /// its sockets inside MPI calls, so a large send posted before a long computation would
    /// otherwise sit until the next call; a probe for a tag nobody sends is such a call.
    pub fn progress(&self) {
        let mut flag: c_int = 0;
        let mut status = empty_status();
        // SAFETY: plain out-parameters on a valid communicator.
        unsafe { ffi::MPI_Iprobe(ffi::RSMPI_ANY_SOURCE, TAG_NEVER, self.raw, &mut flag, &mut status) };
    }

    /// Tell the runtime to end every rank. Does not return.
    pub fn abort(&self, code: i32) -> ! {
        // SAFETY: raw is a valid communicator.
        unsafe { ffi::MPI_Abort(self.raw, code) };
        std::process::exit(code)
    }
}

fn count_of(len: usize) -> Result<c_int, PipelineError> {
    c_int::try_from(len).map_err(|_| PipelineError::Mpi(format!("message of {len} values is larger than MPI's count limit")))
}

