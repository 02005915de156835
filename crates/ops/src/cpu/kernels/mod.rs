//! The CPU's matmul kernels, chosen once at run time by what the processor offers.
//!
//! Four tiers, each a small table of panel functions ([`Kernels`]):
//! * `portable`: plain Rust, the f32 twin every other tier is tested against (and what non-x86
//!   machines run; the compiler vectorises its loops for the baseline target);
//! * `avx2`: AVX2 + FMA, 8 lanes, bf16 weights widened by a 16-bit shift;
//! * `avx512`: AVX-512F/BW, 16 lanes, masked tails instead of scalar ones;
//! * `avx512bf16`: as `avx512`, plus `vdpbf16ps` (32 bf16 products per instruction, f32 sums) for
//!   bf16 weights when the caller allows bf16-rounded activations.
//!
//! [`Kernels::active`] takes the best tier the CPU has, or a lower one named by the environment
//! variable `OLLM_CPU_KERNELS` (portable, avx2, avx512, avx512bf16), so tests and users can run
//! every path on one machine. A tier above what the CPU supports is never chosen.

#[cfg(target_arch = "x86_64")]
mod x86;

use std::sync::OnceLock;

use half::bf16;

use crate::OpsError;

/// The environment variable that forces a lower kernel tier.
pub const KERNELS_ENV: &str = "OLLM_CPU_KERNELS";

/// A family of kernels, ordered from the most portable to the fastest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    Portable,
    Avx2,
    Avx512,
    Avx512Bf16,
}

impl Tier {
    pub const ALL: [Tier; 4] = [Tier::Portable, Tier::Avx2, Tier::Avx512, Tier::Avx512Bf16];

    /// The name `OLLM_CPU_KERNELS` accepts.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Portable => "portable",
            Tier::Avx2 => "avx2",
            Tier::Avx512 => "avx512",
            Tier::Avx512Bf16 => "avx512bf16",
        }
    }

    /// Parses a tier name (case-insensitive).
    pub fn parse(s: &str) -> Result<Tier, OpsError> {
        let s = s.trim().to_ascii_lowercase();
        Tier::ALL.into_iter().find(|t| t.name() == s).ok_or_else(|| {
            OpsError::Backend(format!(
                "{KERNELS_ENV}={s}: unknown kernel tier; use one of portable, avx2, avx512, avx512bf16"
            ))
        })
    }

    /// The best tier this CPU runs.
    pub fn detected() -> Tier {
        #[cfg(target_arch = "x86_64")]
        {
            let avx512 = is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw");
            if avx512 && is_x86_feature_detected!("avx512bf16") {
                return Tier::Avx512Bf16;
            }
            if avx512 {
                return Tier::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Tier::Avx2;
            }
        }
        Tier::Portable
    }

    /// Every tier this CPU runs, lowest first.
    pub fn supported() -> Vec<Tier> {
        let best = Tier::detected();
        Tier::ALL.into_iter().filter(|t| *t <= best).collect()
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The tier `OLLM_CPU_KERNELS` asks for (None when unset or empty), capped at what the CPU has.
pub fn tier_from_env() -> Result<Option<Tier>, OpsError> {
    match std::env::var(KERNELS_ENV) {
        Ok(v) if !v.trim().is_empty() => Ok(Some(Tier::parse(&v)?.min(Tier::detected()))),
        _ => Ok(None),
    }
}

/// `out[ti·ldo + j] = Σᵢ x[ti·k + i] · w[j·k + i]` for `ti < t`, `j < rows`.
///
/// # Safety
/// `x` holds `t·k` and `w` `rows·k` elements; `out` is valid for writes at every `ti·ldo + j`;
/// the function pointer came from a [`Kernels`] built for a tier this CPU supports.
pub type Panel<X, W> = unsafe fn(x: &[X], t: usize, k: usize, w: &[W], rows: usize, out: *mut f32, ldo: usize);

/// One tier's panel functions. Built once; shared by every matmul.
#[derive(Clone, Copy)]
pub struct Kernels {
    tier: Tier,
    /// f32 activations against f32 weights.
    pub(crate) f32_f32: Panel<f32, f32>,
    /// f32 activations against bf16 weights widened on the fly (decode: each weight byte is read once).
    pub(crate) f32_bf16: Panel<f32, bf16>,
    /// bf16 activations against bf16 weights, f32 sums (only where the CPU has bf16 dot products).
    pub(crate) bf16_bf16: Option<Panel<bf16, bf16>>,
    /// `v[i] = exp(v[i] - m)` for every i, returning the sum (softmax rows).
    pub(crate) exp_sub: fn(v: &mut [f32], m: f32) -> f32,
    /// `o[r] += Σⱼ p[r·kb + j] · v[j·d ..][..d]` for every row r of o `[rows, d]` (attention's
    /// probabilities times values, for few rows: no transposition of v).
    pub(crate) pv_rows: PvRows<f32>,
    /// `pv_rows` over bf16 values (a bf16 KV cache), each widened in registers.
    pub(crate) pv_rows_bf16: PvRows<bf16>,
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernels").field("tier", &self.tier).finish()
    }
}

impl Kernels {
    /// The kernels of `tier`, or None when this CPU cannot run it.
    pub fn for_tier(tier: Tier) -> Option<Kernels> {
        if tier > Tier::detected() {
            return None;
        }
        let portable = Kernels { tier, ..Kernels::portable() };
        #[cfg(target_arch = "x86_64")]
        {
            Some(match tier {
                Tier::Portable => portable,
                Tier::Avx2 => Kernels {
                    tier,
                    f32_f32: x86::avx2_f32,
                    f32_bf16: x86::avx2_bf16,
                    bf16_bf16: None,
                    exp_sub: x86::exp_sub_avx2,
                    pv_rows: x86::pv_rows_avx2,
                    pv_rows_bf16: x86::pv_rows_bf16_avx2,
                },
                Tier::Avx512 => Kernels {
                    tier,
                    f32_f32: x86::avx512_f32,
                    f32_bf16: x86::avx512_bf16,
                    bf16_bf16: None,
                    exp_sub: x86::exp_sub_avx512,
                    pv_rows: x86::pv_rows_avx512,
                    pv_rows_bf16: x86::pv_rows_bf16_avx512,
                },
                Tier::Avx512Bf16 => Kernels {
                    tier,
                    f32_f32: x86::avx512_f32,
                    f32_bf16: x86::avx512_bf16,
                    bf16_bf16: Some(x86::avx512bf16_bf16),
                    exp_sub: x86::exp_sub_avx512,
                    pv_rows: x86::pv_rows_avx512,
                    pv_rows_bf16: x86::pv_rows_bf16_avx512,
                },
            })
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Some(portable)
        }
    }

    /// The process-wide kernels: `OLLM_CPU_KERNELS` if set (an unknown name falls back to the
    /// best tier; the CLI rejects it first with [`tier_from_env`]), else the best tier.
    pub fn active() -> &'static Kernels {
        static ACTIVE: OnceLock<Kernels> = OnceLock::new();
        ACTIVE.get_or_init(|| {
            let tier = tier_from_env().ok().flatten().unwrap_or_else(Tier::detected);
            Kernels::for_tier(tier).unwrap_or_else(Kernels::portable)
        })
    }

    /// The portable kernels (every CPU runs them).
    pub fn portable() -> Kernels {
        Kernels {
            tier: Tier::Portable,
            f32_f32: panel_portable::<f32>,
            f32_bf16: panel_portable::<bf16>,
            bf16_bf16: None,
            exp_sub: exp_sub_portable,
            pv_rows: pv_rows_body::<f32>,
            pv_rows_bf16: pv_rows_body::<bf16>,
        }
    }

    pub fn tier(&self) -> Tier {
        self.tier
    }

    /// Whether bf16 weights can take bf16-rounded activations through bf16 dot products.
    pub fn has_bf16_dot(&self) -> bool {
        self.bf16_bf16.is_some()
    }
}

/// `o[r] += Σⱼ p[r·kb + j] · v[j·d ..][..d]` over values of type `V` (see [`Kernels`]).
pub type PvRows<V> = fn(p: &[f32], kb: usize, v: &[V], d: usize, o: &mut [f32]);

/// A weight (or KV) element the kernels widen to f32: f32 itself, or bf16 by a 16-bit shift.
pub trait Widen: Copy + Send + Sync {
    fn widen(self) -> f32;
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Widen for bf16 {
    /// bf16 → f32 is a 16-bit shift, so loops over it vectorise.
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
}

const LANES: usize = 16;

/// The f32 twin: 16 independent partial sums per dot product, then their sum.
#[inline]
pub(crate) fn dot_portable<W: Widen>(x: &[f32], w: &[W]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let body = x.len() / LANES * LANES;
    for (xc, wc) in x[..body].chunks_exact(LANES).zip(w[..body].chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] += wc[i].widen() * xc[i];
        }
    }
    let tail: f32 = x[body..].iter().zip(&w[body..]).map(|(a, b)| a * b.widen()).sum();
    acc.iter().sum::<f32>() + tail
}

/// `e^x` for x ≤ 0 to about 2 ulp, written so that loops over it vectorise: `e^x = 2^n · e^r`
/// with `n = round(x·log₂e)`, `|r| ≤ ln2/2`, and a degree-7 polynomial for `e^r` (the Cephes
/// `expf` coefficients). Below -87 (where `e^x` leaves the normal floats) it returns ~1.6e-38,
/// which is what a softmax weight of that size is worth.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 0.0);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // n ∈ [-126, 0], so 2^n is a normal float built from its exponent bits.
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// The body of every `exp_sub`: `v[i] = e^(v[i] - m)`, returning Σ v[i] (m ≥ every v[i]).
#[inline(always)]
pub(crate) fn exp_sub_body(v: &mut [f32], m: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = v.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (e, a) in c.iter_mut().zip(acc.iter_mut()) {
            *e = exp_nonpositive(*e - m);
            *a += *e;
        }
    }
    let mut tail = 0.0;
    for e in chunks.into_remainder() {
        *e = exp_nonpositive(*e - m);
        tail += *e;
    }
    acc.iter().sum::<f32>() + tail
}

/// The body of every `pv_rows` (see [`Kernels`]) over f32 or bf16 values (widened by a shift,
/// which vectorises); a zero weight (a masked key) is skipped.
#[inline(always)]
pub(crate) fn pv_rows_body<V: Widen>(p: &[f32], kb: usize, v: &[V], d: usize, o: &mut [f32]) {
    for (prow, orow) in p.chunks_exact(kb).zip(o.chunks_exact_mut(d)) {
        for (&pj, vrow) in prow.iter().zip(v.chunks_exact(d)) {
            if pj != 0.0 {
                for (ov, vv) in orow.iter_mut().zip(vrow) {
                    *ov += pj * vv.widen();
                }
            }
        }
    }
}

fn exp_sub_portable(v: &mut [f32], m: f32) -> f32 {
    exp_sub_body(v, m)
}

/// # Safety
/// As [`Panel`].
unsafe fn panel_portable<W: Widen>(x: &[f32], t: usize, k: usize, w: &[W], rows: usize, out: *mut f32, ldo: usize) {
    for j in 0..rows {
        let wr = &w[j * k..][..k];
        for ti in 0..t {
            // SAFETY: the caller guarantees out is valid at ti·ldo + j.
            unsafe { *out.add(ti * ldo + j) = dot_portable(&x[ti * k..][..k], wr) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tier_names_round_trip_and_unknown_names_are_refused() {
        for t in Tier::ALL {
            assert_eq!(Tier::parse(t.name()).ok(), Some(t));
        }
        assert_eq!(Tier::parse(" AVX2 ").ok(), Some(Tier::Avx2));
        let e = Tier::parse("sse9").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("OLLM_CPU_KERNELS=sse9") && e.contains("avx512bf16"), "{e}");
    }

    /// The vectorisable exp against std's, over the whole range a softmax feeds it, on every tier.
    #[test]
    fn exp_matches_std_to_a_few_ulp() {
        let xs: Vec<f32> = (0..=200_000).map(|i| -87.0 * i as f32 / 200_000.0).collect();
        for tier in Tier::supported() {
            let Some(kern) = Kernels::for_tier(tier) else { continue };
            let mut v = xs.clone();
            let sum = (kern.exp_sub)(&mut v, 0.0);
            let mut want_sum = 0.0f64;
            for (x, got) in xs.iter().zip(&v) {
                let want = x.exp();
                want_sum += f64::from(want);
                assert!((got - want).abs() <= 4.0 * f32::EPSILON * want, "{tier}: exp({x}) = {got}, std {want}");
            }
            assert!((f64::from(sum) - want_sum).abs() <= 1e-5 * want_sum, "{tier}: sum {sum} vs {want_sum}");
        }
        let mut one = [3.0f32];
        assert_eq!((Kernels::portable().exp_sub)(&mut one, 3.0), 1.0);
    }

    /// Every tier's `P·V` gives the portable body's sums bit for bit (a row's result must not
    /// depend on the kernel's blocking): widths with and without 16-column tails, 1 to 9 rows,
    /// zero weights (masked keys) among the others, f32 and bf16 values.
    #[test]
    fn pv_rows_equal_the_portable_body_bit_for_bit() {
        let val = |i: usize| ((i * 7919 % 1000) as f32 - 500.0) / 97.0;
        for tier in Tier::supported() {
            let Some(kern) = Kernels::for_tier(tier) else { continue };
            for d in [16usize, 40, 64, 80, 128, 256] {
                for rows in 1..=9 {
                    let kb = 37;
                    let p: Vec<f32> =
                        (0..rows * kb).map(|i| if i % 5 == 3 { 0.0 } else { val(i + 11) / 8.0 }).collect();
                    let v: Vec<f32> = (0..kb * d).map(val).collect();
                    let vb: Vec<bf16> = v.iter().map(|x| bf16::from_f32(*x)).collect();
                    let o0: Vec<f32> = (0..rows * d).map(|i| val(i + 3)).collect();
                    let (mut want, mut got) = (o0.clone(), o0.clone());
                    pv_rows_body(&p, kb, &v, d, &mut want);
                    (kern.pv_rows)(&p, kb, &v, d, &mut got);
                    assert!(
                        want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{tier} f32 d={d} rows={rows}"
                    );
                    let (mut want, mut got) = (o0.clone(), o0);
                    pv_rows_body(&p, kb, &vb, d, &mut want);
                    (kern.pv_rows_bf16)(&p, kb, &vb, d, &mut got);
                    assert!(
                        want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{tier} bf16 d={d} rows={rows}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_tier_above_the_cpu_is_never_built() {
        let best = Tier::detected();
        for t in Tier::ALL {
            assert_eq!(Kernels::for_tier(t).is_some(), t <= best, "{t}");
        }
        assert_eq!(Kernels::for_tier(best).map(|k| k.tier()), Some(best));
        assert!(Tier::supported().contains(&Tier::Portable));
    }
}
