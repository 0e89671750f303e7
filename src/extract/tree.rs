//! One pass of a document as a token tree, and its packing into micro-batches.
//!
//! A pass is the prompt and branches: a branch is a chain of rows after the prompt (a
//! candidate's continuation but its last id, as a choice's) and the targets scored on it,
//! at the prompt's last row or at one of the branch's rows. Candidates whose rows are a
//! prefix of another's share its branch and add only their targets (search.rs), so one
//! start's spans ("The", "The cat", "The cat sat") cost the rows of the longest.
//!
//! A document's first pass sends its prompt and every rank keeps the prompt's keys and values;
//! its later passes send only their new branch rows, which every rank keeps too, and which
//! attend to the kept prompt and to the kept rows of their branch's path (token_tree::Prefix,
//! model::PromptStore). A document's kept rows: its prompt's P, then its tree rows in the
//! order they were sent.

use crate::token_tree::{AttnSpan, MicroBatch, Prefix, ScoredRow};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TreeError {
    #[error("document {doc}: a target after the prompt's last row in a pass whose prompt is kept, not sent (its logits are not computed again)")]
    PromptTarget { doc: usize },
    #[error("document {doc}: a kept slot's branches are not consecutive tree rows (row {got}, expected {want})")]
    RowOrder { doc: usize, got: u32, want: u32 },
}

/// A log-prob wanted: of `id` after the prompt (`at` None) or after row `at` of its branch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub at: Option<u32>,
    pub id: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Branch {
    /// Its path: the rows before its new ones, run by earlier passes, as (tree row: index among
    /// the document's tree rows in sending order, input id), at positions P, P+1, ...:
    /// attended where they are kept, run again before `rows` where the prompt is sent.
    pub path: Vec<(u32, u32)>,
    /// Input ids of its new rows, at positions P + path.len(), ... after a prompt of P tokens.
    pub rows: Vec<u32>,
    /// The tree row of its first new row.
    pub first_row: u32,
    pub targets: Vec<Target>,
}

impl Branch {
    /// Rows it sends: its new rows, and its path too where the prompt is sent (not kept).
    pub fn sent_rows(&self, kept: bool) -> usize {
        self.rows.len() + if kept { 0 } else { self.path.len() }
    }
}

/// A document's pass: its log-probs come back in branch order, each branch's in target order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Work {
    pub branches: Vec<Branch>,
}

impl Work {
    /// New rows beyond the prompt.
    pub fn tree_rows(&self) -> usize {
        self.branches.iter().map(|b| b.rows.len()).sum()
    }

    pub fn targets(&self) -> usize {
        self.branches.iter().map(|b| b.targets.len()).sum()
    }

    /// Deepest position any row or target needs, plus one, after a prompt of `prompt` tokens.
    pub fn context_len(&self, prompt: usize) -> usize {
        prompt + self.branches.iter().map(|b| b.path.len() + b.rows.len()).max().unwrap_or(0)
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
        let kept = prompt == 0;
        let mut out = vec![];
        let (mut cur, mut rows) = (vec![], prompt);
        for b in self.branches {
            if !cur.is_empty() && rows + b.sent_rows(kept) > budget {
                out.push(std::mem::take(&mut cur));
                rows = prompt;
            }
            rows += b.sent_rows(kept);
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
    /// The document's prompt and earlier tree rows are kept on every rank: only the branches'
    /// new rows are sent (and kept in turn).
    pub kept: bool,
    pub branches: &'a [Branch],
}

impl Slot<'_> {
    /// Rows the slot sends.
    pub fn rows(&self) -> usize {
        let prompt = if self.kept { 0 } else { self.prompt.len() };
        prompt + self.branches.iter().map(|b| b.sent_rows(self.kept)).sum::<usize>()
    }
}

/// Appends `a..b` to runs, joining it to the last run where they touch.
fn push_run(runs: &mut Vec<(u32, u32)>, a: u32, b: u32) {
    match runs.last_mut() {
        Some(last) if last.1 == a => last.1 = b,
        _ => runs.push((a, b)),
    }
}

/// The micro-batch of `slots`: each its prompt (sent and kept, or kept), then its branches,
/// every branch attending to its prompt, its path and its own earlier rows; `scored` in slot,
/// branch, target order. Keys are the kept slots' kept rows they attend (K rows, slot order:
/// each its prompt, then its branches' paths), then the batch's rows.
pub fn build(slots: &[Slot]) -> Result<MicroBatch, TreeError> {
    let kept_rows: u32 = slots.iter().filter(|s| s.kept).map(|s| (s.prompt.len() + s.branches.iter().map(|b| b.path.len()).sum::<usize>()) as u32).sum();
    let mut b = MicroBatch::default();
    let mut next_kept = 0; // key row of the next kept row attended
    for (d, slot) in slots.iter().enumerate() {
        let p = slot.prompt.len() as u32;
        let slot_start = b.tokens.len() as u32;
        // The prompt's key rows, and its last row in the batch when it is sent.
        let (shared_start, shared_end, last_prompt_row) = if slot.kept {
            next_kept += p;
            (next_kept - p, next_kept, None)
        } else {
            for (i, &t) in slot.prompt.iter().enumerate() {
                b.tokens.push(t);
                b.positions.push(i as u32);
                b.spans.push(AttnSpan::causal(kept_rows + slot_start));
            }
            let end = b.tokens.len() as u32;
            (kept_rows + slot_start, kept_rows + end, end.checked_sub(1))
        };
        let mut attend = vec![];
        if slot.kept {
            push_run(&mut attend, 0, p);
        }
        let mut next_row = slot.branches.first().map_or(0, |f| f.first_row);
        for (c, branch) in slot.branches.iter().enumerate() {
            // A kept slot's new rows are kept in turn, as the tree rows the search numbered them.
            if slot.kept && branch.first_row != next_row {
                return Err(TreeError::RowOrder { doc: slot.doc, got: branch.first_row, want: next_row });
            }
            next_row += branch.rows.len() as u32;
            let own_start = b.tokens.len() as u32;
            // A kept path is attended in the kept rows; with a sent prompt the branch runs its
            // path again as its first rows.
            let (path, rerun): ((u32, u32), &[(u32, u32)]) = if slot.kept {
                let start = next_kept;
                for &(row, _) in &branch.path {
                    push_run(&mut attend, p + row, p + row + 1);
                }
                next_kept += branch.path.len() as u32;
                ((start, next_kept), &[])
            } else {
                let own = kept_rows + own_start;
                ((own, own), &branch.path)
            };
            let first_position = p + (branch.path.len() - rerun.len()) as u32;
            for (j, t) in rerun.iter().map(|&(_, id)| id).chain(branch.rows.iter().copied()).enumerate() {
                b.tokens.push(t);
                b.positions.push(first_position + j as u32);
                b.spans.push(AttnSpan::new(shared_start, shared_end, kept_rows + own_start).with_path(path.0, path.1));
            }
            for t in &branch.targets {
                let row = match t.at {
                    Some(j) => own_start + rerun.len() as u32 + j,
                    None => last_prompt_row.ok_or(TreeError::PromptTarget { doc: slot.doc })?,
                };
                b.scored.push(ScoredRow { row, target: t.id, doc: d as u32, choice: c as u32 });
            }
        }
        // What every rank keeps: the prompt where it is sent (the first pass), else the new
        // rows, after the document's tree rows sent before them.
        let (end, at) = match slot.kept {
            true => (b.tokens.len() as u32, p + slot.branches.first().map_or(0, |f| f.first_row)),
            false => (slot_start + p, 0),
        };
        b.prefix.push(Prefix::Kept { attend, start: slot_start, end, at });
        b.docs.push(slot.doc);
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token_tree::TokenizedDoc;

    fn branch(rows: &[u32], targets: &[(Option<u32>, u32)]) -> Branch {
        Branch { rows: rows.to_vec(), targets: targets.iter().map(|&(at, id)| Target { at, id }).collect(), ..Branch::default() }
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
        assert_eq!(b.prefix, [Prefix::Kept { attend: vec![], start: 0, end: 3, at: 0 }]);
    }

    #[test]
    fn a_later_pass_sends_no_prompt_rows() {
        // Doc 7's prompt is kept (3 rows), doc 8's is sent: only doc 7's branch rows and doc 8's
        // prompt and branch go; keys are [doc 7's prompt; the batch's rows].
        let (p7, p8) = ([1, 2, 3], [4, 5]);
        let (b7, b8) = ([branch(&[6, 7], &[(Some(1), 9)])], [branch(&[8], &[(None, 8), (Some(0), 1)])]);
        let slots = [Slot { doc: 7, prompt: &p7, kept: true, branches: &b7 }, Slot { doc: 8, prompt: &p8, kept: false, branches: &b8 }];
        assert_eq!(slots.iter().map(Slot::rows).collect::<Vec<_>>(), [2, 3]);
        let b = build(&slots).unwrap();
        assert_eq!(b.tokens, [6, 7, 4, 5, 8]);
        assert_eq!(b.positions, [3, 4, 0, 1, 2]);
        // Doc 7 attends its kept prompt and keeps its branch's rows after it; doc 8 keeps its prompt.
        assert_eq!(b.prefix, [Prefix::Kept { attend: vec![(0, 3)], start: 0, end: 2, at: 3 }, Prefix::Kept { attend: vec![], start: 2, end: 4, at: 0 }]);
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
    fn a_branch_attends_its_kept_path_or_runs_it_again() {
        // Doc 7's kept rows: its prompt (0..3), then tree rows 0..4 (kept rows 3..7). Branch a's
        // path is tree rows 1 and 3, branch b's tree row 0; their new rows are tree rows 4..6.
        let p = [1, 2, 3];
        let a = Branch { path: vec![(1, 11), (3, 13)], rows: vec![20], first_row: 4, targets: vec![Target { at: Some(0), id: 30 }] };
        let bb = Branch { path: vec![(0, 10)], rows: vec![21], first_row: 5, targets: vec![Target { at: Some(0), id: 31 }] };
        let br = [a, bb];
        let b = build(&[Slot { doc: 7, prompt: &p, kept: true, branches: &br }]).unwrap();
        assert_eq!((&b.tokens, &b.positions), (&vec![20, 21], &vec![5, 4]));
        // Keys: the prompt 0..3, a's path 3..5, b's path 5..6, then the batch's rows 6.. .
        assert_eq!(b.prefix, [Prefix::Kept { attend: vec![(0, 3), (4, 5), (6, 7), (3, 4)], start: 0, end: 2, at: 7 }]);
        assert_eq!(b.kept_rows(), 6);
        let sees = |t: usize| (0..8).filter(|&k| b.spans[t].attends(6 + t as u32, k)).collect::<Vec<_>>();
        assert_eq!((sees(0), sees(1)), (vec![0, 1, 2, 3, 4, 6], vec![0, 1, 2, 5, 7]));
        // Sent with its prompt, a branch runs its path again before its new rows.
        let b = build(&[Slot { doc: 7, prompt: &p, kept: false, branches: &br[..1] }]).unwrap();
        assert_eq!((&b.tokens, &b.positions), (&vec![1, 2, 3, 11, 13, 20], &vec![0, 1, 2, 3, 4, 5]));
        assert_eq!(b.scored[0].row, 5);
        // A kept slot's branches must be the consecutive tree rows the ranks keep them as.
        let gap = [br[1].clone(), br[0].clone()];
        assert_eq!(build(&[Slot { doc: 7, prompt: &p, kept: true, branches: &gap }]).unwrap_err(), TreeError::RowOrder { doc: 7, got: 4, want: 6 });
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
