//! The C heap of a CPU rank: large freed buffers kept for reuse.
//!
//! A CPU rank allocates the same large activation buffers every micro-batch (a layer's
//! (T, F) MLP rows, a micro-batch's (R, V) logits: megabytes to tens of megabytes). glibc
//! serves a request over its mmap threshold with a fresh mapping, unmaps it on free, and
//! trims the heap's top back to the kernel; every new buffer then faults in pages the
//! kernel must zero first. Scoring 104 documents with SmolLM2-135M (2 threads) took 446-454k
//! page faults and 1.64 s of system time; with both thresholds raised, 250-251k (most of the
//! rest are the weights' file map) and 1.15-1.23 s (`perf stat -e task-clock,page-faults`).

/// glibc's largest mmap threshold (4 MiB · sizeof(long)): buffers up to this size come from
/// the heap and are reused; larger ones are mapped as before.
const MMAP_THRESHOLD: i32 = 32 << 20;

/// Keeps freed buffers in the process instead of returning them to the kernel. Returns
/// whether the allocator took the settings (false off glibc, where nothing is changed).
pub fn keep_freed_buffers() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets allocator parameters; it is safe to call at any time.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
