//! `ollm bench ops`: the ops that bound LLM speed, each timed on the GPU and set against a bound
//! measured in the same run on the same device.
//!
//! * Bounds: HBM bandwidth from a large device-to-device copy (bytes read + written), and the
//!   bf16 GEMM rate of cuBLAS on M = N = K = 8192 (2·M·N·K flops).
//! * Rows go through the [`Backend`] trait of a [`CudaBackend`], so whatever kernel the backend
//!   uses is what gets measured: decode matmul (1 × 4096 · 14336×4096ᵀ bf16, rotating over
//!   several weight buffers so that L2 cannot serve it), a prefill matmul (cuBLAS with x
//!   narrowed to bf16), prefill attention at 32K tokens (causal: 4·T²·d·H/2 flops) and decode
//!   attention at 32K context (bytes = K + V read), and a GPT-OSS-shaped MoE prefill chunk through
//!   the grouped expert kernels and through the per-expert loop (`bench_ops/moe.rs`).
//! * Timing: CUDA events around each run; a run is enough back-to-back calls to last about
//!   1 ms, so launch gaps do not count; the median per call over the runs (≥ 20 unless a row
//!   would take longer than [`OpsBenchConfig::max_row_seconds`], then fewer, at least 3, and
//!   the table says how many). Inputs are random, never zeros.
//!
//! Entry points: [`run_ops_bench`] returns an [`OpsBenchReport`]; [`OpsBenchReport::table`]
//! formats it. The device is reached through the public API of `ollm_ops::cuda` only: the
//! backend's traits, [`ComputeTimer`] for event timing and `cublas::gemm_xwt` for the bound.

mod moe;

use half::bf16;
use ollm_ops::cuda::cublas::gemm_xwt;
use ollm_ops::cuda::{ComputeTimer, CudaBackend};
use ollm_ops::{AttnParams, Backend, Compute, CopyQueue, DType, DeltaNetOps, HostTensor, Memory, Result, Tensor};
use rayon::prelude::*;
use std::time::Instant;

/// Sizes and run counts of the bench; [`Default`] is the configuration.
#[derive(Debug, Clone)]
pub struct OpsBenchConfig {
    /// Timed runs per row (the median is reported).
    pub runs: usize,
    /// A row whose runs would take longer than this (seconds, estimated from a warm-up call)
    /// gets fewer runs, at least 3.
    pub max_row_seconds: f64,
    /// Bytes of each of the two buffers of the HBM copy.
    pub copy_bytes: usize,
    /// M = N = K of the cuBLAS GEMM bound.
    pub gemm_size: usize,
    /// Decode matmul: weight `[n, k]`, x `[1, k]`.
    pub matmul_n: usize,
    pub matmul_k: usize,
    /// Weight buffers the decode matmul rotates over (their total should exceed L2 several times).
    pub matmul_buffers: usize,
    /// Rows of x in the prefill matmul row.
    pub prefill_matmul_t: usize,
    /// Attention: query heads, KV heads, head dim, and the prefill length / decode context.
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub attn_tokens: usize,
}

impl Default for OpsBenchConfig {
    fn default() -> Self {
        Self {
            runs: 20,
            max_row_seconds: 60.0,
            copy_bytes: 1 << 30,
            gemm_size: 8192,
            matmul_n: 14336,
            matmul_k: 4096,
            matmul_buffers: 4,
            prefill_matmul_t: 4096,
            n_heads: 32,
            n_kv_heads: 8,
            head_dim: 128,
            attn_tokens: 32768,
        }
    }
}

/// One measured op.
#[derive(Debug, Clone)]
pub struct BenchRow {
    pub op: String,
    pub shape: String,
    /// Timed runs, and back-to-back calls in each.
    pub runs: usize,
    pub calls_per_run: usize,
    /// Median time of one call, ms.
    pub median_ms: f64,
    /// Achieved figure in `unit` (GB/s or TFLOP/s), and the bound in the same unit.
    pub achieved: f64,
    pub bound: f64,
    pub unit: &'static str,
    /// Which bound: "HBM copy" or "cuBLAS GEMM".
    pub bound_name: &'static str,
    /// Why the row has no figures, if it failed (the other rows still run).
    pub error: Option<String>,
}

impl BenchRow {
    /// achieved / bound in percent.
    pub fn percent_of_bound(&self) -> f64 {
        if self.bound > 0.0 { 100.0 * self.achieved / self.bound } else { 0.0 }
    }
}

/// Everything one bench run measured.
#[derive(Debug, Clone)]
pub struct OpsBenchReport {
    pub device: String,
    /// UTC date of the run, `YYYY-MM-DD`.
    pub date: String,
    /// The two bounds, bytes/s and flop/s.
    pub hbm_bytes_per_s: f64,
    pub gemm_flops_per_s: f64,
    pub rows: Vec<BenchRow>,
    /// Peak device memory the driver reported during the run (CUDA context included).
    pub peak_vram_bytes: usize,
}

/// How a row's achieved figure is computed from its time.
enum Work {
    /// Bytes moved per call, compared with the HBM bound.
    Bytes(f64),
    /// Flops per call, compared with the GEMM bound.
    Flops(f64),
}

/// Median time per call (ms) with run counts.
struct Timing {
    runs: usize,
    calls_per_run: usize,
    median_ms: f64,
}

/// Runs `call` (given a running call index, for rotating buffers) under CUDA events: two
/// warm-up calls (the first compiles and loads kernels), then `runs` runs of back-to-back
/// calls lasting about 1 ms each.
fn time_op(be: &CudaBackend, cfg: &OpsBenchConfig, mut call: impl FnMut(usize) -> Result<()>) -> Result<Timing> {
    let timer = ComputeTimer::new(be)?;
    call(0)?;
    timer.synchronize()?;
    timer.start()?;
    call(1)?;
    let one_ms = timer.stop_ms()?.max(1e-4);
    let calls_per_run = ((1.0 / one_ms).ceil() as usize).clamp(1, 1000);
    let run_ms = one_ms * calls_per_run as f64;
    let affordable = (cfg.max_row_seconds * 1e3 / run_ms).floor() as usize;
    let runs = cfg.runs.min(affordable).max(3.min(cfg.runs)).max(1);
    let mut per_call = Vec::with_capacity(runs);
    let mut i = 2;
    for _ in 0..runs {
        timer.start()?;
        for _ in 0..calls_per_run {
            call(i)?;
            i += 1;
        }
        per_call.push(timer.stop_ms()? / calls_per_run as f64);
    }
    Ok(Timing { runs, calls_per_run, median_ms: median(&mut per_call) })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Uniform values in [-scale, scale), different for every (seed, index), generated in parallel.
pub fn random_f32(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    let mut v = vec![0.0f32; n];
    v.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
        // splitmix64 of (seed, chunk) seeds a xorshift64 stream.
        let mut z = seed ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        let mut s = (z ^ (z >> 31)) | 1;
        for x in chunk {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            *x = ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale;
        }
    });
    v
}

/// A random bf16 host tensor.
fn random_bf16(shape: Vec<usize>, seed: u64, scale: f32) -> HostTensor {
    let n = shape.iter().product();
    let bytes = random_f32(n, seed, scale).iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect();
    HostTensor { dtype: DType::BF16, shape, bytes }
}

fn mb(bytes: f64) -> String {
    format!("{:.1} MB", bytes / 1e6)
}

/// Times cuBLAS's bf16 GEMM C = A · Bᵀ with M = N = K = `s`.
fn time_gemm(be: &CudaBackend, cfg: &OpsBenchConfig, s: usize) -> Result<Timing> {
    let dev = be.device();
    let a = dev.upload(&random_bf16_vec(s * s, 2), "bench: GEMM A")?;
    let b = dev.upload(&random_bf16_vec(s * s, 3), "bench: GEMM B")?;
    let mut c = dev.alloc_zeros::<bf16>(s * s, "bench: GEMM C")?;
    time_op(be, cfg, |_| gemm_xwt(dev, &*a, &*b, DType::BF16, &mut *c, DType::BF16, s, s, s))
}

/// cuBLAS's bf16 GEMM rate, FLOP/s (median of `runs`), on square `s`-sized operands: the
/// compute bound other benches divide by (the operands take 6·s² bytes of VRAM).
pub fn gemm_rate(be: &CudaBackend, s: usize, runs: usize) -> Result<f64> {
    let cfg = OpsBenchConfig { runs: runs.max(1), ..OpsBenchConfig::default() };
    let t = time_gemm(be, &cfg, s)?;
    Ok(2.0 * (s as f64).powi(3) / (t.median_ms * 1e-3))
}

/// Runs every row. `progress` gets a line before each measurement (they can take a while).
pub fn run_ops_bench(be: &CudaBackend, cfg: &OpsBenchConfig, progress: &mut dyn FnMut(&str)) -> Result<OpsBenchReport> {
    let mut rows = Vec::new();

    // Bound 1: HBM bandwidth, a device-to-device copy (bytes read + written).
    progress("HBM bandwidth (device-to-device copy)");
    let n = (cfg.copy_bytes / 4).max(1 << 20);
    let copy = {
        let src = be.upload_f32(vec![1, n], &random_f32(n, 1, 1.0))?;
        let mut dst = be.zeros(vec![1, n])?;
        time_op(be, cfg, |_| be.copy_rows(&src, 0..1, &mut dst))?
    };
    let copy_bytes = (2 * n * 4) as f64;
    let hbm = copy_bytes / (copy.median_ms * 1e-3);
    rows.push(row(
        "HBM copy (bound)",
        format!("2 × {} (read + written)", mb((n * 4) as f64)),
        &copy,
        hbm / 1e9,
        hbm / 1e9,
        "GB/s",
        "HBM copy",
    ));

    // Bound 2: cuBLAS bf16 GEMM, C = A · Bᵀ, M = N = K.
    let s = cfg.gemm_size;
    progress(&format!("cuBLAS bf16 GEMM {s}×{s}×{s}"));
    let gemm = time_gemm(be, cfg, s)?;
    let gemm_flops = 2.0 * (s as f64).powi(3) / (gemm.median_ms * 1e-3);
    rows.push(row(
        "cuBLAS bf16 GEMM (bound)",
        format!("{s}×{s}×{s}, bf16 in/out, fp32 accumulate"),
        &gemm,
        gemm_flops / 1e12,
        gemm_flops / 1e12,
        "TFLOP/s",
        "cuBLAS GEMM",
    ));

    let bounds = Bounds { hbm, gemm_flops };
    rows.push(decode_matmul(be, cfg, &bounds, progress));
    rows.push(prefill_matmul(be, cfg, &bounds, progress));
    rows.extend(attention_rows(be, cfg, &bounds, progress));
    rows.extend(prefill_kernel_rows(be, cfg, &bounds, progress));
    rows.extend(delta_rule_rows(be, cfg, &bounds, progress));
    rows.extend(moe::grouped_moe_rows(be, cfg, &bounds, progress));
    rows.extend(offloaded_attention_rows(be, cfg, progress));
    Ok(OpsBenchReport {
        device: be.name(),
        date: utc_date(),
        hbm_bytes_per_s: hbm,
        gemm_flops_per_s: gemm_flops,
        rows,
        peak_vram_bytes: be.memory_stats().peak_bytes.map_or(0, |b| usize::try_from(b).unwrap_or(usize::MAX)),
    })
}

fn random_bf16_vec(n: usize, seed: u64) -> Vec<bf16> {
    random_f32(n, seed, 1.0).iter().map(|x| bf16::from_f32(*x)).collect()
}

struct Bounds {
    hbm: f64,
    gemm_flops: f64,
}

fn row(
    op: &str,
    shape: String,
    t: &Timing,
    achieved: f64,
    bound: f64,
    unit: &'static str,
    bound_name: &'static str,
) -> BenchRow {
    BenchRow {
        op: op.into(),
        shape,
        runs: t.runs,
        calls_per_run: t.calls_per_run,
        median_ms: t.median_ms,
        achieved,
        bound,
        unit,
        bound_name,
        error: None,
    }
}

/// A row from a measurement (or its error), its work per call and the bounds.
fn measured(op: &str, shape: String, timing: std::result::Result<Timing, String>, work: Work, b: &Bounds) -> BenchRow {
    let (unit, bound_name, bound, per_call) = match work {
        Work::Bytes(x) => ("GB/s", "HBM copy", b.hbm / 1e9, x / 1e9),
        Work::Flops(x) => ("TFLOP/s", "cuBLAS GEMM", b.gemm_flops / 1e12, x / 1e12),
    };
    match timing {
        Ok(t) => row(op, shape, &t, per_call / (t.median_ms * 1e-3), bound, unit, bound_name),
        Err(e) => BenchRow {
            op: op.into(),
            shape,
            runs: 0,
            calls_per_run: 0,
            median_ms: 0.0,
            achieved: 0.0,
            bound,
            unit,
            bound_name,
            error: Some(e),
        },
    }
}

/// (a) Decode matmul through `Backend::matmul`: x `[1, k]` f32 against bf16 weights `[n, k]`,
/// rotating over several weight buffers. Bytes = weight + x + out.
fn decode_matmul(be: &CudaBackend, cfg: &OpsBenchConfig, b: &Bounds, progress: &mut dyn FnMut(&str)) -> BenchRow {
    let (n, k, nbuf) = (cfg.matmul_n, cfg.matmul_k, cfg.matmul_buffers.max(1));
    let shape = format!("x [1, {k}] f32 · W [{n}, {k}]ᵀ bf16, {nbuf} weight buffers rotated");
    progress(&format!("decode matmul {shape}"));
    let timing = (|| {
        let ws = (0..nbuf)
            .map(|i| be.upload(&random_bf16(vec![n, k], 10 + i as u64, 0.05)))
            .collect::<Result<Vec<Tensor>>>()?;
        let x = be.upload_f32(vec![1, k], &random_f32(k, 20, 1.0))?;
        let mut out = be.zeros(vec![1, n])?;
        time_op(be, cfg, |i| be.matmul(&x, &ws[i % nbuf], None, &mut out))
    })()
    .map_err(|e| e.to_string());
    let bytes = (n * k * 2 + k * 4 + n * 4) as f64;
    measured("decode matmul (backend)", shape, timing, Work::Bytes(bytes), b)
}

/// Prefill matmul through `Backend::matmul` (the cuBLAS path: x narrowed to bf16, then GEMM).
fn prefill_matmul(be: &CudaBackend, cfg: &OpsBenchConfig, b: &Bounds, progress: &mut dyn FnMut(&str)) -> BenchRow {
    let (t, n, k) = (cfg.prefill_matmul_t, cfg.matmul_n, cfg.matmul_k);
    let shape = format!("x [{t}, {k}] f32 · W [{n}, {k}]ᵀ bf16");
    progress(&format!("prefill matmul {shape}"));
    let timing = (|| {
        let w = be.upload(&random_bf16(vec![n, k], 30, 0.05))?;
        let x = be.upload_f32(vec![t, k], &random_f32(t * k, 31, 1.0))?;
        let mut out = be.zeros(vec![t, n])?;
        time_op(be, cfg, |_| be.matmul(&x, &w, None, &mut out))
    })()
    .map_err(|e| e.to_string());
    measured("prefill matmul (backend)", shape, timing, Work::Flops(2.0 * (t * n * k) as f64), b)
}

/// (b) prefill attention over T tokens from position 0 and (c) decode attention of one token at
/// context T, through `Backend::attention` over bf16 caches from `kv_zeros` + `write_kv`. The
/// decode row rotates over two cache pairs so that L2 cannot hold them.
fn attention_rows(be: &CudaBackend, cfg: &OpsBenchConfig, b: &Bounds, progress: &mut dyn FnMut(&str)) -> Vec<BenchRow> {
    let (t, nh, nkv, d) = (cfg.attn_tokens, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
    let params = AttnParams { scale: (d as f32).powf(-0.5), window: None, sinks: None, origin: 0 };
    let caches = (0..2u64)
        .map(|p| -> Result<(Tensor, Tensor)> {
            let mut k = be.kv_zeros(vec![nkv, t, d])?;
            let mut v = be.kv_zeros(vec![nkv, t, d])?;
            be.write_kv(&mut k, &be.upload_f32(vec![t, nkv, d], &random_f32(t * nkv * d, 40 + 2 * p, 1.0))?, 0)?;
            be.write_kv(&mut v, &be.upload_f32(vec![t, nkv, d], &random_f32(t * nkv * d, 41 + 2 * p, 1.0))?, 0)?;
            Ok((k, v))
        })
        .collect::<Result<Vec<_>>>()
        .map_err(|e| e.to_string());
    let heads = format!("{nh} q heads / {nkv} kv heads, d {d}");
    let prefill_shape = format!("T {t}, {heads}, causal");
    let decode_shape = format!("1 token at context {t}, {heads}, 2 caches rotated");
    let causal_flops = 4.0 * (t as f64).powi(2) * d as f64 * nh as f64 / 2.0;
    let kv_bytes = (2 * nkv * t * d * 2) as f64;
    let caches = match caches {
        Ok(c) => c,
        Err(e) => {
            let failed = |op: &str, shape: String, work| measured(op, shape, Err(e.clone()), work, b);
            return vec![
                failed("prefill attention (backend)", prefill_shape, Work::Flops(causal_flops)),
                failed("decode attention (backend)", decode_shape, Work::Bytes(kv_bytes)),
            ];
        }
    };

    progress(&format!("prefill attention {prefill_shape}"));
    let prefill = (|| {
        let q = be.upload_f32(vec![t, nh, d], &random_f32(t * nh * d, 50, 1.0))?;
        let mut out = be.zeros(vec![t, nh, d])?;
        let (k, v) = &caches[0];
        time_op(be, cfg, |_| be.attention(&q, k, v, 0, &params, &mut out))
    })()
    .map_err(|e| e.to_string());
    let prefill = measured("prefill attention (backend)", prefill_shape, prefill, Work::Flops(causal_flops), b);

    progress(&format!("decode attention {decode_shape}"));
    let decode = (|| {
        let q = be.upload_f32(vec![1, nh, d], &random_f32(nh * d, 51, 1.0))?;
        let mut out = be.zeros(vec![1, nh, d])?;
        time_op(be, cfg, |i| {
            let (k, v) = &caches[i % caches.len()];
            be.attention(&q, k, v, t - 1, &params, &mut out)
        })
    })()
    .map_err(|e| e.to_string());
    let decode = measured("decode attention (backend)", decode_shape, decode, Work::Bytes(kv_bytes), b);
    vec![prefill, decode]
}

/// (b') The prefill attention kernels one by one, launched directly on the 32K shape: the
/// mma.sync kernel (the reference), then each compiled variant of the wgmma kernel for the
/// head dim (compute capability 9.0 only), causal, then a 4096-key sliding window with sinks.
/// Each wgmma row's shape ends with its max |Δ| and relative error against the mma.sync output
/// on the same inputs, so one run shows both speed and agreement of every variant.
fn prefill_kernel_rows(
    be: &CudaBackend,
    cfg: &OpsBenchConfig,
    b: &Bounds,
    progress: &mut dyn FnMut(&str),
) -> Vec<BenchRow> {
    use ollm_ops::cuda::attention::AttnGeometry;
    use ollm_ops::cuda::flash::flash_prefill_mma;
    use ollm_ops::cuda::flash_sm90::{SM90_VARIANTS, Sm90Variant, flash_prefill_sm90};
    let dev = be.device();
    let (t, nh, nkv, d) = (cfg.attn_tokens, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
    let heads = format!("{nh} q heads / {nkv} kv heads, d {d}");
    let scale = (d as f32).powf(-0.5);
    let g = AttnGeometry { n_heads: nh, n_kv: nkv, d, cap: t, pos0: 0 };
    let window = 4096.min(t);
    // Visible (query, key) pairs: causal T(T+1)/2; windowed, each query sees min(p + 1, W) keys.
    let causal_flops = 4.0 * (t as f64).powi(2) * d as f64 * nh as f64 / 2.0;
    let pairs_w = (window * (window + 1) / 2 + (t - window) * window) as f64;
    let window_flops = 4.0 * pairs_w * d as f64 * nh as f64;
    let inputs = (|| -> Result<_> {
        let q = dev.upload(&random_f32(t * nh * d, 60, 1.0), "bench: prefill q")?;
        let k = dev.upload(&random_bf16_vec(nkv * t * d, 61), "bench: prefill k")?;
        let v = dev.upload(&random_bf16_vec(nkv * t * d, 62), "bench: prefill v")?;
        let sinks = dev.upload(&random_f32(nh, 63, 2.0), "bench: prefill sinks")?;
        let out = dev.alloc_zeros::<f32>(t * nh * d, "bench: prefill out")?;
        Ok((q, k, v, sinks, out))
    })();
    let (q, k, v, sinks, mut out) = match inputs {
        Ok(x) => x,
        Err(e) => {
            return vec![measured(
                "prefill attention (mma.sync)",
                format!("T {t}, {heads}"),
                Err(e.to_string()),
                Work::Flops(causal_flops),
                b,
            )];
        }
    };
    let mut rows = Vec::new();
    for (win, flops, what) in
        [(None, causal_flops, "causal".to_string()), (Some(window), window_flops, format!("window {window}, sinks"))]
    {
        let s = win.map(|_| &*sinks);
        let shape = format!("T {t}, {heads}, {what}");
        progress(&format!("prefill attention (mma.sync) {shape}"));
        let mma = time_op(be, cfg, |_| flash_prefill_mma(dev, &q, &k, &v, g, scale, win, s, &mut out).map(|_| ()))
            .map_err(|e| e.to_string());
        let reference = dev.stream.clone_dtoh(&*out).map_err(|e| format!("downloading the mma output: {e}"));
        rows.push(measured("prefill attention (mma.sync)", shape.clone(), mma, Work::Flops(flops), b));
        // Every variant causal; the head dim's default one with the window and sinks.
        for var in
            SM90_VARIANTS.iter().filter(|v| v.d == d && (win.is_none() || Some(**v) == Sm90Variant::default_for(d)))
        {
            let op = format!("prefill attention ({})", var.entry());
            if dev.info.compute_capability != (9, 0) {
                rows.push(measured(
                    &op,
                    shape.clone(),
                    Err("needs compute capability 9.0".into()),
                    Work::Flops(flops),
                    b,
                ));
                continue;
            }
            progress(&format!("{op} {shape}"));
            let run = (|| -> std::result::Result<(Timing, String), String> {
                let reference = reference.as_ref().map_err(Clone::clone)?;
                // One call on a zeroed output, checked against the mma kernel, then the timing.
                dev.stream.memset_zeros(&mut *out).map_err(|e| e.to_string())?;
                flash_prefill_sm90(dev, &q, &k, &v, g, scale, win, s, &mut out, Some(*var))
                    .map_err(|e| e.to_string())?;
                let got = dev.stream.clone_dtoh(&*out).map_err(|e| e.to_string())?;
                let (max_abs, rel) = max_and_rel_diff(&got, reference);
                let timing = time_op(be, cfg, |_| {
                    flash_prefill_sm90(dev, &q, &k, &v, g, scale, win, s, &mut out, Some(*var)).map(|_| ())
                })
                .map_err(|e| e.to_string())?;
                Ok((timing, format!("vs mma.sync max |Δ| {max_abs:.1e}, rel {rel:.1e}")))
            })();
            rows.push(match run {
                Ok((timing, diff)) => measured(&op, format!("{shape}; {diff}"), Ok(timing), Work::Flops(flops), b),
                Err(e) => measured(&op, shape.clone(), Err(e), Work::Flops(flops), b),
            });
        }
    }
    rows
}

/// (max |a − b|, ‖a − b‖ / ‖b‖); NaN in `a` gives NaN.
fn max_and_rel_diff(a: &[f32], b: &[f32]) -> (f64, f64) {
    let (max, num, den) = a
        .par_iter()
        .zip(b)
        .fold(
            || (0.0f64, 0.0f64, 0.0f64),
            |(m, n, d), (x, y)| {
                let diff = f64::from(x - y);
                (
                    if diff.abs() > m || diff.is_nan() { diff.abs() } else { m },
                    n + diff * diff,
                    d + f64::from(*y).powi(2),
                )
            },
        )
        .reduce(|| (0.0, 0.0, 0.0), |p, q| (if q.0 > p.0 || q.0.is_nan() { q.0 } else { p.0 }, p.1 + q.1, p.2 + q.2));
    (max, (num / den.max(f64::MIN_POSITIVE)).sqrt())
}

/// Wall-clock median (ms) of `call` after two warm-up calls, over `runs` calls (at least 3);
/// `call` must return only once its work is done (it waits on the device itself).
fn wall_ms(runs: usize, mut call: impl FnMut() -> Result<()>) -> Result<Timing> {
    call()?;
    call()?;
    let mut ms = Vec::with_capacity(runs.max(3));
    for _ in 0..runs.max(3) {
        let t0 = Instant::now();
        call()?;
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(Timing { runs: ms.len(), calls_per_run: 1, median_ms: median(&mut ms) })
}

/// (e) Where attention over an offloaded KV cache should run (issue 19, FlexGen's question):
/// one token of one layer at context T with the sequence's K and V (bf16) in host RAM, either
/// copied to the device over the copy queue from pinned memory and attended there, or attended
/// on the host by the CPU kernels (all cores) with only q and the output crossing the bus.
/// Bound: the pinned host→device copy of the same bytes, measured here. The engine's offloaded
/// path is the first (its copies overlap other layers' compute, so it costs at least the copy).
fn offloaded_attention_rows(be: &CudaBackend, cfg: &OpsBenchConfig, progress: &mut dyn FnMut(&str)) -> Vec<BenchRow> {
    let (t, nh, nkv, d) = (cfg.attn_tokens, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
    let half = nkv * t * d * 2;
    let kv_bytes = (2 * half) as f64;
    let shape = format!("1 token at context {t}, {nh} q heads / {nkv} kv heads, d {d}, K+V {}", mb(kv_bytes));
    let runs = cfg.runs.min(10);
    let threads = rayon::current_num_threads();
    let names = [
        "host→device copy of the KV (bound)".to_string(),
        "offloaded KV: copied, attended on the device".to_string(),
        format!("offloaded KV: attended on the CPU ({threads} threads)"),
    ];
    let result = (|| -> Result<Vec<Timing>> {
        let params = AttnParams { scale: (d as f32).powf(-0.5), window: None, sinks: None, origin: 0 };
        let (kh, vh) = (random_bf16_vec(nkv * t * d, 60), random_bf16_vec(nkv * t * d, 61));
        let mut pinned = be.host_alloc(2 * half)?;
        for (dst, x) in pinned.as_mut_slice().chunks_exact_mut(2).zip(kh.iter().chain(&vh)) {
            dst.copy_from_slice(&x.to_le_bytes());
        }
        let mut k = be.alloc(vec![nkv, t, d], DType::BF16)?;
        let mut v = be.alloc(vec![nkv, t, d], DType::BF16)?;
        let qv = random_f32(nh * d, 62, 1.0);
        let q = be.upload_f32(vec![1, nh, d], &qv)?;
        let mut out = be.zeros(vec![1, nh, d])?;
        progress(&format!("offloaded attention {shape}"));
        let copy = wall_ms(runs, || {
            be.copy_to_device_async(&pinned, 0, &mut k)?;
            be.copy_to_device_async(&pinned, half, &mut v)?;
            be.host_wait(&be.copy_marker()?)
        })?;
        let device = wall_ms(runs, || {
            be.copy_to_device_async(&pinned, 0, &mut k)?;
            be.copy_to_device_async(&pinned, half, &mut v)?;
            be.compute_wait(&be.copy_marker()?)?;
            be.attention(&q, &k, &v, t - 1, &params, &mut out)?;
            be.host_wait(&be.compute_marker()?)
        })?;
        let geo = ollm_ops::cpu::AttnGeometry { n_heads: nh, n_kv: nkv, d, cap: t, pos0: t - 1 };
        let mut host_out = vec![0.0f32; nh * d];
        let cpu = wall_ms(runs, || {
            let qh = be.to_host_f32(&q)?;
            ollm_ops::cpu::attention(&qh, &kh, &vh, &geo, params.scale, None, None, &mut host_out);
            out = be.upload_f32(vec![1, nh, d], &host_out)?;
            Ok(())
        })?;
        Ok(vec![copy, device, cpu])
    })();
    match result {
        Ok(timings) => {
            let bound = kv_bytes / (timings[0].median_ms * 1e-3) / 1e9;
            names
                .iter()
                .zip(&timings)
                .map(|(n, t)| {
                    row(n, shape.clone(), t, kv_bytes / (t.median_ms * 1e-3) / 1e9, bound, "GB/s", "H2D copy")
                })
                .collect()
        }
        Err(e) => names
            .iter()
            .map(|n| BenchRow {
                op: n.clone(),
                shape: shape.clone(),
                runs: 0,
                calls_per_run: 0,
                median_ms: 0.0,
                achieved: 0.0,
                bound: 0.0,
                unit: "GB/s",
                bound_name: "H2D copy",
                error: Some(e.to_string()),
            })
            .collect(),
    }
}

/// (d) Qwen3-Next-80B's gated delta rule over a prompt of `prefill_matmul_t` steps (16 key and
/// 32 value heads of 128), chunked and step by step, the state carried between calls. Work: the
/// recurrence's 6·T·Nv·dk·dv flops, the same for both forms.
fn delta_rule_rows(
    be: &CudaBackend,
    cfg: &OpsBenchConfig,
    b: &Bounds,
    progress: &mut dyn FnMut(&str),
) -> Vec<BenchRow> {
    use ollm_ops::{DeltaForm, DeltaRule};
    let (t, nk, dk, nv, dv) = (cfg.prefill_matmul_t, 16, 128, 32, 128);
    let flops = 6.0 * (t * nv * dk * dv) as f64;
    [DeltaForm::Chunked, DeltaForm::Recurrent]
        .into_iter()
        .map(|form| {
            let shape = format!("T {t}, {nk} k heads / {nv} v heads of {dk}, {form:?}");
            progress(&format!("delta rule {shape}"));
            let timing = (|| {
                let unit = |n: usize, seed: u64| -> Result<Tensor> {
                    let mut x = random_f32(n * dk, seed, 1.0);
                    for r in x.chunks_mut(dk) {
                        let norm = r.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-6);
                        r.iter_mut().for_each(|v| *v /= norm);
                    }
                    be.upload_f32(vec![t, n / t, dk], &x)
                };
                let (q, k) = (unit(t * nk, 60)?, unit(t * nk, 61)?);
                let v = be.upload_f32(vec![t, nv, dv], &random_f32(t * nv * dv, 62, 1.0))?;
                // Log-decays in (−0.1, 0] and betas in (0, 1).
                let g: Vec<f32> = random_f32(t * nv, 63, 0.05).iter().map(|x| -x.abs() - 0.05).collect();
                let beta: Vec<f32> = random_f32(t * nv, 64, 0.4).iter().map(|x| 0.5 + x).collect();
                let (g, beta) = (be.upload_f32(vec![t, nv], &g)?, be.upload_f32(vec![t, nv], &beta)?);
                let mut state = be.zeros(vec![nv, dk, dv])?;
                let mut out = be.zeros(vec![t, nv, dv])?;
                time_op(be, cfg, |_| {
                    let x = DeltaRule { q: &q, k: &k, v: &v, g: &g, beta: &beta };
                    be.delta_rule(x, &mut state, &mut out, form)
                })
            })()
            .map_err(|e| e.to_string());
            measured(&format!("delta rule, {form:?} (backend)"), shape, timing, Work::Flops(flops), b)
        })
        .collect()
}

impl OpsBenchReport {
    /// The report as a fixed-width table, with the bounds and conventions underneath.
    pub fn table(&self) -> String {
        let mut s = format!("device  {}\ndate    {} (UTC)\n\n", self.device, self.date);
        let head = ["op", "shape", "runs", "median", "achieved", "bound", "of bound"];
        let mut cells: Vec<[String; 7]> = vec![head.map(String::from)];
        for r in &self.rows {
            let bound = format!("{:.1} {} ({})", r.bound, r.unit, r.bound_name);
            cells.push(match &r.error {
                Some(e) => {
                    [r.op.clone(), r.shape.clone(), "-".into(), "-".into(), format!("error: {e}"), bound, "-".into()]
                }
                None => [
                    r.op.clone(),
                    r.shape.clone(),
                    format!("{}×{}", r.runs, r.calls_per_run),
                    format!("{:.3} ms", r.median_ms),
                    format!("{:.1} {}", r.achieved, r.unit),
                    bound,
                    format!("{:.1}%", r.percent_of_bound()),
                ],
            });
        }
        let widths: Vec<usize> =
            (0..7).map(|c| cells.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
        for r in &cells {
            let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
            s.push_str(line.join("  ").trim_end());
            s.push('\n');
        }
        s.push_str(&format!(
            "\nruns: timed runs × back-to-back calls per run (CUDA events); median: per call.\n\
             HBM bound: device-to-device copy, bytes read + written; GEMM bound: cuBLAS bf16, 2·M·N·K flops.\n\
             matmul bytes = weight + x + out; decode attention bytes = K + V read (bf16);\n\
             prefill attention flops = 4·T²·d·H/2 (QKᵀ and PV over the causal half);\n\
             offloaded KV rows: K + V bytes per call against the pinned host→device copy of them.\n\
             peak VRAM {:.2} GiB (driver, CUDA context included)\n",
            self.peak_vram_bytes as f64 / (1u64 << 30) as f64
        ));
        s
    }
}

/// Today's UTC date as `YYYY-MM-DD` (days since 1970 to a civil date).
fn utc_date() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The proleptic Gregorian date of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_513), (2026, 3, 1), "after a non-leap February");
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn medians() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn random_inputs_are_spread_and_never_all_zero() {
        let v = random_f32(200_000, 7, 1.0);
        assert!(v.iter().all(|x| (-1.0..1.0).contains(x)));
        let mean = v.iter().map(|x| *x as f64).sum::<f64>() / v.len() as f64;
        let zeros = v.iter().filter(|x| **x == 0.0).count();
        assert!(mean.abs() < 0.01 && zeros < 10, "mean {mean}, {zeros} zeros");
        assert_ne!(random_f32(10, 1, 1.0), random_f32(10, 2, 1.0), "seeds differ");
        assert_eq!(random_f32(10, 1, 1.0), random_f32(10, 1, 1.0), "seeded: reproducible");
    }

    #[test]
    fn table_shows_every_row_and_the_conventions() {
        let rep = OpsBenchReport {
            device: "cuda:0 (test)".into(),
            date: "2026-11-24".into(),
            hbm_bytes_per_s: 3e12,
            gemm_flops_per_s: 7e14,
            rows: vec![
                BenchRow {
                    op: "decode matmul (backend)".into(),
                    shape: "x [1, 4096]".into(),
                    runs: 20,
                    calls_per_run: 22,
                    median_ms: 0.05,
                    achieved: 2400.0,
                    bound: 3000.0,
                    unit: "GB/s",
                    bound_name: "HBM copy",
                    error: None,
                },
                BenchRow {
                    op: "prefill attention (backend)".into(),
                    shape: "T 32768".into(),
                    runs: 0,
                    calls_per_run: 0,
                    median_ms: 0.0,
                    achieved: 0.0,
                    bound: 700.0,
                    unit: "TFLOP/s",
                    bound_name: "cuBLAS GEMM",
                    error: Some("out of budget".into()),
                },
            ],
            peak_vram_bytes: 3 << 30,
        };
        let t = rep.table();
        assert!(t.contains("20×22") && t.contains("2400.0 GB/s") && t.contains("80.0%"), "{t}");
        assert!(t.contains("error: out of budget") && t.contains("4·T²·d·H/2") && t.contains("3.00 GiB"), "{t}");
    }
}
