//! The choice split conventions against HF transformers, for every fixture layout: the
//! documents of each golden.json (made by tests/fixtures/make_fixtures.py with lm-eval's
//! rule, every (prompt, choice) pair scored by HF on its own in float64) go through the real
//! corpus reader and split with the fixture's byte-level BPE tokenizer, then are scored
//! alone and packed several documents per micro-batch in one pass; and through the binary.

mod common;

use common::{hf_fixture, HfFixture};
use falcon_batch::backend::cpu::CpuBackend;
use falcon_batch::corpus::{build_batch, pack, CorpusOptions, CorpusReader, PreparedDoc, ReadyDoc, Template};
use falcon_batch::layout::{MicroBatch, TokenizedDoc};
use falcon_batch::results::read_results;
use falcon_batch::stage::Stage;
use falcon_batch::tokenizer::Tokenizer;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const TOL: f64 = 1e-4;

/// One golden document: the corpus fields and what HF made of them.
struct GoldenDoc {
    id: String,
    prompt: String,
    choices: Vec<String>,
    prompt_ids: Vec<u32>,
    choice_ids: Vec<Vec<u32>>,
    choice_chars: Vec<usize>,
    /// Per choice, HF's per-token log-probs of the pair scored alone.
    logprobs: Vec<Vec<f64>>,
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect()
}

fn golden_docs(golden: &Value) -> (String, Vec<GoldenDoc>) {
    let docs = &golden["documents"];
    let list = docs["docs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| GoldenDoc {
            id: d["id"].as_str().unwrap().to_string(),
            prompt: d["prompt"].as_str().unwrap().to_string(),
            choices: strings(&d["choices"]),
            prompt_ids: ids(&d["prompt_ids"]),
            choice_ids: d["choice_ids"].as_array().unwrap().iter().map(ids).collect(),
            choice_chars: d["choice_chars"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect(),
            logprobs: d["logprobs"].as_array().unwrap().iter().map(floats).collect(),
        })
        .collect();
    (docs["target_delimiter"].as_str().unwrap().to_string(), list)
}

/// The golden documents as corpus lines (JSONL).
fn jsonl(docs: &[GoldenDoc]) -> String {
    docs.iter().map(|d| serde_json::json!({"id": d.id, "prompt": d.prompt, "choices": d.choices}).to_string() + "\n").collect()
}

/// The documents through the real reader and split, with the fixture's tokenizer.
fn read_corpus(fx: &HfFixture, docs: &[GoldenDoc], delimiter: &str) -> Vec<PreparedDoc> {
    let tok = Tokenizer::from_file(&fx.dir.join("tokenizer.json")).unwrap();
    let mut opts = CorpusOptions::new(Template::default(), fx.cfg.context_limit());
    opts.delimiter = delimiter.to_string();
    let text = jsonl(docs);
    CorpusReader::from_reader("golden.jsonl", std::io::Cursor::new(text.into_bytes()), &tok, opts).map(Result::unwrap).collect()
}

/// Scored rows of a batch, back to (document of the batch, choice) -> per-token log-probs.
fn per_choice(batch: &MicroBatch, docs: &[ReadyDoc], logprobs: &[f64]) -> Vec<Vec<Vec<f64>>> {
    let mut out: Vec<Vec<Vec<f64>>> = docs.iter().map(|d| vec![vec![]; d.doc.choices.len()]).collect();
    for (s, lp) in batch.scored.iter().zip(logprobs) {
        out[s.doc as usize][s.choice as usize].push(*lp);
    }
    out
}

/// Per token within TOL of HF; returns the largest difference.
fn compare(what: &str, got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: token count");
    let mut worst = 0f64;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() < TOL, "{what}: token {i}: {g} vs HF {w}");
        worst = worst.max((g - w).abs());
    }
    let (gs, ws): (f64, f64) = (got.iter().sum(), want.iter().sum());
    assert!((gs - ws).abs() < TOL * want.len() as f64, "{what}: sum {gs} vs HF {ws}");
    worst
}

/// A row budget that puts the first four documents in the first micro-batch; the test
/// checks every batch then holds at least three.
fn budget(ready: &[&ReadyDoc]) -> usize {
    ready.iter().take(4).map(|d| d.doc.rows()).sum()
}

fn check_fixture(name: &str) {
    let fx = hf_fixture(name);
    let (delimiter, golden) = golden_docs(&fx.golden);
    assert!(golden.len() >= 6, "{name}: the golden has {} documents", golden.len());

    // 1. the split: ids and characters exactly as lm-eval's rule made them in Python
    let prepared = read_corpus(&fx, &golden, &delimiter);
    assert_eq!(prepared.len(), golden.len());
    let ready: Vec<&ReadyDoc> = prepared.iter().map(|p| p.result.as_ref().unwrap_or_else(|e| panic!("{name}: {e}"))).collect();
    for (r, g) in ready.iter().zip(&golden) {
        assert_eq!(r.doc.prompt, g.prompt_ids, "{name} {}: prompt ids", g.id);
        assert_eq!(r.doc.choices, g.choice_ids, "{name} {}: choice ids", g.id);
        assert_eq!(r.choice_chars, g.choice_chars, "{name} {}: choice characters", g.id);
    }

    let b = CpuBackend::new();
    let stage = Stage::upload(&b, &fx.host).unwrap();
    let mut worst = 0f64;

    // 2. each (prompt, choice) pair alone, as HF scored it
    for (r, g) in ready.iter().zip(&golden) {
        for (c, want) in g.logprobs.iter().enumerate() {
            let single = TokenizedDoc { index: 0, id: g.id.clone(), prompt: r.doc.prompt.clone(), choices: vec![r.doc.choices[c].clone()] };
            let got = stage.score_batch(&b, &fx.cfg, &MicroBatch::build(&[single])).unwrap();
            worst = worst.max(compare(&format!("{name} {} choice {c} alone", g.id), &got, want));
        }
    }

    // 3. packed: several documents per micro-batch, all choices of each in one token tree
    let batches = pack(&prepared, budget(&ready));
    let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
    assert!(batches.len() >= 2 && sizes.iter().all(|&n| n >= 3), "{name}: documents per micro-batch {sizes:?}");
    let mut seen = 0;
    for docs in &batches {
        let batch = build_batch(docs.iter());
        let lps = stage.score_batch(&b, &fx.cfg, &batch).unwrap();
        for (d, got) in docs.iter().zip(per_choice(&batch, docs, &lps)) {
            let g = &golden[d.doc.index];
            assert_eq!(d.doc.id, g.id);
            for (c, (got, want)) in got.iter().zip(&g.logprobs).enumerate() {
                worst = worst.max(compare(&format!("{name} {} choice {c} packed", g.id), got, want));
            }
            seen += 1;
        }
    }
    assert_eq!(seen, golden.len());
    eprintln!("{name}: {} documents, micro-batches of {sizes:?} documents: max |Δ logprob| vs HF = {worst:.2e}", golden.len());
}

macro_rules! fixture_tests {
    ($($name:ident),*) => { $( #[test] fn $name() { check_fixture(stringify!($name)); } )* };
}

fixture_tests!(falcon_7b, falcon_40b, falcon_new_1ln, falcon_seq_bias, falcon_untied, llama_gqa, llama_tied, mistral);

/// The delimiter decides only the joint where neither side has whitespace: with "" the
/// "...Answer:" documents change, the leading-space and trailing-space ones do not.
#[test]
fn the_delimiter_touches_only_joints_without_whitespace() {
    let fx = hf_fixture("llama_tied");
    let (delimiter, golden) = golden_docs(&fx.golden);
    let with = read_corpus(&fx, &golden, &delimiter);
    let without = read_corpus(&fx, &golden, "");
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

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_falcon-batch"));
    c.env("HDF5_USE_FILE_LOCKING", "FALSE");
    c
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fb-conventions-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
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
    let (_, golden) = golden_docs(&fx.golden);
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
