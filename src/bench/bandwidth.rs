//! Read bandwidth measured the way a decode step reads its weights: every thread streams its
//! own contiguous share of one buffer far larger than the caches with the widest vector loads
//! the CPU has, into several independent accumulators (so the adds never wait on each other),
//! and nothing is written back. Bytes read per second, best of several passes.
//!
//! This is the bound of a decode step: it has to read every weight byte once per token.
//! A memcpy rate (what `bench model` used before) also writes as much as it reads and
//! understates how fast weights can be streamed (13.9-14.2 GB/s against 30.7-32.4 GB/s of
//! reads on the 2-core EPYC of issue 19), which made decode look faster than its bound.

use std::time::Instant;

/// Default buffer: 1 GiB, some 30x the largest last-level caches here.
pub const DEFAULT_BYTES: usize = 1 << 30;

/// Passes over the buffer; the fastest counts.
const PASSES: usize = 5;

/// Read bandwidth in bytes per second with `threads` threads over a `bytes`-sized buffer.
pub fn measure_read_bandwidth(threads: usize, bytes: usize) -> f64 {
    let threads = threads.max(1);
    let words = (bytes / 8).max(threads * 64);
    // Written (by every thread, its own share) so that the pages are real: a never-touched
    // allocation reads the kernel's one zero page, from cache.
    let mut buf = vec![0u64; words];
    let share = words.div_ceil(threads).div_ceil(8) * 8;
    std::thread::scope(|s| {
        for (t, c) in buf.chunks_mut(share).enumerate() {
            s.spawn(move || {
                for (i, w) in c.iter_mut().enumerate() {
                    *w = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ t as u64;
                }
            });
        }
    });
    let mut best = 0f64;
    for _ in 0..PASSES {
        let t = Instant::now();
        let sums: Vec<u64> = std::thread::scope(|s| {
            let hs: Vec<_> = buf
                .chunks(share)
                .map(|c| s.spawn(move || read_sum(c)))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0)).collect()
        });
        std::hint::black_box(sums);
        best = best.max((words * 8) as f64 / t.elapsed().as_secs_f64());
    }
    best
}

/// Sum of the words (the result only keeps the loads alive).
fn read_sum(c: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            #[allow(unsafe_code)]
            return unsafe { read_sum_avx512(c) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            #[allow(unsafe_code)]
            return unsafe { read_sum_avx2(c) };
        }
    }
    read_sum_scalar(c)
}

/// Eight independent accumulators over plain words (vectorized by the compiler where it
/// can).
fn read_sum_scalar(c: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let mut it = c.chunks_exact(8);
    for w in &mut it {
        for (a, x) in acc.iter_mut().zip(w) {
            *a = a.wrapping_add(*x);
        }
    }
    let tail: u64 = it.remainder().iter().fold(0, |a, x| a.wrapping_add(*x));
    acc.iter().fold(tail, |a, x| a.wrapping_add(*x))
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f")]
fn read_sum_avx512(c: &[u64]) -> u64 {
    use std::arch::x86_64::*;
    // Four 64-byte loads (one 256-byte stride) per iteration into four accumulators.
    let mut it = c.chunks_exact(32);
    let mut a = [_mm512_setzero_si512(); 4];
    for w in &mut it {
        let p = w.as_ptr();
        for (j, acc) in a.iter_mut().enumerate() {
            // SAFETY: `w` holds 32 words, so the 8 words at `p + 8j` (j < 4) are inside it;
            // unaligned loads take any address.
            let v = unsafe { _mm512_loadu_si512(p.add(8 * j) as *const _) };
            *acc = _mm512_add_epi64(*acc, v);
        }
    }
    let s = _mm512_add_epi64(_mm512_add_epi64(a[0], a[1]), _mm512_add_epi64(a[2], a[3]));
    let tail = read_sum_scalar(it.remainder());
    (_mm512_reduce_add_epi64(s) as u64).wrapping_add(tail)
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2")]
fn read_sum_avx2(c: &[u64]) -> u64 {
    use std::arch::x86_64::*;
    let mut it = c.chunks_exact(16);
    let mut a = [_mm256_setzero_si256(); 4];
    for w in &mut it {
        let p = w.as_ptr();
        for (j, acc) in a.iter_mut().enumerate() {
            // SAFETY: `w` holds 16 words, so the 4 words at `p + 4j` (j < 4) are inside it.
            let v = unsafe { _mm256_loadu_si256(p.add(4 * j) as *const __m256i) };
            *acc = _mm256_add_epi64(*acc, v);
        }
    }
    let s = _mm256_add_epi64(_mm256_add_epi64(a[0], a[1]), _mm256_add_epi64(a[2], a[3]));
    let mut lanes = [0u64; 4];
    // SAFETY: `lanes` is 32 bytes, one unaligned 256-bit store.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, s) };
    lanes
        .iter()
        .fold(read_sum_scalar(it.remainder()), |x, y| x.wrapping_add(*y))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_reads_every_word() {
        for n in [0u64, 7, 1003, 1024, 4099] {
            let c: Vec<u64> = (0..n).map(|i| i * 3 + 1).collect();
            let want = c.iter().fold(0u64, |a, x| a.wrapping_add(*x));
            assert_eq!(read_sum_scalar(&c), want, "{n}");
            assert_eq!(read_sum(&c), want, "{n}");
        }
    }

    #[test]
    fn measures_a_plausible_rate() {
        // 64 MiB: enough to be a real measurement, small enough for a unit test.
        let bw = measure_read_bandwidth(2, 64 << 20);
        assert!(bw > 1e8 && bw < 1e13, "{bw}");
    }
}
