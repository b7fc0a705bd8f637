//! Subnormal floats flushed to zero (FTZ + DAZ) on the threads that run the model.
//!
//! Why: at long context most attention probabilities underflow into the subnormal range
//! (a score ~87 below its row's maximum gives e^-87 ~ 1.2e-38), and x86 cores take a slow
//! microcode path for every subnormal operand. The probabilities·V product of a 512-query
//! block against 7,168 keys then ran at 2 GFLOP/s instead of ~70 (probe of that shape, see
//! the issue 5 note), which made attention ~60% of a 12B summary window. A subnormal
//! probability is below 2^-126 of its row's sum of 1 and vanishes from any f32 sum it joins,
//! so flushing changes nothing the decoder can represent; GPUs flush by default.

static BROADCAST: std::sync::Once = std::sync::Once::new();

/// Sets FTZ/DAZ on this thread and, once, on every thread of rayon's global pool (where
/// candle's and gemm's parallel loops run). Only callers outside the pool broadcast or wait
/// for the broadcast: a pool thread waiting on it could hold up the very job it waits for.
pub fn flush_to_zero() {
    flush_this_thread();
    if rayon::current_thread_index().is_none() {
        BROADCAST.call_once(|| {
            rayon::broadcast(|_| flush_this_thread());
        });
    }
}

/// Whether this thread flushes subnormals (FTZ and DAZ both set). For tests.
pub fn this_thread_flushes() -> bool {
    mxcsr().is_some_and(|c| c & FTZ_DAZ == FTZ_DAZ)
}

/// MXCSR bits: flush-to-zero (15) and denormals-are-zero (6).
const FTZ_DAZ: u32 = (1 << 15) | (1 << 6);

#[cfg(target_arch = "x86_64")]
fn mxcsr() -> Option<u32> {
    let mut c: u32 = 0;
    // SAFETY: stmxcsr stores the 4-byte MXCSR register into a valid, aligned local.
    #[allow(unsafe_code)]
    unsafe {
        std::arch::asm!("stmxcsr [{}]", in(reg) &mut c, options(nostack, preserves_flags));
    }
    Some(c)
}

#[cfg(not(target_arch = "x86_64"))]
fn mxcsr() -> Option<u32> {
    None
}

#[cfg(target_arch = "x86_64")]
fn flush_this_thread() {
    if let Some(c) = mxcsr() {
        let c = c | FTZ_DAZ;
        // SAFETY: ldmxcsr loads a valid MXCSR value (the current one with two mode bits
        // set, no reserved bits touched) from an aligned local.
        #[allow(unsafe_code)]
        unsafe {
            std::arch::asm!("ldmxcsr [{}]", in(reg) &c, options(nostack, preserves_flags, readonly));
        }
    }
}

// Other targets: aarch64 flushes per FPCR.FZ; candle's CPU path there is not the one tuned
// here, so it keeps the platform default.
#[cfg(not(target_arch = "x86_64"))]
fn flush_this_thread() {}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn pool_threads_flush_after_the_first_call() {
        flush_to_zero();
        if cfg!(target_arch = "x86_64") {
            assert!(this_thread_flushes());
            let all = rayon::broadcast(|_| this_thread_flushes());
            assert!(all.iter().all(|&f| f), "pool threads: {all:?}");
            // A subnormal operand now reads as zero.
            let tiny = std::hint::black_box(1e-39f32);
            assert_eq!(std::hint::black_box(tiny * 1.0), 0.0);
        }
    }
}
