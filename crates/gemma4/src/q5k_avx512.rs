//! Q5K x Q8K block dot product with AVX-512 (BW, and VNNI where the CPU has it): `qmm`'s
//! kernel for Q5_K tensors (Q5_K_M files, and the few a Q4_K_M file holds), at every row
//! count.
//!
//! The Q4K kernel ([`super::q4k_avx512`]) plus the fifth bit: the 32 packed bytes of a
//! 64-weight chunk are broadcast to both 256-bit halves and shifted by 0 / 4 bits per half,
//! and the 32 bytes of high bits, broadcast the same way, are tested against bit `2c` (low
//! half) / `2c + 1` (high half) of chunk `c`; where set, 16 is added. Each weight block is
//! unpacked once for a group of activation rows.
//!
//! Block layouts are GGML's, as candle stores them (`#[repr(C)]`, sizes asserted below):
//! Q5K = f16 d, f16 dmin, 12 bytes of packed 6-bit scales/mins (as Q4K), 32 bytes `qh`, 128
//! bytes of nibbles; weight `64c + 32i + l` is `(qs[32c + l] >> 4i & 15) | ((qh[l] >> (2c +
//! i)) & 1) << 4`. Q8K = f32 d, 256 i8, 16 i16 sums of 16 consecutive values.

use candle_core::quantized::k_quants::{BlockQ5K, BlockQ8K};

use super::q4k_avx512::{raw_q8k, unpack_scales, RawQ8K};

#[repr(C)]
struct RawQ5K {
    d: u16,
    dmin: u16,
    scales: [u8; 12],
    qh: [u8; 32],
    qs: [u8; 128],
}

const _: () = assert!(std::mem::size_of::<RawQ5K>() == std::mem::size_of::<BlockQ5K>());

/// Whether this CPU runs [`dot_rows`] (checked once; std caches the answer).
pub fn available() -> bool {
    super::q6k_avx512::available()
}

/// Activation rows multiplied per pass over a weight row (as in the Q6K kernel).
const GROUP: usize = 4;

/// `out[r] = Σ w·x_r`: one row of Q5K blocks against `out.len()` rows of Q8K activation
/// blocks stored one after another in `ys` (each as long as `xs`).
///
/// Panics if the lengths do not fit or the CPU lacks AVX-512 BW (see [`available`]).
pub fn dot_rows(xs: &[BlockQ5K], ys: &[BlockQ8K], out: &mut [f32]) {
    assert_eq!(
        xs.len() * out.len(),
        ys.len(),
        "q5k dot: row lengths differ"
    );
    assert!(available(), "q5k dot: AVX-512 BW not available");
    let bpr = xs.len();
    // SAFETY: both block types are `repr(C)` with exactly the fields of the raw mirrors
    // (sizes asserted at compile time; the test below checks values against candle), and
    // every bit pattern of those fields is valid.
    #[allow(unsafe_code)]
    let (xs, ys) = (
        unsafe { std::slice::from_raw_parts(xs.as_ptr().cast::<RawQ5K>(), xs.len()) },
        raw_q8k(ys),
    );
    #[cfg(target_arch = "x86_64")]
    let vnni = std::arch::is_x86_feature_detected!("avx512vnni");
    for (o, y) in out.chunks_mut(GROUP).zip(ys.chunks(GROUP * bpr.max(1))) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `available()` was checked above, `vnni` for the VNNI variants.
        #[allow(unsafe_code)]
        unsafe {
            match (o.len(), vnni) {
                (4, true) => o.copy_from_slice(&dot_vnni::<4>(xs, y)),
                (3, true) => o.copy_from_slice(&dot_vnni::<3>(xs, y)),
                (2, true) => o.copy_from_slice(&dot_vnni::<2>(xs, y)),
                (_, true) => o.copy_from_slice(&dot_vnni::<1>(xs, y)),
                (4, false) => o.copy_from_slice(&dot_bw::<4>(xs, y)),
                (3, false) => o.copy_from_slice(&dot_bw::<3>(xs, y)),
                (2, false) => o.copy_from_slice(&dot_bw::<2>(xs, y)),
                (_, false) => o.copy_from_slice(&dot_bw::<1>(xs, y)),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (o, y);
            unreachable!("available() is false off x86_64")
        }
    }
}

/// How far ahead of the block being multiplied its weight row is prefetched: 18 blocks
/// (3168 bytes), about the distance the Q4K kernel found best in bytes.
const PREFETCH_BYTES: usize = 18 * std::mem::size_of::<RawQ5K>();

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn dot_vnni<const R: usize>(xs: &[RawQ5K], ys: &[RawQ8K]) -> [f32; R] {
    // SAFETY: the features the body uses are enabled on this function.
    unsafe { dot_body::<R, true>(xs, ys) }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
fn dot_bw<const R: usize>(xs: &[RawQ5K], ys: &[RawQ8K]) -> [f32; R] {
    // SAFETY: as above; the VNNI instruction is not reached with `VNNI = false`.
    unsafe { dot_body::<R, false>(xs, ys) }
}

/// `R` activation rows (`ys` = R rows of `xs.len()` blocks) against one weight row. Inlined
/// into the two entry points above, which enable the instruction sets it needs.
///
/// Integer range: per block and 32-bit lane, 16 products of at most 31 · 128 · 63 (weight,
/// activation, scale); the `vpmaddubsw` pairs reach 2 · 31 · 128 < 2^15.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[inline(always)]
unsafe fn dot_body<const R: usize, const VNNI: bool>(xs: &[RawQ5K], ys: &[RawQ8K]) -> [f32; R] {
    use std::arch::x86_64::*;
    let bpr = xs.len();
    let nib = _mm512_set1_epi8(0x0f);
    let sixteen = _mm512_set1_epi8(16);
    // Per 16-bit lane: shift 0 for the low 256 bits (low nibbles), 4 for the high.
    let shifts = _mm512_inserti64x4::<1>(_mm512_setzero_si512(), _mm256_set1_epi16(4));
    // The qh bit of chunk c: 2c in the low, 2c + 1 in the high 256 bits (no closures here:
    // they would not inherit the callers' target features).
    let bits = [
        _mm512_inserti64x4::<1>(_mm512_set1_epi8(1), _mm256_set1_epi8(2)),
        _mm512_inserti64x4::<1>(_mm512_set1_epi8(4), _mm256_set1_epi8(8)),
        _mm512_inserti64x4::<1>(_mm512_set1_epi8(16), _mm256_set1_epi8(32)),
        _mm512_inserti64x4::<1>(_mm512_set1_epi8(64), _mm256_set1_epi8(-128)),
    ];
    // vpermw indices spreading scale 2c over the low and 2c+1 over the high 16 lanes.
    let idx = [
        _mm512_inserti64x4::<1>(_mm512_set1_epi16(0), _mm256_set1_epi16(1)),
        _mm512_inserti64x4::<1>(_mm512_set1_epi16(2), _mm256_set1_epi16(3)),
        _mm512_inserti64x4::<1>(_mm512_set1_epi16(4), _mm256_set1_epi16(5)),
        _mm512_inserti64x4::<1>(_mm512_set1_epi16(6), _mm256_set1_epi16(7)),
    ];
    let mut acc = [_mm512_setzero_ps(); R];
    let mut acc_min = [_mm_setzero_ps(); R];
    for (b, x) in xs.iter().enumerate() {
        // Past the row's end this reaches into the next row of the same run (rows are
        // contiguous), which is the next one read; a prefetch never faults.
        let p = (x as *const RawQ5K)
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
        // SAFETY: qh is 32 bytes.
        let qh = _mm512_broadcast_i64x4(unsafe { _mm256_loadu_si256(x.qh.as_ptr().cast()) });
        let mut sumi = [_mm512_setzero_si512(); R];
        for c in 0..4 {
            // SAFETY: chunk c reads qs[32c..32c+32] of 128 bytes.
            let packed = _mm512_broadcast_i64x4(unsafe {
                _mm256_loadu_si256(x.qs.as_ptr().add(32 * c).cast())
            });
            let q4 = _mm512_and_si512(_mm512_srlv_epi16(packed, shifts), nib);
            let q5 = _mm512_mask_add_epi8(q4, _mm512_test_epi8_mask(qh, bits[c]), q4, sixteen);
            let scale = _mm512_permutexvar_epi16(idx[c], sc16);
            for r in 0..R {
                // SAFETY: y.qs[64c..64c+64] of 256 bytes.
                let act =
                    unsafe { _mm512_loadu_si512(ys[r * bpr + b].qs.as_ptr().add(64 * c).cast()) };
                let p16 = _mm512_maddubs_epi16(q5, act);
                sumi[r] = if VNNI {
                    _mm512_dpwssd_epi32(sumi[r], p16, scale)
                } else {
                    _mm512_add_epi32(sumi[r], _mm512_madd_epi16(p16, scale))
                };
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

    fn uniform(rng: &mut SplitMix64) -> f32 {
        (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    #[test]
    fn q5k_matches_candles_dot_product() {
        if !available() {
            eprintln!("skipped: no AVX-512 BW on this CPU");
            return;
        }
        let mut rng = SplitMix64(9);
        for blocks in [1usize, 2, 5, 40] {
            let n = blocks * 256;
            // Wide, shifted value ranges per 32 weights so scales and mins use all six bits
            // and the 5-bit values span 0..31.
            let w: Vec<f32> = (0..n)
                .map(|i| (uniform(&mut rng) - 0.3) * (1.0 + (i / 32 % 7) as f32))
                .collect();
            let mut qw = vec![BlockQ5K::zeros(); blocks];
            BlockQ5K::from_float(&w, &mut qw);
            // Every qh bit position is set somewhere and clear somewhere (a fifth bit read
            // from the wrong chunk or half would then change some result).
            // SAFETY: as in `dot_rows`.
            #[allow(unsafe_code)]
            let raw = unsafe { std::slice::from_raw_parts(qw.as_ptr().cast::<RawQ5K>(), qw.len()) };
            let or = raw.iter().flat_map(|b| b.qh).fold(0u8, |a, v| a | v);
            let and = raw.iter().flat_map(|b| b.qh).fold(0xffu8, |a, v| a & v);
            assert_eq!((or, and), (0xff, 0), "qh bits not all exercised");
            // 1..=6 activation rows: a whole group, its remainders, and a second group.
            for rows in 1..=6usize {
                let x: Vec<f32> = (0..rows * n)
                    .map(|_| uniform(&mut rng) * 4.0 - 2.0)
                    .collect();
                let mut qx = vec![BlockQ8K::zeros(); rows * blocks];
                BlockQ8K::from_float(&x, &mut qx);
                let mut got = vec![0f32; rows];
                dot_rows(&qw, &qx, &mut got);
                for (r, g) in got.iter().enumerate() {
                    let want = BlockQ5K::vec_dot(n, &qw, &qx[r * blocks..(r + 1) * blocks]);
                    // Both are exact integer sums per block; only the order of the f32 sums
                    // of block terms differs, whose rounding scales with Σ|w·x| (the terms
                    // cancel), not with the result. A wrong scale, min or bit is O(1).
                    let xr = &x[r * n..(r + 1) * n];
                    let mag: f32 = w.iter().zip(xr).map(|(a, b)| (a * b).abs()).sum();
                    assert!(
                        (g - want).abs() <= 1e-6 * mag,
                        "{blocks} blocks, row {r} of {rows}: {g} vs candle {want}"
                    );
                }
            }
        }
    }
}
