//! falcon-batch over several test hosts (network namespaces on a bridge, scripts/testhosts.sh)
//! with Open MPI over TCP: the same scores and greedy generation as one process; a host that
//! cannot be reached at start is named; a link cut mid-run ends every process within a
//! minute, naming the lost rank and host, and the same command then resumes.
//!
//! Needs root and iproute2 (CI runs as root); without them these tests fail, saying so.

mod common;

use common::hosts::TestHosts;
use common::proc::{run_limited, spawn_limited};
use common::smol::{self, assert_same_results, bin, root};
use falcon_batch::results::{read_results, DocResult};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// Every launch is killed, with its process group, past this.
const LIMIT: Duration = Duration::from_secs(180);

/// The jobs share the machine's few cores: one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn tmp() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| common::tmp::dir("fb-multi-host"))
}

/// SmolLM2 (30 layers) converted once, and the first 8 sample documents.
fn inputs() -> &'static (PathBuf, PathBuf) {
    static IN: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    IN.get_or_init(|| {
        let model = tmp().join("smollm2");
        smol::convert_smollm2(&model, &[], LIMIT);
        let docs = tmp().join("docs.jsonl");
        smol::write_corpus(&docs, &smol::sample_lines(8));
        (model, docs)
    })
}

/// Not --quiet: the ranks' "layers" info lines show that a job started.
fn score_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let (model, docs) = inputs();
    let mut a: Vec<String> = ["score", "--device", "cpu", "--model"].iter().map(|s| s.to_string()).collect();
    for p in [model.as_path(), Path::new("--docs"), docs.as_path(), Path::new("--out"), out] {
        a.push(p.display().to_string());
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// The one-process scores, without mpirun.
fn reference() -> &'static Vec<DocResult> {
    static R: OnceLock<Vec<DocResult>> = OnceLock::new();
    R.get_or_init(|| {
        let out = tmp().join("np1.h5");
        let mut c = Command::new(bin());
        c.args(score_args(&out, &["--batch-tokens", "400", "--wave", "2"])).env("HDF5_USE_FILE_LOCKING", "FALSE");
        let r = run_limited(&c, LIMIT);
        assert_eq!(r.code(), Some(0), "one process: {}", r.text());
        let docs = read_results(&out).expect("read the one-process results");
        assert_eq!(docs.len(), 8);
        docs
    })
}

const ENV: [(&str, &str); 1] = [("HDF5_USE_FILE_LOCKING", "FALSE")];

#[test]
fn scores_and_generation_over_2_to_4_hosts_equal_one_process() {
    let _g = serial();
    let want = reference();
    let hosts = TestHosts::up(4, "1gbit");
    // The ranks land one per host in turn, each host with its own name.
    let r = run_limited(&hosts.mpirun(4, 4, &[], Path::new("hostname"), &[]), LIMIT);
    let mut names: Vec<&str> = r.stdout.lines().collect();
    names.sort();
    let expected: Vec<String> = (1..=4).map(|k| hosts.host(k)).collect();
    assert_eq!(names, expected, "{}", r.text());
    for (np, n_hosts, group) in [(2, 2, "5"), (3, 3, "5"), (4, 4, "4")] {
        let out = tmp().join(format!("np{np}-hosts{n_hosts}.h5"));
        let args = score_args(&out, &["--group-layers", group, "--resident", "1", "--batch-tokens", "400", "--wave", "2"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = run_limited(&hosts.mpirun(np, n_hosts, &ENV, bin(), &args), LIMIT);
        let what = format!("-np {np} over {n_hosts} hosts");
        assert_eq!(r.code(), Some(0), "{what}: {}", r.text());
        // Each host reports the same cores: the harness must not bind every rank to core 0.
        assert!(!r.stderr.contains("may run only on CPU"), "{what}: ranks bound by mpirun: {}", r.stderr);
        assert_same_results(want, &read_results(&out).expect("read results"), 1e-6, &what);
        eprintln!("{what}: same scores, {:.1} s", r.took.as_secs_f64());
    }

    // Greedy generation over 2 hosts equals HF transformers' greedy generate (which the
    // one-process decoder is tested against in tests/smollm2.rs).
    let (model, _) = inputs();
    let gen: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/smollm2/generate.json")).expect("generate.json")).expect("json");
    let runs = gen["runs"].as_array().expect("runs");
    let prompts = tmp().join("prompts.jsonl");
    let lines: Vec<String> = runs.iter().enumerate().map(|(i, r)| serde_json::json!({"id": i.to_string(), "prompt": r["prompt"]}).to_string()).collect();
    std::fs::write(&prompts, lines.join("\n") + "\n").expect("write prompts");
    let (m, p) = (model.display().to_string(), prompts.display().to_string());
    let args = ["generate", "--device", "cpu", "--model", &m, "--prompts", &p, "--max-new-tokens", "8", "--group-layers", "5"];
    let r = run_limited(&hosts.mpirun(2, 2, &[], bin(), &args), LIMIT);
    assert!(r.success(), "generate over 2 hosts: {}", r.text());
    let outs: Vec<serde_json::Value> = r.stdout.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(outs.len(), runs.len(), "{}", r.text());
    for (out, run) in outs.iter().zip(runs) {
        let got: Vec<u64> = out["tokens"].as_array().expect("tokens").iter().filter_map(|t| t.as_u64()).collect();
        // At most 8: a run whose end-of-sequence token came 8th ends at 7 tokens.
        let want: Vec<u64> = smol::golden_tokens(&gen, run).into_iter().take(8).collect();
        assert_eq!(got, want, "prompt {}", run["prompt"]);
    }
}

#[test]
fn a_host_unreachable_at_start_is_named_within_30_s() {
    let _g = serial();
    let hosts = TestHosts::up(3, "1gbit");
    hosts.cut(3);
    let out = tmp().join("unreachable.h5");
    let args = score_args(&out, &["--group-layers", "5"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = run_limited(&hosts.mpirun(3, 3, &ENV, bin(), &args), Duration::from_secs(60));
    assert!(!r.success(), "started with a host unreachable:\n{}", r.text());
    assert!(r.took < Duration::from_secs(30), "took {:.1} s:\n{}", r.took.as_secs_f64(), r.text());
    assert!(r.text().contains(&hosts.host(3)), "the unreachable host {} is not named:\n{}", hosts.host(3), r.text());
}

#[test]
fn a_link_cut_mid_run_ends_every_process_within_60_s_and_the_same_command_resumes() {
    let _g = serial();
    let want = reference();
    let hosts = TestHosts::up(3, "1gbit");
    let out = tmp().join("cut.h5");
    // One document per micro-batch and wave, so results reach the file one by one.
    let args = score_args(&out, &["--group-layers", "5", "--batch-tokens", "64", "--wave", "1"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let env = [("HDF5_USE_FILE_LOCKING", "FALSE"), ("FALCON_BATCH_PEER_TIMEOUT_S", "5")];
    let mut job = spawn_limited(&hosts.mpirun(3, 3, &env, bin(), &args), LIMIT);
    // Let a few documents reach the file (flushed after each batch; a read between flushes
    // may fail, and is tried again), then pull host 3's cable.
    for r in 0..3 {
        assert!(job.wait_for_stderr(&format!("rank {r}: layers"), Duration::from_secs(60)), "rank {r} did not start:\n{}", job.stderr_so_far());
    }
    let started = Instant::now();
    while !read_results(&out).is_ok_and(|d| d.len() >= 3) {
        assert!(started.elapsed() < Duration::from_secs(60), "no 3 documents in the file after 60 s:\n{}", job.stderr_so_far());
        std::thread::sleep(Duration::from_millis(200));
    }
    hosts.cut(3);
    let cut_at = Instant::now();
    let r = job.wait();
    let ended = cut_at.elapsed();
    let t = r.text();
    assert!(!r.success() && !r.timed_out, "the job must fail on its own, exit {:?}:\n{t}", r.status);
    assert!(ended < Duration::from_secs(60), "the job took {:.1} s to end after the cut:\n{t}", ended.as_secs_f64());
    assert!(t.contains(&format!("lost contact with rank 2 ({})", hosts.host(3))), "rank 2 on {} is not named:\n{t}", hosts.host(3));
    // Nothing of the job is left on any host (the daemon behind the cut may take a few
    // seconds more than mpirun to notice): within 60 s of the cut.
    let left = || -> Vec<String> {
        (1..=3)
            .flat_map(|k| {
                let mut c = Command::new("ip");
                c.args(["netns", "pids", &hosts.host(k)]);
                let pids = run_limited(&c, Duration::from_secs(10)).stdout;
                pids.split_whitespace().filter(|p| !is_zombie(p)).map(|p| format!("{} on {}", process_name(p), hosts.host(k))).collect::<Vec<_>>()
            })
            .collect()
    };
    while !left().is_empty() && cut_at.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(left().is_empty(), "processes left 60 s after the cut: {:?}:\n{t}", left());
    let partial = read_results(&out).expect("read the partial results");
    assert!(partial.len() >= 3 && partial.len() < 8, "{} documents in the file after the cut", partial.len());
    eprintln!("the job ended {:.1} s after the cut, with {} of 8 documents written", ended.as_secs_f64(), partial.len());

    hosts.restore(3);
    let r = run_limited(&hosts.mpirun(3, 3, &env, bin(), &args), LIMIT);
    assert_eq!(r.code(), Some(0), "the resumed job: {}", r.text());
    assert_same_results(want, &read_results(&out).expect("read the resumed results"), 1e-6, "resumed after a cut link");
}

fn process_name(pid: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cmdline")).map(|c| c.replace('\0', " ")).unwrap_or_else(|_| format!("pid {pid}"))
}

/// A zombie is gone (only its exit status is left, for a parent outside the test to reap).
fn is_zombie(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z')).unwrap_or(true)
}
