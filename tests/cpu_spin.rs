//! The CPU backend's spinners (src/backend/cpu/spin.rs): armed by a parallel op, they run the
//! pool's tasks while ops keep coming and hand their threads back to rayon once none come.
//! One test in its own process: the spinner count is process-wide. No assertion depends on
//! timing: on a loaded machine the spinners may find no work and leave between any two lines.

use falcon_batch::backend::cpu::{keep_workers_awake, spinners, CpuBackend};
use falcon_batch::backend::{Ops, WeightStream};
use falcon_batch::tensor::HostTensor;
use rayon::prelude::*;
use std::time::{Duration, Instant};

fn wait_for_no_spinners() -> Duration {
    let t0 = Instant::now();
    while spinners() > 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "spinners still running after 10 s without work");
        std::thread::sleep(Duration::from_millis(1));
    }
    t0.elapsed()
}

#[test]
fn spinners_run_the_pools_tasks_and_hand_their_threads_back() {
    rayon::ThreadPoolBuilder::new().num_threads(3).build_global().expect("the only pool of this process");
    // From outside the pool every worker spins.
    assert_eq!(keep_workers_awake(), 3, "one spinner per worker");
    // Arming again arms none while they run, so there are never more spinners than workers;
    // work done while they spin is done, and done right.
    for _ in 0..200 {
        let armed = keep_workers_awake();
        assert!(armed == 0 || armed == 3, "armed {armed}");
        assert!(spinners() <= 3, "{} spinners on 3 workers", spinners());
        let sum: u64 = (0..100_000u64).into_par_iter().map(|i| i % 7).sum();
        assert_eq!(sum, (0..100_000u64).map(|i| i % 7).sum::<u64>());
    }
    wait_for_no_spinners();
    // A call nested in a task on a worker arms none (it would send one to the job's thread).
    let armed_in_task: Vec<(usize, usize)> = (0..64)
        .into_par_iter()
        .filter(|_| rayon::current_thread_index() != Some(0))
        .map(|_| (keep_workers_awake(), spinners()))
        .collect();
    assert!(armed_in_task.iter().all(|&n| n == (0, 0)), "nested calls armed spinners (armed, running): {armed_in_task:?}");

    // A parallel GEMM arms them itself; its result is the same as without (a serial product).
    let b = CpuBackend::new();
    let (t, k, n) = (64, 256, 512);
    let xs: Vec<f32> = (0..t * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let ws: Vec<f32> = (0..n * k).map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect();
    let w = b.upload_weight(&HostTensor::from_f32(vec![n, k], &ws)).unwrap();
    let x = b.upload(&xs, t, k).unwrap();
    let first = b.download(&b.linear(&x, &w, None).unwrap()).unwrap();
    let armed = spinners();
    for _ in 0..20 {
        assert_eq!(b.download(&b.linear(&x, &w, None).unwrap()).unwrap(), first, "repeats are bit-identical");
    }
    println!("spinners armed by a GEMM: {armed}; back to rayon {:?} after the last", wait_for_no_spinners());
    let want: Vec<f32> = (0..t * n).map(|i| (0..k).map(|j| xs[i / n * k + j] * ws[i % n * k + j]).sum()).collect();
    for (g, e) in first.iter().zip(&want) {
        assert!((g - e).abs() <= 1e-4 * (1.0 + e.abs()), "{g} vs {e}");
    }
}
