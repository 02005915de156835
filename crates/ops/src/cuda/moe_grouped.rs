//! Launchers for `kernels/moe_grouped.cu`: a MoE layer's routed experts as two grouped GEMM
//! launches and one combine per piece of at most [`PIECE_ROUTES`] routes (issue 27 point 3).
//! The CPU twin is [`crate::experts_by_expert`], the per-expert loop.
//!
//! The host sorts the routes by expert (each expert's rows are already in row order), cuts each
//! expert's range into tiles of at most [`TILE_ROWS`] rows, and for the combine lists each
//! token's positions in ascending order (= ascending expert order): [`Piece::plan`]. A piece's
//! tables go up in one upload, the experts' device pointers in another per call.

use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use half::bf16;

use super::{CudaDevice, CudaStorage, DeviceBuf, driver_err, grid_stride, shape};
use crate::backend::{ExpertAct, ExpertMatrixRef, RoutedExpert};
use crate::{DType, Result, Storage, Tensor};

/// The kernel file's source text.
pub const SOURCE: &str = include_str!("../../kernels/moe_grouped.cu");

/// Rows of one tile (the kernel's BM).
pub const TILE_ROWS: usize = 64;
/// Output columns of one tile (the kernel's BN).
pub const TILE_COLS: usize = 128;
/// K step of the kernel (one MXFP4 group): both projections need K divisible by it.
pub const TILE_K: usize = 32;
/// Routes (token, expert pairs) per piece: bounds the scratch, `PIECE_ROUTES · (2·I + 4·H)`
/// bytes ([`crate::grouped_scratch_bytes`]).
pub const PIECE_ROUTES: usize = crate::backend::GROUPED_PIECE_ROUTES;

/// The weight formats of a call's experts, as the kernels' names and flags take them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Formats {
    /// `grouped_gate_up_{mxfp4, bf16, bf16x2}`
    gate_up: &'static str,
    /// `grouped_down_{mxfp4, bf16}`
    down: &'static str,
    /// 0 none, 1 f32, 2 bf16
    gate_up_bias: i32,
    down_bias: i32,
}

fn bias_kind(b: Option<&Tensor>) -> Option<i32> {
    match b.map(|b| b.dtype()) {
        None => Some(0),
        Some(DType::F32) => Some(1),
        Some(DType::BF16) => Some(2),
        Some(_) => None,
    }
}

fn is_bf16(m: &ExpertMatrixRef<'_>) -> bool {
    matches!(m, ExpertMatrixRef::Dense(w) if w.dtype() == DType::BF16)
}

/// The formats of expert `e`, or None when the kernels do not take it (the caller then runs
/// the per-expert loop).
fn formats(e: &RoutedExpert<'_>, act: ExpertAct) -> Option<Formats> {
    let gate_up = match (act, &e.gate_up, &e.up) {
        (ExpertAct::ClampedSwiglu { .. }, ExpertMatrixRef::Mxfp4 { .. }, None) => "grouped_gate_up_mxfp4",
        (ExpertAct::ClampedSwiglu { .. }, g, None) if is_bf16(g) => "grouped_gate_up_bf16",
        (ExpertAct::SiluMul, g, Some(u)) if is_bf16(g) && is_bf16(u) => "grouped_gate_up_bf16x2",
        _ => return None,
    };
    let down = match &e.down {
        ExpertMatrixRef::Mxfp4 { .. } => "grouped_down_mxfp4",
        d if is_bf16(d) => "grouped_down_bf16",
        _ => return None,
    };
    Some(Formats { gate_up, down, gate_up_bias: bias_kind(e.gate_up_bias)?, down_bias: bias_kind(e.down_bias)? })
}

fn ptr_of(t: &Tensor, dev: &CudaDevice) -> Option<u64> {
    let Storage::Cuda(s) = t.storage() else { return None };
    let stream = &dev.stream;
    Some(match s {
        CudaStorage::F32(b) => b.device_ptr(stream).0,
        CudaStorage::F16(b) => b.device_ptr(stream).0,
        CudaStorage::BF16(b) => b.device_ptr(stream).0,
        CudaStorage::U8(b) => b.device_ptr(stream).0,
    })
}

/// `(weights or blocks, scales)` pointers of a matrix.
fn matrix_ptrs(m: &ExpertMatrixRef<'_>, dev: &CudaDevice) -> Option<(u64, u64)> {
    match m {
        ExpertMatrixRef::Dense(w) => Some((ptr_of(w, dev)?, 0)),
        ExpertMatrixRef::Mxfp4 { blocks, scales } => Some((ptr_of(blocks, dev)?, ptr_of(scales, dev)?)),
    }
}

/// One expert's 8 pointers in the kernel's order (PTR_* in the kernel file).
fn expert_ptrs(e: &RoutedExpert<'_>, dev: &CudaDevice) -> Option<[u64; 8]> {
    let (g, gs) = matrix_ptrs(&e.gate_up, dev)?;
    let u = match &e.up {
        Some(u) => matrix_ptrs(u, dev)?.0,
        None => 0,
    };
    let (d, ds) = matrix_ptrs(&e.down, dev)?;
    let gb = match e.gate_up_bias {
        Some(b) => ptr_of(b, dev)?,
        None => 0,
    };
    let db = match e.down_bias {
        Some(b) => ptr_of(b, dev)?,
        None => 0,
    };
    Some([g, gs, u, 0, d, ds, gb, db])
}

/// The tables of one piece: routes `[start, start + len)` of the expert-sorted route list.
#[derive(Debug, Default, PartialEq)]
pub struct Piece {
    /// Per tile: (expert index in the call, first position in the piece, rows, 0).
    pub tiles: Vec<[u32; 4]>,
    /// Per position: the token (row of x and acc) and its router weight.
    pub tok: Vec<u32>,
    pub weights: Vec<f32>,
    /// The piece's distinct tokens, ascending; `tok_start[u]..tok_start[u + 1]` indexes
    /// `tok_pos`, the positions of token u in ascending order.
    pub tok_rows: Vec<u32>,
    pub tok_start: Vec<u32>,
    pub tok_pos: Vec<u32>,
}

impl Piece {
    /// Cuts the routes of `experts` (rows and weights, in call order) into pieces of at most
    /// `max_routes` routes.
    pub fn plan(experts: &[(&[u32], &[f32])], max_routes: usize) -> Vec<Piece> {
        let max_routes = max_routes.max(1);
        let mut pieces = vec![Piece::default()];
        for (ei, (rows, weights)) in experts.iter().enumerate() {
            let mut at = 0;
            while at < rows.len() {
                let room = max_routes - pieces.last().map_or(0, |p| p.tok.len());
                if room == 0 {
                    pieces.push(Piece::default());
                    continue;
                }
                let n = room.min(rows.len() - at);
                if let Some(p) = pieces.last_mut() {
                    let pos0 = p.tok.len();
                    for t0 in (0..n).step_by(TILE_ROWS) {
                        let m = TILE_ROWS.min(n - t0);
                        p.tiles.push([ei as u32, (pos0 + t0) as u32, m as u32, 0]);
                    }
                    p.tok.extend_from_slice(&rows[at..at + n]);
                    p.weights.extend_from_slice(&weights[at..at + n]);
                }
                at += n;
            }
        }
        pieces.retain(|p| !p.tok.is_empty());
        for p in &mut pieces {
            let mut order: Vec<u32> = (0..p.tok.len() as u32).collect();
            // Stable: a token's positions stay ascending.
            order.sort_by_key(|&q| p.tok[q as usize]);
            p.tok_start.push(0);
            for (i, &q) in order.iter().enumerate() {
                let t = p.tok[q as usize];
                if i > 0 && p.tok_rows.last() == Some(&t) {
                    if let Some(end) = p.tok_start.last_mut() {
                        *end += 1;
                    }
                } else {
                    p.tok_rows.push(t);
                    let prev = p.tok_start.last().copied().unwrap_or(0);
                    p.tok_start.push(prev + 1);
                }
                p.tok_pos.push(q);
            }
        }
        pieces
    }

    /// The u32 tables in one buffer: tiles, tok, tok_rows, tok_start, tok_pos, weights (as bits);
    /// and the offset of each table after the tiles.
    fn packed(&self) -> (Vec<u32>, [usize; 5]) {
        let mut v: Vec<u32> = self.tiles.iter().flatten().copied().collect();
        let mut at = [0; 5];
        for (i, part) in [&self.tok, &self.tok_rows, &self.tok_start, &self.tok_pos].into_iter().enumerate() {
            at[i] = v.len();
            v.extend_from_slice(part);
        }
        at[4] = v.len();
        v.extend(self.weights.iter().map(|w| w.to_bits()));
        (v, at)
    }
}

/// `acc[rows] += weights · FFN_e(x[rows])` for each expert of `experts` (module doc); x and acc
/// `[t, h]` f32. `Ok(false)` when the kernels do not take these experts (mixed or other
/// formats, K not a multiple of 32, tensors of another backend): nothing was launched.
pub fn grouped_experts(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    h: usize,
    experts: &[RoutedExpert<'_>],
    act: ExpertAct,
    acc: &mut CudaSlice<f32>,
) -> Result<bool> {
    let Some(first) = experts.first() else { return Ok(true) };
    let Some(fmt) = formats(first, act) else { return Ok(false) };
    let inter = first.down_width()?;
    if h == 0 || !h.is_multiple_of(TILE_K) || !inter.is_multiple_of(TILE_K) || first.down.rows() != h {
        return Ok(false);
    }
    let t = x.len() / h;
    if x.len() != t * h || acc.len() != t * h || i32::try_from(t * h).is_err() {
        return Err(shape("cuda grouped_experts", format!("x {}, acc {} for H = {h}", x.len(), acc.len())));
    }
    let mut ptrs = Vec::with_capacity(8 * experts.len());
    for e in experts {
        if formats(e, act) != Some(fmt) || e.down_width()? != inter || e.down.rows() != h {
            return Ok(false);
        }
        if e.rows.len() != e.weights.len() || e.rows.iter().any(|&r| r as usize >= t) {
            return Err(shape(
                "cuda grouped_experts",
                format!("{} rows (each below {t}) with {} weights", e.rows.len(), e.weights.len()),
            ));
        }
        let Some(p) = expert_ptrs(e, dev) else { return Ok(false) };
        ptrs.extend_from_slice(&p);
    }
    let lists: Vec<(&[u32], &[f32])> = experts.iter().map(|e| (e.rows, e.weights)).collect();
    let pieces = Piece::plan(&lists, PIECE_ROUTES);
    let Some(most) = pieces.iter().map(|p| p.tok.len()).max() else { return Ok(true) };
    let (limit, alpha, act_kind) = match act {
        ExpertAct::ClampedSwiglu { limit, alpha } => (limit, alpha, 0i32),
        ExpertAct::SiluMul => (0.0, 0.0, 1i32),
    };
    let ptrs_d = dev.upload(&ptrs, "grouped expert pointers")?;
    // SAFETY: for each piece the gate_up launch writes act for every position and column the
    // down launch reads, and the down launch every y element the combine reads.
    let mut act_buf: DeviceBuf<bf16> = unsafe { dev.alloc_uninit(most * inter, "grouped expert activations")? };
    let mut y_buf: DeviceBuf<f32> = unsafe { dev.alloc_uninit(most * h, "grouped expert outputs")? };
    let gate_up = dev.function("moe_grouped", SOURCE, fmt.gate_up)?;
    let down = dev.function("moe_grouped", SOURCE, fmt.down)?;
    let combine = dev.function("moe_grouped", SOURCE, "grouped_combine")?;
    let (h_i32, i_i32) = (h as i32, inter as i32);
    for p in &pieces {
        let n_tiles = p.tiles.len();
        if n_tiles > 65_535 {
            return Err(shape("cuda grouped_experts", format!("{n_tiles} tiles in one piece (at most 65535)")));
        }
        let (tables, at) = p.packed();
        let tables_d = dev.upload(&tables, "grouped expert tables")?;
        let tiles_v = tables_d.slice(..at[0]);
        let tok_v = tables_d.slice(at[0]..at[1]);
        let rows_v = tables_d.slice(at[1]..at[2]);
        let start_v = tables_d.slice(at[2]..at[3]);
        let pos_v = tables_d.slice(at[3]..at[4]);
        let w_v = tables_d.slice(at[4]..);

        // act [positions, I] bf16 = act(x[tok] · gate_upᵀ + b)
        let cfg = LaunchConfig {
            grid_dim: ((2 * inter).div_ceil(TILE_COLS) as u32, n_tiles as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l = dev.stream.launch_builder(&gate_up);
        l.arg(x).arg(&tok_v).arg(&tiles_v).arg(&*ptrs_d).arg(&mut *act_buf);
        l.arg(&h_i32).arg(&i_i32).arg(&fmt.gate_up_bias).arg(&act_kind).arg(&limit).arg(&alpha);
        // SAFETY: matches grouped_gate_up_*: every tile's rows are positions of this piece whose
        // tokens are below t (checked), the pointers address each expert's [2I, H] (or two
        // [I, H]) matrix and [2I] bias of the formats checked above, act holds `most` rows of I.
        unsafe { l.launch(cfg) }.map_err(driver_err("grouped_gate_up"))?;

        // y [positions, H] f32 = act · downᵀ + b
        let cfg = LaunchConfig {
            grid_dim: (h.div_ceil(TILE_COLS) as u32, n_tiles as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l = dev.stream.launch_builder(&down);
        l.arg(&*act_buf).arg(&tiles_v).arg(&*ptrs_d).arg(&mut *y_buf);
        l.arg(&h_i32).arg(&i_i32).arg(&fmt.down_bias);
        // SAFETY: matches grouped_down_*: act rows written above, down matrices [H, I], y holds
        // `most` rows of H.
        unsafe { l.launch(cfg) }.map_err(driver_err("grouped_down"))?;

        // acc[token] += w · y[position], a token's positions in order
        let n_tok = p.tok_rows.len() as i32;
        let mut l = dev.stream.launch_builder(&combine);
        l.arg(&*y_buf).arg(&w_v).arg(&rows_v).arg(&start_v).arg(&pos_v).arg(&mut *acc).arg(&n_tok).arg(&h_i32);
        // SAFETY: matches grouped_combine: tok_rows below t, tok_start has n_tok + 1 entries
        // indexing tok_pos, every position below the piece's routes.
        unsafe { l.launch(grid_stride(p.tok_rows.len() * h)) }.map_err(driver_err("grouped_combine"))?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cut_experts_into_tiles_and_list_each_tokens_positions_in_order() {
        let rows_a: Vec<u32> = (0..70).collect();
        let w_a = vec![0.5f32; 70];
        let rows_b = [3u32, 5, 69];
        let w_b = [0.25f32; 3];
        let empty: [u32; 0] = [];
        let lists: Vec<(&[u32], &[f32])> = vec![(&rows_a, &w_a), (&empty, &[]), (&rows_b, &w_b)];
        let one = Piece::plan(&lists, 4096);
        assert_eq!(one.len(), 1);
        let p = &one[0];
        assert_eq!(p.tiles, vec![[0, 0, 64, 0], [0, 64, 6, 0], [2, 70, 3, 0]]);
        assert_eq!(p.tok.len(), 73);
        assert_eq!(p.tok_rows, (0..70).collect::<Vec<u32>>());
        // Token 3: position 3 (expert 0), then 70 (expert 2).
        let at = |t: usize| &p.tok_pos[p.tok_start[t] as usize..p.tok_start[t + 1] as usize];
        assert_eq!(at(3), [3, 70]);
        assert_eq!(at(69), [69, 72]);
        assert_eq!(at(4), [4]);

        // Pieces of 32 routes: expert 0's 70 rows over three pieces, expert 2 in the third.
        let cut = Piece::plan(&lists, 32);
        assert_eq!(cut.iter().map(|p| p.tok.len()).collect::<Vec<_>>(), [32, 32, 9]);
        assert_eq!(cut[2].tiles, vec![[0, 0, 6, 0], [2, 6, 3, 0]]);
        assert_eq!(cut[2].tok_rows, vec![3, 5, 64, 65, 66, 67, 68, 69]);
        let (packed, at) = cut[2].packed();
        assert_eq!(at[0], 8);
        assert_eq!(f32::from_bits(packed[at[4]]), 0.5);
        assert_eq!(f32::from_bits(packed[at[4] + 6]), 0.25);
    }
}
