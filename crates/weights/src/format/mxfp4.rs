//! MXFP4 lives in ollm-ops ([`ollm_ops::mxfp4`]), where backends dequantise it; this module
//! re-exports it and checks it against the golden GPT-OSS fixtures.

pub use ollm_ops::mxfp4::*;

#[cfg(test)]
mod tests {
    use super::*;

    /// The golden GPT-OSS fixtures in the repository: gpt_oss_mxfp4's experts are
    /// gpt_oss_dense's bf16 experts quantised with the nearest-code rule (scale 2^e with
    /// e = ceil(log2(amax/6)), so amax/2^e lies in (3, 6]; scripts/make_golden_gpt_oss.py), so
    /// dequantising must land within half the largest code gap (4→6), i.e. 2^e < amax/3. All four
    /// layers, both expert matrices.
    #[test]
    fn golden_fixture_dequantises_close_to_the_bf16_experts() {
        use crate::Catalog;
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden");
        let cd = Catalog::open_dir(&root.join("gpt_oss_dense")).expect("fixtures/golden/gpt_oss_dense");
        let cq = Catalog::open_dir(&root.join("gpt_oss_mxfp4")).expect("fixtures/golden/gpt_oss_mxfp4");
        let bytes = |n: String| cq.read(cq.get(&n).expect("tensor")).expect("read").bytes;
        for layer in 0..4 {
            for matrix in ["gate_up_proj", "down_proj"] {
                let name = format!("model.layers.{layer}.mlp.experts.{matrix}");
                let dense = cd.read(cd.get(&name).expect("dense experts")).expect("read");
                // HF keeps [E, in, out]; the blocks are nn.Linear's [E, out, in/32, 16].
                let (e, inp, out) = (dense.shape[0], dense.shape[1], dense.shape[2]);
                let (blocks, scales) = (bytes(format!("{name}_blocks")), bytes(format!("{name}_scales")));
                let got = dequantize(&blocks, &scales, e * out, inp).expect("dequantize");
                let want = dense.to_f32_vec().expect("f32");
                let mut worst = 0f32;
                for x in 0..e {
                    for o in 0..out {
                        let row: Vec<f32> = (0..inp).map(|c| want[(x * inp + c) * out + o]).collect();
                        for g in 0..inp / GROUP {
                            let amax = row[g * GROUP..(g + 1) * GROUP].iter().fold(0f32, |m, v| m.max(v.abs()));
                            for c in g * GROUP..(g + 1) * GROUP {
                                let err = (got[(x * out + o) * inp + c].to_f32() - row[c]).abs();
                                worst = worst.max(err / amax.max(1e-30));
                            }
                        }
                    }
                }
                assert!(worst <= 1.0 / 3.0 + 1e-6, "{name}: worst error {worst} of the group maximum");
                assert!(worst > 0.0, "{name}: 4-bit codes cannot hold bf16 experts exactly");
                eprintln!("{name}: worst |dequant − bf16| = {worst:.3} of the group max");
            }
        }
    }
}
