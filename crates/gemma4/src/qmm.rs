//! CPU matmul over block-quantized weights that reads the compact blocks where they are.
//!
//! Why not `QMatMul::forward` on CPU: candle 0.11 repacks every Q4K (and, on VNNI CPUs,
//! Q8_0) matrix on first use into tiles kept next to the compact copy (`repack.rs`,
//! `PackedCache`), plus on AMX CPUs a third copy for prefill. Resident memory then grows to
//! about twice the weights and decode streams the expanded tiles. There is no switch to turn
//! that off, so percept calls the pieces it needs directly:
//! - few activation rows (decode): the rows are quantized once (Q8K / Q8_0) and each weight
//!   row is dotted with all of them over its compact blocks, runs of weight rows split
//!   across rayon; Q4K uses percept's AVX-512 kernel with prefetch ([`super::q4k_avx512`])
//!   where the CPU has it (Q6K and Q5K likewise, [`super::q6k_avx512`],
//!   [`super::q5k_avx512`]), Q8_0 percept's AVX-512 VNNI kernel ([`super::q8_avx512`]),
//!   otherwise candle's runtime-detected AVX2 / generic dot products;
//! - Q8_0 on VNNI CPUs from [`Q8_LANES_MIN_ROWS`] rows on: the same kernel family with one
//!   activation row per 32-bit lane (`q8_lanes`), 2-3x the row kernel at 64-512 rows;
//! - many rows (prefill): on CPUs with AMX, Q4K goes through candle's AMX tiles packed for
//!   this one call and dropped after it ([`packed_once`]): the packing (about 2.2 bytes per
//!   compact byte) costs less than the multiplication it speeds up once there are
//!   [`PACKED_MIN_ROWS`] rows, and nothing stays resident. Below that (or without AMX), Q4K
//!   and Q6K with AVX-512 unpack 16 weight rows at a time into per-call tiles
//!   (`q4k_avx512::matmul_tiled`, `q6k_avx512::matmul_tiled`), and Q5K takes the decode
//!   path (activation rows tiled); otherwise weight rows are dequantized a tile at a time into a small f32
//!   buffer per worker and multiplied with `gemm`, so no whole-matrix f32 copy exists.
//!
//! Block layout is candle's (= GGML's): each weight row is `k / block_size` consecutive
//! blocks. Other block types are not handled here (the caller falls back to `QMatMul`).

use candle_core::quantized::k_quants::{
    BlockQ4K, BlockQ4_0, BlockQ5K, BlockQ6K, BlockQ8_0, GgmlType,
};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Result as CResult, Shape};
use rayon::prelude::*;

/// From this many activation rows on, dequantize-and-GEMM beats one dot product per
/// (row, weight row): the cost of unpacking a weight block is then shared by enough rows.
pub const GEMM_MIN_ROWS: usize = 16;

/// From this many activation rows on, Q4K goes through candle's AMX tiles packed per call
/// (where the CPU has AMX): see [`packed_once`].
/// Below it the packing (scalar, in candle) costs more than the AMX multiplication saves:
/// a 10240x2560 matrix packs in ~68 ms, and at 512 rows the call takes 157 ms against 199
/// ms for the AVX-512 kernel (`bench model --kernels --prompt 512`); at 64 rows it loses.
pub const PACKED_MIN_ROWS: usize = 384;

/// f32 elements of one dequantized weight tile per worker (1 MiB): big enough for an
/// efficient GEMM, small enough to stay in L2 and to keep memory bounded.
const TILE_ELEMS: usize = 1 << 18;

/// Block types this module multiplies and quantizes.
pub fn supported_dtype(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4K | GgmlDType::Q8_0)
}

/// Block types [`matmul`] multiplies: the two percept quantizes to, and those GGUF files
/// bring (Q4_0, Q5_K, Q6_K; a Q4_K_M file mixes Q4_K, Q5_K and Q6_K).
pub fn multiplied_dtype(dtype: GgmlDType) -> bool {
    matches!(
        dtype,
        GgmlDType::Q4K | GgmlDType::Q8_0 | GgmlDType::Q4_0 | GgmlDType::Q5K | GgmlDType::Q6K
    )
}

/// Whether [`matmul`] handles this weight (CPU storage, a [`multiplied_dtype`], 2D).
pub fn supports(q: &QTensor) -> bool {
    matches!(q.device(), Device::Cpu) && multiplied_dtype(q.dtype()) && q.shape().rank() == 2
}

/// `dst[m, n] = lhs[m, k] · Wᵀ` for a quantized `W [n, k]` (see [`supports`]).
pub fn matmul(q: &QTensor, lhs: &[f32], m: usize, dst: &mut [f32]) -> CResult<()> {
    let (n, k) = q.shape().dims2()?;
    if lhs.len() != m * k || dst.len() != m * n {
        candle_core::bail!(
            "qmm: lhs {} / dst {} do not fit m={m} k={k} n={n}",
            lhs.len(),
            dst.len()
        );
    }
    let bytes = q.data()?;
    match q.dtype() {
        // Integer kernels at every row count (activations through 8 bits as in every decode
        // step): AMX tiles packed per call from PACKED_MIN_ROWS where the CPU has them...
        GgmlDType::Q4K if m >= PACKED_MIN_ROWS && n.is_multiple_of(16) && amx() => {
            packed_once(&bytes, (m, k, n), lhs, dst)
        }
        // ...otherwise, from TILED_MIN_ROWS, tiles of 16 weight rows unpacked per call (1.9-3.5x
        // the block dot product at 128 rows, on par with candle's resident repacked copy at
        // the 12B shapes; figures in the commits that added them), and below that the block
        // dot product over the compact rows.
        GgmlDType::Q4K
            if m >= super::q4k_avx512::TILED_MIN_ROWS
                && n.is_multiple_of(16)
                && super::q4k_avx512::available() =>
        {
            super::q4k_avx512::matmul_tiled(cast_blocks(&bytes)?, (m, k, n), lhs, dst)
        }
        GgmlDType::Q4K => {
            let plan: (RowDot<BlockQ4K>, usize) = if int_prefill() {
                (super::q4k_avx512::dot_rows, usize::MAX)
            } else {
                (each_row, GEMM_MIN_ROWS)
            };
            run(cast_blocks(&bytes)?, (m, k, n), lhs, dst, plan)
        }
        // Both VNNI kernels beat dequantize + f32 GEMM at every row count measured (at 512
        // rows lanes ran 164/122/32 ms against 784/1233/162 for the GEMM, loaded machine).
        GgmlDType::Q8_0 if super::q8_avx512::available() => {
            let blocks: &[BlockQ8_0] = cast_blocks(&bytes)?;
            check_blocks(blocks, k, n)?;
            if m >= Q8_LANES_MIN_ROWS {
                q8_lanes(blocks, (m, k, n), lhs, dst);
            } else {
                q8_rows(blocks, (m, k, n), lhs, dst);
            }
            Ok(())
        }
        GgmlDType::Q8_0 => run(
            cast_blocks(&bytes)?,
            (m, k, n),
            lhs,
            dst,
            (each_row::<BlockQ8_0>, GEMM_MIN_ROWS),
        ),
        GgmlDType::Q4_0 => run(
            cast_blocks(&bytes)?,
            (m, k, n),
            lhs,
            dst,
            (each_row::<BlockQ4_0>, GEMM_MIN_ROWS),
        ),
        GgmlDType::Q5K => {
            let plan: (RowDot<BlockQ5K>, usize) = if super::q5k_avx512::available() {
                (super::q5k_avx512::dot_rows, usize::MAX)
            } else {
                (each_row, GEMM_MIN_ROWS)
            };
            run(cast_blocks(&bytes)?, (m, k, n), lhs, dst, plan)
        }
        // Q6_K holds the tied token table and part of ffn_down / attn_v in Q4_K_M files.
        // With AVX-512: unpacked per call into tiles of 16 weight rows for many rows, the
        // block dot product for few (`bench model --kernels`, 12B MLP shapes, in the commit).
        GgmlDType::Q6K
            if m >= super::q6k_avx512::TILED_MIN_ROWS
                && n.is_multiple_of(16)
                && super::q6k_avx512::available() =>
        {
            super::q6k_avx512::matmul_tiled(cast_blocks(&bytes)?, (m, k, n), lhs, dst)
        }
        GgmlDType::Q6K => {
            let plan: (RowDot<BlockQ6K>, usize) = if super::q6k_avx512::available() {
                (super::q6k_avx512::dot_rows, usize::MAX)
            } else {
                (each_row, GEMM_MIN_ROWS)
            };
            run(cast_blocks(&bytes)?, (m, k, n), lhs, dst, plan)
        }
        other => candle_core::bail!("qmm: unsupported block type {other:?}"),
    }
}

/// Whether the CPU has AMX int8 tiles, which candle's Q4K prefill path uses (Linux, where
/// the kernel reports them and candle asks for the tile state).
pub fn amx() -> bool {
    static AMX: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AMX.get_or_init(|| {
        cfg!(all(target_arch = "x86_64", target_os = "linux"))
            && std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|s| {
                s.lines().find(|l| l.starts_with("flags")).is_some_and(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.contains(&"amx_int8") && f.contains(&"amx_tile")
                })
            })
    })
}

/// Q4K prefill through candle's AMX kernel on a copy of the blocks that lives for this call
/// only: candle keeps its packed tiles next to the storage it multiplies, so multiplying the
/// resident weights would keep a second, 2.2x larger copy of every matrix for good.
fn packed_once(
    bytes: &[u8],
    (m, k, n): (usize, usize, usize),
    lhs: &[f32],
    dst: &mut [f32],
) -> CResult<()> {
    use candle_core::{Module, Tensor};
    let t = QTensor::new(
        QStorage::from_data(
            std::borrow::Cow::Borrowed(bytes),
            &Device::Cpu,
            GgmlDType::Q4K,
        )?,
        (n, k),
    )?;
    let x = Tensor::from_slice(lhs, (m, k), &Device::Cpu)?;
    let y = candle_core::quantized::QMatMul::QTensor(std::sync::Arc::new(t)).forward(&x)?;
    dst.copy_from_slice(&y.flatten_all()?.to_vec1::<f32>()?);
    Ok(())
}

/// One row of weight blocks against `out.len()` rows of quantized activations (stored one
/// after another): `out[r] = w · x_r`.
type RowDot<T> = fn(&[T], &[<T as GgmlType>::VecDotType], &mut [f32]);

/// [`RowDot`] with candle's block dot product, one activation row at a time.
fn each_row<T: GgmlType>(w: &[T], xs: &[T::VecDotType], out: &mut [f32]) {
    for (o, x) in out.iter_mut().zip(xs.chunks_exact(w.len())) {
        *o = T::vec_dot(w.len() * T::BLCK_SIZE, w, x);
    }
}

/// Whether Q4K multiplies with the integer kernel at every row count (see [`matmul`]).
pub fn int_prefill() -> bool {
    super::q4k_avx512::available()
}

/// `dot` for fewer than `gemm_rows` activation rows, dequantize + GEMM from there on.
fn run<T: GgmlType>(
    blocks: &[T],
    (m, k, n): (usize, usize, usize),
    lhs: &[f32],
    dst: &mut [f32],
    (dot, gemm_rows): (RowDot<T>, usize),
) -> CResult<()> {
    if !k.is_multiple_of(T::BLCK_SIZE) || blocks.len() != n * (k / T::BLCK_SIZE) {
        candle_core::bail!(
            "qmm: {} blocks do not make a [{n}, {k}] {:?} matrix",
            blocks.len(),
            T::DTYPE
        );
    }
    if m < gemm_rows {
        dot_rows(blocks, (m, k, n), lhs, dst, dot);
    } else {
        dequant_gemm(blocks, (m, k, n), lhs, dst);
    }
    Ok(())
}

/// Activation rows per tile of [`dot_rows`].
const ACT_TILE: usize = 32;

/// From this many activation rows on, Q8_0 multiplies with `q8_lanes` (where the CPU has
/// VNNI). Loaded 2-core EPYC, `bench model --kernels`, E4B shapes: at 16 rows the row kernel
/// took 12.2/12.2/1.9 ms against 15.1/17.2/2.4; at 64 rows lanes took 26/17/3.4 ms against
/// 56/46/9.8, at 512 rows 164/122/32 against 439/378/81.
pub const Q8_LANES_MIN_ROWS: usize = 32;

/// Prefill with [`super::q8_avx512::dot_lanes`]: activation rows one per 32-bit lane, each
/// weight dword broadcast to 16 rows, so the scale work is per block and 16 rows, not per 64
/// bytes and row. Runs of weight rows over rayon, as [`dot_rows`].
fn q8_lanes(blocks: &[BlockQ8_0], (m, k, n): (usize, usize, usize), lhs: &[f32], dst: &mut [f32]) {
    let bpr = k / BlockQ8_0::BLCK_SIZE;
    let xs = super::q8_avx512::Lanes::quantize(lhs, m, k);
    let run_rows = (n / (8 * rayon::current_num_threads())).clamp(16, 1024) / 4 * 4;
    let mut dst_t = vec![0f32; n * m];
    dst_t
        .par_chunks_mut(run_rows * m)
        .zip(blocks.par_chunks(run_rows * bpr))
        .for_each(|(out, wb)| super::q8_avx512::dot_lanes(wb, &xs, out));
    transpose_into(&dst_t, n, m, dst);
}

/// Errors unless `blocks` is an `[n, k]` matrix of `T` blocks.
fn check_blocks<T: GgmlType>(blocks: &[T], k: usize, n: usize) -> CResult<()> {
    if !k.is_multiple_of(T::BLCK_SIZE) || blocks.len() != n * (k / T::BLCK_SIZE) {
        candle_core::bail!(
            "qmm: {} blocks do not make a [{n}, {k}] {:?} matrix",
            blocks.len(),
            T::DTYPE
        );
    }
    Ok(())
}

/// [`dot_rows`] for Q8_0 with the AVX-512 VNNI kernel ([`super::q8_avx512`]), whose
/// activations have their own layout: same split of weight rows over rayon, same tiles of
/// activation rows.
fn q8_rows(blocks: &[BlockQ8_0], (m, k, n): (usize, usize, usize), lhs: &[f32], dst: &mut [f32]) {
    let bpr = k / BlockQ8_0::BLCK_SIZE;
    let xs = super::q8_avx512::Activations::quantize(lhs, m, k);
    let run_rows = (n / (8 * rayon::current_num_threads())).clamp(16, 1024);
    let mut dst_t = if m == 1 {
        Vec::new()
    } else {
        vec![0f32; n * m]
    };
    let out: &mut [f32] = if m == 1 { dst } else { &mut dst_t };
    out.par_chunks_mut(run_rows * m)
        .zip(blocks.par_chunks(run_rows * bpr))
        .for_each(|(out, wb)| {
            for t0 in (0..m).step_by(ACT_TILE) {
                let t1 = (t0 + ACT_TILE).min(m);
                for (o, w) in out.chunks_exact_mut(m).zip(wb.chunks_exact(bpr)) {
                    super::q8_avx512::dot_rows(w, &xs, t0..t1, &mut o[t0..t1]);
                }
            }
        });
    if m > 1 {
        transpose_into(&dst_t, n, m, dst);
    }
}

/// Decode path: the activation rows are quantized once (Q8K / Q8_0) and every output is one
/// block dot product over the compact weight row. Work is split over rayon by runs of weight
/// rows, each run computing all `m` outputs of its rows (`dstᵀ`), so every weight byte is
/// read once per call. rayon rather than candle's own pool: candle's workers are pinned to
/// the cores while the calling thread spins on its barrier, so on a machine with as many
/// cores as workers the caller steals a worker's core on every call (q4k decode ran at
/// 14-42% of the bandwidth bound).
fn dot_rows<T: GgmlType>(
    blocks: &[T],
    (m, k, n): (usize, usize, usize),
    lhs: &[f32],
    dst: &mut [f32],
    dot: RowDot<T>,
) {
    let bpr = k / T::BLCK_SIZE;
    let mut qx = vec![T::VecDotType::zeros(); m * bpr];
    for (row, q) in lhs.chunks_exact(k).zip(qx.chunks_mut(bpr)) {
        T::VecDotType::from_float(row, q);
    }
    // About 8 runs per worker keeps them balanced; 16 rows keep a run worth scheduling.
    let run_rows = (n / (8 * rayon::current_num_threads())).clamp(16, 1024);
    let mut dst_t = if m == 1 {
        Vec::new()
    } else {
        vec![0f32; n * m]
    };
    let out: &mut [f32] = if m == 1 { dst } else { &mut dst_t };
    out.par_chunks_mut(run_rows * m)
        .zip(blocks.par_chunks(run_rows * bpr))
        .for_each(|(out, wb)| {
            // Activation rows in tiles that stay in L2 next to the run of weight rows
            // (32 rows of k=10240 are 374 KB of Q8K); the run is re-read from L2 per tile.
            for t0 in (0..m).step_by(ACT_TILE) {
                let t1 = (t0 + ACT_TILE).min(m);
                let xs = &qx[t0 * bpr..t1 * bpr];
                for (o, w) in out.chunks_exact_mut(m).zip(wb.chunks_exact(bpr)) {
                    dot(w, xs, &mut o[t0..t1]);
                }
            }
        });
    if m > 1 {
        transpose_into(&dst_t, n, m, dst);
    }
}

/// `dst[i, j] = src[j, i]` for `src [n, m]`, in cache-sized squares.
fn transpose_into(src: &[f32], n: usize, m: usize, dst: &mut [f32]) {
    const B: usize = 64;
    for j0 in (0..n).step_by(B) {
        for i0 in (0..m).step_by(B) {
            for j in j0..(j0 + B).min(n) {
                for i in i0..(i0 + B).min(m) {
                    dst[i * n + j] = src[j * m + i];
                }
            }
        }
    }
}

/// Prefill path: workers take tiles of weight rows, dequantize them into their own f32
/// buffer and compute the matching columns of the output, transposed (`dstᵀ[n, m]`) so that
/// each tile writes one contiguous slice; one transpose at the end gives `dst[m, n]`.
fn dequant_gemm<T: GgmlType>(
    blocks: &[T],
    (m, k, n): (usize, usize, usize),
    lhs: &[f32],
    dst: &mut [f32],
) {
    let blocks_per_row = k / T::BLCK_SIZE;
    let tile_rows = (TILE_ELEMS / k).clamp(8, 256);
    let mut dst_t = vec![0f32; n * m];
    dst_t
        .par_chunks_mut(tile_rows * m)
        .zip(blocks.par_chunks(tile_rows * blocks_per_row))
        .for_each_init(Vec::new, |tile: &mut Vec<f32>, (out, wb)| {
            let rows = wb.len() / blocks_per_row;
            tile.resize(rows * k, 0.0);
            T::to_float(wb, &mut tile[..rows * k]);
            gemm_tile(rows, m, k, &tile[..rows * k], lhs, out);
        });
    transpose_into(&dst_t, n, m, dst);
}

/// `out[rows, m] = tile[rows, k] · lhs[m, k]ᵀ`, single-threaded (the caller parallelises
/// over tiles).
fn gemm_tile(rows: usize, m: usize, k: usize, tile: &[f32], lhs: &[f32], out: &mut [f32]) {
    debug_assert!(tile.len() == rows * k && lhs.len() == m * k && out.len() == rows * m);
    // SAFETY: the three pointers come from slices whose lengths were checked above against
    // the dimensions and strides passed (row-major tile and out, lhs read transposed), and
    // `out` is exclusively borrowed, so gemm reads and writes only inside them.
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            rows,
            m,
            k,
            out.as_mut_ptr(),
            1,
            m as isize,
            false,
            tile.as_ptr(),
            1,
            k as isize,
            lhs.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Reinterprets candle's CPU block storage as blocks (it is a `Vec<T>` underneath).
fn cast_blocks<T: GgmlType>(bytes: &[u8]) -> CResult<&[T]> {
    let size = std::mem::size_of::<T>();
    if !bytes.len().is_multiple_of(size)
        || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
    {
        candle_core::bail!(
            "qmm: block storage is not a whole, aligned {:?} array",
            T::DTYPE
        );
    }
    // SAFETY: length and alignment were checked; the block types are `repr(C)` structs of
    // f16/f32/integers, for which every bit pattern is valid, and the slice borrows `bytes`.
    #[allow(unsafe_code)]
    Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size) })
}

/// Quantizes an `[rows, k]` row-major f32 matrix, rows split across rayon workers (the
/// result is identical to `QTensor::quantize`: blocks never straddle rows).
pub fn quantize_par(src: &[f32], rows: usize, k: usize, dtype: GgmlDType) -> CResult<QTensor> {
    match dtype {
        GgmlDType::Q4K => quantize_blocks::<BlockQ4K>(src, rows, k),
        GgmlDType::Q5K => quantize_blocks::<BlockQ5K>(src, rows, k),
        GgmlDType::Q6K => quantize_blocks::<BlockQ6K>(src, rows, k),
        GgmlDType::Q8_0 => quantize_blocks::<BlockQ8_0>(src, rows, k),
        other => candle_core::bail!("quantize_par: unsupported block type {other:?}"),
    }
}

fn quantize_blocks<T: GgmlType + 'static>(src: &[f32], rows: usize, k: usize) -> CResult<QTensor> {
    if src.len() != rows * k || !k.is_multiple_of(T::BLCK_SIZE) {
        candle_core::bail!(
            "quantize_par: {} values are not a [{rows}, {k}] matrix of whole {:?} blocks",
            src.len(),
            T::DTYPE
        );
    }
    let bpr = k / T::BLCK_SIZE;
    let mut blocks: Vec<T> = vec![T::zeros(); rows * bpr];
    // 64 rows per work item: coarse enough to keep scheduling cheap.
    const ROWS: usize = 64;
    blocks
        .par_chunks_mut(ROWS * bpr)
        .zip(src.par_chunks(ROWS * k))
        .for_each(|(dst, xs)| T::from_float(xs, dst));
    QTensor::new(QStorage::Cpu(Box::new(blocks)), Shape::from((rows, k)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use candle_core::{Module, Tensor};

    fn random(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0)
            .collect()
    }

    /// Reference: dequantize the whole matrix, f32 matmul.
    fn reference(q: &QTensor, x: &[f32], m: usize) -> Vec<f32> {
        let (_, k) = q.shape().dims2().unwrap();
        let w = q.dequantize(&Device::Cpu).unwrap();
        let x = Tensor::from_slice(x, (m, k), &Device::Cpu).unwrap();
        x.matmul(&w.t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn qmm_matches_dequantized_matmul() {
        let mut rng = SplitMix64(11);
        for dtype in [
            GgmlDType::Q4K,
            GgmlDType::Q8_0,
            GgmlDType::Q6K,
            GgmlDType::Q5K,
        ] {
            // (48, 512): rows a multiple of 16, so Q4K at PACKED_MIN_ROWS takes the AMX path where
            // the CPU has it.
            for (n, k) in [(40, 256), (24, 512), (300, 768), (48, 512)] {
                let w = random(&mut rng, n * k);
                let q = quantize_par(&w, n, k, dtype).unwrap();
                // Same blocks as candle's own quantizer.
                let t = Tensor::from_slice(&w, (n, k), &Device::Cpu).unwrap();
                let cq = QTensor::quantize(&t, dtype).unwrap();
                assert_eq!(q.data().unwrap(), cq.data().unwrap(), "{dtype:?} {n}x{k}");
                for m in [1, 3, GEMM_MIN_ROWS, 37, 70, PACKED_MIN_ROWS] {
                    let x = random(&mut rng, m * k);
                    let mut got = vec![0f32; m * n];
                    matmul(&q, &x, m, &mut got).unwrap();
                    let want = reference(&q, &x, m);
                    let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                    let err = got
                        .iter()
                        .zip(&want)
                        .fold(0f32, |a, (g, w)| a.max((g - w).abs()));
                    // The dot path quantizes activations to 8 bits (~0.4% per element),
                    // the GEMM path is f32 throughout.
                    let by_dot = m < GEMM_MIN_ROWS
                        || (dtype == GgmlDType::Q4K && int_prefill())
                        || (dtype == GgmlDType::Q8_0 && crate::q8_avx512::available())
                        || (matches!(dtype, GgmlDType::Q6K | GgmlDType::Q5K)
                            && crate::q6k_avx512::available());
                    let tol = if by_dot { 2e-2 } else { 1e-4 } * scale.max(1.0);
                    assert!(err <= tol, "{dtype:?} m={m} n={n} k={k}: max err {err}");
                    // And it agrees with candle's own (repacking) CPU matmul.
                    let c = candle_core::quantized::QMatMul::QTensor(std::sync::Arc::new(
                        QTensor::quantize(&t, dtype).unwrap(),
                    ))
                    .forward(&Tensor::from_slice(&x, (m, k), &Device::Cpu).unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                    let d = got
                        .iter()
                        .zip(&c)
                        .fold(0f32, |a, (g, w)| a.max((g - w).abs()));
                    assert!(d <= 2e-2 * scale.max(1.0), "{dtype:?} m={m}: vs candle {d}");
                }
            }
        }
    }

    #[test]
    fn qmm_rejects_mismatched_buffers() {
        let w = vec![0.5f32; 8 * 256];
        let q = quantize_par(&w, 8, 256, GgmlDType::Q8_0).unwrap();
        let mut dst = vec![0f32; 8];
        assert!(matmul(&q, &[0.0; 255], 1, &mut dst).is_err());
        assert!(quantize_par(&w, 8, 255, GgmlDType::Q4K).is_err());
    }
}
