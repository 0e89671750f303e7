//! Usage errors through the binary: every one exits 2 naming the flag and what it expects,
//! before anything is read or written; a plan size needs its unit; and a reader that closes
//! stdout early (`show … | head`) ends the command quietly with exit 0.

mod common;

use common::proc::bin;

use common::proc::OutputWithin;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

/// Every launch is killed, with its process group, past this.
const LIMIT: Duration = Duration::from_secs(300);

fn run(args: &[&str]) -> Output {
    bin().args(args).output_within(LIMIT).expect("run falcon-batch")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn tmp() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| common::tmp::dir("fb-usage"))
}

/// The llama_tied fixture converted once.
fn model() -> &'static PathBuf {
    static M: OnceLock<PathBuf> = OnceLock::new();
    M.get_or_init(|| {
        let out = tmp().join("model");
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_tied");
        let o = bin().args(["convert", "--from"]).arg(&fixture).arg("--to").arg(&out).output_within(LIMIT).unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        out
    })
}

/// `n` small documents of the fixture's vocabulary.
fn corpus(name: &str, n: usize) -> PathBuf {
    let p = tmp().join(name);
    let lines: Vec<String> = (0..n)
        .map(|i| serde_json::json!({"id": format!("d{i}"), "prompt": format!("t{} t{}", 5 + i % 50, 7 + i % 31), "choices": ["t7", "t8 t3"]}).to_string())
        .collect();
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

/// Exit 2, and stderr names the flag and says what it expected.
fn assert_usage(args: &[&str], flag: &str, expected: &str) {
    let o = run(args);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {e}");
    assert!(e.contains(flag) && e.contains(expected), "{args:?}: {e}");
}

#[test]
fn score_flags() {
    let m = model().to_str().unwrap();
    let docs = corpus("score.jsonl", 2);
    let d = docs.to_str().unwrap();
    let out = tmp().join("never.h5");
    let o = out.to_str().unwrap();
    let base = ["score", "--model", m, "--docs", d, "--out", o];
    let case = |extra: &[&str], flag: &str, expected: &str| assert_usage(&[&base[..], extra].concat(), flag, expected);
    case(&["--norm", "bogus"], "--norm", "expected sum, mean or char");
    case(&["--batch-tokens", "0"], "--batch-tokens", "at least 1");
    case(&["--wave", "0"], "--wave", "at least 1");
    case(&["--group-layers", "0"], "--group-layers", "at least 1");
    case(&["--resident", "0"], "--resident", "at least 1");
    case(&["--device-mem", "24"], "--device-mem", "24GB");
    // Negative numbers go after `=`: alone, clap reads them as flags.
    case(&["--rank-speed=-1"], "--rank-speed", "positive");
    // Also without the subcommand.
    assert_usage(&["--model", m, "--docs", d, "--out", o, "--norm", "bogus"], "--norm", "expected sum, mean or char");
    assert!(!out.exists(), "a usage error writes nothing");
}

#[test]
fn convert_and_generate_flags() {
    let to = tmp().join("converted");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_tied");
    assert_usage(&["convert", "--from", fixture.to_str().unwrap(), "--to", to.to_str().unwrap(), "--dtype", "fp16"], "--dtype", "expected bf16, f16 or f32");
    assert!(!to.exists());
    let m = model().to_str().unwrap();
    let base = ["generate", "--model", m, "--prompt", "t5 t6", "--device", "cpu"];
    let case = |extra: &[&str], flag: &str, expected: &str| assert_usage(&[&base[..], extra].concat(), flag, expected);
    case(&["--top-p", "2"], "--top-p", "(0, 1]");
    case(&["--top-p", "0"], "--top-p", "(0, 1]");
    case(&["--temperature=-1"], "--temperature", "0 or more");
    case(&["--repetition-penalty", "0"], "--repetition-penalty", "positive");
    case(&["--top-k=-3"], "--top-k", "-3");
}

#[test]
fn plan_flags_and_units() {
    let base = ["plan", "--preset", "falcon-7b", "--ranks", "2", "--device-mem", "24GB", "--tflops", "100"];
    // A value given twice is an error of its own in clap, so each case replaces the base's.
    let with = |flag: &str, value: &str| -> Vec<String> {
        let mut args: Vec<String> = base.iter().map(|s| s.to_string()).collect();
        match args.iter().position(|a| a == flag) {
            Some(i) => args[i + 1] = value.to_string(),
            None => args.extend([flag.to_string(), value.to_string()]),
        }
        args
    };
    let case = |flag: &str, value: &str, expected: &str| {
        let args = with(flag, value);
        assert_usage(&args.iter().map(String::as_str).collect::<Vec<_>>(), flag, expected);
    };
    case("--device-mem", "24", "24GB");
    case("--host-mem", "64", "24GB");
    case("--reserve", "1024", "24GB");
    case("--h2d", "24", "24GB/s");
    case("--net", "10", "1Gbit");
    case("--net-latency", "50", "50us");
    case("--ranks", "0", "at least 1");
    case("--batch-tokens", "0", "at least 1");
    case("--efficiency", "1.5", "(0, 1]");
    case("--tflops", "0", "positive");
    case("--preset", "falcon-9b", "unknown model");
    case("--rank-speed", "1,1,1", "3 speeds for 2 ranks");
    case("--parts-for-rank", "5", "does not exist");
    assert_usage(&["plan", "--preset", "falcon-7b", "--ranks", "2", "--device-mem", "24GB"], "--tflops", "--costs");
    // The unit makes it work; a bare 0 needs none.
    let o = run(&["plan", "--preset", "falcon-7b", "--ranks", "2", "--device-mem", "24GB", "--reserve", "0", "--tflops", "100"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn show_into_a_reader_that_stops_early_ends_quietly() {
    // Far more rows than a pipe holds, so `show` is still writing when `head` exits.
    let docs = corpus("many.jsonl", 3000);
    let out = tmp().join("many.h5");
    let o = bin()
        .args(["score", "--quiet", "--device", "cpu", "--model"])
        .arg(model())
        .arg("--docs")
        .arg(&docs)
        .arg("--out")
        .arg(&out)
        .output_within(LIMIT)
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let script = r#""$0" show "$1" | head -n 2; echo "show exited ${PIPESTATUS[0]}" >&2"#;
    let o = Command::new("bash")
        .args(["-c", script])
        .arg(env!("CARGO_BIN_EXE_falcon-batch"))
        .arg(&out)
        .env("HDF5_USE_FILE_LOCKING", "FALSE")
        .output_within(LIMIT)
        .unwrap();
    let e = stderr(&o);
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 2);
    assert!(e.contains("show exited 0"), "{e}");
    assert!(!e.contains("panicked") && !e.contains("error"), "quietly: {e}");
}
