//! Preprocessing of the encoder-free Gemma 4 12B (`gemma4_unified`, transformers 5.24.0):
//!
//! - images (`Gemma4UnifiedImageProcessor`, torchvision backend): the same aspect-preserving
//!   target size as E2B/E4B ([`super::image::target_size`]), torchvision's bicubic
//!   antialiased resize of uint8 images (int16 fixed-point weights, not Pillow's 22-bit
//!   ones), rescale by 1/255, then *merged* 48x48 patches: each row is one 48x48x3 block
//!   flattened (row, col, channel), blocks in raster order (x fastest), with (x, y) block
//!   positions. One merged patch is one soft token.
//! - audio (`Gemma4UnifiedAudioFeatureExtractor`): 16 kHz mono cut into frames of
//!   `audio_samples_per_token` (640) samples, zero-padded at the end; one frame is one
//!   soft token, so tokens = `ceil(samples / 640)`.

use super::image::{target_size, RgbImage, PATCH_SIZE, POOLING_KERNEL};
use super::PreprocessError;

/// Side of a merged patch in pixels.
pub const MODEL_PATCH: usize = PATCH_SIZE * POOLING_KERNEL;
/// Values per merged patch (48 * 48 * 3).
pub const PATCH_DIM: usize = MODEL_PATCH * MODEL_PATCH * 3;
/// Raw samples per audio soft token at 16 kHz (40 ms).
pub const AUDIO_SAMPLES_PER_TOKEN: usize = 640;
/// Most audio soft tokens of one audio item (`audio_seq_length`, 30 s); percept splits longer
/// audio into several items.
pub const MAX_AUDIO_TOKENS: usize = 750;

/// One image ready for the vision embedder (no padding rows).
#[derive(Debug, Clone)]
pub struct PatchInput {
    /// `[n_patches * PATCH_DIM]` values in [0, 1].
    pub pixel_values: Vec<f32>,
    /// `(x, y)` block coordinates per merged patch.
    pub positions: Vec<[i64; 2]>,
    /// Merged patches = soft tokens.
    pub n_patches: usize,
    /// Resized size.
    pub height: usize,
    pub width: usize,
}

fn bicubic(x: f64) -> f64 {
    // torch `aa_filter` for bicubic (Keys, a = -0.5).
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        0.0
    }
}

/// One pass's taps: per output index the first input index and int16 weights, plus the
/// fixed-point precision (torch `_compute_index_ranges_int16_weights`).
struct Taps {
    first: Vec<usize>,
    weights: Vec<Vec<i32>>,
    precision: u32,
}

fn taps(in_size: usize, out_size: usize) -> Taps {
    let scale = in_size as f64 / out_size as f64;
    let support = if scale >= 1.0 { 2.0 * scale } else { 2.0 };
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    let max_interp = (support.ceil() as usize) * 2 + 1;
    let mut first = Vec::with_capacity(out_size);
    let mut float_w = Vec::with_capacity(out_size);
    let mut wt_max = 0f64;
    for i in 0..out_size {
        let center = scale * (i as f64 + 0.5);
        // C++ casts truncate toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xsize = (((center + support + 0.5) as i64).min(in_size as i64) - xmin)
            .clamp(0, max_interp as i64) as usize;
        let mut w: Vec<f64> = (0..xsize)
            .map(|j| bicubic((j as f64 + xmin as f64 - center + 0.5) * invscale))
            .collect();
        let total: f64 = w.iter().sum();
        if total != 0.0 {
            for v in &mut w {
                *v /= total;
                wt_max = wt_max.max(*v);
            }
        }
        first.push(xmin as usize);
        float_w.push(w);
    }
    // The largest precision whose largest weight still fits in int16.
    let mut precision = 0u32;
    while precision < 22 {
        let next = (0.5 + wt_max * (1u64 << (precision + 1)) as f64) as i64;
        if next >= 1 << 15 {
            break;
        }
        precision += 1;
    }
    let weights = float_w
        .into_iter()
        .map(|w| {
            w.into_iter()
                .map(|v| {
                    let s = v * (1u64 << precision) as f64;
                    // int16 storage, as torch keeps them.
                    (if s < 0.0 {
                        (-0.5 + s) as i32
                    } else {
                        (0.5 + s) as i32
                    }) as i16 as i32
                })
                .collect()
        })
        .collect();
    Taps {
        first,
        weights,
        precision,
    }
}

fn clip8(acc: i64, precision: u32) -> u8 {
    (acc >> precision).clamp(0, 255) as u8
}

/// Bicubic antialiased resize of an RGB uint8 image as torchvision 0.29 does it on CPU
/// (`tvF.resize(uint8 tensor, BICUBIC, antialias=True)` -> torch's AVX2 uint8 kernel):
/// horizontal pass into uint8, then vertical, each only when that side changes.
pub fn resize_bicubic_torch(img: &RgbImage, out_w: usize, out_h: usize) -> RgbImage {
    let mut cur = img.clone();
    if out_w != cur.width {
        let t = taps(cur.width, out_w);
        let mut data = vec![0u8; out_w * cur.height * 3];
        for y in 0..cur.height {
            let row = &cur.data[y * cur.width * 3..(y + 1) * cur.width * 3];
            for x in 0..out_w {
                let (x0, k) = (t.first[x], &t.weights[x]);
                for c in 0..3 {
                    let mut acc: i64 = 1 << (t.precision.max(1) - 1);
                    for (i, &w) in k.iter().enumerate() {
                        acc += row[(x0 + i) * 3 + c] as i64 * w as i64;
                    }
                    data[(y * out_w + x) * 3 + c] = clip8(acc, t.precision);
                }
            }
        }
        cur = RgbImage::new(out_w, cur.height, data);
    }
    if out_h != cur.height {
        let t = taps(cur.height, out_h);
        let w = cur.width;
        let mut data = vec![0u8; w * out_h * 3];
        for y in 0..out_h {
            let (y0, k) = (t.first[y], &t.weights[y]);
            for xc in 0..w * 3 {
                let mut acc: i64 = 1 << (t.precision.max(1) - 1);
                for (i, &wt) in k.iter().enumerate() {
                    acc += cur.data[(y0 + i) * w * 3 + xc] as i64 * wt as i64;
                }
                data[y * w * 3 + xc] = clip8(acc, t.precision);
            }
        }
        cur = RgbImage::new(w, out_h, data);
    }
    cur
}

/// Resized image at a soft-token budget (unchanged when already the target size).
pub fn resize_to_budget(
    img: &RgbImage,
    max_soft_tokens: usize,
) -> Result<RgbImage, PreprocessError> {
    let (h, w) = target_size(img.height, img.width, max_soft_tokens)?;
    Ok(resize_bicubic_torch(img, w, h))
}

/// Merged 48x48 patches of an image whose sides are multiples of 48.
pub fn merge_patches(img: &RgbImage) -> PatchInput {
    let p = MODEL_PATCH;
    let (gw, gh) = (img.width / p, img.height / p);
    let n = gw * gh;
    let mut pixel_values = Vec::with_capacity(n * PATCH_DIM);
    let mut positions = Vec::with_capacity(n);
    for by in 0..gh {
        for bx in 0..gw {
            for r in 0..p {
                let row = (by * p + r) * img.width;
                for c in 0..p {
                    let i = (row + bx * p + c) * 3;
                    for ch in 0..3 {
                        // torchvision rescales uint8 in f32: `x * (1/255)`.
                        pixel_values.push(img.data[i + ch] as f32 * (1.0f32 / 255.0));
                    }
                }
            }
            positions.push([bx as i64, by as i64]);
        }
    }
    PatchInput {
        pixel_values,
        positions,
        n_patches: n,
        height: img.height,
        width: img.width,
    }
}

/// The whole image pipeline for one RGB image (or video frame).
pub fn preprocess_image(
    img: &RgbImage,
    max_soft_tokens: usize,
) -> Result<PatchInput, PreprocessError> {
    Ok(merge_patches(&resize_to_budget(img, max_soft_tokens)?))
}

/// Soft tokens an image of this size yields at a budget.
pub fn image_token_count(
    height: usize,
    width: usize,
    max_soft_tokens: usize,
) -> Result<usize, PreprocessError> {
    let (h, w) = target_size(height, width, max_soft_tokens)?;
    Ok((h / MODEL_PATCH) * (w / MODEL_PATCH))
}

/// Audio soft tokens of `n_samples` 16 kHz samples: `ceil(n / samples_per_token)`.
pub fn audio_token_count(n_samples: usize, samples_per_token: usize) -> usize {
    n_samples.div_ceil(samples_per_token.max(1))
}

/// Frames `[n_tokens * samples_per_token]` of one audio item, zero-padded at the end.
pub fn audio_frames(samples: &[f32], samples_per_token: usize) -> (Vec<f32>, usize) {
    let n = audio_token_count(samples.len(), samples_per_token);
    let mut out = samples.to_vec();
    out.resize(n * samples_per_token, 0.0);
    (out, n)
}

/// Splits audio into items of at most [`MAX_AUDIO_TOKENS`] tokens (30 s at 640 samples per
/// token); each item is framed with [`audio_frames`].
pub fn audio_items(samples: &[f32], samples_per_token: usize) -> Vec<&[f32]> {
    let per_item = MAX_AUDIO_TOKENS * samples_per_token.max(1);
    samples.chunks(per_item).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn merged_patch_layout_is_row_col_channel_in_raster_order() {
        let (w, h) = (96, 48);
        let data: Vec<u8> = (0..w * h * 3).map(|i| (i % 251) as u8).collect();
        let img = RgbImage::new(w, h, data);
        let p = merge_patches(&img);
        assert_eq!(p.n_patches, 2);
        assert_eq!(p.positions, vec![[0, 0], [1, 0]]);
        // Second block, row 1, col 2, channel 1 = pixel (48 + 2, 1).
        let got = p.pixel_values[PATCH_DIM + (48 + 2) * 3 + 1];
        assert_eq!(got, img.pixel(50, 1)[1] as f32 / 255.0);
    }

    #[test]
    fn audio_frames_pad_the_last_token() {
        let s = vec![0.5f32; 1300];
        let (f, n) = audio_frames(&s, 640);
        assert_eq!(n, 3);
        assert_eq!(f.len(), 1920);
        assert_eq!(f[1299], 0.5);
        assert_eq!(f[1300], 0.0);
        assert_eq!(audio_items(&vec![0.0; 640 * 751], 640).len(), 2);
    }

    #[test]
    fn resize_identity_and_token_counts() {
        let img = RgbImage::new(48, 48, vec![7; 48 * 48 * 3]);
        assert_eq!(resize_bicubic_torch(&img, 48, 48), img);
        // 768x1024 at 280 -> 672x912 -> 14 x 19 blocks.
        assert_eq!(image_token_count(768, 1024, 280).unwrap(), 266);
    }
}
