//! The HDF5 results file: round trip, h5dump/h5py readability, resume, torn-tail repair,
//! refusal of another run's file, CSV export, and a real SIGKILL mid-append.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use falcon_batch::results::{export_csv, read_results, ChoiceRow, DocResult, DocStatus, ResultsWriter, RunAbout, RunMeta, SCHEMA};
use falcon_batch::score::Norm;
use hdf5::types::VarLenUnicode;

/// Tests run one at a time: a child process spawned by one test inherits the HDF5 file
/// descriptors another test has open, and with them its flock, which would make an
/// unrelated open fail with "unable to lock file".
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn meta() -> RunMeta {
    RunMeta {
        model_id: "smollm2-135m".into(),
        norm: Norm::Char,
        template: "Document: {text}\nAnswer:".into(),
        delimiter: " ".into(),
        wire_dtype: "f32".into(),
        compute: "f32".into(),
        about: RunAbout { model_name: "smollm2-135m".into(), corpus: "corpus.jsonl".into(), ..Default::default() },
        extract: None,
    }
}

fn ok_doc(id: &str, n: usize) -> DocResult {
    let choices = (0..n)
        .map(|i| ChoiceRow {
            text: format!("{id} choice {i} — é"),
            n_tokens: i + 1,
            logprob: -(i as f64) - 0.5,
            logprob_mean: -0.25 * i as f64,
            logprob_per_char: -0.1 * i as f64,
            prob: 1.0 / n as f64,
        })
        .collect();
    DocResult { id: id.into(), input_hash: format!("{:032x}", id.len()), status: DocStatus::Ok, error: String::new(), n_prompt_tokens: 40, best: Some(n - 1), choices, extract: None }
}

fn write_three(path: &Path) -> Vec<DocResult> {
    let docs = vec![ok_doc("inv-001", 3), DocResult::failed("line:2", "0123", "corpus.jsonl:2: invalid JSON"), ok_doc("inv-003", 2)];
    let (mut w, done) = ResultsWriter::open(path, meta(), false).unwrap();
    assert!(done.is_empty());
    w.append(&docs[..2]).unwrap();
    w.append(&docs[2..]).unwrap();
    assert_eq!(w.n_docs(), 3);
    w.close().unwrap();
    docs
}

/// An external reader. Tests run in parallel threads, and a child spawned by one test
/// inherits another test's open HDF5 descriptors and with them its flock, which would make
/// this reader fail to open a file that its writer already closed; so it skips locking.
fn reader(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("HDF5_USE_FILE_LOCKING", "FALSE");
    cmd
}

fn strings(ds: &hdf5::Dataset) -> Vec<String> {
    ds.read_raw::<VarLenUnicode>().unwrap().iter().map(|s| s.as_str().to_string()).collect()
}

#[test]
fn round_trip_and_layout() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out/scores.h5"); // parent is created
    let docs = write_three(&path);
    assert_eq!(read_results(&path).unwrap(), docs);

    let f = hdf5::File::open(&path).unwrap();
    let attr = |n: &str| f.attr(n).unwrap().read_scalar::<VarLenUnicode>().unwrap().as_str().to_string();
    assert_eq!(attr("schema"), SCHEMA);
    assert_eq!(attr("model"), "smollm2-135m");
    assert_eq!(attr("norm"), "char");
    assert_eq!(attr("version"), env!("CARGO_PKG_VERSION"));
    assert!(attr("created").ends_with('Z') && attr("created").contains('T'));
    assert_eq!(strings(&f.dataset("docs/id").unwrap()), ["inv-001", "line:2", "inv-003"]);
    assert_eq!(strings(&f.dataset("docs/status").unwrap()), ["ok", "error", "ok"]);
    assert_eq!(f.dataset("docs/choice_offset").unwrap().read_raw::<i64>().unwrap(), [0, 3, 3]);
    assert_eq!(f.dataset("docs/n_choices").unwrap().read_raw::<i32>().unwrap(), [3, 0, 2]);
    assert_eq!(f.dataset("docs/best").unwrap().read_raw::<i32>().unwrap(), [2, -1, 1]);
    assert_eq!(f.dataset("choices/n_tokens").unwrap().read_raw::<i32>().unwrap(), [1, 2, 3, 1, 2]);
    let ds = f.dataset("docs/id").unwrap();
    assert!(ds.chunk().is_some() && ds.is_resizable());
}

#[test]
fn h5dump_reads_the_file() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scores.h5");
    write_three(&path);
    let out = reader("h5dump").arg(&path).output().expect("h5dump is installed (hdf5-tools)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "h5dump failed: {}", String::from_utf8_lossy(&out.stderr));
    for needle in ["\"inv-001\"", "\"line:2\"", "\"inv-003\"", SCHEMA, "H5T_CSET_UTF8", "H5S_UNLIMITED", "corpus.jsonl:2: invalid JSON"] {
        assert!(text.contains(needle), "h5dump output lacks {needle}:\n{text}");
    }
}

#[test]
fn h5py_reads_the_file() {
    let _serial = serial();
    let python = PathBuf::from("/work/venv/bin/python");
    let has_h5py = python.exists() && Command::new(&python).args(["-c", "import h5py"]).status().is_ok_and(|s| s.success());
    if !has_h5py {
        eprintln!("skipped: /work/venv/bin/python with h5py not available");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scores.h5");
    write_three(&path);
    let script = r#"
import sys, h5py
f = h5py.File(sys.argv[1], "r")
ids = [s.decode() for s in f["docs/id"][:]]
texts = [s.decode() for s in f["choices/text"][:]]
print(f.attrs["schema"], f.attrs["norm"], ids, list(f["docs/choice_offset"][:]), texts[3], sum(f["choices/prob"][:3]))
"#;
    let out = reader("/work/venv/bin/python").args(["-c", script]).arg(&path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("falcon-batch/scores/2 char ['inv-001', 'line:2', 'inv-003']"), "{text}");
    assert!(text.contains("inv-003 choice 0 — é"), "{text}");
    assert!(text.trim_end().ends_with("1.0"), "{text}");
}

#[test]
fn resume_returns_done_ids_and_continues() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scores.h5");
    let mut docs = write_three(&path);
    let (mut w, done) = ResultsWriter::open(&path, meta(), false).unwrap();
    assert_eq!(done, HashSet::from(["inv-001".to_string(), "line:2".into(), "inv-003".into()]));
    assert!(w.repair_note().is_none());
    docs.push(ok_doc("inv-004", 4));
    w.append(&docs[3..]).unwrap();
    drop(w);
    assert_eq!(read_results(&path).unwrap(), docs);
    let f = hdf5::File::open(&path).unwrap();
    assert_eq!(f.dataset("docs/choice_offset").unwrap().read_raw::<i64>().unwrap(), [0, 3, 3, 5]);
}

#[test]
fn another_run_is_refused_until_overwrite() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scores.h5");
    write_three(&path);
    let cases = [
        (RunMeta { model_id: "falcon-180b".into(), ..meta() }, "model"),
        (RunMeta { norm: Norm::Sum, ..meta() }, "norm"),
        (RunMeta { template: "{text}".into(), ..meta() }, "template"),
        (RunMeta { delimiter: String::new(), ..meta() }, "target_delimiter"),
        (RunMeta { wire_dtype: "bf16".into(), ..meta() }, "wire_dtype"),
        (RunMeta { compute: "bf16".into(), ..meta() }, "compute"),
    ];
    for (m, attr) in &cases {
        let err = ResultsWriter::open(&path, m.clone(), false).err().unwrap().to_string();
        assert!(err.contains(&format!("written with {attr}")) && err.contains("--overwrite"), "{err}");
        assert!(err.contains("scores.h5"), "{err}");
    }
    let (w, done) = ResultsWriter::open(&path, cases[0].0.clone(), true).unwrap();
    assert!(done.is_empty());
    drop(w);
    assert!(read_results(&path).unwrap().is_empty());
    // and the replaced file now belongs to the new run
    assert!(ResultsWriter::open(&path, cases[0].0.clone(), false).unwrap().1.is_empty());
}

/// A file from before `--target-delimiter` was recorded is not resumed under a guess.
#[test]
fn a_file_without_the_delimiter_is_refused() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.h5");
    write_three(&path);
    hdf5::File::open_rw(&path).unwrap().delete_attr("target_delimiter").unwrap();
    let err = ResultsWriter::open(&path, meta(), false).err().unwrap().to_string();
    assert!(err.contains("records no target_delimiter") && err.contains("--overwrite") && err.contains("old.h5"), "{err}");
}

#[test]
fn foreign_and_empty_files() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.h5");
    std::fs::write(&path, "not hdf5").unwrap();
    let err = ResultsWriter::open(&path, meta(), false).err().unwrap().to_string();
    assert!(err.contains("not a falcon-batch results file") && err.contains("--overwrite"), "{err}");
    std::fs::write(&path, "").unwrap();
    assert!(ResultsWriter::open(&path, meta(), false).unwrap().1.is_empty());
}

/// A job killed between the choices and docs writes, or inside the docs writes.
#[test]
fn torn_tail_is_repaired() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scores.h5");
    let mut docs = write_three(&path);
    {
        let f = hdf5::File::open_rw(&path).unwrap();
        // choices of a 4th document were written...
        for name in ["text", "n_tokens", "logprob", "logprob_mean", "logprob_per_char", "prob"] {
            f.dataset(&format!("choices/{name}")).unwrap().resize(7).unwrap();
        }
        // ...its id too, and every docs dataset but status was extended
        let id = f.dataset("docs/id").unwrap();
        id.resize(4).unwrap();
        id.write_slice(&["torn".parse::<VarLenUnicode>().unwrap()][..], 3..4).unwrap();
        for name in ["error", "n_prompt_tokens", "best", "choice_offset", "n_choices", "status"] {
            f.dataset(&format!("docs/{name}")).unwrap().resize(4).unwrap(); // status stays a fill value
        }
        f.dataset("docs/id").unwrap().resize(5).unwrap(); // and a longer id set
    }
    let (mut w, done) = ResultsWriter::open(&path, meta(), false).unwrap();
    assert_eq!(done.len(), 3);
    assert!(!done.contains("torn"));
    assert!(w.repair_note().unwrap().contains("kept 3 documents and 5 choice rows"));
    docs.push(ok_doc("inv-004", 2));
    w.append(&docs[3..]).unwrap();
    drop(w);
    assert_eq!(read_results(&path).unwrap(), docs);
    let f = hdf5::File::open(&path).unwrap();
    assert_eq!(f.dataset("choices/prob").unwrap().size(), 7);
    assert_eq!(f.dataset("docs/status").unwrap().size(), 4);
}

#[test]
fn csv_has_one_row_per_choice() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scores.h5");
    write_three(&path);
    let csv_path = dir.path().join("scores.csv");
    assert_eq!(export_csv(&path, &csv_path).unwrap(), 6, "a row per choice and one for the failed document");
    let mut r = csv::Reader::from_path(&csv_path).unwrap();
    let header: Vec<String> = r.headers().unwrap().iter().map(String::from).collect();
    assert_eq!(header, ["id", "choice", "text", "n_tokens", "logprob", "logprob_mean", "logprob_per_char", "prob", "is_best", "status", "error"]);
    let rows: Vec<csv::StringRecord> = r.records().collect::<Result<_, _>>().unwrap();
    assert_eq!(rows.len(), 6);
    assert_eq!((&rows[3][0], &rows[3][1], &rows[3][9], &rows[3][10]), ("line:2", "", "error", "corpus.jsonl:2: invalid JSON"));
    assert_eq!(&rows[0][9], "ok");
    assert_eq!(&rows[2][0], "inv-001");
    assert_eq!(&rows[2][1], "2");
    assert_eq!(&rows[2][2], "inv-001 choice 2 — é");
    assert_eq!(&rows[2][8], "1");
    assert_eq!(&rows[0][8], "0");
    assert_eq!(rows[1][4].parse::<f64>().unwrap(), -1.5);
    assert_eq!(&rows[5][0], "inv-003");
}

const CHILD_ENV: &str = "FALCON_BATCH_TEST_KILL_PATH";

/// Runs only as the child of `sigkill_mid_append_leaves_a_resumable_file`: appends until
/// killed.
#[test]
fn child_appends_until_killed() {
    let Ok(path) = std::env::var(CHILD_ENV) else { return };
    let (mut w, _) = ResultsWriter::open(Path::new(&path), meta(), false).unwrap();
    for i in 0.. {
        let batch: Vec<DocResult> = (0..50).map(|j| ok_doc(&format!("d{i}-{j}"), 1 + j % 5)).collect();
        w.append(&batch).unwrap();
    }
}

#[test]
fn sigkill_mid_append_leaves_a_resumable_file() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scores.h5");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_appends_until_killed", "--nocapture"])
        .env(CHILD_ENV, &path)
        .spawn()
        .unwrap();
    // wait until several appends are flushed (the first chunks alone are ~300 KB), then
    // kill it wherever it is
    let start = std::time::Instant::now();
    while std::fs::metadata(&path).map_or(0, |m| m.len()) < 1_500_000 && start.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let (mut w, done) = ResultsWriter::open(&path, meta(), false).unwrap();
    assert!(!done.is_empty());
    assert!(w.repair_note().is_some_and(|n| n.contains("rebuilt")), "{:?}", w.repair_note());
    let before = w.n_docs();
    w.append(&[ok_doc("after-kill", 3)]).unwrap();
    drop(w);
    let docs = read_results(&path).unwrap();
    assert_eq!(docs.len(), before + 1);
    assert_eq!(docs.last().unwrap().id, "after-kill");
    let ids: HashSet<&str> = docs.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids.len(), docs.len());
    assert!(reader("h5dump").arg("-H").arg(&path).status().unwrap().success());
}

#[test]
fn doc_result_from_scores() {
    use falcon_batch::corpus::ReadyDoc;
    use falcon_batch::token_tree::TokenizedDoc;
    use falcon_batch::score::score_document;
    let ready = ReadyDoc {
        doc: TokenizedDoc { index: 0, id: "inv-9".into(), prompt: vec![1, 2, 3], choices: vec![vec![4], vec![5, 6]] },
        choices: vec!["12.40".into(), "9.80".into()],
        choice_chars: vec![6, 5],
        n_prompt_tokens: 3,
        answer: Some("12.40".into()),
        input_hash: "h".into(),
        spans: vec![],
    };
    let scores = score_document(&[vec![-0.5], vec![-2.0, -1.0]], &ready.choice_chars, Norm::Sum);
    let r = DocResult::scored(&ready, &scores).unwrap();
    assert_eq!((r.id.as_str(), r.best, r.n_prompt_tokens, r.is_ok()), ("inv-9", Some(0), 3, true));
    assert_eq!(r.choices[1].text, "9.80");
    assert_eq!(r.choices[1].n_tokens, 2);
    assert_eq!(r.choices[1].logprob, -3.0);
    let short = score_document(&[vec![-0.5]], &[6], Norm::Sum);
    assert!(DocResult::scored(&ready, &short).unwrap_err().to_string().contains("1 scores for 2 choices"));
    let f = DocResult::failed("line:3", "", "c.jsonl:3: invalid JSON");
    assert_eq!((f.status, f.best, f.choices.len()), (DocStatus::Error, None, 0));
}

/// The room for the next append is held beside the file while writing (really allocated,
/// so a full disk shows up there first) and removed on close.
#[test]
fn room_is_held_beside_the_file_while_writing() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scores.h5");
    let reserve = dir.path().join("scores.h5.reserve");
    let (mut w, _) = ResultsWriter::open(&path, meta(), false).unwrap();
    w.append(&[ok_doc("a", 2)]).unwrap();
    let held = std::fs::metadata(&reserve).expect("a reserve file while writing");
    use std::os::unix::fs::MetadataExt;
    assert!(held.len() >= 1 << 20 && held.blocks() * 512 >= 1 << 20, "{} bytes, {} blocks", held.len(), held.blocks());
    w.close().unwrap();
    assert!(!reserve.exists(), "the reserve is removed on close");
    // A killed run's reserve is taken over and removed by the next writer.
    std::fs::write(&reserve, b"left by a killed run").unwrap();
    let (mut w, done) = ResultsWriter::open(&path, meta(), false).unwrap();
    assert_eq!(done.len(), 1);
    w.append(&[ok_doc("b", 1)]).unwrap();
    drop(w);
    assert!(!reserve.exists());
    assert_eq!(read_results(&path).unwrap().len(), 2);
}
