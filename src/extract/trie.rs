//! A document's candidates as a trie of their continuations (span ids, then end ids): a
//! node is a prefix, its term the log-prob of its last id after the prompt and the ids
//! before it, and its row (the prefix's last id, run through the model) gives the terms of
//! all its children at once. The root is the prompt; its row is the prompt's last row.

use std::collections::HashMap;

pub const ROOT: usize = 0;

pub struct Trie {
    parent: Vec<usize>,
    id: Vec<u32>,
    depth: Vec<usize>,
    /// Per node, its children in order of first occurrence.
    children: Vec<Vec<usize>>,
    /// Per node with children, the child on the longest candidate through it (ties: the
    /// earliest candidate): where a branch goes on when it has rows to spare.
    longest: Vec<usize>,
    /// Per candidate, the node of its whole continuation.
    end: Vec<usize>,
}

impl Trie {
    pub fn new(conts: &[Vec<u32>]) -> Trie {
        let mut t = Trie { parent: vec![ROOT], id: vec![0], depth: vec![0], children: vec![vec![]], longest: vec![usize::MAX], end: vec![] };
        let mut index: HashMap<(usize, u32), usize> = HashMap::new();
        let mut longest_len = vec![0usize];
        for cont in conts {
            let mut node = ROOT;
            for &id in cont {
                let next = t.parent.len();
                let child = *index.entry((node, id)).or_insert(next);
                if child == next {
                    t.parent.push(node);
                    t.id.push(id);
                    t.depth.push(t.depth[node] + 1);
                    t.children.push(vec![]);
                    t.longest.push(usize::MAX);
                    longest_len.push(0);
                    t.children[node].push(child);
                }
                if cont.len() > longest_len[node] {
                    longest_len[node] = cont.len();
                    t.longest[node] = child;
                }
                node = child;
            }
            t.end.push(node);
        }
        t
    }

    pub fn len(&self) -> usize {
        self.parent.len()
    }

    pub fn parent(&self, node: usize) -> usize {
        self.parent[node]
    }

    /// The id a node's row puts in (its prefix's last id).
    pub fn id(&self, node: usize) -> u32 {
        self.id[node]
    }

    /// Ids in the node's prefix (the root's: 0).
    pub fn depth(&self, node: usize) -> usize {
        self.depth[node]
    }

    pub fn children(&self, node: usize) -> &[usize] {
        &self.children[node]
    }

    /// The child on the longest candidate through `node`, if it has children.
    pub fn longest_child(&self, node: usize) -> Option<usize> {
        (self.longest[node] != usize::MAX).then_some(self.longest[node])
    }

    /// The node of candidate `c`'s whole continuation.
    pub fn end(&self, c: usize) -> usize {
        self.end[c]
    }

    /// The ancestor of `node` (or itself) holding its first `depth` ids.
    pub fn ancestor(&self, mut node: usize, depth: usize) -> usize {
        while self.depth[node] > depth {
            node = self.parent[node];
        }
        node
    }

    /// The nodes before `node` on its prefix, from the first (the root not included).
    pub fn ancestors(&self, node: usize) -> Vec<usize> {
        let mut nodes = Vec::with_capacity(self.depth[node]);
        let mut n = self.parent[node];
        while n != ROOT {
            nodes.push(n);
            n = self.parent[n];
        }
        nodes.reverse();
        nodes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_prefixes_are_one_node_and_the_longest_child_leads_on() {
        let t = Trie::new(&[vec![5, 10], vec![5, 6, 10], vec![5, 6, 7, 10], vec![8, 10], vec![5, 6, 9, 10]]);
        assert_eq!(t.children(ROOT).iter().map(|&n| t.id(n)).collect::<Vec<_>>(), [5, 8]);
        let five = t.children(ROOT)[0];
        assert_eq!(t.children(five).iter().map(|&n| t.id(n)).collect::<Vec<_>>(), [10, 6]);
        let six = t.longest_child(five).unwrap();
        assert_eq!(t.id(six), 6);
        assert_eq!(t.id(t.longest_child(six).unwrap()), 7, "the earliest of the longest");
        assert_eq!(t.ancestors(t.end(2)).into_iter().map(|n| t.id(n)).collect::<Vec<_>>(), [5, 6, 7]);
        assert_eq!(t.ancestor(t.end(2), 2), six);
        assert_eq!(t.longest_child(t.end(0)), None);
        assert_eq!(t.len(), 11);
    }
}
