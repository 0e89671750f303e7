//! A micro-batch as a packed token tree: its rows, attention spans and scored rows
//! (docs/DESIGN.md, "Scoring semantics").
//!
//! Several documents share one sequence of T rows with no padding. A document is its
//! prompt followed by each choice's tokens except the last (the last token is only ever
//! a target). A prompt token attends to the earlier tokens of its prompt; a choice token
//! attends to the whole prompt and to the earlier tokens of its own choice. Positions
//! continue from the prompt in every choice. The LM head runs only at `scored` rows.

use serde::{Deserialize, Serialize};

/// Which key rows a query row attends: `[shared_start, shared_end) ∪ [path_start, path_end) ∪
/// [own_start, row]`. The path interval is extract's: a branch's earlier rows, kept from the
/// passes that computed them (empty elsewhere).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttnSpan {
    pub shared_start: u32,
    pub shared_end: u32,
    pub path_start: u32,
    pub path_end: u32,
    pub own_start: u32,
}

impl AttnSpan {
    /// A shared interval and the row's own from `own_start`, no path.
    pub fn new(shared_start: u32, shared_end: u32, own_start: u32) -> AttnSpan {
        AttnSpan { shared_start, shared_end, path_start: own_start, path_end: own_start, own_start }
    }

    /// Plain causal attention over `[start, row]`.
    pub fn causal(start: u32) -> AttnSpan {
        AttnSpan::new(start, start, start)
    }

    /// With the kept path `[start, end)` too.
    pub fn with_path(self, start: u32, end: u32) -> AttnSpan {
        AttnSpan { path_start: start, path_end: end, ..self }
    }

    pub fn attends(&self, row: u32, key: u32) -> bool {
        (key >= self.shared_start && key < self.shared_end) || (key >= self.path_start && key < self.path_end) || (key >= self.own_start && key <= row)
    }

    /// The first key the row attends (every row attends its own key).
    pub fn first_key(&self) -> u32 {
        let mut first = self.own_start;
        if self.shared_end > self.shared_start {
            first = first.min(self.shared_start);
        }
        if self.path_end > self.path_start {
            first = first.min(self.path_start);
        }
        first
    }
}

/// One document's tokens, ready for packing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenizedDoc {
    /// Index of the document in the corpus (input order).
    pub index: usize,
    pub id: String,
    /// (P,) prompt token ids, P >= 1.
    pub prompt: Vec<u32>,
    /// Per choice, its continuation ids (each non-empty).
    pub choices: Vec<Vec<u32>>,
}

impl TokenizedDoc {
    /// Rows this document takes in a micro-batch.
    pub fn rows(&self) -> usize {
        self.prompt.len() + self.choices.iter().map(|c| c.len() - 1).sum::<usize>()
    }

    /// The document with its prompt and no choices (to be given some of its choices).
    pub fn clone_without_choices(&self) -> TokenizedDoc {
        TokenizedDoc { index: self.index, id: self.id.clone(), prompt: self.prompt.clone(), choices: vec![] }
    }

    /// Highest position any of its tokens gets, plus one: what must fit the context.
    pub fn context_len(&self) -> usize {
        self.prompt.len() + self.choices.iter().map(|c| c.len()).max().unwrap_or(0)
    }
}

/// A row whose next-token log-prob is needed: log p(target | row's context).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScoredRow {
    pub row: u32,
    pub target: u32,
    /// Index into `MicroBatch::docs`.
    pub doc: u32,
    pub choice: u32,
}

/// How a document slot's earlier rows reach its rows' attention: extract keeps, on every rank,
/// the keys and values (after rope) of a document's prompt and of its branch rows, so each
/// later pass sends only its new rows (model::PromptStore).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Prefix {
    /// Nothing is kept (score, generation).
    #[default]
    Sent,
    /// Every layer keeps the keys and values of the slot's batch rows [start, end) as the
    /// document's kept rows from `at` on (the first pass: its prompt at 0), until a batch's
    /// `release` names the document; and its kept rows of `attend` (runs [a, b), in order) come
    /// before the batch's own keys, after those of the earlier slots (`MicroBatch::kept_rows`).
    Kept { attend: Vec<(u32, u32)>, start: u32, end: u32, at: u32 },
}

impl Prefix {
    /// Kept key rows it puts before the batch's own.
    pub fn attended(&self) -> usize {
        match self {
            Prefix::Sent => 0,
            Prefix::Kept { attend, .. } => attend.iter().map(|&(a, b)| b.saturating_sub(a) as usize).sum(),
        }
    }
}

/// A packed micro-batch: T rows, S scored rows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MicroBatch {
    /// (T,) input token ids.
    pub tokens: Vec<u32>,
    /// (T,) rotary positions.
    pub positions: Vec<u32>,
    /// (T,) attention spans over key rows: the kept prompts of the `Kept` slots (K rows, in
    /// slot order), then the batch's own rows (row t is key K + t).
    pub spans: Vec<AttnSpan>,
    /// (S,) scored rows, grouped by document then choice, in token order.
    pub scored: Vec<ScoredRow>,
    /// Corpus index of each document in the batch.
    pub docs: Vec<usize>,
    /// Per document slot, how its prompt is attended; empty: every prompt is `Sent`.
    #[serde(default)]
    pub prefix: Vec<Prefix>,
    /// Corpus indexes of documents whose kept prompts every rank frees before this batch runs.
    #[serde(default)]
    pub release: Vec<usize>,
}

impl MicroBatch {
    pub fn build(docs: &[TokenizedDoc]) -> MicroBatch {
        let mut b = MicroBatch::default();
        for (d, doc) in docs.iter().enumerate() {
            let start = b.tokens.len() as u32;
            for (p, &t) in doc.prompt.iter().enumerate() {
                b.tokens.push(t);
                b.positions.push(p as u32);
                b.spans.push(AttnSpan::causal(start));
            }
            let prompt_end = b.tokens.len() as u32;
            let last_prompt_row = prompt_end - 1;
            for (c, choice) in doc.choices.iter().enumerate() {
                let own_start = b.tokens.len() as u32;
                let mut prev_row = last_prompt_row;
                for (j, &t) in choice.iter().enumerate() {
                    b.scored.push(ScoredRow { row: prev_row, target: t, doc: d as u32, choice: c as u32 });
                    if j + 1 == choice.len() {
                        break; // the last token is only a target
                    }
                    prev_row = b.tokens.len() as u32;
                    b.tokens.push(t);
                    b.positions.push((doc.prompt.len() + j) as u32);
                    b.spans.push(AttnSpan::new(start, prompt_end, own_start));
                }
            }
            b.docs.push(doc.index);
        }
        b
    }

    pub fn rows(&self) -> usize {
        self.tokens.len()
    }

    /// K: kept key rows before the batch's own (the `key_offset` of its attention).
    pub fn kept_rows(&self) -> usize {
        self.prefix.iter().map(Prefix::attended).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_choice_tree() {
        let doc = TokenizedDoc { index: 7, id: "a".into(), prompt: vec![1, 2, 3], choices: vec![vec![4, 5], vec![6]] };
        let b = MicroBatch::build(&[doc.clone()]);
        assert_eq!(b.rows(), doc.rows());
        assert_eq!(b.tokens, vec![1, 2, 3, 4]);
        assert_eq!(b.positions, vec![0, 1, 2, 3]);
        assert!(b.spans[3].attends(3, 0) && b.spans[3].attends(3, 2) && b.spans[3].attends(3, 3));
        let s: Vec<(u32, u32, u32)> = b.scored.iter().map(|s| (s.row, s.target, s.choice)).collect();
        assert_eq!(s, vec![(2, 4, 0), (3, 5, 0), (2, 6, 1)]);
        assert_eq!(b.docs, vec![7]);
    }

    #[test]
    fn second_document_does_not_see_first() {
        let d = |i| TokenizedDoc { index: i, id: format!("{i}"), prompt: vec![1, 2], choices: vec![vec![3, 4], vec![5, 6]] };
        let b = MicroBatch::build(&[d(0), d(1)]);
        // doc 1 starts at row 4 (2 prompt + 1 + 1 choice rows)
        assert_eq!(b.positions, vec![0, 1, 2, 2, 0, 1, 2, 2]);
        for key in 0..4 {
            assert!(!b.spans[6].attends(6, key));
        }
        // a choice token never sees another choice's tokens
        assert!(!b.spans[3].attends(3, 2));
    }
}
