//! The policy's memory allocator on wasm32: a bump allocator over a static
//! arena (cargo feature `bump-alloc`, on by default).
//!
//! Why a bump allocator: every evaluation runs in a fresh instance that
//! lives for one call and is then thrown away with all its memory, so
//! freeing a block inside it buys nothing. Handing out the next bytes of an
//! arena is a few instructions where a general allocator (dlmalloc, std's
//! default on wasm32) keeps free lists.
//!
//! Why a static arena: dlmalloc takes its heap from `memory.grow` on the
//! first allocation, so every evaluation grew the instance's memory, and the
//! host had to make those pages accessible and, when the instance ended,
//! inaccessible again (`mprotect`, a TLB flush on every core): about a
//! quarter of an evaluation's time (BENCHMARKS.md). The arena is a
//! zero-initialized static, part of the module's initial memory (it adds no
//! bytes to the module file), so a policy that stays within it never grows
//! memory. It counts against the sandbox's memory cap like any memory.
//!
//! What it does:
//! - An allocation takes the next suitably aligned bytes of the current
//!   region (first the arena).
//! - A deallocation gives bytes back only when the block is the last one
//!   handed out (a `String` built and dropped at once); otherwise never.
//! - A reallocation of the last block grows or shrinks it in place when the
//!   region has room; otherwise it moves, like any allocator's.
//! - When the region is full, it asks for more linear memory with
//!   `memory.grow`, never reusing bytes that are handed out. If the sandbox
//!   refuses the growth (its memory cap), the allocation returns null, the
//!   policy aborts, and the host reports `memory limit`: the cap holds as
//!   with any allocator. What was left of the arena when it moved on to
//!   grown memory stays unused.
//!
//! A policy that needs memory to be reused within one evaluation (building
//! and dropping many large values) can turn the feature off and get std's
//! allocator back: `spendguard-sdk = { ..., default-features = false }`.

// Without the allocator (native builds, or the feature off) only the tests use
// the arithmetic.
#![cfg_attr(not(all(target_arch = "wasm32", feature = "bump-alloc")), allow(dead_code))]

/// Bytes of the static arena. The example policies stay well within it (with
/// the sandbox's memory cap at the module's own initial memory, arena
/// included, they evaluate without growing memory; see the end-to-end
/// tests); a policy that needs more gets it from `memory.grow`.
pub const ARENA_BYTES: usize = 1024 * 1024;

/// A WebAssembly page, the unit of `memory.grow`.
const WASM_PAGE_BYTES: usize = 64 * 1024;

/// The bump pointer's arithmetic over addresses, apart from any memory so
/// that it runs (and is tested) natively. Blocks are handed out from
/// `next` up to `end`, the end of the current region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bump {
    next: usize,
    end: usize,
}

impl Bump {
    /// No region yet: every allocation needs one first.
    pub(crate) const EMPTY: Bump = Bump { next: 0, end: 0 };

    /// The address of a new block of `size` bytes aligned to `align` (a power
    /// of two), or `None` when the region has no room for it.
    pub(crate) fn alloc(&mut self, size: usize, align: usize) -> Option<usize> {
        debug_assert!(align.is_power_of_two());
        let start = self.next.checked_add(align - 1)? & !(align - 1);
        let end = start.checked_add(size)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        Some(start)
    }

    /// Whether the block at `ptr` of `size` bytes is the last one handed out:
    /// only that one ends where the next would start (blocks are never
    /// empty, and padding goes before a block, not after it).
    fn is_last(&self, ptr: usize, size: usize) -> bool {
        ptr.checked_add(size) == Some(self.next)
    }

    /// Give a block back: only the last block's bytes can be reused.
    pub(crate) fn dealloc(&mut self, ptr: usize, size: usize) {
        if self.is_last(ptr, size) {
            self.next = ptr;
        }
    }

    /// Resize a block without moving it, if possible: shrinking always is;
    /// growing is when the block is the last one and the region has room.
    /// `false` means the caller must move it.
    pub(crate) fn resize(&mut self, ptr: usize, old_size: usize, new_size: usize) -> bool {
        if !self.is_last(ptr, old_size) {
            return new_size <= old_size;
        }
        match ptr.checked_add(new_size) {
            Some(end) if end <= self.end => {
                self.next = end;
                true
            }
            _ => false,
        }
    }

    /// How many bytes the region lacks for the last block, at `ptr` of
    /// `old_size` bytes, to grow to `new_size` in place; `None` when the block
    /// is not the last one (it can only move) or needs nothing more.
    pub(crate) fn shortfall(&self, ptr: usize, old_size: usize, new_size: usize) -> Option<usize> {
        if !self.is_last(ptr, old_size) {
            return None;
        }
        let end = ptr.checked_add(new_size)?;
        end.checked_sub(self.end).filter(|&lacking| lacking > 0)
    }

    /// Fresh memory `[start, end)` to hand out: it extends the region when
    /// it starts where the region ends (memory grown right after it), and
    /// replaces the region otherwise (what was left of it stays unused).
    pub(crate) fn add_region(&mut self, start: usize, end: usize) {
        if start != self.end {
            self.next = start;
        }
        self.end = end;
    }

    /// The end of the current region.
    pub(crate) fn end(&self) -> usize {
        self.end
    }
}

/// Pages to ask `memory.grow` for so that `bytes` more fit, whatever the
/// alignment needs: `bytes` is the block's size plus its alignment less one.
pub(crate) fn pages_for(size: usize, align: usize) -> Option<usize> {
    Some(size.checked_add(align - 1)?.div_ceil(WASM_PAGE_BYTES))
}

#[cfg(all(target_arch = "wasm32", feature = "bump-alloc", not(target_feature = "atomics")))]
mod wasm {
    #![allow(unsafe_code)]

    use core::alloc::{GlobalAlloc, Layout};
    use core::arch::wasm32;
    use core::cell::UnsafeCell;
    use core::ptr;

    use super::{ARENA_BYTES, Bump, WASM_PAGE_BYTES, pages_for};

    /// The arena, and where the bump pointer is. All zero at start, so the
    /// whole static is in the module's zero-initialized memory (`.bss`),
    /// not in its data.
    #[repr(C, align(16))]
    struct BumpAllocator {
        arena: UnsafeCell<[u8; ARENA_BYTES]>,
        state: UnsafeCell<State>,
    }

    struct State {
        bump: Bump,
        /// Whether the arena has been made the region yet (the first
        /// allocation does it: a static's address is not a constant).
        arena_taken: bool,
    }

    // SAFETY: wasm32 without the `atomics` target feature (this module's
    // cfg) has a single thread: nothing else can touch the state while an
    // allocator call runs, and no allocator call is reentrant.
    unsafe impl Sync for BumpAllocator {}

    #[global_allocator]
    static ALLOCATOR: BumpAllocator = BumpAllocator {
        arena: UnsafeCell::new([0; ARENA_BYTES]),
        state: UnsafeCell::new(State { bump: Bump::EMPTY, arena_taken: false }),
    };

    impl BumpAllocator {
        /// # Safety
        /// No other reference to the state may be live: each allocator call
        /// takes it once, at its start, and drops it before calling another.
        #[allow(clippy::mut_from_ref)]
        unsafe fn state(&self) -> &mut State {
            // SAFETY: single thread (see `Sync`) and the caller's promise.
            unsafe { &mut *self.state.get() }
        }
    }

    /// Grow linear memory so that `pages` more pages follow its current end,
    /// and add them to the bump's region. `false` when the sandbox refuses.
    fn grow(bump: &mut Bump, pages: usize) -> bool {
        let previous = wasm32::memory_grow(0, pages);
        if previous == usize::MAX {
            return false;
        }
        let region = previous
            .checked_mul(WASM_PAGE_BYTES)
            .and_then(|start| Some((start, start.checked_add(pages.checked_mul(WASM_PAGE_BYTES)?)?)));
        match region {
            Some((start, end)) => {
                bump.add_region(start, end);
                true
            }
            None => false,
        }
    }

    // SAFETY: blocks are handed out from memory nothing else uses (the arena,
    // then pages `memory.grow` has just added), never overlap (the bump
    // pointer only moves back over the last block when it is given back),
    // are aligned as asked, and null is returned when there is no memory.
    unsafe impl GlobalAlloc for BumpAllocator {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let (size, align) = (layout.size(), layout.align());
            // SAFETY: the only reference to the state in this call.
            let state = unsafe { self.state() };
            if let Some(at) = state.bump.alloc(size, align) {
                return at as *mut u8;
            }
            if !state.arena_taken {
                state.arena_taken = true;
                let start = self.arena.get() as usize;
                state.bump.add_region(start, start + ARENA_BYTES);
                if let Some(at) = state.bump.alloc(size, align) {
                    return at as *mut u8;
                }
            }
            match pages_for(size, align) {
                Some(pages) if grow(&mut state.bump, pages) => {
                    state.bump.alloc(size, align).map_or(ptr::null_mut(), |at| at as *mut u8)
                }
                _ => ptr::null_mut(),
            }
        }

        unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
            // SAFETY: the only reference to the state in this call.
            let state = unsafe { self.state() };
            state.bump.dealloc(block as usize, layout.size());
        }

        unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let (old_size, align) = (layout.size(), layout.align());
            {
                // SAFETY: the only reference to the state until this scope ends.
                let state = unsafe { self.state() };
                if state.bump.resize(block as usize, old_size, new_size) {
                    return block;
                }
                // The last block at the very end of memory: grow memory
                // under it rather than copy it (a `Vec` pushed past the
                // arena).
                let at_memory_end =
                    wasm32::memory_size(0).checked_mul(WASM_PAGE_BYTES) == Some(state.bump.end());
                if let Some(lacking) = state.bump.shortfall(block as usize, old_size, new_size)
                    && at_memory_end
                {
                    let Some(pages) = pages_for(lacking, 1) else {
                        return ptr::null_mut();
                    };
                    if !grow(&mut state.bump, pages) {
                        return ptr::null_mut();
                    }
                    if state.bump.resize(block as usize, old_size, new_size) {
                        return block;
                    }
                }
            }
            // SAFETY: `GlobalAlloc::realloc`'s contract: `new_size` is not
            // zero and, rounded up to `align`, does not overflow `isize`.
            let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, align) };
            // SAFETY: a non-zero size, as above.
            let moved = unsafe { self.alloc(new_layout) };
            if !moved.is_null() {
                // SAFETY: both blocks are live and distinct (the new one was
                // just handed out), each at least this long.
                unsafe {
                    ptr::copy_nonoverlapping(block, moved, old_size.min(new_size));
                    self.dealloc(block, layout);
                }
            }
            moved
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARENA: (usize, usize) = (0x1_0000, 0x1_0000 + 4096);

    fn arena() -> Bump {
        let mut bump = Bump::EMPTY;
        bump.add_region(ARENA.0, ARENA.1);
        bump
    }

    #[test]
    fn an_empty_bump_has_no_room() {
        let mut bump = Bump::EMPTY;
        assert_eq!(bump.alloc(1, 1), None);
    }

    #[test]
    fn blocks_are_aligned_and_never_overlap() {
        let mut bump = arena();
        let mut blocks: Vec<(usize, usize)> = Vec::new();
        for (size, align) in [(1, 1), (8, 8), (3, 2), (16, 16), (1, 4), (100, 64), (7, 1), (32, 32)] {
            let at = bump.alloc(size, align).unwrap();
            assert_eq!(at % align, 0, "block of {size} aligned to {align} at {at:#x}");
            assert!(at >= ARENA.0 && at + size <= ARENA.1, "block outside the region");
            for &(other, other_size) in &blocks {
                assert!(at >= other + other_size || at + size <= other, "blocks overlap");
            }
            blocks.push((at, size));
        }
    }

    #[test]
    fn a_block_that_does_not_fit_is_refused_and_changes_nothing() {
        let mut bump = arena();
        bump.alloc(4000, 1).unwrap();
        let before = bump;
        assert_eq!(bump.alloc(97, 1), None);
        assert_eq!(bump.alloc(8, 128), None, "the padding to 128 does not fit either");
        assert_eq!(bump, before);
        assert_eq!(bump.alloc(96, 1), Some(ARENA.0 + 4000), "exactly the rest fits");
        assert_eq!(bump.alloc(1, 1), None);
    }

    #[test]
    fn sizes_near_the_top_of_the_address_space_do_not_wrap() {
        let mut bump = arena();
        assert_eq!(bump.alloc(usize::MAX, 1), None);
        assert_eq!(bump.alloc(usize::MAX - ARENA.0, 8), None);
        assert_eq!(bump.alloc(1, 1usize << (usize::BITS - 1)), None);
        assert!(!bump.resize(ARENA.0, 0, usize::MAX));
        assert_eq!(pages_for(usize::MAX, 2), None);
    }

    #[test]
    fn only_the_last_block_is_given_back() {
        let mut bump = arena();
        let a = bump.alloc(10, 1).unwrap();
        let b = bump.alloc(20, 8).unwrap();
        bump.dealloc(a, 10);
        assert_eq!(bump.alloc(1, 1), Some(b + 20), "a block that is not the last one stays taken");
        let c = b + 20;
        bump.dealloc(c, 1);
        bump.dealloc(b, 20);
        assert_eq!(bump.alloc(20, 8), Some(b), "the last blocks' bytes are reused, in order");
    }

    #[test]
    fn the_last_block_grows_and_shrinks_in_place() {
        let mut bump = arena();
        let a = bump.alloc(16, 8).unwrap();
        assert!(bump.resize(a, 16, 1000));
        assert_eq!(bump.alloc(1, 1), Some(a + 1000), "grown in place: the next block follows it");
        let b = a + 1000;
        assert!(bump.resize(b, 1, 100));
        assert!(bump.resize(b, 100, 10));
        assert_eq!(bump.alloc(1, 1), Some(b + 10), "shrunk in place: its tail is free again");
    }

    #[test]
    fn a_block_that_is_not_last_shrinks_but_must_move_to_grow() {
        let mut bump = arena();
        let a = bump.alloc(64, 8).unwrap();
        bump.alloc(8, 8).unwrap();
        let before = bump;
        assert!(bump.resize(a, 64, 32));
        assert!(!bump.resize(a, 64, 65));
        assert_eq!(bump, before, "neither changes where the next block goes");
        assert_eq!(bump.shortfall(a, 64, 10_000), None, "it can only move");
    }

    #[test]
    fn the_last_block_past_the_region_reports_what_it_lacks() {
        let mut bump = arena();
        let a = bump.alloc(4000, 1).unwrap();
        assert!(!bump.resize(a, 4000, 5000));
        assert_eq!(bump.shortfall(a, 4000, 5000), Some(5000 - 4096));
        assert_eq!(bump.shortfall(a, 4000, 4096), None, "it fits");
        // Memory grown right after the region extends it: then it grows in place.
        bump.add_region(ARENA.1, ARENA.1 + 65536);
        assert!(bump.resize(a, 4000, 5000));
        assert_eq!(bump.alloc(1, 1), Some(a + 5000));
    }

    #[test]
    fn a_region_elsewhere_replaces_the_current_one() {
        let mut bump = arena();
        let a = bump.alloc(4000, 1).unwrap();
        let far = 0x10_0000;
        bump.add_region(far, far + 65536);
        assert_eq!(bump.alloc(200, 8), Some(far), "new blocks come from the new region");
        assert!(!bump.resize(a, 4000, 4001), "the old region's last block must move");
        bump.dealloc(a, 4000);
        assert_eq!(bump.alloc(1, 1), Some(far + 200), "nor are its bytes given back");
    }

    #[test]
    fn grown_pages_cover_the_block_and_its_padding() {
        assert_eq!(pages_for(1, 1), Some(1));
        assert_eq!(pages_for(65536, 1), Some(1));
        assert_eq!(pages_for(65536, 2), Some(2), "one byte of padding may be needed");
        assert_eq!(pages_for(1 << 20, 16), Some(17));
        // Fresh pages start page-aligned, so whatever the alignment needs, the
        // block fits in what is asked for.
        for (size, align) in [(1, 65536), (65536, 65536 * 2), (3 << 20, 4096)] {
            let pages = pages_for(size, align).unwrap();
            let mut bump = Bump::EMPTY;
            let start = 7 * 65536;
            bump.add_region(start, start + pages * 65536);
            assert!(bump.alloc(size, align).is_some(), "{size} bytes aligned to {align} in {pages} pages");
        }
    }
}
