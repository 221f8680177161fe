//! Keeps freed memory in the process for the next training step (glibc on Linux).
//!
//! A training step allocates and frees the same large buffers every time (activations and
//! gradients of 2 MB to 160 MB for the real-size model: its logits are 135 MB). glibc's defaults
//! serve anything over 128 KB to 32 MB (the threshold grows as blocks are freed) with a fresh
//! `mmap`, give it back at `free`, and trim the heap when 128 KB are free at its top. Every step
//! then pays for the kernel zeroing the same pages again (page faults in `clear_page_erms`);
//! `docs/PERFORMANCE.md` has the measurement on the real-size step (`examples/bench_step.rs`,
//! `BENCH_GLIBC_DEFAULTS=1` to compare).
//!
//! [`keep_freed_memory`] raises the `mmap` threshold to 1 GiB (or to 32 MB, HEAP_MAX_SIZE / 2,
//! where glibc refuses more) and stops trimming, so those buffers are reused from the
//! heap. The process's peak memory is unchanged; it only keeps what it freed until it exits.
//! Other platforms and C libraries are left alone.

/// Tunes the allocator for repeated training steps; call once at start-up. Returns whether it
/// applied (glibc on Linux).
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const MMAP_THRESHOLD: libc::c_int = 1 << 30;
        // The most that glibc versions capping the threshold at HEAP_MAX_SIZE / 2 accept.
        const MMAP_THRESHOLD_OLD_MAX: libc::c_int = 32 << 20;
        // SAFETY: mallopt only changes allocator parameters; it takes no pointers and glibc
        // synchronises it with concurrent allocations. It returns 1 on success, 0 on error.
        unsafe {
            let a = libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                || libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_OLD_MAX) == 1;
            let b = libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) == 1;
            a && b
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
