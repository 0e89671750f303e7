//! A message in flight with its buffer, and a queue of sends that must all finish before
//! their wave ends.

use super::comm::datatype;
use super::{check, empty_status, Backoff, WaitState};
use crate::pipeline::PipelineError;
use mpi::ffi;
use mpi::traits::Equivalence;
use std::os::raw::c_int;
use std::time::Instant;

/// A message in flight with its buffer. Dropping one unfinished leaks the buffer (MPI may
/// still write to it); that only happens on the way to an abort.
pub struct Pending<T> {
    pub(super) req: ffi::MPI_Request,
    pub(super) buf: Option<Vec<T>>,
    pub(super) peer: usize,
    pub(super) what: &'static str,
    pub posted: Instant,
}

impl<T: Equivalence> Pending<T> {
    /// The other end: destination of a send, source of a receive.
    pub fn peer(&self) -> usize {
        self.peer
    }

    /// Whether it has finished, without blocking.
    pub fn test(&mut self) -> Result<Option<ffi::MPI_Status>, PipelineError> {
        let mut flag: c_int = 0;
        let mut status = empty_status();
        // SAFETY: `req` came from MPI_Isend/Irecv/Imrecv on `buf`, which we still own.
        check(unsafe { ffi::MPI_Test(&mut self.req, &mut flag, &mut status) }, self.what)?;
        Ok((flag != 0).then_some(status))
    }

    /// Poll until done; give up when the backstop has declared a peer lost.
    pub fn wait(mut self, waits: &WaitState) -> Result<Vec<T>, PipelineError> {
        waits.waiting_for(self.peer, self.what.starts_with("receive"));
        let result = self.poll_until_done(waits);
        waits.done_waiting();
        result
    }

    fn poll_until_done(&mut self, waits: &WaitState) -> Result<Vec<T>, PipelineError> {
        let mut backoff = Backoff(0);
        loop {
            if let Some(status) = self.test()? {
                crate::liveness::advanced();
                let mut count: c_int = 0;
                // SAFETY: status was filled by the completed MPI_Test.
                check(unsafe { ffi::MPI_Get_count(&status, datatype::<T>(), &mut count) }, self.what)?;
                let buf = self.buf.take().unwrap_or_default();
                if self.what.starts_with("receive") && count as usize != buf.len() {
                    return Err(PipelineError::BadMessage {
                        from: self.peer,
                        msg: format!("{}: expected {} values, got {count}", self.what, buf.len()),
                    });
                }
                return Ok(buf);
            }
            if let Some(rank) = waits.lost() {
                return Err(PipelineError::Lost { peer: rank, during: self.what.to_string() });
            }
            waits.polled();
            backoff.pause();
        }
    }

    /// Poll once; Some(buffer) when done (a send's buffer, for reuse or dropping).
    pub fn try_finish(&mut self) -> Result<Option<Vec<T>>, PipelineError> {
        Ok(self.test()?.map(|_| self.buf.take().unwrap_or_default()))
    }
}

impl<T> Drop for Pending<T> {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            // SAFETY: comparing the request handle to the null request constant.
            let done = self.req == unsafe { ffi::RSMPI_REQUEST_NULL };
            if !done {
                std::mem::forget(buf); // MPI may still use it: never free it under MPI's feet
            }
        }
    }
}

/// Sends in flight: finished ones are dropped as they are noticed; all must finish before
/// the wave ends so no buffer outlives its wave.
#[derive(Default)]
pub struct SendQueue<T> {
    pending: Vec<Pending<T>>,
    /// (seconds since posting) of each send that finished, for the trace.
    pub finished: Vec<(Instant, Instant, usize)>,
}

impl<T: Equivalence> SendQueue<T> {
    pub fn push(&mut self, p: Pending<T>) {
        self.pending.push(p);
    }

    /// Drop every finished send; never blocks.
    pub fn poll(&mut self) -> Result<(), PipelineError> {
        let mut i = 0;
        while i < self.pending.len() {
            if self.pending[i].try_finish()?.is_some() {
                crate::liveness::advanced();
                let p = self.pending.swap_remove(i);
                self.finished.push((p.posted, Instant::now(), p.peer));
            } else {
                i += 1;
            }
        }
        Ok(())
    }

    pub fn wait_all(&mut self, waits: &WaitState) -> Result<(), PipelineError> {
        for p in self.pending.drain(..) {
            let (posted, peer) = (p.posted, p.peer);
            p.wait(waits)?;
            self.finished.push((posted, Instant::now(), peer));
        }
        Ok(())
    }
}

