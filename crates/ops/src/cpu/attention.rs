//! Causal attention with GQA, an optional sliding window and optional per-head sinks, in f32,
//! in the flash-attention form: no `T × T` score matrix, at any context.
//!
//! The KV cache is f32 (the oracle) or bf16 ([`KvElem`]): bf16 keys and values are widened to
//! f32 in registers as they are loaded (the same panels as the bf16-weight matmul), so a bf16
//! cache halves the bytes attention reads and changes nothing else.
//!
//! A task takes one KV head, a block of up to [`Q_BLOCK`] query tokens (all the query heads of
//! that KV head, so each key is read once for the group) and a range of keys. It walks the keys
//! in tiles of [`K_BLOCK`]: scores `S = Q·Kᵀ` through the matmul panel of the active kernel tier,
//! the causal/window mask, an online softmax (running max `m` and normaliser `l` per row, the
//! partial output rescaled when `m` grows), then `O += P·V`. Decode has few query rows, so its
//! keys are also split over tasks (flash-decoding) and the partial `(m, l, O)` are merged; a sink
//! logit starts every row's `(m, l)` as one more key whose value is zero.

use half::bf16;

use super::kernels::{Kernels, Panel, PvRows, Widen};
use crate::TreeMask;
pub use crate::backend::AttnGeometry as Geometry;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
}

/// An element of a KV cache attention reads: f32 or bf16, with the kernels that read it.
pub trait KvElem: Widen + sealed::Sealed {
    /// The panel for `S = Q·Kᵀ` (f32 queries against keys of this type).
    fn qk_panel(kern: &Kernels) -> Panel<f32, Self>;
    /// `O += P·V` row by row over values of this type.
    fn pv_rows(kern: &Kernels) -> PvRows<Self>;
}

impl KvElem for f32 {
    fn qk_panel(kern: &Kernels) -> Panel<f32, f32> {
        kern.f32_f32
    }
    fn pv_rows(kern: &Kernels) -> PvRows<f32> {
        kern.pv_rows
    }
}

impl KvElem for bf16 {
    fn qk_panel(kern: &Kernels) -> Panel<f32, bf16> {
        kern.f32_bf16
    }
    fn pv_rows(kern: &Kernels) -> PvRows<bf16> {
        kern.pv_rows_bf16
    }
}

/// Query tokens per task.
const Q_BLOCK: usize = 16;
/// Keys per tile (`rows × K_BLOCK` scores stay in L1/L2).
const K_BLOCK: usize = 128;
/// The fewest keys a split of one row's keys gets (below this, merging costs more than it saves).
const MIN_SPLIT_KEYS: usize = 512;
/// Rows (query tokens × heads of a group) from which `P·V` goes through the matmul panel on a
/// transposed V tile rather than row by row.
const PANEL_PV_ROWS: usize = 16;
/// Calls of at most this many query tokens (decode steps, speculative verifications, batched
/// segments, trees) compute every row the same way whatever the call's other rows: keys split on a
/// fixed grid of [`MIN_SPLIT_KEYS`] positions, tiles starting at multiples of [`K_BLOCK`], `P·V`
/// row by row. So a row's result is bit for bit the same alone or beside others, and a
/// verification forward gives the logits one-row decoding gives (exact speculative greedy also with
/// bf16 activations, whose rounding would turn a last-bit difference into a flipped near tie).
/// Longer calls (prefill chunks) split keys only to feed idle threads and use the `P·V` panel.
const GRID_ROWS: usize = 256;

/// q, out `[T, n_heads, d]`; k, v `[n_kv, cap, d]`. Query t sits at position `pos0 + t` and sees
/// keys `j` with `j <= pos0 + t` and, with a window W, `j > pos0 + t - W`.
#[allow(clippy::too_many_arguments)]
pub fn attention<E: KvElem>(
    q: &[f32],
    k: &[E],
    v: &[E],
    g: &Geometry,
    scale: f32,
    window: Option<usize>,
    sinks: Option<&[f32]>,
    out: &mut [f32],
) {
    attention_with(Kernels::active(), q, k, v, g, scale, window, sinks, out);
}

/// One task: KV head `kvh`, query tokens `t0..t0 + tt`, keys `keys` (absolute positions).
#[derive(Debug, Clone)]
struct Task {
    kvh: usize,
    t0: usize,
    tt: usize,
    keys: std::ops::Range<usize>,
    /// On the grid (short calls, [`GRID_ROWS`]): the position of cache row 0, tiles then end at
    /// positions that are multiples of [`K_BLOCK`] and `P·V` runs row by row. None: tiles of
    /// [`K_BLOCK`] from the first key, `P·V` through the matmul panel for many rows.
    tiles: Option<usize>,
}

/// A task's unnormalised result: per row (token-major, then head of the group) the running max,
/// the normaliser and `Σ e^(s - m) · v`.
struct Partial {
    m: Vec<f32>,
    l: Vec<f32>,
    o: Vec<f32>,
}

/// [`attention`] on the given kernels.
#[allow(clippy::too_many_arguments)]
pub fn attention_with<E: KvElem>(
    kern: &Kernels,
    q: &[f32],
    k: &[E],
    v: &[E],
    g: &Geometry,
    scale: f32,
    window: Option<usize>,
    sinks: Option<&[f32]>,
    out: &mut [f32],
) {
    attention_masked(kern, q, (k, v, g), (scale, window, sinks), None, 0, out);
}

/// [`attention_with`], the rows optionally the nodes of a tree ([`TreeMask`]): node i sits at
/// position `pos0 + depth(i)` (its cache row is `pos0 + i`) and sees the rows before `pos0` and its
/// ancestors' rows. A node whose ancestors are the rows just before it (a path kept in order) is
/// computed exactly as the row of a chain. `origin` is the position of cache row 0 (a sliding or
/// offloaded cache's base): a short call's grid is laid on positions, not rows.
pub(crate) fn attention_masked<E: KvElem>(
    kern: &Kernels,
    q: &[f32],
    (k, v, g): (&[E], &[E], &Geometry),
    (scale, window, sinks): (f32, Option<usize>, Option<&[f32]>),
    tree: Option<&TreeMask>,
    origin: usize,
    out: &mut [f32],
) {
    let (d, t) = (g.d, out.len() / (g.n_heads * g.d).max(1));
    if t == 0 || d == 0 {
        return;
    }
    let parts = source_parts(kern, q, (k, v, g), scale, window, (tree, origin), t);
    merge(&parts, g, sinks, t, out);
}

/// [`attention`] over two caches: a shared prefix `pk`, `pv` `[n_kv, pg.cap, d]` holding
/// positions `0..p` (`p <= pg.cap`), then the sequence's own rows `k`, `v` `[n_kv, g.cap, d]`,
/// row `r` holding position `p + r`. The queries sit at own rows `g.pos0..` (positions
/// `p + g.pos0..`). The prefix's rows and the own rows up to the last query's are joined per head
/// into one temporary cache and attended as one: the result is bit for bit what a private cache
/// of the same positions gives (the same tasks, the same order of sums), so a sequence's text
/// does not depend on whether its prefix is shared. The copy is transient, one layer's at a time;
/// what sharing saves is the prefix held once.
#[allow(clippy::too_many_arguments)]
pub fn attention_prefixed<E: KvElem>(
    q: &[f32],
    (pk, pv, p): (&[E], &[E], usize),
    (k, v): (&[E], &[E]),
    (pg, g): (&Geometry, &Geometry),
    scale: f32,
    window: Option<usize>,
    sinks: Option<&[f32]>,
    out: &mut [f32],
) {
    attention_prefixed_at(q, (pk, pv, p), (k, v), (pg, g), (scale, window, sinks), 0, out);
}

/// [`attention_prefixed`] whose prefix rows start at position `origin` (a sliding-window
/// layer's shared prefix holds only the tail its window still sees): the joined cache's row 0
/// is position `origin`, and a short call's key grid is laid on positions from there, so each
/// row is bit for bit the row of a private cache holding the same positions.
pub fn attention_prefixed_at<E: KvElem>(
    q: &[f32],
    (pk, pv, p): (&[E], &[E], usize),
    (k, v): (&[E], &[E]),
    (pg, g): (&Geometry, &Geometry),
    (scale, window, sinks): (f32, Option<usize>, Option<&[f32]>),
    origin: usize,
    out: &mut [f32],
) {
    let (d, t) = (g.d, out.len() / (g.n_heads * g.d).max(1));
    if t == 0 || d == 0 {
        return;
    }
    let rows = g.pos0 + t;
    let cap = p + rows;
    let join = |pre: &[E], own: &[E]| -> Vec<E> {
        let mut all = Vec::with_capacity(g.n_kv * cap * d);
        for h in 0..g.n_kv {
            all.extend_from_slice(&pre[h * pg.cap * d..][..p * d]);
            all.extend_from_slice(&own[h * g.cap * d..][..rows * d]);
        }
        all
    };
    let (jk, jv) = (join(pk, k), join(pv, v));
    let whole = Geometry { cap, pos0: p + g.pos0, ..*g };
    attention_masked(Kernels::active(), q, (&jk, &jv, &whole), (scale, window, sinks), None, origin, out);
}

/// The call's tasks, run: each a partial over its keys.
fn source_parts<E: KvElem>(
    kern: &Kernels,
    q: &[f32],
    (k, v, g): (&[E], &[E], &Geometry),
    scale: f32,
    window: Option<usize>,
    (tree, origin): (Option<&TreeMask>, usize),
    t: usize,
) -> Vec<(Task, Partial)> {
    let lo = |p: usize| window.map_or(0, |w| (p + 1).saturating_sub(w));
    let grid = (t <= GRID_ROWS || tree.is_some()).then_some(origin);
    let tasks = plan(g, t, window, grid);
    // Through the step's spinning helpers where there is a step (a decode step's attention is
    // one short region per layer); each task fills its own slot.
    let slots: Vec<std::sync::OnceLock<Partial>> = tasks.iter().map(|_| Default::default()).collect();
    super::busy::parallel_parts(tasks.len(), |i| {
        let _ = slots[i].set(run_task(kern, q, (k, v, g), scale, (window, &lo), tree, &tasks[i]));
    });
    tasks.into_iter().zip(slots).map(|(task, slot)| (task, slot.into_inner().expect("every task ran"))).collect()
}

/// Merges the partials per (token, head) into out, then normalises; a sink starts each row's
/// `(m, l)`.
fn merge(parts: &[(Task, Partial)], g: &Geometry, sinks: Option<&[f32]>, t: usize, out: &mut [f32]) {
    let (d, group) = (g.d, g.n_heads / g.n_kv);
    let rows_all = t * g.n_heads;
    let mut m = vec![f32::NEG_INFINITY; rows_all];
    let mut l = vec![0.0f32; rows_all];
    if let Some(s) = sinks {
        for (i, (mi, li)) in m.iter_mut().zip(l.iter_mut()).enumerate() {
            *mi = s[i % g.n_heads];
            *li = 1.0;
        }
    }
    out[..rows_all * d].fill(0.0);
    for (task, part) in parts {
        for (r, (&pm, &pl)) in part.m.iter().zip(&part.l).enumerate() {
            let (ti, gi) = (r / group, r % group);
            let idx = (task.t0 + ti) * g.n_heads + task.kvh * group + gi;
            let mx = m[idx].max(pm);
            if mx == f32::NEG_INFINITY {
                continue;
            }
            let (a, b) = ((m[idx] - mx).exp(), (pm - mx).exp());
            m[idx] = mx;
            l[idx] = l[idx] * a + pl * b;
            let o = &mut out[idx * d..][..d];
            for (ov, pv) in o.iter_mut().zip(&part.o[r * d..][..d]) {
                *ov = *ov * a + pv * b;
            }
        }
    }
    for (o, &li) in out[..rows_all * d].chunks_exact_mut(d).zip(&l) {
        let inv = 1.0 / li;
        o.iter_mut().for_each(|x| *x *= inv);
    }
}

/// The first row at or after `row` whose position (`row + origin`) is a multiple of `step`.
fn next_boundary(row: usize, origin: usize, step: usize) -> usize {
    ((row + origin) / step + 1) * step - origin
}

/// The last row at or before `row` whose position is a multiple of `step` (row 0 if none).
fn boundary_at_or_before(row: usize, origin: usize, step: usize) -> usize {
    ((row + origin) / step * step).saturating_sub(origin)
}

/// Splits the call into tasks: (KV head, query block), and keys. On the grid (short calls,
/// [`GRID_ROWS`]; `grid` is the position of cache row 0) keys split at positions that are
/// multiples of [`MIN_SPLIT_KEYS`] and tiles start at multiples of [`K_BLOCK`], whatever the
/// call's rows and wherever its cache starts; otherwise keys split only when there are few tasks,
/// so that every thread has work.
fn plan(g: &Geometry, t: usize, window: Option<usize>, grid: Option<usize>) -> Vec<Task> {
    let lo = |p: usize| window.map_or(0, |w| (p + 1).saturating_sub(w));
    let n_qblocks = t.div_ceil(Q_BLOCK);
    let base = g.n_kv * n_qblocks;
    let want = 4 * rayon::current_num_threads();
    let span = g.pos0 + t - lo(g.pos0);
    let split_len = match grid {
        Some(_) => MIN_SPLIT_KEYS,
        None => {
            let splits = if base >= want { 1 } else { want.div_ceil(base).min(span.div_ceil(MIN_SPLIT_KEYS)).max(1) };
            span.div_ceil(splits).div_ceil(K_BLOCK) * K_BLOCK
        }
    };
    let start = match grid {
        Some(origin) => boundary_at_or_before(lo(g.pos0), origin, MIN_SPLIT_KEYS),
        None => lo(g.pos0),
    };
    let mut tasks = Vec::with_capacity(base * span.div_ceil(split_len).max(1));
    for kvh in 0..g.n_kv {
        for qb in 0..n_qblocks {
            let (t0, tt) = (qb * Q_BLOCK, Q_BLOCK.min(t - qb * Q_BLOCK));
            let (mut first, last) = (lo(g.pos0 + t0), g.pos0 + t0 + tt - 1);
            if let Some(origin) = grid {
                first = boundary_at_or_before(first, origin, K_BLOCK);
            }
            let mut s = start;
            while s <= last {
                let e = match grid {
                    Some(origin) => next_boundary(s, origin, split_len),
                    None => s + split_len,
                };
                let keys = s.max(first)..e.min(last + 1);
                if !keys.is_empty() {
                    tasks.push(Task { kvh, t0, tt, keys, tiles: grid });
                }
                s = e;
            }
        }
    }
    tasks
}

/// One task's tiles; see the module doc.
#[allow(clippy::too_many_arguments)]
fn run_task<E: KvElem>(
    kern: &Kernels,
    q: &[f32],
    (k, v, g): (&[E], &[E], &Geometry),
    scale: f32,
    (window, lo): (Option<usize>, &dyn Fn(usize) -> usize),
    tree: Option<&TreeMask>,
    task: &Task,
) -> Partial {
    let (d, group) = (g.d, g.n_heads / g.n_kv);
    let rows = task.tt * group;
    // Q rows of this task: [tt, group, d] gathered from q [T, n_heads, d].
    let mut qbuf = Vec::with_capacity(rows * d);
    for ti in 0..task.tt {
        let at = ((task.t0 + ti) * g.n_heads + task.kvh * group) * d;
        qbuf.extend_from_slice(&q[at..at + group * d]);
    }
    let kbase = &k[task.kvh * g.cap * d..(task.kvh + 1) * g.cap * d];
    let vbase = &v[task.kvh * g.cap * d..(task.kvh + 1) * g.cap * d];
    let mut m = vec![f32::NEG_INFINITY; rows];
    let mut l = vec![0.0f32; rows];
    let mut o = vec![0.0f32; rows * d];
    let mut s = vec![0.0f32; rows * K_BLOCK];
    let mut corr = vec![1.0f32; rows];
    let use_panel = task.tiles.is_none() && rows >= PANEL_PV_ROWS;
    let (mut vt, mut tmp) =
        if use_panel { (vec![0.0f32; d * K_BLOCK], vec![0.0f32; rows * d]) } else { (vec![], vec![]) };

    let mut kb0 = task.keys.start;
    while kb0 < task.keys.end {
        let tile_end = task.tiles.map_or(kb0 + K_BLOCK, |origin| next_boundary(kb0, origin, K_BLOCK));
        let kb = tile_end.min(task.keys.end) - kb0;
        let s = &mut s[..rows * kb];
        // S [rows, kb] = Qbuf [rows, d] · K[kb0..kb0 + kb]ᵀ.
        // SAFETY: qbuf holds rows·d, the key tile kb·d, and s rows·kb elements.
        unsafe { (E::qk_panel(kern))(&qbuf, rows, d, &kbase[kb0 * d..(kb0 + kb) * d], kb, s.as_mut_ptr(), kb) };
        for (r, row) in s.chunks_exact_mut(kb).enumerate() {
            let ti = task.t0 + r / group;
            // The row's cache row, and its position (a tree node's: pos0 + its depth).
            let at = g.pos0 + ti;
            let p = tree.map_or(at, |tr| g.pos0 + tr.depths()[ti]);
            // Visible keys of this row inside the tile, as tile offsets a..b.
            let a = lo(p).max(kb0) - kb0;
            let b = (at + 1).min(kb0 + kb).saturating_sub(kb0);
            corr[r] = 1.0;
            if a >= b {
                row.fill(0.0);
                continue;
            }
            row[..a].fill(0.0);
            row[b..].fill(0.0);
            let vis = &mut row[a..b];
            vis.iter_mut().for_each(|x| *x *= scale);
            if let Some(tr) = tree {
                // Tree rows in the tile that are not this node's ancestors (or are past its window).
                let depth = tr.depths();
                for (j, x) in vis.iter_mut().enumerate() {
                    let Some(node) = (kb0 + a + j).checked_sub(g.pos0) else { continue };
                    let seen = tr.sees(ti, node) && window.is_none_or(|w| depth[ti] - depth[node] < w);
                    if !seen {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
            let mx = vis.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            if mx == f32::NEG_INFINITY {
                row.fill(0.0);
                continue;
            }
            let m_new = m[r].max(mx);
            corr[r] = (m[r] - m_new).exp();
            l[r] = l[r] * corr[r] + (kern.exp_sub)(vis, m_new);
            m[r] = m_new;
        }
        let vtile = &vbase[kb0 * d..(kb0 + kb) * d];
        for (orow, &c) in o.chunks_exact_mut(d).zip(&corr) {
            if c != 1.0 {
                orow.iter_mut().for_each(|x| *x *= c);
            }
        }
        if use_panel {
            // O += P [rows, kb] · V [kb, d], V transposed (and widened) to [d, kb] for the panel.
            let vt = &mut vt[..d * kb];
            for (j, vrow) in vtile.chunks_exact(d).enumerate() {
                for (c, &x) in vrow.iter().enumerate() {
                    vt[c * kb + j] = x.widen();
                }
            }
            // SAFETY: s holds rows·kb, vt d·kb and tmp rows·d elements.
            unsafe { (kern.f32_f32)(s, rows, kb, vt, d, tmp.as_mut_ptr(), d) };
            o.iter_mut().zip(&tmp).for_each(|(x, y)| *x += y);
        } else {
            (E::pv_rows(kern))(s, kb, vtile, d, &mut o);
        }
        kb0 += kb;
    }
    Partial { m, l, o }
}

#[cfg(test)]
mod tests {
    use super::super::kernels::Tier;
    use super::*;
    use rayon::prelude::*;

    /// The one-task-per-(token, head) loop this module replaced, kept as the twin.
    // q, out `[T, n_heads, d]`; k, v `[n_kv, cap, d]`. Query t sits at position `pos0 + t` and sees
    // keys `j` with `j <= pos0 + t` and, with a window W, `j > pos0 + t - W`.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        g: &Geometry,
        scale: f32,
        window: Option<usize>,
        sinks: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let (d, group) = (g.d, g.n_heads / g.n_kv);
        out.par_chunks_mut(d).enumerate().for_each_init(Vec::new, |scores: &mut Vec<f32>, (idx, o)| {
            let (t, h) = (idx / g.n_heads, idx % g.n_heads);
            let kv_head = h / group;
            let p = g.pos0 + t;
            let lo = window.map_or(0, |w| (p + 1).saturating_sub(w));
            let qv = &q[idx * d..][..d];
            let kbase = &k[kv_head * g.cap * d..];
            let vbase = &v[kv_head * g.cap * d..];

            scores.clear();
            scores.extend((lo..=p).map(|j| dot(qv, &kbase[j * d..][..d]) * scale));
            let sink = sinks.map(|s| s[h]);
            let max = scores.iter().copied().fold(sink.unwrap_or(f32::NEG_INFINITY), f32::max);
            let mut denom = sink.map_or(0.0, |z| (z - max).exp());
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                denom += *s;
            }
            o.fill(0.0);
            for (j, &e) in (lo..=p).zip(scores.iter()) {
                let w = e / denom;
                for (ov, vv) in o.iter_mut().zip(&vbase[j * d..][..d]) {
                    *ov += w * vv;
                }
            }
        });
    }

    fn dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    /// Deterministic pseudo-random values in [-1, 1).
    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Prefill, chunked prefill and decode (key splits) with GQA, windows and sinks, on every
    /// tier, against the twin: 2e-5 absolute (outputs are ≤ 1 in size; the two differ only in
    /// summation order and the vectorised exp).
    #[test]
    fn tiles_and_splits_match_the_twin() {
        // (T, pos0, n_heads, n_kv, d, window, sinks)
        let cases = [
            (1, 0, 4, 2, 8, None, false),
            (1, 1999, 6, 2, 64, None, false),
            (1, 1999, 6, 2, 64, Some(700), true),
            (3, 700, 4, 4, 32, None, true),
            (40, 0, 9, 3, 64, None, false),
            (300, 0, 4, 1, 16, Some(129), false),
            (70, 600, 8, 2, 48, None, true),
        ];
        for tier in Tier::supported() {
            let Some(kern) = Kernels::for_tier(tier) else { continue };
            for &(t, pos0, n_heads, n_kv, d, window, with_sinks) in &cases {
                let cap = pos0 + t + 5;
                let g = Geometry { n_heads, n_kv, d, cap, pos0 };
                let q = noise(t * n_heads * d, 11 + t as u64);
                let k = noise(n_kv * cap * d, 13 + d as u64);
                let v = noise(n_kv * cap * d, 17 + n_heads as u64);
                let sinks: Option<Vec<f32>> = with_sinks.then(|| noise(n_heads, 19));
                let scale = 1.0 / (d as f32).sqrt() * 3.0;
                let mut want = vec![f32::NAN; t * n_heads * d];
                reference(&q, &k, &v, &g, scale, window, sinks.as_deref(), &mut want);
                let mut got = vec![f32::NAN; t * n_heads * d];
                attention_with(&kern, &q, &k, &v, &g, scale, window, sinks.as_deref(), &mut got);
                let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(worst <= 2e-5, "{tier} T={t} pos0={pos0} heads {n_heads}/{n_kv} d={d} {window:?}: {worst}");
            }
        }
    }

    /// The cache cut in two (a shared prefix of p positions, then the sequence's own rows, each
    /// in a cache of its own capacity) attends exactly as the whole cache: prefill across the cut and
    /// decode (split keys), with GQA, a window and sinks. 2e-5 absolute, as above.
    #[test]
    fn a_prefix_and_own_rows_attend_as_one_cache() {
        // (T, own pos0, p, n_heads, n_kv, d, window, sinks)
        let cases = [
            (1, 0, 1, 4, 2, 8, None, false),
            (1, 1500, 512, 6, 2, 64, None, true),
            (1, 900, 1024, 6, 2, 64, Some(700), false),
            (40, 0, 256, 9, 3, 64, None, false),
            (70, 33, 300, 8, 2, 48, None, true),
        ];
        for &(t, pos0, p, n_heads, n_kv, d, window, with_sinks) in &cases {
            let (own_cap, pre_cap, cap) = (pos0 + t + 3, p + 2, p + pos0 + t);
            let whole = Geometry { n_heads, n_kv, d, cap, pos0: p + pos0 };
            let q = noise(t * n_heads * d, 23 + t as u64);
            let k = noise(n_kv * cap * d, 29 + d as u64);
            let v = noise(n_kv * cap * d, 31 + p as u64);
            // Cut each head's rows at p into the two caches (padding rows hold junk).
            let cut = |x: &[f32]| {
                let (mut a, mut b) = (noise(n_kv * pre_cap * d, 37), noise(n_kv * own_cap * d, 41));
                for h in 0..n_kv {
                    let rows = &x[h * cap * d..(h + 1) * cap * d];
                    a[h * pre_cap * d..][..p * d].copy_from_slice(&rows[..p * d]);
                    b[h * own_cap * d..][..(cap - p) * d].copy_from_slice(&rows[p * d..]);
                }
                (a, b)
            };
            let ((pk, ok), (pv, ov)) = (cut(&k), cut(&v));
            let sinks: Option<Vec<f32>> = with_sinks.then(|| noise(n_heads, 43));
            let scale = 1.0 / (d as f32).sqrt() * 3.0;
            let mut want = vec![f32::NAN; t * n_heads * d];
            reference(&q, &k, &v, &whole, scale, window, sinks.as_deref(), &mut want);
            let mut got = vec![f32::NAN; t * n_heads * d];
            let pg = Geometry { cap: pre_cap, pos0: 0, ..whole };
            let g = Geometry { cap: own_cap, pos0, ..whole };
            attention_prefixed(&q, (&pk, &pv, p), (&ok, &ov), (&pg, &g), scale, window, sinks.as_deref(), &mut got);
            let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(worst <= 2e-5, "T={t} pos0={pos0} p={p} {window:?}: {worst}");
            // Bit for bit the private cache's answer: sharing never changes a text.
            let mut private = vec![f32::NAN; t * n_heads * d];
            attention(&q, &k, &v, &whole, scale, window, sinks.as_deref(), &mut private);
            assert_eq!(got, private, "T={t} pos0={pos0} p={p} {window:?}: differs from the private cache");
        }
    }

    /// A bf16 KV cache on every tier: (1) against the twin over the same bf16 values widened,
    /// 2e-5 as above (the kernels widen exactly); (2) against the f32 twin over the unrounded
    /// values, within the bound the rounding allows: each key and value moves by ≤ 2⁻⁹ of
    /// itself, so a score moves by δ ≤ scale · Σ|qᵢ·kᵢ| · 2⁻⁹, a softmax weight by a factor
    /// ≤ e^(2δ), and the output by ≤ (e^(2δ) − 1 + 2⁻⁹) · max|v|.
    #[test]
    fn bf16_cache_matches_the_f32_twin_within_the_rounding_bound() {
        // (T, pos0, n_heads, n_kv, d, window, sinks): decode with splits, chunked prefill with
        // the panel path for P·V, a window and sinks.
        let cases = [
            (1, 2500, 9, 3, 64, None, false),
            (1, 900, 8, 2, 128, Some(300), true),
            (40, 0, 9, 3, 64, None, false),
            (70, 600, 8, 2, 48, None, true),
        ];
        for tier in Tier::supported() {
            let Some(kern) = Kernels::for_tier(tier) else { continue };
            for &(t, pos0, n_heads, n_kv, d, window, with_sinks) in &cases {
                let cap = pos0 + t + 3;
                let g = Geometry { n_heads, n_kv, d, cap, pos0 };
                let q = noise(t * n_heads * d, 23 + t as u64);
                let k = noise(n_kv * cap * d, 29 + d as u64);
                let v = noise(n_kv * cap * d, 31 + n_heads as u64);
                let (kb, vb): (Vec<bf16>, Vec<bf16>) =
                    (k.iter().map(|&x| bf16::from_f32(x)).collect(), v.iter().map(|&x| bf16::from_f32(x)).collect());
                let (kw, vw): (Vec<f32>, Vec<f32>) =
                    (kb.iter().map(|x| x.to_f32()).collect(), vb.iter().map(|x| x.to_f32()).collect());
                let sinks: Option<Vec<f32>> = with_sinks.then(|| noise(n_heads, 37));
                let scale = 1.0 / (d as f32).sqrt() * 3.0;
                let n = t * n_heads * d;
                let mut got = vec![f32::NAN; n];
                attention_with(&kern, &q, &kb, &vb, &g, scale, window, sinks.as_deref(), &mut got);
                let mut twin = vec![f32::NAN; n];
                reference(&q, &kw, &vw, &g, scale, window, sinks.as_deref(), &mut twin);
                let worst = got.iter().zip(&twin).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(worst <= 2e-5, "{tier} T={t} pos0={pos0} d={d}: {worst} against the widened twin");
                let mut exact = vec![f32::NAN; n];
                reference(&q, &k, &v, &g, scale, window, sinks.as_deref(), &mut exact);
                // δ from the largest Σ|qᵢ·kᵢ| (|k| ≤ 1, so Σ|qᵢ| bounds it).
                let q_l1 = q.chunks_exact(d).map(|r| r.iter().map(|x| x.abs()).sum::<f32>()).fold(0.0, f32::max);
                let delta = scale * q_l1 * 2f32.powi(-9);
                let bound = (2.0 * delta).exp() - 1.0 + 2f32.powi(-9);
                let worst = got.iter().zip(&exact).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(worst <= bound, "{tier} T={t} pos0={pos0} d={d}: {worst} > bound {bound}");
                assert!(worst > 0.0, "{tier}: the bf16 cache should differ from f32 somewhere");
            }
        }
    }

    /// Decode over a long cache is split over tasks and the parts merge to the same answer.
    #[test]
    fn decode_splits_keys_over_tasks() {
        let g = Geometry { n_heads: 2, n_kv: 1, d: 8, cap: 4096, pos0: 4095 };
        for grid in [false, true] {
            let tasks = plan(&g, 1, None, grid.then_some(0));
            assert!(tasks.len() > 1 || rayon::current_num_threads() == 0, "{tasks:?}");
            let covered: usize = tasks.iter().map(|t| t.keys.len()).sum();
            assert_eq!(covered, 4096);
            assert!(tasks.windows(2).all(|w| w[0].keys.end == w[1].keys.start), "{tasks:?}");
        }
        // On the grid the splits sit at multiples of MIN_SPLIT_KEYS.
        assert!(plan(&g, 1, None, Some(0)).iter().all(|t| t.keys.start % MIN_SPLIT_KEYS == 0));
    }

    /// A row of a short call is bit for bit the row computed alone (a decode step) whatever the
    /// call's other rows, on every tier, f32 and bf16 caches, with and without a window: what makes
    /// a speculative verification give one-row decoding's logits.
    #[test]
    fn a_short_calls_rows_equal_each_row_alone() {
        for tier in Tier::supported() {
            let Some(kern) = Kernels::for_tier(tier) else { continue };
            for &(t, pos0, window) in &[(9, 1500, None), (33, 700, Some(300)), (65, 2100, None), (5, 90, Some(40))] {
                let (n_heads, n_kv, d) = (6, 2, 64);
                let cap = pos0 + t;
                let q = noise(t * n_heads * d, 3 + t as u64);
                let k = noise(n_kv * cap * d, 5);
                let v = noise(n_kv * cap * d, 7);
                let kb: Vec<bf16> = k.iter().map(|&x| bf16::from_f32(x)).collect();
                let vb: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
                let g = Geometry { n_heads, n_kv, d, cap, pos0 };
                let (mut all, mut all_b) = (vec![f32::NAN; t * n_heads * d], vec![f32::NAN; t * n_heads * d]);
                attention_with(&kern, &q, &k, &v, &g, 0.125, window, None, &mut all);
                attention_with(&kern, &q, &kb, &vb, &g, 0.125, window, None, &mut all_b);
                for i in 0..t {
                    let gi = Geometry { pos0: pos0 + i, ..g };
                    let qi = &q[i * n_heads * d..(i + 1) * n_heads * d];
                    let (mut one, mut one_b) = (vec![f32::NAN; n_heads * d], vec![f32::NAN; n_heads * d]);
                    attention_with(&kern, qi, &k, &v, &gi, 0.125, window, None, &mut one);
                    attention_with(&kern, qi, &kb, &vb, &gi, 0.125, window, None, &mut one_b);
                    let (got, got_b) =
                        (&all[i * n_heads * d..][..n_heads * d], &all_b[i * n_heads * d..][..n_heads * d]);
                    assert_eq!(got, &one[..], "{tier} T={t} row {i} {window:?} (f32 cache)");
                    assert_eq!(got_b, &one_b[..], "{tier} T={t} row {i} {window:?} (bf16 cache)");
                }
            }
        }
    }

    /// With one visible key the output is that key's value; a sink only shrinks it.
    #[test]
    fn first_position_returns_its_value_and_sink_scales_it() {
        let g = Geometry { n_heads: 2, n_kv: 1, d: 2, cap: 4, pos0: 0 };
        let q = [1.0, 2.0, -1.0, 0.5];
        let k = [0.3, 0.7, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let v = [5.0, -3.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0];
        let mut out = [0.0; 4];
        attention(&q, &k, &v, &g, 0.5, None, None, &mut out);
        assert_eq!(out, [5.0, -3.0, 5.0, -3.0]);
        // Sink z with the single score s: weight = e^s / (e^s + e^z).
        let s = (1.0 * 0.3 + 2.0 * 0.7) * 0.5f32;
        attention(&q, &k, &v, &g, 0.5, None, Some(&[s, -1e9]), &mut out);
        assert!((out[0] - 2.5).abs() < 1e-6 && (out[1] + 1.5).abs() < 1e-6, "{out:?}");
        assert!((out[2] - 5.0).abs() < 1e-6, "{out:?}");
    }

    /// A window of 1 sees only the current token.
    #[test]
    fn window_of_one_sees_only_itself() {
        let g = Geometry { n_heads: 1, n_kv: 1, d: 1, cap: 3, pos0: 0 };
        let (q, k, v) = ([1.0, 1.0, 1.0], [1.0, 2.0, 3.0], [10.0, 20.0, 30.0]);
        let mut out = [0.0; 3];
        attention(&q, &k, &v, &g, 1.0, Some(1), None, &mut out);
        assert_eq!(out, [10.0, 20.0, 30.0]);
    }
}
