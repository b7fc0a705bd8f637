//! Q8_0 x Q8_0 block dot products with AVX-512 VNNI: the Q8_0 inner loop of `qmm`.
//!
//! candle's x86 kernel for this pair is AVX2, one 32-byte block per step and one activation
//! row at a time, with sign juggling (`abs`/`sign`) before every `maddubs`; decode ran at
//! about half of llama.cpp's speed on the same file. Here:
//! - `vpdpbusd` (u8 x i8, four products summed into an i32 lane, no saturation) does the
//!   multiply-add in one instruction. Its first operand must be unsigned, so the
//!   *activations* are stored offset, `u = x + 128` (1..=255, since Q8_0 quantizes to
//!   ±127), and `Σu·w = Σx·w + 128·Σw`. The correction depends on the weights only: it is
//!   computed once per weight register (one more `vpdpbusd` against 128s) and seeds every
//!   activation row's sum, so R rows cost R `vpdpbusd`s and nothing else in integers. The
//!   other choice, weights offset by 128 on the fly, needs a correction per activation
//!   block and row; the abs/sign trick needs a masked negate per row (AVX-512 has no
//!   `vpsignb`).
//! - One 512-bit register holds two blocks, their 4-byte groups interleaved (lanes 2j from
//!   block A, 2j+1 from block B; one `vpermt2d` per weight pair, shared by all rows). The
//!   per-lane scale `d_w·d_x` then alternates between two values, which a 64-bit broadcast
//!   builds with no shuffle per row. The activations are quantized straight into that
//!   interleaved layout ([`Activations`]), so they load as whole registers.
//! - Each weight register serves up to 4 activation rows, and the weight row is prefetched
//!   `PREFETCH_BYTES` ahead (as in `q4k_avx512`).
//! - Prefill ([`dot_lanes`], [`Lanes`]): the row kernel spends a convert, a multiply and an
//!   FMA per 64 bytes and row on scales. With one activation row per 32-bit lane (16 rows per
//!   register, quantized into that layout) each weight dword is broadcast and a block's 8
//!   `vpdpbusd`s end in one lane per (weight row, activation row); the scale work is then
//!   per block, and 4 weight rows x 32 activation rows share every load. The `-128·Σw`
//!   correction is computed per weight block once per call. 2-3x the row kernel at 64-512
//!   rows (`bench model --kernels`).
//!
//! No AVX-512BW-only fallback: without VNNI, `maddubs` on `x + 128` saturates (255·127·2 >
//! i16::MAX), so it would need the sign juggling above, and every AVX-512 CPU since Cascade
//! Lake / Zen 4 has VNNI; older ones keep candle's AVX2 kernel.
//!
//! The activation quantizer reproduces candle's `BlockQ8_0::from_float` bit for bit (f32
//! `amax / 127`, scale stored through f16, values `round(x / d)` half away from zero), so
//! results differ from candle's `vec_dot` only in the order of the f32 sums.

use candle_core::quantized::k_quants::BlockQ8_0;
use rayon::prelude::*;

/// GGML's Q8_0 block as candle stores it: f16 scale, 32 signed bytes.
#[repr(C)]
struct RawQ8_0 {
    d: u16,
    qs: [i8; 32],
}

const _: () = assert!(std::mem::size_of::<RawQ8_0>() == std::mem::size_of::<BlockQ8_0>());
const _: () = assert!(std::mem::align_of::<RawQ8_0>() == std::mem::align_of::<BlockQ8_0>());

/// Whether this CPU runs [`dot_rows`] and [`Activations::quantize`] (std caches the answer).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("f16c")
            && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Rows of activations quantized to Q8_0 in the layout [`dot_rows`] reads: per row, block
/// pairs of 64 bytes (`x + 128`, 4-byte groups of the two blocks interleaved) and two f32
/// scales per pair. An odd last block is paired with a zero block (scale 0).
pub struct Activations {
    qs: Vec<u8>,
    d: Vec<f32>,
    rows: usize,
    pairs: usize,
}

/// Activation values per quantization work item: below this one thread does it all.
const QUANT_PAR_ELEMS: usize = 1 << 16;

impl Activations {
    /// Quantizes `x [rows, k]` (row-major, `k` a multiple of 32). Panics if the lengths do
    /// not fit or the CPU lacks the features of [`available`].
    pub fn quantize(x: &[f32], rows: usize, k: usize) -> Self {
        assert!(
            k.is_multiple_of(32) && x.len() == rows * k,
            "q8 quantize: {} values are not [{rows}, {k}] of whole blocks",
            x.len()
        );
        assert!(available(), "q8 quantize: AVX-512 VNNI not available");
        let pairs = (k / 32).div_ceil(2);
        let mut qs = vec![0u8; rows * pairs * 64];
        let mut d = vec![0f32; rows * pairs * 2];
        let per_row = |((q, d), x): ((&mut [u8], &mut [f32]), &[f32])| {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `available()` was checked above; the slices are one row each.
            #[allow(unsafe_code)]
            unsafe {
                quantize_row(x, q, d)
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = (q, d, x);
                unreachable!("available() is false off x86_64")
            }
        };
        if rows * k >= QUANT_PAR_ELEMS && rows > 1 {
            qs.par_chunks_mut(pairs * 64)
                .zip(d.par_chunks_mut(pairs * 2))
                .zip(x.par_chunks(k))
                .for_each(per_row);
        } else {
            qs.chunks_mut(pairs * 64)
                .zip(d.chunks_mut(pairs * 2))
                .zip(x.chunks(k))
                .for_each(per_row);
        }
        Self { qs, d, rows, pairs }
    }

    /// Number of rows quantized.
    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// Dword `2j` of a pair register from block A's dword `j`, `2j+1` from block B's (operand
/// indices 16.. name the second source of `vpermt2d`).
#[cfg(target_arch = "x86_64")]
const INTERLEAVE: [i32; 16] = [0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23];

/// One row: `x` (k values) into `qs` (pairs·64 bytes) and `d` (pairs·2 scales).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
fn quantize_row(x: &[f32], qs: &mut [u8], d: &mut [f32]) {
    use std::arch::x86_64::*;
    // SAFETY: INTERLEAVE is 16 i32s, one register.
    let idx = unsafe { _mm512_loadu_si512(INTERLEAVE.as_ptr().cast()) };
    let offset = _mm512_set1_epi8(-128);
    let block = |xs: &[f32]| quantize_block(xs);
    let mut blocks = x.chunks_exact(32);
    for (qp, dp) in qs.chunks_exact_mut(64).zip(d.chunks_exact_mut(2)) {
        let (da, va) = blocks.next().map_or((0.0, _mm256_setzero_si256()), block);
        let (db, vb) = blocks.next().map_or((0.0, _mm256_setzero_si256()), block);
        let v =
            _mm512_permutex2var_epi32(_mm512_castsi256_si512(va), idx, _mm512_castsi256_si512(vb));
        // SAFETY: qp is 64 bytes.
        unsafe { _mm512_storeu_si512(qp.as_mut_ptr().cast(), _mm512_xor_si512(v, offset)) };
        dp[0] = da;
        dp[1] = db;
    }
}

/// One block of 32 values: its scale (through f16, as candle stores it) and the values as
/// i8 in a 256-bit register, exactly as candle's `BlockQ8_0::from_float`.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
fn quantize_block(xs: &[f32]) -> (f32, std::arch::x86_64::__m256i) {
    use std::arch::x86_64::*;
    assert!(xs.len() == 32);
    let sign = _mm512_set1_epi32(i32::MIN);
    let halfv = _mm512_set1_ps(0.5);
    let one = _mm512_set1_ps(1.0);
    // SAFETY: xs is 32 values (asserted).
    let (a, b) = unsafe {
        (
            _mm512_loadu_ps(xs.as_ptr()),
            _mm512_loadu_ps(xs.as_ptr().add(16)),
        )
    };
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    // Exactly candle's arithmetic: f32 scale and reciprocal, the scale kept as f16.
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q = |v: __m512| -> __m128i {
        let t = _mm512_mul_ps(v, _mm512_set1_ps(id));
        // round() rounds halves away from zero; the hardware modes do not, so round
        // |t| down and add one where the (exact) remainder is at least a half.
        let at = _mm512_abs_ps(t);
        let fl = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(at);
        let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_sub_ps(at, fl), halfv);
        let r = _mm512_mask_add_ps(fl, up, fl, one);
        let r = _mm512_or_si512(
            _mm512_castps_si512(r),
            _mm512_and_si512(_mm512_castps_si512(t), sign),
        );
        _mm512_cvtsepi32_epi8(_mm512_cvttps_epi32(_mm512_castsi512_ps(r)))
    };
    let v = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(q(a)), q(b));
    (half::f16::from_f32(d).to_f32(), v)
}

/// `out[i] = Σ w·x_{rows.start + i}`: one row of Q8_0 weight blocks against activation rows
/// `rows` of `xs` (which must have `w.len()` blocks per row).
///
/// Each weight pair is loaded and prepared once for all rows (groups of up to 4). Panics if
/// the lengths do not fit or the CPU lacks the features of [`available`].
pub fn dot_rows(w: &[BlockQ8_0], xs: &Activations, rows: std::ops::Range<usize>, out: &mut [f32]) {
    assert!(
        w.len().div_ceil(2) == xs.pairs && rows.end <= xs.rows && rows.len() == out.len(),
        "q8 dot: {} weight blocks against rows {rows:?} of {} x {} pairs",
        w.len(),
        xs.rows,
        xs.pairs
    );
    assert!(available(), "q8 dot: AVX-512 VNNI not available");
    let w = as_raw(w);
    let (qb, db) = (xs.pairs * 64, xs.pairs * 2);
    for (g, o) in out.chunks_mut(4).enumerate() {
        let r0 = rows.start + 4 * g;
        let r1 = r0 + o.len();
        let (q, d) = (&xs.qs[r0 * qb..r1 * qb], &xs.d[r0 * db..r1 * db]);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `available()` was checked above; q and d hold exactly o.len() rows.
        #[allow(unsafe_code)]
        unsafe {
            match o.len() {
                4 => o.copy_from_slice(&dot_avx512::<4>(w, q, d)),
                3 => o.copy_from_slice(&dot_avx512::<3>(w, q, d)),
                2 => o.copy_from_slice(&dot_avx512::<2>(w, q, d)),
                _ => o.copy_from_slice(&dot_avx512::<1>(w, q, d)),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (q, d, o);
            unreachable!("available() is false off x86_64")
        }
    }
}

fn as_raw(w: &[BlockQ8_0]) -> &[RawQ8_0] {
    // SAFETY: `RawQ8_0` mirrors `BlockQ8_0` (`repr(C)`, f16 + [i8; 32]; size and alignment
    // asserted at compile time, values checked against candle in the tests below), and
    // every bit pattern of its fields is valid; the slice borrows `w`.
    #[allow(unsafe_code)]
    unsafe {
        std::slice::from_raw_parts(w.as_ptr().cast::<RawQ8_0>(), w.len())
    }
}

/// How far ahead of the pair being multiplied its weight row is prefetched: 40 blocks
/// (1360 bytes, about the distance `q4k_avx512` found best per byte of weights).
const PREFETCH_BYTES: usize = 40 * std::mem::size_of::<RawQ8_0>();

/// `R` activation rows (`q`, `d`: R rows of the [`Activations`] layout) against one weight row.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn dot_avx512<const R: usize>(w: &[RawQ8_0], q: &[u8], d: &[f32]) -> [f32; R] {
    use std::arch::x86_64::*;
    let pairs = w.len().div_ceil(2);
    debug_assert!(q.len() == R * pairs * 64 && d.len() == R * pairs * 2);
    // SAFETY: INTERLEAVE is 16 i32s, one register.
    let idx = unsafe { _mm512_loadu_si512(INTERLEAVE.as_ptr().cast()) };
    let c128 = _mm512_set1_epi8(-128);
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); R];
    for p in 0..pairs {
        let a = &w[2 * p];
        let b = w.get(2 * p + 1);
        // Past the row's end this reaches into the next row of the same run (rows are
        // contiguous), which is the next one read; a prefetch never faults.
        let pf = (a as *const RawQ8_0)
            .cast::<i8>()
            .wrapping_add(PREFETCH_BYTES);
        _mm_prefetch::<_MM_HINT_T0>(pf);
        _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(64));
        // SAFETY: qs is 32 bytes.
        let va = unsafe { _mm256_loadu_si256(a.qs.as_ptr().cast()) };
        let (vb, db) = match b {
            // SAFETY: as above.
            Some(b) => (unsafe { _mm256_loadu_si256(b.qs.as_ptr().cast()) }, b.d),
            None => (_mm256_setzero_si256(), 0),
        };
        let wv =
            _mm512_permutex2var_epi32(_mm512_castsi256_si512(va), idx, _mm512_castsi256_si512(vb));
        // -128·Σw per lane: the offset the activations carry, taken out up front. The
        // set1(-128) bytes read as u8 are 128.
        let neg = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, c128, wv));
        let dw = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(a.d) | (i32::from(db) << 16)));
        let dw = _mm512_castpd_ps(_mm512_broadcastsd_pd(_mm_castps_pd(dw)));
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: row r's pair p: 64 bytes at (r·pairs + p)·64 and two scales at
            // (r·pairs + p)·2, inside q and d by the lengths asserted by the caller.
            let (xv, dx) = unsafe {
                let i = r * pairs + p;
                (
                    _mm512_loadu_si512(q.as_ptr().add(64 * i).cast()),
                    _mm512_castpd_ps(_mm512_set1_pd(
                        d.as_ptr().add(2 * i).cast::<f64>().read_unaligned(),
                    )),
                )
            };
            let s = _mm512_mul_ps(dw, dx);
            *acc = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(neg, xv, wv)),
                s,
                *acc,
            );
        }
    }
    std::array::from_fn(|r| _mm512_reduce_add_ps(acc[r]))
}

/// Activation rows quantized for [`dot_lanes`] (prefill): rows in groups of 16, one row per
/// 32-bit lane. For group g, block b and 4-byte step j (0..8), 64 bytes hold bytes
/// `32b+4j..32b+4j+4` of the group's 16 rows (`x + 128`); then 16 f32 scales per (g, b).
/// Rows past the last are zero (scale 0).
pub struct Lanes {
    qs: Vec<u8>,
    d: Vec<f32>,
    rows: usize,
    blocks: usize,
}

impl Lanes {
    /// Quantizes `x [rows, k]` as [`Activations::quantize`] does (same values and scales).
    pub fn quantize(x: &[f32], rows: usize, k: usize) -> Self {
        assert!(
            k.is_multiple_of(32) && x.len() == rows * k,
            "q8 quantize: {} values are not [{rows}, {k}] of whole blocks",
            x.len()
        );
        assert!(available(), "q8 quantize: AVX-512 VNNI not available");
        let blocks = k / 32;
        let groups = rows.div_ceil(16);
        let mut qs = vec![0x80u8; groups * blocks * 512];
        let mut d = vec![0f32; groups * blocks * 16];
        qs.par_chunks_mut(blocks * 512)
            .zip(d.par_chunks_mut(blocks * 16))
            .enumerate()
            .for_each(|(g, (q, d))| {
                let r0 = 16 * g;
                for (l, x) in x[r0 * k..(r0 + 16).min(rows) * k]
                    .chunks_exact(k)
                    .enumerate()
                {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `available()` was checked above; q and d are one group.
                    #[allow(unsafe_code)]
                    unsafe {
                        quantize_lane(x, l, q, d)
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    {
                        let _ = (x, l, &q, &d);
                        unreachable!("available() is false off x86_64")
                    }
                }
            });
        Self {
            qs,
            d,
            rows,
            blocks,
        }
    }
}

/// One row `x` into lane `l` of a [`Lanes`] group (`q`, `d`).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
fn quantize_lane(x: &[f32], l: usize, q: &mut [u8], d: &mut [f32]) {
    use std::arch::x86_64::*;
    for (b, xs) in x.chunks_exact(32).enumerate() {
        let (db, v) = quantize_block(xs);
        let mut bytes = [0u8; 32];
        // SAFETY: bytes is 32 bytes.
        unsafe {
            _mm256_storeu_si256(
                bytes.as_mut_ptr().cast(),
                _mm256_xor_si256(v, _mm256_set1_epi8(-128)),
            )
        };
        for (j, c) in bytes.chunks_exact(4).enumerate() {
            q[(b * 8 + j) * 64 + 4 * l..][..4].copy_from_slice(c);
        }
        d[b * 16 + l] = db;
    }
}

/// `out[i][l] = Σ w_i·x_{16G+l}` for weight rows `w` (`NW` rows of `blocks` blocks, one
/// after another) and lane groups `g0..g0+NG` of `xs` (`out[i]` has 16·NG entries).
/// `dw` and `neg` hold each weight block's f32 scale and `-128·Σw` ([`weight_sums`]).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn lanes_avx512<const NW: usize, const NG: usize>(
    w: &[RawQ8_0],
    dw: &[f32],
    neg: &[i32],
    xs: &Lanes,
    g0: usize,
) -> [[f32; 32]; NW] {
    use std::arch::x86_64::*;
    let nb = xs.blocks;
    assert!(NG <= 2 && w.len() == NW * nb && dw.len() == w.len() && neg.len() == w.len());
    assert!((g0 + NG) * nb * 512 <= xs.qs.len());
    let mut accf = [[_mm512_setzero_ps(); NG]; NW];
    for b in 0..nb {
        let mut acc = [[_mm512_setzero_si512(); NG]; NW];
        for (i, a) in acc.iter_mut().enumerate() {
            *a = [_mm512_set1_epi32(neg[i * nb + b]); NG];
        }
        for j in 0..8 {
            // SAFETY: group g0+h, block b, step j: 64 bytes inside qs (asserted above).
            let x: [__m512i; NG] = std::array::from_fn(|h| unsafe {
                _mm512_loadu_si512(
                    xs.qs
                        .as_ptr()
                        .add((((g0 + h) * nb + b) * 8 + j) * 64)
                        .cast(),
                )
            });
            for (i, a) in acc.iter_mut().enumerate() {
                // SAFETY: bytes 4j..4j+4 of a 32-byte block.
                let wd = unsafe {
                    w[i * nb + b]
                        .qs
                        .as_ptr()
                        .add(4 * j)
                        .cast::<i32>()
                        .read_unaligned()
                };
                let wd = _mm512_set1_epi32(wd);
                for h in 0..NG {
                    a[h] = _mm512_dpbusd_epi32(a[h], x[h], wd);
                }
            }
        }
        for (i, (a, f)) in acc.iter().zip(accf.iter_mut()).enumerate() {
            let dwv = _mm512_set1_ps(dw[i * nb + b]);
            for h in 0..NG {
                // SAFETY: 16 scales of group g0+h, block b, inside d (same bound as qs).
                let dx = unsafe { _mm512_loadu_ps(xs.d.as_ptr().add(((g0 + h) * nb + b) * 16)) };
                f[h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[h]), _mm512_mul_ps(dwv, dx), f[h]);
            }
        }
    }
    std::array::from_fn(|i| {
        let mut o = [0f32; 32];
        for (h, v) in accf[i].iter().enumerate() {
            // SAFETY: o has 32 entries, h < NG <= 2.
            unsafe { _mm512_storeu_ps(o.as_mut_ptr().add(16 * h), *v) };
        }
        o
    })
}

/// Each block's scale as f32 and `-128·Σw` (the correction for the activations' offset).
fn weight_sums(w: &[RawQ8_0], dw: &mut Vec<f32>, neg: &mut Vec<i32>) {
    dw.clear();
    neg.clear();
    for b in w {
        dw.push(half::f16::from_bits(b.d).to_f32());
        neg.push(-128 * b.qs.iter().map(|&v| i32::from(v)).sum::<i32>());
    }
}

/// `out_t[i·m + r] = w_i · x_r` for all rows of `xs` (`m` of them) and a run of weight
/// rows `w` (whole rows of `xs.blocks` blocks). Panics if the lengths do not fit or the CPU
/// lacks the features of [`available`].
pub fn dot_lanes(w: &[BlockQ8_0], xs: &Lanes, out_t: &mut [f32]) {
    let (nb, m) = (xs.blocks, xs.rows);
    assert!(
        nb > 0 && w.len().is_multiple_of(nb) && out_t.len() == w.len() / nb * m,
        "q8 lanes: {} weight blocks, {} outputs for {m} rows of {nb} blocks",
        w.len(),
        out_t.len()
    );
    assert!(available(), "q8 lanes: AVX-512 VNNI not available");
    let w = as_raw(w);
    let (mut dw, mut neg) = (Vec::new(), Vec::new());
    weight_sums(w, &mut dw, &mut neg);
    let groups = m.div_ceil(16);
    // Two lane groups (32 rows) per pass: their activations stay in L2 while every weight
    // row of the run goes by.
    for g0 in (0..groups).step_by(2) {
        let ng = (groups - g0).min(2);
        for (q, (o, wq)) in out_t.chunks_mut(4 * m).zip(w.chunks(4 * nb)).enumerate() {
            let nw = wq.len() / nb;
            let (dq, nq) = (&dw[4 * q * nb..][..nw * nb], &neg[4 * q * nb..][..nw * nb]);
            let mut put = |res: &[[f32; 32]]| {
                let (r0, r1) = (16 * g0, (16 * (g0 + ng)).min(m));
                for (i, v) in res.iter().enumerate() {
                    o[i * m + r0..i * m + r1].copy_from_slice(&v[..r1 - r0]);
                }
            };
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `available()` was checked above.
            #[allow(unsafe_code)]
            unsafe {
                match (nw, ng) {
                    (4, 2) => put(&lanes_avx512::<4, 2>(wq, dq, nq, xs, g0)),
                    (4, _) => put(&lanes_avx512::<4, 1>(wq, dq, nq, xs, g0)),
                    (3, 2) => put(&lanes_avx512::<3, 2>(wq, dq, nq, xs, g0)),
                    (3, _) => put(&lanes_avx512::<3, 1>(wq, dq, nq, xs, g0)),
                    (2, 2) => put(&lanes_avx512::<2, 2>(wq, dq, nq, xs, g0)),
                    (2, _) => put(&lanes_avx512::<2, 1>(wq, dq, nq, xs, g0)),
                    (_, 2) => put(&lanes_avx512::<1, 2>(wq, dq, nq, xs, g0)),
                    _ => put(&lanes_avx512::<1, 1>(wq, dq, nq, xs, g0)),
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = (&mut put, dq, nq);
                unreachable!("available() is false off x86_64")
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use candle_core::quantized::k_quants::GgmlType;

    fn values(rng: &mut SplitMix64, n: usize, spread: f32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let u = (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
                // Blocks of very different magnitudes, so scales differ from block to block.
                (u - 0.45) * spread * (1.0 + (i / 32 % 5) as f32)
            })
            .collect()
    }

    /// The quantizer writes candle's blocks (same scales, same values) in the pair layout.
    #[test]
    fn q8_quantize_matches_candle() {
        if !available() {
            eprintln!("skipped: no AVX-512 VNNI on this CPU");
            return;
        }
        let mut rng = SplitMix64(7);
        for blocks in [1usize, 2, 3, 8, 11] {
            let k = blocks * 32;
            let rows = 3;
            let mut x = values(&mut rng, rows * k, 3.0);
            // Exact halves after scaling (amax 127 makes the scale 1) and an all-zero block.
            x[..32].copy_from_slice(&std::array::from_fn::<f32, 32, _>(|i| {
                if i == 0 {
                    127.0
                } else {
                    (i as f32 - 16.0) + 0.5
                }
            }));
            if blocks > 1 {
                x[32..64].fill(0.0);
            }
            let a = Activations::quantize(&x, rows, k);
            let mut want = vec![BlockQ8_0::zeros(); rows * blocks];
            BlockQ8_0::from_float(&x, &mut want);
            let want = as_raw(&want);
            for r in 0..rows {
                for b in 0..blocks {
                    let c = &want[r * blocks + b];
                    let (p, h) = (b / 2, b % 2);
                    assert_eq!(
                        a.d[r * a.pairs * 2 + 2 * p + h],
                        half::f16::from_bits(c.d).to_f32(),
                        "scale {r}/{b}"
                    );
                    let pair = &a.qs[(r * a.pairs + p) * 64..][..64];
                    for (j, &v) in c.qs.iter().enumerate() {
                        let got = pair[8 * (j / 4) + 4 * h + j % 4] ^ 0x80;
                        assert_eq!(got as i8, v, "row {r} block {b} value {j}");
                    }
                }
            }
        }
    }

    #[test]
    fn q8_dot_matches_candles_dot_product() {
        if !available() {
            eprintln!("skipped: no AVX-512 VNNI on this CPU");
            return;
        }
        let mut rng = SplitMix64(5);
        // Odd block counts exercise the zero-padded last pair.
        for blocks in [1usize, 2, 3, 8, 41, 80] {
            let k = blocks * 32;
            let w = values(&mut rng, k, 1.0);
            let mut qw = vec![BlockQ8_0::zeros(); blocks];
            BlockQ8_0::from_float(&w, &mut qw);
            // 1..=6 activation rows: the 4-row group, its remainders, and a second group.
            for rows in 1..=6usize {
                let x = values(&mut rng, rows * k, 4.0);
                let mut qx = vec![BlockQ8_0::zeros(); rows * blocks];
                BlockQ8_0::from_float(&x, &mut qx);
                let a = Activations::quantize(&x, rows, k);
                let mut got = vec![0f32; rows];
                dot_rows(&qw, &a, 0..rows, &mut got);
                // And a sub-range starting past the first row, as qmm's tiles ask.
                let mut tail = vec![0f32; rows - 1];
                dot_rows(&qw, &a, 1..rows, &mut tail);
                for (r, g) in got.iter().enumerate() {
                    let want = BlockQ8_0::vec_dot(k, &qw, &qx[r * blocks..(r + 1) * blocks]);
                    // Same quantized values and scale products; each block's integer sum is
                    // exact in both (|Σ| ≤ 32·127·127 < 2^24, so also exact as f32 lanes).
                    // Only the order of the f32 sums of block terms differs, whose rounding
                    // scales with Σ|w·x| (terms cancel), not with the result; a wrong value,
                    // scale or offset correction is O(1) of it.
                    let xr = &x[r * k..(r + 1) * k];
                    let mag: f32 = w.iter().zip(xr).map(|(a, b)| (a * b).abs()).sum();
                    assert!(
                        (g - want).abs() <= 1e-6 * mag,
                        "{blocks} blocks, row {r} of {rows}: {g} vs candle {want}"
                    );
                    if r > 0 {
                        assert_eq!(tail[r - 1], *g, "rows 1.. {blocks} blocks row {r}");
                    }
                }
            }
        }
    }

    #[test]
    fn q8_lanes_match_candles_dot_product() {
        if !available() {
            eprintln!("skipped: no AVX-512 VNNI on this CPU");
            return;
        }
        let mut rng = SplitMix64(9);
        for blocks in [1usize, 3, 8] {
            let k = blocks * 32;
            // 1..=5 weight rows: the 4-row quad, its remainders and a second quad.
            let nw = 5;
            let w = values(&mut rng, nw * k, 1.0);
            let mut qw = vec![BlockQ8_0::zeros(); nw * blocks];
            BlockQ8_0::from_float(&w, &mut qw);
            // Partial lane groups, one and two groups per pass, and a third group.
            for rows in [1usize, 2, 5, 6, 16, 17, 33, 40] {
                let x = values(&mut rng, rows * k, 4.0);
                let mut qx = vec![BlockQ8_0::zeros(); rows * blocks];
                BlockQ8_0::from_float(&x, &mut qx);
                let a = Lanes::quantize(&x, rows, k);
                for wr in 1..=nw {
                    let mut got = vec![f32::NAN; wr * rows];
                    dot_lanes(&qw[..wr * blocks], &a, &mut got);
                    for i in 0..wr {
                        for r in 0..rows {
                            let want = BlockQ8_0::vec_dot(
                                k,
                                &qw[i * blocks..(i + 1) * blocks],
                                &qx[r * blocks..(r + 1) * blocks],
                            );
                            let g = got[i * rows + r];
                            // As for `dot_rows`: exact integer block sums, f32 sums of block
                            // terms in another order.
                            let mag: f32 = w[i * k..(i + 1) * k]
                                .iter()
                                .zip(&x[r * k..(r + 1) * k])
                                .map(|(a, b)| (a * b).abs())
                                .sum();
                            assert!(
                                (g - want).abs() <= 1e-6 * mag,
                                "{blocks} blocks, weight row {i} of {wr}, row {r} of {rows}: {g} vs candle {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
