//! The start and end every family's forward shares: input checks and the embedding, then the
//! final norm and the output head over the rows asked for.

use ollm_kv::SeqState;
use ollm_ops::{Backend, NormKind, Tensor};

use crate::trace::TraceSink;
use crate::{LogitsWanted, ModelError, Result};

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

/// Row ranges `(start, len)` of `t` rows in pieces of at most `size`.
pub fn pieces(t: usize, size: usize) -> Vec<(usize, usize)> {
    (0..t).step_by(size.max(1)).map(|a| (a, size.min(t - a))).collect()
}

/// Applies `f(piece, start)` to each piece of `x` (rows `pieces`): to x itself when there is
/// one piece, else to a copy of the piece's rows that is written back after.
pub fn each_piece(
    be: &dyn Backend,
    x: &mut Tensor,
    pieces: &[(usize, usize)],
    f: &mut dyn FnMut(&mut Tensor, usize) -> Result<()>,
) -> Result<()> {
    if pieces.len() == 1 {
        return f(x, 0);
    }
    let h = x.shape()[1];
    let mut buf: Option<Tensor> = None;
    for &(start, n) in pieces {
        let xt = match buf.take() {
            Some(b) if b.shape()[0] == n => buf.insert(b),
            _ => buf.insert(be.zeros(vec![n, h])?),
        };
        be.copy_rows(x, start..start + n, xt)?;
        f(xt, start)?;
        be.write_rows(xt, x, start)?;
    }
    Ok(())
}
