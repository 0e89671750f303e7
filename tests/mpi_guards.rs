//! Stopping and flushing under real mpirun (issue 28 §6): SIGINT or SIGTERM to the ranks
//! ends the job with 75 and a resumable file; SIGTERM to mpirun leaves a resumable file (and
//! no lock in the rerun's way); with the planner's wave, documents reach the file while the
//! job runs, not only at its end.

mod common;

use common::proc::{run_limited, spawn_limited, Running};
use common::tiny::{bin, children, comm, corpus, docs_in, model, mpirun, signal};
use falcon_batch::results::read_results;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(240);

fn tmp() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| common::tmp::dir("fb-mpi-guards"))
}

/// The tiny model, a 120-document corpus and its single-process results.
fn inputs() -> &'static (PathBuf, PathBuf, PathBuf) {
    static IN: OnceLock<(PathBuf, PathBuf, PathBuf)> = OnceLock::new();
    IN.get_or_init(|| {
        let m = model(tmp());
        let docs = corpus(tmp(), "c.jsonl", 120);
        let reference = tmp().join("ref.h5");
        let mut c = bin();
        c.arg("score").arg("--model").arg(&m).arg("--docs").arg(&docs).arg("--out").arg(&reference).args(["--batch-tokens", "40", "--quiet"]);
        let o = run_limited(&c, LIMIT);
        assert_eq!(o.code(), Some(0), "{}", o.stderr);
        (m, docs, reference)
    })
}

/// `score` on two ranks with the planner's wave; the writer holds each wave `hold_ms`.
fn score(docs: &Path, out: &Path, hold_ms: u64) -> Command {
    let (m, _, _) = inputs();
    let hold = hold_ms.to_string();
    let mut c = mpirun(2, &[("FALCON_BATCH_HOLD_WAVE_MS", &hold)]);
    c.arg(env!("CARGO_BIN_EXE_falcon-batch")).args(["score", "--device", "cpu", "--batch-tokens", "40", "--quiet"]);
    c.arg("--model").arg(m).arg("--docs").arg(docs).arg("--out").arg(out);
    c
}

/// Wait until `out` holds documents while `job` still runs.
fn wait_for_docs(job: &mut Running, out: &Path) {
    let until = Instant::now() + Duration::from_secs(120);
    while docs_in(out) == 0 {
        assert!(Instant::now() < until && job.running(), "the job wrote nothing: {}", job.stderr_so_far());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// mpirun, the child of the `timeout` that started it.
fn mpirun_pid(job: &Running) -> i32 {
    children(job.pid()).into_iter().find(|&p| comm(p) == "mpirun").expect("mpirun runs")
}

/// The rerun of the same command completes the file to the single-process results.
fn rerun_completes(out: &Path) {
    let (_, docs, reference) = inputs();
    let o = run_limited(&score(docs, out, 0), LIMIT);
    assert_eq!(o.code(), Some(0), "the rerun resumes: {}", o.stderr);
    let (got, want) = (read_results(out).unwrap(), read_results(reference).unwrap());
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!((&g.id, g.best), (&w.id, w.best));
    }
}

#[test]
fn sigint_to_the_ranks_ends_the_job_with_75_and_a_resumable_file() {
    let (_, docs, _) = inputs();
    let out = tmp().join("int.h5");
    let mut job = spawn_limited(&score(docs, &out, 300), LIMIT);
    wait_for_docs(&mut job, &out);
    // Ctrl-C reaches every process of the foreground group: each rank gets it
    for rank in children(mpirun_pid(&job)) {
        signal(rank, libc::SIGINT);
    }
    let o = job.wait();
    assert_eq!(o.code(), Some(75), "{}", o.stderr);
    assert!(o.stderr.contains("stopped by SIGINT") && o.stderr.contains("run the same command again"), "{}", o.stderr);
    for left in ["int.h5.reserve", "int.h5.lock"] {
        assert!(!tmp().join(left).exists(), "{left} is removed");
    }
    let n = docs_in(&out);
    assert!(n > 0 && n < 120, "{n} documents");
    rerun_completes(&out);
}

#[test]
fn sigterm_to_mpirun_leaves_a_resumable_file() {
    let (_, docs, _) = inputs();
    let out = tmp().join("term.h5");
    let mut job = spawn_limited(&score(docs, &out, 300), LIMIT);
    wait_for_docs(&mut job, &out);
    signal(mpirun_pid(&job), libc::SIGTERM);
    let o = job.wait();
    // Open MPI's mpirun ends the job itself on SIGTERM (its ranks get SIGTERM, then SIGKILL a
    // second later) and exits 1 whatever they do (README, "Signals and exit codes").
    assert!(!o.timed_out && o.code() != Some(0), "{:?}: {}", o.code(), o.stderr);
    assert!(docs_in(&out) < 120);
    rerun_completes(&out);
}

#[test]
fn with_the_planners_wave_documents_reach_the_file_while_the_job_runs() {
    // 5 documents: fewer micro-batches of 40 rows (one or two each) than one full wave of
    // two ranks (4 each)
    let docs = corpus(tmp(), "c5.jsonl", 5);
    let out = tmp().join("flush.h5");
    let mut job = spawn_limited(&score(&docs, &out, 1000), LIMIT);
    let mut seen = vec![];
    while job.running() {
        let n = docs_in(&out);
        if job.running() && n > 0 {
            seen.push(n);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = job.wait();
    assert_eq!(o.code(), Some(0), "{}", o.stderr);
    assert_eq!(docs_in(&out), 5);
    assert!(seen.iter().any(|&n| n < 5), "documents were written only at the end: {seen:?}");
}

#[test]
fn a_30_mb_line_fails_alone_instead_of_stopping_every_rank() {
    let mut lines: Vec<String> = (0..4).map(common::tiny::doc_line).collect();
    // Tokenised whole before any length check, it once outlasted the peers' liveness timeout
    // (exit 70) on every rerun.
    lines.insert(2, serde_json::json!({"id": "huge", "prompt": "t5 ".repeat(10_000_000), "choices": ["t3", "t4"]}).to_string());
    let docs = tmp().join("huge.jsonl");
    std::fs::write(&docs, lines.join("\n") + "\n").unwrap();
    let out = tmp().join("huge.h5");
    let o = run_limited(&score(&docs, &out, 0), LIMIT);
    assert_eq!(o.code(), Some(3), "{}", o.stderr);
    let r = read_results(&out).unwrap();
    assert_eq!(r.len(), 5);
    assert!(r[2].error.contains("huge.jsonl:3: line too long") && r[2].error.contains("--max-line-bytes"), "{}", r[2].error);
    assert!(r.iter().enumerate().all(|(i, d)| i == 2 || d.is_ok()));
}
