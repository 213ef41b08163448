//! The process's allocator policy: how freed memory goes back to the
//! operating system. A burst (thousands of subscribers that stop reading
//! while messages pile up) takes memory that glibc's malloc would
//! otherwise keep for good: a freed large buffer raises its dynamic mmap
//! threshold, so later large buffers come from the heap, and freed small
//! chunks between live ones are never returned.
//!
//! [`configure`] fixes the mmap threshold (large buffers, such as a full
//! session queue, are mapped and unmapped on their own), and [`trim`]
//! hands free pages anywhere in the heap back to the system
//! (`malloc_trim`). The `ferrymq` binary calls `configure` at start and
//! `trim` every few seconds; a program that embeds the broker owns its
//! allocator and decides (both are process-wide). Elsewhere than on glibc
//! both do nothing.

/// Buffers at least this large are mapped on their own.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 256 << 10;

/// Sets the allocator up to give memory back (glibc: a fixed mmap
/// threshold). Call once, early.
pub fn configure() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes a malloc tunable; any value is allowed
    // (a refused one returns 0, which changes nothing).
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// Returns free heap memory to the system (glibc: `malloc_trim(0)`, which
/// releases free pages anywhere in every arena). It walks the heap: call
/// it off the async workers, every few seconds at most.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers; it only releases free memory.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}
