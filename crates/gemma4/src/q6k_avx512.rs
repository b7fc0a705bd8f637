//! Q6K x Q8K block dot product with AVX-512 (BW, and VNNI where the CPU has it): `qmm`'s
//! kernel for the Q6_K tensors of llama.cpp's Q4_K_M files (the tied token table, and
//! `ffn_down` / `attn_v` on the layers llama-quantize gives more bits), at every row count.
//!
//! candle's x86 kernel for this pair is AVX2, one activation row per call, so prefill went
//! through dequantize + f32 GEMM instead. Here a 512-bit step covers 64 weights: the 64
//! bytes of low nibbles of one half block (`ql`) hold weights 0..63 in their low and 64..127
//! in their high nibbles, and the 32 bytes of high bits (`qh`), broadcast to both 256-bit
//! halves and shifted per half, supply the two top bits of the same 64 weights. The 6-bit
//! weights stay unsigned (0..63) for `vpmaddubsw`; the `-32` offset of the format is taken
//! out once per block from the activations' 16-sums (Q8K's `bsums` cover exactly one Q6K
//! scale group each). Each weight block is unpacked once for a group of activation rows.
//! Many rows (prefill) go through [`matmul_tiled`] instead: 16 weight rows unpacked per call
//! into the interleaved layout of llama.cpp's and candle's repacked matrices, so that one
//! multiply-add serves 16 output rows; the tiles live in one worker's buffer, not beside the
//! weights.
//!
//! Block layouts are GGML's, as candle stores them (`#[repr(C)]`, sizes asserted below):
//! Q6K = 128 bytes `ql`, 64 bytes `qh`, 16 i8 scales (one per 16 weights), f16 d; weight
//! `128h + 32j + l` (`h` half, `j` 0..4, `l` 0..32) is `(ql[64h + 32(j&1) + l] >> 4(j>>1)
//! & 15) | ((qh[32h + l] >> 2j) & 3) << 4`, minus 32. Q8K = f32 d, 256 i8, 16 i16 sums of 16
//! consecutive values.

use candle_core::quantized::k_quants::{BlockQ6K, BlockQ8K};

use super::q4k_avx512::{quantize_q8k, raw_q8k, scatter_tiles, RawQ8K, TILE_N};

#[repr(C)]
struct RawQ6K {
    ql: [u8; 128],
    qh: [u8; 64],
    scales: [i8; 16],
    d: u16,
}

const _: () = assert!(std::mem::size_of::<RawQ6K>() == std::mem::size_of::<BlockQ6K>());

/// Whether this CPU runs [`dot_rows`] (checked once; std caches the answer).
pub fn available() -> bool {
    // The same instructions as the Q4K kernel's.
    super::q4k_avx512::available()
}

#[cfg(target_arch = "x86_64")]
fn vnni() -> bool {
    std::arch::is_x86_feature_detected!("avx512vnni")
}

/// Activation rows multiplied per pass over a weight row: each unpacked 64-weight chunk is
/// used this many times. 4 rows keep 4 integer and 4 float accumulators besides the chunk,
/// its scales and the constants well inside the 32 vector registers.
const GROUP: usize = 4;

/// `out[r] = Σ w·x_r`: one row of Q6K blocks against `out.len()` rows of Q8K activation
/// blocks stored one after another in `ys` (each as long as `xs`).
///
/// Panics if the lengths do not fit or the CPU lacks AVX-512 BW (see [`available`]).
pub fn dot_rows(xs: &[BlockQ6K], ys: &[BlockQ8K], out: &mut [f32]) {
    assert_eq!(
        xs.len() * out.len(),
        ys.len(),
        "q6k dot: row lengths differ"
    );
    assert!(available(), "q6k dot: AVX-512 BW not available");
    let bpr = xs.len();
    // SAFETY: both block types are `repr(C)` with exactly the fields of the raw mirrors
    // (sizes asserted at compile time; the test below checks values against candle), and
    // every bit pattern of those fields is valid.
    #[allow(unsafe_code)]
    let (xs, ys) = (
        unsafe { std::slice::from_raw_parts(xs.as_ptr().cast::<RawQ6K>(), xs.len()) },
        raw_q8k(ys),
    );
    #[cfg(target_arch = "x86_64")]
    let vnni = vnni();
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

/// How far ahead of the block being multiplied its weight row is prefetched: 16 blocks
/// (3360 bytes), about the distance the Q4K kernel found best in bytes.
const PREFETCH_BYTES: usize = 16 * std::mem::size_of::<RawQ6K>();

/// vpermw indices giving each of the 32 16-bit lanes of chunk `c` (weights 64c..64c+63,
/// pairs after `vpmaddubsw`) its scale: 16 weights = 8 lanes per scale, scales 4c..4c+3.
const fn scale_index() -> [[i16; 32]; 4] {
    let mut idx = [[0i16; 32]; 4];
    let mut c = 0;
    while c < 4 {
        let mut l = 0;
        while l < 32 {
            idx[c][l] = (4 * c + l / 8) as i16;
            l += 1;
        }
        c += 1;
    }
    idx
}
const SCALE_INDEX: [[i16; 32]; 4] = scale_index();

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn dot_vnni<const R: usize>(xs: &[RawQ6K], ys: &[RawQ8K]) -> [f32; R] {
    // SAFETY: the features the body uses are enabled on this function.
    unsafe { dot_body::<R, true>(xs, ys) }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
fn dot_bw<const R: usize>(xs: &[RawQ6K], ys: &[RawQ8K]) -> [f32; R] {
    // SAFETY: as above; the VNNI instruction is not reached with `VNNI = false`.
    unsafe { dot_body::<R, false>(xs, ys) }
}

/// `R` activation rows (`ys` = R rows of `xs.len()` blocks) against one weight row. Inlined
/// into the two entry points above, which enable the instruction sets it needs.
///
/// Integer range: per block and 32-bit lane, 16 products of at most 63 · 128 · 128 (weight,
/// activation, scale): far inside i32; the `vpmaddubsw` pairs reach 2 · 63 · 128 < 2^15.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[inline(always)]
unsafe fn dot_body<const R: usize, const VNNI: bool>(xs: &[RawQ6K], ys: &[RawQ8K]) -> [f32; R] {
    use std::arch::x86_64::*;
    let bpr = xs.len();
    let lo4 = _mm512_set1_epi8(0x0f);
    let hi2 = _mm512_set1_epi8(0x30);
    // Per 16-bit lane, the shifts that bring qh's bit pairs to bits 4..5: pairs 0 / 1 (low /
    // high 256 bits) for chunks 0 and 2 of a block, pairs 2 / 3 for chunks 1 and 3.
    let shl_even = _mm512_inserti64x4::<1>(_mm512_set1_epi16(4), _mm256_set1_epi16(2));
    let shr_odd = _mm512_inserti64x4::<1>(_mm512_setzero_si512(), _mm256_set1_epi16(2));
    // SAFETY: SCALE_INDEX rows are 64 bytes.
    let idx: [__m512i; 4] = unsafe {
        [
            _mm512_loadu_si512(SCALE_INDEX[0].as_ptr().cast()),
            _mm512_loadu_si512(SCALE_INDEX[1].as_ptr().cast()),
            _mm512_loadu_si512(SCALE_INDEX[2].as_ptr().cast()),
            _mm512_loadu_si512(SCALE_INDEX[3].as_ptr().cast()),
        ]
    };
    let mut acc = [_mm512_setzero_ps(); R];
    for (b, x) in xs.iter().enumerate() {
        // Past the row's end this reaches into the next row of the same run (rows are
        // contiguous), which is the next one read; a prefetch never faults.
        let p = (x as *const RawQ6K)
            .cast::<i8>()
            .wrapping_add(PREFETCH_BYTES);
        _mm_prefetch::<_MM_HINT_T0>(p);
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64));
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(128));
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(192));
        let wd = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(x.d))));
        // SAFETY: scales is 16 bytes.
        let sc16 = _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(x.scales.as_ptr().cast()) });
        let sc16z = _mm512_castsi256_si512(sc16);
        let mut sumi = [_mm512_setzero_si512(); R];
        for h in 0..2 {
            // SAFETY: ql[64h..64h+64] of 128 bytes, qh[32h..32h+32] of 64 bytes.
            let (ql, qh) = unsafe {
                (
                    _mm512_loadu_si512(x.ql.as_ptr().add(64 * h).cast()),
                    _mm512_broadcast_i64x4(_mm256_loadu_si256(x.qh.as_ptr().add(32 * h).cast())),
                )
            };
            for s in 0..2 {
                let c = 2 * h + s;
                let (low, high) = if s == 0 {
                    (ql, _mm512_sllv_epi16(qh, shl_even))
                } else {
                    (_mm512_srli_epi16::<4>(ql), _mm512_srlv_epi16(qh, shr_odd))
                };
                // (low & 0x0f) | (high & 0x30): 0xEA is A&B | C over (A, B, C).
                let q6 = _mm512_ternarylogic_epi32::<0xEA>(low, lo4, _mm512_and_si512(high, hi2));
                let scale = _mm512_permutexvar_epi16(idx[c], sc16z);
                for r in 0..R {
                    // SAFETY: y.qs[64c..64c+64] of 256 bytes.
                    let act = unsafe {
                        _mm512_loadu_si512(ys[r * bpr + b].qs.as_ptr().add(64 * c).cast())
                    };
                    let p16 = _mm512_maddubs_epi16(q6, act);
                    sumi[r] = if VNNI {
                        _mm512_dpwssd_epi32(sumi[r], p16, scale)
                    } else {
                        _mm512_add_epi32(sumi[r], _mm512_madd_epi16(p16, scale))
                    };
                }
            }
        }
        for r in 0..R {
            let y = &ys[r * bpr + b];
            // The weights went in as stored (0..63): take out 32 · Σ_j scale_j · bsum_j.
            // SAFETY: bsums is 32 bytes, read unaligned.
            let bs = unsafe { _mm256_loadu_si256(y.bsums.as_ptr().cast()) };
            let off = _mm512_zextsi256_si512(_mm256_slli_epi32::<5>(_mm256_madd_epi16(sc16, bs)));
            let total = _mm512_sub_epi32(sumi[r], off);
            acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(y.d * wd), _mm512_cvtepi32_ps(total), acc[r]);
        }
    }
    std::array::from_fn(|r| _mm512_reduce_add_ps(acc[r]))
}

/// From this many activation rows on, `qmm` multiplies Q6K with [`matmul_tiled`]. By
/// instruction count (the crossover is not measured yet) unpacking 16 weight rows into a
/// tile costs about as much as multiplying them with 16-32 rows, while [`dot_rows`] unpacks
/// each weight block again for every 4 rows. At 128 rows the tiled path measured 4.7-6.8x
/// the dequantize + f32 GEMM it replaced (`bench model --kernels`, 12B MLP shapes).
pub const TILED_MIN_ROWS: usize = 32;

/// One block (256 weights) of 16 weight rows, unpacked so that one `vpmaddubsw` against 4
/// broadcast activation bytes and one `vpdpwssd` with the scales add 4 products to each
/// row's lane: the layout llama.cpp and candle repack whole matrices into, here built per
/// call in a buffer of one worker (342 KB for k = 15360) and dropped after it.
#[repr(C, align(64))]
struct Tile {
    /// 6-bit codes 0..63: `[4-weight group g (64)][row (16)][4 weights]`.
    q: [u8; 64 * TILE_N * 4],
    /// Scale of 16-weight group j in both i16 halves of each row's lane: `[j][row][2]`.
    sc: [i16; 16 * TILE_N * 2],
    /// `-32 · scale` of groups 2p and 2p+1 (the offset of the codes, taken out against the
    /// activations' 16-sums): `[p (8)][row][2]`.
    off: [i16; 8 * TILE_N * 2],
    d: [f32; TILE_N],
}

impl Tile {
    const ZERO: Tile = Tile {
        q: [0; 64 * TILE_N * 4],
        sc: [0; 16 * TILE_N * 2],
        off: [0; 8 * TILE_N * 2],
        d: [0.0; TILE_N],
    };

    /// Row `r` of the tile from one Q6K block.
    fn set_row(&mut self, r: usize, x: &RawQ6K) {
        let mut codes = [0u8; 256];
        for h in 0..2 {
            for j in 0..4 {
                for l in 0..32 {
                    let lo = (x.ql[64 * h + 32 * (j & 1) + l] >> (4 * (j >> 1))) & 15;
                    let hi = (x.qh[32 * h + l] >> (2 * j)) & 3;
                    codes[128 * h + 32 * j + l] = lo | (hi << 4);
                }
            }
        }
        for (g, c) in codes.chunks_exact(4).enumerate() {
            self.q[(g * TILE_N + r) * 4..][..4].copy_from_slice(c);
        }
        for (j, &s) in x.scales.iter().enumerate() {
            self.sc[(j * TILE_N + r) * 2] = i16::from(s);
            self.sc[(j * TILE_N + r) * 2 + 1] = i16::from(s);
            self.off[((j / 2) * TILE_N + r) * 2 + j % 2] = -32 * i16::from(s);
        }
        self.d[r] = half::f16::from_bits(x.d).to_f32();
    }
}

/// `dst[m, n] = lhs[m, k] · Wᵀ` for a Q6K matrix `W [n, k]` given as its blocks, `n` a
/// multiple of 16: the activation rows are quantized to Q8K once, and each rayon task
/// unpacks 16 weight rows into [`Tile`]s and multiplies every activation row with them.
///
/// Errors if the sizes do not fit; panics if the CPU lacks AVX-512 BW (see [`available`]).
pub fn matmul_tiled(
    xs: &[BlockQ6K],
    (m, k, n): (usize, usize, usize),
    lhs: &[f32],
    dst: &mut [f32],
) -> candle_core::Result<()> {
    use rayon::prelude::*;
    let bpr = k / 256;
    if !k.is_multiple_of(256)
        || !n.is_multiple_of(TILE_N)
        || xs.len() != n * bpr
        || lhs.len() != m * k
        || dst.len() != m * n
    {
        candle_core::bail!("q6k tiled: sizes do not fit m={m} k={k} n={n}");
    }
    assert!(available(), "q6k tiled: AVX-512 BW not available");
    let qx = quantize_q8k(lhs, k);
    // SAFETY: as in `dot_rows`.
    #[allow(unsafe_code)]
    let (xs, ys) = (
        unsafe { std::slice::from_raw_parts(xs.as_ptr().cast::<RawQ6K>(), xs.len()) },
        raw_q8k(&qx),
    );
    #[cfg(target_arch = "x86_64")]
    let vnni = vnni();
    // `[n / 16][m][16]`: each task writes one contiguous slice; scattered into dst below.
    let mut out = vec![0f32; m * n];
    out.par_chunks_mut(m * TILE_N)
        .zip(xs.par_chunks(TILE_N * bpr))
        .for_each_init(Vec::new, |tiles: &mut Vec<Tile>, (o, w)| {
            tiles.clear();
            tiles.resize_with(bpr, || Tile::ZERO);
            for (r, row) in w.chunks_exact(bpr).enumerate() {
                for (t, x) in tiles.iter_mut().zip(row) {
                    t.set_row(r, x);
                }
            }
            for (o, y) in o.chunks_mut(GROUP * TILE_N).zip(ys.chunks(GROUP * bpr)) {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `available()` was checked above, `vnni` for the VNNI variants.
                #[allow(unsafe_code)]
                unsafe {
                    match (o.len() / TILE_N, vnni) {
                        (4, true) => tile_vnni::<4>(tiles, y, o),
                        (3, true) => tile_vnni::<3>(tiles, y, o),
                        (2, true) => tile_vnni::<2>(tiles, y, o),
                        (_, true) => tile_vnni::<1>(tiles, y, o),
                        (4, false) => tile_bw::<4>(tiles, y, o),
                        (3, false) => tile_bw::<3>(tiles, y, o),
                        (2, false) => tile_bw::<2>(tiles, y, o),
                        (_, false) => tile_bw::<1>(tiles, y, o),
                    }
                }
                #[cfg(not(target_arch = "x86_64"))]
                {
                    let _ = (o, y);
                    unreachable!("available() is false off x86_64")
                }
            }
        });
    scatter_tiles(&out, m, n, dst);
    Ok(())
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
fn tile_vnni<const R: usize>(tiles: &[Tile], ys: &[RawQ8K], out: &mut [f32]) {
    // SAFETY: the features the body uses are enabled on this function.
    unsafe { tile_body::<R, true>(tiles, ys, out) }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
fn tile_bw<const R: usize>(tiles: &[Tile], ys: &[RawQ8K], out: &mut [f32]) {
    // SAFETY: as above; the VNNI instruction is not reached with `VNNI = false`.
    unsafe { tile_body::<R, false>(tiles, ys, out) }
}

/// `R` activation rows (`ys`, R rows of `tiles.len()` blocks) against the 16 weight rows of
/// `tiles`: `out[r · 16 + i] = w_i · y_r`.
///
/// Integer range per block and lane: 128 `vpmaddubsw` pairs of at most 2 · 63 · 128 times
/// a scale of at most 128 (2.6e8), and 16 offsets of 32 · 128 · 16 · 128 (1.3e8): < 2^31.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[inline(always)]
unsafe fn tile_body<const R: usize, const VNNI: bool>(
    tiles: &[Tile],
    ys: &[RawQ8K],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let bpr = tiles.len();
    let mut acc = [_mm512_setzero_ps(); R];
    for (b, t) in tiles.iter().enumerate() {
        let y: [&RawQ8K; R] = std::array::from_fn(|r| &ys[r * bpr + b]);
        let mut sumi = [_mm512_setzero_si512(); R];
        for j in 0..16 {
            // SAFETY: sc[32j..32j+32] of 512 i16; q[64g..64g+64] of 4096 bytes, g < 64.
            let scale = unsafe { _mm512_loadu_si512(t.sc.as_ptr().add(32 * j).cast()) };
            for g in 4 * j..4 * j + 4 {
                let w = unsafe { _mm512_loadu_si512(t.q.as_ptr().add(64 * g).cast()) };
                for r in 0..R {
                    // SAFETY: qs[4g..4g+4] of 256 bytes.
                    let a = _mm512_set1_epi32(unsafe {
                        std::ptr::read_unaligned(y[r].qs.as_ptr().add(4 * g).cast::<i32>())
                    });
                    let p16 = _mm512_maddubs_epi16(w, a);
                    sumi[r] = if VNNI {
                        _mm512_dpwssd_epi32(sumi[r], p16, scale)
                    } else {
                        _mm512_add_epi32(sumi[r], _mm512_madd_epi16(p16, scale))
                    };
                }
            }
        }
        for p in 0..8 {
            // SAFETY: off[32p..32p+32] of 256 i16.
            let off = unsafe { _mm512_loadu_si512(t.off.as_ptr().add(32 * p).cast()) };
            for r in 0..R {
                let pair =
                    (i32::from(y[r].bsums[2 * p + 1]) << 16) | i32::from(y[r].bsums[2 * p] as u16);
                let bs = _mm512_set1_epi32(pair);
                sumi[r] = if VNNI {
                    _mm512_dpwssd_epi32(sumi[r], off, bs)
                } else {
                    _mm512_add_epi32(sumi[r], _mm512_madd_epi16(off, bs))
                };
            }
        }
        // SAFETY: d is 16 f32.
        let d = unsafe { _mm512_loadu_ps(t.d.as_ptr()) };
        for r in 0..R {
            let f = _mm512_mul_ps(d, _mm512_set1_ps(y[r].d));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi[r]), f, acc[r]);
        }
    }
    for (r, a) in acc.iter().enumerate() {
        // SAFETY: out holds R · 16 floats (the caller's chunk).
        unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(r * TILE_N), *a) };
    }
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
    fn q6k_matches_candles_dot_product() {
        if !available() {
            eprintln!("skipped: no AVX-512 BW on this CPU");
            return;
        }
        let mut rng = SplitMix64(7);
        for blocks in [1usize, 2, 5, 40] {
            let n = blocks * 256;
            // Magnitudes that change every 16 weights, and signs of both kinds, so the
            // quantized scales spread over the i8 range and the 6-bit values over 0..63.
            let w: Vec<f32> = (0..n)
                .map(|i| (uniform(&mut rng) - 0.45) * (1.0 + (i / 16 % 11) as f32))
                .collect();
            let mut qw = vec![BlockQ6K::zeros(); blocks];
            BlockQ6K::from_float(&w, &mut qw);
            // All 64 six-bit codes occur (a bit of ql or qh read from the wrong place, or
            // the offset taken wrongly, would show up for some of them).
            let mut seen = [false; 64];
            for v in dequantized_codes(&qw) {
                seen[v as usize] = true;
            }
            assert!(blocks < 5 || seen.iter().all(|&s| s), "codes {seen:?}");
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
                    let want = BlockQ6K::vec_dot(n, &qw, &qx[r * blocks..(r + 1) * blocks]);
                    // Both are exact integer sums per block (candle scales per 16 weights
                    // in i32 too); only the order of the f32 sums of block terms differs,
                    // whose rounding scales with Σ|w·x| (the terms cancel), not with the
                    // result. A wrong scale, offset or bit is O(1) relative to it.
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

    #[test]
    fn q6k_tiled_matches_candles_dot_product() {
        if !available() {
            eprintln!("skipped: no AVX-512 BW on this CPU");
            return;
        }
        let mut rng = SplitMix64(13);
        for (blocks, n) in [(1usize, 16usize), (3, 48)] {
            let k = blocks * 256;
            let w: Vec<f32> = (0..n * k)
                .map(|i| (uniform(&mut rng) - 0.45) * (1.0 + (i / 16 % 11) as f32))
                .collect();
            let mut qw = vec![BlockQ6K::zeros(); n * blocks];
            BlockQ6K::from_float(&w, &mut qw);
            // 1..=6 activation rows: a whole group of 4, its remainders, and a second group.
            for m in 1..=6usize {
                let x: Vec<f32> = (0..m * k).map(|_| uniform(&mut rng) * 4.0 - 2.0).collect();
                let mut got = vec![0f32; m * n];
                matmul_tiled(&qw, (m, k, n), &x, &mut got).unwrap();
                let mut qx = vec![BlockQ8K::zeros(); m * blocks];
                BlockQ8K::from_float(&x, &mut qx);
                for i in 0..m {
                    for j in 0..n {
                        let want = BlockQ6K::vec_dot(
                            k,
                            &qw[j * blocks..(j + 1) * blocks],
                            &qx[i * blocks..(i + 1) * blocks],
                        );
                        // As in the test above: exact integer sums per block, f32 sums of
                        // block terms in another order.
                        let (wr, xr) = (&w[j * k..(j + 1) * k], &x[i * k..(i + 1) * k]);
                        let mag: f32 = wr.iter().zip(xr).map(|(a, b)| (a * b).abs()).sum();
                        let g = got[i * n + j];
                        assert!(
                            (g - want).abs() <= 1e-6 * mag,
                            "{blocks} blocks, m={m}, out[{i}, {j}]: {g} vs candle {want}"
                        );
                    }
                }
            }
            // A row count that is not a multiple of the tile is refused, not misread.
            let mut dst = vec![0f32; 8];
            let x = vec![0f32; k];
            assert!(matmul_tiled(&qw[..8 * blocks], (1, k, 8), &x, &mut dst).is_err());
        }
    }

    /// The 6-bit codes of the blocks, by GGML's layout (see the module doc).
    fn dequantized_codes(qw: &[BlockQ6K]) -> Vec<u8> {
        // SAFETY: as in `dot_rows`.
        #[allow(unsafe_code)]
        let raw = unsafe { std::slice::from_raw_parts(qw.as_ptr().cast::<RawQ6K>(), qw.len()) };
        let mut out = Vec::new();
        for b in raw {
            for h in 0..2 {
                for j in 0..4 {
                    for l in 0..32 {
                        let lo = b.ql[64 * h + 32 * (j & 1) + l] >> (4 * (j >> 1)) & 15;
                        let hi = (b.qh[32 * h + l] >> (2 * j)) & 3;
                        out.push(lo | hi << 4);
                    }
                }
            }
        }
        out
    }
}
