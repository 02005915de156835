//! Dequantisation of ggml blocks to f32, and the reference quantisers for Q8_0, Q4_0 and Q4_1.
//!
//! Formulas: docs/models.md §7.3-7.4 and ggml's reference `dequantize_row_*` (ggml-quants.c). The
//! K-quants (256-weight super-blocks) live in [`super::kquant`]. All multi-byte fields are little
//! endian; `d`/`m` scales are f16 unless said otherwise.

use std::fmt;

use half::{bf16, f16};

use super::ggml_type::GgmlType;
use super::kquant;

/// Why a buffer could not be (de)quantised. The caller adds the tensor and file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuantError {
    /// The type has no dequantiser here.
    Unsupported(GgmlType),
    /// The byte and element counts do not describe whole blocks of the type.
    Length { ty: GgmlType, src_bytes: usize, n_elems: usize },
}

impl fmt::Display for QuantError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuantError::Unsupported(ty) => write!(
                f,
                "ggml type {ty} cannot be dequantised by ollm (supported: {}); re-quantise the model to one of those",
                supported_names().join(", ")
            ),
            QuantError::Length { ty, src_bytes, n_elems } => {
                write!(f, "{src_bytes} bytes do not hold {n_elems} weights of type {ty} in whole blocks")
            }
        }
    }
}

/// The types [`dequantize`] reads.
pub const SUPPORTED: &[GgmlType] = {
    use GgmlType::*;
    &[F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K]
};

pub fn is_supported(ty: GgmlType) -> bool {
    SUPPORTED.contains(&ty)
}

fn supported_names() -> Vec<&'static str> {
    SUPPORTED.iter().map(|t| t.name()).collect()
}

/// Dequantises whole blocks: `src` holds `dst.len()` weights of type `ty`.
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    if !is_supported(ty) {
        return Err(QuantError::Unsupported(ty));
    }
    let (block_elems, block_bytes) = (ty.block_elems() as usize, ty.block_bytes() as usize);
    if !dst.len().is_multiple_of(block_elems) || src.len() != dst.len() / block_elems * block_bytes {
        return Err(QuantError::Length { ty, src_bytes: src.len(), n_elems: dst.len() });
    }
    let block_fn: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => |b, y| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => |b, y| y[0] = f16_at(b, 0),
        GgmlType::BF16 => |b, y| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::Q4_0 => block_q4_0,
        GgmlType::Q4_1 => block_q4_1,
        GgmlType::Q5_0 => block_q5_0,
        GgmlType::Q5_1 => block_q5_1,
        GgmlType::Q8_0 => block_q8_0,
        GgmlType::Q2_K => kquant::block_q2_k,
        GgmlType::Q3_K => kquant::block_q3_k,
        GgmlType::Q4_K => kquant::block_q4_k,
        GgmlType::Q5_K => kquant::block_q5_k,
        GgmlType::Q6_K => kquant::block_q6_k,
        other => return Err(QuantError::Unsupported(other)),
    };
    for (block, out) in src.chunks_exact(block_bytes).zip(dst.chunks_exact_mut(block_elems)) {
        block_fn(block, out);
    }
    Ok(())
}

/// The f16 at byte `i` of `b`, widened to f32.
pub(super) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Q4_0, 18 bytes: `[d f16][qs 16 B]`; byte j holds weight j (low nibble) and j+16 (high):
/// `x = d·(q − 8)`.
fn block_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        y[j] = d * (f32::from(q & 0x0F) - 8.0);
        y[j + 16] = d * (f32::from(q >> 4) - 8.0);
    }
}

/// Q4_1, 20 bytes: `[d f16][m f16][qs 16 B]`, nibbles as Q4_0: `x = d·q + m` (docs/models.md §7.4).
fn block_q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for (j, &q) in b[4..20].iter().enumerate() {
        y[j] = d * f32::from(q & 0x0F) + m;
        y[j + 16] = d * f32::from(q >> 4) + m;
    }
}

/// The 5-bit values of a Q5 block: low nibbles as Q4_0, and bit j of the u32 `qh` is bit 4 of
/// weight j.
fn q5_values(qh: &[u8], qs: &[u8]) -> [u8; 32] {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut q = [0u8; 32];
    for (j, &byte) in qs.iter().enumerate() {
        let hi0 = ((qh >> j) & 1) as u8;
        let hi1 = ((qh >> (j + 16)) & 1) as u8;
        q[j] = (byte & 0x0F) | (hi0 << 4);
        q[j + 16] = (byte >> 4) | (hi1 << 4);
    }
    q
}

/// Q5_0, 22 bytes: `[d f16][qh u32][qs 16 B]`: `x = d·(q − 16)`.
fn block_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (out, q) in y.iter_mut().zip(q5_values(&b[2..6], &b[6..22])) {
        *out = d * (f32::from(q) - 16.0);
    }
}

/// Q5_1, 24 bytes: `[d f16][m f16][qh u32][qs 16 B]`: `x = d·q + m`.
fn block_q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for (out, q) in y.iter_mut().zip(q5_values(&b[4..8], &b[8..24])) {
        *out = d * f32::from(q) + m;
    }
}

/// Q8_0, 34 bytes: `[d f16][q 32 × i8]`: `x = d·q` (docs/models.md §7.3).
fn block_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (out, &q) in y.iter_mut().zip(&b[2..34]) {
        *out = d * f32::from(q as i8);
    }
}

fn check_whole_blocks(ty: GgmlType, src: &[f32]) -> Result<(), QuantError> {
    if !src.len().is_multiple_of(32) {
        return Err(QuantError::Length { ty, src_bytes: 0, n_elems: src.len() });
    }
    Ok(())
}

/// The reciprocal used by ggml's reference quantisers: 0 when the scale is 0.
fn inverse(d: f32) -> f32 {
    if d == 0.0 { 0.0 } else { 1.0 / d }
}

/// Reference Q8_0 quantiser: `d = max|x|/127`, `q = round(x/d)` with round half away from zero
/// (`f32::round`), computed as `x·(1/d)` like ggml's `quantize_row_q8_0_ref`.
pub fn quantize_q8_0(src: &[f32]) -> Result<Vec<u8>, QuantError> {
    check_whole_blocks(GgmlType::Q8_0, src)?;
    let mut out = Vec::with_capacity(src.len() / 32 * 34);
    for x in src.chunks_exact(32) {
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = inverse(d);
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
    }
    Ok(out)
}

/// Reference Q4_0 quantiser: the value of largest magnitude `max` (with its sign) gives
/// `d = max/−8`; `q = min(15, trunc(x/d + 8.5))`.
pub fn quantize_q4_0(src: &[f32]) -> Result<Vec<u8>, QuantError> {
    check_whole_blocks(GgmlType::Q4_0, src)?;
    let mut out = Vec::with_capacity(src.len() / 32 * 18);
    for x in src.chunks_exact(32) {
        let max = x.iter().fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
        let d = max / -8.0;
        let id = inverse(d);
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        let q = |v: f32| ((v * id + 8.5) as u8).min(15);
        out.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
    }
    Ok(out)
}

/// Reference Q4_1 quantiser (docs/models.md §7.4): `m = min`, `d = (max − min)/15`,
/// `q = min(15, trunc((x − m)/d + 0.5))`.
pub fn quantize_q4_1(src: &[f32]) -> Result<Vec<u8>, QuantError> {
    check_whole_blocks(GgmlType::Q4_1, src)?;
    let mut out = Vec::with_capacity(src.len() / 32 * 20);
    for x in src.chunks_exact(32) {
        let min = x.iter().copied().fold(f32::INFINITY, f32::min);
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let d = (max - min) / 15.0;
        let id = inverse(d);
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
        let q = |v: f32| (((v - min) * id + 0.5) as u8).min(15);
        out.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deq(ty: GgmlType, src: &[u8], n: usize) -> Vec<f32> {
        let mut y = vec![0f32; n];
        dequantize(ty, src, &mut y).expect("dequantize");
        y
    }

    fn h(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_le_bytes()
    }

    /// A smooth-ish test signal with both signs and a spread of magnitudes.
    fn signal(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i as f32) * 0.37).sin() * (1.0 + (i % 7) as f32) - 0.25).collect()
    }

    #[test]
    fn plain_float_types() {
        let f32_bytes: Vec<u8> = [1.5f32, -2.25].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(deq(GgmlType::F32, &f32_bytes, 2), vec![1.5, -2.25]);
        let f16_bytes: Vec<u8> = [h(0.5), h(-3.0)].concat();
        assert_eq!(deq(GgmlType::F16, &f16_bytes, 2), vec![0.5, -3.0]);
        // bf16 0x3FC0 = 1.5, 0xC040 = -3.0
        assert_eq!(deq(GgmlType::BF16, &[0xC0, 0x3F, 0x40, 0xC0], 2), vec![1.5, -3.0]);
    }

    #[test]
    fn q8_0_hand_block() {
        let mut b = h(0.5).to_vec();
        b.extend((0..32).map(|j| (j as i8 - 16) as u8));
        let y = deq(GgmlType::Q8_0, &b, 32);
        for (j, v) in y.iter().enumerate() {
            assert_eq!(*v, 0.5 * (j as f32 - 16.0));
        }
    }

    #[test]
    fn q4_0_and_q4_1_nibble_order() {
        // byte j: low nibble = weight j, high nibble = weight j+16.
        let qs: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();
        let q40 = [h(2.0).as_slice(), &qs].concat();
        let y = deq(GgmlType::Q4_0, &q40, 32);
        for j in 0..16 {
            assert_eq!(y[j], 2.0 * (j as f32 - 8.0));
            assert_eq!(y[j + 16], 2.0 * ((15 - j) as f32 - 8.0));
        }
        let q41 = [h(0.25).as_slice(), &h(-1.0), &qs].concat();
        let y = deq(GgmlType::Q4_1, &q41, 32);
        for j in 0..16 {
            assert_eq!(y[j], 0.25 * j as f32 - 1.0);
            assert_eq!(y[j + 16], 0.25 * (15 - j) as f32 - 1.0);
        }
    }

    #[test]
    fn q5_high_bits() {
        // weight j gets value j (0..31): low nibble j & 15, high bit j >> 4 in qh bit j.
        let qs: Vec<u8> = (0..16u8).map(|j| j | (j << 4)).collect();
        let qh: u32 = 0xFFFF_0000; // weights 16..31 have bit 4 set
        let q50 = [h(1.0).as_slice(), &qh.to_le_bytes(), &qs].concat();
        let y = deq(GgmlType::Q5_0, &q50, 32);
        for (j, v) in y.iter().enumerate() {
            assert_eq!(*v, j as f32 - 16.0);
        }
        let q51 = [h(0.5).as_slice(), &h(3.0), &qh.to_le_bytes(), &qs].concat();
        let y = deq(GgmlType::Q5_1, &q51, 32);
        for (j, v) in y.iter().enumerate() {
            assert_eq!(*v, 0.5 * j as f32 + 3.0);
        }
    }

    #[test]
    fn q8_0_round_trip() {
        let x = signal(96);
        let q = quantize_q8_0(&x).expect("quantize");
        assert_eq!(q.len(), 3 * 34);
        let y = deq(GgmlType::Q8_0, &q, 96);
        for (blk_x, blk_y) in x.chunks(32).zip(y.chunks(32)) {
            let d = blk_x.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
            for (a, b) in blk_x.iter().zip(blk_y) {
                // half a step, plus the f16 rounding of d (rel 2^-11) over up to 127 steps
                assert!((a - b).abs() <= 0.5 * d + 127.0 * d * 1e-3, "{a} vs {b} (d {d})");
            }
        }
    }

    #[test]
    fn q4_0_round_trip() {
        let x = signal(64);
        let y = deq(GgmlType::Q4_0, &quantize_q4_0(&x).expect("quantize"), 64);
        for (blk_x, blk_y) in x.chunks(32).zip(y.chunks(32)) {
            let amax = blk_x.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 8.0;
            for (a, b) in blk_x.iter().zip(blk_y) {
                // The grid is d·(−8..7): the far end opposite `max` clips at 7d, so the error
                // bound is one step there and half a step elsewhere.
                assert!((a - b).abs() <= d * 1.01, "{a} vs {b} (d {d})");
            }
            // The extreme value itself is exact up to f16 rounding of d.
            let (i, _) =
                blk_x.iter().enumerate().fold((0, 0f32), |m, (i, v)| if v.abs() > m.1 { (i, v.abs()) } else { m });
            assert!((blk_x[i] - blk_y[i]).abs() <= amax * 1e-3);
        }
    }

    #[test]
    fn q4_1_round_trip() {
        let x = signal(64);
        let y = deq(GgmlType::Q4_1, &quantize_q4_1(&x).expect("quantize"), 64);
        for (blk_x, blk_y) in x.chunks(32).zip(y.chunks(32)) {
            let min = blk_x.iter().copied().fold(f32::INFINITY, f32::min);
            let max = blk_x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let d = (max - min) / 15.0;
            for (a, b) in blk_x.iter().zip(blk_y) {
                // half a step plus f16 rounding of d and m
                let tol = 0.5 * d + 15.0 * d * 1e-3 + min.abs() * 1e-3;
                assert!((a - b).abs() <= tol, "{a} vs {b} (d {d})");
            }
        }
    }

    #[test]
    fn constant_blocks_quantise_to_zero_scale() {
        let zeros = vec![0f32; 32];
        assert!(deq(GgmlType::Q8_0, &quantize_q8_0(&zeros).expect("q8"), 32).iter().all(|v| *v == 0.0));
        assert!(deq(GgmlType::Q4_0, &quantize_q4_0(&zeros).expect("q4_0"), 32).iter().all(|v| *v == 0.0));
        let sevens = vec![7f32; 32];
        assert!(deq(GgmlType::Q4_1, &quantize_q4_1(&sevens).expect("q4_1"), 32).iter().all(|v| *v == 7.0));
    }

    #[test]
    fn errors_name_the_type() {
        let mut y = vec![0f32; 32];
        let err = dequantize(GgmlType::IQ2_XXS, &[0u8; 66], &mut y).expect_err("unsupported");
        let msg = err.to_string();
        assert!(msg.contains("IQ2_XXS (type 16)") && msg.contains("Q4_K"), "{msg}");
        let err = dequantize(GgmlType::Q8_0, &[0u8; 33], &mut y).expect_err("short");
        assert!(matches!(err, QuantError::Length { .. }), "{err}");
        assert!(quantize_q8_0(&[0.0; 31]).is_err());
    }
}
