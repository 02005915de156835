//! Shape checks every backend validates its calls through, so the CPU and device backends
//! refuse the same calls with the same errors.

use crate::{DType, DeltaRule, HeadSlice, OpsError, Result, Tensor};

/// Checks a `Compute::slice_heads` call and returns `(T, out_cols)`.
pub(crate) fn slice_dims(src: &Tensor, s: &HeadSlice, out: &Tensor) -> Result<(usize, usize)> {
    let n = s.heads * s.stride;
    let t = src.numel().checked_div(n).unwrap_or(0);
    let out_cols = out.numel().checked_div(t.max(1)).unwrap_or(0);
    if n == 0
        || src.numel() != t * n
        || s.offset + s.width > s.stride
        || s.out_offset + s.heads * s.width > out_cols
        || out.numel() != t * out_cols
    {
        return Err(OpsError::Shape {
            op: "slice_heads",
            detail: format!("{s:?} from {:?} into {:?}", src.shape(), out.shape()),
        });
    }
    Ok((t, out_cols))
}

/// Checks a `DeltaNetOps::delta_rule` call and returns its dimensions `(t, nk, dk, nv, dv)`.
pub(crate) fn delta_dims(
    x: &DeltaRule<'_>,
    state: &Tensor,
    out: &Tensor,
) -> Result<(usize, usize, usize, usize, usize)> {
    let bad = || OpsError::Shape {
        op: "delta_rule",
        detail: format!(
            "q {:?}, k {:?}, v {:?}, g {:?}, beta {:?}, state {:?}, out {:?}",
            x.q.shape(),
            x.k.shape(),
            x.v.shape(),
            x.g.shape(),
            x.beta.shape(),
            state.shape(),
            out.shape()
        ),
    };
    let (&[t, nk, dk], &[t2, nv, dv], &[nv2, dk2, dv2]) = (x.q.shape(), x.v.shape(), state.shape()) else {
        return Err(bad());
    };
    let ok = x.k.shape() == x.q.shape()
        && t2 == t
        && (nv2, dk2, dv2) == (nv, dk, dv)
        && nk > 0
        && nv % nk == 0
        && x.g.numel() == t * nv
        && x.beta.numel() == t * nv
        && out.shape() == x.v.shape();
    if ok { Ok((t, nk, dk, nv, dv)) } else { Err(bad()) }
}

/// Checks a router call (logits `[T, E]`, `1 <= k <= E`) and returns `(T, E)`. Every backend
/// validates through here.
pub(crate) fn router_dims(logits: &Tensor, k: usize) -> Result<(usize, usize)> {
    match *logits.shape() {
        [t, e] if (1..=e).contains(&k) => Ok((t, e)),
        _ => Err(OpsError::Shape {
            op: "router_topk",
            detail: format!("logits {:?} must be [T, E] with 1 <= k <= E, k = {k}", logits.shape()),
        }),
    }
}

/// Checks a clamped SwiGLU call (gate_up `[.., 2I]`, out `[.., I]`, the same leading dims) and
/// returns I. Every backend validates through here.
pub(crate) fn swiglu_dims(gate_up: &Tensor, out: &Tensor) -> Result<usize> {
    let (gu, o) = (gate_up.shape(), out.shape());
    match (gu.split_last(), o.split_last()) {
        (Some((&two_i, lead)), Some((&i, lead_out))) if i > 0 && two_i == 2 * i && lead == lead_out => Ok(i),
        _ => Err(OpsError::Shape {
            op: "clamped_swiglu",
            detail: format!("gate_up {gu:?} must be [.., 2I] for out {o:?} [.., I]"),
        }),
    }
}

/// Checks a gated RMSNorm call (x, z, out `[.., n]`, w `[n]`) and returns n. Every backend
/// validates through here.
pub(crate) fn gated_norm_dims(x: &Tensor, z: &Tensor, w: &Tensor, out: &Tensor) -> Result<usize> {
    let n = x.shape().last().copied().unwrap_or(0);
    if n == 0 || w.numel() != n || z.shape() != x.shape() || out.shape() != x.shape() {
        return Err(OpsError::Shape {
            op: "gated_rms_norm",
            detail: format!("x {:?}, z {:?}, w {:?}, out {:?}", x.shape(), z.shape(), w.shape(), out.shape()),
        });
    }
    Ok(n)
}

/// Checks an MXFP4 dequantisation (blocks `rows·cols/2` bytes, scales `rows·cols/32` bytes,
/// both U8; out `[rows, cols]` BF16) and returns `(rows, cols)`. Every backend validates
/// through here.
pub(crate) fn mxfp4_dims(blocks: &Tensor, scales: &Tensor, out: &Tensor) -> Result<(usize, usize)> {
    let op = "dequant_mxfp4";
    let (&[rows, cols], DType::BF16) = (out.shape(), out.dtype()) else {
        return Err(OpsError::Shape {
            op,
            detail: format!("out {:?} {} must be [rows, cols] BF16", out.shape(), out.dtype()),
        });
    };
    if blocks.dtype() != DType::U8 || scales.dtype() != DType::U8 {
        return Err(OpsError::DType { op, dtype: blocks.dtype(), detail: "blocks and scales are U8" });
    }
    crate::mxfp4::check(blocks.numel(), scales.numel(), rows, cols)
        .map_err(|e| OpsError::Shape { op, detail: e.to_string() })?;
    Ok((rows, cols))
}

/// Checks an MXFP4 matmul (x `[T, k]`, blocks `[n, ..]` U8 of `n·k/2` bytes, scales `n·k/32`,
/// bias `[n]`, out `[T, n]`) and returns `(t, n, k)`.
pub(crate) fn mxfp4_matmul_dims(
    x: &Tensor,
    blocks: &Tensor,
    scales: &Tensor,
    bias: Option<&Tensor>,
    out: &Tensor,
) -> Result<(usize, usize, usize)> {
    let op = "matmul_mxfp4";
    if blocks.dtype() != DType::U8 || scales.dtype() != DType::U8 {
        return Err(OpsError::DType { op, dtype: blocks.dtype(), detail: "blocks and scales are U8" });
    }
    let n = blocks.shape().first().copied().unwrap_or(0);
    let k = scales.numel().checked_div(n).unwrap_or(0) * 32;
    let t = x.numel().checked_div(k).unwrap_or(0);
    let bad_bias = bias.is_some_and(|b| b.numel() != n);
    if n == 0 || k == 0 || blocks.numel() * 2 != n * k || x.numel() != t * k || out.numel() != t * n || bad_bias {
        let b = bias.map(|b| b.shape().to_vec());
        return Err(OpsError::Shape {
            op,
            detail: format!(
                "x {:?} · blocks {:?} (scales {:?}, bias {b:?}) -> out {:?}",
                x.shape(),
                blocks.shape(),
                scales.shape(),
                out.shape()
            ),
        });
    }
    Ok((t, n, k))
}

/// Checks a transpose (src `[a, b]`, out `[b, a]`, one dtype) and returns `(a, b)`.
pub(crate) fn transpose_dims(src: &Tensor, out: &Tensor) -> Result<(usize, usize)> {
    match (src.shape(), out.shape()) {
        (&[a, b], &[b2, a2]) if a == a2 && b == b2 && src.dtype() == out.dtype() => Ok((a, b)),
        _ => Err(OpsError::Shape {
            op: "transpose",
            detail: format!("src {:?} {} into out {:?} {}", src.shape(), src.dtype(), out.shape(), out.dtype()),
        }),
    }
}

/// Checks a row gather or scatter: `table` `[T, n]` (the side indexed by `rows`), `packed`
/// `[rows.len(), n]`, every row index below T, and (scatter) one weight per row, no row twice.
/// Returns `(T, n)`.
pub(crate) fn rows_dims(
    op: &'static str,
    table: &Tensor,
    packed: &Tensor,
    rows: &[u32],
    weights: Option<&[f32]>,
) -> Result<(usize, usize)> {
    let n = table.shape().last().copied().unwrap_or(0);
    let t = table.numel() / n.max(1);
    let bad = |detail: String| Err(OpsError::Shape { op, detail });
    if n == 0 || packed.numel() != rows.len() * n || packed.shape().last() != Some(&n) {
        return bad(format!("{} rows of {:?} against {:?}", rows.len(), table.shape(), packed.shape()));
    }
    if let Some(&r) = rows.iter().find(|&&r| r as usize >= t) {
        return bad(format!("row {r} of a [{t}, {n}] tensor"));
    }
    if let Some(w) = weights {
        if w.len() != rows.len() {
            return bad(format!("{} weights for {} rows", w.len(), rows.len()));
        }
        let mut seen = vec![false; t];
        if let Some(&r) = rows.iter().find(|&&r| std::mem::replace(&mut seen[r as usize], true)) {
            return bad(format!("row {r} appears twice"));
        }
    }
    Ok((t, n))
}
