//! No job can be destroyed or stopped forever (issue 28 §3, §5, §6), through the binary: one
//! job per results file (its lock, stale locks taken over), per-document limits, documents
//! cut under --batch-tokens, corpora on pipes, paths that would destroy each other, SIGINT.

mod common;

use common::proc::{run_limited, spawn_limited, Ran, Running};
use common::tiny::{bin, children, corpus, doc_line, docs_in, model, signal, writer_pid};
use falcon_batch::results::read_results;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(240);

fn tmp(name: &str) -> PathBuf {
    common::tmp::dir(&format!("fb-guards-{name}"))
}

fn score(model: &Path, docs: &Path, out: &Path) -> Command {
    let mut c = bin();
    c.arg("score").arg("--model").arg(model).arg("--docs").arg(docs).arg("--out").arg(out);
    c.args(["--batch-tokens", "40", "--wave", "1"]);
    c
}

fn run(c: &Command) -> Ran {
    run_limited(c, LIMIT)
}

/// Wait until `out` holds documents while `job` still runs (a job past its first wave).
fn wait_for_docs(job: &mut Running, out: &Path) {
    let until = Instant::now() + Duration::from_secs(120);
    while docs_in(out) == 0 {
        assert!(Instant::now() < until && job.running(), "the job wrote nothing: {}", job.stderr_so_far());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_second_job_on_a_running_jobs_output_is_refused_overwrite_included() {
    let d = tmp("lock");
    let (m, docs) = (model(&d), corpus(&d, "c.jsonl", 30));
    let out = d.join("r.h5");
    let mut first = spawn_limited(score(&m, &docs, &out).env("FALCON_BATCH_HOLD_WAVE_MS", "400"), LIMIT);
    wait_for_docs(&mut first, &out);
    let other = corpus(&d, "other.jsonl", 5);
    for (extra, hdf5_locking) in [(None, "FALSE"), (Some("--overwrite"), "FALSE"), (Some("--overwrite"), "TRUE")] {
        let mut c = score(&m, &other, &out);
        c.env("HDF5_USE_FILE_LOCKING", hdf5_locking).args(extra);
        let o = run(&c);
        let e = &o.stderr;
        assert_eq!(o.code(), Some(1), "{extra:?}, HDF5 locking {hdf5_locking}: {e}");
        let pid = writer_pid(&out).expect("the first job's lock names it");
        assert!(e.contains(&format!("is being written by pid {pid} on host")) && e.contains("wait for it or stop it"), "{e}");
        assert!(!e.contains("--overwrite"), "the lock error never advises --overwrite: {e}");
    }
    let o = first.wait();
    assert_eq!(o.code(), Some(0), "the first job finishes undisturbed: {}", o.stderr);
    let ids: Vec<String> = read_results(&out).unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(ids, (0..30).map(|i| format!("d{i}")).collect::<Vec<_>>());
    assert!(!d.join("r.h5.lock").exists(), "the lock goes with its job");
}

/// A lock file as a job on `host` with `pid` would leave it.
fn write_lock(out: &Path, host: &str, pid: u32, age: Duration) {
    let lock = PathBuf::from(format!("{}.lock", out.display()));
    let body = serde_json::json!({"host": host, "pid": pid, "since": "2026-01-01T00:00:00Z", "start_tick": 1, "cmdline": "falcon-batch score"});
    std::fs::write(&lock, body.to_string()).unwrap();
    let f = std::fs::File::options().append(true).open(&lock).unwrap();
    f.set_modified(std::time::SystemTime::now() - age).unwrap();
}

#[test]
fn a_stale_lock_is_taken_over_and_a_live_one_from_another_host_is_not() {
    let d = tmp("stale");
    let (m, docs) = (model(&d), corpus(&d, "c.jsonl", 5));
    let out = d.join("r.h5");
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
    let mut gone = Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    // a dead job of this host, however fresh its lock
    write_lock(&out, &host, gone.id(), Duration::ZERO);
    let o = run(&score(&m, &docs, &out));
    assert_eq!(o.code(), Some(0), "{}", o.stderr);
    assert!(o.stderr.contains("took over the lock of a job that is gone"), "{}", o.stderr);
    // a job on another host whose heartbeat is recent holds it; one silent for long does not
    write_lock(&out, "elsewhere", 1, Duration::from_secs(5));
    let o = run(score(&m, &docs, &out).arg("--overwrite"));
    assert_eq!(o.code(), Some(1), "{}", o.stderr);
    assert!(o.stderr.contains("is being written by pid 1 on host elsewhere since 2026-01-01T00:00:00Z"), "{}", o.stderr);
    write_lock(&out, "elsewhere", 1, Duration::from_secs(3600));
    let o = run(&score(&m, &docs, &out));
    assert_eq!(o.code(), Some(0), "{}", o.stderr);
    assert_eq!(docs_in(&out), 5);
    // a fresh lock of another host left by an earlier run of this same (requeued) Slurm job
    write_lock(&out, "elsewhere", 1, Duration::ZERO);
    let lock = PathBuf::from(format!("{}.lock", out.display()));
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&lock).unwrap()).unwrap();
    v["batch_job"] = "4242".into();
    std::fs::write(&lock, v.to_string()).unwrap();
    let o = run(score(&m, &docs, &out).env("SLURM_JOB_ID", "4243"));
    assert_eq!(o.code(), Some(1), "another batch job's lock holds: {}", o.stderr);
    let o = run(score(&m, &docs, &out).env("SLURM_JOB_ID", "4242"));
    assert_eq!(o.code(), Some(0), "{}", o.stderr);
    assert!(o.stderr.contains("took over the lock"), "{}", o.stderr);
}

#[test]
fn corpus_results_and_csv_must_be_three_files_and_the_csv_directory_is_made_first() {
    let d = tmp("paths");
    let (m, docs) = (model(&d), corpus(&d, "c.jsonl", 4));
    let before = std::fs::read(&docs).unwrap();
    let o = run(score(&m, &docs, &d.join("./c.jsonl")).arg("--overwrite"));
    assert_eq!(o.code(), Some(2), "{}", o.stderr);
    assert!(o.stderr.contains("are the same file"), "{}", o.stderr);
    assert_eq!(std::fs::read(&docs).unwrap(), before, "the corpus is untouched");
    let out = d.join("r.h5");
    std::fs::create_dir_all(d.join("new")).unwrap();
    let o = run(score(&m, &docs, &out).arg("--csv").arg(d.join("new/../r.h5")));
    assert_eq!(o.code(), Some(2), "{}", o.stderr);
    assert!(o.stderr.contains("--out") && o.stderr.contains("--csv") && o.stderr.contains("same file"), "{}", o.stderr);
    assert!(!out.exists(), "nothing written");
    let csv = d.join("new/dir/r.csv");
    let o = run(score(&m, &docs, &out).arg("--csv").arg(&csv));
    assert_eq!(o.code(), Some(0), "{}", o.stderr);
    assert_eq!(std::fs::read_to_string(&csv).unwrap().lines().count(), 1 + 4 * 3);
    // a CSV path that is a directory stops the job before any output
    let out2 = d.join("r2.h5");
    let o = run(score(&m, &docs, &out2).arg("--csv").arg(d.join("new")));
    assert_eq!(o.code(), Some(1), "{}", o.stderr);
    assert!(o.stderr.contains("--csv") && o.stderr.contains("is a directory"), "{}", o.stderr);
    assert!(!out2.exists());
}

#[test]
fn a_corpus_on_a_pipe_or_standard_input_is_scored_whole() {
    let d = tmp("pipe");
    let (m, docs) = (model(&d), corpus(&d, "c.jsonl", 20));
    let reference = d.join("ref.h5");
    assert_eq!(run(&score(&m, &docs, &reference)).code(), Some(0));
    let spool = d.join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    for (i, name) in ["-", "/dev/stdin"].iter().enumerate() {
        let out = d.join(format!("p{i}.h5"));
        // progress on (it counts the corpus first), the corpus on a real pipe
        let inner = score(&m, Path::new(name), &out);
        let line = std::iter::once(inner.get_program()).chain(inner.get_args()).map(|a| format!("'{}'", a.to_string_lossy())).collect::<Vec<_>>().join(" ");
        let mut c = Command::new("sh");
        c.arg("-c").arg(format!("cat '{}' | {line}", docs.display())).env("HDF5_USE_FILE_LOCKING", "FALSE").env("TMPDIR", &spool);
        let o = run(&c);
        assert_eq!(o.code(), Some(0), "--docs {name}: {}", o.stderr);
        assert_eq!(read_results(&out).unwrap(), read_results(&reference).unwrap(), "--docs {name}");
        // (Open MPI keeps its session directory there too)
        let left: Vec<_> = std::fs::read_dir(&spool).unwrap().filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| n.starts_with("falcon-batch")).collect();
        assert!(left.is_empty(), "the corpus's copy is removed: {left:?}");
    }
}

#[test]
fn sigint_stops_like_sigterm_keeping_every_finished_document() {
    let d = tmp("sigint");
    let (m, docs) = (model(&d), corpus(&d, "c.jsonl", 40));
    let reference = d.join("ref.h5");
    assert_eq!(run(&score(&m, &docs, &reference)).code(), Some(0));
    let out = d.join("r.h5");
    let mut job = spawn_limited(score(&m, &docs, &out).env("FALCON_BATCH_HOLD_WAVE_MS", "300"), LIMIT);
    wait_for_docs(&mut job, &out);
    for p in children(job.pid()) {
        signal(p, libc::SIGINT);
    }
    let o = job.wait();
    assert_eq!(o.code(), Some(75), "{}", o.stderr);
    assert!(o.stderr.contains("stopped by SIGINT") && o.stderr.contains("run the same command again"), "{}", o.stderr);
    for left in ["r.h5.reserve", "r.h5.lock"] {
        assert!(!d.join(left).exists(), "{left} is removed");
    }
    let partial = read_results(&out).unwrap();
    assert!(!partial.is_empty() && partial.len() < 40, "{} documents", partial.len());
    assert_eq!(run(&score(&m, &docs, &out)).code(), Some(0));
    assert_eq!(read_results(&out).unwrap(), read_results(&reference).unwrap());
}

#[test]
fn a_document_over_a_limit_fails_alone_naming_the_option() {
    let d = tmp("limits");
    let m = model(&d);
    let big_prompt = vec!["t5"; 3000].join(" ");
    let lines = [
        doc_line(0),
        serde_json::json!({"id": "long-line", "prompt": big_prompt, "choices": ["t3", "t4"]}).to_string(),
        doc_line(2),
        serde_json::json!({"id": "many-choices", "prompt": "t3 t4", "choices": (0..6).map(|i| format!("t{}", i + 10)).collect::<Vec<_>>()}).to_string(),
        serde_json::json!({"id": "many-tokens", "prompt": vec!["t7"; 150].join(" "), "choices": ["t3 t4 t5", "t6 t7"]}).to_string(),
        doc_line(5),
    ];
    let docs = d.join("c.jsonl");
    std::fs::write(&docs, lines.join("\n") + "\n").unwrap();
    let out = d.join("r.h5");
    let o = run(score(&m, &docs, &out).args(["--max-line-bytes", "2000B", "--max-choices", "5", "--max-doc-tokens", "150"]));
    assert_eq!(o.code(), Some(3), "{}", o.stderr);
    let r = read_results(&out).unwrap();
    let got: Vec<(&str, &str)> = r.iter().map(|r| (r.id.as_str(), r.error.as_str())).collect();
    assert_eq!(got.len(), 6, "{got:?}");
    assert_eq!(got[1].0, "line:2", "a line over the limit is not parsed");
    assert!(got[1].1.contains("c.jsonl:2: line too long") && got[1].1.contains("--max-line-bytes"), "{}", got[1].1);
    assert!(got[3].1.contains("c.jsonl:4: field \"choices\": 6 choices, expected at most 5 (--max-choices)"), "{}", got[3].1);
    assert!(got[4].1.contains("c.jsonl:5: field") && got[4].1.contains("at most 150") && got[4].1.contains("--max-doc-tokens"), "{}", got[4].1);
    for i in [0, 2, 5] {
        assert!(r[i].is_ok(), "{:?}", r[i]);
    }
    // the default line limit: a 5 MB line fails fast, the rest is scored
    let huge = serde_json::json!({"id": "huge", "prompt": "t5 ".repeat(5 << 20 >> 1), "choices": ["t3"]}).to_string();
    std::fs::write(&docs, [doc_line(0), huge, doc_line(1)].join("\n") + "\n").unwrap();
    let o = run(&score(&m, &docs, &d.join("huge.h5")));
    assert_eq!(o.code(), Some(3), "{}", o.stderr);
    let r = read_results(&d.join("huge.h5")).unwrap();
    assert!(r[0].is_ok() && r[2].is_ok() && r[1].error.contains("expected at most 4194304 (--max-line-bytes)"), "{:?}", r[1]);
}

#[test]
fn a_document_with_many_choices_is_cut_under_batch_tokens_and_scores_as_smaller_documents() {
    let d = tmp("cut");
    let m = model(&d);
    let prompt = "t3 t9 t27 t81 t5";
    let choices: Vec<String> = (0..600).map(|c| format!("t{} t{}", 3 + c % 90, 3 + (c * 7) % 90)).collect();
    let whole = d.join("whole.jsonl");
    std::fs::write(&whole, serde_json::json!({"id": "all", "prompt": prompt, "choices": choices}).to_string() + "\n").unwrap();
    let small = d.join("small.jsonl");
    let lines: Vec<String> = choices.chunks(10).enumerate().map(|(i, c)| serde_json::json!({"id": format!("s{i}"), "prompt": prompt, "choices": c}).to_string()).collect();
    std::fs::write(&small, lines.join("\n") + "\n").unwrap();
    let (a, b) = (d.join("whole.h5"), d.join("small.h5"));
    let o = run(&score(&m, &whole, &a));
    assert_eq!(o.code(), Some(0), "{}", o.stderr);
    assert_eq!(run(&score(&m, &small, &b)).code(), Some(0));
    let all = read_results(&a).unwrap().remove(0);
    let parts: Vec<_> = read_results(&b).unwrap().into_iter().flat_map(|r| r.choices).collect();
    assert_eq!(all.choices.len(), 600);
    for (x, y) in all.choices.iter().zip(&parts) {
        assert_eq!((&x.text, x.n_tokens), (&y.text, y.n_tokens));
        assert!((x.logprob - y.logprob).abs() < 1e-5, "{} vs {}", x.logprob, y.logprob);
    }
    // prob is the softmax over all 600 choices, not over a piece's
    let z: f64 = all.choices.iter().map(|c| c.logprob.exp()).sum();
    for c in &all.choices {
        assert!((c.prob - c.logprob.exp() / z).abs() < 1e-9);
    }
    let best = all.choices.iter().enumerate().fold(0, |b, (i, c)| if c.logprob > all.choices[b].logprob { i } else { b });
    assert_eq!(all.best, Some(best));
}
