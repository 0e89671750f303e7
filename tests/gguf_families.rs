//! GGUF files of the qwen2 and falcon architectures, written from the HF fixtures the way
//! llama.cpp's converter does (tests/fixtures/make_gguf_fixtures.py), converted to model
//! directories and scored against HF transformers' float64 log-probs.

use falcon_batch::backend::cpu::CpuBackend;
use falcon_batch::config::{FalconLayout, Family, ModelConfig};
use falcon_batch::format::gguf::GgufCheckpoint;
use falcon_batch::format::{convert::convert_path, model_dir::ModelDir, Checkpoint};
use falcon_batch::token_tree::{MicroBatch, TokenizedDoc};
use falcon_batch::model;
use falcon_batch::group::{HostGroup, DeviceGroup};
use falcon_batch::tokenizer::Tokenizer;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// The HF fixture's own config, as the HF converter reads it.
fn hf_config(fixture: &str) -> ModelConfig {
    model::config_from_hf(&json(&fixtures().join(fixture).join("config.json")), "config.json").unwrap()
}

fn convert(gguf: &Path, tmp: &tempfile::TempDir) -> ModelDir {
    let out = tmp.path().join("model");
    convert_path(gguf, &out, None).unwrap_or_else(|e| panic!("{}: {e}", gguf.display()));
    ModelDir::open(&out).unwrap()
}

/// Every golden sequence scored as a one-token prompt and its continuation; the worst
/// difference from HF's log-probs.
fn worst_logprob_diff(dir: &ModelDir, golden: &Value) -> f64 {
    let cfg = dir.config().clone();
    let b = CpuBackend::new();
    let group = DeviceGroup::upload(&b, &cfg, &HostGroup::from_dir(dir, 0..cfg.n_layers).unwrap()).unwrap();
    let seqs = golden["sequences"].as_array().unwrap();
    let docs: Vec<TokenizedDoc> = seqs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let all = ids(&s["ids"]);
            TokenizedDoc { index: i, id: i.to_string(), prompt: all[..1].to_vec(), choices: vec![all[1..].to_vec()] }
        })
        .collect();
    let got = group.score_batch(&b, &cfg, &MicroBatch::build(&docs)).unwrap();
    let want: Vec<f64> = seqs.iter().flat_map(|s| s["logprobs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap())).collect();
    assert_eq!(got.len(), want.len());
    got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0.0, f64::max)
}

/// The GGUF's config means what the HF config means (llama.cpp does not store everything:
/// Falcon's context is always 2048 there, and the old/new decoder label may differ where
/// the two compute the same).
fn assert_same_model(gguf: &ModelConfig, hf: &ModelConfig) {
    assert_eq!(gguf.family, hf.family);
    let dims = |c: &ModelConfig| (c.vocab_size, c.hidden_size, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.intermediate_size);
    assert_eq!(dims(gguf), dims(hf));
    assert_eq!((gguf.rope_theta, gguf.tied_embeddings, gguf.attention_bias, gguf.mlp_bias), (hf.rope_theta, hf.tied_embeddings, hf.attention_bias, hf.mlp_bias));
    assert_eq!(gguf.norm_eps as f32, hf.norm_eps as f32);
    assert_eq!(gguf.sliding_window, hf.sliding_window);
}

#[test]
fn qwen2_gguf_matches_hf() {
    let path = fixtures().join("gguf_qwen2/qwen2.f32.gguf");
    let ck = GgufCheckpoint::open(&path).unwrap_or_else(|e| panic!("{e}"));
    let hf = hf_config("qwen2");
    assert_same_model(ck.config(), &hf);
    assert_eq!(ck.config().max_position, hf.max_position);
    assert_eq!((ck.config().bos_token_id, ck.config().eos_token_ids.clone()), (Some(300), vec![300]));

    let tmp = tempfile::tempdir().unwrap();
    let dir = convert(&path, &tmp);
    let worst = worst_logprob_diff(&dir, &json(&fixtures().join("qwen2/golden.json")));
    eprintln!("qwen2 GGUF f32: max |Δ logprob| vs HF float64 = {worst:.2e}");
    assert!(worst < 1e-4, "{worst}");

    // The tokenizer rebuilt from the GGUF (pre "qwen2") gives HF's ids on the fixture's BPE.
    let tok = Tokenizer::from_file(&dir.tokenizer_path()).unwrap();
    let want = json(&fixtures().join("gguf_qwen2/tokens.json"));
    let mut failures = vec![];
    for t in want["texts"].as_array().unwrap() {
        let text = t["text"].as_str().unwrap();
        for special in [false, true] {
            let got = tok.encode(text, special).unwrap();
            if got != ids(&t["ids"]) {
                failures.push(format!("{text:?} (special={special}): got {got:?}, want {:?}", ids(&t["ids"])));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The "falcon" pre-tokenizer on the same vocabulary and merges gives HF's ids with
/// tiiuae/falcon-7b's pre-tokenizer (the falcon GGUF fixtures carry no merges to test it).
#[test]
fn falcon_pre_tokenizer_matches_hf() {
    let ck = GgufCheckpoint::open(&fixtures().join("gguf_qwen2/qwen2.f32.gguf")).unwrap_or_else(|e| panic!("{e}"));
    let mut vocab = ck.vocab().unwrap();
    vocab.pre = Some("falcon".into());
    let json = falcon_batch::tokenizer::gguf::tokenizer_json(&vocab, "qwen2.f32.gguf").unwrap();
    let tok = Tokenizer::from_bytes(&json, "falcon-style tokenizer.json").unwrap();
    for t in json_texts() {
        let text = t["text"].as_str().unwrap();
        assert_eq!(tok.encode(text, false).unwrap(), ids(&t["falcon_ids"]), "{text:?}");
    }
}

fn json_texts() -> Vec<Value> {
    json(&fixtures().join("gguf_qwen2/tokens.json"))["texts"].as_array().unwrap().clone()
}

fn falcon_layout(cfg: &ModelConfig) -> FalconLayout {
    cfg.falcon.unwrap()
}

/// f32: the source fixture's golden; f16: HF on the f16-rounded weights (golden_f16.json),
/// so both are held to 1e-4 (f16 rounding alone moves HF's log-probs by up to 2e-3).
fn check_falcon(fixture: &str, kind: &str) -> ModelConfig {
    let path = fixtures().join(format!("gguf_{fixture}/{fixture}.{kind}.gguf"));
    let tmp = tempfile::tempdir().unwrap();
    let dir = convert(&path, &tmp);
    let golden = match kind {
        "f32" => fixtures().join(fixture).join("golden.json"),
        _ => fixtures().join(format!("gguf_{fixture}/golden_f16.json")),
    };
    let worst = worst_logprob_diff(&dir, &json(&golden));
    eprintln!("{fixture} GGUF {kind}: max |Δ logprob| vs HF float64 = {worst:.2e}");
    assert!(worst < 1e-4, "{fixture} {kind}: {worst}");
    let cfg = dir.config().clone();
    assert_same_model(&cfg, &hf_config(fixture));
    assert_eq!(cfg.max_position, 2048, "llama.cpp's falcon converter writes context 2048");
    cfg
}

#[test]
fn falcon_7b_gguf_f32_and_f16_match_hf() {
    for kind in ["f32", "f16"] {
        let cfg = check_falcon("falcon_7b", kind);
        let l = falcon_layout(&cfg);
        assert!(!l.new_decoder_architecture && l.parallel_attn && l.num_ln_in_parallel_attn == 1 && cfg.n_kv_heads == 1);
    }
}

#[test]
fn falcon_40b_gguf_f32_and_f16_match_hf() {
    for kind in ["f32", "f16"] {
        let cfg = check_falcon("falcon_40b", kind);
        assert_eq!(falcon_layout(&cfg), falcon_layout(&hf_config("falcon_40b")));
    }
}

#[test]
fn falcon_untied_gguf_keeps_its_head() {
    let cfg = check_falcon("falcon_untied", "f32");
    assert!(!cfg.tied_embeddings);
    assert_eq!(cfg.family, Family::Falcon);
}

#[test]
fn cli_converts_a_falcon_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("f40");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_falcon-batch"))
        .args(["convert", "--from"])
        .arg(fixtures().join("gguf_falcon_40b/falcon_40b.f16.gguf"))
        .arg("--to")
        .arg(&out)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let dir = ModelDir::open(&out).unwrap();
    assert_eq!(dir.config().family, Family::Falcon);
    let worst = worst_logprob_diff(&dir, &json(&fixtures().join("gguf_falcon_40b/golden_f16.json")));
    assert!(worst < 1e-4, "{worst}");
}
