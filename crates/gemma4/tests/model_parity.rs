#![allow(clippy::unwrap_used)]
//! Golden parity with the Python reference (transformers 5.24.0, eager).
//!
//! Fixture: `tests/fixtures/gemma4/` (made by the parity helper): a tiny
//! `Gemma4ForConditionalGeneration` saved with `save_pretrained` (bf16 on disk,
//! `per_layer_config` form, K=V on full layers, KV sharing, double-wide MLP, PLE, window 8),
//! all-position logits and 12 greedy tokens per case. Image/audio cases feed the reference's
//! own soft tokens (after the embedders), so this checks placement + decoder exactly.
//!
//! The stored logits are the reference run in float64 (`tests/parity/golden_f64.py`): its
//! float32 run is itself 6.9e-5..2.1e-4 away from them on this random model, so a 1e-4
//! bound against float32 would measure two roundings. percept loaded in float64 must match
//! them within 1e-4; in float32 (what runs in production) within the float32 noise floor.

mod golden;

use std::path::PathBuf;

use candle_core::DType;
use gemma4::generate::{generate_batch, Request, Sampling};
use gemma4::multimodal::{embed_prompt, SoftTokens};
use gemma4::text::{LogitRows, Segment};
use golden::{case, ids_of, max_diff, Fixture};

/// Max absolute logit difference allowed for percept in float64 against the reference in
/// float64 (both also keep norms, softmax and RoPE in float64; measured <= 2.4e-6, the
/// float32 storage of the reference's logits).
const LOGIT_TOL_F64: f32 = 1e-4;

/// The same for percept in float32 (logits are soft-capped at 30). Measured 7.3e-5..2.5e-4,
/// the distance of the reference's own float32 run (6.9e-5..2.1e-4): it grows with the
/// attention span, as attention with scaling 1.0 amplifies rounding. Against the reference
/// in float32, percept's float32 logits were within 1.13e-4.
const LOGIT_TOL_F32: f32 = 4e-4;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemma4")
}

fn open() -> Fixture {
    open_as(DType::F32)
}

fn open_as(dtype: DType) -> Fixture {
    Fixture::load(&fixture(), dtype)
}

fn soft_of(f: &Fixture, c: &serde_json::Value) -> SoftTokens {
    let t = &c["tensors"];
    let get = |k: &str| t[k].as_str().map(|n| f.expected[n].clone());
    SoftTokens {
        images: get("image_soft_tokens").into_iter().collect(),
        videos: vec![],
        audios: get("audio_soft_tokens").into_iter().collect(),
    }
}

fn check_case(f: &Fixture, name: &str) {
    let c = case(f, name);
    let m = &f.model;
    let ph = m.placeholders();
    let soft = soft_of(f, c);
    let logits_name = c["tensors"]["logits"].as_str().unwrap();
    // The float32 run's 12th image token is a near tie (gap 2.3e-5) that float64 decides the
    // other way; a float64 model follows the reference's float64 greedy tokens.
    let gen_key = if m.text.dtype() == DType::F64 {
        "generated_f64"
    } else {
        "generated"
    };
    let gen_name = c["tensors"][gen_key].as_str().unwrap();
    let rows = c["input_ids"].as_array().unwrap().len();
    let mut requests = Vec::new();
    for row in 0..rows {
        let (ids, pad) = ids_of(c, row);
        // All-position logits from one prefill.
        let pe = embed_prompt(&m.text, &ids, &soft, &ph).unwrap();
        let mut cache = m.text.new_cache();
        let mut segs = [Segment {
            cache: &mut cache,
            len: ids.len(),
            logits: LogitRows::All,
            block_ids: None,
        }];
        let got = m
            .text
            .forward(&pe.embeds, pe.ple.as_ref(), &mut segs)
            .unwrap()
            .remove(0);
        let want = f.expected[logits_name]
            .get(row)
            .unwrap()
            .narrow(0, pad, ids.len())
            .unwrap();
        let d = max_diff(&got, &want);
        eprintln!("{name} row {row}: max logit diff {d}");
        if std::env::var("PARITY_DEBUG").is_ok() {
            for p in 0..ids.len() {
                let dp = max_diff(&got.get(p).unwrap(), &want.get(p).unwrap());
                let mx = want
                    .get(p)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                eprintln!("  pos {p}: diff {dp:.2e} max|logit| {mx:.2}");
            }
        }
        let tol = if m.text.dtype() == DType::F64 {
            LOGIT_TOL_F64
        } else {
            LOGIT_TOL_F32
        };
        assert!(d < tol, "{name} row {row}: logits differ by {d}");
        let want_gen: Vec<u32> = f.expected[gen_name]
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
    // Greedy tokens, with stop ids disabled as in the fixture, in one batch and chunked.
    let mut opts = m.generate_options(5);
    opts.stop_ids.clear();
    let reqs: Vec<Request> = requests.iter().map(|r| r.0.clone()).collect();
    let out = generate_batch(&m.text, &opts, &reqs, &mut |_, _| {}).unwrap();
    for (i, (o, (_, want))) in out.iter().zip(&requests).enumerate() {
        assert_eq!(&o.output_ids, want, "{name} row {i}: greedy tokens");
    }
}

#[test]
fn parity_text() {
    check_case(&open(), "text");
}

#[test]
fn parity_long_prompt_past_the_window() {
    check_case(&open(), "long");
}

#[test]
fn parity_batch_of_two() {
    check_case(&open(), "batch2");
}

#[test]
fn parity_image_soft_tokens() {
    check_case(&open(), "image");
}

#[test]
fn parity_audio_soft_tokens() {
    check_case(&open(), "audio");
}

#[test]
fn parity_image_and_audio_soft_tokens() {
    check_case(&open(), "image_audio");
}

#[test]
fn parity_in_float64_within_1e4_for_every_case() {
    let f = open_as(DType::F64);
    for name in ["text", "long", "batch2", "image", "audio", "image_audio"] {
        check_case(&f, name);
    }
}

#[test]
fn parity_prompt_text_tokenizes_to_the_reference_ids() {
    let f = open();
    let tok = f.model.tokenizer.as_ref().unwrap();
    for c in f.cases["cases"].as_array().unwrap() {
        if c["name"] == "image" || c["name"] == "image_audio" || c["name"] == "audio" {
            continue; // Expanded prompts; covered by the placement tests.
        }
        for (row, p) in c["prompt_text"].as_array().unwrap().iter().enumerate() {
            let (want, _) = ids_of(c, row);
            assert_eq!(
                tok.encode(p.as_str().unwrap()).unwrap(),
                want,
                "{}",
                c["name"]
            );
        }
    }
    // Special ids come from the shipped tokenizer.
    assert_eq!(tok.special.image, f.model.config.image_token_id);
    assert_eq!(f.model.stop_ids, vec![1, 106]);
}
