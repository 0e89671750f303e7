//! Grouping ready documents into micro-batches under a row budget.
//!
//! Greedy in input order, never reordering: results come out in corpus order and a
//! resumed run packs the remaining documents the same way a fresh run would. Sorting by
//! length would pack tighter, but the schedule's waves already hide uneven batches.

use super::{PreparedDoc, ReadyDoc};
use crate::token_tree::{MicroBatch, TokenizedDoc};

/// Streaming packer: push documents one by one, get a batch back whenever the next
/// document would not fit. Holds at most one batch of token ids.
#[derive(Debug)]
pub struct Batcher {
    budget: usize,
    pending: Vec<ReadyDoc>,
    rows: usize,
}

impl Batcher {
    /// `batch_tokens` is the most rows a micro-batch may have; a document bigger than
    /// that still runs, alone.
    pub fn new(batch_tokens: usize) -> Batcher {
        Batcher { budget: batch_tokens, pending: Vec::new(), rows: 0 }
    }

    /// Add a document; returns the batch it closed, if any.
    pub fn push(&mut self, doc: ReadyDoc) -> Option<Vec<ReadyDoc>> {
        let rows = doc.doc.rows();
        let closed = if !self.pending.is_empty() && self.rows + rows > self.budget { self.take() } else { None };
        self.rows += rows;
        self.pending.push(doc);
        closed
    }

    /// The last, partly filled batch.
    pub fn finish(&mut self) -> Option<Vec<ReadyDoc>> {
        self.take()
    }

    fn take(&mut self) -> Option<Vec<ReadyDoc>> {
        self.rows = 0;
        if self.pending.is_empty() {
            None
        } else {
            Some(std::mem::take(&mut self.pending))
        }
    }
}

/// A document with more rows than `budget` cut into pieces of whole choices, each with the
/// whole prompt, in choice order; None when it fits or has a single choice. A document's
/// attention costs the square of its rows, so a document of thousands of choices in one
/// micro-batch took minutes and gigabytes; in pieces its time is linear in its choices. The
/// scores of the pieces are merged into the document's before its `prob` (a softmax over all
/// its choices) is taken.
///
/// Each piece re-feeds the prompt, so a piece may have twice the prompt's rows whatever the
/// budget: a prompt longer than the budget is then computed at most twice per choice row it
/// carries, never once per choice, and a document up to twice its prompt is not cut at all.
/// A piece of one choice may still be over the budget (it runs alone, as a big document did).
pub fn split_choices(doc: &ReadyDoc, budget: usize) -> Option<Vec<ReadyDoc>> {
    let n = doc.doc.choices.len();
    let prompt = doc.doc.prompt.len();
    let budget = budget.max(2 * prompt);
    if n < 2 || doc.doc.rows() <= budget {
        return None;
    }
    let mut pieces = vec![];
    let (mut start, mut rows) = (0, prompt);
    for (c, choice) in doc.doc.choices.iter().enumerate() {
        let more = choice.len().saturating_sub(1);
        if c > start && rows + more > budget {
            pieces.push(piece(doc, start..c));
            (start, rows) = (c, prompt);
        }
        rows += more;
    }
    pieces.push(piece(doc, start..n));
    Some(pieces)
}

fn piece(doc: &ReadyDoc, choices: std::ops::Range<usize>) -> ReadyDoc {
    ReadyDoc {
        doc: TokenizedDoc { choices: doc.doc.choices[choices.clone()].to_vec(), ..doc.doc.clone_without_choices() },
        choices: doc.choices[choices.clone()].to_vec(),
        spans: doc.spans.get(choices.clone()).map(<[_]>::to_vec).unwrap_or_default(),
        choice_chars: doc.choice_chars[choices].to_vec(),
        n_prompt_tokens: doc.n_prompt_tokens,
        answer: None,
        input_hash: doc.input_hash.clone(),
    }
}

/// Group the ok documents of `docs` (failed ones are skipped) into micro-batches of at
/// most `batch_tokens` rows, in input order: the same batches the streaming Batcher makes.
pub fn pack(docs: &[PreparedDoc], batch_tokens: usize) -> Vec<Vec<ReadyDoc>> {
    let mut batcher = Batcher::new(batch_tokens);
    let mut batches: Vec<Vec<ReadyDoc>> =
        docs.iter().filter_map(|d| d.result.as_ref().ok()).filter_map(|d| batcher.push(d.clone())).collect();
    batches.extend(batcher.finish());
    batches
}

/// The token tree of a batch (MicroBatch::build wants owned TokenizedDocs).
pub fn build_batch<'a>(docs: impl IntoIterator<Item = &'a ReadyDoc>) -> MicroBatch {
    let docs: Vec<TokenizedDoc> = docs.into_iter().map(|d| d.doc.clone()).collect();
    MicroBatch::build(&docs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(index: usize, prompt: usize, choice_lens: &[usize]) -> ReadyDoc {
        let doc = TokenizedDoc {
            index,
            id: format!("d{index}"),
            prompt: vec![1; prompt],
            choices: choice_lens.iter().map(|&n| vec![2; n]).collect(),
        };
        ReadyDoc {
            choices: choice_lens.iter().map(|n| format!("c{n}")).collect(),
            choice_chars: choice_lens.to_vec(),
            n_prompt_tokens: prompt,
            answer: None,
            input_hash: String::new(),
            spans: vec![],
            doc,
        }
    }

    fn prepared(r: Result<ReadyDoc, String>, index: usize) -> PreparedDoc {
        PreparedDoc { index, line: index + 1, id: format!("d{index}"), input_hash: String::new(), result: r }
    }

    #[test]
    fn a_document_over_budget_is_cut_into_pieces_of_whole_choices() {
        // rows: prompt 4 + (3-1) + (2-1) + (5-1) + (1-1) + (3-1) = 13
        let doc = ready(9, 4, &[3, 2, 5, 1, 3]);
        assert_eq!(split_choices(&doc, 13), None, "it fits");
        assert_eq!(split_choices(&ready(9, 40, &[3]), 13), None, "a single choice is never cut");
        let pieces = split_choices(&doc, 8).unwrap();
        let lens: Vec<Vec<usize>> = pieces.iter().map(|p| p.doc.choices.iter().map(Vec::len).collect()).collect();
        assert_eq!(lens, vec![vec![3, 2], vec![5, 1], vec![3]]);
        assert!(pieces.iter().all(|p| p.doc.prompt == doc.doc.prompt && p.doc.index == 9 && p.doc.rows() <= 8));
        let chars: Vec<usize> = pieces.iter().flat_map(|p| p.choice_chars.clone()).collect();
        assert_eq!(chars, doc.choice_chars);
        // a prompt bigger than half the budget: pieces of twice the prompt's rows
        let long = ready(9, 5, &[4, 4, 4, 4, 4]);
        let lens: Vec<usize> = split_choices(&long, 3).unwrap().iter().map(|p| p.doc.choices.len()).collect();
        assert_eq!(lens, vec![1, 1, 1, 1, 1], "5 + 3 + 3 > 10: one choice each");
        let lens: Vec<usize> = split_choices(&ready(9, 5, &[2, 2, 2, 2, 2, 2, 2]), 3).unwrap().iter().map(|p| p.doc.choices.len()).collect();
        assert_eq!(lens, vec![5, 2], "pieces of 10 rows");
        assert_eq!(split_choices(&ready(9, 5, &[2, 2, 2, 2, 2]), 3), None, "10 rows: twice its prompt, not cut");
    }

    #[test]
    fn packs_in_order_under_budget() {
        // rows: 10+1+0 = 11, 5+2 = 7, 30 (over budget), 4
        let docs = vec![
            prepared(Ok(ready(0, 10, &[2, 1])), 0),
            prepared(Err("bad".into()), 1),
            prepared(Ok(ready(2, 5, &[3])), 2),
            prepared(Ok(ready(3, 30, &[1])), 3),
            prepared(Ok(ready(4, 4, &[1, 1])), 4),
        ];
        let batches = pack(&docs, 20);
        let ids: Vec<Vec<usize>> = batches.iter().map(|b| b.iter().map(|d| d.doc.index).collect()).collect();
        assert_eq!(ids, vec![vec![0, 2], vec![3], vec![4]]);
        let b = build_batch(batches[0].iter());
        assert_eq!(b.rows(), 18);
        assert_eq!(b.docs, vec![0, 2]);

        // the streaming packer makes the same batches
        let mut batcher = Batcher::new(20);
        let mut streamed = Vec::new();
        for d in docs.into_iter().filter_map(|d| d.result.ok()) {
            streamed.extend(batcher.push(d));
        }
        streamed.extend(batcher.finish());
        let ids2: Vec<Vec<usize>> = streamed.iter().map(|b| b.iter().map(|d| d.doc.index).collect()).collect();
        assert_eq!(ids, ids2);
    }
}
