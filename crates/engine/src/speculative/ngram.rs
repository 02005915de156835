//! Prompt lookup: the drafted tokens continue the latest earlier occurrence of the sequence's
//! last few tokens, found in the prompt or the output so far. Free to draft, and strong where the
//! answer quotes its input (questions over a document, summaries, extraction, code edits).

use super::{Draft, Drafter};
use crate::Result;

/// Longest suffix matched first; a shorter one when it does not occur earlier. A single token
/// recurs too often in a long document to predict what follows it.
pub const MAX_NGRAM: usize = 3;
pub const MIN_NGRAM: usize = 2;

/// Holds nothing between calls: every draft is a search over the context.
#[derive(Debug, Default, Clone, Copy)]
pub struct NgramDrafter;

impl Drafter for NgramDrafter {
    fn draft(&mut self, context: &[u32], k: usize) -> Result<Draft> {
        Ok(Draft { tokens: lookup(context, k, MAX_NGRAM, MIN_NGRAM), probs: Vec::new() })
    }
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
            // Copied as far as k, past the context's end too: a match that overlaps the tail
            // (a repeating phrase) continues with the tokens drafted so far, period after period.
            let mut draft = Vec::with_capacity(k);
            for j in i + n..i + n + k {
                draft.push(if j < len { context[j] } else { draft[j - len] });
            }
            return draft;
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
}
