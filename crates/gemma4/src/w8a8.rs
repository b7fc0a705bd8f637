//! W8A8 matmul for the vision tower's linears: int8 weights with one scale per output row,
//! int8 activations with one scale per activation row (quantized at each call), int32
//! accumulation with AVX-512 VNNI `vpdpbusd`.
//!
//! Why: a 1280x720 frame at 70 soft tokens is 594 patches through 16 layers of 768x768 and
//! 768x3072 linears (~180 GFLOP); f32 GEMM (candle's `gemm`, 256-bit FMA) ran them at ~127
//! GFLOP/s, so the tower took 1.5 s. `vpdpbusd` does 64 multiply-adds per instruction,
//! four times an f32 FMA of the same width.
//!
//! `vpdpbusd` multiplies unsigned by signed bytes, so the weights are stored offset by +128
//! (`u = q + 128`) and the activations stay signed; `Σ u·a = Σ q·a + 128·Σ a`, and the
//! second term (one integer per activation row) is subtracted before scaling. Sums stay
//! exact in i32: `255 · 127 · k` fits for `k` below 66,000.
//!
//! Layout of the packed weights: panels of [`NR`] output columns; within a panel, for each
//! step of 4 along `k`, the 4 bytes of column 0, then of column 1, ..., so one 64-byte
//! load gives 16 columns x 4 depths, the lane layout of `vpdpbusd`. Columns past `n` and
//! depths past `k` are zero weights (`128` stored) with scale 0.

use rayon::prelude::*;

/// Output columns per packed panel: four 512-bit registers of 16 i32 sums.
pub const NR: usize = 64;
/// Activation rows per register tile: 6 x 4 accumulators + 4 weight registers of the 32.
const MR: usize = 6;

/// Whether this CPU runs the AVX-512 VNNI kernel (otherwise [`PackedI8::matmul`] takes
/// the portable integer loop, which gives the same numbers slowly).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// An `[n, k]` weight as int8 rows with per-row scales, packed for [`PackedI8::matmul`].
#[derive(Debug, Clone)]
pub struct PackedI8 {
    n: usize,
    k: usize,
    /// `k` rounded up to a multiple of 4.
    kp: usize,
    data: Vec<u8>,
    /// One per column, padded to whole panels (0 past `n`).
    scale: Vec<f32>,
}

/// `max |x| / 127` and the row quantized with it (round to nearest, ties to even, like the
/// vector conversion), written into `q`; returns `(scale, Σ q)`.
fn quantize_row_scalar(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let (scale, inv) = scales(amax);
    let mut sum = 0i32;
    for (d, &v) in q.iter_mut().zip(x) {
        let r = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i32;
        *d = r as i8;
        sum += r;
    }
    for d in q.iter_mut().skip(x.len()) {
        *d = 0;
    }
    (scale, sum)
}

/// Scale and its inverse for a row whose largest magnitude is `amax` (all zero: 0, 0).
#[inline(always)]
fn scales(amax: f32) -> (f32, f32) {
    if amax > 0.0 && amax.is_finite() {
        (amax / 127.0, 127.0 / amax)
    } else {
        (0.0, 0.0)
    }
}

impl PackedI8 {
    /// Quantizes a row-major `[n, k]` f32 weight: each row by its largest magnitude.
    pub fn pack(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "w8a8 pack: weight is not [{n}, {k}]");
        let kp = k.div_ceil(4) * 4;
        let panels = n.div_ceil(NR);
        let mut data = vec![128u8; panels * NR * kp];
        let mut scale = vec![0f32; panels * NR];
        let mut q = vec![0i8; kp];
        for (j, row) in w.chunks_exact(k.max(1)).enumerate().take(n) {
            let (s, _) = quantize_row_scalar(row, &mut q);
            scale[j] = s;
            let (p, c) = (j / NR, j % NR);
            let panel = &mut data[p * NR * kp..(p + 1) * NR * kp];
            for (step, quad) in q.chunks_exact(4).enumerate() {
                for (b, &v) in quad.iter().enumerate() {
                    panel[(step * NR + c) * 4 + b] = (v as i16 + 128) as u8;
                }
            }
        }
        Self {
            n,
            k,
            kp,
            data,
            scale,
        }
    }

    pub fn out_dim(&self) -> usize {
        self.n
    }

    pub fn in_dim(&self) -> usize {
        self.k
    }

    /// Bytes held (packed weights and scales).
    pub fn size_in_bytes(&self) -> usize {
        self.data.len() + 4 * self.scale.len()
    }

    /// `dst[m, n] = x[m, k] · Wᵀ`, activations quantized per row for this call.
    pub fn matmul(&self, x: &[f32], m: usize, dst: &mut [f32]) {
        assert!(
            x.len() == m * self.k && dst.len() == m * self.n,
            "w8a8 matmul: x {} / dst {} do not fit m={m} k={} n={}",
            x.len(),
            dst.len(),
            self.k,
            self.n
        );
        if m == 0 || self.n == 0 {
            return;
        }
        let kp = self.kp;
        let mut xq = vec![0i8; m * kp];
        let mut xs = vec![0f32; m];
        let mut xsum = vec![0i32; m];
        let fast = available();
        xq.par_chunks_mut(kp * 16)
            .zip(x.par_chunks(self.k.max(1) * 16))
            .zip(xs.par_chunks_mut(16).zip(xsum.par_chunks_mut(16)))
            .for_each(|((q, x), (s, sum))| {
                for (((q, x), s), sum) in q
                    .chunks_exact_mut(kp)
                    .zip(x.chunks_exact(self.k.max(1)))
                    .zip(s.iter_mut())
                    .zip(sum.iter_mut())
                {
                    (*s, *sum) = if fast {
                        quantize_row(x, q)
                    } else {
                        quantize_row_scalar(x, q)
                    };
                }
            });
        let act = Acts {
            q: &xq,
            scale: &xs,
            sum: &xsum,
        };
        // Each worker owns whole panels of output columns, written as `dstᵀ` slices so
        // the borrow is disjoint; one transpose at the end.
        let panels = self.n.div_ceil(NR);
        let mut dst_t = vec![0f32; panels * NR * m];
        dst_t
            .par_chunks_mut(NR * m)
            .zip(self.data.par_chunks(NR * kp))
            .zip(self.scale.par_chunks(NR))
            .for_each(|((out, panel), ws)| {
                if fast {
                    panel_fast(&act, m, kp, panel, ws, out);
                } else {
                    panel_scalar(&act, m, kp, panel, ws, out);
                }
            });
        for (p, out) in dst_t.chunks_exact(NR * m).enumerate() {
            let c0 = p * NR;
            let cols = NR.min(self.n - c0);
            for r in 0..m {
                let row = &mut dst[r * self.n + c0..r * self.n + c0 + cols];
                for (c, d) in row.iter_mut().enumerate() {
                    *d = out[c * m + r];
                }
            }
        }
    }
}

/// Quantized activations: `m` rows of `kp` bytes, their scales and byte sums.
struct Acts<'a> {
    q: &'a [i8],
    scale: &'a [f32],
    sum: &'a [i32],
}

/// The portable kernel: the same integer sums and the same final float operations as
/// [`panel_fast`], so both give identical results.
fn panel_scalar(act: &Acts, m: usize, kp: usize, panel: &[u8], ws: &[f32], out: &mut [f32]) {
    for c in 0..NR {
        for r in 0..m {
            let xq = &act.q[r * kp..(r + 1) * kp];
            let mut acc = 0i32;
            for (step, quad) in xq.chunks_exact(4).enumerate() {
                for (b, &a) in quad.iter().enumerate() {
                    acc += panel[(step * NR + c) * 4 + b] as i32 * a as i32;
                }
            }
            let v = (acc - 128 * act.sum[r]) as f32;
            out[c * m + r] = v * (act.scale[r] * ws[c]);
        }
    }
}

/// One panel of [`NR`] columns against every activation row, in tiles of [`MR`] rows.
fn panel_fast(act: &Acts, m: usize, kp: usize, panel: &[u8], ws: &[f32], out: &mut [f32]) {
    let mut tile = [0f32; MR * NR];
    let mut r0 = 0;
    while r0 < m {
        let rows = MR.min(m - r0);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: only called when `available()` holds; `tile_vnni` reads `rows` rows of
        // `kp` bytes from `act.q` at row `r0` (checked by the slice below) and `kp / 4`
        // steps of 256 bytes of `panel` (its length is `NR * kp`).
        #[allow(unsafe_code)]
        unsafe {
            let q = &act.q[r0 * kp..(r0 + rows) * kp];
            let s = &act.scale[r0..r0 + rows];
            let sum = &act.sum[r0..r0 + rows];
            match rows {
                6 => tile_vnni::<6>(q, s, sum, kp, panel, ws, &mut tile),
                5 => tile_vnni::<5>(q, s, sum, kp, panel, ws, &mut tile),
                4 => tile_vnni::<4>(q, s, sum, kp, panel, ws, &mut tile),
                3 => tile_vnni::<3>(q, s, sum, kp, panel, ws, &mut tile),
                2 => tile_vnni::<2>(q, s, sum, kp, panel, ws, &mut tile),
                _ => tile_vnni::<1>(q, s, sum, kp, panel, ws, &mut tile),
            }
        }
        for r in 0..rows {
            for c in 0..NR {
                out[c * m + r0 + r] = tile[r * NR + c];
            }
        }
        r0 += rows;
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (&tile, ws, panel, kp, act);
        unreachable!("available() is false off x86_64")
    }
}

/// Quantizes one activation row like [`quantize_row_scalar`], 16 lanes at a time.
fn quantize_row(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: only called when `available()` holds; reads `x` and writes `q[..x.len()]`
    // with masked accesses inside their lengths (`q` is at least as long as `x`).
    #[allow(unsafe_code)]
    unsafe {
        quantize_row_avx512(x, q)
    }
    #[cfg(not(target_arch = "x86_64"))]
    quantize_row_scalar(x, q)
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f,avx512bw")]
fn quantize_row_avx512(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    use std::arch::x86_64::*;
    assert!(q.len() >= x.len());
    let n = x.len();
    let mask = |i: usize| -> __mmask16 {
        let rem = n - i;
        if rem >= 16 {
            0xffff
        } else {
            ((1u32 << rem) - 1) as __mmask16
        }
    };
    // SAFETY (whole body): every load/store is masked to the lanes inside `x` / `q`.
    unsafe {
        let mut vmax = _mm512_setzero_ps();
        for i in (0..n).step_by(16) {
            let v = _mm512_maskz_loadu_ps(mask(i), x.as_ptr().add(i));
            vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
        }
        let amax = _mm512_reduce_max_ps(vmax);
        let (scale, inv) = scales(amax);
        let vinv = _mm512_set1_ps(inv);
        let (lo, hi) = (_mm512_set1_epi32(-127), _mm512_set1_epi32(127));
        let mut vsum = _mm512_setzero_si512();
        for i in (0..n).step_by(16) {
            let m = mask(i);
            let v = _mm512_maskz_loadu_ps(m, x.as_ptr().add(i));
            // Round to nearest even (the default MXCSR mode), as `round_ties_even`.
            let r = _mm512_cvtps_epi32(_mm512_mul_ps(v, vinv));
            let r = _mm512_min_epi32(_mm512_max_epi32(r, lo), hi);
            vsum = _mm512_add_epi32(vsum, _mm512_maskz_mov_epi32(m, r));
            _mm512_mask_cvtepi32_storeu_epi8(q.as_mut_ptr().add(i).cast(), m, r);
        }
        for d in q.iter_mut().skip(n) {
            *d = 0;
        }
        (scale, _mm512_reduce_add_epi32(vsum))
    }
}

/// `R` activation rows x one panel: `tile[r * NR + c]` = scaled dot product.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn tile_vnni<const R: usize>(
    q: &[i8],
    xs: &[f32],
    xsum: &[i32],
    kp: usize,
    panel: &[u8],
    ws: &[f32],
    tile: &mut [f32; MR * NR],
) {
    use std::arch::x86_64::*;
    assert!(
        R <= MR
            && q.len() == R * kp
            && xs.len() == R
            && xsum.len() == R
            && panel.len() == NR * kp
            && ws.len() == NR
    );
    // SAFETY (whole body): the asserts above bound every pointer offset: weight loads at
    // `256 * step + 64 * c` < `NR * kp`, activation reads at `r * kp + 4 * step` < `R * kp`.
    unsafe {
        let mut acc = [[_mm512_setzero_si512(); 4]; R];
        let wp = panel.as_ptr();
        let xp = q.as_ptr();
        for step in 0..kp / 4 {
            let w = wp.add(step * 4 * NR);
            let w0 = _mm512_loadu_si512(w.cast());
            let w1 = _mm512_loadu_si512(w.add(64).cast());
            let w2 = _mm512_loadu_si512(w.add(128).cast());
            let w3 = _mm512_loadu_si512(w.add(192).cast());
            for (r, a) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_epi32(std::ptr::read_unaligned(
                    xp.add(r * kp + 4 * step).cast::<i32>(),
                ));
                a[0] = _mm512_dpbusd_epi32(a[0], w0, x);
                a[1] = _mm512_dpbusd_epi32(a[1], w1, x);
                a[2] = _mm512_dpbusd_epi32(a[2], w2, x);
                a[3] = _mm512_dpbusd_epi32(a[3], w3, x);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            let comp = _mm512_set1_epi32(128 * xsum[r]);
            let sa = _mm512_set1_ps(xs[r]);
            for (c, v) in a.iter().enumerate() {
                let v = _mm512_cvtepi32_ps(_mm512_sub_epi32(*v, comp));
                let sc = _mm512_mul_ps(sa, _mm512_loadu_ps(ws.as_ptr().add(16 * c)));
                _mm512_storeu_ps(tile.as_mut_ptr().add(r * NR + 16 * c), _mm512_mul_ps(v, sc));
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn random(rng: &mut SplitMix64, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale)
            .collect()
    }

    /// f64 reference `x · wᵀ`.
    fn reference(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for r in 0..m {
            for j in 0..n {
                y[r * n + j] = (0..k)
                    .map(|i| x[r * k + i] as f64 * w[j * k + i] as f64)
                    .sum();
            }
        }
        y
    }

    #[test]
    fn w8a8_matches_f64_within_the_rounding_bound_and_scalar_exactly() {
        let mut rng = SplitMix64(5);
        // Odd shapes: k not a multiple of 4, n not of NR, m not of MR; and a zero row.
        for (m, n, k) in [(1, 5, 3), (7, 64, 32), (13, 70, 129), (594, 200, 768)] {
            let w = random(&mut rng, n * k, 0.08);
            let mut x = random(&mut rng, m * k, 3.0);
            x[..k].fill(0.0);
            let p = PackedI8::pack(&w, n, k);
            let mut got = vec![0f32; m * n];
            p.matmul(&x, m, &mut got);
            let want = reference(&x, &w, m, n, k);
            // Rounding each x to its row's step sx (error <= sx/2) and each w to its row's
            // step sw (<= sw/2) moves a dot product by at most
            // sx/2 Σ|w| + sw/2 Σ|x| + k sx sw/4; i32 -> f32 and two products add a few ulp.
            for r in 0..m {
                let xr = &x[r * k..(r + 1) * k];
                let sx = xr.iter().fold(0f32, |a, v| a.max(v.abs())) as f64 / 127.0;
                let ax: f64 = xr.iter().map(|v| v.abs() as f64).sum();
                for j in 0..n {
                    let wr = &w[j * k..(j + 1) * k];
                    let sw = wr.iter().fold(0f32, |a, v| a.max(v.abs())) as f64 / 127.0;
                    let aw: f64 = wr.iter().map(|v| v.abs() as f64).sum();
                    let bound = sx / 2.0 * aw + sw / 2.0 * ax + k as f64 * sx * sw / 4.0;
                    let (g, e) = (got[r * n + j] as f64, want[r * n + j]);
                    assert!(
                        (g - e).abs() <= bound * (1.0 + 1e-5) + 1e-6 * e.abs(),
                        "m={m} n={n} k={k} [{r},{j}]: {g} vs {e}, bound {bound}"
                    );
                }
            }
            assert!(got[..n].iter().all(|&v| v == 0.0), "zero row");
            // The vector kernel and the portable loop agree to the bit.
            if available() {
                let kp = p.kp;
                let mut xq = vec![0i8; m * kp];
                let mut xs = vec![0f32; m];
                let mut xsum = vec![0i32; m];
                for r in 0..m {
                    let (s, sum) =
                        quantize_row_scalar(&x[r * k..(r + 1) * k], &mut xq[r * kp..][..kp]);
                    let (s2, sum2) = quantize_row(&x[r * k..(r + 1) * k], &mut xq[r * kp..][..kp]);
                    assert_eq!((s, sum), (s2, sum2));
                    (xs[r], xsum[r]) = (s, sum);
                }
                let act = Acts {
                    q: &xq,
                    scale: &xs,
                    sum: &xsum,
                };
                for (pi, (panel, ws)) in p.data.chunks(NR * kp).zip(p.scale.chunks(NR)).enumerate()
                {
                    let mut a = vec![0f32; NR * m];
                    let mut b = vec![0f32; NR * m];
                    panel_fast(&act, m, kp, panel, ws, &mut a);
                    panel_scalar(&act, m, kp, panel, ws, &mut b);
                    assert_eq!(a, b, "m={m} n={n} k={k} panel {pi}");
                }
            }
        }
    }
}
