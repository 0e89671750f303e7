//! The "documents" goldens of the choice split (tests/fixtures/lm_eval_split.py): each
//! (prompt, choice) pair as lm-eval splits it and HF scores it alone.

use falcon_batch::corpus::{CorpusOptions, CorpusReader, PreparedDoc, ReadyDoc, Template};
use falcon_batch::token_tree::MicroBatch;
use falcon_batch::tokenizer::Tokenizer;
use serde_json::Value;

/// One golden document: the corpus fields and what HF made of them.
pub struct GoldenDoc {
    pub id: String,
    pub prompt: String,
    pub choices: Vec<String>,
    pub prompt_ids: Vec<u32>,
    pub choice_ids: Vec<Vec<u32>>,
    pub choice_chars: Vec<usize>,
    /// Per choice, HF's per-token log-probs of the pair scored alone.
    pub logprobs: Vec<Vec<f64>>,
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

/// The delimiter and documents of a golden's documents object
/// (`{"target_delimiter", "docs": [...]}`).
pub fn golden_docs(docs: &Value) -> (String, Vec<GoldenDoc>) {
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
pub fn jsonl(docs: &[GoldenDoc]) -> String {
    docs.iter().map(|d| serde_json::json!({"id": d.id, "prompt": d.prompt, "choices": d.choices}).to_string() + "\n").collect()
}

/// The documents through the real corpus reader and split.
pub fn read_corpus(tok: &Tokenizer, max_context: usize, docs: &[GoldenDoc], delimiter: &str) -> Vec<PreparedDoc> {
    let mut opts = CorpusOptions::new(Template::default(), max_context);
    opts.delimiter = delimiter.to_string();
    let text = jsonl(docs);
    CorpusReader::from_reader("golden.jsonl", std::io::Cursor::new(text.into_bytes()), tok, opts).map(Result::unwrap).collect()
}

/// The ready documents, and that their ids and characters are the golden's.
pub fn check_split<'a>(what: &str, prepared: &'a [PreparedDoc], golden: &[GoldenDoc]) -> Vec<&'a ReadyDoc> {
    assert_eq!(prepared.len(), golden.len());
    let ready: Vec<&ReadyDoc> = prepared.iter().map(|p| p.result.as_ref().unwrap_or_else(|e| panic!("{what}: {e}"))).collect();
    for (r, g) in ready.iter().zip(golden) {
        assert_eq!(r.doc.prompt, g.prompt_ids, "{what} {}: prompt ids", g.id);
        assert_eq!(r.doc.choices, g.choice_ids, "{what} {}: choice ids", g.id);
        assert_eq!(r.choice_chars, g.choice_chars, "{what} {}: choice characters", g.id);
    }
    ready
}

/// A row budget that puts the first four documents in the first micro-batch (with the
/// golden sets, every batch then holds at least three: the tests check it).
pub fn budget(ready: &[&ReadyDoc]) -> usize {
    ready.iter().take(4).map(|d| d.doc.rows()).sum()
}

/// Scored rows of a batch, back to (document of the batch, choice) -> per-token log-probs.
pub fn per_choice(batch: &MicroBatch, docs: &[ReadyDoc], logprobs: &[f64]) -> Vec<Vec<Vec<f64>>> {
    let mut out: Vec<Vec<Vec<f64>>> = docs.iter().map(|d| vec![vec![]; d.doc.choices.len()]).collect();
    for (s, lp) in batch.scored.iter().zip(logprobs) {
        out[s.doc as usize][s.choice as usize].push(*lp);
    }
    out
}

/// Per token within `tol` of HF (and the sum within `tol` per token); returns the largest difference.
pub fn compare(what: &str, got: &[f64], want: &[f64], tol: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: token count");
    let mut worst = 0f64;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() < tol, "{what}: token {i}: {g} vs HF {w}");
        worst = worst.max((g - w).abs());
    }
    let (gs, ws): (f64, f64) = (got.iter().sum(), want.iter().sum());
    assert!((gs - ws).abs() < tol * want.len() as f64, "{what}: sum {gs} vs HF {ws}");
    worst
}


/// All documents packed under `budget(..)` rows, several per micro-batch, each batch scored
/// in one pass on `group`, against the golden per token; returns the largest difference.
pub fn check_packed<B: falcon_batch::backend::Backend>(
    what: &str,
    b: &B,
    cfg: &falcon_batch::config::ModelConfig,
    group: &falcon_batch::group::DeviceGroup<B>,
    prepared: &[PreparedDoc],
    golden: &[GoldenDoc],
    tol: f64,
) -> f64 {
    let ready: Vec<&ReadyDoc> = prepared.iter().filter_map(|p| p.result.as_ref().ok()).collect();
    let batches = falcon_batch::corpus::pack(prepared, budget(&ready));
    let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
    assert!(batches.len() >= 2 && sizes.iter().all(|&n| n >= 3), "{what}: documents per micro-batch {sizes:?}");
    let (mut worst, mut seen) = (0f64, 0);
    for docs in &batches {
        let batch = falcon_batch::corpus::build_batch(docs.iter());
        let lps = group.score_batch(b, cfg, &batch).unwrap();
        for (d, got) in docs.iter().zip(per_choice(&batch, docs, &lps)) {
            let g = &golden[d.doc.index];
            assert_eq!(d.doc.id, g.id);
            for (c, (got, want)) in got.iter().zip(&g.logprobs).enumerate() {
                worst = worst.max(compare(&format!("{what} {} choice {c} packed", g.id), got, want, tol));
            }
            seen += 1;
        }
    }
    assert_eq!(seen, golden.len());
    eprintln!("{what}: {} documents in micro-batches of {sizes:?} documents", golden.len());
    worst
}
