//! Heap allocations counted per thread, for tests that pin how many a
//! request or a decision costs. A test binary installs [`Counting`] as its
//! global allocator; tests run side by side, each counting its own thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    /// Allocations made on this thread while counting.
    static COUNTED: Cell<u64> = const { Cell::new(0) };
    /// Whether this thread counts now.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

/// The system allocator, counting allocations of threads that count:
/// `#[global_allocator] static ALLOCATOR: Counting = Counting;`.
pub struct Counting;

// SAFETY: every call is forwarded unchanged to the system allocator; the
// bookkeeping touches only const-initialised thread-locals, which never
// allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

fn count() {
    // `try_with`: allocations while the thread's locals are torn down.
    if COUNTING.try_with(Cell::get).unwrap_or(false) {
        let _ = COUNTED.try_with(|c| c.set(c.get().wrapping_add(1)));
    }
}

/// Runs `f`, returning what it returned and how many allocations (a
/// `realloc` counts as one) it made on this thread outside [`uncounted`].
pub fn allocations<T>(f: impl FnOnce() -> T) -> (T, u64) {
    COUNTED.with(|c| c.set(0));
    COUNTING.with(|c| c.set(true));
    let out = f();
    COUNTING.with(|c| c.set(false));
    (out, COUNTED.with(Cell::get))
}

/// Runs `f` without counting its allocations: a test double's own
/// bookkeeping is no part of what the code under test costs.
pub fn uncounted<T>(f: impl FnOnce() -> T) -> T {
    let was = COUNTING.with(|c| c.replace(false));
    let out = f();
    COUNTING.with(|c| c.set(was));
    out
}
