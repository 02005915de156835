//! The CPU backend's side of streaming: host memory is already where its tensors live, so a
//! "copy to the device" is an immediate decode of little-endian bytes, and markers are no-ops.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::CpuStorage;

/// Elements per parallel task: large enough that rayon's overhead is noise.
const CHUNK_ELEMS: usize = 1 << 16;

/// Overwrites every element of `dst` with the little-endian elements in `bytes`, whose length
/// is `dst.len() × dtype size` (checked by the caller).
pub fn fill_from_le_bytes(dst: &mut CpuStorage, bytes: &[u8]) {
    fn fill<T: Send, const N: usize>(dst: &mut [T], bytes: &[u8], decode: fn([u8; N]) -> T) {
        dst.par_chunks_mut(CHUNK_ELEMS).zip(bytes.par_chunks(CHUNK_ELEMS * N)).for_each(|(d, b)| {
            for (x, c) in d.iter_mut().zip(b.chunks_exact(N)) {
                let mut raw = [0u8; N];
                raw.copy_from_slice(c);
                *x = decode(raw);
            }
        });
    }
    match dst {
        CpuStorage::F32(v) => fill(v, bytes, f32::from_le_bytes),
        CpuStorage::F16(v) => fill(v, bytes, |b| f16::from_bits(u16::from_le_bytes(b))),
        CpuStorage::BF16(v) => fill(v, bytes, |b| bf16::from_bits(u16::from_le_bytes(b))),
        // In parallel too: copies of raw bytes are how the host-to-device rate is measured.
        CpuStorage::U8(v) => v
            .par_chunks_mut(CHUNK_ELEMS * 16)
            .zip(bytes.par_chunks(CHUNK_ELEMS * 16))
            .for_each(|(d, s)| d.copy_from_slice(s)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CopyQueue, Memory, OpsError, Tensor, cpu::CpuBackend};

    /// Little-endian bytes of `v` stored as bf16 and f32.
    fn le_bf16(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect()
    }
    fn le_f32(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 20_011) as f32 / 97.0 - 100.0)
            .collect()
    }

    #[test]
    fn host_alloc_rounds_up_and_is_not_pinned() {
        let be = CpuBackend::new();
        let b = be.host_alloc(10_000).expect("alloc");
        assert_eq!(b.len(), 12_288);
        assert!((b.as_slice().as_ptr() as usize).is_multiple_of(4096));
        assert!(!b.is_pinned());
    }

    #[test]
    fn copies_bf16_and_f32_tensors_at_an_offset() {
        let be = CpuBackend::new();
        // 70 000 elements spans several parallel chunks; the offsets are deliberately odd.
        let n = 70_000;
        let (vb, vf) = (values(n, 1), values(n, 2));
        let (bb, bf) = (le_bf16(&vb), le_f32(&vf));
        let (off_b, off_f) = (4096 + 6, 3);
        let mut src = be.host_alloc(off_b + bb.len() + off_f + bf.len()).expect("alloc");
        src.as_mut_slice()[off_b..off_b + bb.len()].copy_from_slice(&bb);
        let off_f = off_b + bb.len() + off_f;
        src.as_mut_slice()[off_f..off_f + bf.len()].copy_from_slice(&bf);

        let mut tb = Tensor::new(vec![n / 100, 100], crate::Storage::Cpu(CpuStorage::BF16(vec![bf16::NAN; n])))
            .expect("bf16 tensor");
        be.copy_to_device_async(&src, off_b, &mut tb).expect("bf16 copy");
        let want_b: Vec<f32> = vb.iter().map(|x| bf16::from_f32(*x).to_f32()).collect();
        assert_eq!(be.to_host_f32(&tb).expect("read"), want_b);

        let mut tf = Tensor::from_f32(vec![n], vec![f32::NAN; n]).expect("f32 tensor");
        be.copy_to_device_async(&src, off_f, &mut tf).expect("f32 copy");
        assert_eq!(be.to_host_f32(&tf).expect("read"), vf);
    }

    #[test]
    fn copies_outside_the_buffer_are_shape_errors() {
        let be = CpuBackend::new();
        let src = be.host_alloc(4096).expect("alloc");
        let mut t = Tensor::from_f32(vec![1024], vec![1.0; 1024]).expect("tensor");
        be.copy_to_device_async(&src, 0, &mut t).expect("exactly the whole buffer fits");
        for offset in [1, 4096, usize::MAX] {
            let e = be.copy_to_device_async(&src, offset, &mut t).expect_err("out of range");
            assert!(matches!(e, OpsError::Shape { op: "copy_to_device_async", .. }), "{e}");
        }
        assert_eq!(be.to_host_f32(&t).expect("read"), vec![0.0; 1024], "a failed copy writes nothing");
    }

    #[test]
    fn markers_are_no_ops() {
        let be = CpuBackend::new();
        let (c, k) = (be.copy_marker().expect("copy marker"), be.compute_marker().expect("compute marker"));
        for m in [&c, &k] {
            be.compute_wait(m).expect("compute_wait");
            be.copy_wait(m).expect("copy_wait");
            be.host_wait(m).expect("host_wait");
        }
        assert_eq!(c.backend_name(), "cpu");
    }
}
