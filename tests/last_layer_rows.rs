//! The model's last layer computed only for the rows the head reads (llama.cpp's
//! `inp_out_ids`) gives what the layer run on every row gives: on a batch whose scored rows are
//! a strict subset of its rows, and on one where every row is scored, for the llama block and
//! each falcon layout; the head's logits of a generation prefill too.

mod common;

use common::*;
use falcon_batch::backend::cpu::CpuBackend;
use falcon_batch::backend::Ops;
use falcon_batch::config::ModelConfig;
use falcon_batch::group::DeviceGroup;
use falcon_batch::model::{GroupKeys, RowCtx};
use falcon_batch::token_tree::{MicroBatch, TokenizedDoc};

/// Prompts of several tokens: only each prompt's last row and the choices' rows are scored.
fn strict_subset() -> Vec<TokenizedDoc> {
    vec![
        TokenizedDoc { index: 0, id: "a".into(), prompt: vec![1, 5, 9, 13, 2, 6, 7], choices: vec![vec![7, 8, 9], vec![4], vec![11, 12]] },
        TokenizedDoc { index: 1, id: "b".into(), prompt: vec![3, 3, 3, 8], choices: vec![vec![21, 22, 23, 24], vec![30, 31]] },
    ]
}

/// Prompts of one token: every row is scored.
fn all_rows() -> Vec<TokenizedDoc> {
    vec![
        TokenizedDoc { index: 0, id: "a".into(), prompt: vec![5], choices: vec![vec![7, 8, 9], vec![4, 2]] },
        TokenizedDoc { index: 1, id: "b".into(), prompt: vec![3], choices: vec![vec![21, 22], vec![30]] },
    ]
}

/// The distinct scored rows of a batch, in first-scored order (the rows the head reads).
fn read_rows(batch: &MicroBatch) -> Vec<u32> {
    let mut rows: Vec<u32> = vec![];
    for s in &batch.scored {
        if !rows.contains(&s.row) {
            rows.push(s.row);
        }
    }
    rows
}

fn assert_close(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() < 1e-5, "{what}: value {i}: pruned {g} vs every row {w}");
    }
}

fn widen(v: Vec<f32>) -> Vec<f64> {
    v.into_iter().map(f64::from).collect()
}

fn check(cfg: &ModelConfig) {
    let b = CpuBackend::new();
    let group = DeviceGroup::upload(&b, cfg, &random_group(cfg, 0..cfg.n_layers, 42)).unwrap();
    assert!(group.prunes_last_layer(cfg), "one group holding the last layer and the head prunes it");
    for (name, docs, strict) in [("strict subset", strict_subset(), true), ("all rows", all_rows(), false)] {
        let batch = MicroBatch::build(&docs);
        let read = read_rows(&batch);
        assert_eq!(read.len() < batch.rows(), strict, "{name}: {} of {} rows read", read.len(), batch.rows());
        let ctx = RowCtx::of_batch(&batch);
        // Every layer on every row, then the head at the scored rows: the unpruned reference.
        let full = group.run_layers(&b, cfg, group.embed(&b, &batch.tokens).unwrap(), &ctx, None).unwrap(); // (T, C)
        let want = group.scored_logprobs(&b, cfg, &full, &batch.scored).unwrap();
        assert_close(name, &group.score_batch(&b, cfg, &batch).unwrap(), &want);
        // The last layer's output is the read rows only, in order, and equals those rows of the full run.
        let x = group.embed(&b, &batch.tokens).unwrap();
        let pruned = group.run_layers_rows(&b, cfg, x, &ctx, GroupKeys::None, Some(&read)).unwrap(); // (R, C)
        assert_eq!(b.dims(&pruned), (read.len(), cfg.hidden_size), "{name}: pruned layer's output");
        let picked = b.rows(&full, &read).unwrap();
        assert_close(&format!("{name}: hidden"), &widen(b.download(&pruned).unwrap()), &widen(b.download(&picked).unwrap()));
        // A generation prefill: logits at each sequence's last row.
        let last: Vec<u32> = vec![batch.rows() as u32 - 1, 2];
        let got = group.run_logits(&b, cfg, group.embed(&b, &batch.tokens).unwrap(), &ctx, GroupKeys::None, &last).unwrap();
        let want = group.logits(&b, cfg, &full, &last).unwrap();
        assert_close(&format!("{name}: logits"), &widen(b.download(&got).unwrap()), &widen(b.download(&want).unwrap()));
    }
}

#[test]
fn pruned_last_layer_equals_every_row_llama() {
    check(&llama_config());
}

#[test]
fn pruned_last_layer_equals_every_row_falcon_layouts() {
    check(&falcon_config(true, true, false)); // new arch: two norms in parallel
    check(&falcon_config(false, true, false)); // 7B: one norm in parallel
    check(&falcon_config(false, false, true)); // sequential, biases
}

#[test]
fn a_group_without_the_head_keeps_every_row() {
    let cfg = llama_config();
    let b = CpuBackend::new();
    let front = DeviceGroup::upload(&b, &cfg, &random_group(&cfg, 0..cfg.n_layers - 1, 7)).unwrap();
    let back = DeviceGroup::upload(&b, &cfg, &random_group(&cfg, cfg.n_layers - 1..cfg.n_layers, 7)).unwrap();
    assert!(!front.prunes_last_layer(&cfg) && back.prunes_last_layer(&cfg));
    let whole = DeviceGroup::upload(&b, &cfg, &random_group(&cfg, 0..cfg.n_layers, 7)).unwrap();
    let batch = MicroBatch::build(&strict_subset());
    let want = whole.score_batch(&b, &cfg, &batch).unwrap();
    let got = falcon_batch::group::score_through(&[front, back], &b, &cfg, &batch).unwrap();
    assert_close("two groups", &got, &want);
}
