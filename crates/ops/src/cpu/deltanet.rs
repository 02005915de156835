//! Gated DeltaNet on the CPU (docs/models.md §4.5), f32 throughout: the short causal convolution with
//! its carried inputs, the gates, and the delta rule in its recurrent form (the definition; decode)
//! and its chunked form (prefill: chunks of [`CHUNK`] steps, the same math reassociated).

use rayon::prelude::*;

/// Steps per chunk of the chunked delta rule (HF's chunk size).
pub const CHUNK: usize = 64;

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `out[t, c] = silu(Σ_j w[c, j] · u[t + j][c])` over `u = [state; x]` (`state` `[kc-1, ch]`
/// holds the inputs before `x`); then `state` takes the last `kc-1` rows of `u`. x, out
/// `[t, ch]`, w `[ch, kc]`.
pub fn causal_conv1d(x: &[f32], ch: usize, w: &[f32], kc: usize, state: &mut [f32], out: &mut [f32]) {
    let t = x.len() / ch.max(1);
    let keep = kc - 1;
    let row = |i: usize| -> &[f32] {
        if i < keep { &state[i * ch..(i + 1) * ch] } else { &x[(i - keep) * ch..(i - keep + 1) * ch] }
    };
    for s in 0..t {
        let o = &mut out[s * ch..(s + 1) * ch];
        for (c, oc) in o.iter_mut().enumerate() {
            let acc: f32 = (0..kc).map(|j| w[c * kc + j] * row(s + j)[c]).sum();
            *oc = silu(acc);
        }
    }
    let rows: Vec<f32> = (t..t + keep).flat_map(|i| row(i).to_vec()).collect();
    state.copy_from_slice(&rows);
}

/// Per value head: `beta = σ(b)`, `g = −exp(a_log) · softplus(a + dt_bias)` (a log-decay ≤ 0).
/// a, b, g, beta `[t, nv]`; a_log, dt_bias `[nv]`.
pub fn gates(a: &[f32], b: &[f32], a_log: &[f32], dt_bias: &[f32], g: &mut [f32], beta: &mut [f32]) {
    let nv = a_log.len();
    for (i, (gi, bi)) in g.iter_mut().zip(beta.iter_mut()).enumerate() {
        let h = i % nv;
        let x = a[i] + dt_bias[h];
        let softplus = if x > 20.0 { x } else { x.exp().ln_1p() };
        *gi = -a_log[h].exp() * softplus;
        *bi = 1.0 / (1.0 + (-b[i]).exp());
    }
}

/// Rows of length `d`: `x ← x / sqrt(Σx² + eps) · scale`.
pub fn l2_norm_rows(x: &mut [f32], d: usize, eps: f32, scale: f32) {
    for r in x.chunks_mut(d) {
        let inv = scale / (r.iter().map(|v| v * v).sum::<f32>() + eps).sqrt();
        r.iter_mut().for_each(|v| *v *= inv);
    }
}

/// Shapes of one delta-rule call: `t` steps, `nk` key heads of `dk`, `nv` value heads of `dv`
/// (value head n reads key head n / (nv / nk)).
#[derive(Clone, Copy, Debug)]
pub struct DeltaDims {
    pub t: usize,
    pub nk: usize,
    pub dk: usize,
    pub nv: usize,
    pub dv: usize,
}

/// Inputs of one delta-rule call: q, k `[t, nk, dk]` (normalised, q scaled), v `[t, nv, dv]`,
/// g (log-decay) and beta `[t, nv]`.
pub struct DeltaInputs<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub g: &'a [f32],
    pub beta: &'a [f32],
}

/// The recurrence, per value head with state `S [dk, dv]`: `S ← e^g S`; `δ = β (v − Sᵀk)`;
/// `S ← S + k δᵀ`; `o = Sᵀq`. state `[nv, dk, dv]`, out `[t, nv, dv]`.
pub fn delta_rule_recurrent(d: DeltaDims, x: &DeltaInputs<'_>, state: &mut [f32], out: &mut [f32]) {
    let r = d.nv / d.nk;
    let heads: Vec<Vec<f32>> = state
        .par_chunks_mut(d.dk * d.dv)
        .enumerate()
        .map(|(n, s)| {
            let kh = n / r;
            let mut o = vec![0f32; d.t * d.dv];
            let mut u = vec![0f32; d.dv];
            for t in 0..d.t {
                let q = &x.q[(t * d.nk + kh) * d.dk..][..d.dk];
                let k = &x.k[(t * d.nk + kh) * d.dk..][..d.dk];
                let v = &x.v[(t * d.nv + n) * d.dv..][..d.dv];
                let (decay, beta) = (x.g[t * d.nv + n].exp(), x.beta[t * d.nv + n]);
                s.iter_mut().for_each(|e| *e *= decay);
                u.iter_mut().for_each(|e| *e = 0.0);
                for (i, &ki) in k.iter().enumerate() {
                    for (uj, sj) in u.iter_mut().zip(&s[i * d.dv..(i + 1) * d.dv]) {
                        *uj += sj * ki;
                    }
                }
                for (uj, vj) in u.iter_mut().zip(v) {
                    *uj = beta * (vj - *uj);
                }
                for (i, &ki) in k.iter().enumerate() {
                    for (sj, dj) in s[i * d.dv..(i + 1) * d.dv].iter_mut().zip(&u) {
                        *sj += ki * dj;
                    }
                }
                let ot = &mut o[t * d.dv..(t + 1) * d.dv];
                for (i, &qi) in q.iter().enumerate() {
                    for (oj, sj) in ot.iter_mut().zip(&s[i * d.dv..(i + 1) * d.dv]) {
                        *oj += sj * qi;
                    }
                }
            }
            o
        })
        .collect();
    scatter_heads(d, &heads, out);
}

/// The chunked form (docs/models.md §4.5): per chunk of up to [`CHUNK`] steps, with γ the inclusive
/// cumulative log-decay, `D_ts = e^(γ_t − γ_s)` (s ≤ t) and `A_ts = β_t (k_t·k_s) D_ts` (s < t):
/// `U = (I + A)⁻¹ diag(β) V`, `W = (I + A)⁻¹ diag(β e^γ) K` (forward substitution), then with the
/// incoming state S: `Vn = U − W S`, `O = diag(e^γ) Q S + (QKᵀ ⊙ D) Vn`, and
/// `S ← e^(γ_last) S + (diag(e^(γ_last − γ)) K)ᵀ Vn`. Memory is one chunk's matrices per head.
pub fn delta_rule_chunked(d: DeltaDims, x: &DeltaInputs<'_>, state: &mut [f32], out: &mut [f32]) {
    let r = d.nv / d.nk;
    let (dk, dv) = (d.dk, d.dv);
    let heads: Vec<Vec<f32>> = state
        .par_chunks_mut(dk * dv)
        .enumerate()
        .map(|(n, s)| {
            let kh = n / r;
            let mut o = vec![0f32; d.t * dv];
            let mut c0 = 0;
            while c0 < d.t {
                let c = CHUNK.min(d.t - c0);
                let q = |i: usize| &x.q[((c0 + i) * d.nk + kh) * dk..][..dk];
                let k = |i: usize| &x.k[((c0 + i) * d.nk + kh) * dk..][..dk];
                let v = |i: usize| &x.v[((c0 + i) * d.nv + n) * dv..][..dv];
                let beta = |i: usize| x.beta[(c0 + i) * d.nv + n];
                let mut gamma = vec![0f32; c];
                let mut acc = 0f32;
                for (i, gi) in gamma.iter_mut().enumerate() {
                    acc += x.g[(c0 + i) * d.nv + n];
                    *gi = acc;
                }
                let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
                // A (strictly lower) and the two forward substitutions.
                let mut a = vec![0f32; c * c];
                for t in 0..c {
                    for s_ in 0..t {
                        a[t * c + s_] = beta(t) * dot(k(t), k(s_)) * (gamma[t] - gamma[s_]).exp();
                    }
                }
                let mut u = vec![0f32; c * dv];
                let mut w = vec![0f32; c * dk];
                for t in 0..c {
                    let eg = gamma[t].exp();
                    for j in 0..dv {
                        u[t * dv + j] = beta(t) * v(t)[j];
                    }
                    for j in 0..dk {
                        w[t * dk + j] = beta(t) * eg * k(t)[j];
                    }
                    for s_ in 0..t {
                        let ats = a[t * c + s_];
                        for j in 0..dv {
                            u[t * dv + j] -= ats * u[s_ * dv + j];
                        }
                        for j in 0..dk {
                            w[t * dk + j] -= ats * w[s_ * dk + j];
                        }
                    }
                }
                // Vn = U − W S.
                let mut vn = u;
                for t in 0..c {
                    for i in 0..dk {
                        let wi = w[t * dk + i];
                        for j in 0..dv {
                            vn[t * dv + j] -= wi * s[i * dv + j];
                        }
                    }
                }
                // O = diag(e^γ) Q S + (QKᵀ ⊙ D) Vn.
                for t in 0..c {
                    let ot = &mut o[(c0 + t) * dv..(c0 + t + 1) * dv];
                    let eg = gamma[t].exp();
                    for (i, &qi) in q(t).iter().enumerate() {
                        for j in 0..dv {
                            ot[j] += eg * qi * s[i * dv + j];
                        }
                    }
                    for s_ in 0..=t {
                        let p = dot(q(t), k(s_)) * (gamma[t] - gamma[s_]).exp();
                        for j in 0..dv {
                            ot[j] += p * vn[s_ * dv + j];
                        }
                    }
                }
                // S ← e^(γ_last) S + Σ_s e^(γ_last − γ_s) k_s Vn_sᵀ.
                let last = gamma[c - 1];
                let el = last.exp();
                s.iter_mut().for_each(|e| *e *= el);
                for s_ in 0..c {
                    let f = (last - gamma[s_]).exp();
                    for (i, &ki) in k(s_).iter().enumerate() {
                        for j in 0..dv {
                            s[i * dv + j] += f * ki * vn[s_ * dv + j];
                        }
                    }
                }
                c0 += c;
            }
            o
        })
        .collect();
    scatter_heads(d, &heads, out);
}

/// Per-head outputs `[t, dv]` into out `[t, nv, dv]`.
fn scatter_heads(d: DeltaDims, heads: &[Vec<f32>], out: &mut [f32]) {
    for (n, o) in heads.iter().enumerate() {
        for t in 0..d.t {
            out[(t * d.nv + n) * d.dv..][..d.dv].copy_from_slice(&o[t * d.dv..(t + 1) * d.dv]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize, seed: u32, scale: f32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2_654_435_761) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x as f32 / u32::MAX as f32 - 0.5) * 2.0 * scale
            })
            .collect()
    }

    /// The chunked form equals the recurrence (to f32 rounding) over 150 steps (3 chunks, the
    /// last partial) from a non-zero state, with two value heads per key head; and both carry
    /// their state across calls (100 steps then 50 give the same as 150).
    #[test]
    fn chunked_and_recurrent_delta_rules_agree() {
        let d = DeltaDims { t: 150, nk: 2, dk: 8, nv: 4, dv: 6 };
        let mut q = noise(d.t * d.nk * d.dk, 1, 1.0);
        let mut k = noise(d.t * d.nk * d.dk, 2, 1.0);
        l2_norm_rows(&mut q, d.dk, 1e-6, (d.dk as f32).powf(-0.5));
        l2_norm_rows(&mut k, d.dk, 1e-6, 1.0);
        let v = noise(d.t * d.nv * d.dv, 3, 1.0);
        let (a, b) = (noise(d.t * d.nv, 4, 2.0), noise(d.t * d.nv, 5, 2.0));
        let (a_log, dt_bias) = (noise(d.nv, 6, 1.0), noise(d.nv, 7, 1.0));
        let (mut g, mut beta) = (vec![0.0; d.t * d.nv], vec![0.0; d.t * d.nv]);
        gates(&a, &b, &a_log, &dt_bias, &mut g, &mut beta);
        assert!(g.iter().all(|&x| x <= 0.0) && beta.iter().all(|&x| x > 0.0 && x < 1.0));
        let x = DeltaInputs { q: &q, k: &k, v: &v, g: &g, beta: &beta };
        let s0 = noise(d.nv * d.dk * d.dv, 8, 0.5);
        let (mut s_rec, mut s_chk) = (s0.clone(), s0.clone());
        let (mut o_rec, mut o_chk) = (vec![0.0; d.t * d.nv * d.dv], vec![0.0; d.t * d.nv * d.dv]);
        delta_rule_recurrent(d, &x, &mut s_rec, &mut o_rec);
        delta_rule_chunked(d, &x, &mut s_chk, &mut o_chk);
        let diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(diff(&o_rec, &o_chk) < 1e-4, "outputs differ by {}", diff(&o_rec, &o_chk));
        assert!(diff(&s_rec, &s_chk) < 1e-4, "states differ by {}", diff(&s_rec, &s_chk));
        assert!(o_rec.iter().map(|x| x.abs()).sum::<f32>() > 1.0, "a degenerate test");
        // Split calls carry the state.
        let split = |t0: usize, t1: usize| DeltaInputs {
            q: &q[t0 * d.nk * d.dk..t1 * d.nk * d.dk],
            k: &k[t0 * d.nk * d.dk..t1 * d.nk * d.dk],
            v: &v[t0 * d.nv * d.dv..t1 * d.nv * d.dv],
            g: &g[t0 * d.nv..t1 * d.nv],
            beta: &beta[t0 * d.nv..t1 * d.nv],
        };
        let mut s = s0;
        let mut o = vec![0.0; d.t * d.nv * d.dv];
        let cut = 100 * d.nv * d.dv;
        delta_rule_chunked(DeltaDims { t: 100, ..d }, &split(0, 100), &mut s, &mut o[..cut]);
        delta_rule_recurrent(DeltaDims { t: 50, ..d }, &split(100, 150), &mut s, &mut o[cut..]);
        assert!(diff(&o, &o_rec) < 1e-4 && diff(&s, &s_rec) < 1e-4, "split calls differ");
    }

    /// The convolution carries its last inputs: one call over 7 rows equals 3 then 4.
    #[test]
    fn the_short_convolution_carries_its_inputs() {
        let (ch, kc) = (5, 4);
        let x = noise(7 * ch, 9, 1.0);
        let w = noise(ch * kc, 10, 1.0);
        let mut s1 = vec![0.0; (kc - 1) * ch];
        let mut o1 = vec![0.0; 7 * ch];
        causal_conv1d(&x, ch, &w, kc, &mut s1, &mut o1);
        let mut s2 = vec![0.0; (kc - 1) * ch];
        let mut o2 = vec![0.0; 7 * ch];
        causal_conv1d(&x[..3 * ch], ch, &w, kc, &mut s2, &mut o2[..3 * ch]);
        causal_conv1d(&x[3 * ch..], ch, &w, kc, &mut s2, &mut o2[3 * ch..]);
        assert_eq!(o1, o2);
        assert_eq!(s1, s2);
        assert_eq!(&s1[..], &x[4 * ch..]);
        // Row 0 sees only the current input (tap kc-1) against a zero state.
        let want: Vec<f32> = (0..ch).map(|c| silu(w[c * kc + kc - 1] * x[c])).collect();
        assert_eq!(&o1[..ch], &want[..]);
    }
}
