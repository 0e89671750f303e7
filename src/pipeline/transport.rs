//! Point-to-point messages over raw MPI handles, every wait a polling loop.
//!
//! Why raw handles rather than rsmpi's scoped requests: a request here owns its buffer (a
//! hidden state is computed, sent and forgotten while the next micro-batch computes), which a
//! lexical `request::scope` cannot express without keeping every buffer of a wave alive.
//! Why polling: a blocking MPI wait on a dead peer never returns; `MPI_Test` in a loop lets
//! the wait notice the liveness backstop's verdict (cluster.rs) and give up with the peer's
//! name, and every completed message counts as progress (crate::liveness).

use super::PipelineError;
use mpi::ffi;
use mpi::raw::AsRaw;
use mpi::traits::Equivalence;
use std::os::raw::c_int;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the main thread's waits and the liveness backstop (cluster.rs) share: the rank the
/// backstop gave up on (every wait then fails naming it), and the peer the main thread is
/// waiting for right now (the backstop names it).
#[derive(Clone, Debug)]
pub struct Liveness {
    /// `usize::MAX` while every peer counts as alive, else the rank given up on.
    lost: Arc<AtomicUsize>,
    /// `usize::MAX` when not waiting, else peer * 2 + 1 for a receive, peer * 2 for a send.
    waiting: Arc<AtomicUsize>,
    /// `liveness::now_ms()` of the wait loop's last poll: a wait that stopped polling is a
    /// thread stuck in a call, not one waiting for a peer.
    polled_ms: Arc<AtomicU64>,
}

/// A waiting thread polls every 200 us; one silent for this long is stuck in a call.
const POLL_STALE_MS: u64 = 1000;

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            lost: Arc::new(AtomicUsize::new(usize::MAX)),
            waiting: Arc::new(AtomicUsize::new(usize::MAX)),
            polled_ms: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Liveness {
    pub fn mark_lost(&self, rank: usize) {
        let _ = self.lost.compare_exchange(usize::MAX, rank, Ordering::SeqCst, Ordering::SeqCst);
    }

    pub fn lost(&self) -> Option<usize> {
        match self.lost.load(Ordering::SeqCst) {
            usize::MAX => None,
            r => Some(r),
        }
    }

    fn waiting_for(&self, peer: usize, receive: bool) {
        self.polled();
        self.waiting.store(peer * 2 + usize::from(receive), Ordering::SeqCst);
    }

    fn polled(&self) {
        self.polled_ms.store(crate::liveness::now_ms(), Ordering::Relaxed);
    }

    fn done_waiting(&self) {
        self.waiting.store(usize::MAX, Ordering::SeqCst);
    }

    /// The peer the main thread waits for now, and whether for a "receive" or a "send";
    /// None when it is not waiting, or has stopped polling (stuck inside a call).
    pub fn waiting(&self) -> Option<(usize, &'static str)> {
        let fresh = crate::liveness::now_ms().saturating_sub(self.polled_ms.load(Ordering::Relaxed)) < POLL_STALE_MS;
        match self.waiting.load(Ordering::SeqCst) {
            usize::MAX => None,
            _ if !fresh => None,
            w => Some((w / 2, if w % 2 == 1 { "receive" } else { "send" })),
        }
    }
}

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

fn check(code: c_int, what: &str) -> Result<(), PipelineError> {
    if code == ffi::MPI_SUCCESS as c_int {
        Ok(())
    } else {
        Err(PipelineError::Mpi(format!("{what} failed with MPI error code {code}")))
    }
}

/// A tag no message carries: probing for it only drives MPI's progress.
const TAG_NEVER: i32 = 9;

fn datatype<T: Equivalence>() -> ffi::MPI_Datatype {
    T::equivalent_datatype().as_raw()
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

/// A message in flight with its buffer. Dropping one unfinished leaks the buffer (MPI may
/// still write to it); that only happens on the way to an abort.
pub struct Pending<T> {
    req: ffi::MPI_Request,
    buf: Option<Vec<T>>,
    peer: usize,
    what: &'static str,
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
    pub fn wait(mut self, live: &Liveness) -> Result<Vec<T>, PipelineError> {
        live.waiting_for(self.peer, self.what.starts_with("receive"));
        let result = self.poll_until_done(live);
        live.done_waiting();
        result
    }

    fn poll_until_done(&mut self, live: &Liveness) -> Result<Vec<T>, PipelineError> {
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
            if let Some(rank) = live.lost() {
                return Err(PipelineError::Lost { peer: rank, during: self.what.to_string() });
            }
            live.polled();
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
        live: &Liveness,
    ) -> Result<(usize, Vec<T>), PipelineError> {
        if let Some(p) = peer {
            live.waiting_for(p, true);
        }
        let found = self.probe_until_found(peer, tag, live);
        live.done_waiting();
        let found = found?;
        let source = found.peer;
        Ok((source, found.wait(live)?))
    }

    fn probe_until_found<T: Equivalence + Default + Clone>(&self, peer: Option<usize>, tag: i32, live: &Liveness) -> Result<Pending<T>, PipelineError> {
        let mut backoff = Backoff(0);
        loop {
            if let Some(found) = self.try_recv_any_len(peer, tag)? {
                return Ok(found);
            }
            if let Some(rank) = live.lost() {
                return Err(PipelineError::Lost { peer: rank, during: "receive".into() });
            }
            live.polled();
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
    pub fn barrier(&self, live: &Liveness) -> Result<(), PipelineError> {
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
            if let Some(rank) = live.lost() {
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

    pub fn wait_all(&mut self, live: &Liveness) -> Result<(), PipelineError> {
        for p in self.pending.drain(..) {
            let (posted, peer) = (p.posted, p.peer);
            p.wait(live)?;
            self.finished.push((posted, Instant::now(), peer));
        }
        Ok(())
    }
}

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
            .map_err(|e| PipelineError::Mpi(format!("cannot start the MPI progress thread: {e}")))?;
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
