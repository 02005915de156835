//! K-quant super-blocks (256 weights) to f32, following ggml's reference `dequantize_row_q*_K`.
//!
//! A super-block has one f16 scale `d` (and for the affine types a min-scale `dmin`), and
//! per-sub-block integer scales. Each function takes exactly one block of bytes and fills 256
//! weights; [`super::quant::dequantize`] checks the lengths.

use super::quant::f16_at;

/// The 6-bit scale and min of sub-block `j` (0..8) from the 12 packed bytes of Q4_K/Q5_K:
/// bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the same
/// for the mins; bytes 8-11 the low nibbles of scales 4-7 (low) and mins 4-7 (high).
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    };
    (f32::from(sc), f32::from(m))
}

/// Q2_K, 84 bytes: `[scales 16 B][qs 64 B][d f16][dmin f16]`. Scale byte: low nibble scales,
/// high nibble mins, one per 16 weights. Each 128-weight half uses 32 bytes of `qs`, four 2-bit
/// planes (shift 0, 2, 4, 6), each plane covering 32 weights as two 16-weight sub-blocks.
pub(super) fn block_q2_k(b: &[u8], y: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    let mut sub = 0;
    for (half, q) in qs.chunks_exact(32).enumerate() {
        for plane in 0..4 {
            let shift = 2 * plane;
            for part in 0..2 {
                let sc = scales[sub];
                sub += 1;
                let (dl, ml) = (d * f32::from(sc & 0x0F), dmin * f32::from(sc >> 4));
                let base = half * 128 + plane * 32 + part * 16;
                for l in 0..16 {
                    let v = (q[part * 16 + l] >> shift) & 3;
                    y[base + l] = dl * f32::from(v) - ml;
                }
            }
        }
    }
}

/// The 16 signed 6-bit scales of Q3_K: scale i has low nibble from byte i (i < 8) or the high
/// nibble of byte i−8, and its top two bits from byte 8 + i%4 at shift 2·(i/4); stored +32.
fn q3_k_scales(s: &[u8]) -> [f32; 16] {
    let mut out = [0f32; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let lo = if i < 8 { s[i] & 0x0F } else { s[i - 8] >> 4 };
        let hi = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        *o = f32::from((lo | (hi << 4)) as i8 - 32);
    }
    out
}

/// Q3_K, 110 bytes: `[hmask 32 B][qs 64 B][scales 12 B][d f16]`. 2-bit planes as Q2_K; the
/// third bit comes from `hmask` (bit `plane + 4·half` of byte l), and a *clear* bit subtracts 4.
pub(super) fn block_q3_k(b: &[u8], y: &mut [f32]) {
    let (hmask, qs) = (&b[0..32], &b[32..96]);
    let scales = q3_k_scales(&b[96..108]);
    let d = f16_at(b, 108);
    let mut sub = 0;
    for (half, q) in qs.chunks_exact(32).enumerate() {
        for plane in 0..4 {
            let shift = 2 * plane;
            let mask = 1u8 << (plane + 4 * half);
            for part in 0..2 {
                let dl = d * scales[sub];
                sub += 1;
                let base = half * 128 + plane * 32 + part * 16;
                for l in 0..16 {
                    let idx = part * 16 + l;
                    let low = i16::from((q[idx] >> shift) & 3);
                    let high = if hmask[idx] & mask != 0 { 0 } else { 4 };
                    y[base + l] = dl * f32::from(low - high);
                }
            }
        }
    }
}

/// Q4_K, 144 bytes: `[d f16][dmin f16][scales 12 B][qs 128 B]`. Each 64 weights use 32 bytes
/// of `qs`: the low nibbles are sub-block 2k, the high nibbles sub-block 2k+1; `x = d·sc·q − dmin·m`.
pub(super) fn block_q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for (k, q) in qs.chunks_exact(32).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * k, scales);
        let (sc2, m2) = scale_min_k4(2 * k + 1, scales);
        let (d1, min1, d2, min2) = (d * sc1, dmin * m1, d * sc2, dmin * m2);
        for l in 0..32 {
            y[64 * k + l] = d1 * f32::from(q[l] & 0x0F) - min1;
            y[64 * k + 32 + l] = d2 * f32::from(q[l] >> 4) - min2;
        }
    }
}

/// Q5_K, 176 bytes: `[d f16][dmin f16][scales 12 B][qh 32 B][qs 128 B]`. As Q4_K, plus a fifth
/// bit per weight: for 64-weight group k, bit 2k of `qh[l]` (low nibbles) and bit 2k+1 (high).
pub(super) fn block_q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for (k, q) in qs.chunks_exact(32).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * k, scales);
        let (sc2, m2) = scale_min_k4(2 * k + 1, scales);
        let (d1, min1, d2, min2) = (d * sc1, dmin * m1, d * sc2, dmin * m2);
        let (u1, u2) = (1u8 << (2 * k), 1u8 << (2 * k + 1));
        for l in 0..32 {
            let lo = (q[l] & 0x0F) | if qh[l] & u1 != 0 { 16 } else { 0 };
            let hi = (q[l] >> 4) | if qh[l] & u2 != 0 { 16 } else { 0 };
            y[64 * k + l] = d1 * f32::from(lo) - min1;
            y[64 * k + 32 + l] = d2 * f32::from(hi) - min2;
        }
    }
}

/// Q6_K, 210 bytes: `[ql 128 B][qh 64 B][scales 16 × i8][d f16]`, `x = d·sc·(q − 32)`. Each
/// 128-weight half uses 64 bytes of `ql` and 32 of `qh`; weights l, l+32, l+64, l+96 take the
/// low/low/high/high nibbles of ql[l], ql[l+32], ql[l], ql[l+32] and bits 0-1/2-3/4-5/6-7 of qh[l].
pub(super) fn block_q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let out = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q = [
                (ql[l] & 0x0F) | ((qh[l] & 3) << 4),
                (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4),
                (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
            ];
            for (quarter, qv) in q.iter().enumerate() {
                let scale = f32::from(sc[is + 2 * quarter] as i8);
                out[32 * quarter + l] = d * scale * f32::from(*qv as i8 - 32);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    fn h(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_le_bytes()
    }

    /// Packs 8 six-bit scales and mins the way Q4_K/Q5_K store them (inverse of scale_min_k4).
    fn pack_scales(sc: [u8; 8], m: [u8; 8]) -> [u8; 12] {
        let mut q = [0u8; 12];
        for j in 0..4 {
            q[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
            q[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
            q[j + 8] = (sc[j + 4] & 0x0F) | ((m[j + 4] & 0x0F) << 4);
        }
        q
    }

    const SC: [u8; 8] = [1, 2, 3, 63, 17, 40, 33, 5];
    const MN: [u8; 8] = [0, 7, 63, 1, 48, 2, 31, 16];

    #[test]
    fn scale_min_unpacks_both_halves() {
        let q = pack_scales(SC, MN);
        for j in 0..8 {
            assert_eq!(scale_min_k4(j, &q), (f32::from(SC[j]), f32::from(MN[j])), "sub-block {j}");
        }
    }

    #[test]
    fn q4_k_hand_block() {
        // weight i has nibble i % 16; sub-block s = i / 32 uses scale SC[s], min MN[s].
        let mut b = [h(0.5).as_slice(), &h(0.25), &pack_scales(SC, MN)].concat();
        let mut qs = [0u8; 128];
        for k in 0..4 {
            for l in 0..32 {
                let lo = (64 * k + l) % 16;
                let hi = (64 * k + 32 + l) % 16;
                qs[32 * k + l] = lo as u8 | ((hi as u8) << 4);
            }
        }
        b.extend_from_slice(&qs);
        let mut y = [0f32; 256];
        block_q4_k(&b, &mut y);
        for (i, v) in y.iter().enumerate() {
            let s = i / 32;
            let want = 0.5 * f32::from(SC[s]) * (i % 16) as f32 - 0.25 * f32::from(MN[s]);
            assert_eq!(*v, want, "weight {i}");
        }
    }

    #[test]
    fn q5_k_hand_block() {
        // weight i has 5-bit value i % 32: low nibble in qs, bit 4 in qh.
        let mut b = [h(1.0).as_slice(), &h(2.0), &pack_scales(SC, MN)].concat();
        let (mut qh, mut qs) = ([0u8; 32], [0u8; 128]);
        for k in 0..4 {
            for l in 0..32 {
                let (lo, hi) = (((64 * k + l) % 32) as u8, ((64 * k + 32 + l) % 32) as u8);
                qs[32 * k + l] = (lo & 0x0F) | ((hi & 0x0F) << 4);
                qh[l] |= ((lo >> 4) << (2 * k)) | ((hi >> 4) << (2 * k + 1));
            }
        }
        b.extend_from_slice(&qh);
        b.extend_from_slice(&qs);
        let mut y = [0f32; 256];
        block_q5_k(&b, &mut y);
        for (i, v) in y.iter().enumerate() {
            let s = i / 32;
            let want = f32::from(SC[s]) * (i % 32) as f32 - 2.0 * f32::from(MN[s]);
            assert_eq!(*v, want, "weight {i}");
        }
    }

    #[test]
    fn q6_k_hand_block() {
        // weight i has 6-bit value i % 64, scale of sub-block i/16 is (i/16) − 8.
        let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
        for i in 0..256usize {
            let q = (i % 64) as u8;
            let (half, r) = (i / 128, i % 128);
            let (quarter, l) = (r / 32, r % 32);
            let ql_idx = 64 * half + l + if quarter % 2 == 1 { 32 } else { 0 };
            let nib_shift = if quarter >= 2 { 4 } else { 0 };
            ql[ql_idx] |= (q & 0x0F) << nib_shift;
            qh[32 * half + l] |= (q >> 4) << (2 * quarter);
        }
        let scales: Vec<u8> = (0..16).map(|s| (s as i8 - 8) as u8).collect();
        let b = [ql.as_slice(), &qh, &scales, &h(0.5)].concat();
        let mut y = [0f32; 256];
        block_q6_k(&b, &mut y);
        for (i, v) in y.iter().enumerate() {
            let want = 0.5 * ((i / 16) as f32 - 8.0) * ((i % 64) as f32 - 32.0);
            assert_eq!(*v, want, "weight {i}");
        }
    }

    #[test]
    fn q2_k_hand_block() {
        // weight i has 2-bit value (i / 3) % 4; sub-block s = i / 16 has scale s % 16, min 15 − s.
        let scales: Vec<u8> = (0..16u8).map(|s| s | ((15 - s) << 4)).collect();
        let mut qs = [0u8; 64];
        for i in 0..256usize {
            let (half, r) = (i / 128, i % 128);
            let (plane, idx) = (r / 32, r % 32);
            qs[32 * half + idx] |= (((i / 3) % 4) as u8) << (2 * plane);
        }
        let b = [scales.as_slice(), &qs, &h(0.5), &h(0.125)].concat();
        let mut y = [0f32; 256];
        block_q2_k(&b, &mut y);
        for (i, v) in y.iter().enumerate() {
            let s = (i / 16) as f32;
            let want = 0.5 * s * ((i / 3) % 4) as f32 - 0.125 * (15.0 - s);
            assert_eq!(*v, want, "weight {i}");
        }
    }

    #[test]
    fn q3_k_hand_block() {
        // weight i: 3-bit value v = i % 8, stored as low 2 bits in qs and hmask bit set iff v >= 4
        // (a set bit means "no −4"), giving q = v − 4. Scale of sub-block s is s − 8 (+32 stored).
        let (mut hmask, mut qs) = ([0u8; 32], [0u8; 64]);
        for i in 0..256usize {
            let v = (i % 8) as u8;
            let (half, r) = (i / 128, i % 128);
            let (plane, idx) = (r / 32, r % 32);
            qs[32 * half + idx] |= (v & 3) << (2 * plane);
            if v >= 4 {
                hmask[idx] |= 1 << (plane + 4 * half);
            }
        }
        let mut sc = [0u8; 12];
        for s in 0..16usize {
            let stored = (s as u8 + 24) & 63; // (s − 8) + 32
            if s < 8 {
                sc[s] |= stored & 0x0F
            } else {
                sc[s - 8] |= (stored & 0x0F) << 4
            }
            sc[8 + s % 4] |= (stored >> 4) << (2 * (s / 4));
        }
        let b = [hmask.as_slice(), &qs, &sc, &h(0.25)].concat();
        let mut y = [0f32; 256];
        block_q3_k(&b, &mut y);
        for (i, v) in y.iter().enumerate() {
            let q = (i % 8) as f32 - 4.0;
            let want = 0.25 * ((i / 16) as f32 - 8.0) * q;
            assert_eq!(*v, want, "weight {i}");
        }
    }
}
