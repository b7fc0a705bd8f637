#![allow(clippy::unwrap_used)]
//! Image preprocessing rules of the reference (`image_processing_pil_gemma4.py`).

use gemma4::preprocess::image::{
    composite_on_white, patchify, preprocess, resize_bicubic, soft_token_count, target_size,
    RgbImage, SUPPORTED_SOFT_TOKENS,
};

#[test]
fn target_sizes_match_reference_examples() {
    // 768x1024 -> 672x912 -> 266 tokens (reference notes); the fixture image 96x128.
    assert_eq!(target_size(768, 1024, 280).unwrap(), (672, 912));
    assert_eq!(soft_token_count(768, 1024, 280).unwrap(), 266);
    assert_eq!(target_size(96, 128, 70).unwrap(), (336, 432));
    assert_eq!(soft_token_count(96, 128, 70).unwrap(), 63);
    assert_eq!(target_size(96, 128, 280).unwrap(), (672, 912));
}

#[test]
fn soft_tokens_never_exceed_budget_and_sides_are_multiples_of_48() {
    for &b in &SUPPORTED_SOFT_TOKENS {
        for &(h, w) in &[
            (1, 1),
            (48, 48),
            (480, 640),
            (1080, 1920),
            (1920, 1080),
            (4000, 3000),
            (17, 999),
            (333, 333),
        ] {
            let (th, tw) = target_size(h, w, b).unwrap();
            assert_eq!(th % 48, 0);
            assert_eq!(tw % 48, 0);
            let n = soft_token_count(h, w, b).unwrap();
            assert!(n >= 1 && n <= b, "{h}x{w} at {b}: {n}");
        }
    }
    // Square images use the budget almost fully: 280 -> 16x16 = 256? sqrt(280) = 16.7.
    assert_eq!(soft_token_count(1000, 1000, 280).unwrap(), 256);
    assert_eq!(soft_token_count(1000, 1000, 70).unwrap(), 64);
    assert_eq!(soft_token_count(1000, 1000, 1120).unwrap(), 1089);
}

#[test]
fn extreme_aspect_ratios_take_the_edge_case_branches() {
    // Height rounds to 0: one row of 48, width floor(W/H)*48 capped at budget*48.
    assert_eq!(target_size(10, 10_000, 280).unwrap(), (48, 13_440));
    assert_eq!(target_size(10_000, 10, 280).unwrap(), (13_440, 48));
    assert_eq!(target_size(40, 200, 70).unwrap(), (144, 864));
    assert!(target_size(100, 100, 100).is_err());
    assert!(target_size(0, 100, 70).is_err());
}

#[test]
fn alpha_composites_onto_white_like_pillow() {
    // Expected values from PIL Image.alpha_composite(white, src).convert("RGB").
    let rgba = [
        0, 0, 0, 0, 0, 0, 0, 128, 200, 100, 50, 77, 255, 0, 10, 254, 3, 4, 5, 1,
    ];
    assert_eq!(
        composite_on_white(&rgba),
        vec![255, 255, 255, 127, 127, 127, 238, 208, 193, 255, 1, 11, 254, 254, 254]
    );
}

#[test]
fn patchify_layout_is_row_col_channel_in_raster_patch_order() {
    // 32 wide x 16 high: 2 patches side by side.
    let (w, h) = (32, 16);
    let data: Vec<u8> = (0..w * h * 3).map(|i| (i % 251) as u8).collect();
    let img = RgbImage::new(w, h, data.clone());
    let out = patchify(&img);
    assert_eq!(out.n_patches, 2);
    assert_eq!(out.positions, vec![[0, 0], [1, 0]]);
    // Patch 1, row 3, col 5, channel 2.
    let v = out.pixel_values[768 + (3 * 16 + 5) * 3 + 2];
    let src = data[((3 * w) + 16 + 5) * 3 + 2];
    assert_eq!(v, (src as f64 / 255.0) as f32);
}

#[test]
fn resize_is_identity_at_target_size_and_keeps_constants() {
    let img = RgbImage::new(96, 48, vec![77; 96 * 48 * 3]);
    assert_eq!(resize_bicubic(&img, 96, 48), img);
    // Bicubic weights are normalised: a flat image stays flat, up or down.
    for (w, h) in [(480, 240), (48, 48), (13, 7)] {
        let r = resize_bicubic(&img, w, h);
        assert!(r.data.iter().all(|&v| v == 77), "{w}x{h}");
    }
    let out = preprocess(&img, 70).unwrap();
    assert_eq!(out.n_soft_tokens, soft_token_count(48, 96, 70).unwrap());
    assert_eq!(out.pixel_values.len(), out.n_patches * 768);
}
