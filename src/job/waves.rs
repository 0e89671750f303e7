//! Waves submitted to the scorer and not yet collected, with their documents, and the
//! documents' choice scores once a wave's log-probs come back.
//!
//! Two things keep finished documents reaching the file promptly. Waves ramp up: the first
//! is one micro-batch, each next one twice the last, up to the full wave; results are
//! collected only when `depth` waves are in flight, so full waves from the start (8
//! micro-batches per wave on two ranks) left a short run writing nothing until its end, and an
//! interrupted one keeping nothing. And a document cut into pieces (pack::split_choices) has
//! its pieces' scores merged here, its result made once its last piece is back.

use super::fault::Faults;
use super::in_order::InOrder;
use super::progress::Progress;
use super::JobError;
use crate::corpus::{build_batch, split_choices, ReadyDoc};
use crate::results::DocResult;
use crate::runner::BatchScorer;
use crate::score::{score_document, Norm};
use crate::token_tree::MicroBatch;
use std::collections::{HashMap, VecDeque};

/// Per document of a batch, per choice, the token log-probs of its scored rows.
fn doc_logprobs(batch: &MicroBatch, docs: &[ReadyDoc], logprobs: &[f64]) -> Vec<Vec<Vec<f64>>> {
    let mut per_doc: Vec<Vec<Vec<f64>>> = docs.iter().map(|d| vec![vec![]; d.doc.choices.len()]).collect();
    for (s, lp) in batch.scored.iter().zip(logprobs) {
        per_doc[s.doc as usize][s.choice as usize].push(*lp);
    }
    per_doc
}

fn doc_result(d: &ReadyDoc, lps: &[Vec<f64>], norm: Norm) -> DocResult {
    let scores = score_document(lps, &d.choice_chars, norm);
    DocResult::scored(d, &scores).unwrap_or_else(|e| DocResult::failed(&d.doc.id, &d.input_hash, &e.to_string()))
}

/// A document cut into pieces: the whole of it, and its choices' log-probs so far (pieces
/// come back in choice order, since waves are collected in order).
struct Pieces {
    whole: ReadyDoc,
    logprobs: Vec<Vec<f64>>,
}

/// Waves on the scorer, oldest first: (documents per micro-batch, the micro-batches).
pub(super) struct Waves<'s, S: BatchScorer + ?Sized> {
    scorer: &'s mut S,
    depth: usize,
    in_flight: VecDeque<(Vec<Vec<ReadyDoc>>, Vec<MicroBatch>)>,
    norm: Norm,
    faults: Faults,
    /// Waves submitted so far (the ramp's step).
    submitted: u32,
    /// Documents cut into pieces, by corpus index, until their last piece is back.
    pieces: HashMap<usize, Pieces>,
    /// Rows (tokens) of the waves collected so far.
    pub tokens: usize,
}

impl<'s, S: BatchScorer + ?Sized> Waves<'s, S>
where
    JobError: From<S::Error>,
{
    pub fn new(scorer: &'s mut S, norm: Norm, faults: Faults) -> Self {
        Waves { depth: scorer.depth().max(1), scorer, in_flight: VecDeque::new(), norm, faults, submitted: 0, pieces: HashMap::new(), tokens: 0 }
    }

    /// What goes to the packer for `doc`: itself, or its pieces when it has more rows than
    /// `batch_tokens` (remembered here, to merge their scores).
    pub fn pieces(&mut self, doc: ReadyDoc, batch_tokens: usize) -> Vec<ReadyDoc> {
        match split_choices(&doc, batch_tokens) {
            None => vec![doc],
            Some(pieces) => {
                self.pieces.insert(doc.doc.index, Pieces { whole: doc, logprobs: vec![] });
                pieces
            }
        }
    }

    /// Micro-batches the next wave takes: 1, 2, 4, ... up to `full`.
    fn next_size(&self, full: usize) -> usize {
        full.max(1).min(1usize << self.submitted.min(20))
    }

    /// Submit waves from the front of `pending` while a whole next wave is there; with
    /// `all`, the rest too (the end of the corpus).
    pub fn submit_ready(&mut self, pending: &mut Vec<Vec<ReadyDoc>>, full: usize, all: bool, order: &mut InOrder, progress: &mut Progress) -> Result<(), JobError> {
        while !pending.is_empty() && (all || pending.len() >= self.next_size(full)) {
            let n = self.next_size(full).min(pending.len());
            let wave: Vec<Vec<ReadyDoc>> = pending.drain(..n).collect();
            self.submit(wave, order, progress)?;
        }
        Ok(())
    }

    /// Submit a wave of micro-batches (documents per micro-batch), first collecting the oldest
    /// when `depth` waves are already in flight.
    fn submit(&mut self, wave: Vec<Vec<ReadyDoc>>, order: &mut InOrder, progress: &mut Progress) -> Result<(), JobError> {
        if self.in_flight.len() >= self.depth {
            self.collect(order, progress)?;
        }
        let batches: Vec<MicroBatch> = wave.iter().map(|docs| build_batch(docs.iter())).collect();
        self.scorer.submit(&batches)?;
        self.in_flight.push_back((wave, batches));
        self.submitted += 1;
        Ok(())
    }

    /// Collect the oldest wave into `order`; false when none was in flight.
    pub fn collect(&mut self, order: &mut InOrder, progress: &mut Progress) -> Result<bool, JobError> {
        let Some((wave, batches)) = self.in_flight.pop_front() else { return Ok(false) };
        self.faults.hold_wave();
        let logprobs = self.scorer.collect()?;
        for ((docs, batch), lps) in wave.iter().zip(&batches).zip(&logprobs) {
            self.tokens += batch.rows();
            progress.tokens(batch.rows());
            for (d, lps) in docs.iter().zip(doc_logprobs(batch, docs, lps)) {
                let index = d.doc.index;
                match self.pieces.get_mut(&index) {
                    None => order.finish(index as u64, doc_result(d, &lps, self.norm)),
                    Some(p) => {
                        p.logprobs.extend(lps);
                        if p.logprobs.len() >= p.whole.choices.len() {
                            if let Some(p) = self.pieces.remove(&index) {
                                order.finish(index as u64, doc_result(&p.whole, &p.logprobs, self.norm));
                            }
                        }
                    }
                }
            }
        }
        Ok(true)
    }
}
