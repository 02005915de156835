//! MXFP4 (the GPT-OSS expert format, docs/models.md §3.4): 32-element groups of FP4 E2M1 codes with
//! one E8M0 scale each, dequantised to bf16 bit-exactly as transformers does.
//!
//! `blocks [E, out, in/32, 16]` u8 holds, in byte j of a group, element 2j in the low nibble and
//! element 2j+1 in the high nibble; `scales [E, out, in/32]` u8 multiplies the group by
//! 2^(scale − 127). The result is the nn.Linear-layout matrix `[E, out, in]`. Every product of a
//! code value and a power of two is exact in bf16 (three significant bits at most) unless the
//! scale leaves bf16's exponent range, where it saturates like an f32→bf16 conversion.

use half::bf16;
use rayon::prelude::*;

/// FP4 E2M1 code → value.
pub const FP4_VALUES: [f32; 16] =
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

/// Elements per scale group.
pub const GROUP: usize = 32;

/// Why a pair of MXFP4 tensors cannot be dequantised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mxfp4Error {
    #[error("MXFP4 'in' dimension {0} is not a multiple of {GROUP}")]
    Ragged(usize),
    #[error("MXFP4 sizes disagree: {blocks} block bytes and {scales} scales for {rows} rows of {cols}")]
    Sizes { blocks: usize, scales: usize, rows: usize, cols: usize },
}

/// 2^(s − 127) as f32 (s = 0 gives the subnormal 2^-127; like HF, 255 is not special-cased).
fn scale_of(s: u8) -> f32 {
    f32::from_bits(if s == 0 { 0x0040_0000 } else { u32::from(s) << 23 })
}

/// Checks that `blocks` and `scales` hold `rows` rows of `cols` elements.
pub fn check(blocks: usize, scales: usize, rows: usize, cols: usize) -> Result<(), Mxfp4Error> {
    if !cols.is_multiple_of(GROUP) {
        return Err(Mxfp4Error::Ragged(cols));
    }
    let groups = rows * cols / GROUP;
    if blocks != groups * 16 || scales != groups {
        return Err(Mxfp4Error::Sizes { blocks, scales, rows, cols });
    }
    Ok(())
}

/// Dequantises `rows` rows of `cols` elements (`rows` = E·out over all experts) into bf16.
pub fn dequantize(blocks: &[u8], scales: &[u8], rows: usize, cols: usize) -> Result<Vec<bf16>, Mxfp4Error> {
    let mut out = vec![bf16::ZERO; rows * cols];
    dequantize_into(blocks, scales, rows, cols, &mut out)?;
    Ok(out)
}

/// [`dequantize`] into `out` (`rows · cols` elements), one parallel task per row.
pub fn dequantize_into(
    blocks: &[u8],
    scales: &[u8],
    rows: usize,
    cols: usize,
    out: &mut [bf16],
) -> Result<(), Mxfp4Error> {
    check(blocks.len(), scales.len(), rows, cols)?;
    if out.len() != rows * cols {
        return Err(Mxfp4Error::Sizes { blocks: blocks.len(), scales: scales.len(), rows, cols });
    }
    let per_row = cols / GROUP;
    out.par_chunks_mut(cols.max(1)).enumerate().for_each(|(r, row)| {
        for (g, chunk) in row.chunks_exact_mut(GROUP).enumerate() {
            let idx = r * per_row + g;
            let scale = scale_of(scales[idx]);
            // ldexp semantics: a zero stays (signed) zero even under the infinite scale 255.
            let value = |code: u8| {
                let v = FP4_VALUES[usize::from(code)];
                bf16::from_f32(if v == 0.0 { v } else { v * scale })
            };
            for (pair, &b) in chunk.chunks_exact_mut(2).zip(&blocks[idx * 16..idx * 16 + 16]) {
                pair[0] = value(b & 0xF);
                pair[1] = value(b >> 4);
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nibbles_scales_and_signs() {
        // One row of 32: byte j = (high code, low code) = (j % 16, 15 - j % 16).
        let blocks: Vec<u8> = (0..16u8).map(|j| ((j % 16) << 4) | (15 - j % 16)).collect();
        for (s, mult) in [(127u8, 1.0f32), (128, 2.0), (125, 0.25)] {
            let got = dequantize(&blocks, &[s], 1, 32).expect("dequantize");
            for j in 0..16 {
                assert_eq!(got[2 * j].to_f32(), FP4_VALUES[15 - j] * mult, "low nibble of byte {j}, scale {s}");
                assert_eq!(got[2 * j + 1].to_f32(), FP4_VALUES[j] * mult, "high nibble of byte {j}, scale {s}");
            }
        }
        // Code 8 is negative zero.
        let z = dequantize(&[0x88; 16], &[127], 1, 32).expect("zeros");
        assert!(z.iter().all(|v| v.to_f32() == 0.0 && v.to_f32().is_sign_negative()));
        assert_eq!(scale_of(0), 2f32.powi(-127));
        // Scale 255 is 2^128 = inf: non-zero codes overflow, zeros stay zero (as ldexp does).
        let big = dequantize(&[0x10; 16], &[255], 1, 32).expect("255");
        assert!(big[0].to_f32() == 0.0 && big[1].to_f32() == f32::INFINITY);
        assert_eq!(scale_of(254), 2f32.powi(127));
    }

    #[test]
    fn shapes_are_checked() {
        assert_eq!(dequantize(&[0; 16], &[127], 1, 31), Err(Mxfp4Error::Ragged(31)));
        assert!(matches!(dequantize(&[0; 15], &[127], 1, 32), Err(Mxfp4Error::Sizes { .. })));
        assert!(matches!(dequantize(&[0; 32], &[127], 1, 64), Err(Mxfp4Error::Sizes { .. })));
    }
}
