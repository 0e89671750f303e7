//! The extract job: per document, its source's candidate spans searched for the exact
//! top-k (extract::Search) in passes (the prompt, then rounds of a best-first search), each a token tree run through a
//! runner::BatchScorer; results in input order, in a file of the extract schema, with
//! score's resume, identity, lock, limits and bad-line behaviour (score.rs's functions,
//! called, not copied). On SIGTERM the waves in flight finish and the documents they
//! complete are written; documents part-way through their passes are left to the rerun.
//!
//! Waves mix the passes of several documents: a document's next pass goes to the front of
//! the queue when its last one comes back, new documents' first passes behind it, so the
//! ranks stay busy while a document waits for its bounds.
//!
//! A document's first pass sends its prompt and every rank keeps its keys and values; its
//! later passes send their new branch rows alone, which the ranks keep too (a later branch's
//! path attends to them). The next wave after its last pass comes back tells the ranks to
//! free them. New documents are read only while the kept rows of the documents under search
//! total under `kept_limit`, so what the ranks keep is bounded.

use super::fault::Faults;
use super::in_order::InOrder;
use super::progress::Progress;
use super::score::{end_run, open_run, prepare_as, write_ready, Opened, Prepared, ScoreOptions, ScoreSummary};
use super::JobError;
use crate::corpus::{CorpusReader, DocForm, ReadyDoc};
use crate::extract::{build, Branch, Ranked, Search, Slot, Step, Work};
use crate::format::model_dir::ModelDir;
use crate::results::{ChoiceRow, DocResult, ExtractDoc, ExtractMeta, SpanRow};
use crate::runner::BatchScorer;
use crate::token_tree::MicroBatch;
use std::collections::{HashMap, VecDeque};
use std::time::Instant;

/// What follows each span in its score.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpanEnd {
    /// This text, encoded on its own without special tokens.
    Text(String),
    /// The tokenizer's end-of-sequence id.
    Eos,
}

impl SpanEnd {
    /// As the results file records it.
    pub fn name(&self) -> String {
        match self {
            SpanEnd::Text(t) => t.clone(),
            SpanEnd::Eos => "eos".into(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ExtractOptions {
    /// Everything a score run has (its norm unused: a span's score is its sum).
    pub run: ScoreOptions,
    pub top_k: usize,
    pub max_span_units: usize,
    pub span_end: SpanEnd,
    /// Score every candidate, no pruning (tests the pruning is exact).
    pub exhaustive: bool,
}

/// The end ids of `span_end` for this model.
fn end_ids(dir: &ModelDir, span_end: &SpanEnd) -> Result<Vec<u32>, JobError> {
    match span_end {
        SpanEnd::Eos => dir.config().eos_token_ids.first().map(|&id| vec![id]).ok_or_else(|| {
            JobError::Usage { flag: "--span-end", msg: format!("eos: {}: the model names no end-of-sequence token", dir.dir().join("config.json").display()) }
        }),
        SpanEnd::Text(t) => {
            let ids = dir.tokenizer()?.encode(t, false).map_err(|e| JobError::Usage { flag: "--span-end", msg: format!("{t:?}: {e}") })?;
            if ids.is_empty() {
                return Err(JobError::Usage { flag: "--span-end", msg: format!("{t:?}: makes no token; give text that makes one, or eos") });
            }
            Ok(ids)
        }
    }
}

/// Score's preparation with the documents' choices taken from their sources, and the
/// file's identity including the extract options.
pub fn prepare(dir: &ModelDir, opts: &ExtractOptions) -> Result<Prepared, JobError> {
    let form = DocForm::Source { max_units: opts.max_span_units, end: end_ids(dir, &opts.span_end)? };
    let meta = ExtractMeta { top_k: opts.top_k, max_span_units: opts.max_span_units, span_end: opts.span_end.name() };
    prepare_as(dir, &opts.run, Some(meta), form)
}

/// A document being searched.
struct Doc {
    ready: ReadyDoc,
    search: Search,
    /// Pieces of the pending pass not yet back, and the log-probs of those that are.
    pieces_left: usize,
    logprobs: Vec<f64>,
}

/// One micro-batch's share of a document's pass.
struct Piece {
    doc: usize,
    branches: Vec<Branch>,
    /// Its prompt is kept on the ranks (not sent).
    kept: bool,
    rows: usize,
}

/// Per micro-batch of a wave in flight: its rows, and (document, targets) per slot.
type Sent = Vec<(usize, Vec<(usize, usize)>)>;

struct Driver<'s, S: BatchScorer + ?Sized> {
    scorer: &'s mut S,
    depth: usize,
    batch_tokens: usize,
    wave: usize,
    docs: HashMap<usize, Doc>,
    queue: VecDeque<Piece>,
    queued_rows: usize,
    in_flight: VecDeque<Sent>,
    tokens: usize,
    faults: Faults,
    /// Rows of the documents under search kept, or to be, on every rank: their prompts and
    /// the tree rows of their kept passes.
    kept_rows: usize,
    /// Most kept rows under search before no new document is read.
    kept_limit: usize,
    /// Documents whose search is done, whose kept prompts the next wave frees.
    release: Vec<usize>,
}

impl<S: BatchScorer + ?Sized> Driver<'_, S>
where
    JobError: From<S::Error>,
{
    /// A pass of document `index` queued: at the front (a document already started, so it
    /// finishes first) or at the back (a new one).
    fn queue_pass(&mut self, index: usize, work: Work, front: bool) {
        let Some(doc) = self.docs.get_mut(&index) else { return };
        // A pass scoring at the prompt's last row (only the first, as search.rs runs) sends
        // the prompt again: those logits are not kept.
        // `search.passes` numbers the pass being queued: from the second on, the ranks hold
        // the prompt's keys.
        let kept = doc.search.passes > 1 && !work.targets_prompt();
        let prompt = if kept { 0 } else { doc.ready.doc.prompt.len() };
        // Every new tree row is kept (a pass sending its prompt again, which search.rs never
        // asks after the first, is counted too: a bound, not a count).
        self.kept_rows += work.tree_rows();
        let pieces: Vec<Piece> = work
            .pieces(prompt, self.batch_tokens)
            .into_iter()
            .map(|branches| Piece { doc: index, kept, rows: prompt + branches.iter().map(|b| b.sent_rows(kept)).sum::<usize>(), branches })
            .collect();
        doc.pieces_left = pieces.len();
        doc.logprobs.clear();
        self.queued_rows += pieces.iter().map(|p| p.rows).sum::<usize>();
        if front {
            for p in pieces.into_iter().rev() {
                self.queue.push_front(p);
            }
        } else {
            self.queue.extend(pieces);
        }
    }

    /// A new document: its first pass queued, or its result when it has no candidate.
    fn start(&mut self, ready: ReadyDoc, end: &[u32], k: usize, exhaustive: bool, order: &mut InOrder) {
        let index = ready.doc.index;
        order.push_scoring(index as u64);
        let conts: Vec<Vec<u32>> = ready.doc.choices.iter().map(|c| [c.as_slice(), end].concat()).collect();
        let span_lens = ready.doc.choices.iter().map(Vec::len).collect();
        let (search, work) = Search::new(conts, span_lens, k, exhaustive);
        self.kept_rows += ready.doc.prompt.len();
        self.docs.insert(index, Doc { ready, search, pieces_left: 0, logprobs: vec![] });
        self.queue_pass(index, work, false);
    }

    /// Submit a wave from the front of the queue: up to `wave` micro-batches of at most
    /// `batch_tokens` rows (a bigger piece alone).
    fn submit(&mut self) -> Result<(), JobError> {
        let mut batches: Vec<Vec<Piece>> = vec![];
        let mut rows = 0;
        while let Some(p) = self.queue.front() {
            let fits = batches.last().is_some_and(|b| !b.is_empty() && rows + p.rows <= self.batch_tokens);
            if !fits {
                if batches.len() == self.wave {
                    break;
                }
                batches.push(vec![]);
                rows = 0;
            }
            let Some(p) = self.queue.pop_front() else { break };
            rows += p.rows;
            self.queued_rows -= p.rows;
            if let Some(b) = batches.last_mut() {
                b.push(p);
            }
        }
        let mut micro: Vec<MicroBatch> = Vec::with_capacity(batches.len());
        let mut sent: Sent = Vec::with_capacity(batches.len());
        for b in &batches {
            let slots: Vec<Slot> = b
                .iter()
                .filter_map(|p| self.docs.get(&p.doc).map(|d| Slot { doc: p.doc, prompt: &d.ready.doc.prompt, kept: p.kept, branches: &p.branches }))
                .collect();
            let batch = build(&slots).map_err(|e| JobError::Other(Box::new(e)))?;
            sent.push((batch.rows(), b.iter().map(|p| (p.doc, p.branches.iter().map(|br| br.targets.len()).sum())).collect()));
            micro.push(batch);
        }
        // Every rank frees the finished documents' prompts as this wave starts: none of its
        // micro-batches, nor a later one, attends to them.
        if let Some(first) = micro.first_mut() {
            first.release = std::mem::take(&mut self.release);
        }
        self.scorer.submit(&micro)?;
        self.tokens += micro.iter().map(MicroBatch::rows).sum::<usize>();
        self.in_flight.push_back(sent);
        Ok(())
    }

    /// Collect the oldest wave: documents whose pass is back move on (their next pass to the
    /// front of the queue) or finish into `order`.
    fn collect(&mut self, order: &mut InOrder, progress: &mut Progress) -> Result<(), JobError> {
        let Some(sent) = self.in_flight.pop_front() else { return Ok(()) };
        self.faults.hold_wave();
        let logprobs = self.scorer.collect()?;
        for ((rows, slots), lps) in sent.iter().zip(&logprobs) {
            progress.tokens(*rows);
            let mut at = 0;
            for &(index, n) in slots {
                let Some(doc) = self.docs.get_mut(&index) else { continue };
                doc.logprobs.extend_from_slice(&lps[at..at + n]);
                at += n;
                doc.pieces_left -= 1;
                if doc.pieces_left > 0 {
                    continue;
                }
                let lps = std::mem::take(&mut doc.logprobs);
                match doc.search.advance(&lps).map_err(|source| JobError::Search { id: doc.ready.doc.id.clone(), source })? {
                    Step::Run(work) => self.queue_pass(index, work, true),
                    Step::Done(top) => {
                        if let Some(doc) = self.docs.remove(&index) {
                            // Its share: the prompt and every tree row its passes sent.
                            self.kept_rows -= doc.ready.doc.prompt.len() + doc.search.tree_tokens;
                            self.release.push(index);
                            order.finish(index as u64, result(&doc, &top));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Most prompt rows of documents under search before the driver reads no new one: the
/// waves in flight and one queued, each `wave` micro-batches of `batch_tokens` rows, all
/// prompts. Every rank keeps at most this plus one prompt, times its layers (README).
pub fn kept_limit(depth: usize, wave: usize, batch_tokens: usize) -> usize {
    (depth + 1) * wave * batch_tokens
}

/// A searched document's record: its top-k spans, best first.
fn result(doc: &Doc, top: &[Ranked]) -> DocResult {
    let r = &doc.ready;
    let choices = top
        .iter()
        .map(|t| {
            let c = t.candidate;
            let n_tokens = r.doc.choices[c].len();
            ChoiceRow {
                text: r.choices[c].clone(),
                n_tokens,
                logprob: t.score,
                logprob_mean: t.score / n_tokens as f64,
                logprob_per_char: t.score / r.choice_chars[c].max(1) as f64,
                prob: t.score.exp(),
            }
        })
        .collect();
    let spans = top.iter().map(|t| SpanRow { start: r.spans[t.candidate].0, end: r.spans[t.candidate].1, span_logprob: t.span_logprob }).collect();
    let extract = ExtractDoc {
        passes: doc.search.passes as usize,
        tree_tokens: doc.search.tree_tokens,
        candidates: doc.search.candidates(),
        answer: r.answer.clone().unwrap_or_default(),
        spans,
    };
    DocResult {
        id: r.doc.id.clone(),
        input_hash: r.input_hash.clone(),
        status: crate::results::DocStatus::Ok,
        error: String::new(),
        n_prompt_tokens: r.n_prompt_tokens,
        best: Some(0),
        choices,
        extract: Some(extract),
    }
}

/// Runs the whole job on the writer rank. `scorer` runs the model (here or over MPI).
pub fn run<S: BatchScorer + ?Sized>(dir: &ModelDir, opts: &ExtractOptions, prepared: Prepared, scorer: &mut S) -> Result<ScoreSummary, JobError>
where
    JobError: From<S::Error>,
{
    let start = Instant::now();
    let run = &opts.run;
    let Prepared { tokenizer, template, meta, plan, lock, form } = prepared;
    let end = match &form {
        DocForm::Source { end, .. } => end.clone(),
        DocForm::Choices => return Err(JobError::Other("extract: prepared without the source form".into())),
    };
    let Opened { mut writer, copts, mut progress, resumed } = open_run(dir, run, meta, plan, template, form)?;
    let mut reader = CorpusReader::open(&run.docs, &tokenizer, copts)?;
    let mut order = InOrder::default();
    let mut summary = ScoreSummary { resumed, ..Default::default() };
    let scorer_depth = scorer.depth().max(1);
    let mut d = Driver {
        depth: scorer_depth,
        scorer,
        batch_tokens: run.batch_tokens,
        wave: run.wave.max(1),
        docs: HashMap::new(),
        queue: VecDeque::new(),
        queued_rows: 0,
        in_flight: VecDeque::new(),
        tokens: 0,
        faults: run.faults,
        kept_rows: 0,
        kept_limit: kept_limit(scorer_depth, run.wave.max(1), run.batch_tokens),
        release: vec![],
    };
    let mut reading = true;
    loop {
        // A stop submits nothing more: the waves in flight are collected and the documents
        // they finish written; a document part-way through its passes is left for the rerun
        // (its later passes could outlast a preemption's grace).
        let stopping = super::stop::requested();
        if stopping && (reading || !d.docs.is_empty()) {
            summary.stopped = true;
        }
        reading &= !stopping;
        // Enough queued for a full wave, read and tokenised while the waves in flight run.
        while reading && d.queued_rows < d.wave * d.batch_tokens && d.kept_rows < d.kept_limit {
            let Some(item) = reader.next() else {
                reading = false;
                break;
            };
            let doc = item?;
            crate::liveness::advanced();
            match doc.result {
                Err(msg) => order.push_done(failed(&doc.id, &doc.input_hash, &msg)),
                Ok(ready) => d.start(ready, &end, opts.top_k, opts.exhaustive, &mut order),
            }
            write_ready(&mut order, &mut writer, &mut summary, &mut progress, &run.faults)?;
        }
        if !stopping && !d.queue.is_empty() && d.in_flight.len() < d.depth {
            d.submit()?;
        } else if !d.in_flight.is_empty() {
            d.collect(&mut order, &mut progress)?;
            write_ready(&mut order, &mut writer, &mut summary, &mut progress, &run.faults)?;
        } else if !reading {
            break;
        }
    }
    write_ready(&mut order, &mut writer, &mut summary, &mut progress, &run.faults)?;
    summary.tokens = d.tokens;
    end_run(run, writer, progress, summary, start, lock)
}

/// A document that failed before the model, with the extract fields an extract file holds.
fn failed(id: &str, input_hash: &str, msg: &str) -> DocResult {
    DocResult { extract: Some(ExtractDoc::default()), ..DocResult::failed(id, input_hash, msg) }
}
