//! The real SmolLM2-135M-Instruct GGUF against transformers' reading of the same file
//! (tests/fixtures/smollm2/*.json from tests/fixtures/make_smollm2_reference.py).

use falcon_batch::format::gguf::{self, GgufCheckpoint};
use falcon_batch::format::Checkpoint;
use falcon_batch::model::TensorSource;
use falcon_batch::tokenizer::Tokenizer;
use serde_json::Value;
use std::path::PathBuf;
use std::sync::OnceLock;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Missing weights fail loudly: a skipped test would hide that nothing was checked.
fn model_path() -> PathBuf {
    let path = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "{} is missing: run `make fetch-model` first", path.display());
    path
}

fn checkpoint() -> &'static GgufCheckpoint {
    static CK: OnceLock<GgufCheckpoint> = OnceLock::new();
    CK.get_or_init(|| GgufCheckpoint::open(&model_path()).unwrap_or_else(|e| panic!("{e}")))
}

fn fixture(name: &str) -> Value {
    let path = root().join("tests/fixtures/smollm2").join(name);
    serde_json::from_slice(&std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

#[test]
fn config_matches_transformers() {
    let cfg = checkpoint().config();
    let want = &fixture("tensors.json")["config"];
    let u = |k: &str| want[k].as_u64().unwrap() as usize;
    assert_eq!(cfg.vocab_size, u("vocab_size"));
    assert_eq!(cfg.hidden_size, u("hidden_size"));
    assert_eq!(cfg.n_layers, u("num_hidden_layers"));
    assert_eq!(cfg.n_heads, u("num_attention_heads"));
    assert_eq!(cfg.n_kv_heads, u("num_key_value_heads"));
    assert_eq!(cfg.head_dim, u("head_dim"));
    assert_eq!(cfg.intermediate_size, u("intermediate_size"));
    assert_eq!(cfg.max_position, u("max_position_embeddings"));
    assert_eq!(cfg.rope_theta, want["rope_theta"].as_f64().unwrap());
    // transformers widens the stored f32 (9.9999997e-6); we recover the decimal 1e-5.
    assert_eq!(cfg.norm_eps, 1e-5);
    assert_eq!(cfg.norm_eps as f32, want["rms_norm_eps"].as_f64().unwrap() as f32);
    assert!(cfg.tied_embeddings && want["tie_word_embeddings"].as_bool().unwrap());
    assert_eq!(cfg.bos_token_id, Some(1));
    assert_eq!(cfg.eos_token_ids, vec![2]);
    assert_eq!(checkpoint().native_dtype(), falcon_batch::tensor::DType::F32);
}

#[test]
fn tensors_match_transformers() {
    let ck = checkpoint();
    assert!(!ck.contains("lm_head.weight"), "SmolLM2 ties its head to the embeddings");
    assert!(ck.contains("model.layers.29.mlp.up_proj.weight"));
    assert!(!ck.contains("model.layers.30.mlp.up_proj.weight"));
    let want = fixture("tensors.json");
    for (name, w) in want["tensors"].as_object().unwrap() {
        let t = ck.get(name).unwrap_or_else(|e| panic!("{e}"));
        let shape: Vec<usize> = w["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        assert_eq!(t.shape, shape, "{name}");
        let v = t.to_f32();
        let exact = |got: &[f32], want: &Value| {
            let want: Vec<f32> = want.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
            assert_eq!(got, &want[..], "{name}");
        };
        exact(&v[..16], &w["first16"]);
        let row = w["row_probe"]["row"].as_u64().unwrap() as usize;
        let cols = v.len() / shape[0];
        // A 1-D tensor's "row" is one value, so the probe holds at most `cols` values.
        exact(&v[row * cols..row * cols + cols.min(4)], &w["row_probe"]["first4"]);
        let sum: f64 = v.iter().map(|&x| x as f64).sum();
        let abs: f64 = v.iter().map(|&x| (x as f64).abs()).sum();
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1.0);
        assert!(close(sum, w["sum"].as_f64().unwrap()), "{name}: sum {sum} vs {}", w["sum"]);
        assert!(close(abs, w["abs_sum"].as_f64().unwrap()), "{name}: abs sum {abs} vs {}", w["abs_sum"]);
    }
}

#[test]
fn unsupported_name_is_an_error_naming_the_file() {
    let err = checkpoint().get("model.layers.0.self_attn.rotary_emb.inv_freq").unwrap_err().to_string();
    assert!(err.contains("SmolLM2-135M-Instruct.Q4_1.gguf"), "{err}");
}

#[test]
fn tokenizer_ids_match_transformers() {
    // Through the converter's entry point.
    let ck: Box<dyn Checkpoint> = gguf::open(&model_path()).unwrap_or_else(|e| panic!("{e}"));
    let json = ck.tokenizer_json().unwrap_or_else(|e| panic!("{e}"));
    let tok = Tokenizer::from_bytes(&json, "smollm2 tokenizer.json").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tok.vocab_size(), 49152);
    let want = fixture("tokens.json");
    let texts = want["texts"].as_array().unwrap();
    assert!(texts.len() >= 30);
    let ids = |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect::<Vec<u32>>();
    let mut failures = vec![];
    for t in texts {
        let text = t["text"].as_str().unwrap();
        for (special, key) in [(false, "ids"), (true, "ids_special")] {
            let got = tok.encode(text, special).unwrap();
            if got != ids(&t[key]) {
                failures.push(format!("{text:?} (special={special}): got {got:?}, want {:?}", ids(&t[key])));
            }
        }
        // Byte-level BPE is lossless: decoding gives the text back.
        assert_eq!(tok.decode(&ids(&t["ids"]), false).unwrap(), text);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn llama_family_converts_its_parts() {
    use falcon_batch::model::{convert_part, expected_tensors, Part};
    let ck = checkpoint();
    let cfg = ck.config();
    for part in [Part::Begin, Part::Layer(0), Part::Layer(cfg.n_layers - 1), Part::End] {
        let got = convert_part(cfg, part, ck).unwrap_or_else(|e| panic!("{}: {e}", part.name()));
        let shapes: Vec<(String, Vec<usize>)> = got.iter().map(|(n, t)| (n.clone(), t.shape.clone())).collect();
        assert_eq!(shapes, expected_tensors(cfg, part), "{}", part.name());
    }
}
