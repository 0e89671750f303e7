//! The exact top-k search over one document's candidates, as a state machine the job feeds
//! with each pass's log-probs.
//!
//! The candidates' continuations (span ids, then end ids) form a trie (trie.rs): a node is a
//! prefix, its term log P(its last id | prompt, the ids before it), its prefix log-prob L
//! the sum of the terms from the first id, and a candidate's score is the L of its whole
//! continuation. Every term is a log-probability, at most 0, so L never grows down the trie:
//! a node's L bounds every candidate through it. A node's row (its last id run after the
//! prompt and its prefix) gives the terms of all its children at once.
//!   pass 1: the prompt, with each distinct first id as a target at its last row: the L of
//!           every first id (a bound for every candidate);
//!   then:   `kth` = the k-th best score known (-inf while fewer than k are), and the
//!           frontier = nodes whose L is known and >= kth but whose row is not (children
//!           unscored). Pass p expands the k·2^(p-2) frontier nodes of highest L (ties:
//!           the earlier node; few nodes while kth is low, doubling so that a flat trie
//!           still takes few passes): a branch whose path is the node's prefix (rows earlier
//!           passes ran, whose keys and values every rank keeps: tree.rs) and `depth` new
//!           rows down the longest candidate through it, every child of every new row a target
//!           (the ends of the shorter candidates on it included): a deep node, on a span
//!           already likely, is taken further (rows that may not be needed, against passes
//!           they save; measured best of depth + 0..2 and 1..4 rows on the sample corpus).
//!           No frontier node left: done.
//! A candidate never scored lies under a frontier node of L < kth, so its score is below k
//! scores already known: the top-k of the scored candidates is the top-k of all of them,
//! ties included (a node of L equal to kth is expanded). L is summed from the first id on,
//! each term added to its parent's L, and x + t <= x as computed for t <= 0 (the terms,
//! logit - logsumexp with the max taken out, are <= 0 as computed), so no score exceeds a
//! bound of its prefix even by rounding. A node's term is taken once, from the first pass
//! that scores it.

use super::trie::{Trie, ROOT};
use super::tree::{Branch, Target, Work};
use std::cmp::Ordering;
use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum SearchError {
    #[error("pass {pass}: {got} log-probs for {want} targets")]
    Count { pass: u32, got: usize, want: usize },
    #[error("the search is finished")]
    Finished,
}

/// One candidate of the top-k.
#[derive(Clone, Debug, PartialEq)]
pub struct Ranked {
    /// Index into the candidates given to [`Search::new`].
    pub candidate: usize,
    pub score: f64,
    pub span_logprob: f64,
}

pub enum Step {
    Run(Work),
    Done(Vec<Ranked>),
}

pub struct Search {
    trie: Trie,
    span_lens: Vec<usize>,
    k: usize,
    exhaustive: bool,
    /// Per node, its L once known.
    lp: Vec<Option<f64>>,
    /// The pending pass's targets, in order: the node each one scores.
    pending: Vec<usize>,
    /// Per node whose row has been sent (its children are scored by the pending pass or
    /// before): (its tree row, the pass that sent it). The root's row is the prompt's.
    row_of: Vec<Option<(u32, u32)>>,
    finished: bool,
    /// Passes sent so far.
    pub passes: u32,
    /// Rows beyond the prompt sent so far (its tree rows).
    pub tree_tokens: usize,
}

fn by_score_then_index(a: (f64, usize), b: (f64, usize)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

impl Search {
    /// The search over candidates of continuations `conts` (span ids ++ end ids, each at
    /// least two ids) whose first `span_lens` ids are the span; and its first pass. With
    /// `exhaustive`, pass 2 expands every node, each branch running to the end of the
    /// longest candidate through it (for testing that the pruning is exact).
    pub fn new(conts: Vec<Vec<u32>>, span_lens: Vec<usize>, k: usize, exhaustive: bool) -> (Search, Work) {
        let trie = Trie::new(&conts);
        let n = trie.len();
        let mut lp = vec![None; n];
        lp[ROOT] = Some(0.0);
        let pending = trie.children(ROOT).to_vec();
        let targets = pending.iter().map(|&c| Target { at: None, id: trie.id(c) }).collect();
        let row_of = vec![None; n];
        let s = Search { trie, span_lens, k, exhaustive, lp, pending, row_of, finished: false, passes: 1, tree_tokens: 0 };
        (s, Work { branches: vec![Branch { targets, ..Branch::default() }] })
    }

    /// Candidates of the document.
    pub fn candidates(&self) -> usize {
        self.span_lens.len()
    }

    /// The pending pass's log-probs, in its target order: the next pass, or the top-k.
    pub fn advance(&mut self, logprobs: &[f64]) -> Result<Step, SearchError> {
        if self.finished {
            return Err(SearchError::Finished);
        }
        if logprobs.len() != self.pending.len() {
            return Err(SearchError::Count { pass: self.passes, got: logprobs.len(), want: self.pending.len() });
        }
        // Targets come row by row down each branch, so a parent's L is set before its children's.
        for (&node, &term) in self.pending.iter().zip(logprobs) {
            let base = self.lp[self.trie.parent(node)].expect("a target's parent row is scored before it");
            self.lp[node] = Some(base + term);
        }
        self.pending.clear();
        let frontier = self.frontier();
        if frontier.is_empty() {
            self.finished = true;
            return Ok(Step::Done(self.top_k()));
        }
        self.passes += 1;
        let mut branches = vec![];
        for node in frontier {
            if !self.expanded(node) {
                branches.push(self.branch(node));
            }
        }
        Ok(Step::Run(Work { branches }))
    }

    /// The nodes the next pass expands, best L first; exhaustive: every node with children,
    /// parents first (a parent's branch scores the node before the node's own branch runs),
    /// all in pass 2.
    fn frontier(&self) -> Vec<usize> {
        if self.exhaustive {
            return (0..self.trie.len()).filter(|&n| !self.expanded(n) && !self.trie.children(n).is_empty()).collect();
        }
        let kth = self.kth();
        let mut open: Vec<(f64, usize)> = (0..self.trie.len())
            .filter(|&n| !self.expanded(n) && !self.trie.children(n).is_empty())
            .filter_map(|n| self.lp[n].filter(|&l| l >= kth).map(|l| (l, n)))
            .collect();
        open.sort_by(|&a, &b| by_score_then_index(a, b));
        open.truncate(self.k.saturating_mul(1 << (self.passes - 1).min(32)).max(1));
        open.into_iter().map(|(_, n)| n).collect()
    }

    /// Whether `node`'s row has been sent: the root's (the prompt's last row) always is.
    fn expanded(&self, node: usize) -> bool {
        node == ROOT || self.row_of[node].is_some()
    }

    /// The branch expanding `node`: its path (the node's ancestors, whose rows are all sent:
    /// nodes are expanded parents first), then new rows down the longest candidate through
    /// it, each with its children as targets. An ancestor whose row this pass sends too (the
    /// exhaustive search's) is not kept yet: it and those after it are run again, as new rows.
    fn branch(&mut self, node: usize) -> Branch {
        let ancestors = self.trie.ancestors(node);
        let pass = self.passes;
        let kept = ancestors.iter().take_while(|&&a| self.row_of[a].is_some_and(|(_, p)| p < pass)).count();
        let path = ancestors[..kept].iter().filter_map(|&a| self.row_of[a].map(|(row, _)| (row, self.trie.id(a)))).collect();
        let first_row = self.tree_tokens as u32;
        let mut rows: Vec<u32> = ancestors[kept..].iter().map(|&a| self.trie.id(a)).collect();
        let mut budget = if self.exhaustive { usize::MAX } else { self.trie.depth(node) };
        let mut targets = vec![];
        let mut next = Some(node);
        while let Some(n) = next.filter(|&n| budget > 0 && !self.expanded(n) && !self.trie.children(n).is_empty()) {
            budget -= 1;
            let at = rows.len() as u32;
            self.row_of[n] = Some((first_row + at, pass));
            rows.push(self.trie.id(n));
            for &c in self.trie.children(n) {
                targets.push(Target { at: Some(at), id: self.trie.id(c) });
                self.pending.push(c);
            }
            next = self.trie.longest_child(n);
        }
        self.tree_tokens += rows.len();
        Branch { path, rows, first_row, targets }
    }

    fn score(&self, c: usize) -> Option<f64> {
        self.lp[self.trie.end(c)]
    }

    /// The k-th best score known; -inf while fewer than k are (+inf for k = 0: nothing to find).
    fn kth(&self) -> f64 {
        if self.k == 0 {
            return f64::INFINITY;
        }
        let mut known: Vec<f64> = (0..self.candidates()).filter_map(|c| self.score(c)).collect();
        if known.len() < self.k {
            return f64::NEG_INFINITY;
        }
        known.sort_by(|a, b| b.total_cmp(a));
        known[self.k - 1]
    }

    /// The k best scores, best first, ties to the earlier candidate.
    fn top_k(&self) -> Vec<Ranked> {
        let mut all: Vec<Ranked> = (0..self.candidates())
            .filter_map(|c| {
                let score = self.score(c)?;
                let span = self.lp[self.trie.ancestor(self.trie.end(c), self.span_lens[c])]?;
                Some(Ranked { candidate: c, score, span_logprob: span })
            })
            .collect();
        all.sort_by(|a, b| by_score_then_index((a.score, a.candidate), (b.score, b.candidate)));
        all.truncate(self.k);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::Rng;
    use std::collections::HashSet;

    /// A toy model: log P(id | prefix) from a hash of both, in quarters, so sums in any
    /// order are exact and ties are real ties.
    fn lp(prefix: &[u32], id: u32) -> f64 {
        let h = prefix.iter().chain([&id]).fold(0xcbf29ce484222325u64, |h, &x| (h ^ x as u64).wrapping_mul(0x100000001b3));
        -(((h >> 29) % 9) as f64) / 4.0
    }

    /// Answer a pass as a model would: each target's log-prob after its row's context (its
    /// branch's path, then its rows up to the target's). `sent` holds the ids of the tree rows
    /// sent so far, by tree row: a path must name rows sent before, with their ids.
    fn answer(work: &Work, sent: &mut Vec<u32>) -> Vec<f64> {
        let before = sent.len();
        for b in &work.branches {
            assert_eq!(b.first_row as usize, sent.len(), "branches number their rows in sending order");
            sent.extend(&b.rows);
        }
        work.branches
            .iter()
            .flat_map(|b| {
                assert!(b.path.iter().all(|&(row, id)| (row as usize) < before && sent[row as usize] == id), "a path names rows of earlier passes");
                let ids: Vec<u32> = b.path.iter().map(|&(_, id)| id).chain(b.rows.iter().copied()).collect();
                b.targets.iter().map(move |t| lp(&ids[..t.at.map_or(0, |j| b.path.len() + j as usize + 1)], t.id))
            })
            .collect()
    }

    fn score(cont: &[u32]) -> f64 {
        (0..cont.len()).map(|j| lp(&cont[..j], cont[j])).sum()
    }

    fn brute(conts: &[Vec<u32>], k: usize) -> Vec<(usize, f64)> {
        let mut all: Vec<(usize, f64)> = conts.iter().enumerate().map(|(c, ids)| (c, score(ids))).collect();
        all.sort_by(|a, b| by_score_then_index((a.1, a.0), (b.1, b.0)));
        all.truncate(k);
        all
    }

    struct Run {
        top: Vec<Ranked>,
        passes: u32,
        rows: usize,
    }

    fn run(conts: &[Vec<u32>], k: usize, exhaustive: bool) -> Run {
        let spans = conts.iter().map(|c| c.len() - 1).collect();
        let (mut s, mut work) = Search::new(conts.to_vec(), spans, k, exhaustive);
        let (mut rows, mut sent) = (0, vec![]);
        loop {
            if s.passes > 1 {
                assert!(work.branches.iter().flat_map(|b| &b.targets).all(|t| t.at.is_some()), "the prompt's row is scored in pass 1 only");
            }
            rows += work.tree_rows();
            match s.advance(&answer(&work, &mut sent)).unwrap() {
                Step::Run(w) => work = w,
                Step::Done(top) => {
                    assert_eq!(rows, s.tree_tokens);
                    return Run { top, passes: s.passes, rows };
                }
            }
        }
    }

    /// The rows the search before this one ran (pass 2: the k best bounds and the longest
    /// candidate of each of the 4k best first ids, the candidates on their chains riding
    /// along; pass 3: every other candidate of bound >= the k-th score), chains sharing
    /// their prefixes within a pass.
    fn old_rows(conts: &[Vec<u32>], k: usize) -> usize {
        let bound = |c: usize| lp(&[], conts[c][0]);
        let mut order: Vec<usize> = (0..conts.len()).collect();
        order.sort_by(|&a, &b| by_score_then_index((bound(a), a), (bound(b), b)));
        let mut firsts: Vec<u32> = vec![];
        for &c in &order {
            if firsts.len() < 4 * k && !firsts.contains(&conts[c][0]) {
                firsts.push(conts[c][0]);
            }
        }
        let mut probe: Vec<usize> = order[..k.min(order.len())].to_vec();
        for f in firsts {
            let longest = (0..conts.len()).filter(|&c| conts[c][0] == f).fold(None, |b: Option<usize>, c| match b {
                Some(b) if conts[b].len() >= conts[c].len() => Some(b),
                _ => Some(c),
            });
            probe.extend(longest.filter(|c| !probe.contains(c)));
        }
        let chains = |cands: &[usize]| {
            let mut cands = cands.to_vec();
            cands.sort_by(|&a, &b| conts[b].len().cmp(&conts[a].len()).then(a.cmp(&b)));
            let mut prefixes: HashSet<&[u32]> = HashSet::new();
            let mut rows = 0;
            for c in cands {
                let r = &conts[c][..conts[c].len() - 1];
                if !prefixes.contains(r) {
                    rows += r.len();
                    prefixes.extend((1..=r.len()).map(|j| &r[..j]));
                }
            }
            (rows, prefixes)
        };
        let (rows2, on_chains) = chains(&probe);
        let scored: Vec<usize> = (0..conts.len()).filter(|&c| probe.contains(&c) || on_chains.contains(&conts[c][..conts[c].len() - 1])).collect();
        let mut known: Vec<f64> = scored.iter().map(|&c| score(&conts[c])).collect();
        known.sort_by(|a, b| b.total_cmp(a));
        let kth = known.get(k - 1).copied().unwrap_or(f64::NEG_INFINITY);
        let rest: Vec<usize> = order.iter().copied().filter(|c| !scored.contains(c) && bound(*c) >= kth).collect();
        rows2 + chains(&rest).0
    }

    /// Candidates as a source gives them: every run of 1..=max_units of a random id sequence
    /// (repeated ids: shared prefixes, prefixes of one another), each tokenised to 1..=2 ids
    /// per unit, then an end id; duplicates kept once.
    fn random_conts(rng: &mut Rng, units: usize, max_units: usize, vocab: u64) -> Vec<Vec<u32>> {
        let words: Vec<Vec<u32>> = (0..units).map(|_| (0..1 + rng.next_u64() % 2).map(|_| 1 + (rng.next_u64() % vocab) as u32).collect()).collect();
        let mut conts = vec![];
        for i in 0..units {
            for j in i..units.min(i + max_units) {
                let mut c: Vec<u32> = words[i..=j].concat();
                c.push(99);
                if !conts.contains(&c) {
                    conts.push(c);
                }
            }
        }
        conts
    }

    #[test]
    fn random_tries_give_the_brute_force_top_k_in_fewer_rows() {
        let mut rng = Rng::new(26);
        let (mut new_rows, mut old_total) = (0, 0);
        for seed in 0..300 {
            let conts = random_conts(&mut rng, 5 + seed % 40, 1 + seed % 7, 3 + (seed % 11) as u64);
            for k in [1, 2, 5, conts.len()] {
                let want = brute(&conts, k);
                let got = run(&conts, k, false);
                let ranked: Vec<(usize, f64)> = got.top.iter().map(|r| (r.candidate, r.score)).collect();
                assert_eq!(ranked, want, "seed {seed}, k {k}");
                for r in &got.top {
                    let c = &conts[r.candidate];
                    assert_eq!(r.span_logprob, (0..c.len() - 1).map(|j| lp(&c[..j], c[j])).sum::<f64>());
                }
                let all = run(&conts, k, true);
                assert_eq!((all.top, all.passes), (got.top.clone(), 2), "seed {seed}, k {k}: the exhaustive search agrees");
                if k < conts.len() {
                    new_rows += got.rows;
                    old_total += old_rows(&conts, k);
                }
            }
        }
        assert!(new_rows < old_total, "{new_rows} rows against the old search's {old_total}");
    }

    #[test]
    fn a_branch_attends_its_kept_path_then_runs_down_the_longest_candidate() {
        let conts = vec![vec![5, 6, 7, 8, 9, 10], vec![5, 6, 10], vec![5, 10], vec![4, 10]];
        let spans = conts.iter().map(|c| c.len() - 1).collect();
        let (mut s, work) = Search::new(conts, spans, 1, false);
        assert_eq!(work.branches[0].targets, [Target { at: None, id: 5 }, Target { at: None, id: 4 }]);
        let br = |path: Vec<(u32, u32)>, rows: Vec<u32>, first_row: u32, targets: &[(u32, u32)]| Branch { path, rows, first_row, targets: targets.iter().map(|&(at, id)| Target { at: Some(at), id }).collect() };
        // Pass 1: 5 and 4 both at -1; pass 2 expands k = 1 node, 5 (the earlier), by depth 1 row.
        let Step::Run(w) = s.advance(&[-1.0, -1.0]).unwrap() else { panic!("a second pass") };
        assert_eq!(w.branches, [br(vec![], vec![5], 0, &[(0, 6), (0, 10)])]);
        // [5, 10] scores -3: the k-th; pass 3 expands 2k = 2 nodes at -1: [5, 6], its path the
        // kept tree row 0, by 2 rows, and 4 by 1, after them.
        let Step::Run(w) = s.advance(&[0.0, -2.0]).unwrap() else { panic!("a third pass") };
        assert_eq!(w.branches, [br(vec![(0, 5)], vec![6, 7], 1, &[(0, 7), (0, 10), (1, 8)]), br(vec![], vec![4], 3, &[(0, 10)])]);
        // [4, 10] scores -1, the k-th; pass 4 expands [5, 6, 7, 8] at -1, its path tree rows 0..3
        // (of two passes), by up to 4 rows: 2 before the trie ends.
        let Step::Run(w) = s.advance(&[0.0, -2.0, 0.0, 0.0]).unwrap() else { panic!("a fourth pass") };
        assert_eq!(w.branches, [br(vec![(0, 5), (1, 6), (2, 7)], vec![8, 9], 4, &[(0, 9), (1, 10)])]);
        // [5, 6, 7, 8, 9, 10] and [4, 10] tie at -1: the first occurrence is the top-1, and
        // no node is left at -1 or above.
        let Step::Done(top) = s.advance(&[-0.0, -0.0]).unwrap() else { panic!("done") };
        assert_eq!((top[0].candidate, top[0].score, top[0].span_logprob), (0, -1.0, -1.0));
        assert_eq!((s.passes, s.tree_tokens), (4, 1 + 3 + 2));
        assert!(matches!(s.advance(&[]), Err(SearchError::Finished)));
    }

    #[test]
    fn ties_go_to_the_first_occurrence() {
        // Every term -1: candidates 0 and 1 tie at -2, ahead of 2 and 3 at -3.
        let conts = vec![vec![3, 10], vec![4, 10], vec![3, 4, 10], vec![3, 10, 10]];
        let spans = vec![1, 1, 2, 2];
        let (mut s, work) = Search::new(conts, spans, 2, false);
        let mut w = work;
        let top = loop {
            let lps = vec![-1.0; w.targets()];
            match s.advance(&lps).unwrap() {
                Step::Run(next) => w = next,
                Step::Done(top) => break top,
            }
        };
        assert_eq!(top.iter().map(|r| r.candidate).collect::<Vec<_>>(), [0, 1]);
    }

    #[test]
    fn a_wrong_count_of_log_probs_is_an_error() {
        let (mut s, _) = Search::new(vec![vec![3, 10], vec![4, 10]], vec![1, 1], 1, false);
        assert_eq!(s.advance(&[-1.0]).err(), Some(SearchError::Count { pass: 1, got: 1, want: 2 }));
    }
}
