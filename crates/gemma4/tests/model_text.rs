#![allow(clippy::unwrap_used)]
//! Decoder behaviour on tiny generated checkpoints: loader errors, cache vs recompute,
//! chunked prefill, batching, placement, templates, quantization.

use candle_core::{Device, Tensor};
use gemma4::generate::{Request, Sampling};
use gemma4::multimodal::{embed_prompt, SoftTokens};
use gemma4::testing::{temp_model_dir, tiny_tensors, write_tiny_checkpoint, TinySpec};
use gemma4::text::{LoadOptions, LogitRows, Segment, TextModel};
use gemma4::tokenizer::{ChatContent, ChatMessage};
use gemma4::{Gemma4, LoadError, Quant};

fn tiny(tag: &str, spec: &TinySpec) -> std::path::PathBuf {
    write_tiny_checkpoint(&temp_model_dir(tag), spec).unwrap()
}

fn load(dir: &std::path::Path) -> Gemma4 {
    Gemma4::load_dir(dir, &LoadOptions::default()).unwrap()
}

fn prompt(n: usize) -> Vec<u32> {
    // Printable-ASCII ids of the tiny vocabulary, deterministic.
    (0..n).map(|i| 282 + ((i * 7) % 90) as u32).collect()
}

/// Logits of every position from one fresh forward.
fn all_logits(m: &TextModel, ids: &[u32]) -> Vec<Vec<f32>> {
    let e = m.embed_tokens(ids).unwrap();
    let tp = m.ple_token_inputs(ids).unwrap();
    let p = m.ple_inputs(&e, tp.as_ref()).unwrap();
    let mut c = m.new_cache();
    let mut segs = [Segment {
        cache: &mut c,
        len: ids.len(),
        logits: LogitRows::All,
        block_ids: None,
    }];
    m.forward(&e, p.as_ref(), &mut segs).unwrap()[0]
        .to_vec2::<f32>()
        .unwrap()
}

/// Logits of the last row of each chunk, feeding `ids` in chunks of `chunk`.
fn chunked_logits(m: &TextModel, ids: &[u32], chunk: usize) -> Vec<(usize, Vec<f32>)> {
    let mut c = m.new_cache();
    let mut out = Vec::new();
    let mut s = 0;
    while s < ids.len() {
        let n = chunk.min(ids.len() - s);
        let part = &ids[s..s + n];
        let e = m.embed_tokens(part).unwrap();
        let tp = m.ple_token_inputs(part).unwrap();
        let p = m.ple_inputs(&e, tp.as_ref()).unwrap();
        let mut segs = [Segment {
            cache: &mut c,
            len: n,
            logits: LogitRows::Last,
            block_ids: None,
        }];
        let l = m.forward(&e, p.as_ref(), &mut segs).unwrap();
        out.push((s + n - 1, l[0].to_vec2::<f32>().unwrap().remove(0)));
        s += n;
    }
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn cached_decode_and_chunked_prefill_match_recompute() {
    let dir = tiny("cache", &TinySpec::default());
    let g = load(&dir);
    let ids = prompt(19); // window is 4: well past it, and the full-layer cache grows.
    let full = all_logits(&g.text, &ids);
    for chunk in [1, 3, 5, 19] {
        for (pos, l) in chunked_logits(&g.text, &ids, chunk) {
            let d = max_diff(&l, &full[pos]);
            assert!(d < 1e-4, "chunk {chunk} pos {pos}: diff {d}");
        }
    }
    // Logits must depend on the input (not a degenerate model).
    assert!(max_diff(&full[0], &full[1]) > 1e-3);
}

#[test]
fn sliding_cache_stays_bounded_by_the_window() {
    let spec = TinySpec::default();
    let dir = tiny("bounded", &spec);
    let g = load(&dir);
    let ids = prompt(40);
    let m = &g.text;
    let mut c = m.new_cache();
    for &t in &ids {
        let e = m.embed_tokens(&[t]).unwrap();
        let tp = m.ple_token_inputs(&[t]).unwrap();
        let p = m.ple_inputs(&e, tp.as_ref()).unwrap();
        let mut segs = [Segment {
            cache: &mut c,
            len: 1,
            logits: LogitRows::Last,
            block_ids: None,
        }];
        m.forward(&e, p.as_ref(), &mut segs).unwrap();
    }
    // Layer 0 is sliding (W = 4): at most W + slack (4) positions held, so it compacted
    // every few tokens; layer 2 is full: all 40.
    let w = spec.sliding_window;
    assert!(c.layer_len(0).unwrap() <= w + gemma4::text::sliding_slack(w));
    assert_eq!(c.layer_len(2), Some(40));
    // KV-shared layers own no cache.
    assert_eq!(c.layer_len(4), None);
    assert_eq!(c.pos, 40);
}

#[test]
fn batch_of_two_matches_single_runs() {
    let dir = tiny("batch", &TinySpec::default());
    let g = load(&dir);
    let a = Request {
        input_ids: prompt(9),
        soft: SoftTokens::default(),
        max_new_tokens: 7,
        sampling: Sampling::default(),
    };
    let b = Request {
        input_ids: prompt(14)[3..].to_vec(),
        soft: SoftTokens::default(),
        max_new_tokens: 5,
        sampling: Sampling {
            temperature: 0.9,
            top_p: 0.9,
            seed: 7,
        },
    };
    let mut streamed: Vec<Vec<u32>> = vec![vec![], vec![]];
    let batch = g
        .generate(&[a.clone(), b.clone()], 4, &mut |i, t| streamed[i].push(t))
        .unwrap();
    let sa = g.generate(&[a], 64, &mut |_, _| {}).unwrap();
    let sb = g.generate(&[b], 2, &mut |_, _| {}).unwrap();
    assert_eq!(batch[0].output_ids, sa[0].output_ids);
    assert_eq!(batch[1].output_ids, sb[0].output_ids);
    assert_eq!(streamed[0], batch[0].output_ids);
    assert_eq!(streamed[1], batch[1].output_ids);
    assert!(!batch[0].output_ids.is_empty());
}

#[test]
fn generation_stops_on_every_eos_id() {
    let dir = tiny("stop", &TinySpec::default());
    let g = load(&dir);
    let turn_end = g.tokenizer.as_ref().unwrap().special.turn_end.unwrap();
    assert!(g.stop_ids.contains(&1));
    assert!(g.stop_ids.contains(&turn_end));
    // Force a stop: make the first greedy token a stop id by declaring it one.
    let req = Request {
        input_ids: prompt(5),
        soft: SoftTokens::default(),
        max_new_tokens: 4,
        sampling: Sampling::default(),
    };
    let first = g
        .generate(std::slice::from_ref(&req), 8, &mut |_, _| {})
        .unwrap()[0]
        .output_ids[0];
    let mut opts = g.generate_options(8);
    opts.stop_ids.push(first);
    let out = gemma4::generate::generate_batch(&g.text, &opts, &[req], &mut |_, _| {}).unwrap();
    assert_eq!(out[0].output_ids, vec![first]);
    assert_eq!(out[0].stop, gemma4::generate::StopReason::Eos);
}

#[test]
fn per_layer_config_form_and_shards_load_identically() {
    let a = tiny("form-a", &TinySpec::default());
    let b = tiny(
        "form-b",
        &TinySpec {
            per_layer_config_form: true,
            sharded: true,
            ..TinySpec::default()
        },
    );
    let ids = prompt(6);
    let la = all_logits(&load(&a).text, &ids);
    let lb = all_logits(&load(&b).text, &ids);
    assert_eq!(la, lb);
}

#[test]
fn k_eq_v_and_global_kv_heads_run() {
    let spec = TinySpec {
        k_eq_v: true,
        global_kv_heads: Some(2),
        ..TinySpec::default()
    };
    let dir = tiny("keqv", &spec);
    let g = load(&dir);
    let ids = prompt(8);
    let full = all_logits(&g.text, &ids);
    for (pos, l) in chunked_logits(&g.text, &ids, 3) {
        assert!(max_diff(&l, &full[pos]) < 1e-4);
    }
}

#[test]
fn loader_errors_name_the_tensor_and_shapes() {
    let spec = TinySpec::default();
    // Missing tensor.
    let dir = temp_model_dir("missing");
    write_tiny_checkpoint(&dir, &spec).unwrap();
    let mut t = tiny_tensors(&spec).unwrap();
    t.remove("model.language_model.layers.1.mlp.up_proj.weight");
    candle_core::safetensors::save(&t.into_iter().collect(), dir.join("model.safetensors"))
        .unwrap();
    let e = Gemma4::load_dir(&dir, &LoadOptions::default())
        .err()
        .unwrap();
    assert!(
        matches!(&e, LoadError::MissingTensor { name } if name == "model.language_model.layers.1.mlp.up_proj.weight"),
        "{e}"
    );
    // Mis-shaped tensor.
    let mut t = tiny_tensors(&spec).unwrap();
    t.insert(
        "model.language_model.norm.weight".into(),
        Tensor::zeros(65, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t.into_iter().collect(), dir.join("model.safetensors"))
        .unwrap();
    let e = Gemma4::load_dir(&dir, &LoadOptions::default())
        .err()
        .unwrap();
    let msg = e.to_string();
    assert!(
        msg.contains("model.language_model.norm.weight")
            && msg.contains("[65]")
            && msg.contains("[64]"),
        "{msg}"
    );
    // Pickle checkpoints are refused.
    let pk = temp_model_dir("pickle");
    std::fs::create_dir_all(&pk).unwrap();
    std::fs::write(pk.join("config.json"), "{}").unwrap();
    std::fs::write(pk.join("pytorch_model.bin"), b"not really").unwrap();
    let e = Gemma4::load_dir(&pk, &LoadOptions::default())
        .err()
        .unwrap();
    assert!(matches!(e, LoadError::Pickle { .. }), "{e}");
    let e = Gemma4::load(
        pk.join("pytorch_model.bin").to_str().unwrap(),
        &LoadOptions::default(),
    )
    .err()
    .unwrap();
    assert!(matches!(e, LoadError::Pickle { .. }), "{e}");
}

#[test]
fn hub_cache_layout_is_found_offline() {
    let home = temp_model_dir("hfcache");
    let snap = home.join("hub/models--google--tiny-gemma4/snapshots/abc123");
    write_tiny_checkpoint(&snap, &TinySpec::default()).unwrap();
    std::fs::create_dir_all(home.join("hub/models--google--tiny-gemma4/refs")).unwrap();
    std::fs::write(
        home.join("hub/models--google--tiny-gemma4/refs/main"),
        "abc123",
    )
    .unwrap();
    std::env::set_var("HF_HUB_OFFLINE", "1");
    std::env::set_var("HF_HOME", &home);
    let files = gemma4::loader::ModelFiles::resolve("google/tiny-gemma4").unwrap();
    assert_eq!(files.dir, snap);
    // Unknown hub id with nothing cached, offline: a clear NotFound.
    let e = Gemma4::load("google/not-a-model", &LoadOptions::default())
        .err()
        .unwrap();
    assert!(matches!(e, LoadError::NotFound(_)), "{e}");
}

#[test]
fn soft_tokens_land_on_the_kth_placeholder() {
    let dir = tiny("place", &TinySpec::default());
    let g = load(&dir);
    let ph = g.placeholders();
    let h = 64;
    // text(5) image x3, text, image x2, audio x2, text
    let mut ids = prompt(5);
    ids.extend([ph.image; 3]);
    ids.push(300);
    ids.extend([ph.image; 2]);
    ids.extend([ph.audio; 2]);
    ids.push(301);
    let img1 = Tensor::randn(0f32, 1.0, (3, h), &Device::Cpu).unwrap();
    let img2 = Tensor::randn(0f32, 1.0, (2, h), &Device::Cpu).unwrap();
    let aud = Tensor::randn(0f32, 1.0, (2, h), &Device::Cpu).unwrap();
    let soft = SoftTokens {
        images: vec![img1.clone(), img2.clone()],
        videos: vec![],
        audios: vec![aud.clone()],
    };
    let pe = embed_prompt(&g.text, &ids, &soft, &ph).unwrap();
    let e = pe.embeds.to_vec2::<f32>().unwrap();
    let i1 = img1.to_vec2::<f32>().unwrap();
    let i2 = img2.to_vec2::<f32>().unwrap();
    let a = aud.to_vec2::<f32>().unwrap();
    assert_eq!(e[5], i1[0]);
    assert_eq!(e[7], i1[2]);
    assert_eq!(e[9], i2[0]);
    assert_eq!(e[10], i2[1]);
    assert_eq!(e[11], a[0]);
    assert_eq!(e[12], a[1]);
    let text_row = g
        .text
        .embed_tokens(&[300])
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(e[8], text_row[0]);
    // PLE token part uses the pad id at placeholders.
    let llm: Vec<u32> = ids
        .iter()
        .map(|&t| {
            if t == ph.image || t == ph.audio {
                ph.pad
            } else {
                t
            }
        })
        .collect();
    let tp = g.text.ple_token_inputs(&llm).unwrap();
    let want = g.text.ple_inputs(&pe.embeds, tp.as_ref()).unwrap().unwrap();
    let got = pe.ple.unwrap();
    assert_eq!(
        want.to_vec3::<f32>().unwrap(),
        got.to_vec3::<f32>().unwrap()
    );
    assert_eq!(&pe.block_ids[4..11], &[-1, 0, 0, 0, -1, 1, 1]);
    // Count mismatch is an error, not a panic.
    let bad = SoftTokens {
        images: vec![img1],
        videos: vec![],
        audios: vec![aud],
    };
    assert!(embed_prompt(&g.text, &ids, &bad, &ph).is_err());
    // Multimodal requests run through generation, batched with a text-only one.
    let r1 = Request {
        input_ids: ids.clone(),
        soft,
        max_new_tokens: 3,
        sampling: Sampling::default(),
    };
    let r2 = Request {
        input_ids: prompt(4),
        soft: SoftTokens::default(),
        max_new_tokens: 3,
        sampling: Sampling::default(),
    };
    let both = g.generate(&[r1.clone(), r2], 4, &mut |_, _| {}).unwrap();
    let single = g.generate(&[r1], 16, &mut |_, _| {}).unwrap();
    assert_eq!(both[0].output_ids, single[0].output_ids);
}

#[test]
fn vision_bidirectional_mask_changes_image_rows_only_when_enabled() {
    let spec = TinySpec {
        bidirectional: Some("vision"),
        ..TinySpec::default()
    };
    let dir = tiny("bidir", &spec);
    let g = load(&dir);
    assert!(g.text.bidirectional_vision());
    let ph = g.placeholders();
    let mut ids = prompt(3);
    ids.extend([ph.image; 3]);
    ids.extend(prompt(2));
    let img = Tensor::randn(0f32, 1.0, (3, 64), &Device::Cpu).unwrap();
    let soft = SoftTokens {
        images: vec![img],
        ..SoftTokens::default()
    };
    let r = Request {
        input_ids: ids,
        soft,
        max_new_tokens: 3,
        sampling: Sampling::default(),
    };
    // A chunk size that would split the image block must give the same result.
    let a = g
        .generate(std::slice::from_ref(&r), 4, &mut |_, _| {})
        .unwrap();
    let b = g
        .generate(std::slice::from_ref(&r), 64, &mut |_, _| {})
        .unwrap();
    assert_eq!(a[0].output_ids, b[0].output_ids);
}

#[test]
fn chat_template_renders_the_gemma4_prompt() {
    let dir = tiny("tmpl", &TinySpec::default());
    let g = load(&dir);
    let tok = g.tokenizer.as_ref().unwrap();
    let msgs = vec![
        ChatMessage::system("Be brief."),
        ChatMessage::user(vec![
            ChatContent::Image,
            ChatContent::Text("Describe.".into()),
        ]),
    ];
    let s = tok.render_chat(&msgs, true, false).unwrap();
    assert_eq!(
        s,
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\n\n\n<|image|>\n\nDescribe.<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    );
    let ex = tok
        .expand_media(&s, &[gemma4::tokenizer::MediaItem::Image { tokens: 2 }])
        .unwrap();
    assert!(ex.contains("<|image><|image|><|image|><image|>"));
    let ids = tok.encode(&ex).unwrap();
    assert_eq!(ids[0], tok.special.bos);
    assert_eq!(ids.iter().filter(|&&t| t == tok.special.image).count(), 2);
    assert_eq!(ids.iter().filter(|&&t| t == tok.special.boi).count(), 1);
    assert_eq!(tok.decode(&ids, false).unwrap(), ex);
    let audio = tok
        .render_chat(
            &[ChatMessage::user(vec![
                ChatContent::Audio,
                ChatContent::Text("Transcribe".into()),
            ])],
            true,
            true,
        )
        .unwrap();
    assert_eq!(audio, "<bos><|turn>system\n<|think|><turn|>\n<|turn>user\n<|audio|>Transcribe<turn|>\n<|turn>model\n");
}

#[test]
fn q8_0_weights_stay_close_to_f32() {
    // PLE width 16: 6 layers x 16 = 96 columns, so the PLE table is quantized in row chunks.
    let dir = tiny(
        "q8",
        &TinySpec {
            ple_dim: 16,
            ..TinySpec::default()
        },
    );
    let ids = prompt(7);
    let f = all_logits(&load(&dir).text, &ids);
    let q = Gemma4::load_dir(
        &dir,
        &LoadOptions {
            quant: Quant::Q8_0,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    assert!(q.text.weight_bytes() < load(&dir).text.weight_bytes() / 2);
    let lq = all_logits(&q.text, &ids);
    for (a, b) in f.iter().zip(&lq) {
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
        // Random tiny weights amplify rounding through 6 layers; real checkpoints drift less.
        assert!(
            max_diff(a, b) < 0.2 * scale,
            "q8_0 drifted: {} of {scale}",
            max_diff(a, b)
        );
    }
    let bf = Gemma4::load_dir(
        &dir,
        &LoadOptions {
            quant: Quant::Bf16,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let lb = all_logits(&bf.text, &ids);
    let scale = f[6].iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(max_diff(&f[6], &lb[6]) < 0.2 * scale);
}

#[test]
fn q4k_loads_and_generates() {
    // Q4K needs rows of 256: hidden 256 and a PLE table of 6 x 128 columns.
    let spec = TinySpec {
        hidden: 256,
        intermediate: 256,
        ple_dim: 128,
        ..TinySpec::default()
    };
    let dir = tiny("q4k", &spec);
    let f = load(&dir);
    let q = Gemma4::load_dir(
        &dir,
        &LoadOptions {
            quant: Quant::Q4K,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    assert!(q.text.weight_bytes() * 4 < f.text.weight_bytes());
    let ids = prompt(6);
    let (lf, lq) = (all_logits(&f.text, &ids), all_logits(&q.text, &ids));
    assert!(lq.iter().flatten().all(|x| x.is_finite()));
    let scale = lf[5].iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(max_diff(&lf[5], &lq[5]) < 0.5 * scale);
    let r = Request {
        input_ids: ids,
        soft: SoftTokens::default(),
        max_new_tokens: 3,
        sampling: Sampling::default(),
    };
    assert_eq!(
        q.generate(&[r], 4, &mut |_, _| {}).unwrap()[0]
            .output_ids
            .len(),
        3
    );
}
