//! `falcon-batch generate` through the binary on the llama_tied fixture: --out is not
//! replaced by accident, prompt ids are required and unique, `tokens` holds what `text`
//! shows (no end-of-sequence token, nothing of a stop string), sampling without --seed
//! says its seed, --prompt says why it stopped, and the stats line starts on its own line.

mod common;

use common::proc::bin;

use common::proc::OutputWithin;
use falcon_batch::tokenizer::Tokenizer;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

/// Every launch is killed, with its process group, past this.
const LIMIT: Duration = Duration::from_secs(300);

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn tmp() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| common::tmp::dir("fb-generate-cli"))
}

fn convert(to: &Path) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_tied");
    let o = bin().args(["convert", "--from"]).arg(&fixture).arg("--to").arg(to).output_within(LIMIT).unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

fn model() -> &'static PathBuf {
    static M: OnceLock<PathBuf> = OnceLock::new();
    M.get_or_init(|| {
        let m = tmp().join("model");
        convert(&m);
        m
    })
}

fn generate(model: &Path, args: &[&str]) -> Output {
    bin().arg("generate").arg("--model").arg(model).args(["--device", "cpu"]).args(args).output_within(LIMIT).unwrap()
}

fn prompts(name: &str, lines: &[&str]) -> PathBuf {
    let p = tmp().join(name);
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

/// The one JSON line of a single-prompt run written to stdout.
fn one(o: &Output) -> Value {
    assert!(o.status.success(), "{}", stderr(o));
    let text = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    serde_json::from_str(lines[0]).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect()
}

const PROMPT: &str = r#"{"id": "a", "prompt": "t5 t6 t7"}"#;

#[test]
fn an_existing_out_is_kept_unless_overwrite() {
    let p = prompts("out.jsonl", &[PROMPT]);
    let out = tmp().join("gen.jsonl");
    std::fs::write(&out, "precious\n").unwrap();
    let args = ["--prompts", p.to_str().unwrap(), "--out", out.to_str().unwrap(), "--max-new-tokens", "3"];
    let o = generate(model(), &args);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--out") && stderr(&o).contains("--overwrite"), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "precious\n");
    let o = generate(model(), &[&args[..], &["--overwrite"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::read_to_string(&out).unwrap().starts_with("{\"id\":\"a\""));
}

#[test]
fn prompt_ids_are_required_and_unique() {
    let dup = prompts("dup.jsonl", &[PROMPT, r#"{"id": "b", "prompt": "t9"}"#, r#"{"id": "a", "prompt": "t8"}"#]);
    let o = generate(model(), &["--prompts", dup.to_str().unwrap(), "--max-new-tokens", "2"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains(&format!("{}:3", dup.display())) && e.contains("\"id\"") && e.contains("line 1"), "{e}");
    assert!(o.stdout.is_empty());
    let missing = prompts("missing.jsonl", &[PROMPT, r#"{"prompt": "t9"}"#]);
    let o = generate(model(), &["--prompts", missing.to_str().unwrap(), "--max-new-tokens", "2"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains(&format!("{}:2", missing.display())) && e.contains("\"id\"") && e.contains("missing"), "{e}");
}

/// The first position from 1 on whose token appeared nowhere before it.
fn first_new(t: &[u32]) -> usize {
    (1..t.len()).find(|&i| !t[..i].contains(&t[i])).expect("a token not seen before")
}

#[test]
fn tokens_hold_what_text_shows() {
    let p = prompts("one.jsonl", &[PROMPT]);
    let ps = p.to_str().unwrap();
    let tok = Tokenizer::from_file(&model().join("tokenizer.json")).unwrap();
    let free = one(&generate(model(), &["--prompts", ps, "--max-new-tokens", "10", "--ignore-eos"]));
    let t = ids(&free);
    assert_eq!(free["text"].as_str().unwrap(), tok.decode(&t, true).unwrap());

    // A stop string that begins where a token does: neither it nor its tokens are kept.
    let text = free["text"].as_str().unwrap();
    let (i, stop) = (1..t.len() - 1)
        .find_map(|i| {
            let before = tok.decode(&t[..i], true).unwrap();
            let stop = tok.decode(&t[..i + 2], true).unwrap().strip_prefix(before.as_str())?.to_string();
            (!stop.is_empty() && text.find(&stop) == Some(before.len())).then_some((i, stop))
        })
        .expect("a stop string at a token boundary");
    let stopped = one(&generate(model(), &["--prompts", ps, "--max-new-tokens", "10", "--ignore-eos", "--stop", &stop]));
    assert_eq!(stopped["finish"], "stop");
    assert_eq!(ids(&stopped), t[..i].to_vec(), "stop {stop:?}");
    assert_eq!(stopped["text"].as_str().unwrap(), tok.decode(&t[..i], true).unwrap());

    // The end-of-sequence token ends the text and is not among its tokens.
    let e = first_new(&t);
    let m = tmp().join("eos-model");
    convert(&m);
    set_eos(&m, t[e]);
    let ended = one(&generate(&m, &["--prompts", ps, "--max-new-tokens", "10"]));
    assert_eq!(ended["finish"], "eos");
    assert_eq!(ids(&ended), t[..e].to_vec());
    assert_eq!(ended["text"].as_str().unwrap(), tok.decode(&t[..e], true).unwrap());
}

/// The model's end-of-sequence id set to `eos`, the manifest's id recomputed to match.
fn set_eos(m: &Path, eos: u32) {
    let path = m.join("manifest.json");
    let mut json: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["config"]["eos_token_ids"] = serde_json::json!([eos]);
    let cfg = serde_json::from_value(json["config"].clone()).unwrap();
    let parts: Vec<falcon_batch::format::manifest::PartEntry> = serde_json::from_value(json["parts"].clone()).unwrap();
    let tok = json["tokenizer_hash"]["sha256"].as_str().map(str::to_string);
    json["model_id"] = serde_json::json!(falcon_batch::format::manifest::compute_model_id(&cfg, &parts, tok.as_deref()));
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
}

/// The seed a run without --seed said it drew.
fn said_seed(o: &Output) -> String {
    let e = stderr(o);
    let line = e.lines().find(|l| l.contains("pass --seed")).unwrap_or_else(|| panic!("no seed line: {e}"));
    let seed = line.strip_prefix("falcon-batch: generate: seed ").and_then(|r| r.split(';').next()).unwrap_or_else(|| panic!("{line}"));
    assert!(line.contains(&format!("pass --seed {seed} to repeat")), "{line}");
    seed.to_string()
}

#[test]
fn sampling_without_a_seed_draws_one_and_says_it() {
    let p = prompts("sample.jsonl", &[PROMPT, r#"{"id": "b", "prompt": "t9 t3"}"#]);
    let args = ["--prompts", p.to_str().unwrap(), "--max-new-tokens", "12", "--temperature", "1.5"];
    let (a, b) = (generate(model(), &args), generate(model(), &args));
    assert!(a.status.success() && b.status.success(), "{}", stderr(&a));
    let (sa, sb) = (said_seed(&a), said_seed(&b));
    assert_ne!(sa, sb, "each run draws its own seed");
    let again = generate(model(), &[&args[..], &["--seed", &sa]].concat());
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(again.stdout, a.stdout, "--seed {sa} repeats the run");
    assert!(!stderr(&again).contains("pass --seed"), "a given seed is not announced");
    // Greedy decoding needs no seed and draws none.
    let greedy = generate(model(), &args[..4]);
    assert!(!stderr(&greedy).contains("pass --seed"), "{}", stderr(&greedy));
}

#[test]
fn a_streamed_prompt_ends_its_line_and_says_why_it_stopped() {
    // stdout and stderr into one pipe, as a terminal shows them.
    let script = r#""$0" generate --model "$1" --device cpu --prompt "t5 t6 t7" --max-new-tokens 4 2>&1"#;
    let o = Command::new("bash").args(["-c", script]).arg(env!("CARGO_BIN_EXE_falcon-batch")).arg(model()).output_within(LIMIT).unwrap();
    let all = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{all}");
    let stats = all.lines().find(|l| l.contains("prefill")).unwrap_or_else(|| panic!("{all}"));
    assert!(stats.starts_with("falcon-batch: generate: prefill"), "the stats line begins its own line: {all:?}");
    assert!(all.lines().any(|l| l == "falcon-batch: generate: finish length after 4 new tokens"), "{all:?}");
}
