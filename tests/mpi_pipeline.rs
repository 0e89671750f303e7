//! The MPI pipeline under real mpirun: examples/pipeline_check runs a random model over 1-4
//! ranks and compares with one process; a killed rank ends every other rank; ranks that
//! disagree on the model refuse to start.

mod common;

use common::proc::{run_limited, Ran};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

/// Every launch is killed, with its process group, past this.
const LIMIT: Duration = Duration::from_secs(120);

/// mpirun jobs share the machine's few cores: one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The example binary, built once in this test's profile (cargo test --test does not build
/// examples).
fn check_binary() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe.parent().and_then(|d| d.parent()).expect("target/<profile>");
        let mut build = Command::new(env!("CARGO"));
        build.args(["build", "--example", "pipeline_check"]).current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.ends_with("release") {
            build.arg("--release");
        }
        let r = run_limited(&build, Duration::from_secs(900));
        assert!(r.success(), "building examples/pipeline_check failed:\n{}", r.text());
        profile_dir.join("examples").join("pipeline_check")
    })
}

fn mpirun(np: usize, mpi_args: &[&str], args: &[&str]) -> Ran {
    let mut c = Command::new("mpirun");
    c.args(["--oversubscribe", "-np", &np.to_string()]).args(mpi_args).arg(check_binary()).args(args);
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    run_limited(&c, LIMIT)
}

fn assert_matches_local(np: usize, args: &[&str]) {
    let out = mpirun(np, &[], args);
    let (t, took) = (out.text(), out.took);
    assert!(out.success(), "-np {np} {args:?} failed:\n{t}");
    assert!(t.contains("scored within"), "-np {np} {args:?}:\n{t}");
    if args.contains(&"--generate") {
        assert!(t.contains("greedy generation equals the local decoder"), "-np {np} {args:?}:\n{t}");
    }
    eprintln!("-np {np} {args:?}: ok in {:.1} s", took.as_secs_f64());
}

#[test]
fn one_rank_without_mpirun_is_a_singleton() {
    let _g = serial();
    let mut c = Command::new(check_binary());
    c.args(["--generate", "--waves", "1"]);
    let out = run_limited(&c, LIMIT);
    assert!(out.success(), "{}", out.text());
}

#[test]
fn scores_and_generation_equal_one_process_on_1_to_4_ranks() {
    let _g = serial();
    // More groups than ranks everywhere but -np 1: every rank swaps or double-buffers groups.
    assert_matches_local(1, &["--layers", "6", "--group-layers", "2", "--generate"]);
    assert_matches_local(2, &["--layers", "6", "--group-layers", "1", "--resident", "1", "--generate"]);
    assert_matches_local(3, &["--layers", "6", "--group-layers", "1", "--resident", "2", "--generate", "--family", "falcon"]);
    assert_matches_local(4, &["--layers", "8", "--group-layers", "1", "--resident", "1", "--generate", "--wave", "5"]);
}

#[test]
fn each_rank_reads_only_its_own_part_files() {
    let _g = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path().to_str().expect("utf-8 temp path");
    let common = ["--layers", "6", "--group-layers", "1"];
    let mut c = Command::new(check_binary());
    c.args(common).args(["--write-parts", d, "--ranks", "3"]);
    let w = run_limited(&c, LIMIT);
    assert!(w.success(), "{}", w.text());
    // Rank 1 runs layers 1 and 4 only: no embeddings, no head, no other layer in its folder.
    let mut files: Vec<String> =
        std::fs::read_dir(dir.path().join("rank1")).expect("rank1 dir").map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()).collect();
    files.sort();
    assert_eq!(files, vec!["layer_001.safetensors", "layer_004.safetensors"]);
    let mut args = common.to_vec();
    args.extend(["--parts", d]);
    assert_matches_local(3, &args);
}

/// Plain mpirun ends the job when a rank dies. (Its 395 s in CI once was this test waiting
/// on pipes that orphans held open; output now goes to files and the group is killed.)
#[test]
fn killed_rank_ends_the_others_through_mpirun() {
    let _g = serial();
    let out = mpirun(3, &[], &["--kill-rank", "1", "--kill-after-ms", "1500"]);
    let (t, took) = (out.text(), out.took);
    assert!(!out.success() && !out.timed_out, "{t}");
    assert!(took < Duration::from_secs(30), "took {took:?}:\n{t}");
    assert!(t.contains("rank 1"), "{t}");
}

/// With recovery on, mpirun leaves the survivors running: our own backstop must end them.
/// Each rank runs under a shell that records its exit code (a rank ended by another's
/// MPI_Abort leaves no record: its shell is killed with it, which is no success either).
#[test]
fn killed_rank_is_named_by_every_survivor_watchdog() {
    let _g = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let record = format!("\"$@\"; echo $? > {}/rc.$OMPI_COMM_WORLD_RANK", dir.path().display());
    let mut c = Command::new("mpirun");
    c.args(["--oversubscribe", "-np", "3", "--enable-recovery", "-x", "FALCON_BATCH_PEER_TIMEOUT_S=3"])
        .args(["sh", "-c", &record, "sh"])
        .arg(check_binary())
        .args(["--kill-rank", "1", "--kill-after-ms", "1500"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    let out = run_limited(&c, LIMIT);
    let (t, took) = (out.text(), out.took);
    assert!(took < Duration::from_secs(30), "took {took:?}:\n{t}");
    for survivor in [0, 2] {
        let named = t.lines().any(|l| l.starts_with(&format!("rank {survivor} (")) && l.contains("lost contact with rank 1 ("));
        assert!(named, "rank {survivor} did not name rank 1:\n{t}");
        if let Ok(rc) = std::fs::read_to_string(dir.path().join(format!("rc.{survivor}"))) {
            assert_ne!(rc.trim(), "0", "rank {survivor} exited 0:\n{t}");
        }
    }
    assert!(!t.contains("scored within"), "rank 0 finished as if nothing happened:\n{t}");
}

/// A rank whose main thread hangs (a device call, a file system) while its heartbeats go on
/// does not keep the job alive: liveness is progress, so every rank ends, naming it.
#[test]
fn a_stalled_rank_with_live_heartbeats_ends_the_job() {
    let _g = serial();
    let out = mpirun(3, &["-x", "FALCON_BATCH_PEER_TIMEOUT_S=3"], &["--stall-rank", "1", "--kill-after-ms", "1500"]);
    let (t, took) = (out.text(), out.took);
    assert!(!out.success() && !out.timed_out, "{t}");
    assert!(took < Duration::from_secs(30), "took {took:?}:\n{t}");
    assert!(t.lines().any(|l| l.contains("rank 1 (") && l.contains("no progress")), "rank 1 is not named:\n{t}");
    assert!(!t.contains("scored within"), "rank 0 finished as if nothing happened:\n{t}");
}

#[test]
fn ranks_with_a_different_model_refuse_to_start() {
    let _g = serial();
    let out = mpirun(3, &[], &["--odd-model-on-rank", "2"]);
    let t = out.text();
    assert!(!out.success(), "{t}");
    assert!(t.contains("rank 2 differs") && t.contains("some-other-model"), "{t}");
}
