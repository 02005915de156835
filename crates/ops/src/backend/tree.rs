//! [`TreeMask`]: the shape of a tree of new tokens that one attention call runs over at once
//! (speculative decoding's tree verification, SpecExec/Sequoia style).
//!
//! The call's T query rows are the tree's nodes, in an order where a parent comes before its
//! children. Their keys and values were written to the cache rows `pos0 .. pos0 + T` in the
//! same order. Node `i` sits at position `pos0 + depth(i)` (a root has depth 0) and sees the
//! cache rows before `pos0` (the sequence so far) and the rows `pos0 + j` of the nodes `j` on
//! its path from the root, itself included; never a sibling's or a cousin's. A chain (each
//! node the parent of the next) is plain causal attention.

use crate::{OpsError, Result};

/// Owns each node's parent, its depth and its ancestor set as a bitmask (bit `j` of row `i`:
/// node `j` is `i` or an ancestor of `i`), the form a device kernel reads. Invariant: every
/// parent index is smaller than its child's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeMask {
    parents: Vec<Option<usize>>,
    depth: Vec<usize>,
    /// u32 words per row of `bits`.
    words: usize,
    /// `[T, words]`.
    bits: Vec<u32>,
}

impl TreeMask {
    /// The tree whose node `i` has parent `parents[i]` (None: a root, whose parent is the last
    /// cached position). A parent must come before its child.
    pub fn new(parents: &[Option<usize>]) -> Result<Self> {
        let t = parents.len();
        let words = t.div_ceil(32).max(1);
        let mut depth = Vec::with_capacity(t);
        let mut bits = vec![0u32; t * words];
        for (i, p) in parents.iter().enumerate() {
            match *p {
                Some(p) if p >= i => {
                    return Err(OpsError::Shape {
                        op: "tree mask",
                        detail: format!("node {i} has parent {p}: a parent must come before its child"),
                    });
                }
                Some(p) => {
                    depth.push(depth[p] + 1);
                    let (head, row) = bits.split_at_mut(i * words);
                    row[..words].copy_from_slice(&head[p * words..(p + 1) * words]);
                }
                None => depth.push(0),
            }
            bits[i * words + i / 32] |= 1 << (i % 32);
        }
        Ok(Self { parents: parents.to_vec(), depth, words, bits })
    }

    /// A chain of `n` nodes: plain causal attention.
    pub fn chain(n: usize) -> Self {
        let parents: Vec<Option<usize>> = (0..n).map(|i| i.checked_sub(1)).collect();
        Self::new(&parents).expect("a chain's parents precede their children")
    }

    /// Nodes.
    pub fn len(&self) -> usize {
        self.parents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.parents.is_empty()
    }

    pub fn parents(&self) -> &[Option<usize>] {
        &self.parents
    }

    /// Each node's depth (its position less the tree's first).
    pub fn depths(&self) -> &[usize] {
        &self.depth
    }

    /// Whether node `i` sees node `j`'s key: `j` is `i` or one of its ancestors.
    pub fn sees(&self, i: usize, j: usize) -> bool {
        j < self.len() && self.bits[i * self.words + j / 32] >> (j % 32) & 1 == 1
    }

    /// u32 words per row of [`bits`](Self::bits).
    pub fn words(&self) -> usize {
        self.words
    }

    /// The ancestor bitmask `[T, words]`, bit `j % 32` of word `j / 32` of row `i` for
    /// [`sees(i, j)`](Self::sees).
    pub fn bits(&self) -> &[u32] {
        &self.bits
    }

    /// The nodes from the root down to `i`, in order.
    pub fn path(&self, i: usize) -> Vec<usize> {
        let (mut path, mut at) = (vec![i], i);
        while let Some(p) = self.parents[at] {
            path.push(p);
            at = p;
        }
        path.reverse();
        path
    }

    /// Nodes without children, in order.
    pub fn leaves(&self) -> Vec<usize> {
        let mut has_child = vec![false; self.len()];
        for p in self.parents.iter().flatten() {
            has_child[*p] = true;
        }
        (0..self.len()).filter(|&i| !has_child[i]).collect()
    }

    /// Whether node `i`'s path from the root is the nodes `0..=i` (so its rows sit at
    /// consecutive positions from the tree's first: keeping that path is a truncation).
    pub fn is_chain_prefix(&self, i: usize) -> bool {
        (0..=i).all(|j| self.parents[j] == j.checked_sub(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ancestry_depths_and_paths() {
        //      0
        //     / \
        //    1   3
        //    |   |
        //    2   4 - 5 (two children of 4: 5 and 6)
        //         \
        //          6
        let t = TreeMask::new(&[None, Some(0), Some(1), Some(0), Some(3), Some(4), Some(4)]).expect("tree");
        assert_eq!(t.depths(), [0, 1, 2, 1, 2, 3, 3]);
        assert_eq!(t.path(6), [0, 3, 4, 6]);
        assert_eq!(t.path(2), [0, 1, 2]);
        assert_eq!(t.leaves(), [2, 5, 6]);
        let seen: Vec<usize> = (0..7).filter(|&j| t.sees(6, j)).collect();
        assert_eq!(seen, [0, 3, 4, 6]);
        assert!(!t.sees(5, 6) && !t.sees(3, 1) && t.sees(2, 1));
        assert!(t.is_chain_prefix(2) && !t.is_chain_prefix(3));
        // A chain is causal attention; more than 32 nodes take a second word per row.
        let c = TreeMask::chain(40);
        assert_eq!(c.words(), 2);
        assert!((0..40).all(|i| (0..40).all(|j| c.sees(i, j) == (j <= i))));
        assert!(TreeMask::new(&[Some(0)]).is_err(), "a node cannot be its own parent");
        assert!(TreeMask::new(&[None, Some(2), None]).is_err(), "a parent comes first");
    }
}
