//! Keeping the pool's workers awake between the CPU backend's parallel ops.
//!
//! A rayon worker that finds no work yields a few dozen times and then sleeps; the next op
//! wakes it with a futex call, and on a virtual machine the woken vCPU starts tens of
//! microseconds later. A decoded token is ~150 parallel ops of 50-300 µs (SmolLM2-135M), and
//! a worker that finishes its share early is often asleep when the next one starts:
//! `generate` made 157 context switches per token (`perf stat -e context-switches`, 2
//! threads) and spent 11% of its samples in the kernel's scheduler. So each parallel op
//! arms spinners: a job on every other worker of the pool that runs the pool's tasks as they
//! appear (`rayon::yield_now`) and hands the thread back to rayon once it has found none for
//! `SPIN_IDLE`. Between bursts of ops nothing spins.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a spinner waits for work before handing its thread back to rayon: longer than
/// the gaps between a token's ops (a few µs of serial work), far shorter than between jobs.
const SPIN_IDLE: Duration = Duration::from_micros(300);

/// Spinners running now (0: none armed). One count for the process: a rank has one pool.
static SPINNERS: AtomicUsize = AtomicUsize::new(0);

/// Arms spinners on every worker but the caller's, unless they are running already, and
/// returns how many it armed (0 when they were running or the call is nested). Only a
/// top-level call arms them: from outside the pool, or from worker 0, the job's own thread
/// where a rank's pool is built with `use_current_thread`. A call nested in a task on another
/// worker would send a spinner to the job's thread, which would then spin out its idle time
/// before going on.
pub fn keep_workers_awake() -> usize {
    let threads = rayon::current_num_threads();
    let caller = rayon::current_thread_index();
    if caller.is_some_and(|i| i != 0) {
        return 0;
    }
    let others = threads - usize::from(caller.is_some());
    if others == 0 || SPINNERS.compare_exchange(0, others, Ordering::AcqRel, Ordering::Acquire).is_err() {
        return 0;
    }
    rayon::spawn_broadcast(move |ctx| {
        if Some(ctx.index()) != caller {
            spin();
        }
    });
    others
}

fn spin() {
    let mut last_work = Instant::now();
    loop {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => last_work = Instant::now(),
            _ if last_work.elapsed() >= SPIN_IDLE => break,
            _ => std::hint::spin_loop(),
        }
    }
    SPINNERS.fetch_sub(1, Ordering::AcqRel);
}

/// Spinners running now.
pub fn spinners() -> usize {
    SPINNERS.load(Ordering::Acquire)
}
