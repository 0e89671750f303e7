//! The score command end to end, through the binary: restart after SIGKILL, resume, refusal
//! of a mismatched file, bad lines, exit codes, files that h5dump reads.

mod common;

use common::proc::{bin, run};
use falcon_batch::results::read_results;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tmp(name: &str) -> PathBuf {
    common::tmp::dir(&format!("fb-score-{name}"))
}

/// The llama_tied fixture as a model directory (its byte-level BPE reads "t3 t17 ..." too).
fn model(dir: &Path) -> PathBuf {
    let out = dir.join("model");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_tied");
    let o = run(bin().args(["convert", "--from"]).arg(&fixture).arg("--to").arg(&out));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

/// n documents of the fixture's vocabulary, with a bad line every 7th line.
fn corpus(dir: &Path, n: usize) -> PathBuf {
    let mut lines = vec![];
    for i in 0..n {
        if i % 7 == 3 {
            lines.push(format!("{{\"id\": \"bad{i}\", \"prompt\": \"t5 t6\", \"choices\": []}}"));
            continue;
        }
        let words: Vec<String> = (0..(5 + i % 11)).map(|k| format!("t{}", 3 + (i * 7 + k * 13) % 90)).collect();
        let choices: Vec<String> = (0..3).map(|c| format!("t{} t{}", 3 + (i + c * 31) % 90, 3 + (i * 3 + c) % 90)).collect();
        lines.push(serde_json::json!({"id": format!("d{i}"), "prompt": words.join(" "), "choices": choices}).to_string());
    }
    let p = dir.join("corpus.jsonl");
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

fn score(model: &Path, docs: &Path, out: &Path) -> Command {
    let mut c = bin();
    c.arg("score").arg("--model").arg(model).arg("--docs").arg(docs).arg("--out").arg(out);
    c.args(["--batch-tokens", "40", "--wave", "1", "--quiet"]);
    c
}

#[test]
fn killed_run_resumes_to_the_uninterrupted_result() {
    let d = tmp("kill");
    let (m, docs) = (model(&d), corpus(&d, 60));
    let whole = d.join("whole.h5");
    let o = run(&mut score(&m, &docs, &whole));
    assert_eq!(o.status.code(), Some(3), "some lines are bad: exit 3; {}", String::from_utf8_lossy(&o.stderr));
    let reference = read_results(&whole).unwrap();
    assert_eq!(reference.len(), 60);
    assert_eq!(reference.iter().filter(|r| !r.is_ok()).count(), 9);

    let resumed = d.join("resumed.h5");
    let o = run(score(&m, &docs, &resumed).env("FALCON_BATCH_KILL_AFTER_DOCS", "17"));
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(o.status.signal(), Some(9), "the run must die by SIGKILL");
    let partial = read_results(&resumed).unwrap();
    assert!(partial.len() >= 17 && partial.len() < 60, "{} documents after the kill", partial.len());
    let o = run(&mut score(&m, &docs, &resumed));
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(read_results(&resumed).unwrap(), reference, "resumed file differs from an uninterrupted run");

    // A third run finds nothing to do and changes nothing.
    let o = run(&mut score(&m, &docs, &resumed));
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(read_results(&resumed).unwrap(), reference);

    // h5dump (HDF5's own tool) reads the ids and the schema attribute
    let dump = run(Command::new("h5dump").env("HDF5_USE_FILE_LOCKING", "FALSE").args(["-a", "/schema", "-d", "/docs/id"]).arg(&resumed));
    let text = String::from_utf8_lossy(&dump.stdout);
    assert!(dump.status.success() && text.contains("falcon-batch/scores/2") && text.contains("\"d58\""), "{text}");
}

#[test]
fn sigterm_stops_after_the_batch_in_flight_and_the_rerun_completes() {
    let d = tmp("term");
    let (m, docs) = (model(&d), corpus(&d, 40));
    let whole = d.join("whole.h5");
    run(&mut score(&m, &docs, &whole));
    let reference = read_results(&whole).unwrap();

    let out = d.join("stopped.h5");
    let o = run(score(&m, &docs, &out).env("FALCON_BATCH_TERM_AFTER_DOCS", "11"));
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(75), "SIGTERM: exit 75 (EX_TEMPFAIL); {e}");
    assert!(e.contains("stopped by SIGTERM") && e.contains("run the same command again"), "{e}");
    let partial = read_results(&out).unwrap();
    assert!(partial.len() >= 11 && partial.len() < 40, "{} documents after SIGTERM", partial.len());
    assert_eq!(partial[..], reference[..partial.len()], "what was written before the stop is final");
    let o = run(&mut score(&m, &docs, &out));
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(read_results(&out).unwrap(), reference, "stopped + resumed differs from an uninterrupted run");
}

#[test]
fn mismatched_output_is_refused_and_csv_is_written() {
    let d = tmp("mismatch");
    let (m, docs) = (model(&d), corpus(&d, 10));
    let out = d.join("r.h5");
    let csv = d.join("r.csv");
    let o = run(score(&m, &docs, &out).arg("--csv").arg(&csv));
    assert_eq!(o.status.code(), Some(3));
    let rows = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(rows.lines().count(), 1 + 9 * 3 + 1, "a header, one row per choice of the ok documents and one for the failed one");
    let o = run(score(&m, &docs, &out).args(["--norm", "mean"]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("norm") && err.contains("--overwrite"), "{err}");
    let o = run(score(&m, &docs, &out).args(["--norm", "mean", "--overwrite"]));
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn fatal_errors_happen_before_any_output() {
    let d = tmp("fatal");
    let m = model(&d);
    let out = d.join("never.h5");
    let o = run(&mut score(&m, &d.join("missing.jsonl"), &out));
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("missing.jsonl"));
    assert!(!out.exists(), "no output for a job that could not start");
    let o = run(&mut score(&d.join("no-model"), &corpus(&d, 3), &out));
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("manifest.json"));
}

/// `falcon-batch --docs corpus.jsonl` (no subcommand) in `cwd`, without $FALCON_BATCH_MODEL
/// unless `env_model` is given.
fn default_run(cwd: &Path, docs: &Path, env_model: Option<&Path>) -> Output {
    let mut c = bin();
    c.current_dir(cwd).env_remove("FALCON_BATCH_MODEL").arg("--docs").arg(docs).args(["--batch-tokens", "40", "--wave", "1"]);
    if let Some(m) = env_model {
        c.env("FALCON_BATCH_MODEL", m);
    }
    run(&mut c)
}

#[test]
fn no_subcommand_scores_with_the_defaults_printed() {
    let d = tmp("default");
    let docs = corpus(&d, 3);
    // $FALCON_BATCH_MODEL names the model; the output goes to results/<corpus name>.h5
    let from_env = d.join("from-env");
    std::fs::create_dir_all(&from_env).unwrap();
    let m = model(&d);
    let o = default_run(&from_env, &docs, Some(&m));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.contains(&format!("--model {} (from $FALCON_BATCH_MODEL)", m.display())), "{err}");
    assert!(err.contains("--out results/corpus.h5 (results/<corpus name>.h5)"), "{err}");
    assert_eq!(read_results(&from_env.join("results/corpus.h5")).unwrap().len(), 3);

    // else the only model directory under models/ (a GGUF file beside it is not one)
    let single = d.join("single");
    std::fs::create_dir_all(single.join("models")).unwrap();
    std::fs::rename(&m, single.join("models/tiny")).unwrap();
    std::fs::write(single.join("models/other.gguf"), b"GGUF").unwrap();
    let o = default_run(&single, &docs, None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("--model models/tiny (the only model directory under models/)"), "{err}");
    let first = read_results(&single.join("results/corpus.h5")).unwrap();
    assert_eq!(first, read_results(&from_env.join("results/corpus.h5")).unwrap());

    // several: an error listing them, before any output
    let several = d.join("several");
    for name in ["a", "b"] {
        std::fs::create_dir_all(several.join("models").join(name)).unwrap();
        std::fs::write(several.join("models").join(name).join("manifest.json"), b"{}").unwrap();
    }
    let o = default_run(&several, &docs, None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("several model directories: models/a, models/b") && err.contains("--model"), "{err}");
    assert!(!several.join("results").exists());

    // none: an error saying what is there (nothing, or no models/ at all)
    let none = d.join("none");
    std::fs::create_dir_all(none.join("models")).unwrap();
    std::fs::write(none.join("models/SmolLM2.gguf"), b"GGUF").unwrap();
    let o = default_run(&none, &docs, None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("holds no model directory") && err.contains("models/SmolLM2.gguf") && err.contains("falcon-batch convert"), "{err}");
    let bare = d.join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    let o = default_run(&bare, &docs, None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("models/ cannot be read") && err.contains("FALCON_BATCH_MODEL"), "{err}");

    // a corpus on stdin has no name to name the output after: a usage error asking for --out
    let o = default_run(&single, Path::new("-"), None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("--out: not given"), "{err}");

    // nothing at all is a usage error; `score` still wants its flags
    assert_eq!(run(&mut bin()).status.code(), Some(2));
    assert_eq!(run(bin().arg("score").arg("--docs").arg(&docs)).status.code(), Some(2));
}
