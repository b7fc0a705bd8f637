#![allow(clippy::unwrap_used)]
//! Golden parity of the encoder-free Gemma 4 12B architecture (`gemma4_unified`) with the
//! Python reference (transformers 5.24.0, eager, f32 compute).
//!
//! Fixture: `tests/fixtures/gemma4_unified/` (tests/parity/make_gemma4_unified_fixture.py):
//! a tiny `Gemma4UnifiedForConditionalGeneration` (bf16 on disk, `per_layer_config` form,
//! 2 kv heads / head_dim 32 on sliding layers, 1 kv head / head_dim 64 and K=V on full
//! layers, window 8, vision-bidirectional attention, no PLE), all-position logits and 12
//! greedy tokens per case. Every case is checked three ways:
//! 1. the reference's soft tokens (placement + decoder);
//! 2. the reference's preprocessed inputs (the exact resized pixels `resized_70.png`, the
//!    waveform frames `input_features`) through the Rust embedders;
//! 3. end to end from `inputs/image.png` and `inputs/audio.wav` through the Rust
//!    preprocessing, chat template, tokenizer, embedders, placement and decoder.

mod golden;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use gemma4::config::{Arch, KvSource};
use gemma4::generate::{generate_batch, Request, Sampling};
use gemma4::media::TowerEncoder;
use gemma4::multimodal::{embed_prompt, MediaEncoder, SoftTokens};
use gemma4::preprocess::image::load_rgb;
use gemma4::preprocess::unified::{merge_patches, resize_to_budget};
use gemma4::text::{LogitRows, Segment, VisionMask};
use gemma4::tokenizer::{ChatContent, ChatMessage, MediaItem};
use gemma4::unified::{AudioEmbedder, VisionEmbedder};
use gemma4::Gemma4;
use golden::{case, ids_of, max_diff, Fixture};

/// Max absolute logit difference to the reference's f32 logits, all positions (logits are
/// soft-capped at 30).
///
/// 1e-4 is below the f32 noise floor of this fixture: with attention scaling 1.0 and
/// re-randomised norms, tiny rounding differences are amplified, and the reference's own f32
/// logits are 1.7e-4 (text) to 1.3e-3 (image) away from the same model run in float64
/// (`expected_f64.safetensors`); torch's own sdpa kernel differs from its eager kernel by up
/// to 6.9e-4 on the image case, and rescaling the pixels by `/255` instead of `*(1/255)`
/// moves the image logits by 7.6e-4. Measured Rust vs reference f32: text 1.4e-4, long 2.0e-4,
/// batch2 4.7e-4, audio 2.2e-4, image 4.9e-4 (see the report). The stronger check is
/// [`as_close_to_exact_arithmetic_as_the_reference`]; greedy tokens must match exactly.
const LOGIT_TOL: f32 = 1e-3;

/// The same bound when the image/audio soft tokens come from the Rust embedders. They match
/// the reference's soft tokens to 2.4e-6 (vision and audio), but this model moves its logits
/// by ~1e-3 for soft-token changes of ~1e-6: measured 4.5e-4 (image), 8.3e-4 (image+audio)
/// and 4.6e-4 (audio); the f64 checks below bound them against exact arithmetic instead.
const LOGIT_TOL_RUST_MEDIA: f32 = 2e-3;

/// percept loaded in float64 against the reference run in float64
/// (`expected_f64.safetensors`), all positions. Both keep norms, softmax and RoPE in float64
/// as well (make_gemma4_unified_f64_logits.py), so only float64 rounding and the float32
/// storage of the reference's logits are left (measured <= 1.5e-8 on every case, end to end
/// from the files included).
const LOGIT_TOL_F64: f32 = 1e-4;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemma4_unified")
}

fn open() -> Fixture {
    Fixture::load(&fixture(), DType::F32)
}

/// The reference's float64 logits, `<case>.<row>` -> `[T_row, vocab]` (unpadded rows).
fn f64_reference() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture().join("expected_f64.safetensors"), &Device::Cpu)
        .unwrap()
}

fn is_f64(f: &Fixture) -> bool {
    f.model.text.dtype() == DType::F64
}

fn tensor(f: &Fixture, c: &serde_json::Value, what: &str) -> Option<Tensor> {
    c["tensors"][what].as_str().map(|n| f.expected[n].clone())
}

/// Where a case's soft tokens come from.
#[derive(Clone, Copy, Debug)]
enum Source {
    /// The reference's own soft tokens.
    Reference,
    /// The reference's preprocessed inputs through the Rust embedders.
    Preprocessed,
}

fn vision(f: &Fixture) -> VisionEmbedder {
    let m = &f.model;
    VisionEmbedder::load(
        &m.weights,
        m.config.unified_vision.as_ref().unwrap(),
        m.config.text_config.hidden_size,
    )
    .unwrap()
}

fn audio(f: &Fixture) -> AudioEmbedder {
    let m = &f.model;
    AudioEmbedder::load(
        &m.weights,
        m.config.unified_audio.as_ref().unwrap(),
        m.config.text_config.hidden_size,
    )
    .unwrap()
}

/// Soft tokens of the reference's exact resized pixels (`resized_70.png`).
fn image_from_resized_png(f: &Fixture) -> Tensor {
    let img = load_rgb(&fixture().join("resized_70.png")).unwrap();
    vision(f)
        .encode(&merge_patches(&img), &Device::Cpu)
        .unwrap()
}

fn soft_of(f: &Fixture, c: &serde_json::Value, src: Source) -> SoftTokens {
    let mut soft = SoftTokens::default();
    match src {
        Source::Reference => {
            soft.images.extend(tensor(f, c, "image_soft_tokens"));
            soft.audios.extend(tensor(f, c, "audio_soft_tokens"));
        }
        Source::Preprocessed => {
            if c["tensors"]["image_soft_tokens"].is_string() {
                soft.images.push(image_from_resized_png(f));
            }
            if let Some(feat) = tensor(f, c, "input_features") {
                soft.audios
                    .push(audio(f).forward(&feat.squeeze(0).unwrap()).unwrap());
            }
        }
    }
    soft
}

/// Prefill, then one-token cached decode steps fed the reference's greedy tokens: the
/// largest difference to the reference's per-step logits `[12, vocab]`.
fn cached_step_logits_diff(
    m: &Gemma4,
    ids: &[u32],
    soft: &SoftTokens,
    generated: &[u32],
    want: &Tensor,
) -> f32 {
    let pe = embed_prompt(&m.text, ids, soft, &m.placeholders()).unwrap();
    let mut cache = m.text.new_cache();
    let mut segs = [Segment {
        cache: &mut cache,
        len: ids.len(),
        logits: LogitRows::Last,
        block_ids: Some(pe.block_ids.clone()),
    }];
    let mut got = vec![m
        .text
        .forward(&pe.embeds, None, &mut segs)
        .unwrap()
        .remove(0)];
    for &t in &generated[..generated.len() - 1] {
        let e = m.text.embed_tokens(&[t]).unwrap();
        let mut segs = [Segment {
            cache: &mut cache,
            len: 1,
            logits: LogitRows::Last,
            block_ids: None,
        }];
        got.push(m.text.forward(&e, None, &mut segs).unwrap().remove(0));
    }
    max_diff(&Tensor::cat(&got, 0).unwrap(), want)
}

/// Checks logits (all positions) and the 12 greedy tokens of a case; returns the largest
/// logit difference. A float64 model is held to the float64 reference.
fn check_case(f: &Fixture, name: &str, src: Source) -> f32 {
    let c = case(f, name);
    let m = &f.model;
    let soft = soft_of(f, c, src);
    let logits = tensor(f, c, "logits").unwrap();
    let generated = tensor(f, c, "generated").unwrap();
    let rows = c["input_ids"].as_array().unwrap().len();
    let f64ref = is_f64(f).then(f64_reference);
    let mut worst = 0f32;
    let mut requests = Vec::new();
    for row in 0..rows {
        let (ids, pad) = ids_of(c, row);
        let got = m.prompt_logits(&ids, &soft).unwrap();
        let (want, tol) = match (&f64ref, src) {
            (Some(r), _) => (r[&format!("{name}.{row}")].clone(), LOGIT_TOL_F64),
            (None, Source::Reference) => (
                logits.get(row).unwrap().narrow(0, pad, ids.len()).unwrap(),
                LOGIT_TOL,
            ),
            (None, Source::Preprocessed) => (
                logits.get(row).unwrap().narrow(0, pad, ids.len()).unwrap(),
                LOGIT_TOL_RUST_MEDIA,
            ),
        };
        let d = max_diff(&got, &want);
        eprintln!(
            "{name} ({src:?}, {:?}) row {row}: max logit diff {d:.3e}",
            m.text.dtype()
        );
        if std::env::var("PARITY_DEBUG").is_ok() {
            for p in 0..ids.len() {
                let dp = max_diff(&got.get(p).unwrap(), &want.get(p).unwrap());
                eprintln!("  pos {p}: diff {dp:.2e}");
            }
        }
        assert!(d < tol, "{name} ({src:?}) row {row}: logits differ by {d}");
        worst = worst.max(d);
        let want_gen: Vec<u32> = generated
            .get(row)
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|x| x as u32)
            .collect();
        requests.push((
            Request {
                input_ids: ids,
                soft: soft.clone(),
                max_new_tokens: want_gen.len(),
                sampling: Sampling::default(),
            },
            want_gen,
        ));
    }
    // The reference's per-step logits are float32 only.
    if let (Source::Reference, false, Some(step)) = (src, is_f64(f), tensor(f, c, "step_logits")) {
        for (row, (req, want_gen)) in requests.iter().enumerate() {
            let d = cached_step_logits_diff(
                m,
                &req.input_ids,
                &req.soft,
                want_gen,
                &step.get(row).unwrap(),
            );
            eprintln!("{name} row {row}: cached decode step logits max diff {d:.3e}");
            assert!(d < LOGIT_TOL, "{name} row {row}: step logits differ by {d}");
        }
    }
    // Greedy tokens with stop ids disabled as in the fixture; chunked prefill (5 rows per
    // forward, images kept whole) and all rows in one batch.
    let mut opts = m.generate_options(5);
    opts.stop_ids.clear();
    let reqs: Vec<Request> = requests.iter().map(|r| r.0.clone()).collect();
    let out = generate_batch(&m.text, &opts, &reqs, &mut |_, _| {}).unwrap();
    for (i, (o, (_, want))) in out.iter().zip(&requests).enumerate() {
        assert_eq!(
            &o.output_ids, want,
            "{name} ({src:?}) row {i}: greedy tokens"
        );
    }
    worst
}

#[test]
fn fixture_loads_as_the_unified_architecture() {
    let f = open();
    let m = &f.model;
    assert_eq!(m.config.arch, Arch::Gemma4Unified);
    assert!(m.config.vision_config.is_none() && m.config.audio_config.is_none());
    assert_eq!(m.config.unified_vision.as_ref().unwrap().patch_dim(), 6912);
    assert_eq!(
        m.config.unified_audio.as_ref().unwrap().samples_per_token(),
        640
    );
    let t = &m.config.text_config;
    assert_eq!(t.ple_dim(), None);
    let specs = m.text.specs();
    assert_eq!((specs[0].num_kv_heads, specs[0].head_dim), (2, 32));
    assert_eq!((specs[2].num_kv_heads, specs[2].head_dim), (1, 64));
    assert!(specs[2].k_eq_v && !specs[0].k_eq_v);
    assert!(specs.iter().all(|s| s.kv == KvSource::Own));
    assert_eq!(m.text.vision_mask(), VisionMask::BlockEverywhere);
    assert_eq!(m.stop_ids, vec![1, 106]);
}

#[test]
fn parity_text() {
    check_case(&open(), "text", Source::Reference);
}

#[test]
fn parity_long_prompt_past_the_window() {
    check_case(&open(), "long", Source::Reference);
}

#[test]
fn parity_batch_of_two() {
    check_case(&open(), "batch2", Source::Reference);
}

#[test]
fn parity_image() {
    let f = open();
    check_case(&f, "image", Source::Reference);
    check_case(&f, "image", Source::Preprocessed);
}

#[test]
fn parity_audio() {
    let f = open();
    check_case(&f, "audio", Source::Reference);
    check_case(&f, "audio", Source::Preprocessed);
}

#[test]
fn parity_image_and_audio() {
    let f = open();
    check_case(&f, "image_audio", Source::Reference);
    check_case(&f, "image_audio", Source::Preprocessed);
    // The merged input embeddings (soft tokens scattered onto the placeholders).
    let c = case(&f, "image_audio");
    let (ids, _) = ids_of(c, 0);
    let soft = soft_of(&f, c, Source::Preprocessed);
    let pe = embed_prompt(&f.model.text, &ids, &soft, &f.model.placeholders()).unwrap();
    let want = tensor(&f, c, "inputs_embeds").unwrap().squeeze(0).unwrap();
    let d = max_diff(&pe.embeds, &want);
    eprintln!("image_audio inputs_embeds diff {d:.3e}");
    assert!(d < 1e-4);
}

#[test]
fn merged_patches_of_the_reference_pixels_match() {
    let f = open();
    let img = load_rgb(&fixture().join("resized_70.png")).unwrap();
    assert_eq!((img.height, img.width), (336, 432));
    let p = merge_patches(&img);
    assert_eq!(p.n_patches, 63);
    let pos = f.expected["resize70.image_position_ids"]
        .squeeze(0)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap();
    for (i, xy) in p.positions.iter().enumerate() {
        assert_eq!(&pos[i][..], &xy[..], "position of patch {i}");
    }
    assert!(pos[63..].iter().all(|xy| xy == &[-1, -1]));
    let sums = f.expected["image.pixel_values_patch_sums"]
        .squeeze(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (i, (&want, patch)) in sums.iter().zip(p.pixel_values.chunks(6912)).enumerate() {
        // f64 sum; the reference's f32 reduction is off by a few 1e-6 relative.
        let s: f64 = patch.iter().map(|&v| v as f64).sum();
        let want = want as f64;
        assert!(
            (s - want).abs() <= 2e-5 * want.abs() + 1e-4,
            "patch {i}: {s} vs {want}"
        );
    }
    assert!(sums[63..].iter().all(|&s| s == 0.0));
}

/// torchvision's uint8 bicubic antialiased resize, reproduced bit for bit.
#[test]
fn resize_matches_the_reference_exactly() {
    let img = load_rgb(&fixture().join("inputs/image.png")).unwrap();
    for budget in [70, 280] {
        let want = load_rgb(&fixture().join(format!("resized_{budget}.png"))).unwrap();
        let got = resize_to_budget(&img, budget).unwrap();
        assert_eq!((got.width, got.height), (want.width, want.height));
        let diff = got
            .data
            .iter()
            .zip(&want.data)
            .filter(|(a, b)| a != b)
            .count();
        let max = got
            .data
            .iter()
            .zip(&want.data)
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .max()
            .unwrap();
        eprintln!(
            "budget {budget}: {diff} of {} values differ (max {max})",
            got.data.len()
        );
        assert_eq!(diff, 0, "budget {budget}");
    }
}

#[test]
fn embedders_match_the_reference() {
    let f = open();
    let c = case(&f, "image");
    let img = load_rgb(&fixture().join("resized_70.png")).unwrap();
    let p = merge_patches(&img);
    let v = vision(&f);
    let pv = Tensor::from_slice(&p.pixel_values, (63, 6912), &Device::Cpu).unwrap();
    let hidden = v.hidden(&pv, &p.positions).unwrap();
    let want = tensor(&f, c, "vision_embedder_hidden")
        .unwrap()
        .squeeze(0)
        .unwrap()
        .narrow(0, 0, 63)
        .unwrap();
    let dh = max_diff(&hidden, &want);
    let soft = v.forward(&pv, &p.positions).unwrap();
    let ds = max_diff(&soft, &tensor(&f, c, "image_soft_tokens").unwrap());
    eprintln!("vision embedder hidden {dh:.3e}, soft tokens {ds:.3e}");
    assert!(dh < 1e-4 && ds < 1e-4);

    let c = case(&f, "audio");
    let feat = tensor(&f, c, "input_features").unwrap().squeeze(0).unwrap();
    let samples =
        gemma4::preprocess::wav::load_mono_16k(&fixture().join("inputs/audio.wav")).unwrap();
    let (frames, n) = gemma4::preprocess::unified::audio_frames(&samples, 640);
    assert_eq!(n, 30);
    let frames = Tensor::from_vec(frames, (30, 640), &Device::Cpu).unwrap();
    assert_eq!(max_diff(&frames, &feat), 0.0, "waveform frames");
    let soft = audio(&f).forward(&feat).unwrap();
    let da = max_diff(&soft, &tensor(&f, c, "audio_soft_tokens").unwrap());
    eprintln!("audio embedder {da:.3e}");
    assert!(da < 1e-4);
}

/// Files -> Rust preprocessing -> prompt -> ids -> embedders -> decoder, for every media case.
#[test]
fn end_to_end_from_files_matches_reference() {
    end_to_end(&open());
}

fn end_to_end(f: &Fixture) {
    let f64ref = is_f64(f).then(f64_reference);
    let m = &f.model;
    let tok = m.tokenizer.as_ref().unwrap();
    let enc = TowerEncoder::new(70);
    let img = fixture().join("inputs/image.png");
    let wav = fixture().join("inputs/audio.wav");
    for (name, use_img, use_audio, text) in [
        ("image", true, false, "What is in this image?"),
        ("audio", false, true, "Transcribe this audio."),
        (
            "image_audio",
            true,
            true,
            "Describe the picture and the sound.",
        ),
    ] {
        let mut soft = SoftTokens::default();
        let mut media = Vec::new();
        let mut content = Vec::new();
        if use_img {
            let t = enc.encode_image(m, &img).unwrap();
            media.push(MediaItem::Image {
                tokens: t.dim(0).unwrap(),
            });
            soft.images.push(t);
            content.push(ChatContent::Image);
        }
        if use_audio {
            for t in enc.encode_audio(m, &wav).unwrap() {
                media.push(MediaItem::Audio {
                    tokens: t.dim(0).unwrap(),
                });
                soft.audios.push(t);
                content.push(ChatContent::Audio);
            }
        }
        content.push(ChatContent::Text(text.into()));
        let rendered = tok
            .render_chat(&[ChatMessage::user(content)], true, false)
            .unwrap();
        let ids = tok
            .encode(&tok.expand_media(&rendered, &media).unwrap())
            .unwrap();
        let c = case(f, name);
        let (want_ids, _) = ids_of(c, 0);
        assert_eq!(ids, want_ids, "{name}: prompt ids");
        let got = m.prompt_logits(&ids, &soft).unwrap();
        let (want, tol) = match &f64ref {
            Some(r) => (r[&format!("{name}.0")].clone(), LOGIT_TOL_F64),
            None => (
                tensor(f, c, "logits").unwrap().squeeze(0).unwrap(),
                LOGIT_TOL_RUST_MEDIA,
            ),
        };
        let d = max_diff(&got, &want);
        eprintln!(
            "{name} (end to end, {:?}): max logit diff {d:.3e}",
            m.text.dtype()
        );
        assert!(d < tol, "{name}: {d}");
        let mut opts = m.generate_options(512);
        opts.stop_ids.clear();
        let req = Request {
            input_ids: ids,
            soft,
            max_new_tokens: 12,
            sampling: Sampling::default(),
        };
        let out = generate_batch(&m.text, &opts, &[req], &mut |_, _| {}).unwrap();
        let want: Vec<u32> = tensor(f, c, "generated")
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|x| x as u32)
            .collect();
        assert_eq!(out[0].output_ids, want, "{name}: greedy tokens");
    }
}

/// The other vision mask of transformers 5.24 (`create_masks_for_vision_model`, used only by
/// `generate()` with a static cache): the fixture records its logits for positions 62..101.
#[test]
fn static_cache_mask_variant_matches_its_reference_logits() {
    let mut f = open();
    f.model.text.set_vision_mask(VisionMask::WindowedBlock);
    let c = case(&f, "image");
    let (ids, _) = ids_of(c, 0);
    let soft = soft_of(&f, c, Source::Reference);
    let got = f.model.prompt_logits(&ids, &soft).unwrap();
    let want = tensor(&f, c, "logits_static_cache_tail")
        .unwrap()
        .squeeze(0)
        .unwrap();
    let n = want.dim(0).unwrap();
    let tail = got.narrow(0, ids.len() - n, n).unwrap();
    let d = max_diff(&tail, &want);
    eprintln!("static-cache mask variant: max logit diff {d:.3e} over the last {n} positions");
    assert!(d < LOGIT_TOL);
    // And the two variants really differ (the default is what `logits` records).
    let default = tensor(&f, c, "logits").unwrap().squeeze(0).unwrap();
    assert!(max_diff(&tail, &default.narrow(0, ids.len() - n, n).unwrap()) > 1.0);
}

#[test]
#[ignore = "debugging aid: per-layer hidden-state differences"]
fn hidden_states_per_layer() {
    let f = open();
    let c = case(&f, "text");
    let (ids, _) = ids_of(c, 0);
    let m = &f.model;
    let pe = embed_prompt(&m.text, &ids, &SoftTokens::default(), &m.placeholders()).unwrap();
    let mut cache = m.text.new_cache();
    let mut segs = [Segment {
        cache: &mut cache,
        len: ids.len(),
        logits: LogitRows::All,
        block_ids: None,
    }];
    let (_, trace) = m.text.forward_traced(&pe.embeds, None, &mut segs).unwrap();
    let want = tensor(&f, c, "hidden_states").unwrap();
    for (i, h) in trace.iter().enumerate() {
        let w = want.get(i).unwrap().squeeze(0).unwrap();
        let scale = w
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let per_pos: Vec<String> = (0..ids.len())
            .map(|p| format!("{:.1e}", max_diff(&h.get(p).unwrap(), &w.get(p).unwrap())))
            .collect();
        eprintln!(
            "hidden {i}: max|h| {scale:.2} diff {:.3e}: {}",
            max_diff(h, &w),
            per_pos.join(" ")
        );
    }
}

/// percept in float64 against the reference in float64, every case, within 1e-4 on all
/// positions with exact greedy tokens. The image/audio soft tokens are computed by percept
/// (from the reference's preprocessed inputs, and end to end from the files): the
/// reference's stored soft tokens are its float32 run's, and this model moves its logits by
/// ~1e-3 for a soft-token change of ~1e-6.
#[test]
fn parity_in_float64_within_1e4_for_every_case() {
    let f = Fixture::load(&fixture(), DType::F64);
    for name in ["text", "long", "batch2", "image", "audio", "image_audio"] {
        check_case(&f, name, Source::Preprocessed);
    }
    end_to_end(&f);
}

/// The reference's model and inputs rerun in float64 (tests/parity/
/// make_gemma4_unified_f64_logits.py) approximate exact arithmetic. Rust's f32 logits must be
/// about as close to them as the reference's own f32 logits are: within twice the reference's
/// deviation (and never more than 2e-3).
#[test]
fn as_close_to_exact_arithmetic_as_the_reference() {
    let f64ref = f64_reference();
    let f = open();
    for name in ["text", "long", "batch2", "image", "audio", "image_audio"] {
        let c = case(&f, name);
        for src in [Source::Reference, Source::Preprocessed] {
            let soft = soft_of(&f, c, src);
            for row in 0..c["input_ids"].as_array().unwrap().len() {
                let (ids, pad) = ids_of(c, row);
                let exact = &f64ref[&format!("{name}.{row}")];
                let got = f.model.prompt_logits(&ids, &soft).unwrap();
                let torch32 = tensor(&f, c, "logits")
                    .unwrap()
                    .get(row)
                    .unwrap()
                    .narrow(0, pad, ids.len())
                    .unwrap();
                let (ours, theirs) = (max_diff(&got, exact), max_diff(&torch32, exact));
                eprintln!(
                    "{name} row {row} ({src:?}): |rust - f64| {ours:.2e}, |torch f32 - f64| {theirs:.2e}"
                );
                assert!(
                    ours <= (2.0 * theirs).max(1e-4) && ours < 2e-3,
                    "{name} row {row} ({src:?}): {ours} vs reference {theirs}"
                );
            }
        }
    }
}
