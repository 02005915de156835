//! The CPU attention's prefill never holds a `T × T` score matrix: a counting allocator
//! measures the most heap the call takes beyond its inputs and output, for a prompt of 8192
//! tokens (a `T × T` f32 matrix would be 256 MiB per head), with the KV in f32 and in bf16.
//! Its own test binary: the counters are process-wide.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use half::bf16;
use ollm_ops::cpu::{AttnGeometry, KvElem, attention};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

fn track(delta: isize) {
    let now = LIVE.fetch_add(delta, Ordering::SeqCst) + delta;
    PEAK.fetch_max(now, Ordering::SeqCst);
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged and only
// updates atomic counters (no allocation).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is; the caller upholds alloc's contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            track(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for alloc.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            track(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as for alloc; ptr came from this allocator with this layout.
        unsafe { System.dealloc(ptr, layout) };
        track(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for dealloc.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            track(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Heap bytes the call takes at its peak beyond what was live before it.
fn peak_extra<E: KvElem>(q: &[f32], k: &[E], v: &[E], g: &AttnGeometry, out: &mut [f32]) -> isize {
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    attention(q, k, v, g, 0.25, None, None, out);
    PEAK.load(Ordering::SeqCst) - base
}

/// 8192 query tokens, 2 heads over 1 KV head of width 16: the call's scratch is the partial
/// outputs and running (max, sum) per row, O(T · heads · d), plus a tile of scores per task,
/// never O(T²). Bound: 4 × T · heads · d f32 (4 MiB here; the partials are 1 MiB), against the
/// 256 MiB of one head's T × T matrix.
#[test]
fn prefill_scratch_is_linear_in_the_prompt() {
    let (t, n_heads, n_kv, d) = (8192usize, 2usize, 1usize, 16usize);
    let g = AttnGeometry { n_heads, n_kv, d, cap: t, pos0: 0 };
    let q: Vec<f32> = (0..t * n_heads * d).map(|i| ((i % 13) as f32 - 6.0) / 13.0).collect();
    let k: Vec<f32> = (0..n_kv * t * d).map(|i| ((i % 11) as f32 - 5.0) / 11.0).collect();
    let v: Vec<f32> = (0..n_kv * t * d).map(|i| ((i % 7) as f32 - 3.0) / 7.0).collect();
    let (kb, vb): (Vec<bf16>, Vec<bf16>) =
        (k.iter().map(|&x| bf16::from_f32(x)).collect(), v.iter().map(|&x| bf16::from_f32(x)).collect());
    let mut out = vec![0.0f32; t * n_heads * d];
    let bound = (4 * t * n_heads * d * 4) as isize;
    let square = (t * t * 4) as isize;
    let f32_extra = peak_extra(&q, &k, &v, &g, &mut out);
    assert!(out.iter().all(|x| x.is_finite()));
    let bf16_extra = peak_extra(&q, &kb, &vb, &g, &mut out);
    eprintln!(
        "attention scratch at T={t}: f32 KV {f32_extra} B, bf16 KV {bf16_extra} B (bound {bound} B, T×T {square} B)"
    );
    for (name, extra) in [("f32", f32_extra), ("bf16", bf16_extra)] {
        assert!(extra > 0, "{name}: the counter saw no allocation");
        assert!(extra <= bound, "{name} KV: {extra} B of scratch at T={t}, over the O(T·heads·d) bound {bound} B");
    }
}
