//! One pass of a document as a token tree, and its packing into micro-batches.
//!
//! A pass is the prompt and branches: a branch is a chain of rows after the prompt (a
//! candidate's continuation but its last id, as a choice's) and the targets scored on it,
//! at the prompt's last row or at one of the branch's rows. Candidates whose rows are a
//! prefix of another's share its branch and add only their targets (search.rs), so one
//! start's spans ("The", "The cat", "The cat sat") cost the rows of the longest.

use crate::token_tree::{AttnSpan, MicroBatch, ScoredRow};

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

    /// The pass cut into pieces of whole branches, each to run with the whole prompt, of at
    /// most `budget` rows (at least twice the prompt, as `corpus::split_choices` does: a
    /// prompt longer than the budget is computed at most twice per tree row, never once per
    /// branch). A single branch over the budget is a piece alone.
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

/// One micro-batch's share of a document: the prompt and some branches of one pass.
pub struct Slot<'a> {
    /// Corpus index of the document.
    pub doc: usize,
    pub prompt: &'a [u32],
    pub branches: &'a [Branch],
}

impl Slot<'_> {
    pub fn rows(&self) -> usize {
        self.prompt.len() + self.branches.iter().map(|b| b.rows.len()).sum::<usize>()
    }
}

/// The micro-batch of `slots`: each its prompt, then its branches, every branch attending
/// to its prompt and its own earlier rows; `scored` in slot, branch, target order.
pub fn build(slots: &[Slot]) -> MicroBatch {
    let mut b = MicroBatch { tokens: vec![], positions: vec![], spans: vec![], scored: vec![], docs: vec![] };
    for (d, slot) in slots.iter().enumerate() {
        let start = b.tokens.len() as u32;
        for (p, &t) in slot.prompt.iter().enumerate() {
            b.tokens.push(t);
            b.positions.push(p as u32);
            b.spans.push(AttnSpan::causal(start));
        }
        let prompt_end = b.tokens.len() as u32;
        for (c, branch) in slot.branches.iter().enumerate() {
            let own_start = b.tokens.len() as u32;
            for (j, &t) in branch.rows.iter().enumerate() {
                b.tokens.push(t);
                b.positions.push((slot.prompt.len() + j) as u32);
                b.spans.push(AttnSpan { shared_start: start, shared_end: prompt_end, own_start });
            }
            for t in &branch.targets {
                let row = t.at.map_or(prompt_end - 1, |j| own_start + j);
                b.scored.push(ScoredRow { row, target: t.id, doc: d as u32, choice: c as u32 });
            }
        }
        b.docs.push(slot.doc);
    }
    b
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
        let b = build(&[Slot { doc: 7, prompt: &prompt, branches: &br }]);
        let choice = MicroBatch::build(&[TokenizedDoc { index: 7, id: "a".into(), prompt: prompt.to_vec(), choices: vec![vec![4, 5, 6]] }]);
        assert_eq!((&b.tokens, &b.positions, &b.spans), (&choice.tokens, &choice.positions, &choice.spans));
        let s: Vec<(u32, u32)> = b.scored.iter().map(|s| (s.row, s.target)).collect();
        assert_eq!(s, [(2, 4), (3, 5), (4, 6), (3, 9)]);
        assert_eq!(b.docs, [7]);
    }

    #[test]
    fn pieces_keep_branch_order_within_the_budget() {
        let w = Work { branches: (0..5).map(|i| branch(&vec![i; 3], &[(Some(0), 1)])).collect() };
        let p = w.clone().pieces(2, 8);
        assert_eq!(p.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 1]);
        assert_eq!(p.concat(), w.branches);
        assert_eq!(Work { branches: vec![branch(&[], &[(None, 3)])] }.pieces(50, 8).len(), 1);
    }
}
