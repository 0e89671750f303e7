//! Stopping and flushing under real mpirun (issue 28 §6): SIGINT or SIGTERM to the ranks
//! ends the job with 75 and a resumable file; SIGTERM or SIGINT to mpirun itself (`kill
//! <mpirun>`, Ctrl-C in a terminal) ends it with Open MPI's 1, the ranks flushing on the
//! SIGTERM mpirun sends them, and a second one within 5 s at once, unflushed, the rerun
//! repairing (README, "Signals and exit codes"); with the planner's wave,
//! documents reach the file while the job runs, not only at its end.

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
    score_with(docs, out, hold_ms, &[])
}

/// `score` as above, with `mpirun_args` (MCA options) on mpirun's command line.
fn score_with(docs: &Path, out: &Path, hold_ms: u64, mpirun_args: &[&str]) -> Command {
    let (m, _, _) = inputs();
    let hold = hold_ms.to_string();
    let mut c = mpirun(2, &[("FALCON_BATCH_HOLD_WAVE_MS", &hold)]);
    c.args(mpirun_args).arg(env!("CARGO_BIN_EXE_falcon-batch")).args(["score", "--device", "cpu", "--batch-tokens", "40", "--quiet"]);
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
    // As `pkill -INT -P <mpirun pid>` sends it: to every rank, not to mpirun
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

/// The MPI rank of a process mpirun started, from its environment.
fn world_rank(pid: i32) -> Option<usize> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|&b| b == 0).find_map(|kv| kv.strip_prefix(b"OMPI_COMM_WORLD_RANK=")).and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
}

#[test]
fn sigterm_to_a_serving_rank_alone_stops_the_job_with_75_and_a_resumable_file() {
    // As a `kill` of one process or a signal to one node's step gives it: the writer never
    // sees the signal itself (before, the job ran on and exited 0).
    let (_, docs, _) = inputs();
    let out = tmp().join("rank1.h5");
    let mut job = spawn_limited(&score(docs, &out, 300), LIMIT);
    wait_for_docs(&mut job, &out);
    let ranks = children(mpirun_pid(&job));
    let serving = ranks.iter().copied().find(|&p| world_rank(p) == Some(1)).expect("rank 1 runs");
    signal(serving, libc::SIGTERM);
    let o = job.wait();
    assert_eq!(o.code(), Some(75), "{}", o.stderr);
    for left in ["rank1.h5.reserve", "rank1.h5.lock"] {
        assert!(!tmp().join(left).exists(), "{left} is removed");
    }
    let n = docs_in(&out);
    assert!(n > 0 && n < 120, "{n} documents");
    rerun_completes(&out);
}

/// Send `sig` to mpirun itself once the file holds documents. mpirun runs with the README's
/// `--mca odls_base_sigkill_timeout 8`: it passes the ranks SIGTERM 8 s after the signal and
/// SIGKILL 8 s after that, time enough for the writer to finish its wave (held 1 s) and flush
/// on a busy machine (3 s once fell short: the lock was left).
fn signal_mpirun(sig: i32, out: &Path) {
    let (_, docs, _) = inputs();
    let mut job = spawn_limited(&score_with(docs, out, 1000, &["--mca", "odls_base_sigkill_timeout", "8"]), LIMIT);
    wait_for_docs(&mut job, out);
    let mpirun = mpirun_pid(&job);
    // Open MPI starts each rank in a process group of its own (odls_default_module.c,
    // do_child: setpgid(0, 0)), so the SIGINT a terminal sends its foreground group on
    // Ctrl-C reaches mpirun alone, exactly as the signal below does.
    // SAFETY: getpgid only reads a process attribute.
    let group = |p: i32| unsafe { libc::getpgid(p) };
    for rank in children(mpirun) {
        assert_eq!(group(rank), rank, "rank {rank} leads its own process group");
        assert_ne!(group(rank), group(mpirun), "rank {rank} is outside mpirun's group");
    }
    signal(mpirun, sig);
    let o = job.wait();
    // Open MPI 4.1 (ess_hnp_module.c, clean_abort) sets mpirun's exit status to 1 before it
    // stops the ranks and never lets their 75 replace it (README, "Signals and exit codes").
    assert_eq!(o.code(), Some(1), "{}", o.stderr);
    // The ranks got SIGTERM from mpirun, whichever signal mpirun got, and flushed: the
    // writer removed its reserve and lock. (Its "stopped by SIGTERM" line is not checked:
    // mpirun, ending the job, forwards the ranks' last output only sometimes.)
    let name = out.file_name().unwrap().to_string_lossy().to_string();
    for left in [format!("{name}.reserve"), format!("{name}.lock")] {
        assert!(!tmp().join(&left).exists(), "{left} is removed (mpirun ran {:?}): {}", o.took, o.stderr);
    }
    let n = docs_in(out);
    assert!(n > 0 && n < 120, "{n} documents");
    rerun_completes(out);
}

#[test]
fn sigterm_to_mpirun_ends_with_1_after_the_ranks_flush() {
    signal_mpirun(libc::SIGTERM, &tmp().join("term.h5"));
}

#[test]
fn ctrl_c_under_mpirun_reaches_mpirun_alone_and_ends_with_1_after_the_ranks_flush() {
    signal_mpirun(libc::SIGINT, &tmp().join("ctrl-c.h5"));
}

#[test]
fn a_second_ctrl_c_within_5_s_ends_mpirun_at_once_and_the_rerun_repairs_the_file() {
    let (_, docs, _) = inputs();
    let out = tmp().join("twice.h5");
    let mut job = spawn_limited(&score_with(docs, &out, 1000, &["--mca", "odls_base_sigkill_timeout", "30"]), LIMIT);
    wait_for_docs(&mut job, &out);
    let mpirun = mpirun_pid(&job);
    let ranks = children(mpirun);
    signal(mpirun, libc::SIGINT);
    std::thread::sleep(Duration::from_millis(500));
    signal(mpirun, libc::SIGINT);
    let o = job.wait();
    // abort_signal_callback exits 1 at once on a second signal within 5 s, long before the
    // 30 s after which the ranks would have had their SIGTERM: nothing was flushed.
    assert_eq!(o.code(), Some(1), "{}", o.stderr);
    assert!(o.took < Duration::from_secs(30), "mpirun exited at once: {:?}", o.took);
    assert!(!o.stderr.contains("stopped by"), "{}", o.stderr);
    // The ranks, orphaned in process groups of their own (out of reach of the test's group
    // kill), lose mpirun and die unflushed; the rerun takes over their lock and repairs the file.
    // (Gone, not only exited: a zombie still shows the lock's start time and holds the lock.)
    let alive = |p: i32| Path::new(&format!("/proc/{p}")).exists();
    let until = Instant::now() + Duration::from_secs(60);
    while ranks.iter().any(|&p| alive(p)) {
        assert!(Instant::now() < until, "ranks {ranks:?} outlive mpirun");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(tmp().join("twice.h5.lock").exists(), "the dead job's lock is left for the rerun to take over");
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
