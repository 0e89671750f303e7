//! The exact top-k search over one document's candidates, as a state machine the job feeds
//! with each pass's log-probs.
//!
//! A candidate's score is the sum of its continuation's terms (span ids, then end ids),
//! every term a log-probability, so at most 0: the score is at most the first term,
//! log P(first id | prompt), which the prompt's last row gives for every candidate at once.
//!   pass 1: the prompt, with each distinct first id as a target at its last row: a bound
//!           for every candidate (and its exact first term);
//!   pass 2: the k candidates of highest bound (ties: first occurrence) and the longest
//!           candidate of each of the 4k first ids of highest bound, as a token tree (the
//!           candidates lying on those chains ride along): the k-th best exact score is `kth`;
//!   pass 3: every other candidate whose bound is >= kth.
//! A candidate left out has bound < kth, so a score below k scores already known: the
//! top-k of the scored candidates is the top-k of all of them, ties included (a candidate
//! that could tie the k-th has bound >= kth and is scored). The first term of every score
//! is pass 1's, so a score never exceeds its bound even by rounding (the other terms,
//! logit - logsumexp with the max taken out, are <= 0 as computed).

use super::tree::{Branch, Target, Work};
use std::cmp::Ordering;
use std::collections::HashMap;
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

/// A candidate scored in the pending pass: its global target indices, in continuation order
/// from its second id.
struct Member {
    candidate: usize,
    branch: usize,
    targets: Vec<usize>,
}

enum Stage {
    Bounds,
    Scores { pass: u32, members: Vec<Member>, offsets: Vec<usize> },
    Done,
}

pub struct Search {
    /// Per candidate: span ids then end ids (at least 2).
    conts: Vec<Vec<u32>>,
    span_lens: Vec<usize>,
    k: usize,
    exhaustive: bool,
    /// Per candidate, the index of its first id in `firsts`.
    first_of: Vec<usize>,
    firsts: Vec<u32>,
    bound: Vec<f64>,
    /// Candidates by bound, highest first, ties by index.
    order: Vec<usize>,
    exact: Vec<Option<(f64, f64)>>,
    stage: Stage,
    /// Passes sent so far.
    pub passes: u32,
    /// Rows beyond the prompt sent so far.
    pub tree_tokens: usize,
}

/// Pass 2 probes the longest candidate of this many first ids per kept span (see `probes`).
const PROBE_IDS: usize = 4;

fn by_score_then_index(a: (f64, usize), b: (f64, usize)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

impl Search {
    /// The search over candidates of continuations `conts` (span ids ++ end ids, each at
    /// least two ids) whose first `span_lens` ids are the span; and its first pass. With
    /// `exhaustive`, pass 2 scores every candidate (for testing that the pruning is exact).
    pub fn new(conts: Vec<Vec<u32>>, span_lens: Vec<usize>, k: usize, exhaustive: bool) -> (Search, Work) {
        let mut index: HashMap<u32, usize> = HashMap::new();
        let mut firsts = vec![];
        let first_of = conts
            .iter()
            .map(|c| {
                *index.entry(c[0]).or_insert_with(|| {
                    firsts.push(c[0]);
                    firsts.len() - 1
                })
            })
            .collect();
        let work = Work { branches: vec![Branch { rows: vec![], targets: firsts.iter().map(|&id| Target { at: None, id }).collect() }] };
        let n = conts.len();
        let s = Search {
            conts,
            span_lens,
            k,
            exhaustive,
            first_of,
            firsts,
            bound: vec![],
            order: vec![],
            exact: vec![None; n],
            stage: Stage::Bounds,
            passes: 1,
            tree_tokens: 0,
        };
        (s, work)
    }

    /// Candidates of the document.
    pub fn candidates(&self) -> usize {
        self.conts.len()
    }

    /// The pending pass's log-probs, in its target order: the next pass, or the top-k.
    pub fn advance(&mut self, logprobs: &[f64]) -> Result<Step, SearchError> {
        match std::mem::replace(&mut self.stage, Stage::Done) {
            Stage::Done => Err(SearchError::Finished),
            Stage::Bounds => {
                self.check(1, logprobs.len(), self.firsts.len())?;
                self.bound = self.first_of.iter().map(|&f| logprobs[f]).collect();
                let mut order: Vec<usize> = (0..self.conts.len()).collect();
                order.sort_by(|&a, &b| by_score_then_index((self.bound[a], a), (self.bound[b], b)));
                self.order = order;
                let first = if self.exhaustive { self.order.clone() } else { self.probes() };
                Ok(self.schedule(2, first))
            }
            Stage::Scores { pass, members, offsets } => {
                let want = offsets.last().copied().unwrap_or(0);
                self.check(pass, logprobs.len(), want)?;
                for m in &members {
                    let c = m.candidate;
                    let terms: Vec<f64> = m.targets.iter().map(|&t| logprobs[offsets[m.branch] + t]).collect();
                    let span = self.bound[c] + terms[..self.span_lens[c] - 1].iter().sum::<f64>();
                    let score = self.bound[c] + terms.iter().sum::<f64>();
                    self.exact[c] = Some((score, span));
                }
                if pass >= 3 || self.exhaustive {
                    return Ok(Step::Done(self.top_k()));
                }
                let kth = self.top_k().last().map_or(f64::NEG_INFINITY, |r| r.score);
                let rest: Vec<usize> = self.order.iter().copied().filter(|&c| self.exact[c].is_none() && self.bound[c] >= kth).collect();
                if rest.is_empty() {
                    return Ok(Step::Done(self.top_k()));
                }
                Ok(self.schedule(3, rest))
            }
        }
    }

    /// Pass 2's candidates: the k of highest bound, and for each of the PROBE_IDS·k first
    /// ids of highest bound its longest candidate, whose chain carries the shorter ones
    /// along. The k-th exact score after pass 2 is what pass 3 is pruned by, and k
    /// candidates of one start (often the k best bounds: they share their first id) make it
    /// low; spans from many starts make it close to the final k-th score.
    fn probes(&self) -> Vec<usize> {
        let mut wanted: HashMap<usize, Option<usize>> = HashMap::new();
        for &c in &self.order {
            if wanted.len() >= PROBE_IDS * self.k {
                break;
            }
            wanted.entry(self.first_of[c]).or_insert(None);
        }
        for c in 0..self.conts.len() {
            if let Some(best) = wanted.get_mut(&self.first_of[c]) {
                if best.is_none_or(|b| self.conts[c].len() > self.conts[b].len()) {
                    *best = Some(c);
                }
            }
        }
        let mut first: Vec<usize> = self.order[..self.k.min(self.order.len())].to_vec();
        let mut longest: Vec<usize> = wanted.into_values().flatten().filter(|c| !first.contains(c)).collect();
        longest.sort_unstable();
        first.extend(longest);
        first
    }

    fn check(&self, pass: u32, got: usize, want: usize) -> Result<(), SearchError> {
        if got == want {
            Ok(())
        } else {
            Err(SearchError::Count { pass, got, want })
        }
    }

    /// The k best exact scores, best first, ties to the earlier candidate.
    fn top_k(&self) -> Vec<Ranked> {
        let mut all: Vec<Ranked> = self
            .exact
            .iter()
            .enumerate()
            .filter_map(|(c, e)| e.map(|(score, span_logprob)| Ranked { candidate: c, score, span_logprob }))
            .collect();
        all.sort_by(|a, b| by_score_then_index((a.score, a.candidate), (b.score, b.candidate)));
        all.truncate(self.k);
        all
    }

    /// The pass scoring `cands` (all but their first term, known from pass 1): a branch per
    /// chain of rows, a candidate whose rows are a prefix of an earlier, longer one's joining
    /// its branch with only its targets. In pass 2, every other candidate whose rows lie on
    /// those chains rides along too (targets, no rows): scored now, it is never the reason
    /// for a pass-3 branch that runs the same rows again.
    fn schedule(&mut self, pass: u32, mut cands: Vec<usize>) -> Step {
        cands.sort_by(|&a, &b| self.conts[b].len().cmp(&self.conts[a].len()).then(a.cmp(&b)));
        let mut tree = Chains::default();
        let mut members = Vec::with_capacity(cands.len());
        for &c in &cands {
            let cont = &self.conts[c];
            let branch = match tree.find(&cont[..cont.len() - 1]) {
                Some(b) => b,
                None => tree.add(&cont[..cont.len() - 1]),
            };
            members.push(Member { candidate: c, branch, targets: tree.targets(branch, cont) });
        }
        if pass == 2 && !self.exhaustive {
            let chosen: std::collections::HashSet<usize> = cands.iter().copied().collect();
            for c in (0..self.conts.len()).filter(|c| !chosen.contains(c)) {
                let cont = &self.conts[c];
                if let Some(branch) = tree.find(&cont[..cont.len() - 1]) {
                    members.push(Member { candidate: c, branch, targets: tree.targets(branch, cont) });
                }
            }
        }
        let branches = tree.branches;
        let mut offsets = Vec::with_capacity(branches.len() + 1);
        let mut at = 0;
        for b in &branches {
            offsets.push(at);
            at += b.targets.len();
        }
        offsets.push(at);
        let work = Work { branches };
        self.passes = pass;
        self.tree_tokens += work.tree_rows();
        self.stage = Stage::Scores { pass, members, offsets };
        Step::Run(work)
    }
}

/// A pass's branches as a trie of their rows: a node belongs to the branch that made it,
/// whose rows begin with the node's path.
struct Chains {
    children: HashMap<(usize, u32), usize>,
    node_branch: Vec<usize>,
    branches: Vec<Branch>,
    /// Per branch, where each of its targets is.
    target_of: Vec<HashMap<Target, usize>>,
}

impl Default for Chains {
    fn default() -> Chains {
        Chains { children: HashMap::new(), node_branch: vec![usize::MAX], branches: vec![], target_of: vec![] }
    }
}

impl Chains {
    /// The branch whose rows begin with `rows`, if any.
    fn find(&self, rows: &[u32]) -> Option<usize> {
        let mut node = 0;
        for &t in rows {
            node = *self.children.get(&(node, t))?;
        }
        (node != 0).then(|| self.node_branch[node])
    }

    /// A new branch of `rows`.
    fn add(&mut self, rows: &[u32]) -> usize {
        let b = self.branches.len();
        self.branches.push(Branch { rows: rows.to_vec(), targets: vec![] });
        self.target_of.push(HashMap::new());
        let mut node = 0;
        for &t in rows {
            let next = self.node_branch.len();
            node = *self.children.entry((node, t)).or_insert(next);
            if node == next {
                self.node_branch.push(b);
            }
        }
        b
    }

    /// The targets of `cont` from its second id on branch `b` (shared with any already there).
    fn targets(&mut self, b: usize, cont: &[u32]) -> Vec<usize> {
        (1..cont.len())
            .map(|j| {
                let t = Target { at: Some(j as u32 - 1), id: cont[j] };
                let list = &mut self.branches[b].targets;
                *self.target_of[b].entry(t).or_insert_with(|| {
                    list.push(t);
                    list.len() - 1
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy model: log P(id | context) depends on the id and the context length only.
    fn lp(at: usize, id: u32) -> f64 {
        // Binary fractions: sums in any order are exact, so ties are real ties.
    -(((id as usize * 7 + at * 3) % 11) as f64) / 4.0 - id as f64 / 64.0
    }

    /// Answer a pass as a model would: each target's log-prob after its row's context.
    fn answer(work: &Work) -> Vec<f64> {
        work.branches.iter().flat_map(|b| b.targets.iter().map(|t| lp(t.at.map_or(0, |j| j as usize + 1), t.id))).collect()
    }

    fn brute(conts: &[Vec<u32>], k: usize) -> Vec<(usize, f64)> {
        let mut all: Vec<(usize, f64)> = conts.iter().enumerate().map(|(c, ids)| (c, ids.iter().enumerate().map(|(j, &id)| lp(j, id)).sum())).collect();
        all.sort_by(|a, b| by_score_then_index((a.1, a.0), (b.1, b.0)));
        all.truncate(k);
        all
    }

    fn run(conts: &[Vec<u32>], k: usize, exhaustive: bool) -> (Vec<Ranked>, u32, usize) {
        let spans = conts.iter().map(|c| c.len() - 1).collect();
        let (mut s, mut work) = Search::new(conts.to_vec(), spans, k, exhaustive);
        loop {
            match s.advance(&answer(&work)).unwrap() {
                Step::Run(w) => work = w,
                Step::Done(top) => return (top, s.passes, s.tree_tokens),
            }
        }
    }

    #[test]
    fn pruned_search_equals_brute_force() {
        // Spans of 1..4 ids over ids 1..9, each ended by 10.
        let mut conts = vec![];
        for a in 1..10u32 {
            for len in 1..4 {
                let mut c: Vec<u32> = (0..len).map(|j| 1 + (a + 3 * j) % 9).collect();
                c.push(10);
                if !conts.contains(&c) {
                    conts.push(c);
                }
            }
        }
        for k in [1, 3, 5, 100] {
            let (top, passes, tree) = run(&conts, k, false);
            let got: Vec<(usize, f64)> = top.iter().map(|r| (r.candidate, r.score)).collect();
            let want = brute(&conts, k);
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.0, w.0, "k={k}");
                assert!((g.1 - w.1).abs() < 1e-12);
            }
            assert!(passes <= 3 && tree > 0);
            let (all, passes, _) = run(&conts, k, true);
            assert_eq!(all, top, "k={k}: the exhaustive search agrees");
            assert_eq!(passes, 2);
        }
    }

    #[test]
    fn prefixes_share_the_longest_chain() {
        let conts = vec![vec![5, 6, 7, 10], vec![5, 6, 10], vec![5, 10], vec![8, 10]];
        let (_, work) = Search::new(conts.clone(), vec![3, 2, 1, 1], 4, false);
        let (mut s, _) = Search::new(conts, vec![3, 2, 1, 1], 4, false);
        let Step::Run(w) = s.advance(&answer(&work)).unwrap() else { panic!("a second pass") };
        assert_eq!(w.branches.len(), 2);
        assert_eq!(w.branches[0].rows, [5, 6, 7]);
        assert_eq!(w.branches[0].targets.len(), 5, "6, 7, 10 on the chain and two ends");
        assert_eq!(w.branches[1].rows, [8]);
        assert_eq!(s.tree_tokens, 4);
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
}
