//! Model outputs against HF transformers' golden log-probs (tests/fixtures/*/golden.json,
//! made by tests/fixtures/make_fixtures.py in float64).

mod common;

use falcon_batch::backend::cpu::CpuBackend;
use falcon_batch::generate::{generate, GenOptions, GenRequest, LocalDecoder};
use falcon_batch::layout::AttnSpan;
use falcon_batch::sample::SamplingOptions;
use falcon_batch::model::RowCtx;
use falcon_batch::stage::Stage;

fn check_fixture(name: &str) {
    let common::HfFixture { cfg, host, golden, .. } = common::hf_fixture(name);
    let b = CpuBackend::new();
    let stage = Stage::upload(&b, &host).unwrap();
    let mut worst = 0f64;
    for seq in golden["sequences"].as_array().unwrap() {
        let ids: Vec<u32> = seq["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let want: Vec<f64> = seq["logprobs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        // beyond the context limit (Mistral's window) scoring refuses the document; compare within it
        let n = ids.len().min(cfg.context_limit());
        let positions: Vec<u32> = (0..n as u32).collect();
        let spans = vec![AttnSpan::causal(0); n];
        let ctx = RowCtx { positions: &positions, spans: &spans, cache_order: None };
        let x = stage.embed(&b, &ids[..n]).unwrap();
        let x = stage.run_layers(&b, &cfg, x, &ctx, None).unwrap();
        let rows: Vec<u32> = (0..n as u32 - 1).collect();
        let logits = stage.logits(&b, &cfg, &x, &rows).unwrap();
        let got = b_log_softmax_at(&b, &logits, &ids[1..n]);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() < 1e-4, "{name}: token {} of a {}-token sequence: {g} vs HF {w}", i + 1, ids.len());
            worst = worst.max((g - w).abs());
        }
    }
    eprintln!("{name}: max |Δ logprob| = {worst:.2e}");
    check_greedy(name, &cfg, &b, stage, &golden);
}

/// HF's greedy generate (eos disabled), token for token.
fn check_greedy(name: &str, cfg: &falcon_batch::config::ModelConfig, b: &CpuBackend, stage: Stage<CpuBackend>, golden: &serde_json::Value) {
    let stages = vec![stage];
    let tok = common::word_tokenizer(cfg.vocab_size);
    let mut dec = LocalDecoder::new(b, cfg, &stages);
    for g in golden["greedy"].as_array().unwrap() {
        let ids = |k: &str| -> Vec<u32> { g[k].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect() };
        let (prompt, want) = (ids("prompt"), ids("new_ids"));
        let req = GenRequest { id: "g".into(), prompt: String::new(), prompt_ids: prompt };
        let opts = GenOptions { max_new_tokens: want.len(), sampling: SamplingOptions::default(), stop: vec![], eos: vec![], max_position: cfg.max_position };
        let out = generate(&mut dec, &tok, &[req], &opts, |_, _| {}).unwrap();
        assert_eq!(out[0].tokens, want, "{name}: greedy ids differ from HF generate");
    }
}

fn b_log_softmax_at(b: &CpuBackend, logits: &falcon_batch::backend::cpu::Mat, targets: &[u32]) -> Vec<f64> {
    use falcon_batch::backend::Backend;
    b.log_softmax_at(logits, targets).unwrap()
}

macro_rules! fixture_tests {
    ($($name:ident),*) => { $( #[test] fn $name() { check_fixture(stringify!($name)); } )* };
}

fixture_tests!(falcon_7b, falcon_40b, falcon_new_1ln, falcon_seq_bias, falcon_untied, llama_gqa, llama_tied, mistral);
