//! The CPU KV cache's element types (f32, the oracle's; bf16, half the bytes) and the row
//! copies every op that writes or moves KV bytes shares: appending f32 rows (rounded to bf16 to
//! nearest even), keeping rows when the cache grows, and host blocks of little-endian elements.

use std::ops::Range;

use half::bf16;

use crate::{DType, KvBlockSpan, OpsError};

/// The op's error for a KV cache that is neither f32 nor bf16, or whose K and V differ.
pub(super) fn kv_dtype_err(op: &'static str, dtype: DType) -> OpsError {
    OpsError::DType { op, dtype, detail: "a CPU KV cache is f32 or bf16 (K and V alike); make it with kv_zeros" }
}

/// Writes f32 `src` into a KV row of the cache's dtype (bf16: rounded to nearest even).
pub(super) trait FromF32: Copy {
    fn from_f32(x: f32) -> Self;
    /// Little-endian bytes, `Self`-sized.
    fn put_le(self, out: &mut [u8]);
    fn get_le(b: &[u8]) -> Self;
}

impl FromF32 for f32 {
    fn from_f32(x: f32) -> Self {
        x
    }
    fn put_le(self, out: &mut [u8]) {
        out.copy_from_slice(&self.to_le_bytes());
    }
    fn get_le(b: &[u8]) -> Self {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

impl FromF32 for bf16 {
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn put_le(self, out: &mut [u8]) {
        out.copy_from_slice(&self.to_le_bytes());
    }
    fn get_le(b: &[u8]) -> Self {
        bf16::from_le_bytes([b[0], b[1]])
    }
}

/// `dst[(h·cap + pos0 + t)·d ..]` = row `(t, h)` of `src` `[T, n_kv, d]`.
pub(super) fn write_kv_rows<E: FromF32>(
    src: &[f32],
    dst: &mut [E],
    (t, n_kv, d): (usize, usize, usize),
    cap: usize,
    pos0: usize,
) {
    for ti in 0..t {
        for h in 0..n_kv {
            let s = &src[(ti * n_kv + h) * d..][..d];
            for (o, &x) in dst[(h * cap + pos0 + ti) * d..][..d].iter_mut().zip(s) {
                *o = E::from_f32(x);
            }
        }
    }
}

/// Rows `keep` of a cache `[n_kv, cap, d]` at rows `0..` of a zeroed `[n_kv, new_cap, d]`.
pub(super) fn regrow<E: Copy>(
    src: &[E],
    zero: E,
    (n_kv, cap, d): (usize, usize, usize),
    keep: Range<usize>,
    new_cap: usize,
) -> Vec<E> {
    let len = keep.len();
    let mut dst = super::hugepages::filled(n_kv * new_cap * d, zero);
    for h in 0..n_kv {
        dst[h * new_cap * d..][..len * d].copy_from_slice(&src[(h * cap + keep.start) * d..][..len * d]);
    }
    dst
}

/// Cache rows `span.pos ..` of every head into host block rows (little-endian `E`).
pub(super) fn kv_rows_to_host<E: FromF32>(
    src: &[E],
    bytes: &mut [u8],
    (n_kv, cap, d): (usize, usize, usize),
    span: KvBlockSpan,
) {
    let elem = std::mem::size_of::<E>();
    for h in 0..n_kv {
        let from = &src[(h * cap + span.pos) * d..][..span.n * d];
        let at = span.offset + (h * span.block + span.row) * d * elem;
        for (chunk, v) in bytes[at..at + span.n * d * elem].chunks_exact_mut(elem).zip(from) {
            v.put_le(chunk);
        }
    }
}

/// The reverse of [`kv_rows_to_host`].
pub(super) fn kv_rows_from_host<E: FromF32>(
    bytes: &[u8],
    dst: &mut [E],
    (n_kv, cap, d): (usize, usize, usize),
    span: KvBlockSpan,
) {
    let elem = std::mem::size_of::<E>();
    for h in 0..n_kv {
        let at = span.offset + (h * span.block + span.row) * d * elem;
        let to = &mut dst[(h * cap + span.pos) * d..][..span.n * d];
        for (v, chunk) in to.iter_mut().zip(bytes[at..at + span.n * d * elem].chunks_exact(elem)) {
            *v = E::get_le(chunk);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;

    /// Every op that moves KV bytes keeps a bf16 cache bf16: write_kv rounds, grow_kv keeps the
    /// rows, a host block round-trips at 2 bytes an element, and attention over it is attention
    /// over the same values widened to an f32 cache.
    #[test]
    fn a_bf16_cache_is_written_grown_moved_and_read_as_bf16() {
        let be = CpuBackend::with_precision(Precision::Bf16Activations);
        assert_eq!(be.kv_dtype(), DType::BF16);
        assert_eq!(CpuBackend::new().kv_dtype(), DType::F32);
        let (n_kv, d, t) = (2, 4, 3);
        let mut k = be.kv_zeros(vec![n_kv, 4, d]).expect("k");
        assert_eq!((k.dtype(), k.size_bytes()), (DType::BF16, n_kv * 4 * d * 2));
        let vals: Vec<f32> = (0..t * n_kv * d).map(|i| 1.0 + i as f32 / 1000.0).collect();
        let new = Tensor::from_f32(vec![t, n_kv, d], vals.clone()).expect("new");
        be.write_kv(&mut k, &new, 1).expect("write");
        let host = be.to_host_f32(&k).expect("host");
        // Position 1 + ti of head h holds row (ti, h), rounded to bf16.
        for ti in 0..t {
            for h in 0..n_kv {
                for c in 0..d {
                    let want = bf16::from_f32(vals[(ti * n_kv + h) * d + c]).to_f32();
                    assert_eq!(host[(h * 4 + 1 + ti) * d + c], want);
                }
            }
        }
        assert_ne!(host[(4 + 1) * d + 1], vals[(n_kv + 1) * d + 1 - d], "rounded, not exact");
        let grown = be.grow_kv(&k, 1..4, 8).expect("grow");
        assert_eq!((grown.dtype(), grown.shape()), (DType::BF16, &[n_kv, 8, d][..]));
        let g = be.to_host_f32(&grown).expect("grown");
        assert_eq!(&g[..3 * d], &host[d..4 * d]);
        assert_eq!(&g[8 * d..11 * d], &host[5 * d..8 * d]);

        let span = KvBlockSpan { offset: 0, block: 4, row: 0, pos: 1, n: 3 };
        let mut buf = be.host_alloc(n_kv * 4 * d * 2).expect("buf");
        be.kv_to_host_async(&k, &mut buf, span).expect("to host");
        assert_eq!(&buf.as_slice()[..2], &bf16::from_f32(vals[0]).to_le_bytes());
        let mut back = be.kv_zeros(vec![n_kv, 4, d]).expect("back");
        be.kv_from_host_async(&buf, &mut back, span).expect("from host");
        assert_eq!(be.to_host_f32(&back).expect("back"), host);
        // A span past the buffer's end (4096 B: host_alloc rounds up) is refused.
        let small = be.host_alloc(16).expect("small");
        assert!(be.kv_from_host_async(&small, &mut back, KvBlockSpan { block: 1024, ..span }).is_err());

        let q = Tensor::from_f32(vec![1, 2, d], vec![0.3, -0.2, 0.5, 0.1, -0.4, 0.2, 0.0, 0.7]).expect("q");
        let mut v = be.kv_zeros(vec![n_kv, 4, d]).expect("v");
        be.write_kv(&mut v, &new, 1).expect("write v");
        let f32_cache = Tensor::from_f32(vec![n_kv, 4, d], host.clone()).expect("f32 cache");
        let params = AttnParams { scale: 0.5, window: None, sinks: None, origin: 0 };
        let (mut a, mut b) = (be.zeros(vec![1, 2, d]).expect("a"), be.zeros(vec![1, 2, d]).expect("b"));
        be.attention(&q, &k, &v, 3, &params, &mut a).expect("bf16 attention");
        be.attention(&q, &f32_cache, &f32_cache, 3, &params, &mut b).expect("f32 attention");
        let (a, b) = (be.to_host_f32(&a).expect("a"), be.to_host_f32(&b).expect("b"));
        assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= 1e-6), "{a:?} vs {b:?}");
        let err = be.attention(&q, &k, &f32_cache, 3, &params, &mut be.zeros(vec![1, 2, d]).expect("o"));
        assert!(err.is_err_and(|e| e.to_string().contains("f32 or bf16")));
    }

    #[test]
    fn kv_dtype_follows_the_precision_and_can_be_set() {
        let be = CpuBackend::with_precision(Precision::Bf16Activations);
        assert_eq!(be.with_kv_dtype(DType::F32).map(|b| b.kv_dtype()).ok(), Some(DType::F32));
        assert!(CpuBackend::new().with_kv_dtype(DType::F16).is_err());
        assert!(be.describe().ends_with("bf16 KV"), "{}", be.describe());
    }
}
