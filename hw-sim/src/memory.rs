//! Memory for the emulated NIC's tables: large allocations on 2 MiB pages.
//!
//! A NIC reaches its flow table in on-board memory without address translation. On a
//! host, a 70 MiB connection table on 4 KiB pages spans ~18,000 pages, far beyond what
//! the TLB holds, so nearly every lookup adds a page walk to its cache miss. DPDK keeps
//! its tables in huge pages for this reason; this allocator asks the kernel for
//! transparent huge pages (`madvise(MADV_HUGEPAGE)`) on every allocation of 2 MiB or
//! more, which works where THP is in `madvise` mode (the usual default) without any
//! hugetlbfs set-up. Where the kernel declines, the memory is ordinary pages.

use std::alloc::{GlobalAlloc, Layout, System};

/// Size and alignment of a huge page on x86-64 and arm64 (4 KiB base pages).
const HUGE_PAGE: usize = 2 << 20;

/// The global allocator of the `flowshard` binary: the system allocator, with large
/// blocks aligned to and advised onto huge pages.
#[derive(Debug)]
pub struct HugePageAlloc;

impl HugePageAlloc {
    /// The layout a request is served with: large requests are aligned to a huge page
    /// so that the whole block can be backed by them.
    fn served(layout: Layout) -> Layout {
        if layout.size() >= HUGE_PAGE {
            layout.align_to(HUGE_PAGE).unwrap_or(layout)
        } else {
            layout
        }
    }

    /// Ask for huge pages before the block is first touched.
    fn advise(ptr: *mut u8, layout: Layout) {
        #[cfg(target_os = "linux")]
        if !ptr.is_null() && layout.size() >= HUGE_PAGE {
            // SAFETY: `ptr..ptr + size` is a block the system allocator just returned,
            // aligned to a huge page (so to a base page, as madvise requires); the
            // advice changes only how it is backed, never its contents. A refusal
            // (THP disabled) leaves ordinary pages, so the result is ignored.
            unsafe {
                libc::madvise(ptr.cast(), layout.size(), libc::MADV_HUGEPAGE);
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (ptr, layout);
    }
}

// SAFETY: every method forwards to `System` with the layout `served` maps a request to,
// the same mapping on allocation and deallocation, so each block is freed with the
// layout it was allocated with.
unsafe impl GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let served = Self::served(layout);
        // SAFETY: the caller's layout has a non-zero size; `served` only raises its
        // alignment.
        let ptr = unsafe { System.alloc(served) };
        Self::advise(ptr, served);
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let served = Self::served(layout);
        if served.size() < HUGE_PAGE {
            // SAFETY: as for `alloc`.
            return unsafe { System.alloc_zeroed(served) };
        }
        // Advise first, then zero: zeroing is the first touch, so it faults the block
        // in as huge pages instead of 4 KiB ones.
        // SAFETY: as for `alloc`.
        let ptr = unsafe { System.alloc(served) };
        Self::advise(ptr, served);
        if !ptr.is_null() {
            // SAFETY: `ptr` is a fresh block of `served.size()` writable bytes.
            unsafe { ptr.write_bytes(0, served.size()) };
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `alloc`/`alloc_zeroed` with `served(layout)`.
        unsafe { System.dealloc(ptr, Self::served(layout)) }
    }

    /// Small blocks grow in place through the system allocator, as without this
    /// allocator; only a block that is or becomes huge-page sized moves to a fresh one.
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.size() < HUGE_PAGE && new_size < HUGE_PAGE {
            // SAFETY: below a huge page `served` is the identity, so `ptr` is a System
            // block of `layout`; the caller guarantees `new_size` is valid for it.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // SAFETY: the caller guarantees `new_size` rounded to `layout.align()` fits isize.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: as for `alloc`; the new block does not overlap the old one, both hold
        // at least the bytes copied, and the old block is freed with its own layout.
        unsafe {
            let new = self.alloc(new_layout);
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_keep_their_bytes_when_they_grow_across_the_huge_page_size() {
        let a = HugePageAlloc;
        let layout = Layout::from_size_align(4096, 8).unwrap();
        // SAFETY: each block is used within its size and freed with its final layout.
        unsafe {
            let mut p = a.alloc(layout);
            p.write_bytes(0x5a, 4096);
            let mut size = 4096;
            for new_size in [8192, HUGE_PAGE + 64, 3 * HUGE_PAGE, 100] {
                p = a.realloc(p, Layout::from_size_align(size, 8).unwrap(), new_size);
                assert!(!p.is_null());
                let kept = std::slice::from_raw_parts(p, size.min(new_size).min(4096));
                assert!(kept.iter().all(|b| *b == 0x5a));
                size = new_size;
            }
            a.dealloc(p, Layout::from_size_align(size, 8).unwrap());
        }
    }

    #[test]
    fn large_blocks_are_huge_page_aligned_zeroed_and_freed() {
        let a = HugePageAlloc;
        for size in [64, HUGE_PAGE - 1, HUGE_PAGE, 3 * HUGE_PAGE + 5] {
            let layout = Layout::from_size_align(size, 8).unwrap();
            // SAFETY: non-zero size; freed below with the same layout.
            unsafe {
                let p = a.alloc_zeroed(layout);
                assert!(!p.is_null());
                if size >= HUGE_PAGE {
                    assert_eq!(p as usize % HUGE_PAGE, 0);
                }
                let bytes = std::slice::from_raw_parts_mut(p, size);
                assert!(bytes.iter().all(|b| *b == 0));
                bytes[size - 1] = 7;
                a.dealloc(p, layout);
            }
        }
    }
}
