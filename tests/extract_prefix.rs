//! Extract's later passes attend to the prompt keys and values kept from the first pass
//! (model::PromptStore) instead of sending the prompt again: the same top-k and scores as
//! re-sending it, later passes carry branch rows only, and the kept rows are all freed once
//! each document's search is done. Tiny random models, run as two layer groups sharing one
//! store (keyed by global layer, as a rank cycling groups has it); and through the binary,
//! two ranks each cycling layer groups (weight streaming) give the one-process results.

mod common;

use common::proc::run_limited;
use common::tiny::{bin, model, mpirun};
use common::*;
use falcon_batch::results::read_file;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use falcon_batch::backend::cpu::CpuBackend;
use falcon_batch::config::ModelConfig;
use falcon_batch::extract::{build, Branch, Ranked, Search, Slot, Step, Target, Work};
use falcon_batch::group::{score_keeping, score_through, DeviceGroup};
use falcon_batch::model::PromptStore;
use falcon_batch::token_tree::{MicroBatch, Prefix};

/// A document: its prompt and its candidate spans' continuations (span ids + end id 2).
struct Doc {
    index: usize,
    prompt: Vec<u32>,
    conts: Vec<Vec<u32>>,
    span_lens: Vec<usize>,
}

fn docs() -> Vec<Doc> {
    (0..3)
        .map(|i| {
            let prompt: Vec<u32> = (0..6 + 2 * i as u32).map(|t| 3 + (t * 7 + i as u32 * 5) % 40).collect();
            let source: Vec<u32> = (0..7).map(|t| 4 + (t * 11 + i as u32 * 3) % 43).collect();
            let (mut conts, mut span_lens) = (vec![], vec![]);
            for s in 0..source.len() {
                for len in 1..=4.min(source.len() - s) {
                    conts.push([&source[s..s + len], &[2]].concat());
                    span_lens.push(len);
                }
            }
            Doc { index: 10 + i, prompt, conts, span_lens }
        })
        .collect()
}

/// The search of every document, all of them in each micro-batch, pass after pass: with
/// `keep`, later passes send branch rows only and attend to the kept prompts. Returns each
/// document's top-k and, per micro-batch, (its rows, its tree rows).
fn search_all(cfg: &ModelConfig, groups: &[DeviceGroup<CpuBackend>], b: &CpuBackend, keep: bool, store: &mut PromptStore<CpuBackend>) -> (Vec<Vec<Ranked>>, Vec<(usize, usize)>) {
    let docs = docs();
    let mut searches: Vec<(Search, Option<Work>)> = docs
        .iter()
        .map(|d| {
            let (s, w) = Search::new(d.conts.clone(), d.span_lens.clone(), 3, false);
            (s, Some(w))
        })
        .collect();
    let mut top: Vec<Vec<Ranked>> = vec![vec![]; docs.len()];
    let (mut passes, mut rows, mut release) = (0, vec![], vec![]);
    while searches.iter().any(|(_, w)| w.is_some()) {
        let slots: Vec<(usize, Slot)> = searches
            .iter()
            .enumerate()
            .filter_map(|(i, (_, w))| {
                let w = w.as_ref()?;
                let kept = keep && passes > 0 && !w.targets_prompt();
                Some((i, Slot { doc: docs[i].index, prompt: &docs[i].prompt, kept, branches: &w.branches }))
            })
            .collect();
        let which: Vec<usize> = slots.iter().map(|(i, _)| *i).collect();
        let slots: Vec<Slot> = slots.into_iter().map(|(_, s)| s).collect();
        let mut batch: MicroBatch = build(&slots).unwrap();
        batch.release = std::mem::take(&mut release);
        let tree: usize = slots.iter().flat_map(|s| s.branches).map(|br| br.rows.len()).sum();
        rows.push((batch.rows(), tree));
        let lps = if keep { score_keeping(groups, b, cfg, &batch, store).unwrap() } else { score_through(groups, b, cfg, &batch).unwrap() };
        let mut at = 0;
        for i in which {
            let n = searches[i].1.as_ref().map_or(0, Work::targets);
            let (search, work) = &mut searches[i];
            *work = match search.advance(&lps[at..at + n]).unwrap() {
                Step::Run(w) => Some(w),
                Step::Done(t) => {
                    top[i] = t;
                    release.push(docs[i].index);
                    None
                }
            };
            at += n;
        }
        passes += 1;
    }
    // The documents finished last are freed by the next batch's list; here, by the store.
    store.release(&release);
    (top, rows)
}

fn check(cfg: &ModelConfig) {
    let b = CpuBackend::new();
    let groups: Vec<DeviceGroup<CpuBackend>> = [0..1, 1..cfg.n_layers].into_iter().map(|r| DeviceGroup::upload(&b, cfg, &random_group(cfg, r, 5)).unwrap()).collect();
    let (resent, resent_rows) = search_all(cfg, &groups, &b, false, &mut PromptStore::default());
    let mut store = PromptStore::default();
    let (kept, kept_rows) = search_all(cfg, &groups, &b, true, &mut store);
    assert!(kept_rows.len() >= 2, "a single pass tests nothing: {kept_rows:?}");
    for (d, (a, k)) in resent.iter().zip(&kept).enumerate() {
        let ids = |t: &[Ranked]| t.iter().map(|r| r.candidate).collect::<Vec<_>>();
        assert_eq!(ids(a), ids(k), "document {d}: top-k");
        // f32 sums in another order (the two runs' batches hold other rows, so a row lands in
        // tiles of another height, whose products sum in chains): a few ulps of scores near 8,
        // where one ulp is 9.5e-7.
        for (x, y) in a.iter().zip(k) {
            assert!((x.score - y.score).abs() < 1e-5 && (x.span_logprob - y.span_logprob).abs() < 1e-5, "document {d}: {x:?} vs {y:?}");
        }
    }
    // Pass 1 sends the prompts either way; later passes send their branch rows alone.
    let prompts: usize = docs().iter().map(|d| d.prompt.len()).sum();
    assert_eq!(kept_rows[0], resent_rows[0]);
    assert_eq!(kept_rows[0].0, prompts + kept_rows[0].1);
    for (pass, &(rows, tree)) in kept_rows.iter().enumerate().skip(1) {
        assert_eq!(rows, tree, "pass {}: rows beyond the branches", pass + 1);
        assert!(resent_rows[pass].0 > rows);
    }
    assert_eq!((store.documents(), store.rows(&b)), (0, 0), "kept rows left after every search finished");
}

#[test]
fn kept_prompts_give_the_resent_results_llama() {
    check(&llama_config());
}

#[test]
fn kept_prompts_give_the_resent_results_falcon() {
    check(&falcon_config(true, true, false));
    check(&falcon_config(false, false, true));
}

#[test]
fn the_store_holds_every_layer_of_a_document_until_released() {
    let cfg = llama_config();
    let b = CpuBackend::new();
    let groups: Vec<DeviceGroup<CpuBackend>> = [0..2, 2..3].into_iter().map(|r| DeviceGroup::upload(&b, &cfg, &random_group(&cfg, r, 5)).unwrap()).collect();
    let d = &docs()[..2];
    let none = [];
    let slots: Vec<Slot> = d.iter().map(|d| Slot { doc: d.index, prompt: &d.prompt, kept: false, branches: &none }).collect();
    let mut store = PromptStore::default();
    score_keeping(&groups, &b, &cfg, &build(&slots).unwrap(), &mut store).unwrap();
    let p: usize = d.iter().map(|d| d.prompt.len()).sum();
    assert_eq!((store.documents(), store.rows(&b)), (2, p * cfg.n_layers));
    // A batch attending to a kept prompt that is gone is refused, not run on other keys.
    let branch = [Branch { rows: vec![5], targets: vec![Target { at: Some(0), id: 6 }], ..Branch::default() }];
    let mut one = build(&[Slot { doc: d[0].index, prompt: &d[0].prompt, kept: true, branches: &branch }]).unwrap();
    let p0 = d[0].prompt.len() as u32;
    assert_eq!(one.prefix, [Prefix::Kept { attend: vec![(0, p0)], start: 0, end: 1, at: p0 }]);
    one.release = vec![d[0].index];
    let err = score_keeping(&groups, &b, &cfg, &one, &mut store).unwrap_err().to_string();
    assert!(err.contains(&format!("document {}", d[0].index)) && err.contains("keeps no prompt"), "{err}");
    assert_eq!((store.documents(), store.rows(&b)), (1, d[1].prompt.len() * cfg.n_layers));
    store.clear();
    assert_eq!((store.documents(), store.rows(&b)), (0, 0));
}

/// `extract` of the fixture on `docs` into `out` with `extra` flags, by `c` (the binary or
/// mpirun of it): the file's documents as (id, [(text, logprob)]).
fn extract_by(mut c: Command, model: &Path, docs: &Path, out: &Path, extra: &[&str]) -> Vec<(String, Vec<(String, f64)>)> {
    c.args(["extract", "--device", "cpu", "--quiet", "--batch-tokens", "40", "--top-k", "3"]).args(extra);
    c.arg("--model").arg(model).arg("--docs").arg(docs).arg("--out").arg(out);
    let o = run_limited(&c, Duration::from_secs(300));
    assert_eq!(o.code(), Some(0), "{}", o.text());
    let f = read_file(out).unwrap();
    f.docs.into_iter().map(|d| (d.id, d.choices.into_iter().map(|c| (c.text, c.logprob)).collect())).collect()
}

#[test]
fn two_ranks_cycling_layer_groups_give_the_one_process_results() {
    let dir = tmp::dir("fb-extract-prefix");
    let model = model(&dir);
    let docs = dir.join("docs.jsonl");
    let lines: Vec<String> = (0..4)
        .map(|i: usize| {
            let words: Vec<String> = (0..5 + i).map(|k| format!("t{}", 3 + (i * 7 + k * 13) % 60)).collect();
            serde_json::json!({"id": format!("d{i}"), "prompt": format!("t{} t{} t{} Answer:", 5 + i, 9 + i, 11 + i), "source": words.join(" ") + "."}).to_string()
        })
        .collect();
    std::fs::write(&docs, lines.join("\n") + "\n").unwrap();
    let one = extract_by(bin(), &model, &docs, &dir.join("one.h5"), &["--wave", "1"]);
    let mut mp = mpirun(2, &[]);
    mp.arg(env!("CARGO_BIN_EXE_falcon-batch"));
    let streamed = extract_by(mp, &model, &docs, &dir.join("streamed.h5"), &["--wave", "2", "--resident", "1", "--group-layers", "1"]);
    assert_eq!(one.len(), 4);
    for ((id, a), (id2, b)) in one.iter().zip(&streamed) {
        assert_eq!(id, id2);
        assert_eq!(a.iter().map(|x| &x.0).collect::<Vec<_>>(), b.iter().map(|x| &x.0).collect::<Vec<_>>(), "{id}: top-k texts");
        for (x, y) in a.iter().zip(b) {
            assert!((x.1 - y.1).abs() < 1e-4, "{id}: {x:?} vs {y:?} (other micro-batches)");
        }
    }
}
