//! Part files that are not what the manifest says are caught while they are read, before
//! any compute: a bit-flipped tensor stops the job naming the part and file; a directory
//! from before the fast hash still loads, with a notice.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_falcon-batch"));
    c.env("HDF5_USE_FILE_LOCKING", "FALSE");
    c
}

fn run(c: &mut Command) -> Output {
    c.output().expect("run falcon-batch")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn tmp(name: &str) -> PathBuf {
    common::tmp::dir(&format!("fb-integrity-{name}"))
}

fn convert(dir: &Path) -> PathBuf {
    let out = dir.join("model");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_gqa");
    let o = run(bin().args(["convert", "--from"]).arg(&fixture).arg("--to").arg(&out));
    assert!(o.status.success(), "{}", stderr(&o));
    out
}

fn corpus(dir: &Path) -> PathBuf {
    let p = dir.join("docs.jsonl");
    let lines: Vec<String> = (0..4)
        .map(|i| serde_json::json!({"id": format!("d{i}"), "prompt": format!("t{} t{} t9", 5 + i, 20 + i), "choices": ["t7", "t8 t3"]}).to_string())
        .collect();
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

fn score(model: &Path, docs: &Path, out: &Path) -> Output {
    run(bin().arg("score").arg("--model").arg(model).arg("--docs").arg(docs).arg("--out").arg(out).arg("--quiet"))
}

/// Flip 64 bytes in the middle of the file, inside tensor data (past the header).
fn flip_64_bytes(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize + 8;
    let at = header + (bytes.len() - header) / 2;
    for b in &mut bytes[at..at + 64] {
        *b ^= 0x5a;
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_bit_flipped_part_stops_the_job_before_compute() {
    let d = tmp("flip");
    let m = convert(&d);
    let docs = corpus(&d);
    let good = score(&m, &docs, &d.join("good.h5"));
    assert!(good.status.success(), "{}", stderr(&good));

    let part = m.join("layer_001.safetensors");
    flip_64_bytes(&part);
    let out = d.join("bad.h5");
    let o = score(&m, &docs, &out);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("layer_001") && e.contains(&part.display().to_string()) && e.contains("content hash"), "{e}");
    let scored = !out.exists() || falcon_batch::results::read_results(&out).map(|r| r.len()).unwrap_or(0) == 0;
    assert!(scored, "nothing may be scored with a corrupt part");

    // inspect --verify names the same part
    let o = run(bin().arg("inspect").arg(&m).arg("--verify"));
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("layer_001"), "{}", stderr(&o));
}

#[test]
fn a_directory_without_fast_hashes_loads_with_a_notice() {
    let d = tmp("old");
    let m = convert(&d);
    let path = m.join("manifest.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for p in json["parts"].as_array_mut().unwrap() {
        assert!(p.as_object_mut().unwrap().remove("xxh3").is_some(), "convert records the fast hash");
    }
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    let o = score(&m, &corpus(&d), &d.join("old.h5"));
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert_eq!(e.matches("no fast content hashes").count(), 1, "one notice: {e}");
}
