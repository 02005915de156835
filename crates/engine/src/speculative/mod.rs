//! Speculative decoding: a drafter proposes the next few tokens, the target checks them all in
//! one forward, and every accepted token saves a pass over the weights — which, with weights
//! streamed from RAM or disk, is what a token costs while the GPU waits.
//!
//! A round, for one sequence ([`Speculator::step`]):
//! 1. [`Speculator::propose`]: the drafter proposes up to K tokens after the pending one (the
//!    last emitted token, not yet fed); the session is checkpointed.
//! 2. One target forward over `proposal.feed` (the pending token and the drafts, after any
//!    backlog), every position's logits ([`Session::score`]).
//! 3. [`Speculator::accept`]: [`verify`] keeps a prefix of the drafts and adds the target's
//!    own next token; the session rolls back to the last kept position ([`Session::roll_back`]).
//!
//! A scheduler serving many sequences calls `propose` for each, verifies them all in one pass
//! over the weights with [`Session::score_batch`], then `accept` for each.
//!
//! Rollback: attention layers' KV is truncated wherever it lives (device, pinned RAM blocks,
//! spill file, sliding windows, which keep [`ollm_kv::KEEP_BACK`] positions for this). A
//! recurrent state (Qwen3-Next's DeltaNet) cannot step back: it is copied before the forward
//! ([`Session::checkpoint`], a device-to-host copy of the fixed state) and, after a partial
//! acceptance, restored; the kept tokens then ride along in the next round's forward as a
//! backlog (extra rows in a pass that happens anyway, not an extra pass over the weights).
//! The prefix cache stores only at the first token, from the prompt, so never a drafted token.
//!
//! Trees: where the target takes them ([`CausalLm::supports_tree`](ollm_models::CausalLm::supports_tree)),
//! the drafter proposes several candidate continuations ([`Drafter::draft_tree`]), the forward
//! follows the tree ([`Proposal::tree`], [`Session::score_tree`]) and [`verify_tree`] walks it.
//! Every node took a cache row in node order; nodes are numbered depth first with the first
//! candidate first, so an accepted path that is the nodes `0..m` is kept by truncation. A path that
//! turns into a later branch is truncated where it leaves the node order, and the rest of it rides
//! along in the next round's forward, as a recurrent state's kept tokens do (docs/architecture.md).

pub mod draft;
pub mod ngram;
pub mod verify;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

pub use draft::{DraftModel, ModelDrafter};
pub use ngram::NgramDrafter;
pub use verify::{TreeVerdict, Verdict, verify, verify_tree};

use crate::grammar::Grammar;
use crate::session::Checkpoint;
use crate::{EngineError, Result, Sampler, SamplingParams, Session};

/// Drafted tokens — a chain, or the nodes of a tree of candidate continuations — and, when
/// they were drawn from a distribution, that distribution.
#[derive(Debug, Clone, Default)]
pub struct Draft {
    pub tokens: Vec<u32>,
    /// Per token, the draft's probabilities over its vocabulary (dense) at the token's parent,
    /// which the token was drawn from; empty when the tokens were proposed without one (n-gram
    /// lookup, greedy drafting): a point mass on each.
    pub probs: Vec<Vec<f32>>,
    /// Per token, its parent among the tokens (None: it follows the pending token, the tree's
    /// root); a parent comes before its children, and siblings are tried in order. Empty: a
    /// chain, each token following the one before.
    pub parents: Vec<Option<usize>>,
}

impl Draft {
    /// A chain of tokens.
    pub fn chain(tokens: Vec<u32>, probs: Vec<Vec<f32>>) -> Self {
        Self { tokens, probs, parents: Vec::new() }
    }

    /// The probability the draft gave token `x` at node `i`'s place (among node i's siblings).
    pub fn q(&self, i: usize, x: u32) -> f32 {
        match self.probs.get(i) {
            Some(q) => q.get(x as usize).copied().unwrap_or(0.0),
            None => f32::from(u8::from(self.tokens.get(i) == Some(&x))),
        }
    }

    /// Node `i`'s parent (None: the pending token).
    pub fn parent(&self, i: usize) -> Option<usize> {
        match self.parents.get(i) {
            Some(&p) => p,
            None => i.checked_sub(1),
        }
    }

    /// Whether every token follows the one before (no branches).
    pub fn is_chain(&self) -> bool {
        (0..self.tokens.len()).all(|i| self.parent(i) == i.checked_sub(1))
    }

    /// The children of `parent` (None: the pending token), in the order they are tried.
    pub fn children(&self, parent: Option<usize>) -> Vec<usize> {
        (0..self.tokens.len()).filter(|&i| self.parent(i) == parent).collect()
    }

    /// The first candidate: from the root, each node's first child, as a chain (what a model
    /// that cannot verify trees checks).
    pub fn first_path(&self) -> Draft {
        let mut out = Draft::default();
        let mut at = None;
        while let Some(&c) = self.children(at).first() {
            out.tokens.push(self.tokens[c]);
            if let Some(q) = self.probs.get(c) {
                out.probs.push(q.clone());
            }
            at = Some(c);
        }
        out
    }

    /// The tree over a verification feed of `before` tokens (a backlog and the pending token,
    /// a chain) and then these drafts, the pending token (`before - 1`) their root.
    pub fn feed_tree(&self, before: usize) -> Result<ollm_models::TreeMask> {
        let mut parents: Vec<Option<usize>> = (0..before).map(|i| i.checked_sub(1)).collect();
        let pending = before.checked_sub(1);
        parents.extend((0..self.tokens.len()).map(|i| self.parent(i).map_or(pending, |p| Some(before + p))));
        Ok(ollm_models::TreeMask::new(&parents).map_err(ollm_models::ModelError::from)?)
    }
}

/// Proposes tokens to follow a context.
pub trait Drafter: Send + std::fmt::Debug {
    /// Up to `k` tokens to follow `context` (every token of the sequence; the target has not
    /// seen the last one yet), as a chain.
    fn draft(&mut self, context: &[u32], k: usize) -> Result<Draft>;

    /// Up to `k` tokens as a tree of candidate continuations ([`Draft::parents`]), for a
    /// target that verifies trees in one forward. The default drafts a chain.
    fn draft_tree(&mut self, context: &[u32], k: usize) -> Result<Draft> {
        self.draft(context, k)
    }
}

/// Kept tokens waiting to be fed again (a recurrent state restored past them, or a path through
/// a later branch) past which a round drafts nothing: it feeds them with the pending token, all
/// kept, and the backlog empties. A recurrent state is restored to the round's start on every
/// rejection, so without this bound a run of rejected rounds re-feeds an ever longer backlog.
const MAX_BACKLOG: usize = 32;

/// Which drafter.
#[derive(Debug, Clone)]
pub enum Speculate {
    /// Prompt lookup ([`NgramDrafter`]).
    Ngram,
    /// A small model with the target's tokenizer ([`ModelDrafter`]).
    Draft(Arc<DraftModel>),
}

/// How many tokens to draft per round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DraftTokens {
    Fixed(usize),
    /// Chosen each round from the measured cost of a round against the acceptance seen so
    /// far, at most [`AUTO_MAX_DRAFT`].
    Auto,
}

/// The most tokens `auto` drafts per round.
pub const AUTO_MAX_DRAFT: usize = 64;

impl FromStr for DraftTokens {
    type Err = String;

    /// `auto` or a positive count.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "auto" => Ok(Self::Auto),
            n => match n.parse::<usize>() {
                Ok(k) if k >= 1 => Ok(Self::Fixed(k)),
                _ => Err(format!("'{s}': expected auto or a number of tokens >= 1")),
            },
        }
    }
}

/// Speculative decoding for one generation.
#[derive(Debug, Clone)]
pub struct SpeculateParams {
    pub method: Speculate,
    pub draft_tokens: DraftTokens,
    /// Whether drafts may branch into a tree of candidates where the target verifies trees
    /// ([`CausalLm::supports_tree`](ollm_models::CausalLm::supports_tree)); false: chains only.
    /// The default (`new`) is true.
    pub trees: bool,
}

impl SpeculateParams {
    /// `method` drafting `draft_tokens` per round, in trees where the target takes them.
    pub fn new(method: Speculate, draft_tokens: DraftTokens) -> Self {
        Self { method, draft_tokens, trees: true }
    }
}

/// Counts of one generation's speculation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SpecStats {
    /// Verification forwards of the target.
    pub passes: usize,
    /// Tokens drafted, and those the target kept.
    pub drafted: usize,
    pub accepted: usize,
    /// Kept tokens fed to the target again: after a recurrent state was restored, or because
    /// their tree path left the order of the verified rows.
    pub refed: usize,
    /// Tokens drafted in the last round (with `auto`, its latest choice; tree nodes).
    pub draft_tokens: usize,
    /// Verification forwards whose drafts branched (a tree, not a chain).
    pub tree_passes: usize,
    /// Accepted tokens fed again because their path left the order of the verified rows (a
    /// later branch of a tree); counted in `refed` too.
    pub branch_refed: usize,
}

impl SpecStats {
    /// Tokens each verification forward produced (the kept drafts and the target's own).
    pub fn tokens_per_pass(&self) -> f64 {
        (self.accepted + self.passes) as f64 / self.passes.max(1) as f64
    }

    /// Share of drafted tokens kept.
    pub fn acceptance(&self) -> f64 {
        self.accepted as f64 / self.drafted.max(1) as f64
    }

    /// The counts since `earlier` (for per-window reports).
    pub fn since(&self, earlier: &SpecStats) -> SpecStats {
        SpecStats {
            passes: self.passes - earlier.passes,
            drafted: self.drafted - earlier.drafted,
            accepted: self.accepted - earlier.accepted,
            refed: self.refed - earlier.refed,
            draft_tokens: self.draft_tokens,
            tree_passes: self.tree_passes - earlier.tree_passes,
            branch_refed: self.branch_refed - earlier.branch_refed,
        }
    }
}

/// One round's drafts, waiting for the target's verification forward.
#[derive(Debug)]
pub struct Proposal {
    /// What the verification forward feeds, in order: the backlog (tokens kept earlier that a
    /// restored recurrent state lacks, or a tree's kept branch), the pending token, the drafts.
    pub feed: Vec<u32>,
    /// Some when the drafts branch: the tree over `feed` the forward must follow
    /// ([`Session::score_tree`], [`Session::score_batch_trees`]).
    pub tree: Option<ollm_models::TreeMask>,
    draft: Draft,
    backlog: usize,
    checkpoint: Checkpoint,
    started: Instant,
}

/// Owns the drafter and the state speculation carries between rounds of one sequence: the
/// backlog, the `auto` estimates and the counts.
#[derive(Debug)]
pub struct Speculator {
    drafter: Box<dyn Drafter>,
    draft_tokens: DraftTokens,
    /// Whether the drafter is asked for trees (where the target verifies them).
    trees: bool,
    auto: AutoDraft,
    /// Kept tokens the target's state does not hold yet (after a recurrent state's restore).
    backlog: Vec<u32>,
    stats: SpecStats,
}

impl Speculator {
    pub fn new(params: &SpeculateParams, sampling: &SamplingParams) -> Result<Self> {
        let drafter: Box<dyn Drafter> = match &params.method {
            Speculate::Ngram => Box::new(NgramDrafter),
            Speculate::Draft(model) => Box::new(ModelDrafter::new(model, sampling)?),
        };
        Ok(Self { trees: params.trees, ..Self::with_drafter(drafter, params.draft_tokens) })
    }

    /// Speculation with any drafter (trees where the target takes them).
    pub fn with_drafter(drafter: Box<dyn Drafter>, draft_tokens: DraftTokens) -> Self {
        Self {
            drafter,
            draft_tokens,
            trees: true,
            auto: AutoDraft::default(),
            backlog: Vec::new(),
            stats: SpecStats::default(),
        }
    }

    pub fn stats(&self) -> &SpecStats {
        &self.stats
    }

    /// Drafts up to `limit` tokens (fewer where the context ends) after `pending`, the last
    /// emitted token, and checkpoints the session. Next: one forward over `feed` whose every
    /// position's logits go to [`accept`](Self::accept), with the fed ids appended to the
    /// session's tokens ([`Session::score`] does both).
    pub fn propose(&mut self, session: &Session, pending: u32, limit: usize) -> Result<Proposal> {
        self.propose_within(session, pending, limit, None)
    }

    /// [`propose`](Self::propose), the draft cut at its first token `grammar` forbids (the
    /// grammar as it stands after `pending`; it does not move), so that no such token is verified.
    pub fn propose_within(
        &mut self,
        session: &Session,
        pending: u32,
        limit: usize,
        grammar: Option<&Grammar>,
    ) -> Result<Proposal> {
        let started = Instant::now();
        let mut context = Vec::with_capacity(session.len() + self.backlog.len() + 1);
        context.extend_from_slice(session.tokens());
        context.extend_from_slice(&self.backlog);
        context.push(pending);
        let room = session.model().info().max_positions.saturating_sub(context.len());
        let k = match self.draft_tokens {
            DraftTokens::Fixed(k) => k,
            DraftTokens::Auto => self.auto.choose(),
        }
        .min(limit)
        .min(room)
        .min(if self.backlog.len() >= MAX_BACKLOG { 0 } else { usize::MAX });
        // A model that verifies trees gets the drafter's tree; one that cannot (a recurrent
        // state has one value per sequence) a chain, as does a sequence attached to a shared
        // prefix (tree attention reads the sequence's own cache only) and one under a grammar
        // (its rows are masked along one path).
        let trees =
            self.trees && grammar.is_none() && session.model().supports_tree() && session.state().shared_len() == 0;
        let mut draft = match k {
            0 => Draft::default(),
            k if trees => self.drafter.draft_tree(&context, k)?,
            k => self.drafter.draft(&context, k)?,
        };
        if let Some(g) = grammar.filter(|_| !draft.tokens.is_empty()) {
            let allowed = g.clone().allowed_prefix(&draft.tokens)?;
            draft.tokens.truncate(allowed);
            draft.probs.truncate(allowed);
        }
        let backlog = self.backlog.len();
        let tree = match draft.is_chain() {
            true => None,
            false => Some(draft.feed_tree(backlog + 1)?),
        };
        let mut feed = std::mem::take(&mut self.backlog);
        feed.push(pending);
        feed.extend_from_slice(&draft.tokens);
        self.stats.draft_tokens = k;
        // Without drafts every fed token is kept: a recurrent state needs no copy.
        let checkpoint = match draft.tokens.is_empty() {
            true => session.checkpoint_keeping_all(),
            false => session.checkpoint()?,
        };
        Ok(Proposal { feed, tree, draft, backlog, checkpoint, started })
    }

    /// Verifies the proposal against `logits`, `[proposal.feed.len(), vocab]` from the forward
    /// that appended `feed` to the session, and rolls the session back to the kept tokens.
    /// Returns the tokens to emit: the kept drafts and the target's own next token (not fed yet:
    /// the next round's pending token).
    pub fn accept(
        &mut self,
        session: &mut Session,
        proposal: Proposal,
        logits: &mut [f32],
        sampler: &mut Sampler,
    ) -> Result<Vec<u32>> {
        self.accept_within(session, proposal, logits, sampler, None)
    }

    /// [`accept`](Self::accept) under `grammar` (as it stands after the pending token): each
    /// verified row is first masked as plain constrained decoding masks it (a proposal under a
    /// grammar is a chain: [`propose_within`](Self::propose_within)).
    pub fn accept_within(
        &mut self,
        session: &mut Session,
        proposal: Proposal,
        logits: &mut [f32],
        sampler: &mut Sampler,
        grammar: Option<&Grammar>,
    ) -> Result<Vec<u32>> {
        let Proposal { feed, tree, draft, backlog, checkpoint, started } = proposal;
        let vocab = logits.len() / feed.len().max(1);
        let k = draft.tokens.len();
        let history = session.tokens()[..session.len().saturating_sub(k)].to_vec();
        // As a plain step does: NaN or infinite logits are an error naming the position, and
        // the sequence goes back to where the forward started.
        let rows = &logits[backlog * vocab..];
        if let Some((i, &value)) = rows.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            let position = session.len() - feed.len() + backlog + i / vocab;
            session.roll_back(&checkpoint, 0)?;
            return Err(EngineError::NonFiniteLogits { position, token: i % vocab, value });
        }
        if let Some(g) = grammar
            && let Err(e) = mask_rows(g.clone(), &draft.tokens, &mut logits[backlog * vocab..], vocab)
        {
            session.roll_back(&checkpoint, 0)?;
            return Err(e);
        }
        let rows = &mut logits[backlog * vocab..];
        let verdict = match tree {
            None => {
                let v = verify(rows, vocab, &draft, &history, sampler);
                TreeVerdict { path: (0..v.accepted).collect(), next: v.next }
            }
            Some(_) => verify_tree(rows, vocab, &draft, &history, sampler),
        };
        // The kept tokens: the backlog, the pending token and the accepted path. The rows of
        // those that are a prefix of the feed are in the cache at their positions already; a
        // path that turned into a later branch is truncated where it left the feed's order, and
        // the rest of it rides along in the next forward (rows in a pass that happens anyway).
        let accepted = verdict.path.len();
        let in_order = verdict.path.iter().enumerate().take_while(|&(i, &node)| i == node).count();
        let mut kept = feed[..backlog + 1].to_vec();
        kept.extend(verdict.path.iter().map(|&node| draft.tokens[node]));
        let held = session.roll_back(&checkpoint, backlog + 1 + in_order)?;
        self.backlog = kept[held..].to_vec();
        self.stats.passes += 1;
        self.stats.drafted += k;
        self.stats.accepted += accepted;
        self.stats.refed += backlog;
        if tree.is_some() {
            self.stats.tree_passes += 1;
            self.stats.branch_refed += accepted - in_order;
        }
        self.auto.record(k, accepted, started.elapsed().as_secs_f64());
        let mut out = kept[backlog + 1..].to_vec();
        out.push(verdict.next);
        Ok(out)
    }

    /// One round for one sequence: propose, one target forward, accept. With a `grammar` (as it
    /// stands after `pending`), the draft is cut at its first forbidden token and each verified
    /// row is masked as plain constrained decoding masks it (the grammar advanced through the
    /// drafts before it), so the tokens kept are those plain constrained decoding gives (greedy)
    /// or have its distribution (sampled). The grammar itself does not move: the caller accepts
    /// the returned tokens into it.
    pub fn step(
        &mut self,
        session: &mut Session,
        pending: u32,
        limit: usize,
        sampler: &mut Sampler,
        grammar: Option<&Grammar>,
    ) -> Result<Vec<u32>> {
        let proposal = self.propose_within(session, pending, limit, grammar)?;
        let mut logits = match &proposal.tree {
            Some(tree) => session.score_tree(&proposal.feed, tree)?,
            None => session.score(&proposal.feed, None)?,
        };
        self.accept_within(session, proposal, &mut logits, sampler, grammar)
    }
}

/// Masks row j of `rows` (the distribution after the j-th draft) to what `g` allows once it has
/// accepted the drafts before it; stops at an eos or a complete grammar (the sequence ends there,
/// so later rows are never used).
fn mask_rows(mut g: Grammar, draft: &[u32], rows: &mut [f32], vocab: usize) -> Result<()> {
    for (j, row) in rows.chunks_mut(vocab).enumerate() {
        g.apply(row)?;
        match draft.get(j) {
            Some(&d) if !g.is_eos(d) => g.accept(d)?,
            _ => break,
        }
        if g.is_finished() {
            break;
        }
    }
    Ok(())
}

/// `--draft-tokens auto`: running estimates (decayed by [`AutoDraft::DECAY`] per round) of the
/// acceptance rate `a` and of a round's cost as `c0 + c1 * k` seconds; each round drafts the `k`
/// that maximises expected tokens per second, `(1 - a^(k+1)) / (1 - a) / (c0 + c1 k)` (a
/// token kept with probability `a`, independently, until the first rejection). That may be 0
/// (drafts cost more than they save, as on a compute-bound CPU with a weak drafter); then every
/// [`AutoDraft::PROBE`]th round drafts one token, so that a drafter that improves is noticed.
#[derive(Debug, Clone, Default)]
struct AutoDraft {
    drafted: f64,
    accepted: f64,
    /// Decayed sums for the least-squares line of cost against k: n, Σk, Σk², Σt, Σkt.
    n: f64,
    sk: f64,
    skk: f64,
    st: f64,
    skt: f64,
    last: usize,
    /// Rounds in a row chosen without drafts.
    idle: usize,
}

impl AutoDraft {
    const DECAY: f64 = 0.9;
    const START: usize = 4;
    const PROBE: usize = 16;

    fn record(&mut self, k: usize, accepted: usize, secs: f64) {
        let d = Self::DECAY;
        let kf = k as f64;
        self.drafted = self.drafted * d + kf;
        self.accepted = self.accepted * d + accepted as f64;
        self.n = self.n * d + 1.0;
        self.sk = self.sk * d + kf;
        self.skk = self.skk * d + kf * kf;
        self.st = self.st * d + secs;
        self.skt = self.skt * d + kf * secs;
    }

    fn choose(&mut self) -> usize {
        // Acceptance with one kept and one rejected token of prior, at most 0.99.
        let a = ((self.accepted + 1.0) / (self.drafted + 2.0)).min(0.99);
        let var = self.skk / self.n.max(1e-9) - (self.sk / self.n.max(1e-9)).powi(2);
        let k = if self.n < 2.0 || var < 0.25 {
            // Too little spread in k to fit a cost: explore upwards from where we are.
            match self.last {
                0 => Self::START,
                k => (k + k.div_ceil(2)).min(AUTO_MAX_DRAFT),
            }
        } else {
            let c1 = ((self.skt - self.sk * self.st / self.n) / (self.skk - self.sk * self.sk / self.n)).max(0.0);
            let c0 = ((self.st - c1 * self.sk) / self.n).max(1e-6);
            let rate = |k: usize| (1.0 - a.powi(k as i32 + 1)) / (1.0 - a) / (c0 + c1 * k as f64);
            (0..=AUTO_MAX_DRAFT).max_by(|&x, &y| rate(x).total_cmp(&rate(y))).unwrap_or(Self::START)
        };
        self.idle = if k == 0 { self.idle + 1 } else { 0 };
        let k = if self.idle >= Self::PROBE { 1 } else { k };
        if k > 0 {
            self.idle = 0;
        }
        self.last = k;
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draft_tokens_parse() {
        assert_eq!("auto".parse::<DraftTokens>(), Ok(DraftTokens::Auto));
        assert_eq!("8".parse::<DraftTokens>(), Ok(DraftTokens::Fixed(8)));
        for bad in ["0", "-1", "x", ""] {
            assert!(bad.parse::<DraftTokens>().expect_err(bad).contains("auto"));
        }
    }

    #[test]
    fn auto_drafts_more_when_a_pass_costs_the_same_and_none_when_drafts_cost_more() {
        // Offload regime: 1 s a round whatever k, 90 % kept: draft the most.
        let mut flat = AutoDraft::default();
        // Compute bound: each drafted token costs as much as the pass, 30 % kept: drafting
        // loses, so none (but a probe of one every PROBE rounds).
        let mut linear = AutoDraft::default();
        for round in 0..40 {
            let k = flat.choose();
            flat.record(k, (k as f64 * 0.9) as usize, 1.0);
            let k = 1 + round % 4; // spread the k's so the cost line can be fitted
            linear.record(k, (k as f64 * 0.3) as usize, 0.1 * (1 + k) as f64);
        }
        assert!(flat.choose() >= 32, "flat cost: {}", flat.choose());
        let picks: Vec<usize> = (0..AutoDraft::PROBE).map(|_| linear.choose()).collect();
        assert_eq!(picks.iter().filter(|&&k| k == 0).count(), AutoDraft::PROBE - 1, "{picks:?}");
        assert_eq!(picks.last(), Some(&1), "{picks:?}");
    }
}
