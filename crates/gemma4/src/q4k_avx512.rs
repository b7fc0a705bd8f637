//! Q4K x Q8K block dot product with AVX-512 (BW): the decode inner loop of `qmm`.
//!
//! candle's x86 kernel for this pair is AVX2: 32 bytes of activations per step and a byte
//! shuffle per sub-block to spread the scales. With 512-bit registers one step covers a
//! whole 64-weight chunk (two sub-blocks): the 32 packed bytes are broadcast to both halves
//! and shifted by 0 / 4 bits per half, which lines the nibbles up with 64 consecutive
//! activation bytes, so the activations load straight from the block. Half the
//! instructions per block leave the core more time for everything else it has to do
//! between weight reads.
//!
//! Block layouts are GGML's, as candle stores them (`#[repr(C)]`, sizes asserted below):
//! Q4K = f16 d, f16 dmin, 12 bytes of packed 6-bit scales/mins, 128 bytes of nibbles
//! (chunk c holds weights 64c..64c+31 in the low and 64c+32..64c+63 in the high nibbles);
//! Q8K = f32 d, 256 i8, 16 i16 sums of 16 consecutive values.

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ8K};

#[repr(C)]
struct RawQ4K {
    d: u16,
    dmin: u16,
    scales: [u8; 12],
    qs: [u8; 128],
}

#[repr(C)]
struct RawQ8K {
    d: f32,
    qs: [i8; 256],
    bsums: [i16; 16],
}

const _: () = assert!(std::mem::size_of::<RawQ4K>() == std::mem::size_of::<BlockQ4K>());
const _: () = assert!(std::mem::size_of::<RawQ8K>() == std::mem::size_of::<BlockQ8K>());

/// Whether this CPU runs [`dot`] (checked once; std caches the answer).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The 8 six-bit scales and 8 six-bit mins of a Q4K block, one byte each (GGML's packing:
/// bytes 0..4 hold scales 0..3 and the top bits of scales 4..7, bytes 4..8 the mins 0..3 and
/// the top bits of mins 4..7, bytes 8..12 the low nibbles of scales/mins 4..7).
#[inline(always)]
pub(crate) fn unpack_scales(s: &[u8; 12]) -> (u64, u64) {
    let w = |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
    let (a, b, c) = (w(0), w(1), w(2));
    let sc_lo = a & 0x3f3f_3f3f;
    let sc_hi = (c & 0x0f0f_0f0f) | (((a >> 6) & 0x0303_0303) << 4);
    let m_lo = b & 0x3f3f_3f3f;
    let m_hi = ((c >> 4) & 0x0f0f_0f0f) | (((b >> 6) & 0x0303_0303) << 4);
    (
        u64::from(sc_lo) | (u64::from(sc_hi) << 32),
        u64::from(m_lo) | (u64::from(m_hi) << 32),
    )
}

/// `out[r] = Σ w·x_r`: one row of Q4K blocks against `out.len()` rows of Q8K activation
/// blocks stored one after another in `ys` (each as long as `xs`).
///
/// Each weight block is unpacked once for all activation rows (groups of up to 4), so a
/// batch of decode rows costs little more than one. Panics if the lengths do not fit or the
/// CPU lacks AVX-512 BW (see [`available`]).
pub fn dot_rows(xs: &[BlockQ4K], ys: &[BlockQ8K], out: &mut [f32]) {
    assert_eq!(
        xs.len() * out.len(),
        ys.len(),
        "q4k dot: row lengths differ"
    );
    assert!(available(), "q4k dot: AVX-512 BW not available");
    let bpr = xs.len();
    // SAFETY: both block types are `repr(C)` with exactly the fields of the raw mirrors
    // (sizes asserted at compile time; the test below checks values against candle), and
    // every bit pattern of those fields is valid.
    #[allow(unsafe_code)]
    let (xs, ys) = unsafe {
        (
            std::slice::from_raw_parts(xs.as_ptr().cast::<RawQ4K>(), xs.len()),
            std::slice::from_raw_parts(ys.as_ptr().cast::<RawQ8K>(), ys.len()),
        )
    };
    for (o, y) in out.chunks_mut(4).zip(ys.chunks(4 * bpr.max(1))) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `available()` was checked above.
        #[allow(unsafe_code)]
        unsafe {
            match o.len() {
                4 => o.copy_from_slice(&dot_avx512::<4>(xs, y)),
                3 => o.copy_from_slice(&dot_avx512::<3>(xs, y)),
                2 => o.copy_from_slice(&dot_avx512::<2>(xs, y)),
                _ => o.copy_from_slice(&dot_avx512::<1>(xs, y)),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (o, y);
            unreachable!("available() is false off x86_64")
        }
    }
}

/// How far ahead of the block being multiplied its weight row is prefetched: 20 blocks
/// (2880 bytes). Without it one core waits on memory for every block and streams ~7 GB/s;
/// with it ~11 GB/s, and two cores reach 85-90% of the copy bandwidth (`bench model
/// --kernels`: 1728 bytes gave 8, 2304 to 3456 gave 10-12 GB/s on one core).
const PREFETCH_BYTES: usize = 20 * std::mem::size_of::<RawQ4K>();

/// `R` activation rows (`ys` = R rows of `xs.len()` blocks) against one weight row.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
fn dot_avx512<const R: usize>(xs: &[RawQ4K], ys: &[RawQ8K]) -> [f32; R] {
    use std::arch::x86_64::*;
    let bpr = xs.len();
    let nib = _mm512_set1_epi8(0x0f);
    // Per 16-bit lane: shift 0 for the low 256 bits (low nibbles), 4 for the high.
    let shifts = _mm512_inserti64x4::<1>(_mm512_setzero_si512(), _mm256_set1_epi16(4));
    // vpermw indices spreading scale 2c over the low and 2c+1 over the high 16 lanes.
    let spread =
        |c: i16| _mm512_inserti64x4::<1>(_mm512_set1_epi16(2 * c), _mm256_set1_epi16(2 * c + 1));
    let idx = [spread(0), spread(1), spread(2), spread(3)];
    let mut acc = [_mm512_setzero_ps(); R];
    let mut acc_min = [_mm_setzero_ps(); R];
    for (b, x) in xs.iter().enumerate() {
        // Past the row's end this reaches into the next row of the same run (rows are
        // contiguous), which is the next one read; a prefetch never faults.
        let p = (x as *const RawQ4K)
            .cast::<i8>()
            .wrapping_add(PREFETCH_BYTES);
        _mm_prefetch::<_MM_HINT_T0>(p);
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64));
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(128));
        // Both f16 factors at once: lanes 0 and 1 after the conversion.
        let dd = _mm_cvtph_ps(_mm_cvtsi32_si128(
            i32::from(x.d) | (i32::from(x.dmin) << 16),
        ));
        let (wd, wmin) = (_mm_cvtss_f32(dd), _mm_cvtss_f32(_mm_movehdup_ps(dd)));
        let (sc, mn) = unpack_scales(&x.scales);
        let sc16 = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)));
        let mn16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mn as i64));
        let mut sumi = [_mm512_setzero_si512(); R];
        for (c, ix) in idx.iter().enumerate() {
            // SAFETY: chunk c reads qs[32c..32c+32] of 128 bytes.
            let packed = unsafe {
                _mm512_broadcast_i64x4(_mm256_loadu_si256(x.qs.as_ptr().add(32 * c).cast()))
            };
            let q4 = _mm512_and_si512(_mm512_srlv_epi16(packed, shifts), nib);
            let scale = _mm512_permutexvar_epi16(*ix, sc16);
            for r in 0..R {
                // SAFETY: y.qs[64c..64c+64] of 256 bytes.
                let act =
                    unsafe { _mm512_loadu_si512(ys[r * bpr + b].qs.as_ptr().add(64 * c).cast()) };
                let p16 = _mm512_maddubs_epi16(q4, act);
                sumi[r] = _mm512_add_epi32(sumi[r], _mm512_madd_epi16(p16, scale));
            }
        }
        for r in 0..R {
            let y = &ys[r * bpr + b];
            // Σ_j min_j · (sum of the 32 activations of sub-block j), from the 16-sums.
            // SAFETY: bsums is 32 bytes, read unaligned.
            let bs = unsafe { _mm256_loadu_si256(y.bsums.as_ptr().cast()) };
            let pair = _mm_hadd_epi16(
                _mm256_castsi256_si128(bs),
                _mm256_extracti128_si256::<1>(bs),
            );
            let mins = _mm_madd_epi16(mn16, pair);
            acc_min[r] = _mm_fmadd_ps(_mm_set1_ps(-y.d * wmin), _mm_cvtepi32_ps(mins), acc_min[r]);
            acc[r] = _mm512_fmadd_ps(
                _mm512_set1_ps(y.d * wd),
                _mm512_cvtepi32_ps(sumi[r]),
                acc[r],
            );
        }
    }
    std::array::from_fn(|r| {
        let m = _mm_add_ps(acc_min[r], _mm_movehl_ps(acc_min[r], acc_min[r]));
        let m = _mm_add_ss(m, _mm_movehdup_ps(m));
        _mm512_reduce_add_ps(acc[r]) + _mm_cvtss_f32(m)
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use candle_core::quantized::k_quants::GgmlType;

    #[test]
    fn matches_candles_dot_product() {
        if !available() {
            eprintln!("skipped: no AVX-512 BW on this CPU");
            return;
        }
        let mut rng = SplitMix64(5);
        for blocks in [1usize, 2, 6, 40] {
            let n = blocks * 256;
            // Wide value ranges so scales and mins use all six bits.
            let w: Vec<f32> = (0..n)
                .map(|i| {
                    let u = (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
                    (u - 0.3) * (1.0 + (i / 32 % 7) as f32)
                })
                .collect();
            let mut qw = vec![BlockQ4K::zeros(); blocks];
            BlockQ4K::from_float(&w, &mut qw);
            // 1..=6 activation rows: the 4-row group, its remainders, and a second group.
            for rows in 1..=6usize {
                let x: Vec<f32> = (0..rows * n)
                    .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0)
                    .collect();
                let mut qx = vec![BlockQ8K::zeros(); rows * blocks];
                BlockQ8K::from_float(&x, &mut qx);
                let mut got = vec![0f32; rows];
                dot_rows(&qw, &qx, &mut got);
                for (r, g) in got.iter().enumerate() {
                    let want = BlockQ4K::vec_dot(n, &qw, &qx[r * blocks..(r + 1) * blocks]);
                    // Both are exact integer sums per block; only the order of the f32 sums
                    // of block terms differs, whose rounding scales with Σ|w·x| (the terms
                    // cancel), not with the result. A wrong scale, min or nibble is O(1).
                    let xr = &x[r * n..(r + 1) * n];
                    let mag: f32 = w.iter().zip(xr).map(|(a, b)| (a * b).abs()).sum();
                    assert!(
                        (g - want).abs() <= 1e-7 * mag,
                        "{blocks} blocks, row {r} of {rows}: {g} vs candle {want}"
                    );
                }
            }
        }
    }
}
