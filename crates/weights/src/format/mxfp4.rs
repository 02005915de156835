//! MXFP4 lives in ollm-ops ([`ollm_ops::mxfp4`]), where backends dequantise it; this module
//! re-exports it and checks it against the refcheck fixtures.

pub use ollm_ops::mxfp4::*;

#[cfg(test)]
mod tests {
    use super::*;

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
        let cq = Catalog::open_dir(&q).expect("mxfp4");
        let bytes = |n: String| cq.read(cq.get(&n).expect("tensor")).expect("read").bytes;
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
