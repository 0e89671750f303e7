//! More layer groups than a multiple of the ranks, under real mpirun: one-layer groups of
//! the 3-layer fixture on 2 ranks are 3 groups (rank 0 runs groups 0 and 2, the end on rank
//! 0 too), and they score what one process does.

mod common;

use common::proc::run_limited;
use common::smol::{assert_same_results, bin};
use falcon_batch::results::read_results;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Every launch is killed, with its process group, past this.
const LIMIT: Duration = Duration::from_secs(300);

fn corpus(dir: &Path) -> PathBuf {
    let lines: Vec<String> = (0..12)
        .map(|i| {
            let words: Vec<String> = (0..(4 + i % 5)).map(|k| format!("t{}", 3 + (i * 7 + k * 13) % 90)).collect();
            serde_json::json!({"id": format!("d{i}"), "prompt": words.join(" "), "choices": [format!("t{}", 3 + i), format!("t{} t{}", 9 + i, 40 + i)]}).to_string()
        })
        .collect();
    let p = dir.join("docs.jsonl");
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

fn score(np: usize, model: &Path, docs: &Path, out: &Path) -> common::proc::Ran {
    let mut c = Command::new("mpirun");
    c.args(["--oversubscribe", "-np", &np.to_string()]);
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1").env("HDF5_USE_FILE_LOCKING", "FALSE");
    c.arg(bin()).args(["score", "--device", "cpu", "--batch-tokens", "40", "--wave", "2", "--group-layers", "1", "--resident", "1"]);
    c.arg("--model").arg(model).arg("--docs").arg(docs).arg("--out").arg(out);
    run_limited(&c, LIMIT)
}

#[test]
fn one_layer_groups_of_three_layers_on_two_ranks() {
    let dir = common::tmp::dir("fb-uneven-groups");
    let model = dir.join("model");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_tied");
    let mut c = Command::new(bin());
    c.args(["convert", "--from"]).arg(&fixture).arg("--to").arg(&model);
    let o = run_limited(&c, LIMIT);
    assert!(o.success(), "{}", o.stderr);
    let docs = corpus(&dir);

    let one = score(1, &model, &docs, &dir.join("np1.h5"));
    assert!(one.success(), "-np 1: {}", one.stderr);
    let two = score(2, &model, &docs, &dir.join("np2.h5"));
    assert!(two.success(), "-np 2: {}", two.stderr);
    assert!(two.stderr.contains("rank 0: layers 0, 2") && two.stderr.contains("rank 1: layers 1"), "{}", two.stderr);
    let (want, got) = (read_results(&dir.join("np1.h5")).unwrap(), read_results(&dir.join("np2.h5")).unwrap());
    assert_eq!(got.len(), 12);
    assert_same_results(&want, &got, 1e-6, "-np 2, one-layer groups");
}
