#![allow(clippy::unwrap_used)]
//! The Gemma 4 12B architecture (`gemma4_unified`) on tiny generated checkpoints
//! (seeded random weights, hub tensor names; `TinySpec::unified()`): config forms, cache vs
//! recompute, the sliding window in prefill and cached decode, the unified vision mask,
//! batching, soft-token counts and loader errors. Runs in CI without any fixture.

use candle_core::{Device, Tensor};
use gemma4::config::{Arch, KvSource};
use gemma4::generate::{Request, Sampling};
use gemma4::media::TowerEncoder;
use gemma4::multimodal::{embed_prompt, MediaEncoder, SoftTokens};
use gemma4::preprocess::image::RgbImage;
use gemma4::preprocess::unified::{audio_token_count, image_token_count, MAX_AUDIO_TOKENS};
use gemma4::testing::{temp_model_dir, tiny_tensors, write_tiny_checkpoint, TinySpec};
use gemma4::text::{LoadOptions, LogitRows, Segment, TextModel, VisionMask};
use gemma4::{Gemma4, LoadError, ModelError};

fn tiny(tag: &str, spec: &TinySpec) -> std::path::PathBuf {
    write_tiny_checkpoint(&temp_model_dir(tag), spec).unwrap()
}

fn load(dir: &std::path::Path) -> Gemma4 {
    Gemma4::load_dir(dir, &LoadOptions::default()).unwrap()
}

fn prompt(n: usize) -> Vec<u32> {
    (0..n).map(|i| 282 + ((i * 7) % 90) as u32).collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn all_logits(m: &TextModel, ids: &[u32]) -> Vec<Vec<f32>> {
    let e = m.embed_tokens(ids).unwrap();
    let mut c = m.new_cache();
    let mut segs = [Segment {
        cache: &mut c,
        len: ids.len(),
        logits: LogitRows::All,
        block_ids: None,
    }];
    m.forward(&e, None, &mut segs).unwrap()[0]
        .to_vec2::<f32>()
        .unwrap()
}

fn greedy(input_ids: Vec<u32>, soft: SoftTokens, max_new_tokens: usize) -> Request {
    Request {
        input_ids,
        soft,
        max_new_tokens,
        sampling: Sampling::default(),
    }
}

/// A synthetic RGB image with some structure.
fn image(w: usize, h: usize, seed: u8) -> RgbImage {
    let data = (0..w * h * 3)
        .map(|i| ((i * 31 + (i / (w * 3)) * 7) as u8).wrapping_add(seed))
        .collect();
    RgbImage::new(w, h, data)
}

#[test]
fn both_config_forms_and_shards_load_identically() {
    let a = tiny("u-form-a", &TinySpec::unified());
    let b = tiny(
        "u-form-b",
        &TinySpec {
            per_layer_config_form: true,
            sharded: true,
            ..TinySpec::unified()
        },
    );
    let (ga, gb) = (load(&a), load(&b));
    for g in [&ga, &gb] {
        assert_eq!(g.config.arch, Arch::Gemma4Unified);
        assert_eq!(g.config.text_config.ple_dim(), None);
        assert_eq!(g.text.vision_mask(), VisionMask::BlockEverywhere);
        let s = g.text.specs();
        assert_eq!(
            (s[0].num_kv_heads, s[0].head_dim, s[0].k_eq_v),
            (2, 16, false)
        );
        assert_eq!(
            (s[2].num_kv_heads, s[2].head_dim, s[2].k_eq_v),
            (1, 32, true)
        );
        assert!(s.iter().all(|s| s.kv == KvSource::Own));
    }
    assert_eq!(ga.text.specs(), gb.text.specs());
    let ids = prompt(9);
    assert_eq!(all_logits(&ga.text, &ids), all_logits(&gb.text, &ids));
}

#[test]
fn cached_decode_and_chunked_prefill_match_recompute() {
    let g = load(&tiny("u-cache", &TinySpec::unified()));
    let m = &g.text;
    let ids = prompt(19); // window 4: far past it
    let full = all_logits(m, &ids);
    for chunk in [1, 3, 5, 19] {
        let mut c = m.new_cache();
        let mut s = 0;
        while s < ids.len() {
            let n = chunk.min(ids.len() - s);
            let e = m.embed_tokens(&ids[s..s + n]).unwrap();
            let mut segs = [Segment {
                cache: &mut c,
                len: n,
                logits: LogitRows::All,
                block_ids: None,
            }];
            let l = m.forward(&e, None, &mut segs).unwrap()[0]
                .to_vec2::<f32>()
                .unwrap();
            for (j, row) in l.iter().enumerate() {
                let d = max_diff(row, &full[s + j]);
                assert!(d < 1e-4, "chunk {chunk} pos {}: {d}", s + j);
            }
            s += n;
        }
        // Sliding layers hold a bounded cache, full layers everything.
        assert!(c.layer_len(0).unwrap() <= 2 * 4 + chunk);
        assert_eq!(c.layer_len(2), Some(19));
    }
    assert!(max_diff(&full[0], &full[1]) > 1e-3);
}

/// Layer-0 (sliding) outputs after feeding `ids`, prefill or one token at a time.
fn layer0(
    m: &TextModel,
    ids: &[u32],
    block_ids: Option<Vec<i64>>,
    soft: Option<&Tensor>,
) -> Vec<Vec<f32>> {
    let mut e = m.embed_tokens(ids).unwrap();
    if let Some(s) = soft {
        e = s.clone();
    }
    let mut c = m.new_cache();
    let mut segs = [Segment {
        cache: &mut c,
        len: ids.len(),
        logits: LogitRows::None,
        block_ids,
    }];
    let (_, trace) = m.forward_traced(&e, None, &mut segs).unwrap();
    trace[1].to_vec2::<f32>().unwrap()
}

fn layer0_decoded(m: &TextModel, ids: &[u32]) -> Vec<Vec<f32>> {
    let mut c = m.new_cache();
    let mut out = Vec::new();
    for &t in ids {
        let e = m.embed_tokens(&[t]).unwrap();
        let mut segs = [Segment {
            cache: &mut c,
            len: 1,
            logits: LogitRows::Last,
            block_ids: None,
        }];
        let (_, trace) = m.forward_traced(&e, None, &mut segs).unwrap();
        out.push(trace[1].to_vec2::<f32>().unwrap().remove(0));
    }
    out
}

/// Perturbing the token at position k changes the sliding layer's output at exactly the
/// positions k..k+W-1 (W keys per query, the query included), in prefill and in cached
/// one-token decode alike.
#[test]
fn sliding_window_is_exactly_w_keys_in_prefill_and_cached_decode() {
    let spec = TinySpec::unified();
    let w = spec.sliding_window;
    let g = load(&tiny("u-window", &spec));
    let m = &g.text;
    let ids = prompt(16);
    let k = 5;
    let mut pert = ids.clone();
    pert[k] = 300;
    for (what, a, b) in [
        (
            "prefill",
            layer0(m, &ids, None, None),
            layer0(m, &pert, None, None),
        ),
        ("decode", layer0_decoded(m, &ids), layer0_decoded(m, &pert)),
    ] {
        let changed: Vec<usize> = (0..ids.len())
            .filter(|&q| max_diff(&a[q], &b[q]) > 0.0)
            .collect();
        assert_eq!(changed, (k..k + w).collect::<Vec<_>>(), "{what}");
    }
    // Prefill and cached decode agree row by row.
    let (p, d) = (layer0(m, &ids, None, None), layer0_decoded(m, &ids));
    for q in 0..ids.len() {
        assert!(max_diff(&p[q], &d[q]) < 1e-5, "row {q}");
    }
}

/// The unified model's mask: image tokens see their whole image on every layer (beyond the
/// window, and forward); the text after the image still sees only W keys.
#[test]
fn image_tokens_see_their_whole_image_beyond_the_window() {
    let spec = TinySpec::unified();
    let g = load(&tiny("u-vmask", &spec));
    let m = &g.text;
    let ph = g.placeholders();
    // text x3, image x7 (longer than W = 4), text x4
    let mut ids = prompt(3);
    ids.extend([ph.image; 7]);
    ids.extend(prompt(4));
    let soft = Tensor::randn(0f32, 1.0, (7, spec.hidden), &Device::Cpu).unwrap();
    let pe = embed_prompt(
        m,
        &ids,
        &SoftTokens {
            images: vec![soft.clone()],
            ..Default::default()
        },
        &ph,
    )
    .unwrap();
    assert_eq!(pe.block_ids[3..10], [0; 7]);
    let run = |emb: &Tensor| layer0(m, &ids, Some(pe.block_ids.clone()), Some(emb));
    let base = run(&pe.embeds);
    // Perturb the first image row: every image row changes (rows 7..9 are > W-1 after it),
    // text rows change only within the window (10..=12 would be 4..6 back).
    let mut rows: Vec<Tensor> = (0..ids.len()).map(|i| pe.embeds.get(i).unwrap()).collect();
    rows[3] = (&rows[3] + 1.0).unwrap();
    let pert = Tensor::stack(&rows, 0).unwrap();
    let out = run(&pert);
    let changed: Vec<usize> = (0..ids.len())
        .filter(|&q| max_diff(&base[q], &out[q]) > 0.0)
        .collect();
    assert_eq!(changed, (3..10).collect::<Vec<_>>());
    // Perturb the last image row: earlier image rows see it (forward attention).
    let mut rows2: Vec<Tensor> = (0..ids.len()).map(|i| pe.embeds.get(i).unwrap()).collect();
    rows2[9] = (&rows2[9] + 1.0).unwrap();
    let out2 = run(&Tensor::stack(&rows2, 0).unwrap());
    assert!(max_diff(&base[3], &out2[3]) > 0.0);
    // Text row 2 (before the image) is untouched.
    assert_eq!(max_diff(&base[2], &out2[2]), 0.0);
}

#[test]
fn batch_of_two_matches_single_runs_with_media() {
    let g = load(&tiny("u-batch", &TinySpec::unified()));
    let enc = TowerEncoder::new(70);
    let img = enc.encode_rgb(&g, &image(100, 60, 3), 70).unwrap();
    let aud = enc.encode_samples(&g, &vec![0.25f32; 2000]).unwrap();
    assert_eq!(aud.dim(0).unwrap(), 4);
    let ph = g.placeholders();
    let mut ids = prompt(4);
    ids.extend(std::iter::repeat_n(ph.image, img.dim(0).unwrap()));
    ids.extend(prompt(3));
    ids.extend([ph.audio; 4]);
    ids.extend(prompt(2));
    let a = Request {
        input_ids: ids,
        soft: SoftTokens {
            images: vec![img],
            videos: vec![],
            audios: vec![aud],
        },
        max_new_tokens: 6,
        sampling: Sampling::default(),
    };
    let b = Request {
        input_ids: prompt(11),
        soft: SoftTokens::default(),
        max_new_tokens: 5,
        sampling: Sampling {
            temperature: 0.9,
            top_p: 0.9,
            seed: 7,
        },
    };
    let batch = g
        .generate(&[a.clone(), b.clone()], 4, &mut |_, _| {})
        .unwrap();
    let sa = g.generate(&[a], 64, &mut |_, _| {}).unwrap();
    let sb = g.generate(&[b], 3, &mut |_, _| {}).unwrap();
    assert_eq!(batch[0].output_ids, sa[0].output_ids);
    assert_eq!(batch[1].output_ids, sb[0].output_ids);
    assert_eq!(batch[0].output_ids.len(), 6);
}

/// Attention in blocks of query rows (what bounds a long prompt's score buffers) computes
/// the same as one block: here one row per block, with an image (bidirectional block mask),
/// audio and a batch of two with different lengths.
#[test]
fn attention_in_query_blocks_matches_one_block() {
    // In float64, so that only a real difference (not f32 summation order) shows.
    let mut g = Gemma4::load_dir(
        &tiny("u-qblocks", &TinySpec::unified()),
        &LoadOptions {
            dtype: candle_core::DType::F64,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let enc = TowerEncoder::new(70);
    let img = enc.encode_rgb(&g, &image(100, 60, 5), 70).unwrap();
    let aud = enc.encode_samples(&g, &vec![0.1f32; 2000]).unwrap();
    let ph = g.placeholders();
    let mut ids = prompt(4);
    ids.extend(std::iter::repeat_n(ph.image, img.dim(0).unwrap()));
    ids.extend(prompt(3));
    ids.extend(std::iter::repeat_n(ph.audio, aud.dim(0).unwrap()));
    ids.extend(prompt(2));
    let soft = SoftTokens {
        images: vec![img],
        videos: vec![],
        audios: vec![aud],
    };
    let (a, b) = (
        greedy(ids.clone(), soft.clone(), 6),
        greedy(prompt(11), SoftTokens::default(), 5),
    );
    let whole = g
        .prompt_logits(&ids, &soft)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let gen_whole = g
        .generate(&[a.clone(), b.clone()], 64, &mut |_, _| {})
        .unwrap();
    g.text.set_score_block_bytes(1);
    let rows = g
        .prompt_logits(&ids, &soft)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let gen_rows = g.generate(&[a, b], 64, &mut |_, _| {}).unwrap();
    assert_eq!(whole.len(), ids.len());
    for (q, (x, y)) in whole.iter().zip(&rows).enumerate() {
        let d = max_diff(x, y);
        assert!(d < 1e-6, "row {q}: {d}");
    }
    assert_eq!(gen_whole[0].output_ids, gen_rows[0].output_ids);
    assert_eq!(gen_whole[1].output_ids, gen_rows[1].output_ids);
}

#[test]
fn soft_token_counts_follow_the_processor() {
    // A position table as long as the tallest test image (the 12B's has 1120 rows).
    let spec = TinySpec {
        mm_posemb_size: 64,
        ..TinySpec::unified()
    };
    let g = load(&tiny("u-counts", &spec));
    let enc = TowerEncoder::new(70);
    for (w, h) in [(100, 60), (48, 48), (640, 480), (30, 900)] {
        for budget in [70, 140] {
            let t = enc.encode_rgb(&g, &image(w, h, 1), budget).unwrap();
            let n = image_token_count(h, w, budget).unwrap();
            assert_eq!(t.dims(), &[n, 64], "{w}x{h} at {budget}");
            assert!(n <= budget);
        }
    }
    // 480x640 at 280 -> 672x912 -> 14 x 19 merged patches.
    assert_eq!(image_token_count(480, 640, 280).unwrap(), 266);
    // Audio: one token per 640 samples, rounded up; items of at most 750 tokens.
    for n in [1usize, 639, 640, 641, 16000] {
        let t = enc.encode_samples(&g, &vec![0.1f32; n]).unwrap();
        assert_eq!(t.dim(0).unwrap(), audio_token_count(n, 640));
        assert_eq!(t.dim(0).unwrap(), n.div_ceil(640));
    }
    let long = vec![0.1f32; 640 * (MAX_AUDIO_TOKENS + 10)];
    let first = enc.encode_samples(&g, &long).unwrap();
    assert_eq!(first.dim(0).unwrap(), MAX_AUDIO_TOKENS);
    // A placeholder count that disagrees with the soft tokens is an error, not a panic.
    let ph = g.placeholders();
    let mut ids = prompt(2);
    ids.extend([ph.audio; 3]);
    let e = embed_prompt(
        &g.text,
        &ids,
        &SoftTokens {
            audios: vec![enc.encode_samples(&g, &vec![0.1f32; 640 * 4]).unwrap()],
            ..Default::default()
        },
        &ph,
    )
    .err()
    .unwrap();
    assert!(
        matches!(
            e,
            ModelError::Placeholders {
                modality: "audio",
                placeholders: 3,
                soft_tokens: 4
            }
        ),
        "{e}"
    );
}

#[test]
fn loader_errors_name_the_tensor_and_shapes() {
    let spec = TinySpec::unified();
    // A missing decoder tensor fails the load with its full name.
    let dir = temp_model_dir("u-missing");
    write_tiny_checkpoint(&dir, &spec).unwrap();
    let mut t = tiny_tensors(&spec).unwrap();
    t.remove("model.language_model.layers.2.self_attn.k_proj.weight");
    candle_core::safetensors::save(&t.into_iter().collect(), dir.join("model.safetensors"))
        .unwrap();
    let e = Gemma4::load_dir(&dir, &LoadOptions::default())
        .err()
        .unwrap();
    assert!(
        matches!(&e, LoadError::MissingTensor { name } if name == "model.language_model.layers.2.self_attn.k_proj.weight"),
        "{e}"
    );
    // Embedders load lazily: a missing or mis-shaped media tensor is a clear error on first use.
    let mut t = tiny_tensors(&spec).unwrap();
    t.remove("model.embed_audio.embedding_projection.weight");
    t.insert(
        "model.vision_embedder.pos_embedding".into(),
        Tensor::zeros((32, 2, 15), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t.into_iter().collect(), dir.join("model.safetensors"))
        .unwrap();
    let g = load(&dir);
    let enc = TowerEncoder::new(70);
    let e = enc
        .encode_samples(&g, &[0.0; 640])
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("model.embed_audio.embedding_projection.weight"),
        "{e}"
    );
    let e = enc
        .encode_rgb(&g, &image(48, 48, 0), 70)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("model.vision_embedder.pos_embedding")
            && e.contains("[32, 2, 15]")
            && e.contains("[32, 2, 16]"),
        "{e}"
    );
    // A merged-patch grid taller than the position table is refused (the reference would
    // index out of bounds): 30x900 at 70 tokens is 1 x 45 patches, the table has 32 rows.
    let g = load(&tiny("u-posemb", &spec));
    let e = enc
        .encode_rgb(&g, &image(30, 900, 0), 70)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("position table"), "{e}");
    // Pickle-only folders are refused by the same loader.
    let pk = temp_model_dir("u-pickle");
    std::fs::create_dir_all(&pk).unwrap();
    std::fs::write(
        pk.join("config.json"),
        r#"{"model_type":"gemma4_unified","text_config":{}}"#,
    )
    .unwrap();
    std::fs::write(pk.join("pytorch_model.bin"), b"not really").unwrap();
    let e = Gemma4::load_dir(&pk, &LoadOptions::default())
        .err()
        .unwrap();
    assert!(matches!(e, LoadError::Pickle { .. }), "{e}");
}

#[test]
fn config_errors_are_clear() {
    use gemma4::config::Gemma4Config;
    let e = Gemma4Config::from_json_str(r#"{"model_type":"gemma5","text_config":{}}"#, "c.json")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("gemma5") && e.contains("gemma4_unified"), "{e}");
    let e = Gemma4Config::from_json_str(
        r#"{"model_type":"gemma4_unified","text_config":{},"vision_config":{"mm_embed_dim":8,"output_proj_dims":16}}"#,
        "c.json",
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("output_proj_dims"), "{e}");
    // Upstream defaults of the unified text config (no PLE, window 1024, vision mask), and
    // the default 12B layer pattern: one full layer in six.
    let c = Gemma4Config::from_json_str(
        r#"{"model_type":"gemma4_unified","text_config":{"num_hidden_layers":12,"attention_k_eq_v":true,"num_global_key_value_heads":1}}"#,
        "c.json",
    )
    .unwrap();
    let t = &c.text_config;
    assert_eq!((t.ple_dim(), t.sliding_window), (None, 1024));
    assert_eq!(t.use_bidirectional_attention.as_deref(), Some("vision"));
    let s = t.layer_specs().unwrap();
    assert_eq!(s[5].head_dim, 512);
    assert_eq!(s[5].num_kv_heads, 1);
    assert!(s[5].k_eq_v && s[5].sliding_window.is_none() && s[4].sliding_window == Some(1024));
    // A bare unified text config is accepted (no media).
    let c =
        Gemma4Config::from_json_str(r#"{"model_type":"gemma4_unified_text"}"#, "c.json").unwrap();
    assert_eq!(c.arch, Arch::Gemma4Unified);
    assert!(c.unified_vision.is_none());
}

#[test]
fn quantized_unified_model_generates() {
    let spec = TinySpec {
        hidden: 256,
        intermediate: 256,
        ..TinySpec::unified()
    };
    let dir = tiny("u-q8", &spec);
    let f = Gemma4::load_dir(&dir, &LoadOptions::default()).unwrap();
    let q = Gemma4::load_dir(
        &dir,
        &LoadOptions {
            quant: gemma4::Quant::Q8_0,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let ids = prompt(10);
    let (lf, lq) = (all_logits(&f.text, &ids), all_logits(&q.text, &ids));
    assert!(q.text.weight_bytes() < f.text.weight_bytes() / 2);
    for (a, b) in lf.iter().zip(&lq) {
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
        // Random tiny weights amplify rounding through 6 layers; real checkpoints drift less.
        assert!(
            max_diff(a, b) < 0.2 * scale,
            "q8_0 drifted: {} of {scale}",
            max_diff(a, b)
        );
    }
    let enc = TowerEncoder::new(70);
    let img = enc.encode_rgb(&q, &image(64, 64, 9), 70).unwrap();
    assert_eq!(img.dims(), &[image_token_count(64, 64, 70).unwrap(), 256]);
}

#[test]
fn encode_image_and_audio_files() {
    let g = load(&tiny("u-files", &TinySpec::unified()));
    let dir = temp_model_dir("u-media");
    std::fs::create_dir_all(&dir).unwrap();
    let png = dir.join("x.png");
    let img = image(200, 120, 5);
    ::image::RgbImage::from_raw(200, 120, img.data.clone())
        .unwrap()
        .save(&png)
        .unwrap();
    let enc = TowerEncoder::new(70);
    let t = enc.encode_image(&g, &png).unwrap();
    assert_eq!(t.dim(0).unwrap(), image_token_count(120, 200, 70).unwrap());
    let e = enc
        .encode_image(&g, &dir.join("nope.png"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("nope.png"), "{e}");
}

/// A prompt that cannot fit the context is refused before any prefill, in one line.
#[test]
fn prompt_past_max_context_is_refused_up_front() {
    let g = Gemma4::load_dir(
        &tiny("u-ctx", &TinySpec::unified()),
        &LoadOptions {
            max_context: 16,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let r = greedy(prompt(16), SoftTokens::default(), 4);
    let e = g.generate(&[r], 4, &mut |_, _| {}).unwrap_err().to_string();
    assert!(
        e.contains("prompt of 16 tokens does not fit max_context 16"),
        "{e}"
    );
    assert!(!e.contains('\n'), "{e}");
}
