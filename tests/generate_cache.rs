//! Generation with the KV cache equals recomputing the whole sequence at every step, and a
//! batch of prompts gives each prompt's text alone.

mod common;

use common::*;
use falcon_batch::backend::cpu::CpuBackend;
use falcon_batch::backend::KvDtype;
use falcon_batch::config::ModelConfig;
use falcon_batch::generate::{generate, Finish, GenOptions, GenRequest};
use falcon_batch::runner::LocalDecoder;
use falcon_batch::token_tree::AttnSpan;
use falcon_batch::model::RowCtx;
use falcon_batch::sample::{argmax, SamplingOptions};
use falcon_batch::group::DeviceGroup;

fn opts(n: usize) -> GenOptions {
    GenOptions { max_new_tokens: n, sampling: SamplingOptions::default(), stop: vec![], eos: vec![], max_position: 64 }
}

fn req(id: &str, ids: &[u32]) -> GenRequest {
    GenRequest { id: id.into(), prompt: String::new(), prompt_ids: ids.to_vec() }
}

/// Prompts of different lengths (one of a single token), and their requests, ids "0".."2".
fn three_prompts() -> (Vec<Vec<u32>>, Vec<GenRequest>) {
    let prompts: Vec<Vec<u32>> = vec![vec![1, 2, 3, 4, 5], vec![7], vec![9, 8, 7, 6, 5, 4, 3, 2]];
    let reqs = prompts.iter().enumerate().map(|(i, p)| req(&i.to_string(), p)).collect();
    (prompts, reqs)
}

/// Greedy continuation by running the full sequence every step, no cache.
fn greedy_without_cache(b: &CpuBackend, cfg: &ModelConfig, group: &DeviceGroup<CpuBackend>, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut ids = prompt.to_vec();
    for _ in 0..n {
        let positions: Vec<u32> = (0..ids.len() as u32).collect();
        let spans = vec![AttnSpan::causal(0); ids.len()];
        let ctx = RowCtx { positions: &positions, spans: &spans, cache_order: None };
        let x = group.embed(b, &ids).unwrap();
        let x = group.run_layers(b, cfg, x, &ctx, None).unwrap();
        let logits = group.logits(b, cfg, &x, &[ids.len() as u32 - 1]).unwrap();
        ids.push(argmax(&logits.data) as u32);
    }
    ids[prompt.len()..].to_vec()
}

#[test]
fn cached_batched_generation_matches_recompute() {
    for cfg in [llama_config(), falcon_config(true, true, false), falcon_config(false, false, true)] {
        let b = CpuBackend::new();
        let groups = vec![DeviceGroup::upload(&b, &cfg, &random_group(&cfg, 0..cfg.n_layers, 3)).unwrap()];
        let tok = word_tokenizer(cfg.vocab_size);
        let (prompts, reqs) = three_prompts();
        let mut dec = LocalDecoder::new(&b, &cfg, &groups);
        let batched = generate(&mut dec, &tok, &reqs, &opts(10), |_, _| {}).unwrap();
        for (p, out) in prompts.iter().zip(&batched) {
            assert_eq!(out.tokens, greedy_without_cache(&b, &cfg, &groups[0], p, 10), "prompt {p:?}");
            assert_eq!(out.finish, Finish::Length);
            let alone = generate(&mut dec, &tok, &[req("x", p)], &opts(10), |_, _| {}).unwrap();
            assert_eq!(alone[0].tokens, out.tokens);
        }
        let distinct: std::collections::HashSet<u32> = batched.iter().flat_map(|o| o.tokens.iter().copied()).collect();
        assert!(distinct.len() > 2, "a degenerate model would make this test meaningless");
    }
}

#[test]
fn eos_and_stop_end_a_sequence_early() {
    let cfg = llama_config();
    let b = CpuBackend::new();
    let groups = vec![DeviceGroup::upload(&b, &cfg, &random_group(&cfg, 0..3, 3)).unwrap()];
    let tok = word_tokenizer(cfg.vocab_size);
    let mut dec = LocalDecoder::new(&b, &cfg, &groups);
    let free = generate(&mut dec, &tok, &[req("a", &[1, 2, 3])], &opts(8), |_, _| {}).unwrap();
    let third = free[0].tokens[2];
    let mut o = opts(8);
    o.eos = vec![third];
    let ended = generate(&mut dec, &tok, &[req("a", &[1, 2, 3])], &o, |_, _| {}).unwrap();
    let first_eos = free[0].tokens.iter().position(|&t| t == third).unwrap();
    assert_eq!(ended[0].finish, Finish::Eos);
    // The end-of-sequence token ends the text and, like the text, the tokens leave it out.
    assert_eq!(ended[0].tokens, free[0].tokens[..first_eos].to_vec());
    let mut o = opts(8);
    o.stop = vec![format!("t{third}")];
    let mut streamed = String::new();
    let stopped = generate(&mut dec, &tok, &[req("a", &[1, 2, 3])], &o, |_, d| streamed.push_str(d)).unwrap();
    assert_eq!(stopped[0].finish, Finish::Stop);
    assert!(!stopped[0].text.contains(&format!("t{third}")));
    assert_eq!(streamed.trim_end(), stopped[0].text.trim_end());
}

#[test]
fn an_f16_cache_generates_what_recompute_in_f32_does() {
    // Keys and values rounded to f16 as they enter the cache (batched prompts regroup it): the
    // greedy tokens of these models are those of the f32 recompute. A model with a near tie
    // between its two best tokens could differ, which is why f16 is an option, not the default.
    for cfg in [llama_config(), falcon_config(true, true, false), falcon_config(false, false, true)] {
        let (b32, b16) = (CpuBackend::new(), CpuBackend::with_kv_dtype(KvDtype::F16));
        let groups = vec![DeviceGroup::upload(&b32, &cfg, &random_group(&cfg, 0..cfg.n_layers, 3)).unwrap()];
        let tok = word_tokenizer(cfg.vocab_size);
        let (prompts, reqs) = three_prompts();
        let mut dec = LocalDecoder::new(&b16, &cfg, &groups);
        let batched = generate(&mut dec, &tok, &reqs, &opts(10), |_, _| {}).unwrap();
        for (p, out) in prompts.iter().zip(&batched) {
            assert_eq!(out.tokens, greedy_without_cache(&b32, &cfg, &groups[0], p, 10), "prompt {p:?}");
        }
    }
}
