//! Prompt lookup: the drafted tokens continue the latest earlier occurrence of the sequence's
//! last few tokens, found in the prompt or the output so far. Free to draft, and strong where the
//! answer quotes its input (questions over a document, summaries, extraction, code edits).
//!
//! For a target that verifies trees, every distinct continuation found is offered
//! ([`lookup_tree`]): the continuations of the latest [`MAX_MATCHES`] occurrences merged into a
//! trie, whose nodes are taken best first — the most occurrences through a node, then the
//! shallower, then the most recent — until the budget of nodes is spent. A phrase quoted once
//! gives a chain; one that went on several ways gives a branch per way, the most frequent and
//! most recent first.

use super::{Draft, Drafter};
use crate::Result;

/// Longest suffix matched first; a shorter one when it does not occur earlier. A single token
/// recurs too often in a long document to predict what follows it.
pub const MAX_NGRAM: usize = 3;
pub const MIN_NGRAM: usize = 2;

/// Holds nothing between calls: every draft is a search over the context.
#[derive(Debug, Default, Clone, Copy)]
pub struct NgramDrafter;

/// Earlier occurrences of the tail whose continuations a tree offers, the latest first.
pub const MAX_MATCHES: usize = 8;

impl Drafter for NgramDrafter {
    fn draft(&mut self, context: &[u32], k: usize) -> Result<Draft> {
        Ok(Draft::chain(lookup(context, k, MAX_NGRAM, MIN_NGRAM), Vec::new()))
    }

    fn draft_tree(&mut self, context: &[u32], k: usize) -> Result<Draft> {
        Ok(lookup_tree(context, k, (MAX_NGRAM, MIN_NGRAM), MAX_MATCHES))
    }
}

/// Up to `k` tokens that followed `context`'s last `n` tokens copied from position `i + n`
/// on (an occurrence at `i`), past the context's end too: a match that overlaps the tail (a
/// repeating phrase) continues with the tokens copied so far, period after period.
fn continuation(context: &[u32], i: usize, n: usize, k: usize) -> Vec<u32> {
    let len = context.len();
    let mut draft = Vec::with_capacity(k);
    for j in i + n..i + n + k {
        draft.push(if j < len { context[j] } else { draft[j - len] });
    }
    draft
}

/// One trie node: its token, parent, how many continuations pass through it and the first
/// (latest) that did.
#[derive(Debug, Clone, Copy)]
struct TrieNode {
    token: u32,
    parent: Option<usize>,
    count: usize,
    first: usize,
    depth: usize,
}

/// The continuations of the latest `max_matches` earlier occurrences of `context`'s last `n`
/// tokens (`n` from `max_n` down to `min_n`, the first that occurs wins) as a tree of at most
/// `k` nodes: see the module doc for which nodes are kept. Children come in order of
/// occurrences through them, then recency; nodes are numbered depth first, so the first
/// candidate is nodes `0..` in order (keeping it is a truncation of the verified rows).
pub fn lookup_tree(context: &[u32], k: usize, (max_n, min_n): (usize, usize), max_matches: usize) -> Draft {
    let len = context.len();
    let mut conts = Vec::new();
    for n in (min_n.max(1)..=max_n).rev() {
        if len <= n || k == 0 {
            continue;
        }
        let tail = &context[len - n..];
        conts = (0..len - n)
            .rev()
            .filter(|&i| &context[i..i + n] == tail)
            .take(max_matches.max(1))
            .map(|i| continuation(context, i, n, k))
            .collect();
        if !conts.is_empty() {
            break;
        }
    }
    // Merge into a trie.
    let mut trie: Vec<TrieNode> = Vec::new();
    for (m, cont) in conts.iter().enumerate() {
        let mut at = None;
        for (depth, &token) in cont.iter().enumerate() {
            let found = trie.iter().position(|t| t.parent == at && t.token == token);
            let i = match found {
                Some(i) => {
                    trie[i].count += 1;
                    i
                }
                None => {
                    trie.push(TrieNode { token, parent: at, count: 1, first: m, depth });
                    trie.len() - 1
                }
            };
            at = Some(i);
        }
    }
    // Best first: a node can be taken once its parent is.
    let better = |a: &TrieNode, b: &TrieNode| (b.count, a.depth, a.first) < (a.count, b.depth, b.first);
    let mut taken = vec![false; trie.len()];
    let mut frontier: Vec<usize> = (0..trie.len()).filter(|&i| trie[i].parent.is_none()).collect();
    for _ in 0..k.min(trie.len()) {
        let Some(pos) = (0..frontier.len()).reduce(|x, y| match better(&trie[frontier[y]], &trie[frontier[x]]) {
            true => y,
            false => x,
        }) else {
            break;
        };
        let i = frontier.swap_remove(pos);
        taken[i] = true;
        frontier.extend((0..trie.len()).filter(|&c| trie[c].parent == Some(i)));
    }
    // Number the taken nodes depth first, children best first.
    let mut draft = Draft::default();
    let mut stack: Vec<(usize, Option<usize>)> = Vec::new();
    let push_children = |stack: &mut Vec<(usize, Option<usize>)>, of: Option<usize>, as_: Option<usize>| {
        let mut kids: Vec<usize> = (0..trie.len()).filter(|&c| taken[c] && trie[c].parent == of).collect();
        kids.sort_by(|&a, &b| (trie[b].count, trie[a].first).cmp(&(trie[a].count, trie[b].first)));
        stack.extend(kids.into_iter().rev().map(|c| (c, as_)));
    };
    push_children(&mut stack, None, None);
    while let Some((i, parent)) = stack.pop() {
        draft.tokens.push(trie[i].token);
        draft.parents.push(parent);
        let me = draft.tokens.len() - 1;
        push_children(&mut stack, Some(i), Some(me));
    }
    draft
}

/// `k` tokens that followed the latest earlier occurrence of `context`'s last `n` tokens, `n`
/// from `max_n` down to `min_n` (the first `n` that occurs wins); empty when none does.
pub fn lookup(context: &[u32], k: usize, max_n: usize, min_n: usize) -> Vec<u32> {
    let len = context.len();
    for n in (min_n.max(1)..=max_n).rev() {
        if len <= n || k == 0 {
            continue;
        }
        let tail = &context[len - n..];
        // Starts i < len - n: an occurrence that ends before the tail does, so at least one
        // token follows it.
        if let Some(i) = (0..len - n).rev().find(|&i| &context[i..i + n] == tail) {
            return continuation(context, i, n, k);
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continues_the_latest_longest_match() {
        //         0  1  2  3  4  5  6  7  8  9  10 11
        let ctx = [5, 6, 7, 8, 9, 1, 6, 7, 2, 3, 6, 7];
        // "6 7" occurs at 1 and 6; the latest (6) is followed by 2 3 6 7, then by the draft.
        assert_eq!(lookup(&ctx, 3, 2, 1), [2, 3, 6]);
        // The tail "3 6 7" never occurred before; "6 7" did: 2 3 6 7, then 2 3 (the period).
        assert_eq!(lookup(&ctx, 6, 3, 1), [2, 3, 6, 7, 2, 3]);
        assert!(lookup(&ctx, 0, 3, 1).is_empty());
        // A tail seen nowhere before drafts nothing.
        assert!(lookup(&[1, 2, 3, 4], 4, 3, 1).is_empty());
        // A repeating token continues itself.
        assert_eq!(lookup(&[4, 4, 4], 5, 3, 1), [4; 5]);
        assert_eq!(lookup(&[9, 4, 5, 4, 5], 3, 3, 1), [4, 5, 4]);
    }

    /// (token, parent) of every node.
    fn nodes(d: &Draft) -> Vec<(u32, Option<usize>)> {
        d.tokens.iter().copied().zip(d.parents.iter().copied()).collect()
    }

    #[test]
    fn a_tree_offers_every_continuation_most_frequent_and_most_recent_first() {
        // "1 2" occurs three times before the tail: followed by 3 4, 5 6 and 3 7 (latest last).
        let ctx = [1, 2, 3, 4, 9, 1, 2, 5, 6, 9, 1, 2, 3, 7, 9, 1, 2];
        let d = lookup_tree(&ctx, 8, (2, 2), 8);
        // 3 (twice) first, then 5; below 3: 7 (the latest) before 4; numbered depth first.
        assert_eq!(
            nodes(&d),
            [(3, None), (7, Some(0)), (9, Some(1)), (4, Some(0)), (9, Some(3)), (5, None), (6, Some(5)), (9, Some(6))]
        );
        // The first candidate is nodes 0.. in order: the most frequent, latest way, as deep as
        // the budget took it breadth first.
        assert_eq!(d.first_path().tokens, [3, 7, 9]);
        assert!(d.feed_tree(1).expect("tree").is_chain_prefix(3));
        // A budget of 4 goes breadth first among equals, the latest first: the shared 3, the
        // 5, then 7 (latest) and 6 (the 5's way is later than the 4's).
        let d = lookup_tree(&ctx, 4, (2, 2), 8);
        assert_eq!(nodes(&d), [(3, None), (7, Some(0)), (5, None), (6, Some(2))]);
        // One occurrence: a chain, as lookup gives; none: nothing.
        let single = lookup_tree(&[5, 6, 7, 8, 9, 1, 6, 7], 3, (2, 2), 8);
        assert!(single.is_chain() && single.tokens == lookup(&[5, 6, 7, 8, 9, 1, 6, 7], 3, 2, 2));
        assert!(lookup_tree(&[1, 2, 3, 4], 4, (3, 1), 8).tokens.is_empty());
        // At most max_matches occurrences: the latest one only.
        assert_eq!(lookup_tree(&ctx, 2, (2, 2), 1).tokens, [3, 7]);
    }
}
