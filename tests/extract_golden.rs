//! `falcon-batch extract` against HF transformers scoring every candidate span of a document
//! on its own (tests/fixtures/extract/*.json, made by scripts/make_extract_reference.py):
//! every tiny fixture family (both corpus forms, the "\n" end and the EOS end), the GGUF form
//! of qwen2, and SmolLM2-135M on the sample corpus; the same top-k texts in the same order,
//! each score within `tol` per token (span + end ids). Then the same results from one
//! document per micro-batch and many, from `mpirun -np 1..4` and from 2 test hosts.

mod common;

use common::proc::{run_limited, Ran};
use common::smol;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

/// Every launch is killed, with its process group, past this.
const LIMIT: Duration = Duration::from_secs(300);
/// Per token, float64 HF against the f32 route on the tiny fixtures (hf_golden.rs holds
/// their single log-probs to the same).
const FIXTURE_TOL: f64 = 1e-4;
/// Per token on SmolLM2: HF's float32 forward batched one way, ours another.
const SMOL_TOL: f64 = 2e-3;
/// Between two runs of falcon-batch itself (ranks, hosts, micro-batches): the same arithmetic
/// in another order.
const SAME_TOL: f64 = 1e-5;

fn root() -> &'static Path {
    smol::root()
}

fn tmp() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| common::tmp::dir("fb-extract-golden"))
}

/// The launches that run SmolLM2 share the machine's few cores: one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// One candidate as the golden has it (HF) or extract printed it (one CSV row).
#[derive(Debug, Clone)]
struct Cand {
    text: String,
    start: u64,
    end: u64,
    score: f64,
    span_logprob: f64,
    tokens: u64,
    prob: f64,
}

struct GoldenDoc {
    id: String,
    n_candidates: usize,
    /// The best TOP_K + 5, best first.
    top: Vec<Cand>,
}

struct Golden {
    name: String,
    corpus: PathBuf,
    top_k: usize,
    span_end: String,
    end_tokens: usize,
    docs: Vec<GoldenDoc>,
}

fn read_golden(name: &str) -> Golden {
    let path = root().join("tests/fixtures/extract").join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e} (scripts/make_extract_reference.py writes it)", path.display()));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let s = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or_else(|| panic!("{}: no string {k}", path.display())).to_string();
    let u = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{}: no integer {k}", path.display()));
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{}: no number {k}", path.display()));
    let docs = v["docs"]
        .as_array()
        .expect("docs")
        .iter()
        .map(|d| GoldenDoc {
            id: s(d, "id"),
            n_candidates: u(d, "n_candidates") as usize,
            top: d["top"]
                .as_array()
                .expect("top")
                .iter()
                .map(|c| Cand {
                    text: s(c, "text"),
                    start: u(c, "start"),
                    end: u(c, "end"),
                    score: f(c, "score"),
                    span_logprob: f(c, "span_logprob"),
                    tokens: u(c, "tokens"),
                    prob: f(c, "score").exp(),
                })
                .collect(),
        })
        .collect();
    Golden {
        name: s(&v, "name"),
        corpus: root().join(s(&v, "corpus")),
        top_k: u(&v, "top_k") as usize,
        span_end: s(&v, "span_end"),
        end_tokens: v["end_ids"].as_array().expect("end_ids").len(),
        docs,
    }
}

impl Golden {
    /// The lines of its corpus whose documents it holds, in corpus order (a golden leaves
    /// out what does not fit its model's context).
    fn corpus_lines(&self, first: usize) -> Vec<String> {
        let text = std::fs::read_to_string(&self.corpus).unwrap_or_else(|e| panic!("{}: {e}", self.corpus.display()));
        let ids: Vec<&str> = self.docs.iter().take(first).map(|d| d.id.as_str()).collect();
        text.lines()
            .filter(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("a JSON corpus line");
                v["id"].as_str().is_some_and(|id| ids.contains(&id))
            })
            .map(String::from)
            .collect()
    }
}

/// `extract`'s CSV by document id, rows in rank order; the header is checked.
fn read_csv(path: &Path) -> BTreeMap<String, Vec<Cand>> {
    let mut r = csv::Reader::from_path(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let header: Vec<String> = r.headers().expect("CSV header").iter().map(String::from).collect();
    assert_eq!(header, ["id", "rank", "text", "start", "end", "score", "span_logprob", "tokens", "prob"], "{}: header", path.display());
    let mut out: BTreeMap<String, Vec<Cand>> = BTreeMap::new();
    for (line, rec) in r.records().enumerate() {
        let rec = rec.unwrap_or_else(|e| panic!("{} row {}: {e}", path.display(), line + 2));
        let num = |k: usize| -> f64 { rec[k].parse().unwrap_or_else(|e| panic!("{} row {} field {}: {:?}: {e}", path.display(), line + 2, header[k], &rec[k])) };
        let rows = out.entry(rec[0].to_string()).or_default();
        assert_eq!(num(1) as usize, rows.len() + 1, "{} row {}: ranks of document {} out of order", path.display(), line + 2, &rec[0]);
        rows.push(Cand { text: rec[2].to_string(), start: num(3) as u64, end: num(4) as u64, score: num(5), span_logprob: num(6), tokens: num(7) as u64, prob: num(8) });
    }
    out
}

/// `falcon-batch extract` here exists (until it does, every test here fails saying so).
fn require_extract() {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        let mut c = Command::new(smol::bin());
        c.args(["extract", "--help"]);
        let r = run_limited(&c, Duration::from_secs(30));
        assert!(
            r.success(),
            "`falcon-batch extract --help` exits {:?}: this binary has no extract command (issue 26; its interface is the one these tests and tests/fixtures/extract were written to):\n{}",
            r.code(),
            r.text()
        );
    });
}

/// A model directory converted from `from` (a fixture directory or GGUF file) into the test dir.
fn convert(from: &Path, name: &str) -> PathBuf {
    let out = tmp().join("models").join(name);
    if !out.join("manifest.json").exists() {
        let mut c = Command::new(smol::bin());
        c.args(["convert", "--from"]).arg(from).arg("--to").arg(&out);
        let r = run_limited(&c, LIMIT);
        assert!(r.success(), "convert {}: {}", from.display(), r.text());
    }
    out
}

fn smollm2() -> &'static PathBuf {
    static M: OnceLock<PathBuf> = OnceLock::new();
    M.get_or_init(|| {
        let out = tmp().join("models/smollm2");
        smol::convert_smollm2(&out, &[], LIMIT);
        out
    })
}

/// The arguments of `extract` of `docs` into `out` (.h5, with its .csv beside it).
fn extract_args(model: &Path, docs: &Path, out: &Path, golden: &Golden, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = ["extract", "--device", "cpu", "--quiet", "--overwrite", "--top-k"].iter().map(|s| s.to_string()).collect();
    a.push(golden.top_k.to_string());
    if golden.span_end == "eos" {
        a.extend(["--span-end".to_string(), "eos".to_string()]);
    }
    for (flag, p) in [("--model", model), ("--docs", docs), ("--out", out), ("--csv", &out.with_extension("csv"))] {
        a.push(flag.to_string());
        a.push(p.display().to_string());
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// `command` run to its end; it must succeed; its CSV.
fn run_extract(command: &Command, out: &Path, what: &str) -> BTreeMap<String, Vec<Cand>> {
    let r: Ran = run_limited(command, LIMIT);
    assert_eq!(r.code(), Some(0), "{what}: extract: {}", r.text());
    eprintln!("{what}: {:.1} s", r.took.as_secs_f64());
    read_csv(&out.with_extension("csv"))
}

/// One process: `extract` of the golden's first `first` documents with `extra` flags.
fn extract_alone(model: &Path, golden: &Golden, first: usize, tag: &str, extra: &[&str]) -> BTreeMap<String, Vec<Cand>> {
    let docs = tmp().join(format!("{tag}.jsonl"));
    smol::write_corpus(&docs, &golden.corpus_lines(first));
    let out = tmp().join(format!("{tag}.h5"));
    let mut c = Command::new(smol::bin());
    c.args(extract_args(model, &docs, &out, golden, extra)).env("HDF5_USE_FILE_LOCKING", "FALSE");
    run_extract(&c, &out, tag)
}

/// The top-k of every document of the golden (its first `first`): the same texts, offsets and
/// token counts in the same order, scores within `tol` per token. Candidates HF scores within
/// tolerance of each other may come in either order: a got text is then looked up among the
/// golden's next ones. Returns the largest |Δ score| per token.
fn compare(golden: &Golden, got: &BTreeMap<String, Vec<Cand>>, first: usize, tol: f64, what: &str) -> f64 {
    let mut worst = 0f64;
    let want_docs = &golden.docs[..first.min(golden.docs.len())];
    assert_eq!(got.len(), want_docs.len(), "{what}: documents in the CSV: {:?}", got.keys().collect::<Vec<_>>());
    for d in want_docs {
        let rows = got.get(&d.id).unwrap_or_else(|| panic!("{what}: no rows for document {}", d.id));
        let k = golden.top_k.min(d.n_candidates);
        let show = |c: &[Cand]| c.iter().take(k + 1).map(|c| format!("{:?} {:.5}", c.text, c.score)).collect::<Vec<_>>().join(", ");
        let ctx = || format!("{what}: document {}: extract gave [{}], HF [{}]", d.id, show(rows), show(&d.top));
        assert_eq!(rows.len(), k, "{}", ctx());
        for (r, g) in rows.iter().enumerate() {
            let w = d.top.iter().find(|c| c.text == g.text).unwrap_or_else(|| panic!("rank {}: {:?} is not among HF's best {}; {}", r + 1, g.text, d.top.len(), ctx()));
            let per_token = |c: &Cand| tol * (c.tokens as usize + golden.end_tokens) as f64;
            if w.text != d.top[r].text {
                // a near tie: HF's candidate of this rank and the one printed score alike
                let h = &d.top[r];
                assert!((w.score - h.score).abs() <= per_token(w) + per_token(h), "rank {}: {:?} where HF has {:?}; {}", r + 1, g.text, h.text, ctx());
            }
            assert_eq!((g.start, g.end, g.tokens), (w.start, w.end, w.tokens), "rank {} {:?}: start, end, tokens; {}", r + 1, g.text, ctx());
            let d_score = (g.score - w.score).abs();
            assert!(d_score <= per_token(w), "rank {} {:?}: score {} vs HF {} (tolerance {}); {}", r + 1, g.text, g.score, w.score, per_token(w), ctx());
            assert!((g.span_logprob - w.span_logprob).abs() <= tol * w.tokens as f64 + d_score.max(per_token(w)), "rank {} {:?}: span_logprob {} vs HF {}; {}", r + 1, g.text, g.span_logprob, w.span_logprob, ctx());
            assert!((g.prob - g.score.exp()).abs() <= 1e-5 * g.prob + 1e-12, "rank {} {:?}: prob {} is not exp(score {}); {}", r + 1, g.text, g.prob, g.score, ctx());
            worst = worst.max(d_score / (w.tokens as usize + golden.end_tokens) as f64);
        }
        let mut texts: Vec<&str> = rows.iter().map(|c| c.text.as_str()).collect();
        texts.sort();
        texts.dedup();
        assert_eq!(texts.len(), rows.len(), "a text twice; {}", ctx());
    }
    eprintln!("{what}: {} documents, max |Δ score| per token {worst:.2e}", want_docs.len());
    worst
}

/// Two runs of extract: the same texts, offsets and tokens in the same order, scores within SAME_TOL.
fn assert_same(want: &BTreeMap<String, Vec<Cand>>, got: &BTreeMap<String, Vec<Cand>>, what: &str) {
    assert_eq!(want.keys().collect::<Vec<_>>(), got.keys().collect::<Vec<_>>(), "{what}: documents");
    for (id, w) in want {
        let g = &got[id];
        let texts = |c: &[Cand]| c.iter().map(|c| (c.text.clone(), c.start, c.end, c.tokens)).collect::<Vec<_>>();
        assert_eq!(texts(w), texts(g), "{what}: document {id}");
        for (a, b) in w.iter().zip(g) {
            assert!((a.score - b.score).abs() <= SAME_TOL && (a.span_logprob - b.span_logprob).abs() <= SAME_TOL, "{what}: document {id} {:?}: {} vs {}", a.text, a.score, b.score);
        }
    }
}

/// A tiny HF fixture converted, extract over the golden's documents, against HF.
fn check_fixture(golden_name: &str, fixture: &str) {
    require_extract();
    let golden = read_golden(golden_name);
    let model = convert(&root().join("tests/fixtures").join(fixture), fixture);
    let got = extract_alone(&model, &golden, usize::MAX, golden_name, &[]);
    compare(&golden, &got, usize::MAX, FIXTURE_TOL, &golden.name);
}

macro_rules! fixture_tests {
    ($($name:ident),*) => { $( #[test] fn $name() { check_fixture(stringify!($name), stringify!($name)); } )* };
}

fixture_tests!(falcon_7b, falcon_40b, falcon_new_1ln, falcon_seq_bias, falcon_untied, falcon_linear);
fixture_tests!(llama_gqa, llama_tied, llama31, llama_linear, llama3_params, mistral, qwen2, qwen2_untied);

/// `--span-end eos`: the tokenizer's end-of-sequence id ends every span.
#[test]
fn llama_tied_span_end_eos() {
    check_fixture("llama_tied_eos", "llama_tied");
}

/// qwen2 as llama.cpp writes it (tests/fixtures/gguf_qwen2, its tokenizer read from the GGUF)
/// finds what HF finds on the HF checkpoint.
#[test]
fn gguf_qwen2() {
    require_extract();
    let golden = read_golden("qwen2");
    let model = convert(&root().join("tests/fixtures/gguf_qwen2/qwen2.f32.gguf"), "gguf_qwen2");
    let got = extract_alone(&model, &golden, usize::MAX, "gguf_qwen2", &[]);
    compare(&golden, &got, usize::MAX, FIXTURE_TOL, "gguf_qwen2");
}

/// One document per micro-batch and all of them in one: the same top-k, HF's.
#[test]
fn one_or_many_documents_per_micro_batch_give_the_same_results() {
    require_extract();
    let golden = read_golden("llama_tied");
    let model = convert(&root().join("tests/fixtures/llama_tied"), "llama_tied");
    let small = extract_alone(&model, &golden, usize::MAX, "batch-small", &["--batch-tokens", "48", "--wave", "1"]);
    let large = extract_alone(&model, &golden, usize::MAX, "batch-large", &["--batch-tokens", "8192", "--wave", "4"]);
    compare(&golden, &small, usize::MAX, FIXTURE_TOL, "--batch-tokens 48");
    compare(&golden, &large, usize::MAX, FIXTURE_TOL, "--batch-tokens 8192");
    assert_same(&small, &large, "--batch-tokens 48 against 8192");
}

/// SmolLM2-135M on the sample documents the golden holds, within SMOL_TOL per token of HF.
#[test]
fn smollm2_sample_corpus() {
    require_extract();
    let _g = serial();
    let golden = read_golden("smollm2");
    let got = extract_alone(smollm2(), &golden, usize::MAX, "smollm2", &["--batch-tokens", "2048"]);
    compare(&golden, &got, usize::MAX, SMOL_TOL, "smollm2");
}

/// How many SmolLM2 golden documents the many-rank runs take (each run costs their extract).
const RANK_DOCS: usize = 3;

/// The one-process SmolLM2 results of the first RANK_DOCS documents, several per micro-batch.
fn smol_one_process() -> &'static BTreeMap<String, Vec<Cand>> {
    static R: OnceLock<BTreeMap<String, Vec<Cand>>> = OnceLock::new();
    R.get_or_init(|| {
        let golden = read_golden("smollm2");
        let got = extract_alone(smollm2(), &golden, RANK_DOCS, "smol-np0", &["--batch-tokens", "2048", "--wave", "2"]);
        compare(&golden, &got, RANK_DOCS, SMOL_TOL, "smollm2, one process");
        got
    })
}

#[test]
fn mpirun_np_1_to_4_give_the_one_process_results() {
    require_extract();
    let _g = serial();
    let want = smol_one_process();
    let golden = read_golden("smollm2");
    let docs = tmp().join("smol-ranks.jsonl");
    smol::write_corpus(&docs, &golden.corpus_lines(RANK_DOCS));
    for (np, group) in [(1, "10"), (2, "5"), (3, "5"), (4, "4")] {
        let out = tmp().join(format!("smol-np{np}.h5"));
        let mut c = common::tiny::mpirun(np, &[("HDF5_USE_FILE_LOCKING", "FALSE")]);
        c.arg(smol::bin()).args(extract_args(smollm2(), &docs, &out, &golden, &["--group-layers", group, "--resident", "1", "--batch-tokens", "2048", "--wave", "2"]));
        let what = format!("-np {np}, --group-layers {group}");
        let got = run_extract(&c, &out, &what);
        assert_same(want, &got, &what);
    }
}

#[test]
fn two_hosts_give_the_one_process_results() {
    require_extract();
    let _g = serial();
    let want = smol_one_process();
    let golden = read_golden("smollm2");
    let docs = tmp().join("smol-hosts.jsonl");
    smol::write_corpus(&docs, &golden.corpus_lines(RANK_DOCS));
    let hosts = common::hosts::TestHosts::up(2, "1gbit");
    let out = tmp().join("smol-hosts.h5");
    let args = extract_args(smollm2(), &docs, &out, &golden, &["--group-layers", "5", "--resident", "1", "--batch-tokens", "2048", "--wave", "2"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let c = hosts.mpirun(2, 2, &[("HDF5_USE_FILE_LOCKING", "FALSE")], smol::bin(), &args);
    let got = run_extract(&c, &out, "-np 2 over 2 hosts");
    assert_same(want, &got, "-np 2 over 2 hosts");
}

/// The golden's own top-k written as extract's CSV passes `compare`; with two ranks swapped, or
/// a score moved by 10x the tolerance, it does not (runs without the extract command: it
/// checks this file's comparison, which the tests above rely on).
#[test]
fn the_comparison_takes_hf_own_results_and_refuses_a_swap_or_a_moved_score() {
    let golden = read_golden("llama_gqa");
    let write = |edit: &dyn Fn(&str, &mut Vec<Cand>)| -> BTreeMap<String, Vec<Cand>> {
        let path = tmp().join("self-check.csv");
        let mut w = csv::Writer::from_path(&path).expect("write the CSV");
        w.write_record(["id", "rank", "text", "start", "end", "score", "span_logprob", "tokens", "prob"]).expect("header");
        for d in &golden.docs {
            let mut top: Vec<Cand> = d.top.iter().take(golden.top_k.min(d.n_candidates)).cloned().collect();
            edit(&d.id, &mut top);
            for (r, c) in top.iter().enumerate() {
                let f = |x: f64| format!("{x}");
                w.write_record([d.id.clone(), (r + 1).to_string(), c.text.clone(), c.start.to_string(), c.end.to_string(), f(c.score), f(c.span_logprob), c.tokens.to_string(), f(c.prob)]).expect("row");
            }
        }
        w.flush().expect("flush");
        read_csv(&path)
    };
    let fails = |got: BTreeMap<String, Vec<Cand>>| std::panic::catch_unwind(|| compare(&golden, &got, usize::MAX, FIXTURE_TOL, "self-check")).is_err();
    assert!(!fails(write(&|_, _| {})), "HF's own top-k must pass");
    let doc = golden.docs[0].id.clone();
    assert!(fails(write(&|id, top| if id == doc { top.swap(0, 2) })), "two ranks swapped must fail");
    assert!(fails(write(&|id, top| if id == doc { top[1].score += 10.0 * FIXTURE_TOL * (top[1].tokens + 1) as f64 })), "a moved score must fail");
    assert!(fails(write(&|id, top| if id == doc { top.pop(); })), "a missing rank must fail");
}
