#![allow(clippy::unwrap_used)]
//! Shared-prefix K/V reuse (`model::prefix`): requests that start from a kept prompt prefix
//! generate exactly the greedy tokens of a whole-prompt prefill, on the tiny `gemma4` and
//! `gemma4_unified` fixtures (sliding window 8, so the system prompts here outrun the
//! window; KV sharing and K=V on the `gemma4` one; the vision-bidirectional mask on the
//! unified one), text-only and with images, in batches whose requests share a prefix or not.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use gemma4::generate::{generate_batch, Generation, Request, Sampling};
use gemma4::media::TowerEncoder;
use gemma4::multimodal::SoftTokens;
use gemma4::prefix::{shareable_len, PrefixLimits};
use gemma4::preprocess::image::RgbImage;
use gemma4::testing::{temp_model_dir, write_tiny_checkpoint, TinySpec};
use gemma4::text::LoadOptions;
use gemma4::tokenizer::{ChatContent, ChatMessage, MediaItem};
use gemma4::Gemma4;

const CHUNK: usize = 5;

fn fixture(arch: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/{arch}/model"))
}

fn load(dir: &Path, dtype: DType) -> Gemma4 {
    let opts = LoadOptions {
        dtype,
        ..LoadOptions::default()
    };
    Gemma4::load_dir(dir, &opts).unwrap()
}

/// A synthetic RGB image with some structure.
fn image(w: usize, h: usize, seed: u8) -> RgbImage {
    let data = (0..w * h * 3)
        .map(|i| ((i * 31 + (i / (w * 3)) * 7) as u8).wrapping_add(seed))
        .collect();
    RgbImage::new(w, h, data)
}

/// A chat prompt as the engine builds it (media first, then the text), after a system turn.
fn request(g: &Gemma4, system: &str, img: Option<&Tensor>, text: &str) -> Request {
    let tok = g.tokenizer.as_ref().unwrap();
    let mut content = Vec::new();
    let mut media = Vec::new();
    let mut soft = SoftTokens::default();
    if let Some(t) = img {
        media.push(MediaItem::Image {
            tokens: t.dim(0).unwrap(),
        });
        soft.images.push(t.clone());
        content.push(ChatContent::Image);
    }
    content.push(ChatContent::Text(text.into()));
    let msgs = [ChatMessage::system(system), ChatMessage::user(content)];
    let rendered = tok.render_chat(&msgs, true, false).unwrap();
    let prompt = tok.expand_media(&rendered, &media).unwrap();
    Request {
        input_ids: tok.encode(&prompt).unwrap(),
        soft,
        max_new_tokens: 8,
        sampling: Sampling::default(),
    }
}

/// Greedy tokens of each request from a whole-prompt prefill, one request at a time.
fn baseline(g: &Gemma4, reqs: &[Request]) -> Vec<Vec<u32>> {
    let opts = g.generate_options(CHUNK);
    reqs.iter()
        .map(|r| {
            let out = generate_batch(&g.text, &opts, std::slice::from_ref(r), &mut |_, _| {});
            out.unwrap().remove(0).output_ids
        })
        .collect()
}

fn tokens(gens: &[Generation]) -> Vec<Vec<u32>> {
    gens.iter().map(|x| x.output_ids.clone()).collect()
}

const SYS_A: &str = "You watch a camera at a loading dock. Answer in one short sentence.";
const SYS_B: &str = "You are a careful assistant who reads meters.";

fn reuse_gives_the_same_tokens(dir: &Path, dtype: DType) {
    let g = load(dir, dtype);
    let enc = TowerEncoder::new(70);
    let img1 = enc.encode_rgb(&g, &image(100, 60, 3), 70).unwrap();
    let img2 = enc.encode_rgb(&g, &image(80, 80, 90), 70).unwrap();
    let first = vec![
        request(&g, SYS_A, Some(&img1), "What is in the frame?"),
        request(&g, SYS_A, Some(&img2), "What is in the frame?"),
        request(&g, SYS_B, None, "Read the meter."),
        request(&g, SYS_A, None, "Describe the dock."),
    ];
    let second = vec![
        request(&g, SYS_A, Some(&img2), "Anything new?"),
        request(&g, SYS_B, Some(&img1), "Read the meter."),
        request(&g, SYS_A, Some(&img1), "What is in the frame?"),
    ];
    let want_first = baseline(&g, &first);
    let want_second = baseline(&g, &second);
    assert!(want_first.iter().chain(&want_second).all(|t| !t.is_empty()));

    let got_first = g.generate(&first, CHUNK, &mut |_, _| {}).unwrap();
    assert_eq!(tokens(&got_first), want_first, "first batch");
    // The three SYS_A requests share their system turn (a prompt splits before each chat
    // turn and before its first media): built once in this batch and used by all three;
    // SYS_B shares nothing with them that ends at one of its own splits.
    let ph = g.placeholders();
    let turn = g.tokenizer.as_ref().unwrap().special.turn_start.unwrap();
    let sys_a_turn = first[3]
        .input_ids
        .iter()
        .enumerate()
        .skip(2)
        .find(|&(_, &t)| t == turn)
        .map(|(p, _)| p)
        .unwrap();
    assert!(sys_a_turn > 20, "system turn of {sys_a_turn} tokens");
    for i in [0, 1, 3] {
        assert!(
            got_first[i].cached_prompt_tokens >= sys_a_turn,
            "request {i}"
        );
    }
    assert_eq!(got_first[3].cached_prompt_tokens, sys_a_turn);
    assert_eq!(got_first[2].cached_prompt_tokens, 0);
    // The two image requests also share the text up to the image.
    assert_eq!(
        got_first[0].cached_prompt_tokens,
        shareable_len(&first[0].input_ids, &ph)
    );

    let got_second = g.generate(&second, 3, &mut |_, _| {}).unwrap();
    assert_eq!(tokens(&got_second), want_second, "second batch");
    // Kept from the first batch: everything before SYS_A's image.
    assert_eq!(
        got_second[2].cached_prompt_tokens,
        shareable_len(&second[2].input_ids, &ph)
    );
    assert!(got_second[0].cached_prompt_tokens >= sys_a_turn);
    // SYS_B was seen once before, so its system turn is built now.
    assert!(got_second[1].cached_prompt_tokens > 20);
    for (r, x) in second.iter().zip(&got_second) {
        assert!(x.cached_prompt_tokens < r.input_ids.len());
        assert_eq!(x.prompt_tokens, r.input_ids.len());
    }
    let s = g.prefixes.stats();
    assert_eq!(s.requests, 7);
    let reused: usize = got_first
        .iter()
        .chain(&got_second)
        .map(|x| x.cached_prompt_tokens)
        .sum();
    assert_eq!(s.reused_tokens, reused as u64);
    assert!(s.computed_per_request() * 7.0 < s.prompt_tokens as f64);

    // Turned off: nothing reused, same tokens.
    g.prefixes.set_enabled(false);
    let off = g.generate(&second, CHUNK, &mut |_, _| {}).unwrap();
    assert_eq!(tokens(&off), want_second);
    assert!(off.iter().all(|x| x.cached_prompt_tokens == 0));
    assert!(g.prefixes.kept().is_empty());
}

#[test]
fn gemma4_fixture_reuses_prefixes_with_the_same_tokens() {
    reuse_gives_the_same_tokens(&fixture("gemma4"), DType::F32);
}

#[test]
fn gemma4_unified_fixture_reuses_prefixes_with_the_same_tokens() {
    reuse_gives_the_same_tokens(&fixture("gemma4_unified"), DType::F32);
}

/// The generated tiny checkpoint (window 4, K and V apart, PLE, KV sharing) with text-only
/// prompts: a long shared instruction, then different questions.
#[test]
fn generated_checkpoint_text_prompts_reuse_the_shared_instruction() {
    let dir = write_tiny_checkpoint(&temp_model_dir("prefix-gen"), &TinySpec::default()).unwrap();
    let g = load(&dir, DType::F32);
    let turn = g.tokenizer.as_ref().unwrap().special.turn_start.unwrap();
    let instr: Vec<u32> = (0..40).map(|i| 282 + ((i * 7) % 90) as u32).collect();
    // The question opens a new turn: the instruction before it is a prefix of its own.
    let req = |tail: &[u32]| Request {
        input_ids: instr.iter().chain(&[turn]).chain(tail).copied().collect(),
        soft: SoftTokens::default(),
        max_new_tokens: 10,
        sampling: Sampling::default(),
    };
    let t1 = [300, 301, 302, 303, 304, 305];
    let a = [req(&t1), req(&[310, 311])];
    let b = [req(&[320, 321, 322, 323]), req(&t1)];
    let want_a = baseline(&g, &a);
    let want_b = baseline(&g, &b);
    let got_a = g.generate(&a, CHUNK, &mut |_, _| {}).unwrap();
    assert_eq!(tokens(&got_a), want_a);
    assert!(got_a.iter().all(|x| x.cached_prompt_tokens == 40));
    // Kept without spare rows: the full layer (1 kv head x 32 wide) holds its 40 positions,
    // 10,240 bytes of f32 K and V; a live cache's 64-row buffer alone would be 16,384.
    let kept = g.prefixes.kept();
    assert_eq!(kept.len(), 1);
    assert!(kept[0].1 >= 10_240 && kept[0].1 < 16_384, "{kept:?}");
    let got_b = g.generate(&b, 64, &mut |_, _| {}).unwrap();
    assert_eq!(tokens(&got_b), want_b);
    assert_eq!(got_b[0].cached_prompt_tokens, 40);
    // b[1] repeats a[0]: all of its prompt but the last token was seen before, so that
    // longer prefix is built on top of the kept 40 and used at once.
    assert_eq!(got_b[1].cached_prompt_tokens, 46);
    assert_eq!(g.prefixes.kept().len(), 2);
    assert_eq!(g.prefixes.stats().prefix_tokens, 46);
}

/// The LRU keeps at most `entries` prefixes, and a prefix evicted is rebuilt when needed.
#[test]
fn the_lru_is_bounded_and_rebuilds_what_it_evicted() {
    let dir = write_tiny_checkpoint(&temp_model_dir("prefix-lru"), &TinySpec::default()).unwrap();
    let mut g = load(&dir, DType::F32);
    g.prefixes = gemma4::prefix::PrefixCache::new(PrefixLimits {
        entries: 2,
        ..PrefixLimits::default()
    });
    let turn = g.tokenizer.as_ref().unwrap().special.turn_start.unwrap();
    let req = |k: u32, tail: u32| Request {
        input_ids: (0..12)
            .map(|i| 282 + k * 13 + i)
            .chain([turn, tail, tail + 1])
            .collect(),
        soft: SoftTokens::default(),
        max_new_tokens: 4,
        sampling: Sampling::default(),
    };
    for k in 0..3 {
        let out = g
            .generate(&[req(k, 300), req(k, 310)], CHUNK, &mut |_, _| {})
            .unwrap();
        assert!(out.iter().all(|x| x.cached_prompt_tokens == 12), "k {k}");
    }
    assert_eq!(g.prefixes.kept().len(), 2);
    assert_eq!(g.prefixes.stats().evicted, 1);
    let want = baseline(&g, &[req(0, 320)]);
    let out = g.generate(&[req(0, 320)], CHUNK, &mut |_, _| {}).unwrap();
    assert_eq!(tokens(&out), want);
    assert_eq!(out[0].cached_prompt_tokens, 12);
    assert_eq!(g.prefixes.stats().prefixes_built, 4);
}

/// A request's answer does not depend on what the process generated before: alone on a fresh
/// model (its prefix computed for it) and after requests that made its prefix kept (copied),
/// a long greedy answer of a random model, which any rounding difference changes, is the
/// same. A resumed recording or one shard of a fleet answers as a single run does.
#[test]
fn answers_do_not_depend_on_what_came_before() {
    let dir = write_tiny_checkpoint(&temp_model_dir("prefix-hist"), &TinySpec::default()).unwrap();
    let turn = {
        let g = load(&dir, DType::F32);
        g.tokenizer.as_ref().unwrap().special.turn_start.unwrap()
    };
    let instr: Vec<u32> = (0..30).map(|i| 282 + ((i * 11) % 90) as u32).collect();
    let req = |tail: &[u32]| Request {
        input_ids: instr.iter().chain(&[turn]).chain(tail).copied().collect(),
        soft: SoftTokens::default(),
        max_new_tokens: 48,
        sampling: Sampling::default(),
    };
    let x = req(&[300, 301, 302, 303, 304, 305, 306, 307, 308, 309]);
    let alone = load(&dir, DType::F32);
    let first = alone
        .generate(std::slice::from_ref(&x), 7, &mut |_, _| {})
        .unwrap();
    assert_eq!(first[0].cached_prompt_tokens, 0);
    let busy = load(&dir, DType::F32);
    for tail in [[310u32, 311], [320, 321], [330, 331]] {
        busy.generate(&[req(&tail)], 5, &mut |_, _| {}).unwrap();
    }
    let later = busy
        .generate(std::slice::from_ref(&x), 7, &mut |_, _| {})
        .unwrap();
    assert_eq!(later[0].cached_prompt_tokens, 30);
    assert_eq!(later[0].output_ids.len(), 48);
    assert_eq!(later[0].output_ids, first[0].output_ids);
}
