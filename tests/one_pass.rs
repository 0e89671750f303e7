//! One forward pass over the token tree equals scoring every choice on its own, and a model
//! run as consecutive layer chunks equals the whole model.

mod common;

use common::*;
use falcon_batch::backend::cpu::CpuBackend;
use falcon_batch::backend::Ops;
use falcon_batch::config::ModelConfig;
use falcon_batch::token_tree::{MicroBatch, TokenizedDoc};
use falcon_batch::model::RowCtx;
use falcon_batch::group::DeviceGroup;

fn docs() -> Vec<TokenizedDoc> {
    vec![
        TokenizedDoc { index: 0, id: "a".into(), prompt: vec![1, 5, 9, 13, 2], choices: vec![vec![7, 8, 9], vec![4], vec![11, 12]] },
        TokenizedDoc { index: 1, id: "b".into(), prompt: vec![3, 3, 3], choices: vec![vec![21, 22, 23, 24], vec![30, 31]] },
    ]
}

/// Each choice alone: the plain causal sequence prompt + choice, one document per batch.
fn scores_separately(b: &CpuBackend, cfg: &ModelConfig, group: &DeviceGroup<CpuBackend>, doc: &TokenizedDoc) -> Vec<f64> {
    let mut out = vec![];
    for c in &doc.choices {
        let single = TokenizedDoc { index: 0, id: "x".into(), prompt: doc.prompt.clone(), choices: vec![c.clone()] };
        out.extend(group.score_batch(b, cfg, &MicroBatch::build(&[single])).unwrap());
    }
    out
}

fn check_one_pass(cfg: &ModelConfig) {
    let b = CpuBackend::new();
    let group = DeviceGroup::upload(&b, cfg, &random_group(cfg, 0..cfg.n_layers, 42)).unwrap();
    let batch = MicroBatch::build(&docs());
    let together = group.score_batch(&b, cfg, &batch).unwrap();
    let separate: Vec<f64> = docs().iter().flat_map(|d| scores_separately(&b, cfg, &group, d)).collect();
    assert_eq!(together.len(), separate.len());
    for (i, (t, s)) in together.iter().zip(&separate).enumerate() {
        assert!((t - s).abs() < 1e-5, "scored row {i}: one pass {t} vs alone {s}");
    }
    // the scores must depend on the choice: a broken mask that ignored the prompt would not
    let spread = together.iter().cloned().fold(f64::NEG_INFINITY, f64::max) - together.iter().cloned().fold(f64::INFINITY, f64::min);
    assert!(spread > 0.1, "log-probs suspiciously uniform: spread {spread}");
}

#[test]
fn one_pass_equals_separate_llama() {
    check_one_pass(&llama_config());
}

#[test]
fn one_pass_equals_separate_falcon_layouts() {
    check_one_pass(&falcon_config(true, true, false));
    check_one_pass(&falcon_config(false, true, false));
    check_one_pass(&falcon_config(false, false, true));
}

#[test]
fn three_chunks_equal_the_whole_model() {
    for cfg in [llama_config(), falcon_config(true, true, false)] {
        let b = CpuBackend::new();
        let whole = DeviceGroup::upload(&b, &cfg, &random_group(&cfg, 0..3, 7)).unwrap();
        let chunks: Vec<DeviceGroup<CpuBackend>> =
            [0..1, 1..2, 2..3].into_iter().map(|r| DeviceGroup::upload(&b, &cfg, &random_group(&cfg, r, 7)).unwrap()).collect();
        assert!(chunks[0].has_begin() && !chunks[0].has_end() && chunks[2].has_end());
        let batch = MicroBatch::build(&docs());
        let ctx = RowCtx { positions: &batch.positions, spans: &batch.spans, cache_order: None };
        let mut x = chunks[0].embed(&b, &batch.tokens).unwrap();
        for c in &chunks {
            x = c.run_layers(&b, &cfg, x, &ctx, None).unwrap();
        }
        let chunked = chunks[2].scored_logprobs(&b, &cfg, &x, &batch.scored).unwrap();
        let direct = whole.score_batch(&b, &cfg, &batch).unwrap();
        assert_eq!(chunked, direct, "chunked run must be bit-identical");
        let hidden = b.download(&x).unwrap();
        assert_eq!(hidden.len(), batch.rows() * cfg.hidden_size);
    }
}
