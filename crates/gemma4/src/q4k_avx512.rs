//! Q4K x Q8K with AVX-512 (BW; the prefill tiles use VNNI where the CPU has it): `qmm`'s
//! kernel for Q4K weights.
//!
//! candle's x86 kernel for this pair is AVX2: 32 bytes of activations per step and a byte
//! shuffle per sub-block to spread the scales. With 512-bit registers one step covers a
//! whole 64-weight chunk (two sub-blocks): the 32 packed bytes are broadcast to both halves
//! and shifted by 0 / 4 bits per half, which lines the nibbles up with 64 consecutive
//! activation bytes, so the activations load straight from the block. Half the
//! instructions per block leave the core more time for everything else it has to do
//! between weight reads.
//!
//! Many rows (prefill without AMX) go through [`matmul_tiled`] instead: 16 weight rows
//! unpacked per call into interleaved tiles (nibbles one per byte, scales and mins per lane)
//! so that one multiply-add serves 16 output rows, as in `q6k_avx512`; the mins go into a
//! second accumulator against the activations' 16-sums. The tiles live in one worker's
//! buffer, not beside the weights.
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

/// Candle's `BlockQ8K` with its fields visible: the activation side of every K-quant kernel
/// (Q4K here, Q5K, Q6K).
#[repr(C)]
pub(crate) struct RawQ8K {
    pub(crate) d: f32,
    pub(crate) qs: [i8; 256],
    pub(crate) bsums: [i16; 16],
}

const _: () = assert!(std::mem::size_of::<RawQ4K>() == std::mem::size_of::<BlockQ4K>());
const _: () = assert!(std::mem::size_of::<RawQ8K>() == std::mem::size_of::<BlockQ8K>());

/// `ys` seen as [`RawQ8K`]s.
pub(crate) fn raw_q8k(ys: &[BlockQ8K]) -> &[RawQ8K] {
    // SAFETY: `RawQ8K` mirrors `BlockQ8K` field for field (`repr(C)`, size asserted above);
    // every bit pattern of its f32 / integer fields is valid, and the slice borrows `ys`.
    #[allow(unsafe_code)]
    unsafe {
        std::slice::from_raw_parts(ys.as_ptr().cast::<RawQ8K>(), ys.len())
    }
}

/// The `m` rows of `lhs` (`k` wide) quantized to Q8K, one after another: the activations of
/// the tiled prefill paths.
pub(crate) fn quantize_q8k(lhs: &[f32], k: usize) -> Vec<BlockQ8K> {
    use candle_core::quantized::k_quants::GgmlType;
    let bpr = k / 256;
    let mut qx = vec![BlockQ8K::zeros(); lhs.len() / k.max(1) * bpr];
    for (row, q) in lhs.chunks_exact(k).zip(qx.chunks_mut(bpr)) {
        BlockQ8K::from_float(row, q);
    }
    qx
}

/// Scatters the tiled paths' output, `[n / 16][m][16]` (one contiguous slice per run of 16
/// weight rows), into `dst[m, n]`.
pub(crate) fn scatter_tiles(out: &[f32], m: usize, n: usize, dst: &mut [f32]) {
    for (t, o) in out.chunks_exact(m * TILE_N).enumerate() {
        for (i, v) in o.chunks_exact(TILE_N).enumerate() {
            dst[i * n + t * TILE_N..][..TILE_N].copy_from_slice(v);
        }
    }
}

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
    let (xs, ys) = (
        unsafe { std::slice::from_raw_parts(xs.as_ptr().cast::<RawQ4K>(), xs.len()) },
        raw_q8k(ys),
    );
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

/// From this many activation rows on, `qmm` multiplies Q4K with [`matmul_tiled`] (below
/// `qmm::PACKED_MIN_ROWS` where the CPU has AMX). Against [`dot_rows`] (`bench model
/// --kernels`, E4B and 12B shapes, best of two interleaved runs on a loaded 2-core VM) the
/// tiles ran 0.3-0.4x its speed at 8 rows, 0.6-1.0x at 16, 0.66-2.3x at 32 (losing on the
/// `ffn_down` shapes, k = 10240 / 15360, winning on the others), 1.9-3.5x at 128 and
/// 2.3-3.0x at 512.
pub const TILED_MIN_ROWS: usize = 32;

/// Weight rows per tile of [`matmul_tiled`]: one 32-bit lane each of a 512-bit register.
pub(crate) const TILE_N: usize = 16;

/// Blocks of tiles (5.8 KB each) multiplied with all activation rows before the next run:
/// 46 KB, about L1. At 128 rows this ran 1.07-1.5x the whole row of tiles at a time (12B
/// `ffn_down` 37.6 -> 31.3 ms), at 512 rows 0.95-1.04x, at 32 rows 0.85-0.95x (`bench model
/// --kernels`, best of two interleaved runs, load 1.6-2.4), hence only from
/// K_CHUNK_MIN_ROWS rows on.
const K_CHUNK: usize = 8;
const K_CHUNK_MIN_ROWS: usize = 128;

/// Activation rows multiplied per pass over the tiles: 4 rows keep 3 integer and 1 float
/// accumulator each besides the weights, scales and broadcast activations in registers.
const GROUP: usize = 4;

/// One block (256 weights) of 16 weight rows, unpacked so that one `vpdpbusd` (or
/// `vpmaddubsw`) against 4 broadcast activation bytes adds 4 products to each row's lane:
/// the interleaved layout llama.cpp (`q4_K_8x8`) and candle repack whole matrices into,
/// here built per call in a buffer of one worker (360 KB for k = 15360) and dropped after.
#[repr(C, align(64))]
struct Tile {
    /// 4-bit codes 0..15, one per byte: `[4-weight group g (64)][row (16)][4 weights]`.
    q: [u8; 64 * TILE_N * 4],
    /// Scale of 32-weight sub-block j in both i16 halves of each row's lane: `[j][row][2]`
    /// (for `vpmaddwd` after `vpmaddubsw`).
    sc: [i16; 8 * TILE_N * 2],
    /// The same scales as i32: `[j][row]` (for `vpmulld` after `vpdpbusd`).
    sc32: [i32; 8 * TILE_N],
    /// Min of sub-block j in both i16 halves: `[j][row][2]`, against the activations'
    /// 16-sums 2j and 2j+1 (one 32-weight sub-block).
    mn: [i16; 8 * TILE_N * 2],
    d: [f32; TILE_N],
    dmin: [f32; TILE_N],
}

impl Tile {
    const ZERO: Tile = Tile {
        q: [0; 64 * TILE_N * 4],
        sc: [0; 8 * TILE_N * 2],
        sc32: [0; 8 * TILE_N],
        mn: [0; 8 * TILE_N * 2],
        d: [0.0; TILE_N],
        dmin: [0.0; TILE_N],
    };

    /// Row `r` of the tile from one Q4K block.
    fn set_row(&mut self, r: usize, x: &RawQ4K) {
        let mut codes = [0u8; 256];
        for c in 0..4 {
            for l in 0..32 {
                let b = x.qs[32 * c + l];
                codes[64 * c + l] = b & 15;
                codes[64 * c + 32 + l] = b >> 4;
            }
        }
        for (g, q) in codes.chunks_exact(4).enumerate() {
            self.q[(g * TILE_N + r) * 4..][..4].copy_from_slice(q);
        }
        let (sc, mn) = unpack_scales(&x.scales);
        for j in 0..8 {
            let s = ((sc >> (8 * j)) & 0x3f) as i16;
            let m = ((mn >> (8 * j)) & 0x3f) as i16;
            self.sc[(j * TILE_N + r) * 2] = s;
            self.sc[(j * TILE_N + r) * 2 + 1] = s;
            self.sc32[j * TILE_N + r] = i32::from(s);
            self.mn[(j * TILE_N + r) * 2] = m;
            self.mn[(j * TILE_N + r) * 2 + 1] = m;
        }
        self.d[r] = half::f16::from_bits(x.d).to_f32();
        self.dmin[r] = half::f16::from_bits(x.dmin).to_f32();
    }
}

/// `dst[m, n] = lhs[m, k] · Wᵀ` for a Q4K matrix `W [n, k]` given as its blocks, `n` a
/// multiple of 16: the activation rows are quantized to Q8K once, and each rayon task
/// unpacks 16 weight rows into [`Tile`]s and multiplies every activation row with them.
///
/// Errors if the sizes do not fit; panics if the CPU lacks AVX-512 BW (see [`available`]).
pub fn matmul_tiled(
    xs: &[BlockQ4K],
    mkn: (usize, usize, usize),
    lhs: &[f32],
    dst: &mut [f32],
) -> candle_core::Result<()> {
    #[cfg(target_arch = "x86_64")]
    let vnni = std::arch::is_x86_feature_detected!("avx512vnni");
    #[cfg(not(target_arch = "x86_64"))]
    let vnni = false;
    matmul_tiled_with(vnni, xs, mkn, lhs, dst)
}

/// [`matmul_tiled`] with the VNNI inner loop chosen by the caller (the test runs both).
fn matmul_tiled_with(
    vnni: bool,
    xs: &[BlockQ4K],
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
        candle_core::bail!("q4k tiled: sizes do not fit m={m} k={k} n={n}");
    }
    assert!(available(), "q4k tiled: AVX-512 BW not available");
    let qx = quantize_q8k(lhs, k);
    // SAFETY: as in `dot_rows`.
    #[allow(unsafe_code)]
    let (xs, ys) = (
        unsafe { std::slice::from_raw_parts(xs.as_ptr().cast::<RawQ4K>(), xs.len()) },
        raw_q8k(&qx),
    );
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
            // Many rows: a run of K_CHUNK blocks of tiles at a time for all of them, so the
            // tiles being read stay in L1 whatever k is.
            let chunk = if m >= K_CHUNK_MIN_ROWS {
                K_CHUNK
            } else {
                bpr.max(1)
            };
            for (c, kc) in tiles.chunks(chunk).enumerate() {
                for (o, y) in o.chunks_mut(GROUP * TILE_N).zip(ys.chunks(GROUP * bpr)) {
                    let y = &y[c * chunk..];
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `available()` was checked above; `vnni` only where the CPU has
                    // it (`matmul_tiled`, the test).
                    #[allow(unsafe_code)]
                    unsafe {
                        match (o.len() / TILE_N, vnni) {
                            (4, true) => tile_vnni::<4>(kc, y, bpr, o),
                            (3, true) => tile_vnni::<3>(kc, y, bpr, o),
                            (2, true) => tile_vnni::<2>(kc, y, bpr, o),
                            (_, true) => tile_vnni::<1>(kc, y, bpr, o),
                            (4, false) => tile_bw::<4>(kc, y, bpr, o),
                            (3, false) => tile_bw::<3>(kc, y, bpr, o),
                            (2, false) => tile_bw::<2>(kc, y, bpr, o),
                            (_, false) => tile_bw::<1>(kc, y, bpr, o),
                        }
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    {
                        let _ = (o, y, vnni);
                        unreachable!("available() is false off x86_64")
                    }
                }
            }
        });
    scatter_tiles(&out, m, n, dst);
    Ok(())
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
fn tile_vnni<const R: usize>(tiles: &[Tile], ys: &[RawQ8K], stride: usize, out: &mut [f32]) {
    // SAFETY: the features the body uses are enabled on this function.
    unsafe { tile_body::<R, true>(tiles, ys, stride, out) }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
fn tile_bw<const R: usize>(tiles: &[Tile], ys: &[RawQ8K], stride: usize, out: &mut [f32]) {
    // SAFETY: as above; the VNNI instructions are not reached with `VNNI = false`.
    unsafe { tile_body::<R, false>(tiles, ys, stride, out) }
}

/// `R` activation rows (`ys`, block `b` of row `r` at `r · stride + b`) against the 16
/// weight rows of `tiles`: `out[r · 16 + i] += w_i · y_r`.
///
/// Per sub-block (32 weights) and lane the 32 code-activation products sum to at most
/// 32 · 15 · 128 = 61440: with VNNI they accumulate in i32 by `vpdpbusd` and are scaled
/// once by `vpmulld`; without, the 8 `vpmaddubsw` results (each pair ≤ 3840) add in i16
/// (≤ 30720 < 2^15) before one `vpmaddwd` with the scale. Per block: ≤ 8 · 61440 · 63 and
/// ≤ 8 · 63 · 4096 for the mins, far inside i32.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[inline(always)]
unsafe fn tile_body<const R: usize, const VNNI: bool>(
    tiles: &[Tile],
    ys: &[RawQ8K],
    stride: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let bpr = stride;
    // SAFETY: out holds R · 16 floats (the caller's chunk).
    let mut acc: [__m512; R] =
        std::array::from_fn(|r| unsafe { _mm512_loadu_ps(out.as_ptr().add(r * TILE_N)) });
    for (b, t) in tiles.iter().enumerate() {
        let y: [&RawQ8K; R] = std::array::from_fn(|r| &ys[r * bpr + b]);
        let mut sumi = [_mm512_setzero_si512(); R];
        let mut summ = [_mm512_setzero_si512(); R];
        for j in 0..8 {
            if VNNI {
                let mut part = [_mm512_setzero_si512(); R];
                for g in 8 * j..8 * j + 8 {
                    // SAFETY: q[64g..64g+64] of 4096 bytes, g < 64.
                    let w = unsafe { _mm512_loadu_si512(t.q.as_ptr().add(64 * g).cast()) };
                    for r in 0..R {
                        // SAFETY: qs[4g..4g+4] of 256 bytes.
                        let a = _mm512_set1_epi32(unsafe {
                            std::ptr::read_unaligned(y[r].qs.as_ptr().add(4 * g).cast::<i32>())
                        });
                        part[r] = _mm512_dpbusd_epi32(part[r], w, a);
                    }
                }
                // SAFETY: sc32[16j..16j+16] of 128 i32.
                let scale = unsafe { _mm512_loadu_si512(t.sc32.as_ptr().add(16 * j).cast()) };
                for r in 0..R {
                    sumi[r] = _mm512_add_epi32(sumi[r], _mm512_mullo_epi32(part[r], scale));
                }
            } else {
                let mut part = [_mm512_setzero_si512(); R];
                for g in 8 * j..8 * j + 8 {
                    // SAFETY: as above.
                    let w = unsafe { _mm512_loadu_si512(t.q.as_ptr().add(64 * g).cast()) };
                    for r in 0..R {
                        // SAFETY: as above.
                        let a = _mm512_set1_epi32(unsafe {
                            std::ptr::read_unaligned(y[r].qs.as_ptr().add(4 * g).cast::<i32>())
                        });
                        part[r] = _mm512_add_epi16(part[r], _mm512_maddubs_epi16(w, a));
                    }
                }
                // SAFETY: sc[32j..32j+32] of 256 i16.
                let scale = unsafe { _mm512_loadu_si512(t.sc.as_ptr().add(32 * j).cast()) };
                for r in 0..R {
                    sumi[r] = _mm512_add_epi32(sumi[r], _mm512_madd_epi16(part[r], scale));
                }
            }
            // SAFETY: mn[32j..32j+32] of 256 i16.
            let mins = unsafe { _mm512_loadu_si512(t.mn.as_ptr().add(32 * j).cast()) };
            for r in 0..R {
                let pair =
                    (i32::from(y[r].bsums[2 * j + 1]) << 16) | i32::from(y[r].bsums[2 * j] as u16);
                let bs = _mm512_set1_epi32(pair);
                summ[r] = if VNNI {
                    _mm512_dpwssd_epi32(summ[r], mins, bs)
                } else {
                    _mm512_add_epi32(summ[r], _mm512_madd_epi16(mins, bs))
                };
            }
        }
        // SAFETY: d and dmin are 16 f32 each.
        let (d, dmin) = unsafe {
            (
                _mm512_loadu_ps(t.d.as_ptr()),
                _mm512_loadu_ps(t.dmin.as_ptr()),
            )
        };
        for r in 0..R {
            let yd = _mm512_set1_ps(y[r].d);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi[r]), _mm512_mul_ps(d, yd), acc[r]);
            acc[r] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(summ[r]), _mm512_mul_ps(dmin, yd), acc[r]);
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

    #[test]
    fn q4k_tiled_matches_candles_dot_product() {
        if !available() {
            eprintln!("skipped: no AVX-512 BW on this CPU");
            return;
        }
        #[cfg(target_arch = "x86_64")]
        let vnni = std::arch::is_x86_feature_detected!("avx512vnni");
        #[cfg(not(target_arch = "x86_64"))]
        let vnni = false;
        let mut rng = SplitMix64(17);
        let mut uniform = || (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        for (blocks, n) in [(1usize, 16usize), (3, 48), (6, 32), (10, 16)] {
            let k = blocks * 256;
            // Magnitudes and offsets that change every 32 weights, so the 6-bit scales and
            // mins of the sub-blocks differ and use their whole range.
            let w: Vec<f32> = (0..n * k)
                .map(|i| (uniform() - 0.3) * (1.0 + (i / 32 % 7) as f32))
                .collect();
            let mut qw = vec![BlockQ4K::zeros(); n * blocks];
            BlockQ4K::from_float(&w, &mut qw);
            // 1..=40 activation rows: groups of 4 and each remainder, past the 32-row
            // crossover `qmm` uses; 128 for runs of K_CHUNK blocks (10 blocks: two runs).
            for m in (1..=40usize).chain([128]) {
                let x: Vec<f32> = (0..m * k).map(|_| uniform() * 4.0 - 2.0).collect();
                let mut qx = vec![BlockQ8K::zeros(); m * blocks];
                BlockQ8K::from_float(&x, &mut qx);
                // The VNNI and the BW inner loop, where the CPU has both.
                for v in [false, vnni] {
                    let mut got = vec![0f32; m * n];
                    matmul_tiled_with(v, &qw, (m, k, n), &x, &mut got).unwrap();
                    for i in 0..m {
                        for j in 0..n {
                            let want = BlockQ4K::vec_dot(
                                k,
                                &qw[j * blocks..(j + 1) * blocks],
                                &qx[i * blocks..(i + 1) * blocks],
                            );
                            // Exact integer sums per block on both sides; the f32 sums of
                            // block terms (and here the scale and min parts, kept apart)
                            // round in another order, by a few ulps of Σ|w·x| per block. A
                            // wrong nibble, scale or min is O(1) relative to that.
                            let (wr, xr) = (&w[j * k..(j + 1) * k], &x[i * k..(i + 1) * k]);
                            let mag: f32 = wr.iter().zip(xr).map(|(a, b)| (a * b).abs()).sum();
                            let g = got[i * n + j];
                            assert!(
                                (g - want).abs() <= 1e-6 * mag,
                                "vnni={v} {blocks} blocks, m={m}, out[{i}, {j}]: {g} vs candle {want}"
                            );
                        }
                    }
                }
            }
            // A row count that is not a multiple of the tile is refused, not misread.
            let mut dst = vec![0f32; 8];
            let x = vec![0f32; k];
            assert!(matmul_tiled(&qw[..8 * blocks], (1, k, 8), &x, &mut dst).is_err());
        }
    }
}
