//! slurm/falcon-batch.sbatch on a real Slurm (Debian's slurmctld + one slurmd per network-
//! namespace host, scripts/slurm-cluster.sh): 2 nodes x 2 tasks give the mpirun result, each
//! node's local disk holds only its ranks' parts, and `scontrol requeue` of the running job
//! (SIGTERM, then SIGKILL after KillWait) ends in the same file, every document once.
//!
//! Needs root (namespaces, mounts) and the Slurm packages (`scripts/setup-deps.sh --slurm`,
//! which `make test` runs): without them this test fails; it does not skip.

mod common;

use common::smol::{self, root};
use falcon_batch::results::{read_results, DocResult};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

// A small wave (1 micro-batch per rank) so that a SIGTERM mid-run finishes within KillWait.
const PLAN_FLAGS: &str = "--device-mem 4GB --resident 1 --group-layers 4 --batch-tokens 512 --wave 4";
const RANKS: usize = 4;

/// Runs a command to completion under a hard limit (timeout kills it and its children).
fn run(args: &[&str], limit_s: u64, env: &[(&str, &str)]) -> Output {
    let mut c = Command::new("timeout");
    c.args(["-k", "5", &limit_s.to_string()]).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn ok(o: &Output, what: &str) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{what}: {:?}\n{text}", o.status);
    text
}

/// The cluster, taken down when the test ends however it ends.
struct Cluster {
    script: PathBuf,
    env: Vec<(String, String)>,
}

impl Cluster {
    fn up() -> Cluster {
        let script = root().join("scripts/slurm-cluster.sh");
        let env = vec![
            ("FB_HOSTS_PREFIX".to_string(), std::env::var("FB_SLURM_TEST_PREFIX").unwrap_or_else(|_| "fbslurm".into())),
            ("FB_HOSTS_SUBNET".to_string(), std::env::var("FB_SLURM_TEST_SUBNET").unwrap_or_else(|_| "10.216.0".into())),
        ];
        let c = Cluster { script, env };
        ok(&c.script_run(&["up", "2"], 60), "slurm-cluster.sh up 2");
        c
    }

    fn env(&self) -> Vec<(&str, &str)> {
        self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
    }

    fn script_run(&self, args: &[&str], limit_s: u64) -> Output {
        let script = self.script.to_string_lossy().into_owned();
        let mut all = vec![script.as_str()];
        all.extend_from_slice(args);
        run(&all, limit_s, &self.env())
    }

    fn conf(&self) -> String {
        String::from_utf8_lossy(&self.script_run(&["conf"], 10).stdout).trim().to_string()
    }

    fn node_tmp(&self, k: usize) -> PathBuf {
        PathBuf::from(String::from_utf8_lossy(&self.script_run(&["tmp", &k.to_string()], 10).stdout).trim())
    }

    fn subnet(&self) -> &str {
        &self.env[1].1
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.script_run(&["down"], 60);
    }
}

/// Model, corpus, binary and scripts under /srv: a slurmd's /tmp is its own node-local disk,
/// so nothing the job reads may live in the test's /tmp.
struct Work {
    dir: PathBuf,
    model: PathBuf,
    docs: PathBuf,
    bin: PathBuf,
}

fn work() -> Work {
    let dir = PathBuf::from(format!("/srv/fb-slurm-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("slurm")).unwrap();
    for s in ["falcon-batch.sbatch", "stage-parts.sh", "run-rank.sh"] {
        std::fs::copy(root().join("slurm").join(s), dir.join("slurm").join(s)).unwrap();
    }
    let bin = dir.join("falcon-batch");
    std::fs::copy(env!("CARGO_BIN_EXE_falcon-batch"), &bin).unwrap();
    let model = dir.join("smollm2");
    smol::convert_smollm2(&model, &["--dtype", "bf16"], Duration::from_secs(300));
    let docs = dir.join("docs.jsonl");
    std::fs::copy(root().join("inputs/sample.jsonl"), &docs).unwrap();
    Work { dir, model, docs, bin }
}

impl Drop for Work {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Submit the sbatch script on 2 nodes x 2 tasks (CPU ranks); returns the job id.
fn submit(c: &Cluster, w: &Work, out: &Path) -> String {
    let subnet = format!("{}.0/24", c.subnet());
    let conf = c.conf();
    let mut env: Vec<(&str, &str)> = vec![
        ("SLURM_CONF", conf.as_str()),
        ("MODEL", w.model.to_str().unwrap()),
        ("DOCS", w.docs.to_str().unwrap()),
        ("OUT", out.to_str().unwrap()),
        ("FALCON_BATCH", w.bin.to_str().unwrap()),
        ("PLAN_FLAGS", PLAN_FLAGS),
        ("SCORE_FLAGS", "--device cpu"),
        ("OMPI_MCA_btl", "tcp,self"),
        ("OMPI_MCA_btl_tcp_if_include", subnet.as_str()),
        ("OMPI_MCA_oob_tcp_if_include", subnet.as_str()),
        ("HDF5_USE_FILE_LOCKING", "FALSE"),
    ];
    env.extend(c.env());
    let log = format!("{}/job-%j.out", w.dir.display());
    let o = Command::new("sbatch")
        .current_dir(&w.dir)
        .args(["--parsable", "--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--output", &log])
        .arg("slurm/falcon-batch.sbatch")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    ok(&o, "sbatch").trim().to_string()
}

fn job_field(conf: &str, job: &str, field: &str) -> String {
    let o = run(&["scontrol", "show", "job", job], 10, &[("SLURM_CONF", conf)]);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    text.split_whitespace().find_map(|kv| kv.strip_prefix(&format!("{field}="))).unwrap_or("").to_string()
}

fn job_log(w: &Work, job: &str) -> String {
    std::fs::read_to_string(w.dir.join(format!("job-{job}.out"))).unwrap_or_default()
}

/// Wait (bounded) until `done` holds, polling every half second.
fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn wait_completed(c: &Cluster, w: &Work, job: &str, limit: Duration) {
    let conf = c.conf();
    wait_for(&format!("job {job} to complete"), limit, || {
        let state = job_field(&conf, job, "JobState");
        assert!(!["FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"].contains(&state.as_str()), "job {job} {state}:\n{}", job_log(w, job));
        state == "COMPLETED"
    });
}

/// The reference: the same plan under plain mpirun on this host.
fn mpirun_reference(w: &Work) -> Vec<DocResult> {
    let out = w.dir.join("mpirun.h5");
    let mut args: Vec<String> = ["mpirun", "--oversubscribe", "-np", &RANKS.to_string()].iter().map(|s| s.to_string()).collect();
    args.push(w.bin.display().to_string());
    args.extend(["score", "--device", "cpu", "--quiet"].iter().map(|s| s.to_string()));
    for (flag, path) in [("--model", &w.model), ("--docs", &w.docs), ("--out", &out)] {
        args.push(flag.into());
        args.push(path.display().to_string());
    }
    args.extend(PLAN_FLAGS.split_whitespace().map(String::from));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let env = [("OMPI_ALLOW_RUN_AS_ROOT", "1"), ("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1"), ("HDF5_USE_FILE_LOCKING", "FALSE")];
    ok(&run(&argv, 300, &env), "mpirun reference");
    read_results(&out).unwrap()
}

fn assert_same(got: &[DocResult], want: &[DocResult], what: &str) {
    smol::assert_same_results(want, got, 1e-6, what)
}

/// What `plan --parts-for-rank` says ranks `ranks` read, plus manifest and tokenizer.
fn expected_staged(w: &Work, ranks: std::ops::Range<usize>) -> BTreeSet<String> {
    let mut files: BTreeSet<String> = ["manifest.json", "tokenizer.json"].iter().map(|s| s.to_string()).collect();
    for r in ranks {
        let mut args = vec![w.bin.to_str().unwrap(), "plan", "--model", w.model.to_str().unwrap(), "--ranks", "4"];
        let r = r.to_string();
        args.extend(["--parts-for-rank", r.as_str()]);
        args.extend(PLAN_FLAGS.split_whitespace());
        files.extend(ok(&run(&args, 30, &[]), "plan --parts-for-rank").lines().map(String::from));
    }
    files
}

fn staged(c: &Cluster, node: usize, w: &Work) -> BTreeSet<String> {
    let dir = c.node_tmp(node).join("falcon/falcon-batch").join(w.model.file_name().unwrap());
    std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
}

#[test]
fn sbatch_runs_stages_per_node_and_survives_requeue() {
    let c = Cluster::up();
    let w = work();
    let reference = mpirun_reference(&w);
    assert_eq!(reference.len(), 26);

    // 1. A plain run: 2 nodes x 2 tasks, srun --mpi=pmix, staged to each node's /tmp.
    let out = w.dir.join("run.h5");
    let job = submit(&c, &w, &out);
    wait_completed(&c, &w, &job, Duration::from_secs(240));
    assert_same(&read_results(&out).unwrap(), &reference, "sbatch vs mpirun");
    assert_eq!(staged(&c, 1, &w), expected_staged(&w, 0..2), "node 1 holds only ranks 0-1's parts");
    assert_eq!(staged(&c, 2, &w), expected_staged(&w, 2..4), "node 2 holds only ranks 2-3's parts");

    // 2. Preemption: requeue the running job once it is scoring.
    let out = w.dir.join("requeued.h5");
    let job = submit(&c, &w, &out);
    wait_for("all 4 ranks to load their parts", Duration::from_secs(120), || job_log(&w, &job).matches(" parts, ").count() >= RANKS);
    std::thread::sleep(Duration::from_secs(3));
    let conf = c.conf();
    ok(&run(&["scontrol", "requeue", &job], 20, &[("SLURM_CONF", &conf)]), "scontrol requeue");
    // Slurm holds a requeued job back (BeginTime, about two minutes); start it as soon as
    // its first run has ended, as a free cluster would.
    wait_for("the requeued job to be pending", Duration::from_secs(90), || job_field(&conf, &job, "JobState") == "PENDING");
    ok(&run(&["scontrol", "update", &format!("JobId={job}"), "StartTime=now"], 20, &[("SLURM_CONF", &conf)]), "scontrol update");
    wait_completed(&c, &w, &job, Duration::from_secs(300));
    assert_eq!(job_field(&conf, &job, "Restarts"), "1");
    let log = job_log(&w, &job);
    assert!(log.contains("stopped by SIGTERM"), "the first run stops on SIGTERM and flushes:\n{log}");
    assert!(log.contains("resuming: "), "the requeued run resumes:\n{log}");
    assert_same(&read_results(&out).unwrap(), &reference, "requeued vs uninterrupted");
}
