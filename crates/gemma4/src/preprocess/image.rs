//! Image preprocessing of `Gemma4ImageProcessorPil` (transformers 5.24.0,
//! `image_processing_pil_gemma4.py`): RGB with alpha composited onto white, an
//! aspect-preserving resize to a soft-token budget with PIL's bicubic filter (antialiased
//! when shrinking, 8-bit fixed point like Pillow's `Resample.c`), rescale by 1/255, and
//! patchify into `[n_patches, 16*16*3]` rows (patch-row, patch-col, channel) with (x, y)
//! patch positions.

use std::path::Path;

use super::PreprocessError;

/// Budgets the reference accepts (`_SUPPORTED_SOFT_TOKENS`).
pub const SUPPORTED_SOFT_TOKENS: [usize; 5] = [70, 140, 280, 560, 1120];
/// Default budget of the image processor; video frames use 70.
pub const DEFAULT_SOFT_TOKENS: usize = 280;
pub const PATCH_SIZE: usize = 16;
pub const POOLING_KERNEL: usize = 3;

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Self {
        debug_assert_eq!(data.len(), width * height * 3);
        Self {
            width,
            height,
            data,
        }
    }

    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let i = (y * self.width + x) * 3;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }
}

/// Output of [`preprocess`]: what the vision tower takes for one image (no padding rows).
#[derive(Debug, Clone)]
pub struct ImageInput {
    /// `[n_patches * 768]` values in [0, 1], patch rows in raster order over the patch grid.
    pub pixel_values: Vec<f32>,
    /// `(x, y)` patch coordinates per patch.
    pub positions: Vec<[i64; 2]>,
    pub n_patches: usize,
    /// Soft tokens the tower will produce: `n_patches / 9`.
    pub n_soft_tokens: usize,
    /// Resized size.
    pub height: usize,
    pub width: usize,
}

/// Decodes JPEG/PNG from a file and converts to RGB (alpha composited onto white).
pub fn load_rgb(path: &Path) -> Result<RgbImage, PreprocessError> {
    let bytes = std::fs::read(path).map_err(|source| PreprocessError::Io {
        path: path.display().to_string(),
        source,
    })?;
    decode_rgb(&bytes).map_err(|e| match e {
        PreprocessError::ImageDecode { source, .. } => PreprocessError::ImageDecode {
            path: path.display().to_string(),
            source,
        },
        other => other,
    })
}

/// Decodes an in-memory JPEG/PNG and converts to RGB (alpha composited onto white).
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage, PreprocessError> {
    let img = ::image::load_from_memory(bytes).map_err(|source| PreprocessError::ImageDecode {
        path: "<memory>".into(),
        source,
    })?;
    Ok(dynamic_to_rgb(&img))
}

/// `convert_to_rgb` of the reference: RGB images pass through, everything else goes through
/// RGBA and is alpha-composited onto opaque white.
pub fn dynamic_to_rgb(img: &::image::DynamicImage) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if let ::image::DynamicImage::ImageRgb8(rgb) = img {
        return RgbImage::new(w, h, rgb.as_raw().clone());
    }
    let rgba = img.to_rgba8();
    RgbImage::new(w, h, composite_on_white(rgba.as_raw()))
}

/// Pillow's `alpha_composite(white, src)` (AlphaComposite.c, 7-bit fixed point) then RGB.
pub fn composite_on_white(rgba: &[u8]) -> Vec<u8> {
    const PRECISION_BITS: u32 = 7;
    let mut out = Vec::with_capacity(rgba.len() / 4 * 3);
    for px in rgba.chunks_exact(4) {
        let a = px[3] as u32;
        if a == 255 {
            out.extend_from_slice(&px[..3]);
            continue;
        }
        // Destination alpha is 255: outa255 = 255 * 255, so coef1 = a << 7.
        let coef1 = a << PRECISION_BITS;
        let coef2 = (255 << PRECISION_BITS) - coef1;
        for &c in &px[..3] {
            let tmp = c as u32 * coef1 + 255 * coef2 + (0x80 << PRECISION_BITS);
            let v = (((tmp >> 8) + tmp) >> 8) >> PRECISION_BITS;
            out.push(v.min(255) as u8);
        }
    }
    out
}

/// `get_aspect_ratio_preserving_size` of the reference: (target_height, target_width).
pub fn target_size(
    height: usize,
    width: usize,
    max_soft_tokens: usize,
) -> Result<(usize, usize), PreprocessError> {
    if !SUPPORTED_SOFT_TOKENS.contains(&max_soft_tokens) {
        return Err(PreprocessError::Budget(max_soft_tokens));
    }
    if height == 0 || width == 0 {
        return Err(PreprocessError::Empty("image has a zero side".into()));
    }
    let max_patches = max_soft_tokens * POOLING_KERNEL * POOLING_KERNEL;
    let total_px = (height * width) as f64;
    let target_px = (max_patches * PATCH_SIZE * PATCH_SIZE) as f64;
    let factor = (target_px / total_px).sqrt();
    let ideal_h = factor * height as f64;
    let ideal_w = factor * width as f64;
    let side = POOLING_KERNEL * PATCH_SIZE;
    let mut th = (ideal_h / side as f64).floor() as usize * side;
    let mut tw = (ideal_w / side as f64).floor() as usize * side;
    if th == 0 && tw == 0 {
        return Err(PreprocessError::Resize {
            height,
            width,
            msg: "would resize to 0x0".into(),
        });
    }
    let max_side = (max_patches / (POOLING_KERNEL * POOLING_KERNEL)) * side;
    if th == 0 {
        th = side;
        tw = ((width as f64 / height as f64).floor() as usize * side).min(max_side);
    } else if tw == 0 {
        tw = side;
        th = ((height as f64 / width as f64).floor() as usize * side).min(max_side);
    }
    if (th * tw) as f64 > target_px {
        return Err(PreprocessError::Resize {
            height,
            width,
            msg: format!("{th}x{tw} exceeds {max_patches} patches"),
        });
    }
    Ok((th, tw))
}

/// Soft tokens an image of this size yields at a budget (what the prompt needs before the
/// tower runs).
pub fn soft_token_count(
    height: usize,
    width: usize,
    max_soft_tokens: usize,
) -> Result<usize, PreprocessError> {
    let (h, w) = target_size(height, width, max_soft_tokens)?;
    let side = POOLING_KERNEL * PATCH_SIZE;
    Ok((h / side) * (w / side))
}

fn bicubic(x: f64) -> f64 {
    // Pillow's bicubic with a = -0.5.
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow `precompute_coeffs` + `normalize_coeffs_8bpc`: per output index the first input
/// index and the fixed-point weights.
fn coeffs(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ss = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C casts truncate toward zero; the operand is > -0.5 here only when clamped.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let n = xmax.saturating_sub(xmin);
            let mut k: Vec<f64> = (0..n)
                .map(|x| bicubic((x as f64 + xmin as f64 - center + 0.5) * ss))
                .collect();
            let ww: f64 = k.iter().sum();
            if ww != 0.0 {
                for v in &mut k {
                    *v /= ww;
                }
            }
            let fixed = k
                .iter()
                .map(|&v| {
                    let s = v * (1u32 << PRECISION_BITS) as f64;
                    if v < 0.0 {
                        (-0.5 + s) as i32
                    } else {
                        (0.5 + s) as i32
                    }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Bicubic resize exactly as Pillow does it for 8-bit RGB (`Image.resize(..., BICUBIC)`):
/// horizontal pass into an 8-bit intermediate, then vertical, each antialiased when shrinking.
pub fn resize_bicubic(img: &RgbImage, out_w: usize, out_h: usize) -> RgbImage {
    if out_w == img.width && out_h == img.height {
        return img.clone();
    }
    let mut cur = img.clone();
    if out_w != cur.width {
        let cs = coeffs(cur.width, out_w);
        let mut data = vec![0u8; out_w * cur.height * 3];
        for y in 0..cur.height {
            let row = &cur.data[y * cur.width * 3..(y + 1) * cur.width * 3];
            for (x, (xmin, k)) in cs.iter().enumerate() {
                for c in 0..3 {
                    let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                    for (i, &w) in k.iter().enumerate() {
                        acc += row[(xmin + i) * 3 + c] as i64 * w as i64;
                    }
                    data[(y * out_w + x) * 3 + c] = clip8(acc);
                }
            }
        }
        cur = RgbImage::new(out_w, cur.height, data);
    }
    if out_h != cur.height {
        let cs = coeffs(cur.height, out_h);
        let w = cur.width;
        let mut data = vec![0u8; w * out_h * 3];
        for (y, (ymin, k)) in cs.iter().enumerate() {
            for xc in 0..w * 3 {
                let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                for (i, &wt) in k.iter().enumerate() {
                    acc += cur.data[(ymin + i) * w * 3 + xc] as i64 * wt as i64;
                }
                data[y * w * 3 + xc] = clip8(acc);
            }
        }
        cur = RgbImage::new(w, out_h, data);
    }
    cur
}

/// Patchify a resized image (sides multiples of 16) into rows of `16*16*3` values scaled by
/// 1/255, laid out (patch-row, patch-col, channel), with (x, y) positions in raster order.
pub fn patchify(img: &RgbImage) -> ImageInput {
    let p = PATCH_SIZE;
    let (gw, gh) = (img.width / p, img.height / p);
    let n = gw * gh;
    let mut pixel_values = Vec::with_capacity(n * p * p * 3);
    let mut positions = Vec::with_capacity(n);
    for py in 0..gh {
        for px in 0..gw {
            for r in 0..p {
                let row = (py * p + r) * img.width;
                for c in 0..p {
                    let i = (row + px * p + c) * 3;
                    for ch in 0..3 {
                        // The reference rescales in f64 (`astype(float64) * (1/255)`), then to f32.
                        pixel_values.push((img.data[i + ch] as f64 * (1.0 / 255.0)) as f32);
                    }
                }
            }
            positions.push([px as i64, py as i64]);
        }
    }
    ImageInput {
        pixel_values,
        positions,
        n_patches: n,
        n_soft_tokens: n / (POOLING_KERNEL * POOLING_KERNEL),
        height: img.height,
        width: img.width,
    }
}

/// Resized image at a budget (no-op when already the target size, as the reference).
pub fn resize_to_budget(
    img: &RgbImage,
    max_soft_tokens: usize,
) -> Result<RgbImage, PreprocessError> {
    let (h, w) = target_size(img.height, img.width, max_soft_tokens)?;
    Ok(resize_bicubic(img, w, h))
}

/// The whole image pipeline for one RGB image.
pub fn preprocess(img: &RgbImage, max_soft_tokens: usize) -> Result<ImageInput, PreprocessError> {
    Ok(patchify(&resize_to_budget(img, max_soft_tokens)?))
}
