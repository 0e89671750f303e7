//! The real small model the process-launching tests score: SmolLM2-135M (`make fetch-model`)
//! converted into a test directory, slices of the sample corpus, and the comparison of two
//! result files.

use super::proc::run_limited;
use falcon_batch::results::DocResult;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_falcon-batch"))
}

/// `falcon-batch convert` of the SmolLM2 GGUF into `to` (`extra`: e.g. `--dtype bf16`).
pub fn convert_smollm2(to: &Path, extra: &[&str], limit: Duration) {
    let gguf = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(gguf.exists(), "{} is missing: run `make fetch-model` first", gguf.display());
    let mut c = Command::new(bin());
    c.args(["convert", "--from"]).arg(&gguf).arg("--to").arg(to).args(extra);
    let r = run_limited(&c, limit);
    assert!(r.success(), "convert: {}", r.text());
}

/// The new ids of a tests/fixtures/smollm2/generate.json run as `generate` reports them:
/// where HF's generate stopped before `max_new_tokens` it stopped at the end-of-sequence
/// token it appended, which `tokens` leaves out (as `text` does).
pub fn golden_tokens(gen: &serde_json::Value, run: &serde_json::Value) -> Vec<u64> {
    let mut ids: Vec<u64> = run["new_ids"].as_array().expect("new_ids").iter().filter_map(|t| t.as_u64()).collect();
    if (ids.len() as u64) < gen["max_new_tokens"].as_u64().expect("max_new_tokens") {
        ids.pop();
    }
    ids
}

/// The first `n` lines of inputs/sample.jsonl (26 documents).
pub fn sample_lines(n: usize) -> Vec<String> {
    let sample = std::fs::read_to_string(root().join("inputs/sample.jsonl")).expect("inputs/sample.jsonl");
    sample.lines().take(n).map(String::from).collect()
}

/// Writes `lines` as a corpus file.
pub fn write_corpus(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// The same documents, in the same order, each once, with the same status, best choice and
/// scores within `tol` (log-prob, mean log-prob, probability).
pub fn assert_same_results(want: &[DocResult], got: &[DocResult], tol: f64, what: &str) {
    assert_eq!(want.len(), got.len(), "{what}: document count");
    let ids: std::collections::BTreeSet<&str> = got.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids.len(), got.len(), "{what}: every document exactly once");
    for (x, y) in want.iter().zip(got) {
        assert_eq!((&x.id, &x.status, x.best), (&y.id, &y.status, y.best), "{what}");
        for (cx, cy) in x.choices.iter().zip(&y.choices) {
            for (p, q) in [(cx.logprob, cy.logprob), (cx.logprob_mean, cy.logprob_mean), (cx.prob, cy.prob)] {
                assert!((p - q).abs() <= tol, "{what}: doc {}: {p} vs {q}", x.id);
            }
        }
    }
}
