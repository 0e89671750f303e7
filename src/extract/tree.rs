//! One pass of a document as a token tree, and its packing into micro-batches.
//!
//! A pass is the prompt and branches: a branch is a chain of rows after the prompt (a
//! candidate's continuation but its last id, as a choice's) and the targets scored on it,
//! at the prompt's last row or at one of the branch's rows. Candidates whose rows are a
//! prefix of another's share its branch and add only their targets (search.rs), so one
//! start's spans ("The", "The cat", "The cat sat") cost the rows of the longest.
//!
//! A document's first pass sends its prompt and every rank keeps the prompt's keys and values;
//! its later passes send only their branch rows, which attend to the kept prompt
//! (token_tree::Prefix, model::PromptStore).

use crate::token_tree::{AttnSpan, MicroBatch, Prefix, ScoredRow};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TreeError {
    #[error("document {doc}: a target after the prompt's last row in a pass whose prompt is kept, not sent (its logits are not computed again)")]
    PromptTarget { doc: usize },
}

/// A log-prob wanted: of `id` after the prompt (`at` None) or after row `at` of its branch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub at: Option<u32>,
    pub id: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Branch {
    /// Input ids of its rows, at positions P, P+1, ... after a prompt of P tokens.
    pub rows: Vec<u32>,
    pub targets: Vec<Target>,
}

/// A document's pass: its log-probs come back in branch order, each branch's in target order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Work {
    pub branches: Vec<Branch>,
}

impl Work {
    /// Rows beyond the prompt.
    pub fn tree_rows(&self) -> usize {
        self.branches.iter().map(|b| b.rows.len()).sum()
    }

    pub fn targets(&self) -> usize {
        self.branches.iter().map(|b| b.targets.len()).sum()
    }

    /// Deepest position any row or target needs, plus one, after a prompt of `prompt` tokens.
    pub fn context_len(&self, prompt: usize) -> usize {
        prompt + self.branches.iter().map(|b| b.rows.len()).max().unwrap_or(0)
    }

    /// Whether a target is scored at the prompt's last row, which only a pass sending the
    /// prompt computes.
    pub fn targets_prompt(&self) -> bool {
        self.branches.iter().any(|b| b.targets.iter().any(|t| t.at.is_none()))
    }

    /// The pass cut into pieces of whole branches, each to run with `prompt` rows (the whole
    /// prompt, or 0 when it is kept), of at most `budget` rows (at least twice the prompt, as
    /// `corpus::split_choices` does: a prompt longer than the budget is computed at most
    /// twice per tree row, never once per branch). A single branch over the budget is a
    /// piece alone.
    pub fn pieces(self, prompt: usize, budget: usize) -> Vec<Vec<Branch>> {
        let budget = budget.max(2 * prompt);
        let mut out = vec![];
        let (mut cur, mut rows) = (vec![], prompt);
        for b in self.branches {
            if !cur.is_empty() && rows + b.rows.len() > budget {
                out.push(std::mem::take(&mut cur));
                rows = prompt;
            }
            rows += b.rows.len();
            cur.push(b);
        }
        if !cur.is_empty() || out.is_empty() {
            out.push(cur);
        }
        out
    }
}

/// One micro-batch's share of a document: some branches of one pass, and its prompt, sent
/// (and kept) or kept from an earlier pass.
pub struct Slot<'a> {
    /// Corpus index of the document.
    pub doc: usize,
    pub prompt: &'a [u32],
    /// The prompt's keys and values are kept on every rank: only the branch rows are sent.
    pub kept: bool,
    pub branches: &'a [Branch],
}

impl Slot<'_> {
    /// Rows the slot sends.
    pub fn rows(&self) -> usize {
        let prompt = if self.kept { 0 } else { self.prompt.len() };
        prompt + self.branches.iter().map(|b| b.rows.len()).sum::<usize>()
    }
}

/// The micro-batch of `slots`: each its prompt (sent and kept, or kept), then its branches,
/// every branch attending to its prompt and its own earlier rows; `scored` in slot, branch,
/// target order. Keys are the kept slots' prompts (K rows, slot order), then the batch's rows.
pub fn build(slots: &[Slot]) -> Result<MicroBatch, TreeError> {
    let kept_rows: u32 = slots.iter().filter(|s| s.kept).map(|s| s.prompt.len() as u32).sum();
    let mut b = MicroBatch::default();
    let mut next_kept = 0; // key row of the next kept prompt
    for (d, slot) in slots.iter().enumerate() {
        let p = slot.prompt.len() as u32;
        // The prompt's key rows, and its last row in the batch when it is sent.
        let (shared_start, shared_end, last_prompt_row) = if slot.kept {
            b.prefix.push(Prefix::Kept { len: p });
            next_kept += p;
            (next_kept - p, next_kept, None)
        } else {
            let start = b.tokens.len() as u32;
            for (i, &t) in slot.prompt.iter().enumerate() {
                b.tokens.push(t);
                b.positions.push(i as u32);
                b.spans.push(AttnSpan::causal(kept_rows + start));
            }
            let end = b.tokens.len() as u32;
            b.prefix.push(Prefix::Keep { start, end });
            (kept_rows + start, kept_rows + end, end.checked_sub(1))
        };
        for (c, branch) in slot.branches.iter().enumerate() {
            let own_start = b.tokens.len() as u32;
            for (j, &t) in branch.rows.iter().enumerate() {
                b.tokens.push(t);
                b.positions.push(p + j as u32);
                b.spans.push(AttnSpan { shared_start, shared_end, own_start: kept_rows + own_start });
            }
            for t in &branch.targets {
                let row = match t.at {
                    Some(j) => own_start + j,
                    None => last_prompt_row.ok_or(TreeError::PromptTarget { doc: slot.doc })?,
                };
                b.scored.push(ScoredRow { row, target: t.id, doc: d as u32, choice: c as u32 });
            }
        }
        b.docs.push(slot.doc);
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token_tree::TokenizedDoc;

    fn branch(rows: &[u32], targets: &[(Option<u32>, u32)]) -> Branch {
        Branch { rows: rows.to_vec(), targets: targets.iter().map(|&(at, id)| Target { at, id }).collect() }
    }

    #[test]
    fn a_chain_is_a_choice_with_extra_targets() {
        // The chain [4, 5] scores 5 after 4 and 6 after 5 (the choice [4, 5, 6]) and the
        // end 9 after 4 (the shorter candidate [4] + end) with no row more.
        let prompt = [1, 2, 3];
        let br = [branch(&[4, 5], &[(None, 4), (Some(0), 5), (Some(1), 6), (Some(0), 9)])];
        let b = build(&[Slot { doc: 7, prompt: &prompt, kept: false, branches: &br }]).unwrap();
        let choice = MicroBatch::build(&[TokenizedDoc { index: 7, id: "a".into(), prompt: prompt.to_vec(), choices: vec![vec![4, 5, 6]] }]);
        assert_eq!((&b.tokens, &b.positions, &b.spans), (&choice.tokens, &choice.positions, &choice.spans));
        let s: Vec<(u32, u32)> = b.scored.iter().map(|s| (s.row, s.target)).collect();
        assert_eq!(s, [(2, 4), (3, 5), (4, 6), (3, 9)]);
        assert_eq!(b.docs, [7]);
        assert_eq!(b.prefix, [Prefix::Keep { start: 0, end: 3 }]);
    }

    #[test]
    fn a_later_pass_sends_no_prompt_rows() {
        // Doc 7's prompt is kept (3 key rows), doc 8's is sent: only doc 7's branch rows and
        // doc 8's prompt and branch go; keys are [doc 7's prompt; the batch's rows].
        let (p7, p8) = ([1, 2, 3], [4, 5]);
        let (b7, b8) = ([branch(&[6, 7], &[(Some(1), 9)])], [branch(&[8], &[(None, 8), (Some(0), 1)])]);
        let slots = [Slot { doc: 7, prompt: &p7, kept: true, branches: &b7 }, Slot { doc: 8, prompt: &p8, kept: false, branches: &b8 }];
        assert_eq!(slots.iter().map(Slot::rows).collect::<Vec<_>>(), [2, 3]);
        let b = build(&slots).unwrap();
        assert_eq!(b.tokens, [6, 7, 4, 5, 8]);
        assert_eq!(b.positions, [3, 4, 0, 1, 2]);
        assert_eq!(b.prefix, [Prefix::Kept { len: 3 }, Prefix::Keep { start: 2, end: 4 }]);
        assert_eq!(b.kept_rows(), 3);
        // Row t is key 3 + t: doc 7's rows see keys 0..3 and their own, doc 8's its own rows.
        let sees = |t: usize| (0..8).filter(|&k| b.spans[t].attends(3 + t as u32, k)).collect::<Vec<_>>();
        assert_eq!((sees(0), sees(1)), (vec![0, 1, 2, 3], vec![0, 1, 2, 3, 4]));
        assert_eq!((sees(3), sees(4)), (vec![5, 6], vec![5, 6, 7]));
        let s: Vec<(u32, u32, u32)> = b.scored.iter().map(|s| (s.row, s.target, s.doc)).collect();
        assert_eq!(s, [(1, 9, 0), (3, 8, 1), (4, 1, 1)]);
        assert_eq!(b.docs, [7, 8]);
        // A target at the last prompt row cannot be scored when the prompt is not sent.
        let at_prompt = [branch(&[], &[(None, 2)])];
        assert_eq!(build(&[Slot { doc: 7, prompt: &p7, kept: true, branches: &at_prompt }]).unwrap_err(), TreeError::PromptTarget { doc: 7 });
    }

    #[test]
    fn pieces_keep_branch_order_within_the_budget() {
        let w = Work { branches: (0..5).map(|i| branch(&vec![i; 3], &[(Some(0), 1)])).collect() };
        let p = w.clone().pieces(2, 8);
        assert_eq!(p.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 1]);
        assert_eq!(p.concat(), w.branches);
        assert_eq!(Work { branches: vec![branch(&[], &[(None, 3)])] }.pieces(50, 8).len(), 1);
        // A kept prompt costs no rows: the budget holds branches alone.
        assert_eq!(w.pieces(0, 6).iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 1]);
    }
}
