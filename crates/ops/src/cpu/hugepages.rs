//! Transparent huge pages for the CPU backend's large tensors (weights, KV caches).
//!
//! A decode step streams every weight once. With 4 KiB pages that is a TLB miss every 4 KiB (a
//! two-dimensional page walk under a hypervisor, such as the CI machine's), and the hardware
//! prefetchers stop at every 4 KiB boundary. `MADV_HUGEPAGE` on a buffer before its first write
//! makes Linux back it with 2 MiB pages as it faults in, where transparent huge pages are
//! `madvise` (the usual default) or `always`. Elsewhere (another OS, THP `never`) the advice is a
//! no-op; the buffer is ordinary memory either way. Only whole 2 MiB pages inside a tensor are
//! advised, so small tensors keep 4 KiB pages. Measured on the 2-core CI VM (2026-12-05, interleaved
//! with the advice off): decode of a Llama-3.2-1B-shaped model 12.1 → 13.1 tok/s; SmolLM2-135M,
//! whose only tensor over 2 MiB is its 56 MiB head, 68 → 70 tok/s.
//!
//! Advice only reaches whole 2 MiB pages, and the C allocator returns large blocks 16 bytes past a
//! page boundary, so a 2 MiB tensor (a Llama-3.2-1B k or v projection) got none and an 8 MiB one
//! three of its four. [`HugePageAlloc`], a process's global allocator (the `ollm` binary and the
//! Python module set it), places the blocks that [`with_capacity`] asks for on a 2 MiB boundary,
//! so every whole 2 MiB of a tensor is backed huge. Measured on the 2-core CI VM (2026-12-05,
//! `ollm-residency/examples/cpu_decode_bandwidth.rs`, 16 Llama-3.2-1B-shaped layers, 2 threads, runs where the VM
//! read 64–65 GB/s): one decode token's matmuls 46.6–46.8 → 54.9–55.4 GB/s. Where the process
//! keeps the system allocator (tests), tensors are placed as before.

/// The huge page size advised for (x86-64 and most arm64 kernels).
const HUGE_PAGE_BYTES: usize = 2 << 20;

/// An empty Vec with room for `n` elements, its whole 2 MiB pages advised huge before any write
/// (and its start on a 2 MiB boundary where the process runs [`HugePageAlloc`]).
pub fn with_capacity<T>(n: usize) -> Vec<T> {
    ALIGN_NEXT.with(|a| a.set(true));
    let v = Vec::with_capacity(n);
    ALIGN_NEXT.with(|a| a.set(false));
    advise(v.as_ptr() as usize, n * std::mem::size_of::<T>());
    v
}

thread_local! {
    /// Set by [`with_capacity`] around its one allocation: [`HugePageAlloc`] aligns it.
    static ALIGN_NEXT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A global allocator over the C library's (`malloc`, `calloc`, `realloc`, `posix_memalign`,
/// `free`) that puts the blocks [`with_capacity`] asks for, when 2 MiB or larger, on a 2 MiB
/// boundary, so transparent huge pages back all of such a tensor. Every block it returns comes
/// from those functions, so `free` releases any of them. Set it in a binary with
/// `#[global_allocator] static A: HugePageAlloc = HugePageAlloc;` (unix only).
#[cfg(unix)]
#[derive(Debug, Clone, Copy, Default)]
pub struct HugePageAlloc;

/// The alignment `malloc` guarantees on the 64-bit targets this builds for.
#[cfg(unix)]
const MALLOC_ALIGN: usize = 16;

#[cfg(unix)]
impl HugePageAlloc {
    /// Whether `l` is a tensor block to place on a huge page boundary. A thread-local read is
    /// made only for blocks of at least 2 MiB (its first use allocates nothing).
    fn huge(l: std::alloc::Layout) -> bool {
        l.size() >= HUGE_PAGE_BYTES && ALIGN_NEXT.try_with(|a| a.get()).unwrap_or(false)
    }

    fn memalign(align: usize, size: usize) -> *mut u8 {
        let mut p: *mut libc::c_void = std::ptr::null_mut();
        // SAFETY: align is a power of two and a multiple of the pointer size (Layout's align is a
        // power of two; it is raised to at least 16); p is a valid out-pointer.
        match unsafe { libc::posix_memalign(&mut p, align.max(MALLOC_ALIGN), size) } {
            0 => p.cast(),
            _ => std::ptr::null_mut(),
        }
    }
}

// SAFETY: every pointer returned is from malloc/calloc/realloc/posix_memalign with at least the
// layout's size and alignment, or null on failure; dealloc and realloc hand back only such
// pointers to free/realloc, which accept any of them.
#[cfg(unix)]
unsafe impl std::alloc::GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        if Self::huge(l) {
            Self::memalign(HUGE_PAGE_BYTES.max(l.align()), l.size())
        } else if l.align() <= MALLOC_ALIGN && l.align() <= l.size() {
            // SAFETY: a plain C allocation of a non-zero size (Layout sizes reaching here are
            // at least the alignment, which is at least 1).
            unsafe { libc::malloc(l.size()).cast() }
        } else {
            Self::memalign(l.align(), l.size())
        }
    }

    unsafe fn alloc_zeroed(&self, l: std::alloc::Layout) -> *mut u8 {
        if !Self::huge(l) && l.align() <= MALLOC_ALIGN && l.align() <= l.size() {
            // SAFETY: as malloc; calloc returns zeroed memory (fresh pages are not touched).
            return unsafe { libc::calloc(1, l.size()).cast() };
        }
        // SAFETY: the caller's layout contract passes through.
        let p = unsafe { self.alloc(l) };
        if !p.is_null() {
            // SAFETY: p holds l.size() writable bytes.
            unsafe { std::ptr::write_bytes(p, 0, l.size()) };
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, _l: std::alloc::Layout) {
        // SAFETY: p came from this allocator, so from one of the C functions free accepts.
        unsafe { libc::free(p.cast()) }
    }

    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, new_size: usize) -> *mut u8 {
        if l.align() <= MALLOC_ALIGN && l.align() <= new_size {
            // SAFETY: p came from this allocator; realloc keeps malloc's alignment, which covers l's.
            return unsafe { libc::realloc(p.cast(), new_size).cast() };
        }
        // SAFETY: the layout of new_size with l's alignment is valid (the caller's contract).
        let new = unsafe { self.alloc(std::alloc::Layout::from_size_align_unchecked(new_size, l.align())) };
        if !new.is_null() {
            // SAFETY: both blocks hold at least min(old, new) bytes and do not overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(p, new, l.size().min(new_size));
                libc::free(p.cast());
            }
        }
        new
    }
}

/// `n` copies of `value` in memory advised huge before it is written.
pub fn filled<T: Clone>(n: usize, value: T) -> Vec<T> {
    let mut v = with_capacity(n);
    v.resize(n, value);
    v
}

/// Advises the whole 2 MiB pages inside `[ptr, ptr + bytes)`.
fn advise(ptr: usize, bytes: usize) {
    let (start, end) = (ptr.next_multiple_of(HUGE_PAGE_BYTES), (ptr + bytes) / HUGE_PAGE_BYTES * HUGE_PAGE_BYTES);
    #[cfg(target_os = "linux")]
    if end > start {
        // SAFETY: [start, end) lies inside one live allocation (the Vec's capacity); the advice
        // changes how its pages are backed, never their contents. A failure (an old kernel, THP
        // off) leaves ordinary pages, so its result is not needed.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (start, end);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::{GlobalAlloc, Layout};

    /// The allocator honours every layout, aligns only what `with_capacity` asks for (2 MiB and
    /// over), zeroes what it is asked to, and keeps contents across growth and shrinking.
    #[cfg(unix)]
    #[test]
    fn huge_page_alloc_aligns_tensors_and_keeps_every_layout() {
        let a = HugePageAlloc;
        for (size, align) in [(1usize, 1usize), (24, 8), (100, 64), (4096, 4096), (3 << 20, 16), (1 << 21, 32)] {
            let l = Layout::from_size_align(size, align).expect("layout");
            for zeroed in [false, true] {
                // SAFETY: a non-zero size; the block is written within size, then freed once.
                unsafe {
                    let p = if zeroed { a.alloc_zeroed(l) } else { a.alloc(l) };
                    assert!(!p.is_null() && (p as usize).is_multiple_of(align), "{size}/{align}");
                    if zeroed {
                        assert!(std::slice::from_raw_parts(p, size).iter().all(|&b| b == 0));
                    }
                    std::ptr::write_bytes(p, 0xab, size);
                    let q = a.realloc(p, l, size * 3);
                    assert!(!q.is_null() && (q as usize).is_multiple_of(align));
                    assert!(std::slice::from_raw_parts(q, size).iter().all(|&b| b == 0xab));
                    let r = a.realloc(q, Layout::from_size_align(size * 3, align).expect("l"), size.div_ceil(2));
                    assert!(std::slice::from_raw_parts(r, size.div_ceil(2)).iter().all(|&b| b == 0xab));
                    a.dealloc(r, Layout::from_size_align(size.div_ceil(2), align).expect("l"));
                }
            }
        }
        // A tensor of 2 MiB and more lands on a huge page boundary when with_capacity asks.
        let l = Layout::from_size_align(HUGE_PAGE_BYTES, 2).expect("layout");
        ALIGN_NEXT.with(|f| f.set(true));
        // SAFETY: as above.
        let p = unsafe { a.alloc(l) };
        ALIGN_NEXT.with(|f| f.set(false));
        assert!(!p.is_null() && (p as usize).is_multiple_of(HUGE_PAGE_BYTES), "{p:?}");
        // SAFETY: p came from a.alloc(l).
        unsafe { a.dealloc(p, l) };
    }

    /// The advice changes no value, at any size (below, at and across whole huge pages).
    #[test]
    fn advised_buffers_hold_what_was_written() {
        for n in [0usize, 1, 1000, HUGE_PAGE_BYTES / 4 + 3, 3 * HUGE_PAGE_BYTES / 4] {
            let v = filled(n, 7u32);
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|&x| x == 7));
            let mut w: Vec<u16> = with_capacity(n);
            w.extend((0..n).map(|i| i as u16));
            assert!(w.iter().enumerate().all(|(i, &x)| x == i as u16));
        }
    }
}
