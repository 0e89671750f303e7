//! The Slurm scripts: syntax, shellcheck, and staging on a fake model directory copies
//! exactly the parts the node's ranks need.

mod common;

use common::proc::OutputWithin;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Every launch is killed, with its process group, past this.
const LIMIT: Duration = Duration::from_secs(300);

const SCRIPTS: &[&str] = &["slurm/falcon-batch.sbatch", "slurm/stage-parts.sh", "slurm/run-rank.sh"];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn scripts_parse() {
    for s in SCRIPTS {
        let out = Command::new("bash").arg("-n").arg(root().join(s)).output_within(LIMIT).expect("bash");
        assert!(out.status.success(), "{s}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn scripts_pass_shellcheck() {
    let Ok(out) = Command::new("shellcheck").args(SCRIPTS).current_dir(root()).output_within(LIMIT) else {
        eprintln!("shellcheck not installed; skipped");
        return;
    };
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

fn fake_model(dir: &Path, layers: usize) {
    common::fake_manifest(dir, layers);
    std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
    let mut parts = vec!["begin".to_string(), "end".to_string()];
    parts.extend((0..layers).map(|i| format!("layer_{i:03}")));
    for p in parts {
        std::fs::write(dir.join(format!("{p}.safetensors")), p.as_bytes()).unwrap();
    }
}

fn staged(dest: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dest).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
}

#[test]
fn stage_parts_copies_exactly_the_needed_files() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir(&model).unwrap();
    fake_model(&model, 6);
    let dest = tmp.path().join("local");
    let stage = |first: &str| {
        let out = Command::new("bash")
            .arg(root().join("slurm/stage-parts.sh"))
            .args(["--model", model.to_str().unwrap(), "--dest", dest.to_str().unwrap()])
            .args(["--ranks", "3", "--first-rank", first, "--local-ranks", "2", "--"])
            .args(["--device-mem", "1MB", "--reserve", "0", "--resident", "1", "--group-layers", "1", "--batch-tokens", "64"])
            .env("FALCON_BATCH", env!("CARGO_BIN_EXE_falcon-batch"))
            .output_within(LIMIT)
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    // Ranks 0 and 1 of 3 run groups 0,1,3,4 = layers 0,1,3,4 plus begin.
    stage("0");
    let want: BTreeSet<String> = ["manifest.json", "tokenizer.json", "begin", "layer_000", "layer_001", "layer_003", "layer_004"]
        .iter()
        .map(|f| if f.ends_with(".json") { f.to_string() } else { format!("{f}.safetensors") })
        .collect();
    assert_eq!(staged(&dest), want);
    assert_eq!(std::fs::read(dest.join("layer_003.safetensors")).unwrap(), b"layer_003");
    // The second node holds only rank 2: layers 2 and 5 and end.
    let _ = std::fs::remove_dir_all(&dest);
    stage("2");
    let want: BTreeSet<String> =
        ["manifest.json", "tokenizer.json", "layer_002.safetensors", "layer_005.safetensors", "end.safetensors"].iter().map(|s| s.to_string()).collect();
    assert_eq!(staged(&dest), want);
}
