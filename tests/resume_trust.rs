//! Results files you can trust across runs, through the binary: a resumed file holds only
//! what this corpus, model and options give (edited documents refused or rescored, failed
//! ones retried, another corpus's file refused, the wire dtype recorded), synthetic ids
//! that cannot collide, NUL refused, damage noticed by resume and `show --verify`, the
//! older schema refused, a finished file's rerun reading no weights (one rank and two), and
//! a file that explains itself to h5dump.

mod common;

use common::proc::{bin, run};
use falcon_batch::results::{read_file, read_results, ChoiceRow, DocResult, DocStatus, ResultsWriter, RunAbout, RunMeta};
use falcon_batch::score::Norm;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The llama_tied fixture as a model directory, converted once per test process.
fn model() -> PathBuf {
    no_file_locks();
    static MODEL: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    MODEL
        .get_or_init(|| {
            let out = common::tmp::dir("fb-trust-model").join("model");
            let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_tied");
            let o = run(bin().args(["convert", "--from"]).arg(&fixture).arg("--to").arg(&out));
            assert!(o.status.success(), "{}", stderr(&o));
            out
        })
        .clone()
}

fn tmp(name: &str) -> PathBuf {
    common::tmp::dir(&format!("fb-trust-{name}"))
}

/// A document of the fixture's vocabulary: `words` prompt words from `seed`, 3 choices.
fn doc(id: &str, seed: usize) -> String {
    let words: Vec<String> = (0..(4 + seed % 5)).map(|k| format!("t{}", 3 + (seed * 7 + k * 13) % 90)).collect();
    let choices: Vec<String> = (0..3).map(|c| format!("t{} t{}", 3 + (seed + c * 31) % 90, 3 + (seed * 3 + c) % 90)).collect();
    serde_json::json!({"id": id, "prompt": words.join(" "), "choices": choices}).to_string()
}

fn write(path: &Path, lines: &[String]) -> PathBuf {
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
    path.to_path_buf()
}

/// `n` documents d0 .. d{n-1}.
fn docs(n: usize) -> Vec<String> {
    (0..n).map(|i| doc(&format!("d{i}"), i)).collect()
}

/// `score` without --quiet: the ranks' "read N parts" lines show whether weights were read.
fn score(docs: &Path, out: &Path) -> Command {
    let mut c = bin();
    c.arg("score").arg("--model").arg(model()).arg("--docs").arg(docs).arg("--out").arg(out);
    c.args(["--batch-tokens", "40", "--wave", "1", "--device", "cpu"]);
    c
}

fn read_weights(o: &Output) -> bool {
    let e = stderr(o);
    e.lines().any(|l| l.contains("read ") && l.contains(" parts"))
}

/// This process opens results files too while other tests spawn children, which inherit
/// its descriptors and their locks: HDF5 here takes none (read each time a file is opened).
fn no_file_locks() {
    std::env::set_var("HDF5_USE_FILE_LOCKING", "FALSE");
}

fn ids(docs: &[DocResult]) -> Vec<String> {
    docs.iter().map(|d| d.id.clone()).collect()
}

fn assert_unique_ids(docs: &[DocResult]) {
    let set: std::collections::HashSet<&str> = docs.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(set.len(), docs.len(), "one record per id: {:?}", ids(docs));
}

#[test]
fn an_edited_document_is_refused_before_any_weight_then_rescored_on_request() {
    let d = tmp("edited");
    let mut lines = docs(6);
    let corpus = write(&d.join("docs.jsonl"), &lines);
    let out = d.join("r.h5");
    let o = run(&mut score(&corpus, &out));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(read_weights(&o), "a run that scores reads its parts: {}", stderr(&o));
    let before = read_results(&out).unwrap();

    // Same id, another prompt: the old scores must not be kept silently.
    lines[2] = doc("d2", 77);
    write(&corpus, &lines);
    let o = run(&mut score(&corpus, &out));
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("1 document changed since scored") && e.contains("\"d2\"") && e.contains("--rescore-changed"), "{e}");
    assert!(!read_weights(&o), "refused before any weight is read: {e}");
    assert_eq!(read_results(&out).unwrap(), before, "a refused run leaves the file as it was");

    let o = run(score(&corpus, &out).arg("--rescore-changed"));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let after = read_results(&out).unwrap();
    assert_unique_ids(&after);
    assert_eq!(after.len(), 6);
    // d2's record is what a fresh run of the edited corpus gives; the others are untouched.
    let fresh = d.join("fresh.h5");
    assert_eq!(run(&mut score(&corpus, &fresh)).status.code(), Some(0));
    let fresh = read_results(&fresh).unwrap();
    let by_id = |docs: &[DocResult], id: &str| docs.iter().find(|r| r.id == id).unwrap().clone();
    assert_eq!(by_id(&after, "d2"), by_id(&fresh, "d2"));
    assert_ne!(by_id(&after, "d2").input_hash, by_id(&before, "d2").input_hash);
    for id in ["d0", "d1", "d3", "d4", "d5"] {
        assert_eq!(by_id(&after, id), by_id(&before, id));
    }
}

#[test]
fn a_finished_file_is_rerun_without_reading_weights_on_one_rank_and_two() {
    let d = tmp("finished");
    let corpus = write(&d.join("docs.jsonl"), &docs(5));
    let out = d.join("r.h5");
    let csv = d.join("r.csv");
    assert_eq!(run(&mut score(&corpus, &out)).status.code(), Some(0));
    let before = read_results(&out).unwrap();
    let o = run(score(&corpus, &out).arg("--csv").arg(&csv));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!read_weights(&o), "nothing to do: no part read: {}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&csv).unwrap().lines().count(), 1 + 5 * 3, "the CSV is written all the same");
    assert_eq!(read_results(&out).unwrap(), before);

    let mut c = Command::new("mpirun");
    c.args(["--oversubscribe", "-np", "2"]).env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    c.args(["-x", "HDF5_USE_FILE_LOCKING=FALSE"]).arg(env!("CARGO_BIN_EXE_falcon-batch"));
    c.arg("score").arg("--model").arg(model()).arg("--docs").arg(&corpus).arg("--out").arg(&out);
    c.args(["--batch-tokens", "40", "--device", "cpu"]);
    let o = run(&mut c);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!read_weights(&o), "no rank reads a part: {}", stderr(&o));
    assert_eq!(read_results(&out).unwrap(), before);
}

#[test]
fn failed_documents_are_retried_when_their_line_changes_and_the_exit_code_says_failures_remain() {
    let d = tmp("failed");
    let mut lines = docs(4);
    lines.push(r#"{"id": "bad", "prompt": "t5 t6", "choices": []}"#.into());
    lines.push("{not json".into());
    let corpus = write(&d.join("docs.jsonl"), &lines);
    let out = d.join("r.h5");
    let o = run(&mut score(&corpus, &out));
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert_eq!(ids(&read_results(&out).unwrap()), ["d0", "d1", "d2", "d3", "bad", "line:6"]);

    // Unchanged: the failures stay, no weights are read, and the exit code still says so.
    let o = run(&mut score(&corpus, &out));
    assert_eq!(o.status.code(), Some(3), "the file holds failures: {}", stderr(&o));
    assert!(!read_weights(&o), "{}", stderr(&o));

    // Both lines fixed: retried, their failed records replaced, exit 0.
    lines[4] = doc("bad", 40);
    lines[5] = doc("e6", 41);
    write(&corpus, &lines);
    let o = run(&mut score(&corpus, &out));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let after = read_results(&out).unwrap();
    assert_unique_ids(&after);
    assert!(after.iter().all(DocResult::is_ok), "{after:?}");
    let mut got = ids(&after);
    got.sort();
    assert_eq!(got, ["bad", "d0", "d1", "d2", "d3", "e6"], "the stale line:6 failure is gone");

    // --retry-failed retries a failure whose line did not change (it fails again: exit 3).
    lines.push(doc("ok2", 50));
    lines.push(r#"{"id": "empty", "prompt": "t5 t6", "choices": []}"#.into());
    write(&corpus, &lines);
    assert_eq!(run(&mut score(&corpus, &out)).status.code(), Some(3));
    let o = run(score(&corpus, &out).arg("--retry-failed"));
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(read_weights(&o), "{}", stderr(&o));
    let after = read_results(&out).unwrap();
    assert_unique_ids(&after);
    assert_eq!(after.len(), 8);
}

#[test]
fn another_corpus_s_file_is_refused() {
    let d = tmp("foreign");
    let jan = write(&d.join("jan.jsonl"), &docs(3));
    let feb = write(&d.join("feb.jsonl"), &(0..3).map(|i| doc(&format!("feb{i}"), i + 10)).collect::<Vec<_>>());
    let out = d.join("docs.h5");
    assert_eq!(run(&mut score(&jan, &out)).status.code(), Some(0));
    let o = run(&mut score(&feb, &out));
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("3 of its 3 documents are not in") && e.contains("feb.jsonl") && e.contains("another corpus"), "{e}");
    assert!(e.contains("\"d0\"") && e.contains("--overwrite"), "{e}");
    assert!(!read_weights(&o), "{e}");
    let o = run(score(&feb, &out).arg("--overwrite"));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(ids(&read_results(&out).unwrap()), ["feb0", "feb1", "feb2"]);
    // The corpus path and hash of the latest run are recorded.
    let f = read_file(&out).unwrap();
    assert_eq!(f.attrs["corpus"], feb.display().to_string());
    assert_eq!(f.attrs["corpus_xxh3"].len(), 32);
    // Accuracy against another corpus than the one scored is judged with a warning.
    let show = |docs: &Path| run(bin().arg("show").arg(&out).arg("--docs").arg(docs));
    let o = show(&jan);
    assert!(o.status.success() && stderr(&o).contains("is not the corpus these scores were made from"), "{}", stderr(&o));
    let o = show(&feb);
    assert!(o.status.success() && !stderr(&o).contains("warning"), "{}", stderr(&o));
}

#[test]
fn an_unwritable_csv_path_is_refused_before_any_weight() {
    let d = tmp("csvpath");
    let corpus = write(&d.join("docs.jsonl"), &docs(2));
    let out = d.join("r.h5");
    // A folder cannot be made under a file (a missing folder is made: score_guards.rs).
    let csv = corpus.join("r.csv");
    let o = run(score(&corpus, &out).arg("--csv").arg(&csv));
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("--csv") && e.contains(&csv.display().to_string()), "{e}");
    assert!(!read_weights(&o), "{e}");
    let o = run(score(&corpus, &out).arg("--csv").arg(&d));
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("is a directory"), "{}", stderr(&o));
}

#[test]
fn the_wire_dtype_is_part_of_the_file_s_identity() {
    let d = tmp("wire");
    let corpus = write(&d.join("docs.jsonl"), &docs(3));
    let out = d.join("r.h5");
    let o = run(score(&corpus, &out).args(["--wire-dtype", "f32"]));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(read_file(&out).unwrap().attrs["wire_dtype"], "f32");
    assert_eq!(read_file(&out).unwrap().attrs["compute"], "f32");
    let o = run(score(&corpus, &out).args(["--wire-dtype", "bf16"]));
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("wire_dtype \"f32\"") && e.contains("wire_dtype \"bf16\"") && e.contains("--overwrite"), "{e}");
    assert!(!read_weights(&o), "{e}");
    // The fixture's weights are f32: the default wire is f32, the same file.
    assert_eq!(run(&mut score(&corpus, &out)).status.code(), Some(0));
}

/// Scores from the CPU's bf16 route differ from the f32 route's by up to ~0.25 nats: a file
/// of one is never resumed with the other.
#[test]
fn the_compute_route_is_part_of_the_file_s_identity() {
    let d = tmp("compute");
    let corpus = write(&d.join("docs.jsonl"), &docs(3));
    let out = d.join("r.h5");
    let o = run(score(&corpus, &out).args(["--compute-dtype", "bf16"]));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(read_file(&out).unwrap().attrs["compute"], "bf16");
    let o = run(&mut score(&corpus, &out));
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("compute \"bf16\"") && e.contains("compute \"f32\""), "{e}");
    assert!(!read_weights(&o), "{e}");
    assert_eq!(run(score(&corpus, &out).args(["--compute-dtype", "bf16"])).status.code(), Some(0));
}

#[test]
fn a_line_id_cannot_collide_with_a_real_id() {
    let d = tmp("lineid");
    let lines = vec![doc("line:3", 1), doc("a", 2), "{broken".to_string(), doc("a", 3)];
    let corpus = write(&d.join("docs.jsonl"), &lines);
    let out = d.join("r.h5");
    let o = run(&mut score(&corpus, &out));
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let got = read_results(&out).unwrap();
    assert_unique_ids(&got);
    assert_eq!(ids(&got), ["line:1", "a", "line:3", "line:4"]);
    assert!(got[0].error.contains("line:N") && got[0].error.contains(":1:"), "{}", got[0].error);
    assert!(got[3].error.contains("duplicate id"), "{}", got[3].error);
    // and the rerun finds all of it done
    let o = run(&mut score(&corpus, &out));
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(!read_weights(&o));
}

#[test]
fn a_nul_in_a_choice_fails_the_document_instead_of_altering_the_text() {
    let d = tmp("nul");
    let lines = vec![doc("a", 1), serde_json::json!({"id": "n", "prompt": "t5 t6", "choices": ["t7", "t8\u{0}t9"]}).to_string()];
    let corpus = write(&d.join("docs.jsonl"), &lines);
    let out = d.join("r.h5");
    let o = run(&mut score(&corpus, &out));
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let got = read_results(&out).unwrap();
    assert_eq!(got[1].status, DocStatus::Error);
    assert!(got[1].error.contains("\"choices\"[1]") && got[1].error.contains("NUL"), "{}", got[1].error);
    assert!(got.iter().flat_map(|d| &d.choices).all(|c| !c.text.contains('\u{FFFD}')));
}

/// The byte offsets of `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    hay.windows(needle.len()).enumerate().filter(|(_, w)| *w == needle).map(|(i, _)| i).collect()
}

#[test]
fn damage_is_noticed_by_resume_and_by_show_verify() {
    let d = tmp("damage");
    let corpus = write(&d.join("docs.jsonl"), &docs(12));
    let out = d.join("r.h5");
    assert_eq!(run(&mut score(&corpus, &out)).status.code(), Some(0));
    let whole = std::fs::read(&out).unwrap();
    let original = read_results(&out).unwrap();
    let o = run(bin().args(["show", "--verify"]).arg(&out));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("whole: 12 documents and 36 choice rows"), "{}", stdout(&o));

    // A log-prob's bytes (Fletcher32), an id's bytes in the string heap (record_check).
    let logprob = original[5].choices[1].logprob.to_le_bytes();
    let at_logprob = find(&whole, &logprob);
    assert_eq!(at_logprob.len(), 1, "the log-prob's bytes occur once");
    let at_id = find(&whole, b"\"d7\"").len(); // not in the file: ids are stored bare
    assert_eq!(at_id, 0);
    let at_text = find(&whole, original[7].choices[2].text.as_bytes());
    assert!(!at_text.is_empty());
    // (The text's bytes flipped in their lowest bit stay ASCII: "t10" reads "u01".)
    for (what, at, len, flip) in [("/choices/logprob", at_logprob[0], 8, 0x5a), ("/docs/record_check", at_text[0], 2, 1)] {
        let mut bytes = whole.clone();
        for b in &mut bytes[at..at + len] {
            *b ^= flip;
        }
        std::fs::write(&out, &bytes).unwrap();
        let o = run(&mut score(&corpus, &out));
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "resume: {e}");
        assert!(e.contains("damaged at") && e.contains("closed it cleanly"), "{e}");
        assert!(!read_weights(&o), "{e}");
        let o = run(bin().args(["show", "--verify"]).arg(&out));
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "show --verify: {e}");
        assert!(e.contains(&format!("damaged at {what}")), "{what}: {e}");
        assert_eq!(run(bin().arg("show").arg(&out)).status.code(), Some(1), "show refuses a damaged file");
    }

    // 8 bytes overwritten at 200 places spread over the whole file: `show --verify` either
    // says the file is damaged (or HDF5 cannot open it, or HDF5 itself aborts on damaged
    // metadata) or the file reads exactly as written (the bytes were unused, or metadata
    // that does not change what is read), never other scores.
    std::fs::write(&out, &whole).unwrap();
    let reference_csv = d.join("reference.csv");
    assert_eq!(run(bin().arg("show").arg(&out).arg("--csv").arg(&reference_csv)).status.code(), Some(0));
    let reference_csv = std::fs::read(&reference_csv).unwrap();
    let (probe, probe_csv) = (d.join("probe.h5"), d.join("probe.csv"));
    let step = (whole.len() / 200).next_multiple_of(8) + 4; // every phase of an 8-byte word
    let (mut silent, mut noticed, mut same) = (vec![], 0, 0);
    for at in (0..whole.len() - 8).step_by(step) {
        let mut bytes = whole.clone();
        bytes[at..at + 8].copy_from_slice(&[0xa5; 8]);
        std::fs::write(&probe, &bytes).unwrap();
        let _ = std::fs::remove_file(&probe_csv);
        if run(bin().args(["show", "--verify"]).arg(&probe)).status.success() {
            let o = run(bin().arg("show").arg(&probe).arg("--csv").arg(&probe_csv));
            if o.status.success() && std::fs::read(&probe_csv).unwrap() == reference_csv {
                same += 1;
            } else {
                silent.push(at);
            }
        } else {
            noticed += 1;
        }
    }
    assert!(silent.is_empty(), "show --verify passed a file that reads other results, damaged at {silent:?} of {}", whole.len());
    assert!(noticed > 50 && same > 0, "{noticed} noticed, {same} harmless");
}

#[test]
fn an_older_schema_is_refused_with_what_to_do() {
    let d = tmp("v1");
    let corpus = write(&d.join("docs.jsonl"), &docs(2));
    let out = d.join("r.h5");
    assert_eq!(run(&mut score(&corpus, &out)).status.code(), Some(0));
    {
        let f = hdf5::File::open_rw(&out).unwrap();
        f.delete_attr("schema").unwrap();
        f.new_attr::<hdf5::types::VarLenUnicode>().shape(()).create("schema").unwrap().write_scalar(&"falcon-batch/scores/1".parse::<hdf5::types::VarLenUnicode>().unwrap()).unwrap();
    }
    let o = run(&mut score(&corpus, &out));
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("older falcon-batch") && e.contains("falcon-batch/scores/1") && e.contains("--overwrite"), "{e}");
    assert!(!read_weights(&o), "{e}");
    let o = run(bin().arg("show").arg(&out));
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("older falcon-batch"), "{}", stderr(&o));
    assert_eq!(run(score(&corpus, &out).arg("--overwrite")).status.code(), Some(0));
}

#[test]
fn the_file_explains_itself_to_h5dump() {
    let d = tmp("attrs");
    let corpus = write(&d.join("docs.jsonl"), &docs(2));
    let out = d.join("r.h5");
    assert_eq!(run(&mut score(&corpus, &out)).status.code(), Some(0));
    let o = run(Command::new("h5dump").env("HDF5_USE_FILE_LOCKING", "FALSE").arg("-A").arg(&out));
    let text = stdout(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    for needle in [
        "falcon-batch/scores/2",
        "ATTRIBUTE \"wire_dtype\"",
        "ATTRIBUTE \"compute\"",
        "ATTRIBUTE \"model_name\"",
        "ATTRIBUTE \"model_source\"",
        "ATTRIBUTE \"corpus_xxh3\"",
        "ATTRIBUTE \"closed_cleanly\"",
        "natural log (nats)",
        "DATASET \"input_hash\"",
        "DATASET \"doc\"",
    ] {
        assert!(text.contains(needle), "h5dump -A lacks {needle}:\n{text}");
    }
    let o = run(Command::new("h5dump").env("HDF5_USE_FILE_LOCKING", "FALSE").args(["-p", "-H", "-d", "/choices/logprob"]).arg(&out));
    assert!(stdout(&o).contains("FLETCHER32"), "{}", stdout(&o));
    let f = hdf5::File::open(&out).unwrap();
    assert_eq!(f.dataset("choices/doc").unwrap().read_raw::<i64>().unwrap(), [0, 0, 0, 1, 1, 1]);
}

/// A results file of `n` documents written by the library (show needs no model), every
/// 5th failed, with long ids.
fn synthetic(path: &Path, n: usize) -> Vec<DocResult> {
    no_file_locks();
    let meta = RunMeta {
        model_id: "m".into(),
        norm: Norm::Sum,
        template: "{text}".into(),
        delimiter: " ".into(),
        wire_dtype: "f32".into(),
        compute: "f32".into(),
        about: RunAbout { model_name: "tiny".into(), corpus: "c.jsonl".into(), ..Default::default() },
        extract: None,
    };
    let docs: Vec<DocResult> = (0..n)
        .map(|i| {
            let id = format!("a-rather-long-document-id-{i:06}");
            if i % 5 == 4 {
                return DocResult::failed(&id, "h", &format!("c.jsonl:{}: field \"choices\": missing, expected a non-empty array of strings", i + 1));
            }
            // choice 0: one likely token; choice 1: three less likely tokens of long text:
            // sum prefers 0, mean and char prefer 1.
            let choices = vec![
                ChoiceRow { text: "x".into(), n_tokens: 1, logprob: -1.0, logprob_mean: -1.0, logprob_per_char: -0.5, prob: 0.6 },
                ChoiceRow { text: "a longer answer".into(), n_tokens: 3, logprob: -1.5, logprob_mean: -0.5, logprob_per_char: -0.05, prob: 0.4 },
            ];
            DocResult { id, input_hash: "h".into(), status: DocStatus::Ok, error: String::new(), n_prompt_tokens: 3, best: Some(0), choices, extract: None }
        })
        .collect();
    let (mut w, _) = ResultsWriter::open(path, meta, false).unwrap();
    w.append(&docs).unwrap();
    w.close().unwrap();
    docs
}

#[test]
fn show_prints_wide_failed_reranked_and_csv_and_stops_quietly_on_a_closed_pipe() {
    let d = tmp("show");
    let out = d.join("s.h5");
    synthetic(&out, 3000);
    let show = |args: &[&str]| run(bin().arg("show").arg(&out).args(args));

    let o = show(&["--limit", "3"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("a-rather-long-d…") && !text.contains("a-rather-long-document-id-000000"), "{text}");
    assert!(text.contains("# model tiny (m), norm sum, corpus c.jsonl"), "{text}");
    let o = show(&["--limit", "3", "--wide"]);
    assert!(stdout(&o).contains("a-rather-long-document-id-000000"), "{}", stdout(&o));

    let o = show(&["--failed", "--limit", "2"]);
    let text = stdout(&o);
    assert!(text.contains("c.jsonl:5: field \"choices\": missing, expected a non-empty array of strings"), "the whole error: {text}");
    assert!(!text.contains(" ok "), "{text}");
    assert!(text.contains("3000 documents, 600 failed"), "{text}");

    let o = show(&["--norm", "mean", "--limit", "1"]);
    let text = stdout(&o);
    assert!(text.contains("norm mean (re-ranked; the file's is sum)") && text.contains("a longer answer"), "{text}");

    let csv = d.join("s.csv");
    let o = show(&["--norm", "char", "--csv", csv.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let rows: Vec<String> = std::fs::read_to_string(&csv).unwrap().lines().map(String::from).collect();
    assert_eq!(rows.len(), 1 + 2400 * 2 + 600);
    assert!(rows[0].ends_with("is_best,status,error"), "{}", rows[0]);
    assert!(rows[2].contains(",a longer answer,") && rows[2].contains(",1,ok,"), "re-ranked under char: {}", rows[2]);
    assert!(rows.iter().any(|r| r.starts_with("a-rather-long-document-id-000004,,") && r.contains(",error,")), "failed rows");

    // `show | head -1`: show ends quietly when head closes the pipe.
    let o = run(Command::new("bash").env("HDF5_USE_FILE_LOCKING", "FALSE").arg("-c").arg(format!(
        "set -o pipefail; '{}' show --wide '{}' | head -1",
        env!("CARGO_BIN_EXE_falcon-batch"),
        out.display()
    )));
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}
