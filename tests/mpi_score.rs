//! `falcon-batch score` under real mpirun: the same scores for -np 1..4 with several layer
//! groups per rank, and a job killed mid-run resumes to the uninterrupted file.

mod common;

use common::proc::{run_limited, Ran};
use common::smol::{self, assert_same_results, bin, root};
use falcon_batch::results::{read_results, DocResult};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

/// Every launch is killed, with its process group, past this.
const LIMIT: Duration = Duration::from_secs(300);

fn tmp() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| common::tmp::dir("fb-mpi-score"))
}

/// SmolLM2 (30 layers) converted once, and the first 6 sample documents plus a bad line.
fn inputs() -> &'static (PathBuf, PathBuf) {
    static IN: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    IN.get_or_init(|| {
        let model = tmp().join("smollm2");
        smol::convert_smollm2(&model, &[], LIMIT);
        let mut lines = smol::sample_lines(6);
        lines.insert(3, "{\"id\": \"broken\", \"choices\": [\"x\"]}".to_string());
        let docs = tmp().join("docs.jsonl");
        smol::write_corpus(&docs, &lines);
        (model, docs)
    })
}

/// `mpirun --oversubscribe -np N`, with `env` passed to the ranks and what every launch here needs.
fn mpirun(np: usize, env: &[(&str, &str)]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--oversubscribe", "-np", &np.to_string()]);
    for (k, v) in env {
        c.args(["-x", &format!("{k}={v}")]);
    }
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1").env("HDF5_USE_FILE_LOCKING", "FALSE");
    c
}

/// `score` of `docs` on `np` ranks; not --quiet, as the ranks' "layers" info lines are checked.
fn score_on(np: usize, docs: &Path, args: &[&str], out: &Path, env: &[(&str, &str)]) -> Ran {
    let (model, _) = inputs();
    let mut c = mpirun(np, env);
    c.arg(bin()).args(["score", "--device", "cpu"]);
    c.arg("--model").arg(model).arg("--docs").arg(docs).arg("--out").arg(out).args(args);
    run_limited(&c, LIMIT)
}

/// `score` of the 7-line corpus on `np` ranks.
fn score(np: usize, args: &[&str], out: &Path, env: &[(&str, &str)]) -> Ran {
    score_on(np, &inputs().1, args, out, env)
}

/// Two ranks whose command lines differ by `rank1_extra` on rank 1 (an MPMD launch).
fn two_ranks_differing_by(rank1_extra: &[&str], out: &Path) -> Ran {
    let (model, docs) = inputs();
    let common = format!("score --device cpu --quiet --model {} --docs {} --out {}", model.display(), docs.display(), out.display());
    let mut c = mpirun(1, &[]);
    c.arg(bin()).args(common.split(' ')).args([":", "-np", "1"]).arg(bin()).args(common.split(' ')).args(rank1_extra);
    run_limited(&c, LIMIT)
}

fn assert_same(want: &[DocResult], got: &[DocResult], what: &str) {
    assert_same_results(want, got, 1e-6, what)
}

fn reference() -> &'static Vec<DocResult> {
    static R: OnceLock<Vec<DocResult>> = OnceLock::new();
    R.get_or_init(|| {
        let out = tmp().join("np1-resident.h5");
        let o = score(1, &["--batch-tokens", "400", "--wave", "2"], &out, &[]);
        assert_eq!(o.code(), Some(3), "one bad line: exit 3\n{}", o.stderr);
        let r = read_results(&out).unwrap();
        assert_eq!(r.len(), 7);
        r
    })
}

#[test]
fn same_scores_on_one_to_four_ranks_with_several_groups_each() {
    let want = reference();
    for (np, group) in [(1, "10"), (2, "5"), (3, "5"), (4, "4")] {
        let out = tmp().join(format!("np{np}.h5"));
        let o = score(np, &["--group-layers", group, "--resident", "1", "--batch-tokens", "400", "--wave", "2"], &out, &[]);
        let err = &o.stderr;
        assert_eq!(o.code(), Some(3), "-np {np}: {err}");
        for r in 0..np {
            assert!(err.contains(&format!("rank {r}: layers")), "-np {np}: rank {r} did not print its part:\n{err}");
        }
        assert_same(want, &read_results(&out).unwrap(), &format!("-np {np}, --group-layers {group}"));
    }
}

#[test]
fn killed_job_resumes_to_the_uninterrupted_result() {
    let want = reference();
    let out = tmp().join("killed.h5");
    // one document per micro-batch and wave, so results reach the file one by one
    let args = ["--group-layers", "5", "--batch-tokens", "64", "--wave", "1"];
    let o = score(3, &args, &out, &[("FALCON_BATCH_KILL_AFTER_DOCS", "3")]);
    assert!(!o.success() && !o.timed_out, "the killed job must fail: {}", o.text());
    let partial = read_results(&out).unwrap();
    assert!(partial.len() >= 3 && partial.len() < 7, "{} documents after the kill", partial.len());
    let o = score(3, &args, &out, &[]);
    assert_eq!(o.code(), Some(3), "{}", o.stderr);
    assert_same(want, &read_results(&out).unwrap(), "resumed under mpirun");
}

#[test]
fn ranks_with_different_options_refuse_to_start() {
    // rank 1 gets another norm through a per-rank environment: the options differ
    let out = tmp().join("mismatch.h5");
    let o = two_ranks_differing_by(&["--norm", "mean"], &out);
    let err = &o.stderr;
    assert!(!o.success() && !o.timed_out, "{}", o.text());
    assert!(err.contains("rank 1"), "{err}");
}

fn generate_on(np: usize, args: &[&str]) -> String {
    let (model, _) = inputs();
    let mut c = mpirun(np, &[]);
    c.arg(bin()).args(["generate", "--device", "cpu", "--model"]).arg(model).args(args);
    let o = run_limited(&c, LIMIT);
    assert!(o.success(), "-np {np}: {}", o.stderr);
    o.stdout
}

#[test]
fn generation_is_the_same_on_any_number_of_ranks() {
    let prompts = tmp().join("prompts.jsonl");
    let gen: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/smollm2/generate.json")).unwrap()).unwrap();
    let runs = gen["runs"].as_array().unwrap();
    let lines: Vec<String> = runs.iter().enumerate().map(|(i, r)| serde_json::json!({"id": i.to_string(), "prompt": r["prompt"]}).to_string()).collect();
    std::fs::write(&prompts, lines.join("\n") + "\n").unwrap();
    let p = prompts.to_str().unwrap();
    // greedy over 2 ranks equals HF transformers' greedy generate
    let greedy = generate_on(2, &["--prompts", p, "--max-new-tokens", "24", "--group-layers", "5"]);
    for (line, run) in greedy.lines().zip(runs) {
        let out: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(out["tokens"], serde_json::json!(smol::golden_tokens(&gen, run)), "prompt {}", run["prompt"]);
    }
    // an f16 cache keeps those greedy tokens on these prompts
    let greedy16 = generate_on(2, &["--prompts", p, "--max-new-tokens", "24", "--group-layers", "5", "--kv-cache", "f16"]);
    for (line, run) in greedy16.lines().zip(runs) {
        let out: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(out["tokens"], serde_json::json!(smol::golden_tokens(&gen, run)), "f16 cache, prompt {}", run["prompt"]);
    }
    // on the bf16 route a bf16 cache holds what that route rounds an f32 cache's keys and
    // values to as it reads them: the same output to the byte
    let bf16_route = ["--prompts", p, "--max-new-tokens", "24", "--group-layers", "5", "--compute-dtype", "bf16", "--kv-cache"];
    let f32_cache = generate_on(2, &[&bf16_route[..], &["f32"]].concat());
    assert_eq!(generate_on(2, &[&bf16_route[..], &["bf16"]].concat()), f32_cache, "bf16 route, bf16 cache vs f32 cache");
    // sampling with a seed: the same text on 1 and 3 ranks
    let sample = ["--prompts", p, "--max-new-tokens", "12", "--temperature", "0.8", "--top-p", "0.9", "--seed", "7", "--group-layers", "5"];
    assert_eq!(generate_on(1, &sample), generate_on(3, &sample));
}

#[test]
fn a_narrow_cache_on_cuda_is_refused_naming_the_option() {
    // Refused before any device or model is opened, with or without a GPU.
    for dtype in ["f16", "bf16"] {
        let o = Command::new(bin()).args(["generate", "--device", "cuda", "--kv-cache", dtype, "--model", "unused", "--prompt", "hi"]).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{err}");
        assert!(err.contains(&format!("--kv-cache {dtype} is for the CPU backend (--device cpu)")), "{err}");
    }
}

/// The whole sample corpus (26 documents), for the wire-dtype comparison.
fn full_sample() -> PathBuf {
    let p = tmp().join("sample.jsonl");
    if !p.exists() {
        std::fs::copy(root().join("inputs/sample.jsonl"), &p).unwrap();
    }
    p
}

fn score_full(np: usize, wire: &str, out: &Path) -> Vec<DocResult> {
    let o = score_on(np, &full_sample(), &["--wire-dtype", wire, "--batch-tokens", "512"], out, &[]);
    assert!(o.success(), "-np {np} --wire-dtype {wire}: {}", o.stderr);
    read_results(out).unwrap()
}

#[test]
fn bf16_wire_keeps_the_best_choices_of_f32_wire() {
    // f32 on the wire equals one process exactly (the test above); bf16 rounds each hidden
    // value to 8 significant bits at each hop. Measured on this corpus (docs/PERFORMANCE.md):
    // at most 0.022 nats per choice (0.0062 per token) after one hop and 0.057 after two;
    // the bound allows 0.05 per hop, a little over twice the one-hop worst case.
    let want = score_full(2, "f32", &tmp().join("wire-f32.h5"));
    assert_eq!(want.len(), 26);
    for np in [2, 3] {
        let got = score_full(np, "bf16", &tmp().join(format!("wire-bf16-np{np}.h5")));
        let hops = (np - 1) as f64;
        let mut worst: f64 = 0.0;
        for (x, y) in want.iter().zip(&got) {
            assert_eq!((&x.id, x.best), (&y.id, y.best), "-np {np}: best choice of {} differs with bf16 on the wire", x.id);
            for (cx, cy) in x.choices.iter().zip(&y.choices) {
                worst = worst.max((cx.logprob - cy.logprob).abs());
            }
        }
        eprintln!("-np {np}: bf16 vs f32 wire, max |Δ logprob| per choice {worst:.4}");
        assert!(worst <= 0.05 * hops, "-np {np}: bf16 wire moved a choice's log-prob by {worst}");
    }
}

#[test]
fn ranks_with_different_wire_dtypes_refuse_to_start() {
    let out = tmp().join("wire-mismatch.h5");
    let o = two_ranks_differing_by(&["--wire-dtype", "bf16"], &out);
    let err = &o.stderr;
    assert!(!o.success());
    assert!(err.contains("rank 1") && err.contains("--wire-dtype bf16") && err.contains("--wire-dtype f32"), "{err}");
}

#[test]
fn one_trace_per_job_with_a_track_per_rank_and_the_planners_wave() {
    let trace = tmp().join("job-trace.json");
    let out = tmp().join("traced.h5");
    // No --wave: the planner's (4 per rank = 12) applies; the first waves ramp up (1, 2, 4, ...
    // micro-batches, so results reach the file early), so the 6 one-document micro-batches
    // travel as waves of 1, 2 and 3 (mb0..mb2); a wave of 2 would have stopped at mb1.
    let o = score(3, &["--group-layers", "5", "--batch-tokens", "64", "--trace", trace.to_str().unwrap()], &out, &[]);
    assert_eq!(o.code(), Some(3), "{}", o.stderr);
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let events = v["traceEvents"].as_array().unwrap();
    let mut pids: Vec<u64> = events.iter().filter(|e| e["ph"] == "X").map(|e| e["pid"].as_u64().unwrap()).collect();
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids, vec![0, 1, 2], "one process track per rank");
    let named: Vec<&str> = events.iter().filter(|e| e["name"] == "process_name").map(|e| e["args"]["name"].as_str().unwrap()).collect();
    assert_eq!(named, vec!["rank 0", "rank 1", "rank 2"]);
    for e in events.iter().filter(|e| e["ph"] == "X") {
        assert!(e["ts"].as_f64().unwrap() >= 0.0 && e["dur"].as_f64().unwrap() >= 0.0, "{e}");
    }
    assert!(events.iter().any(|e| e["ph"] == "X" && e["name"] == "g0 mb2"), "the planner's wave did not apply");
    let stray: Vec<_> = std::fs::read_dir(tmp()).unwrap().flatten().filter(|f| f.file_name().to_string_lossy().contains(".rank")).collect();
    assert!(stray.is_empty(), "per-rank trace files were written: {stray:?}");
}

/// Open MPI binds each rank to one core when -np <= 2: a CPU rank left fewer CPUs than its
/// share of the node says so at start and names the fix; an unbound one says nothing.
#[test]
fn a_rank_bound_to_fewer_cpus_than_its_share_says_so() {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        eprintln!("skipped: this machine has one CPU, so no binding leaves a rank short");
        return;
    }
    let (model, docs) = inputs();
    for (bind, warns) in [("core", true), ("none", false)] {
        let out = tmp().join(format!("bind-{bind}.h5"));
        let mut c = mpirun(1, &[]);
        c.args(["--bind-to", bind]).arg(bin()).args(["score", "--device", "cpu", "--quiet"]);
        c.arg("--model").arg(model).arg("--docs").arg(docs).arg("--out").arg(&out);
        let o = run_limited(&c, LIMIT);
        // The corpus holds one broken line: exit code 3 (done, with failed documents).
        assert!(!o.timed_out && o.code() == Some(3), "--bind-to {bind}: {}", o.text());
        let said = o.stderr.contains("this rank may run only on CPU") && o.stderr.contains("--bind-to none");
        assert_eq!(said, warns, "--bind-to {bind}: {}", o.stderr);
    }
}
