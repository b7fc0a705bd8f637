#![allow(clippy::unwrap_used)]
//! Tiny random vision/audio towers written with the official tensor names from a seeded
//! splitmix64 stream: shapes, soft-token counts per budget, invariances, timings.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use gemma4::audio::AudioTower;
use gemma4::config::{AudioConfig, VisionConfig};
use gemma4::loader::Weights;
use gemma4::preprocess::image::{preprocess, RgbImage};
use gemma4::preprocess::mel::{audio_token_count, MelExtractor};
use gemma4::rng::SplitMix64;
use gemma4::vision::VisionTower;

const TEXT_HIDDEN: usize = 64;

fn vision_cfg() -> VisionConfig {
    serde_json::from_value(serde_json::json!({
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16,
        "patch_size": 16, "pooling_kernel_size": 3, "position_embedding_size": 128,
        "use_clipped_linears": true, "standardize": true,
        "rope_parameters": {"rope_type": "axial", "rope_theta": 100.0}
    }))
    .unwrap()
}

fn audio_cfg() -> AudioConfig {
    serde_json::from_value(serde_json::json!({
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "subsampling_conv_channels": [128, 8], "conv_kernel_size": 5,
        "output_proj_dims": 48, "use_clipped_linears": true
    }))
    .unwrap()
}

struct Gen {
    rng: SplitMix64,
    t: BTreeMap<String, Tensor>,
}

impl Gen {
    fn put(&mut self, name: &str, shape: &[usize], scale: f64, offset: f32) {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| offset + self.rng.uniform(scale)).collect();
        self.t.insert(
            name.to_string(),
            Tensor::from_vec(v, shape, &Device::Cpu).unwrap(),
        );
    }
    fn lin(&mut self, name: &str, out: usize, inp: usize) {
        self.put(
            &format!("{name}.weight"),
            &[out, inp],
            (3.0 / inp as f64).sqrt(),
            0.0,
        );
    }
    fn clip(&mut self, name: &str, out: usize, inp: usize) {
        self.lin(&format!("{name}.linear"), out, inp);
        for (s, v) in [
            ("input_min", -4.0f32),
            ("input_max", 4.0),
            ("output_min", -4.0),
            ("output_max", 4.0),
        ] {
            self.t
                .insert(format!("{name}.{s}"), Tensor::new(v, &Device::Cpu).unwrap());
        }
    }
    fn norm(&mut self, name: &str, dim: usize) {
        self.put(&format!("{name}.weight"), &[dim], 0.5, 1.0);
    }
}

fn write_checkpoint(seed: u64) -> PathBuf {
    let (v, a) = (vision_cfg(), audio_cfg());
    let mut g = Gen {
        rng: SplitMix64(seed),
        t: BTreeMap::new(),
    };
    let p = "model.vision_tower";
    g.lin(&format!("{p}.patch_embedder.input_proj"), 32, 768);
    g.put(
        &format!("{p}.patch_embedder.position_embedding_table"),
        &[2, 128, 32],
        0.5,
        0.0,
    );
    for i in 0..2 {
        let l = format!("{p}.encoder.layers.{i}");
        for n in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            g.clip(&format!("{l}.self_attn.{n}"), 32, 32);
        }
        g.norm(&format!("{l}.self_attn.q_norm"), 16);
        g.norm(&format!("{l}.self_attn.k_norm"), 16);
        g.clip(&format!("{l}.mlp.gate_proj"), 64, 32);
        g.clip(&format!("{l}.mlp.up_proj"), 64, 32);
        g.clip(&format!("{l}.mlp.down_proj"), 32, 64);
        for n in [
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ] {
            g.norm(&format!("{l}.{n}"), 32);
        }
    }
    g.put(&format!("{p}.std_bias"), &[32], 0.5, 0.0);
    g.put(&format!("{p}.std_scale"), &[32], 0.5, 1.0);
    g.lin(
        "model.embed_vision.embedding_projection",
        TEXT_HIDDEN,
        v.hidden_size,
    );

    let p = "model.audio_tower";
    let s = format!("{p}.subsample_conv_projection");
    g.put(
        &format!("{s}.layer0.conv.weight"),
        &[128, 1, 3, 3],
        0.3,
        0.0,
    );
    g.norm(&format!("{s}.layer0.norm"), 128);
    g.put(
        &format!("{s}.layer1.conv.weight"),
        &[8, 128, 3, 3],
        0.05,
        0.0,
    );
    g.norm(&format!("{s}.layer1.norm"), 8);
    g.lin(&format!("{s}.input_proj_linear"), 32, 256);
    for i in 0..2 {
        let l = format!("{p}.layers.{i}");
        for ff in ["feed_forward1", "feed_forward2"] {
            g.clip(&format!("{l}.{ff}.ffw_layer_1"), 128, 32);
            g.clip(&format!("{l}.{ff}.ffw_layer_2"), 32, 128);
            g.norm(&format!("{l}.{ff}.pre_layer_norm"), 32);
            g.norm(&format!("{l}.{ff}.post_layer_norm"), 32);
        }
        for n in ["q_proj", "k_proj", "v_proj", "post"] {
            g.clip(&format!("{l}.self_attn.{n}"), 32, 32);
        }
        g.lin(&format!("{l}.self_attn.relative_k_proj"), 32, 32);
        g.put(&format!("{l}.self_attn.per_dim_scale"), &[16], 0.5, 0.0);
        g.clip(&format!("{l}.lconv1d.linear_start"), 64, 32);
        g.clip(&format!("{l}.lconv1d.linear_end"), 32, 32);
        g.put(
            &format!("{l}.lconv1d.depthwise_conv1d.weight"),
            &[32, 1, 5],
            0.4,
            0.0,
        );
        g.norm(&format!("{l}.lconv1d.pre_layer_norm"), 32);
        g.norm(&format!("{l}.lconv1d.conv_norm"), 32);
        for n in ["norm_pre_attn", "norm_post_attn", "norm_out"] {
            g.norm(&format!("{l}.{n}"), 32);
        }
    }
    g.lin(&format!("{p}.output_proj"), 48, 32);
    g.put(&format!("{p}.output_proj.bias"), &[48], 0.1, 0.0);
    g.lin(
        "model.embed_audio.embedding_projection",
        TEXT_HIDDEN,
        a.output_proj_dims,
    );

    let dir = std::env::temp_dir().join(format!("percept-towers-{}-{seed}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");
    // bf16 on disk, like the released checkpoints.
    let t: std::collections::HashMap<String, Tensor> =
        g.t.into_iter()
            .map(|(k, v)| (k, v.to_dtype(DType::BF16).unwrap()))
            .collect();
    candle_core::safetensors::save(&t, &path).unwrap();
    path
}

fn weights(seed: u64) -> Weights {
    Weights::open(&[write_checkpoint(seed)], &Device::Cpu, DType::F32).unwrap()
}

fn test_image(w: usize, h: usize) -> RgbImage {
    let data = (0..w * h)
        .flat_map(|i| {
            let (x, y) = (i % w, i / w);
            [
                (x * 255 / w) as u8,
                (y * 255 / h) as u8,
                ((x ^ y) & 255) as u8,
            ]
        })
        .collect();
    RgbImage::new(w, h, data)
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn vision_soft_tokens_per_budget_and_timing() {
    let vt = VisionTower::load(&weights(1), &vision_cfg(), TEXT_HIDDEN).unwrap();
    let img = test_image(640, 480);
    for budget in [70usize, 140, 280, 560, 1120] {
        let inp = preprocess(&img, budget).unwrap();
        let t = std::time::Instant::now();
        let out = vt.encode(&inp).unwrap();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        eprintln!(
            "vision tiny: budget {budget}: {} patches -> {} tokens in {ms:.1} ms",
            inp.n_patches, inp.n_soft_tokens
        );
        assert_eq!(out.dims(), &[inp.n_soft_tokens, TEXT_HIDDEN]);
        assert!(inp.n_soft_tokens <= budget);
        let v = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|x| x.is_finite()));
    }
}

#[test]
fn vision_output_does_not_depend_on_patch_order() {
    // Attention is bidirectional and pooling goes by position, so permuting patches (with
    // their positions) must not change the soft tokens.
    let vt = VisionTower::load(&weights(2), &vision_cfg(), TEXT_HIDDEN).unwrap();
    let inp = preprocess(&test_image(200, 100), 70).unwrap();
    let n = inp.n_patches;
    let pv = Tensor::from_slice(&inp.pixel_values, (n, 768), &Device::Cpu).unwrap();
    let a = vt.forward(&pv, &inp.positions).unwrap();
    let perm: Vec<u32> = (0..n as u32).rev().collect();
    let pv2 = pv
        .index_select(&Tensor::new(perm.as_slice(), &Device::Cpu).unwrap(), 0)
        .unwrap();
    let pos2: Vec<[i64; 2]> = perm.iter().map(|&i| inp.positions[i as usize]).collect();
    let b = vt.forward(&pv2, &pos2).unwrap();
    assert!(max_abs(&a, &b) < 1e-4);
    // Mismatched inputs are errors, not panics.
    assert!(vt.forward(&pv, &inp.positions[1..]).is_err());
}

#[test]
fn vision_is_deterministic_per_seed_and_differs_across_seeds() {
    let inp = preprocess(&test_image(96, 96), 70).unwrap();
    let a = VisionTower::load(&weights(3), &vision_cfg(), TEXT_HIDDEN)
        .unwrap()
        .encode(&inp)
        .unwrap();
    let b = VisionTower::load(&weights(3), &vision_cfg(), TEXT_HIDDEN)
        .unwrap()
        .encode(&inp)
        .unwrap();
    let c = VisionTower::load(&weights(4), &vision_cfg(), TEXT_HIDDEN)
        .unwrap()
        .encode(&inp)
        .unwrap();
    assert_eq!(max_abs(&a, &b), 0.0);
    assert!(max_abs(&a, &c) > 1e-3);
}

fn tone(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| 0.3 * (i as f32 * 2.0 * std::f32::consts::PI * 440.0 / 16_000.0).sin())
        .collect()
}

#[test]
fn audio_token_counts_and_timing() {
    let at = AudioTower::load(&weights(5), &audio_cfg(), TEXT_HIDDEN).unwrap();
    let ex = MelExtractor::new();
    for secs in [1usize, 10, 30] {
        let n = secs * 16_000 + 77;
        let f = ex.extract(&tone(n));
        let t = std::time::Instant::now();
        let out = at.encode(&f).unwrap();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        eprintln!(
            "audio tiny: {secs} s -> {} frames -> {} tokens in {ms:.1} ms",
            f.n_frames,
            out.dim(0).unwrap()
        );
        assert_eq!(out.dim(0).unwrap(), audio_token_count(n.min(480_000)));
        assert_eq!(out.dim(1).unwrap(), TEXT_HIDDEN);
    }
}

#[test]
fn audio_invalid_tail_frames_do_not_change_valid_tokens() {
    // Everything in the tower is causal or masked: zeroing the mask of the last frames
    // strips tokens but must not change the ones before them beyond the conv receptive
    // field of the subsampler (which sees masked-to-zero input).
    let at = AudioTower::load(&weights(6), &audio_cfg(), TEXT_HIDDEN).unwrap();
    let f = MelExtractor::new().extract(&tone(32_000));
    let feats = Tensor::from_slice(&f.data, (f.n_frames, 128), &Device::Cpu).unwrap();
    let full = at.forward(&feats, &f.mask).unwrap();
    let mut mask = f.mask.clone();
    let cut = 100; // frames kept
    for m in mask.iter_mut().skip(cut) {
        *m = false;
    }
    let part = at.forward(&feats, &mask).unwrap();
    assert_eq!(part.dim(0).unwrap(), cut.div_ceil(4));
    // Token 20 covers frames 80..84; the 3x3 convs reach 3 frames ahead per stage, well
    // before frame 100, and attention only looks back.
    let a = full.narrow(0, 0, 20).unwrap();
    let b = part.narrow(0, 0, 20).unwrap();
    assert!(max_abs(&a, &b) < 1e-5, "diff {}", max_abs(&a, &b));
    assert!(at.forward(&feats, &mask[1..]).is_err());
}
