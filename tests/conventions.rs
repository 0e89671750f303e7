//! The choice split conventions against HF transformers, for every fixture layout: the
//! documents of each golden.json (made by tests/fixtures/make_fixtures.py with lm-eval's
//! rule, every (prompt, choice) pair scored by HF on its own in float64) go through the real
//! corpus reader and split with the fixture's byte-level BPE tokenizer, then are scored
//! alone and packed several documents per micro-batch in one pass; and through the binary.

mod common;

use common::proc::bin;

use common::docs::{check_packed, check_split, compare, golden_docs, jsonl, read_corpus, GoldenDoc};
use common::{hf_fixture, HfFixture};
use falcon_batch::backend::cpu::CpuBackend;
use falcon_batch::corpus::PreparedDoc;
use falcon_batch::token_tree::{MicroBatch, TokenizedDoc};
use falcon_batch::results::read_results;
use falcon_batch::group::DeviceGroup;
use falcon_batch::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};
use std::process::Command;

const TOL: f64 = 1e-4;

/// The documents through the real reader and split, with the fixture's tokenizer.
fn read_fixture_corpus(fx: &HfFixture, docs: &[GoldenDoc], delimiter: &str) -> Vec<PreparedDoc> {
    let tok = Tokenizer::from_file(&fx.dir.join("tokenizer.json")).unwrap();
    read_corpus(&tok, fx.cfg.context_limit(), docs, delimiter)
}

fn check_fixture(name: &str) {
    let fx = hf_fixture(name);
    let (delimiter, golden) = golden_docs(&fx.golden["documents"]);
    assert!(golden.len() >= 6, "{name}: the golden has {} documents", golden.len());

    // 1. the split: ids and characters exactly as lm-eval's rule made them in Python
    let prepared = read_fixture_corpus(&fx, &golden, &delimiter);
    let ready = check_split(name, &prepared, &golden);

    let b = CpuBackend::new();
    let group = DeviceGroup::upload(&b, &fx.cfg, &fx.host).unwrap();
    let mut worst = 0f64;

    // 2. each (prompt, choice) pair alone, as HF scored it
    for (r, g) in ready.iter().zip(&golden) {
        for (c, want) in g.logprobs.iter().enumerate() {
            let single = TokenizedDoc { index: 0, id: g.id.clone(), prompt: r.doc.prompt.clone(), choices: vec![r.doc.choices[c].clone()] };
            let got = group.score_batch(&b, &fx.cfg, &MicroBatch::build(&[single])).unwrap();
            worst = worst.max(compare(&format!("{name} {} choice {c} alone", g.id), &got, want, TOL));
        }
    }

    // 3. packed: several documents per micro-batch, all choices of each in one token tree
    worst = worst.max(check_packed(name, &b, &fx.cfg, &group, &prepared, &golden, TOL));
    eprintln!("{name}: max |Δ logprob| vs HF = {worst:.2e}");
}

macro_rules! fixture_tests {
    ($($name:ident),*) => { $( #[test] fn $name() { check_fixture(stringify!($name)); } )* };
}

fixture_tests!(falcon_7b, falcon_40b, falcon_new_1ln, falcon_seq_bias, falcon_untied, llama_gqa, llama_tied, mistral);
fixture_tests!(llama31, llama_linear, llama3_params, falcon_linear, qwen2, qwen2_untied);

/// The delimiter decides only the joint where neither side has whitespace: with "" the
/// "...Answer:" documents change, the leading-space and trailing-space ones do not.
#[test]
fn the_delimiter_touches_only_joints_without_whitespace() {
    let fx = hf_fixture("llama_tied");
    let (delimiter, golden) = golden_docs(&fx.golden["documents"]);
    let with = read_fixture_corpus(&fx, &golden, &delimiter);
    let without = read_fixture_corpus(&fx, &golden, "");
    for ((w, n), g) in with.iter().zip(&without).zip(&golden) {
        let (w, n) = (w.result.as_ref().unwrap(), n.result.as_ref().unwrap());
        let bare = !g.prompt.ends_with(char::is_whitespace);
        for (c, choice) in g.choices.iter().enumerate() {
            let delimited = bare && !choice.starts_with(char::is_whitespace);
            assert_eq!(w.doc.choices[c] != n.doc.choices[c], delimited, "{} choice {choice:?}", g.id);
            assert_eq!(w.choice_chars[c], n.choice_chars[c] + delimited as usize * delimiter.chars().count());
        }
    }
}

// ---------------------------------------------------------------- through the binary

fn tmp(name: &str) -> PathBuf {
    common::tmp::dir(&format!("fb-conventions-{name}"))
}

fn ok(c: &mut Command) -> String {
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{c:?}: {err}");
    err
}

fn score_cmd(model: &Path, docs: &Path, out: &Path) -> Command {
    let mut c = bin();
    c.arg("score").arg("--model").arg(model).arg("--docs").arg(docs).arg("--out").arg(out).args(["--batch-tokens", "120", "--quiet"]);
    c
}

/// Convert the fixture, score the golden documents with `falcon-batch score`, read the HDF5.
fn check_binary(name: &str) {
    let fx = hf_fixture(name);
    let (_, golden) = golden_docs(&fx.golden["documents"]);
    let d = tmp(name);
    let model = d.join("model");
    ok(bin().args(["convert", "--dtype", "f32", "--from"]).arg(&fx.dir).arg("--to").arg(&model));
    let docs = d.join("docs.jsonl");
    std::fs::write(&docs, jsonl(&golden)).unwrap();
    let out = d.join("scores.h5");
    ok(&mut score_cmd(&model, &docs, &out));
    let results = read_results(&out).unwrap();
    assert_eq!(results.len(), golden.len());
    for (r, g) in results.iter().zip(&golden) {
        assert!(r.is_ok(), "{name} {}: {}", g.id, r.error);
        assert_eq!(r.id, g.id);
        assert_eq!(r.n_prompt_tokens, g.prompt_ids.len());
        for (c, row) in r.choices.iter().enumerate() {
            let want: f64 = g.logprobs[c].iter().sum();
            assert_eq!(row.text, g.choices[c]);
            assert_eq!(row.n_tokens, g.choice_ids[c].len(), "{name} {} choice {c}", g.id);
            assert!((row.logprob - want).abs() < TOL * row.n_tokens as f64, "{name} {} choice {c}: {} vs HF {want}", g.id, row.logprob);
            let per_char = want / g.choice_chars[c] as f64;
            assert!((row.logprob_per_char - per_char).abs() < TOL, "{name} {} choice {c}: per char {} vs {per_char}", g.id, row.logprob_per_char);
        }
    }

    // The delimiter is part of the run: a file made with another one is refused, then replaced.
    let o = score_cmd(&model, &docs, &out).args(["--target-delimiter", ""]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("delimiter") && err.contains("--overwrite"), "{err}");
    ok(score_cmd(&model, &docs, &out).args(["--target-delimiter", "", "--overwrite"]));
    let bare = read_results(&out).unwrap();
    for (r, g) in bare.iter().zip(&golden) {
        let delimited = |c: &String| !g.prompt.ends_with(char::is_whitespace) && !c.starts_with(char::is_whitespace);
        for (c, row) in r.choices.iter().enumerate() {
            if !delimited(&g.choices[c]) {
                let want: f64 = g.logprobs[c].iter().sum();
                assert!((row.logprob - want).abs() < TOL * row.n_tokens as f64, "{name} {} choice {c} without a delimiter", g.id);
            }
        }
    }
}

#[test]
fn binary_scores_both_conventions_like_hf_falcon() {
    check_binary("falcon_40b");
}

#[test]
fn binary_scores_both_conventions_like_hf_llama() {
    check_binary("llama_gqa");
}
