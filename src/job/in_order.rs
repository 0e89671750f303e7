//! Results in input order: every document read takes its place in a queue, and leaves it
//! for the file only when it and every document before it are done (a failed document at
//! once, a scored one when its wave is collected).

use crate::results::DocResult;
use std::collections::{HashMap, VecDeque};

/// A document in the queue: its result, or the corpus index of one still being scored.
enum QueuedDoc {
    Done(DocResult),
    Scoring(u64),
}

#[derive(Default)]
pub(super) struct InOrder {
    queue: VecDeque<QueuedDoc>,
    /// Results of scored documents, by corpus index, until their turn comes.
    finished: HashMap<u64, DocResult>,
}

impl InOrder {
    /// A document whose result is known now (it failed before reaching the model).
    pub fn push_done(&mut self, r: DocResult) {
        self.queue.push_back(QueuedDoc::Done(r));
    }

    /// A document on its way to the model, by corpus index.
    pub fn push_scoring(&mut self, index: u64) {
        self.queue.push_back(QueuedDoc::Scoring(index));
    }

    /// A scored document's result.
    pub fn finish(&mut self, index: u64, r: DocResult) {
        self.finished.insert(index, r);
    }

    /// The results at the front of the queue that are ready, in input order.
    pub fn take_ready(&mut self) -> Vec<DocResult> {
        let mut out = vec![];
        while let Some(front) = self.queue.front() {
            let ready = match front {
                QueuedDoc::Done(_) => true,
                QueuedDoc::Scoring(k) => self.finished.contains_key(k),
            };
            if !ready {
                break;
            }
            match self.queue.pop_front() {
                Some(QueuedDoc::Done(r)) => out.push(r),
                Some(QueuedDoc::Scoring(k)) => out.extend(self.finished.remove(&k)),
                None => break,
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[DocResult]) -> Vec<&str> {
        v.iter().map(|r| r.id.as_str()).collect()
    }

    #[test]
    fn results_leave_in_input_order_once_everything_before_them_is_done() {
        let mut order = InOrder::default();
        order.push_scoring(0);
        order.push_done(DocResult::failed("bad", "", "too long"));
        order.push_scoring(2);
        order.finish(2, DocResult::failed("two", "", "x"));
        assert!(order.take_ready().is_empty(), "document 0 is still scoring");
        order.finish(0, DocResult::failed("zero", "", "x"));
        assert_eq!(ids(&order.take_ready()), ["zero", "bad", "two"]);
        assert!(order.take_ready().is_empty());
    }
}
