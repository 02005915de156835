//! MXFP4 (the GPT-OSS expert format, models.md §3.4): 32-element groups of FP4 E2M1 codes with
//! one E8M0 scale each, dequantised to bf16 bit-exactly as transformers does.
//!
//! `blocks [E, out, in/32, 16]` u8 holds, in byte j of a group, element 2j in the low nibble and
//! element 2j+1 in the high nibble; `scales [E, out, in/32]` u8 multiplies the group by
//! 2^(scale − 127). The result is the nn.Linear-layout matrix `[E, out, in]`. Every product of a
//! code value and a power of two is exact in bf16 (three significant bits at most) unless the
//! scale leaves bf16's exponent range, where it saturates like an f32→bf16 conversion.

use half::bf16;

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

/// Dequantises `rows` rows of `cols` elements (`rows` = E·out over all experts) into bf16.
pub fn dequantize(blocks: &[u8], scales: &[u8], rows: usize, cols: usize) -> Result<Vec<bf16>, Mxfp4Error> {
    if !cols.is_multiple_of(GROUP) {
        return Err(Mxfp4Error::Ragged(cols));
    }
    let groups = rows * cols / GROUP;
    if blocks.len() != groups * 16 || scales.len() != groups {
        return Err(Mxfp4Error::Sizes { blocks: blocks.len(), scales: scales.len(), rows, cols });
    }
    let mut out = Vec::with_capacity(rows * cols);
    for (g, &s) in scales.iter().enumerate() {
        let scale = scale_of(s);
        // ldexp semantics: a zero stays (signed) zero even under the infinite scale 255.
        let value = |code: u8| {
            let v = FP4_VALUES[usize::from(code)];
            bf16::from_f32(if v == 0.0 { v } else { v * scale })
        };
        for &b in &blocks[g * 16..g * 16 + 16] {
            out.push(value(b & 0xF));
            out.push(value(b >> 4));
        }
    }
    Ok(out)
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

    /// The refcheck fixtures: gpt_oss_mxfp4's experts are gpt_oss's bf16 experts quantised with
    /// the nearest-code rule (scale 2^e with e = ceil(log2(amax/6)), so amax/2^e lies in (3, 6]),
    /// so dequantising must land within half the largest code gap (4→6), i.e. 2^e < amax/3.
    /// Skips where ../shared is not checked out beside the repository.
    #[test]
    fn refcheck_fixture_dequantises_close_to_the_bf16_experts() {
        use crate::Catalog;
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/design/refcheck/fixtures");
        let (q, d) = (root.join("gpt_oss_mxfp4"), root.join("gpt_oss"));
        if !q.exists() || !d.exists() {
            eprintln!("SKIPPED: refcheck fixtures not found at {}", root.display());
            return;
        }
        let cd = Catalog::open_dir(&d).expect("bf16");
        let name = "model.layers.0.mlp.experts.gate_up_proj";
        let dense = cd.read(cd.get(name).expect("dense")).expect("read");
        let (e, h, two_i) = (dense.shape[0], dense.shape[1], dense.shape[2]);
        // The catalog takes float tensors only; read the u8 blocks and scales straight from the file.
        let file = std::fs::read(q.join("model.safetensors")).expect("mxfp4 file");
        let st = safetensors::SafeTensors::deserialize(&file).expect("safetensors");
        let bytes = |n: String| st.tensor(&n).expect("tensor").data().to_vec();
        let (blocks, scales) = (bytes(format!("{name}_blocks")), bytes(format!("{name}_scales")));
        let got = dequantize(&blocks, &scales, e * two_i, h).expect("dequantize");
        let want = dense.to_f32_vec().expect("f32");
        // got is [E, 2I, H] (nn.Linear); want is HF's [E, H, 2I].
        let mut worst = 0f32;
        for x in 0..e {
            for o in 0..two_i {
                let row: Vec<f32> = (0..h).map(|c| want[(x * h + c) * two_i + o]).collect();
                for g in 0..h / GROUP {
                    let amax = row[g * GROUP..(g + 1) * GROUP].iter().fold(0f32, |m, v| m.max(v.abs()));
                    for c in g * GROUP..(g + 1) * GROUP {
                        let err = (got[(x * two_i + o) * h + c].to_f32() - row[c]).abs();
                        worst = worst.max(err / amax.max(1e-30));
                    }
                }
            }
        }
        assert!(worst <= 1.0 / 3.0 + 1e-6, "worst error {worst} of the group maximum");
        eprintln!("gpt_oss_mxfp4 layer 0 gate_up: worst |dequant − bf16| = {worst:.3} of the group max");
    }
}
