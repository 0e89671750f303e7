//! The `plan` subcommand end to end: flags, errors naming the flag, --model manifests, trace.

mod common;

use common::proc::OutputWithin;
use std::process::Command;
use std::time::Duration;

/// Every launch is killed, with its process group, past this.
const LIMIT: Duration = Duration::from_secs(300);

fn plan(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_falcon-batch")).arg("plan").args(args).output_within(LIMIT).expect("run falcon-batch");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

const F180: &[&str] = &["--preset", "falcon-180b", "--ranks", "8", "--device-mem", "24GB", "--h2d", "24GB/s", "--net", "1Gbit", "--tflops", "71", "--docs", "100000", "--doc-tokens", "1500", "--choices", "4"];

#[test]
fn falcon_180b_on_eight_3090s() {
    let (ok, out, err) = plan(F180);
    assert!(ok, "{err}");
    for r in 0..8 {
        assert!(out.contains(&format!("rank {r}: layers ")), "{out}");
    }
    assert!(out.contains("documents/hour") && out.contains("bottleneck:"), "{out}");
}

#[test]
fn bad_values_name_the_flag() {
    for (flag, value) in [("--device-mem", "24XB"), ("--h2d", "fast"), ("--net-latency", "1h"), ("--net", "0Gbit")] {
        let mut args: Vec<&str> = F180.to_vec();
        args.extend([flag, value]);
        // Later flags repeat earlier ones: replace instead.
        if let Some(i) = F180.iter().position(|a| *a == flag) {
            args = F180.to_vec();
            args[i + 1] = value;
        }
        let (ok, _, err) = plan(&args);
        assert!(!ok && err.contains(flag), "{flag}: {err}");
    }
    let (ok, _, err) = plan(&["--preset", "falcon-999b", "--ranks", "2", "--device-mem", "24GB", "--tflops", "1"]);
    assert!(!ok && err.contains("--preset"), "{err}");
    let (ok, _, err) = plan(&["--preset", "falcon-180b", "--ranks", "8", "--device-mem", "8GB", "--tflops", "71", "--resident", "2"]);
    assert!(!ok && err.contains("--resident 1 would fit"), "{err}");
}

#[test]
fn model_dir_parts_json_and_trace() {
    let dir = tempfile::tempdir().unwrap();
    common::fake_manifest(dir.path(), 6);
    let m = dir.path().to_str().unwrap();
    let base = ["--model", m, "--ranks", "3", "--device-mem", "1MB", "--resident", "1", "--group-layers", "1", "--batch-tokens", "64", "--reserve", "0"];
    let (ok, out, err) = plan(&[&base[..], &["--parts-for-rank", "0"]].concat());
    assert!(ok, "{err}");
    assert_eq!(out, "begin.safetensors\nlayer_000.safetensors\nlayer_003.safetensors\n");
    let (_, out, _) = plan(&[&base[..], &["--parts-for-rank", "2"]].concat());
    assert_eq!(out, "layer_002.safetensors\nlayer_005.safetensors\nend.safetensors\n");
    let trace = dir.path().join("t.json");
    let t = trace.to_str().unwrap();
    let (ok, out, err) = plan(&[&base[..], &["--tflops", "1", "--docs", "50", "--doc-tokens", "20", "--json", "--trace", t]].concat());
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["schedule"]["groups"].as_array().unwrap().len(), 6);
    assert!(v["report"]["docs_per_hour"].as_f64().unwrap() > 0.0);
    let tr: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    assert!(tr["traceEvents"].as_array().unwrap().iter().any(|e| e["ph"] == "X" && e["cat"] == "compute"));
}

/// `plan --model` reads manifest.json through the one reader every other command uses: a
/// manifest that `score` refuses (no format version, no hashes) is refused here too, naming
/// the file and the field, instead of being planned from its config alone.
#[test]
fn model_dir_manifest_is_checked_as_score_checks_it() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = serde_json::json!({"family": "llama", "dtype": "f32", "config": {"family": "llama"}});
    std::fs::write(dir.path().join("manifest.json"), manifest.to_string()).unwrap();
    let m = dir.path().to_str().unwrap();
    let (ok, _, err) = plan(&["--model", m, "--ranks", "2", "--device-mem", "1MB", "--tflops", "1"]);
    assert!(!ok && err.contains("manifest.json") && err.contains("format_version"), "{err}");
}

/// The number after `label`, at its first occurrence.
fn figure(out: &str, label: &str) -> f64 {
    let at = out.find(label).unwrap_or_else(|| panic!("no `{label}` in:\n{out}"));
    let rest = out[at + label.len()..].trim_start();
    let end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
    rest[..end].parse().unwrap_or_else(|e| panic!("after `{label}`: {e}"))
}

#[test]
fn extract_cost_beside_score() {
    let extract = |more: &[&str]| {
        let (ok, out, err) = plan(&[F180, &["--extract"], more].concat());
        assert!(ok, "{err}");
        out
    };
    // The defaults, stated in --help, then the figures a bench measured.
    let out = extract(&[]);
    assert_eq!((figure(&out, "passes per document:"), figure(&out, "tree tokens per document:")), (5.0, 179.0), "{out}");
    let (x, s) = (figure(&out, "extract documents/hour:"), figure(&out, "score documents/hour:"));
    assert!(x > 0.0 && s > 0.0, "{out}");
    let ratio = figure(&out, "extract / score time per document:");
    assert!((ratio - s / x).abs() < 0.01, "{ratio} vs {s} / {x}:\n{out}");
    // Score's figure is what `plan` without --extract predicts for the same flags.
    let (_, plain, _) = plan(F180);
    assert!(plain.contains(&format!(" {s:.0} documents/hour")), "{s}:\n{plain}");
    let more = extract(&["--tree-rows", "2000", "--passes", "3"]);
    assert_eq!((figure(&more, "passes per document:"), figure(&more, "tree tokens per document:")), (3.0, 2000.0), "{more}");
    assert!(figure(&more, "extract documents/hour:") < x, "{more}");
    let (ok, json, err) = plan(&[F180, &["--extract", "--json"]].concat());
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&json).expect("--json");
    assert_eq!((v["extract"]["passes"].as_u64(), v["extract"]["tree_rows"].as_u64()), (Some(5), Some(179)));
    assert!(v["extract"]["score_report"]["docs_per_hour"].as_f64().is_some_and(|d| d > 0.0), "{json}");
}

#[test]
fn extract_bad_values_exit_2_naming_the_flag() {
    for (bad, flag) in [
        (&["--extract", "--passes", "1"][..], "--passes"),
        (&["--extract", "--passes", "0"], "--passes"),
        (&["--extract", "--tree-rows", "2", "--passes", "4"], "--tree-rows"),
        (&["--extract", "--tree-rows", "many"], "--tree-rows"),
        (&["--tree-rows", "50"], "--extract"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_falcon-batch")).arg("plan").args(F180).args(bad).output_within(LIMIT).expect("run falcon-batch");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {err}");
        assert!(err.contains(flag), "{bad:?}: {err}");
    }
}
