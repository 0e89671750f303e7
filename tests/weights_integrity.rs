//! Part files and the tokenizer that are not what the manifest says are caught before any
//! compute: a bit-flipped tensor stops the job naming the part and file; another tokenizer
//! stops it naming the tokenizer; a manifest without the hashes is refused, and a directory
//! from an older falcon-batch is refused until `inspect --upgrade` has checked it.

mod common;

use common::proc::{bin, run};

use std::path::{Path, PathBuf};
use std::process::Output;

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

/// manifest.json as JSON, changed by `edit`, written back.
fn edit_manifest(m: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = m.join("manifest.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
}

#[test]
fn a_manifest_without_fast_hashes_is_refused_not_loaded_unchecked() {
    let d = tmp("no-xxh3");
    let m = convert(&d);
    edit_manifest(&m, |json| {
        for p in json["parts"].as_array_mut().unwrap() {
            assert!(p.as_object_mut().unwrap().remove("xxh3").is_some(), "convert records the fast hash");
        }
    });
    flip_64_bytes(&m.join("layer_000.safetensors"));
    let out = d.join("old.h5");
    let o = score(&m, &corpus(&d), &out);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("manifest.json") && e.contains("xxh3 is missing"), "{e}");
    assert!(!out.exists(), "nothing may be scored");
}

/// Swaps the ids of "g" and "h" in the fixture's tokenizer.json: same size, other ids.
fn swap_two_ids(m: &Path) {
    let path = m.join("tokenizer.json");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("\"g\": 40") && text.contains("\"h\": 41"), "the fixture's vocabulary changed");
    let swapped = text.replace("\"g\": 40", "\"g\": @").replace("\"h\": 41", "\"h\": 40").replace("\"g\": @", "\"g\": 41");
    assert_eq!(swapped.len(), text.len());
    std::fs::write(&path, swapped).unwrap();
}

#[test]
fn another_tokenizer_is_refused_at_score_generate_and_verify() {
    let d = tmp("tokenizer");
    let m = convert(&d);
    let docs = corpus(&d);
    swap_two_ids(&m);
    let tok = m.join("tokenizer.json").display().to_string();

    let out = d.join("swapped.h5");
    let o = score(&m, &docs, &out);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains(&tok) && e.contains("the tokenizer differs") && e.contains("sha256"), "{e}");
    assert!(!out.exists(), "nothing may be scored");

    let o = run(bin().arg("generate").arg("--model").arg(&m).args(["--prompt", "t5 t6", "--max-new-tokens", "2", "--device", "cpu"]));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("the tokenizer differs"), "{}", stderr(&o));

    let o = run(bin().arg("inspect").arg(&m).arg("--verify"));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("verify: the tokenizer differs") && stderr(&o).contains(&tok), "{}", stderr(&o));
}

#[test]
fn the_model_id_covers_the_tokenizer() {
    let d = tmp("id");
    let m = convert(&d);
    // The same checkpoint but for two swapped ids in its tokenizer: another model.
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_gqa");
    let other = d.join("checkpoint");
    std::fs::create_dir(&other).unwrap();
    for e in std::fs::read_dir(&fixture).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), other.join(e.file_name())).unwrap();
    }
    swap_two_ids(&other);
    let m2 = d.join("model2");
    let o = run(bin().args(["convert", "--from"]).arg(&other).arg("--to").arg(&m2));
    assert!(o.status.success(), "{}", stderr(&o));
    let id = |m: &Path| -> String {
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(m.join("manifest.json")).unwrap()).unwrap();
        json["model_id"].as_str().unwrap().to_string()
    };
    assert_ne!(id(&m), id(&m2));
}

/// A version 1 manifest as an older falcon-batch wrote it: no tokenizer hash, no xxh3,
/// the id over the config and the parts' sha256 only.
fn make_version_1(m: &Path) {
    let cfg_json = serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(m.join("manifest.json")).unwrap()).unwrap()["config"].clone();
    let cfg: falcon_batch::config::ModelConfig = serde_json::from_value(cfg_json).unwrap();
    edit_manifest(m, |json| {
        json["format_version"] = serde_json::json!(1);
        json.as_object_mut().unwrap().remove("tokenizer_hash");
        for p in json["parts"].as_array_mut().unwrap() {
            p.as_object_mut().unwrap().remove("xxh3");
        }
        let parts: Vec<falcon_batch::format::manifest::PartEntry> = serde_json::from_value(json["parts"].clone()).unwrap();
        json["model_id"] = serde_json::json!(falcon_batch::format::manifest::compute_model_id(&cfg, &parts, None));
    });
}

#[test]
fn an_old_directory_is_refused_until_upgraded() {
    let d = tmp("v1");
    let m = convert(&d);
    let docs = corpus(&d);
    let want = score(&m, &docs, &d.join("want.h5"));
    assert!(want.status.success(), "{}", stderr(&want));
    make_version_1(&m);

    let o = score(&m, &docs, &d.join("old.h5"));
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("manifest.json") && e.contains("version 1") && e.contains("--upgrade"), "{e}");

    // A corrupt part stops the upgrade, and nothing is written.
    let part = m.join("layer_001.safetensors");
    let good = std::fs::read(&part).unwrap();
    flip_64_bytes(&part);
    let before = std::fs::read(m.join("manifest.json")).unwrap();
    let o = run(bin().arg("inspect").arg(&m).arg("--upgrade"));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("layer_001") && stderr(&o).contains("nothing was written"), "{}", stderr(&o));
    assert_eq!(std::fs::read(m.join("manifest.json")).unwrap(), before);

    std::fs::write(&part, good).unwrap();
    let o = run(bin().arg("inspect").arg(&m).arg("--upgrade"));
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(bin().arg("inspect").arg(&m).arg("--verify"));
    assert!(o.status.success(), "{}", stderr(&o));
    let again = score(&m, &docs, &d.join("upgraded.h5"));
    assert!(again.status.success(), "{}", stderr(&again));
    let (a, b) = (falcon_batch::results::read_results(&d.join("want.h5")).unwrap(), falcon_batch::results::read_results(&d.join("upgraded.h5")).unwrap());
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.choices.iter().map(|c| c.logprob).collect::<Vec<_>>(), y.choices.iter().map(|c| c.logprob).collect::<Vec<_>>());
    }
}
