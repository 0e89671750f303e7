//! Waves submitted to the scorer and not yet collected, with their documents, and the
//! documents' choice scores once a wave's log-probs come back.

use super::in_order::InOrder;
use super::progress::Progress;
use super::JobError;
use crate::corpus::{build_batch, ReadyDoc};
use crate::results::DocResult;
use crate::runner::BatchScorer;
use crate::score::{score_document, Norm};
use crate::token_tree::MicroBatch;
use std::collections::VecDeque;

/// Per-choice token log-probs of every document of a batch, from its scored rows.
fn doc_scores(batch: &MicroBatch, docs: &[ReadyDoc], logprobs: &[f64], norm: Norm) -> Vec<DocResult> {
    let mut per_doc: Vec<Vec<Vec<f64>>> = docs.iter().map(|d| vec![vec![]; d.doc.choices.len()]).collect();
    for (s, lp) in batch.scored.iter().zip(logprobs) {
        per_doc[s.doc as usize][s.choice as usize].push(*lp);
    }
    docs.iter()
        .zip(per_doc)
        .map(|(d, lps)| {
            let scores = score_document(&lps, &d.choice_chars, norm);
            DocResult::scored(d, &scores).unwrap_or_else(|e| DocResult::failed(&d.doc.id, &d.input_hash, &e.to_string()))
        })
        .collect()
}

/// Waves on the scorer, oldest first: (documents per micro-batch, the micro-batches).
pub(super) struct Waves<'s, S: BatchScorer + ?Sized> {
    scorer: &'s mut S,
    depth: usize,
    in_flight: VecDeque<(Vec<Vec<ReadyDoc>>, Vec<MicroBatch>)>,
    norm: Norm,
    /// Rows (tokens) of the waves collected so far.
    pub tokens: usize,
}

impl<'s, S: BatchScorer + ?Sized> Waves<'s, S>
where
    JobError: From<S::Error>,
{
    pub fn new(scorer: &'s mut S, norm: Norm) -> Self {
        Waves { depth: scorer.depth().max(1), scorer, in_flight: VecDeque::new(), norm, tokens: 0 }
    }

    /// Submit a wave of micro-batches (documents per micro-batch), first collecting the oldest
    /// when `depth` waves are already in flight.
    pub fn submit(&mut self, wave: Vec<Vec<ReadyDoc>>, order: &mut InOrder, progress: &mut Progress) -> Result<(), JobError> {
        if self.in_flight.len() >= self.depth {
            self.collect(order, progress)?;
        }
        let batches: Vec<MicroBatch> = wave.iter().map(|docs| build_batch(docs.iter())).collect();
        self.scorer.submit(&batches)?;
        self.in_flight.push_back((wave, batches));
        Ok(())
    }

    /// Collect the oldest wave into `order`; false when none was in flight.
    pub fn collect(&mut self, order: &mut InOrder, progress: &mut Progress) -> Result<bool, JobError> {
        let Some((wave, batches)) = self.in_flight.pop_front() else { return Ok(false) };
        let logprobs = self.scorer.collect()?;
        for ((docs, batch), lps) in wave.iter().zip(&batches).zip(&logprobs) {
            self.tokens += batch.rows();
            progress.tokens(batch.rows());
            for (d, r) in docs.iter().zip(doc_scores(batch, docs, lps, self.norm)) {
                order.finish(d.doc.index as u64, r);
            }
        }
        Ok(true)
    }
}
