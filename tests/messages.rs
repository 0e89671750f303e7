//! The message channel, through the binary: `--quiet` silences every info line (the ranks'
//! too), and under mpirun every line on stderr is ours, whole, with one prefix and the rank
//! named once (`rank rank 1: read…` was seen when lines went out in pieces).

mod common;

use common::proc::{run_limited, Ran};
use common::tiny;
use std::path::Path;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(300);

fn score(np: Option<usize>, model: &Path, docs: &Path, out: &Path, extra: &[&str]) -> Ran {
    let mut c = match np {
        Some(np) => {
            let mut c = tiny::mpirun(np, &[]);
            c.arg(env!("CARGO_BIN_EXE_falcon-batch"));
            c
        }
        None => tiny::bin(),
    };
    c.arg("score").arg("--model").arg(model).arg("--docs").arg(docs).arg("--out").arg(out);
    c.args(["--device", "cpu", "--batch-tokens", "40", "--wave", "1"]).args(extra);
    run_limited(&c, LIMIT)
}

/// Every line starts with the one prefix and names a rank at most once.
fn assert_ours(what: &str, stderr: &str) {
    for line in stderr.lines() {
        assert!(line.starts_with("falcon-batch: "), "{what}: a line without the prefix: {line:?}\n{stderr}");
        assert_eq!(line.matches("falcon-batch").count(), 1, "{what}: two prefixes: {line:?}\n{stderr}");
        assert!(line.matches("rank ").count() <= 1, "{what}: the rank twice: {line:?}\n{stderr}");
    }
}

#[test]
fn quiet_prints_no_info_line_and_every_line_has_one_prefix() {
    let d = common::tmp::dir("fb-messages");
    let model = tiny::model(&d);
    let docs = tiny::corpus(&d, "docs.jsonl", 6);

    let loud = score(None, &model, &docs, &d.join("loud.h5"), &[]);
    assert!(loud.success(), "{}", loud.text());
    assert!(loud.stderr.contains("rank 0: layers") && loud.stderr.contains("rank 0: cpu compute"), "{}", loud.stderr);
    assert_ours("one process", &loud.stderr);

    let quiet = score(None, &model, &docs, &d.join("quiet.h5"), &["--quiet"]);
    assert!(quiet.success(), "{}", quiet.text());
    assert!(!quiet.stderr.contains("rank"), "--quiet printed a rank line:\n{}", quiet.stderr);
    assert_eq!(quiet.stderr, "", "--quiet printed info lines");

    let two = score(Some(2), &model, &docs, &d.join("two.h5"), &[]);
    assert!(two.success(), "{}", two.text());
    for r in 0..2 {
        assert!(two.stderr.contains(&format!("falcon-batch: rank {r}: read ")), "rank {r}:\n{}", two.stderr);
    }
    assert_ours("mpirun -np 2", &two.stderr);

    let two_quiet = score(Some(2), &model, &docs, &d.join("two-quiet.h5"), &["--quiet"]);
    assert!(two_quiet.success(), "{}", two_quiet.text());
    assert_eq!(two_quiet.stderr, "", "--quiet under mpirun printed info lines");
}

/// Warnings show under --quiet, with the prefix: a file its last writer did not close (the
/// job was killed) is rebuilt on the next run, which says so.
#[test]
fn warnings_show_under_quiet() {
    let d = common::tmp::dir("fb-messages-warn");
    let model = tiny::model(&d);
    let docs = tiny::corpus(&d, "docs.jsonl", 12);
    let out = d.join("out.h5");
    let mut c = tiny::bin();
    c.arg("score").arg("--model").arg(&model).arg("--docs").arg(&docs).arg("--out").arg(&out);
    c.args(["--device", "cpu", "--batch-tokens", "40", "--wave", "1", "--quiet"]).env("FALCON_BATCH_KILL_AFTER_DOCS", "3");
    let killed = run_limited(&c, LIMIT);
    assert!(!killed.success(), "{}", killed.text());
    let o = score(None, &model, &docs, &out, &["--quiet"]);
    assert!(o.success(), "{}", o.text());
    assert!(o.stderr.starts_with("falcon-batch: warning: ") && o.stderr.contains("did not close the file"), "{}", o.stderr);
    assert_ours("resumed", &o.stderr);

    let other = tiny::corpus(&d, "other.jsonl", 5);
    let mut c = tiny::bin();
    c.arg("show").arg(&out).arg("--docs").arg(&other);
    let o = run_limited(&c, LIMIT);
    assert!(o.success(), "{}", o.text());
    assert!(o.stderr.starts_with("falcon-batch: warning: ") && o.stderr.contains("is not the corpus"), "{}", o.stderr);
}
