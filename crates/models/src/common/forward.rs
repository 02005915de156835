//! What every family's forward shares: input checks and the embedding; the tiling of a long
//! input ([`PREFILL_TILE`], [`Pieces`]) and scratch made once per forward and counted from the
//! same shapes ([`alloc_all`], [`f32_bytes`]); the final norm and the output head.

use ollm_kv::SeqState;
use ollm_ops::{Backend, NormKind, Tensor};

use crate::trace::TraceSink;
use crate::{BatchSeq, LogitsWanted, ModelError, Result};

/// Runs one forward `f` through [`Compute::run_step`](ollm_ops::Compute::run_step) (on the CPU:
/// on its pool's threads, so the ops' parallel regions do not each wake the pool), or in place
/// when some of the model's layers stream: a streamed layer's copy into its slot runs on the
/// CPU's pool while the forward waits for it.
pub fn on_compute_threads<R: Send>(
    be: &dyn Backend,
    streamed: bool,
    f: impl FnOnce() -> Result<R> + Send,
) -> Result<R> {
    if streamed {
        return f();
    }
    let (mut f, mut out) = (Some(f), None);
    be.run_step(&mut || {
        if let Some(f) = f.take() {
            out = Some(f());
        }
    });
    out.unwrap_or_else(|| Err(ModelError::Stream(format!("backend {} did not run the forward step", be.name()))))
}

/// Checks `ids` (non-empty, inside the vocabulary, fitting the context after what `state` holds),
/// readies `state` for them and returns `(pos0, x)`: the first position and `x = E[ids]` `[T, H]`.
pub fn begin(
    be: &dyn Backend,
    ids: &[u32],
    state: &mut SeqState,
    embed: &Tensor,
    (vocab, max_positions): (usize, usize),
    trace: Option<&dyn TraceSink>,
) -> Result<(usize, Tensor)> {
    let t = ids.len();
    if t == 0 {
        return Err(ModelError::EmptyInput);
    }
    if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(ModelError::TokenOutOfRange { id, vocab });
    }
    let pos0 = state.len();
    if pos0 + t > max_positions {
        return Err(ModelError::ContextOverflow { needed: pos0 + t, max: max_positions });
    }
    state.reserve(be, pos0 + t)?;
    state.begin(be, t)?;
    let mut x = be.zeros(vec![t, embed.shape()[1]])?;
    be.embedding(embed, ids, &mut x)?;
    if let Some(tr) = trace {
        tr.record(None, "embed", &x);
    }
    Ok((pos0, x))
}

/// Where one sequence's rows sit in a batched forward's residual stream: rows `row..row + n`,
/// at positions `pos0..pos0 + n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub row: usize,
    pub n: usize,
    pub pos0: usize,
}

/// The part of sequence `seq` inside one tile: the tile's rows `row..row + n`, at positions
/// `pos0..pos0 + n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub seq: usize,
    pub row: usize,
    pub n: usize,
    pub pos0: usize,
}

/// The segments of the tile of rows `start..start + n` of a stream laid out as `spans`.
pub fn segments(spans: &[Span], start: usize, n: usize) -> Vec<Segment> {
    let end = start + n;
    spans
        .iter()
        .enumerate()
        .filter(|(_, s)| s.row < end && s.row + s.n > start)
        .map(|(seq, s)| {
            let a = s.row.max(start);
            let b = (s.row + s.n).min(end);
            Segment { seq, row: a - start, n: b - a, pos0: s.pos0 + (a - s.row) }
        })
        .collect()
}

/// [`begin`] for a batch: checks every item before touching any state, readies each state for
/// its ids and returns the items' spans and `x = E[ids]` of all items' rows, in order `[R, H]`.
pub fn begin_batch(
    be: &dyn Backend,
    items: &mut [BatchSeq<'_>],
    embed: &Tensor,
    (vocab, max_positions): (usize, usize),
) -> Result<(Vec<Span>, Tensor)> {
    if items.is_empty() {
        return Err(ModelError::EmptyInput);
    }
    let mut spans = Vec::with_capacity(items.len());
    let mut row = 0;
    for it in items.iter() {
        let t = it.ids.len();
        if t == 0 {
            return Err(ModelError::EmptyInput);
        }
        if let Some(&id) = it.ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(ModelError::TokenOutOfRange { id, vocab });
        }
        if let Some(tree) = it.tree.filter(|tr| tr.len() != t) {
            return Err(ModelError::TreeShape { nodes: tree.len(), ids: t });
        }
        let pos0 = it.state.len();
        if pos0 + t > max_positions {
            return Err(ModelError::ContextOverflow { needed: pos0 + t, max: max_positions });
        }
        spans.push(Span { row, n: t, pos0 });
        row += t;
    }
    for it in items.iter_mut() {
        let pos0 = it.state.len();
        it.state.reserve(be, pos0 + it.ids.len())?;
        it.state.begin(be, it.ids.len())?;
    }
    let ids: Vec<u32> = items.iter().flat_map(|it| it.ids.iter().copied()).collect();
    let mut x = be.zeros(vec![row, embed.shape()[1]])?;
    be.embedding(embed, &ids, &mut x)?;
    Ok((spans, x))
}

/// [`logits`] for a batch: each item's rows per its `wanted`, normed and projected in one
/// matmul, returned per item.
pub fn logits_batch(
    be: &dyn Backend,
    x: &Tensor,
    parts: &[(Span, LogitsWanted)],
    (norm, eps, kind): (&Tensor, f32, NormKind),
    head: &Tensor,
) -> Result<Vec<Vec<f32>>> {
    let h = x.shape()[1];
    let ranges: Vec<std::ops::Range<usize>> = parts
        .iter()
        .map(|(s, w)| match w {
            LogitsWanted::Last => s.row + s.n - 1..s.row + s.n,
            LogitsWanted::All => s.row..s.row + s.n,
        })
        .collect();
    let rows: usize = ranges.iter().map(|r| r.len()).sum();
    let mut picked = be.zeros(vec![rows, h])?;
    if let [r] = ranges.as_slice() {
        be.copy_rows(x, r.clone(), &mut picked)?;
    } else {
        let mut at = 0;
        for r in &ranges {
            let mut buf = be.zeros(vec![r.len(), h])?;
            be.copy_rows(x, r.clone(), &mut buf)?;
            be.write_rows(&buf, &mut picked, at)?;
            at += r.len();
        }
    }
    let mut normed = be.zeros(vec![rows, h])?;
    be.rms_norm(&picked, norm, eps, kind, &mut normed)?;
    let v = head.shape()[0];
    let mut out = be.zeros(vec![rows, v])?;
    be.matmul(&normed, head, None, &mut out)?;
    let all = be.to_host_f32(&out)?;
    let mut res = Vec::with_capacity(ranges.len());
    let mut at = 0;
    for r in &ranges {
        res.push(all[at * v..(at + r.len()) * v].to_vec());
        at += r.len();
    }
    Ok(res)
}

/// The end of every family's batched forward: each item's state takes its ids, then the logits
/// of each item's rows per its `wanted` ([`logits_batch`]). A traced forward of one item goes
/// through [`logits`], which records the final norm.
pub fn finish_batch(
    be: &dyn Backend,
    x: &Tensor,
    (spans, items): (&[Span], &mut [BatchSeq<'_>]),
    norm: (&Tensor, f32, NormKind),
    head: &Tensor,
    trace: Option<&dyn TraceSink>,
) -> Result<Vec<Vec<f32>>> {
    for it in items.iter_mut() {
        it.state.advance(it.ids.len());
    }
    if let (Some(tr), [it]) = (trace, &*items) {
        return Ok(vec![logits(be, x, it.wanted, norm, head, Some(tr))?]);
    }
    let parts: Vec<_> = spans.iter().zip(items.iter()).map(|(s, it)| (*s, it.wanted)).collect();
    logits_batch(be, x, &parts, norm, head)
}

/// `logits = RMS(x[rows]) · headᵀ` as f32 `[rows, V]` on the host, rows per `wanted`.
pub fn logits(
    be: &dyn Backend,
    x: &Tensor,
    wanted: LogitsWanted,
    (norm, eps, kind): (&Tensor, f32, NormKind),
    head: &Tensor,
    trace: Option<&dyn TraceSink>,
) -> Result<Vec<f32>> {
    let (t, h) = (x.shape()[0], x.shape()[1]);
    let rows = match wanted {
        LogitsWanted::Last => t - 1..t,
        LogitsWanted::All => 0..t,
    };
    let mut last = be.zeros(vec![rows.len(), h])?;
    be.copy_rows(x, rows.clone(), &mut last)?;
    let mut last_normed = be.zeros(vec![rows.len(), h])?;
    be.rms_norm(&last, norm, eps, kind, &mut last_normed)?;
    if let Some(tr) = trace {
        tr.record(None, "final_norm", &last_normed);
    }
    let mut out = be.zeros(vec![rows.len(), head.shape()[0]])?;
    be.matmul(&last_normed, head, None, &mut out)?;
    Ok(be.to_host_f32(&out)?)
}

/// Rows of one prefill tile, every family: a longer input runs each layer's mixer tile by tile,
/// so activations stay bounded whatever its length.
pub const PREFILL_TILE: usize = 1024;

/// Row ranges `(start, len)` of `t` rows in pieces of at most `size`.
pub fn pieces(t: usize, size: usize) -> Vec<(usize, usize)> {
    (0..t).step_by(size.max(1)).map(|a| (a, size.min(t - a))).collect()
}

/// The distinct lengths of the pieces of `t` rows in pieces of at most `size`: the full one
/// and, when it differs, the last.
pub fn piece_sizes(t: usize, size: usize) -> Vec<usize> {
    let mut sizes: Vec<usize> = pieces(t, size).into_iter().map(|(_, n)| n).collect();
    sizes.dedup();
    sizes
}

/// `t` rows of width `h` split in pieces of at most `size` rows, with a buffer per piece length
/// for a piece's rows (none when one piece covers every row: the caller then works on the rows
/// themselves). Made once per forward and reused by every layer.
#[derive(Debug)]
pub struct Pieces {
    pieces: Vec<(usize, usize)>,
    bufs: Vec<Tensor>,
}

impl Pieces {
    /// The buffers' shapes: one `[n, h]` per piece length, none for a single piece.
    pub fn shapes(t: usize, size: usize, h: usize) -> Vec<Vec<usize>> {
        let sizes = piece_sizes(t, size);
        if pieces(t, size).len() == 1 { Vec::new() } else { sizes.into_iter().map(|n| vec![n, h]).collect() }
    }

    pub fn new(be: &dyn Backend, t: usize, size: usize, h: usize) -> Result<Self> {
        Ok(Self { pieces: pieces(t, size), bufs: alloc_all(be, Self::shapes(t, size, h))? })
    }

    /// Whether one piece covers every row.
    pub fn is_single(&self) -> bool {
        self.pieces.len() == 1
    }

    /// Applies `f(piece, start)` to each piece of `x`: to x itself when there is one piece,
    /// else to a copy of the piece's rows that is written back after.
    pub fn each(
        &mut self,
        be: &dyn Backend,
        x: &mut Tensor,
        f: &mut dyn FnMut(&mut Tensor, usize) -> Result<()>,
    ) -> Result<()> {
        if self.is_single() {
            return f(x, 0);
        }
        for &(start, n) in &self.pieces {
            let xt =
                self.bufs.iter_mut().find(|b| b.shape()[0] == n).ok_or_else(|| {
                    ollm_ops::OpsError::Backend(format!("internal: no buffer for a piece of {n} rows"))
                })?;
            be.copy_rows(x, start..start + n, xt)?;
            f(xt, start)?;
            be.write_rows(xt, x, start)?;
        }
        Ok(())
    }
}

/// Row counts among `1..=rows` at which a forward's activations can be largest, for a forward cut
/// in pieces of each size in `chunks` (a scratch set per distinct piece length): every quantity
/// grows with the row count while the number of piece lengths stays the same, and changes only
/// at multiples `m·c` of a chunk (`m·c` has one piece length, `m·c + 1` two). So the largest
/// over `1..=rows` is at `rows` or at some `m·c − 1` or `m·c` below it. A step of at most `rows`
/// rows can take any of these counts, and `m·c − 1` rows (a full tile and a tile less one row)
/// hold more than `m·c` rows do: what the planner reserves is the largest.
pub fn peak_row_counts(rows: usize, chunks: &[usize]) -> Vec<usize> {
    let mut out = vec![rows];
    for &c in chunks.iter().filter(|c| **c > 0) {
        let mut m = c;
        while m <= rows {
            out.extend([m - 1, m].into_iter().filter(|&t| t > 0));
            m += c;
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Bytes of f32 activations of these shapes (what [`alloc_all`] allocates for them).
pub fn f32_bytes(shapes: &[Vec<usize>]) -> u64 {
    shapes.iter().map(|s| 4 * s.iter().product::<usize>() as u64).sum()
}

/// Zeroed f32 activations of these shapes.
pub fn alloc_all(be: &dyn Backend, shapes: Vec<Vec<usize>>) -> Result<Vec<Tensor>> {
    Ok(shapes.into_iter().map(|s| be.zeros(s)).collect::<std::result::Result<Vec<_>, _>>()?)
}

/// Scratch sets of a forward, one per piece length ([`piece_sizes`]).
#[derive(Debug)]
pub struct PerSize<S>(Vec<(usize, S)>);

impl<S> PerSize<S> {
    pub fn new(sizes: &[usize], mut make: impl FnMut(usize) -> Result<S>) -> Result<Self> {
        Ok(Self(sizes.iter().map(|&n| Ok((n, make(n)?))).collect::<Result<Vec<_>>>()?))
    }

    /// The set for pieces of `n` rows.
    pub fn get(&mut self, n: usize) -> Result<&mut S> {
        self.0
            .iter_mut()
            .find(|(m, _)| *m == n)
            .map(|(_, s)| s)
            .ok_or_else(|| ollm_ops::OpsError::Backend(format!("internal: no scratch for a piece of {n} rows")).into())
    }
}

/// Buffers of one sequence's rows inside a tile that holds several (a batched forward copies a
/// segment's rows out, runs what is per sequence on them, and writes them back): one set of
/// shapes per row count, made when first needed and kept for the forward while the sets held
/// total at most [`PREFILL_TILE`] rows (beyond, the others are dropped first), so they never
/// hold more than [`seg_set_rows`] rows.
#[derive(Debug, Default)]
pub struct SegSets(Vec<(usize, Vec<Tensor>)>);

impl SegSets {
    /// The set for `n` rows, of the shapes `shapes(n)` gives (the same function every call).
    pub fn get(
        &mut self,
        be: &dyn Backend,
        n: usize,
        shapes: impl FnOnce(usize) -> Vec<Vec<usize>>,
    ) -> Result<&mut [Tensor]> {
        let i = match self.0.iter().position(|(m, _)| *m == n) {
            Some(i) => i,
            None => {
                let held: usize = self.0.iter().map(|(m, _)| m).sum();
                if held + n > PREFILL_TILE {
                    self.0.clear();
                }
                self.0.push((n, alloc_all(be, shapes(n))?));
                self.0.len() - 1
            }
        };
        Ok(&mut self.0[i].1)
    }
}

/// Rows of segment sets ([`SegSets`]) a batched forward of `rows` rows in `seqs` sequences holds
/// at most: none for one sequence (its tiles are worked on in place), else up to a tile's.
pub fn seg_set_rows(rows: usize, seqs: usize) -> usize {
    if seqs <= 1 { 0 } else { rows.min(PREFILL_TILE) }
}

/// Shapes of what [`begin_batch`] and [`logits_batch`] allocate for a forward of `rows` rows in
/// `seqs` sequences, each wanting its last row's logits (vocabulary `v`): the residual stream,
/// the picked rows (and a one-row buffer per sequence), their norm and their logits. For one
/// sequence, [`stream_shapes`].
pub fn batch_stream_shapes(rows: usize, seqs: usize, h: usize, v: usize) -> Vec<Vec<usize>> {
    let seqs = seqs.clamp(1, rows.max(1));
    let mut shapes = vec![vec![rows, h], vec![seqs, h], vec![seqs, h], vec![seqs, v]];
    if seqs > 1 {
        shapes.extend(std::iter::repeat_n(vec![1, h], seqs));
    }
    shapes
}

/// Shapes of what [`begin`] and [`logits`] allocate for a forward of `t` rows of width `h`
/// whose last row's logits (vocabulary `v`) are wanted: the residual stream, the last row, its
/// norm and its logits.
pub fn stream_shapes(t: usize, h: usize, v: usize) -> Vec<Vec<usize>> {
    vec![vec![t, h], vec![1, h], vec![1, h], vec![1, v]]
}

#[cfg(test)]
mod tests {
    use super::*;
    use ollm_ops::cpu::CpuBackend;
    use ollm_ops::{Compute, Memory};

    /// A forward of 2,047 rows holds two scratch sets (1,024 and 1,023 rows), one of 2,048
    /// holds one: the candidates include 2,047, and the largest over them is the largest over
    /// every row count.
    #[test]
    fn peak_row_counts_find_the_largest_of_every_row_count() {
        let c = peak_row_counts(2100, &[PREFILL_TILE]);
        assert!(c.contains(&2047) && c.contains(&2100) && c.contains(&1023), "{c:?}");
        let bytes = |t: usize| {
            let mut shapes = vec![vec![t, 8]];
            shapes.extend(Pieces::shapes(t, PREFILL_TILE, 8));
            for n in piece_sizes(t, PREFILL_TILE) {
                shapes.push(vec![n, 32]);
            }
            f32_bytes(&shapes)
        };
        assert!(bytes(2047) > bytes(2048), "the bug this guards: fewer rows, more scratch");
        for rows in [1, 5, 1023, 1024, 1025, 2047, 2048, 3000] {
            let every = (1..=rows).map(bytes).max().unwrap_or(0);
            let cand = peak_row_counts(rows, &[PREFILL_TILE]).into_iter().map(bytes).max().unwrap_or(0);
            assert_eq!(cand, every, "{rows} rows");
        }
    }

    #[test]
    fn pieces_cover_the_rows_with_one_buffer_per_length() {
        assert_eq!(piece_sizes(2500, 1024), vec![1024, 452]);
        assert_eq!(piece_sizes(2048, 1024), vec![1024]);
        assert_eq!(Pieces::shapes(900, 1024, 8), Vec::<Vec<usize>>::new(), "one piece works in place");
        assert_eq!(Pieces::shapes(2500, 1024, 8), vec![vec![1024, 8], vec![452, 8]]);
        assert_eq!(f32_bytes(&Pieces::shapes(2500, 1024, 8)), 4 * 8 * (1024 + 452));

        // Each piece sees its own rows and its start; what it writes lands back in place.
        let be = CpuBackend::new();
        let (t, h) = (7, 3);
        let values: Vec<f32> = (0..t * h).map(|v| v as f32).collect();
        let mut x = be.upload_f32(vec![t, h], &values).expect("x");
        let mut p = Pieces::new(&be, t, 3, h).expect("pieces");
        let mut starts = Vec::new();
        p.each(&be, &mut x, &mut |xt, start| {
            starts.push((start, xt.shape()[0]));
            let first = be.to_host_f32(xt)?[0];
            assert_eq!(first, (start * h) as f32);
            let ones = be.upload_f32(xt.shape().to_vec(), &vec![1.0; xt.shape()[0] * h])?;
            Ok(be.add_assign(xt, &ones)?)
        })
        .expect("each");
        assert_eq!(starts, vec![(0, 3), (3, 3), (6, 1)]);
        let out = be.to_host_f32(&x).expect("host");
        assert_eq!(out, values.iter().map(|v| v + 1.0).collect::<Vec<_>>());
    }
}
