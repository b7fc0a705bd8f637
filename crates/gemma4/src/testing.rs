//! Tiny, seeded Gemma 4 checkpoints for tests and benchmarks.
//!
//! [`write_tiny_checkpoint`] writes a complete model folder with the official tensor names
//! (`model.language_model.*`), a small `config.json` (released form, or the
//! transformers-5.24 `per_layer_config` form), a `tokenizer.json` holding the Gemma 4 special
//! tokens, the official chat template and a `generation_config.json`. Weights come from a
//! splitmix64 stream, so a given seed always gives the same bytes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::rng::SplitMix64;
use crate::tokenizer::GEMMA4_CHAT_TEMPLATE;

/// Shape knobs of a tiny checkpoint.
#[derive(Debug, Clone)]
pub struct TinySpec {
    pub seed: u64,
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub global_head_dim: usize,
    pub layer_types: Vec<&'static str>,
    pub num_kv_shared_layers: usize,
    pub sliding_window: usize,
    pub ple_dim: usize,
    pub double_wide: bool,
    pub k_eq_v: bool,
    /// kv heads on full layers when `k_eq_v`.
    pub global_kv_heads: Option<usize>,
    pub softcap: Option<f64>,
    /// Write `per_layer_config` (transformers 5.24) instead of `global_head_dim`.
    pub per_layer_config_form: bool,
    /// `use_bidirectional_attention`.
    pub bidirectional: Option<&'static str>,
    /// Shard the weights into two files with an index.
    pub sharded: bool,
    /// Write a `gemma4_unified` (12B layout) checkpoint: model_type `gemma4_unified`, the
    /// encoder-free vision embedder (`model.vision_embedder.*`, `model.embed_vision.*`) and
    /// audio projection (`model.embed_audio.*`). Use [`TinySpec::unified`].
    pub unified: bool,
    /// Unified only: `vision_config.mm_embed_dim` (= `output_proj_dims`).
    pub mm_embed_dim: usize,
    /// Unified only: `vision_config.mm_posemb_size`.
    pub mm_posemb_size: usize,
}

impl TinySpec {
    /// A tiny checkpoint shaped like Gemma 4 12B (`gemma4_unified`): no PLE, no KV sharing,
    /// 2 kv heads / head_dim 16 on sliding layers, 1 kv head / head_dim 32 with K=V on full
    /// layers, vision-bidirectional attention, window 4.
    pub fn unified() -> Self {
        Self {
            kv_heads: 2,
            num_kv_shared_layers: 0,
            ple_dim: 0,
            double_wide: false,
            k_eq_v: true,
            global_kv_heads: Some(1),
            bidirectional: Some("vision"),
            unified: true,
            ..Self::default()
        }
    }
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            seed: 42,
            hidden: 64,
            intermediate: 96,
            heads: 4,
            kv_heads: 1,
            head_dim: 16,
            global_head_dim: 32,
            layer_types: vec![
                "sliding_attention",
                "sliding_attention",
                "full_attention",
                "sliding_attention",
                "sliding_attention",
                "full_attention",
            ],
            num_kv_shared_layers: 2,
            sliding_window: 4,
            ple_dim: 8,
            double_wide: true,
            k_eq_v: false,
            global_kv_heads: None,
            softcap: Some(30.0),
            per_layer_config_form: false,
            bidirectional: None,
            sharded: false,
            unified: false,
            mm_embed_dim: 16,
            mm_posemb_size: 32,
        }
    }
}

/// Special tokens of the tiny tokenizer, in id order from 0.
pub const TINY_SPECIALS: &[&str] = &[
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<|turn>",
    "<turn|>",
    "<|think|>",
    "<|channel>",
    "<channel|>",
    "<|image>",
    "<image|>",
    "<|image|>",
    "<|audio>",
    "<audio|>",
    "<|audio|>",
    "<|video|>",
    "<|tool>",
    "<tool|>",
    "<|tool_call>",
    "<tool_call|>",
    "<|tool_response>",
    "<tool_response|>",
    "<|\"|>",
];

/// Builds the tiny vocabulary: specials, then 256 byte-fallback tokens, then printable ASCII
/// (space written as `▁`). Returns (token, id) in id order.
pub fn tiny_vocab() -> Vec<String> {
    let mut v: Vec<String> = TINY_SPECIALS.iter().map(|s| s.to_string()).collect();
    for b in 0..=255u8 {
        v.push(format!("<0x{b:02X}>"));
    }
    v.push("▁".into());
    for c in 33u8..127 {
        v.push((c as char).to_string());
    }
    v.push("\n".into());
    v
}

/// Vocabulary size used by the tiny config (vocab rounded up to 32).
pub fn tiny_vocab_size() -> usize {
    tiny_vocab().len().div_ceil(32) * 32
}

fn id_of(tok: &str) -> u32 {
    tiny_vocab().iter().position(|t| t == tok).unwrap_or(3) as u32
}

/// `tokenizer.json` for the tiny vocabulary: BPE with byte fallback and no merges, spaces
/// mapped to `▁`, the specials as added tokens.
pub fn tiny_tokenizer_json() -> String {
    let vocab = tiny_vocab();
    let mut vmap = serde_json::Map::new();
    for (i, t) in vocab.iter().enumerate() {
        vmap.insert(t.clone(), serde_json::json!(i));
    }
    let added: Vec<serde_json::Value> = TINY_SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let j = super::gguf_model::gemma_bpe_tokenizer_json(
        added,
        "<unk>",
        serde_json::json!(vmap),
        serde_json::json!([]),
    );
    j.to_string()
}

/// The tiny `config.json` as a JSON value.
pub fn tiny_config_json(spec: &TinySpec) -> serde_json::Value {
    let n = spec.layer_types.len();
    let mut text = serde_json::json!({
        "model_type": "gemma4_text",
        "vocab_size": tiny_vocab_size(),
        "vocab_size_per_layer_input": tiny_vocab_size(),
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": n,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "tie_word_embeddings": true,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                               "rope_theta": 1000000.0}
        },
        "attention_bias": false,
        "sliding_window": spec.sliding_window,
        "layer_types": spec.layer_types,
        "final_logit_softcapping": spec.softcap,
        "use_bidirectional_attention": spec.bidirectional,
        "hidden_size_per_layer_input": spec.ple_dim,
        "attention_k_eq_v": spec.k_eq_v,
        "num_kv_shared_layers": spec.num_kv_shared_layers,
        "enable_moe_block": false,
        "use_double_wide_mlp": spec.double_wide,
    });
    if let Some(obj) = text.as_object_mut() {
        if spec.per_layer_config_form {
            let mut plc = serde_json::Map::new();
            for (i, t) in spec.layer_types.iter().enumerate() {
                if *t == "full_attention" {
                    let mut o = serde_json::json!({"head_dim": spec.global_head_dim});
                    if let (true, Some(k)) = (spec.k_eq_v, spec.global_kv_heads) {
                        o["num_key_value_heads"] = serde_json::json!(k);
                    }
                    plc.insert(i.to_string(), o);
                }
            }
            obj.insert("per_layer_config".into(), serde_json::Value::Object(plc));
        } else {
            obj.insert(
                "global_head_dim".into(),
                serde_json::json!(spec.global_head_dim),
            );
            obj.insert(
                "num_global_key_value_heads".into(),
                serde_json::json!(spec.global_kv_heads),
            );
        }
    }
    let (model_type, arch, vision, audio) = if spec.unified {
        if let Some(obj) = text.as_object_mut() {
            obj.insert("model_type".into(), "gemma4_unified_text".into());
            obj.remove("vocab_size_per_layer_input");
            obj.remove("hidden_size_per_layer_input");
            obj.remove("enable_moe_block");
        }
        (
            "gemma4_unified",
            "Gemma4UnifiedForConditionalGeneration",
            serde_json::json!({"model_type": "gemma4_unified_vision", "patch_size": 16,
                "pooling_kernel_size": 3, "mm_embed_dim": spec.mm_embed_dim,
                "mm_posemb_size": spec.mm_posemb_size, "output_proj_dims": spec.mm_embed_dim,
                "rms_norm_eps": 1e-6}),
            serde_json::json!({"model_type": "gemma4_unified_audio", "audio_embed_dim": 640,
                "rms_norm_eps": 1e-6}),
        )
    } else {
        (
            "gemma4",
            "Gemma4ForConditionalGeneration",
            serde_json::Value::Null,
            serde_json::Value::Null,
        )
    };
    serde_json::json!({
        "model_type": model_type,
        "architectures": [arch],
        "text_config": text,
        "vision_config": vision,
        "audio_config": audio,
        "boi_token_id": id_of("<|image>"),
        "eoi_token_id": id_of("<image|>"),
        "image_token_id": id_of("<|image|>"),
        "video_token_id": id_of("<|video|>"),
        "boa_token_id": id_of("<|audio>"),
        "eoa_token_index": id_of("<audio|>"),
        "audio_token_id": id_of("<|audio|>"),
        "eos_token_id": [1, id_of("<turn|>")],
        "tie_word_embeddings": true
    })
}

/// All decoder tensors of a tiny checkpoint, with hub names.
pub fn tiny_tensors(spec: &TinySpec) -> candle_core::Result<BTreeMap<String, Tensor>> {
    let mut rng = SplitMix64(spec.seed);
    let dev = Device::Cpu;
    let mut out = BTreeMap::new();
    let mut put = |name: String, shape: &[usize], kind: Init, rng: &mut SplitMix64| {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| match kind {
                Init::Linear(fan_in) => rng.uniform((1.0 / fan_in as f64).sqrt() * 1.7),
                Init::Embed => rng.uniform(0.6),
                Init::Norm => 1.0 + rng.uniform(0.3),
                Init::Scalar => 0.6 + rng.uniform(0.3).abs(),
            })
            .collect();
        Tensor::from_vec(data, shape, &dev).map(|t| out.insert(name, t))
    };
    let v = tiny_vocab_size();
    let h = spec.hidden;
    let n = spec.layer_types.len();
    let d = spec.ple_dim;
    let p = "model.language_model";
    put(
        format!("{p}.embed_tokens.weight"),
        &[v, h],
        Init::Embed,
        &mut rng,
    )?;
    if d > 0 {
        put(
            format!("{p}.embed_tokens_per_layer.weight"),
            &[v, n * d],
            Init::Embed,
            &mut rng,
        )?;
        put(
            format!("{p}.per_layer_model_projection.weight"),
            &[n * d, h],
            Init::Linear(h),
            &mut rng,
        )?;
        put(
            format!("{p}.per_layer_projection_norm.weight"),
            &[d],
            Init::Norm,
            &mut rng,
        )?;
    }
    put(format!("{p}.norm.weight"), &[h], Init::Norm, &mut rng)?;
    let first_shared = n - spec.num_kv_shared_layers;
    for (i, t) in spec.layer_types.iter().enumerate() {
        let full = *t == "full_attention";
        let hd = if full {
            spec.global_head_dim
        } else {
            spec.head_dim
        };
        let kvh = match (full && spec.k_eq_v, spec.global_kv_heads) {
            (true, Some(k)) => k,
            _ => spec.kv_heads,
        };
        let l = format!("{p}.layers.{i}");
        put(
            format!("{l}.self_attn.q_proj.weight"),
            &[spec.heads * hd, h],
            Init::Linear(h),
            &mut rng,
        )?;
        put(
            format!("{l}.self_attn.k_proj.weight"),
            &[kvh * hd, h],
            Init::Linear(h),
            &mut rng,
        )?;
        if !(full && spec.k_eq_v) {
            put(
                format!("{l}.self_attn.v_proj.weight"),
                &[kvh * hd, h],
                Init::Linear(h),
                &mut rng,
            )?;
        }
        put(
            format!("{l}.self_attn.o_proj.weight"),
            &[h, spec.heads * hd],
            Init::Linear(spec.heads * hd),
            &mut rng,
        )?;
        put(
            format!("{l}.self_attn.q_norm.weight"),
            &[hd],
            Init::Norm,
            &mut rng,
        )?;
        put(
            format!("{l}.self_attn.k_norm.weight"),
            &[hd],
            Init::Norm,
            &mut rng,
        )?;
        let inter = if spec.double_wide && i >= first_shared {
            2 * spec.intermediate
        } else {
            spec.intermediate
        };
        put(
            format!("{l}.mlp.gate_proj.weight"),
            &[inter, h],
            Init::Linear(h),
            &mut rng,
        )?;
        put(
            format!("{l}.mlp.up_proj.weight"),
            &[inter, h],
            Init::Linear(h),
            &mut rng,
        )?;
        put(
            format!("{l}.mlp.down_proj.weight"),
            &[h, inter],
            Init::Linear(inter),
            &mut rng,
        )?;
        for norm in [
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ] {
            put(format!("{l}.{norm}.weight"), &[h], Init::Norm, &mut rng)?;
        }
        if d > 0 {
            put(
                format!("{l}.per_layer_input_gate.weight"),
                &[d, h],
                Init::Linear(h),
                &mut rng,
            )?;
            put(
                format!("{l}.per_layer_projection.weight"),
                &[h, d],
                Init::Linear(d),
                &mut rng,
            )?;
            put(
                format!("{l}.post_per_layer_input_norm.weight"),
                &[h],
                Init::Norm,
                &mut rng,
            )?;
        }
        put(format!("{l}.layer_scalar"), &[1], Init::Scalar, &mut rng)?;
    }
    if spec.unified {
        // Encoder-free media front, hub names as transformers 5.24 saves them.
        let pd = 48 * 48 * 3;
        let d = spec.mm_embed_dim;
        let v = "model.vision_embedder";
        for (name, dim) in [("patch_ln1", pd), ("patch_ln2", d), ("pos_norm", d)] {
            put(format!("{v}.{name}.weight"), &[dim], Init::Norm, &mut rng)?;
            put(format!("{v}.{name}.bias"), &[dim], Init::Embed, &mut rng)?;
        }
        put(
            format!("{v}.patch_dense.weight"),
            &[d, pd],
            Init::Linear(pd),
            &mut rng,
        )?;
        put(format!("{v}.patch_dense.bias"), &[d], Init::Embed, &mut rng)?;
        put(
            format!("{v}.pos_embedding"),
            &[spec.mm_posemb_size, 2, d],
            Init::Embed,
            &mut rng,
        )?;
        put(
            "model.embed_vision.embedding_projection.weight".into(),
            &[h, d],
            Init::Linear(d),
            &mut rng,
        )?;
        put(
            "model.embed_audio.embedding_projection.weight".into(),
            &[h, 640],
            Init::Linear(640),
            &mut rng,
        )?;
    }
    Ok(out)
}

#[derive(Clone, Copy)]
enum Init {
    Linear(usize),
    Embed,
    Norm,
    Scalar,
}

/// Writes a complete tiny model folder into `dir` (created if needed) and returns it.
pub fn write_tiny_checkpoint(dir: &Path, spec: &TinySpec) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let tensors = tiny_tensors(spec)?;
    if spec.sharded {
        let mut a = BTreeMap::new();
        let mut b = BTreeMap::new();
        let mut map = serde_json::Map::new();
        for (i, (k, v)) in tensors.into_iter().enumerate() {
            let file = if i % 2 == 0 {
                "model-00001-of-00002.safetensors"
            } else {
                "model-00002-of-00002.safetensors"
            };
            map.insert(k.clone(), serde_json::json!(file));
            if i % 2 == 0 {
                a.insert(k, v);
            } else {
                b.insert(k, v);
            }
        }
        candle_core::safetensors::save(
            &a.into_iter().collect::<std::collections::HashMap<_, _>>(),
            dir.join("model-00001-of-00002.safetensors"),
        )?;
        candle_core::safetensors::save(
            &b.into_iter().collect::<std::collections::HashMap<_, _>>(),
            dir.join("model-00002-of-00002.safetensors"),
        )?;
        let idx = serde_json::json!({"metadata": {}, "weight_map": map});
        std::fs::write(dir.join("model.safetensors.index.json"), idx.to_string())?;
    } else {
        candle_core::safetensors::save(
            &tensors
                .into_iter()
                .collect::<std::collections::HashMap<_, _>>(),
            dir.join("model.safetensors"),
        )?;
    }
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&tiny_config_json(spec))?,
    )?;
    std::fs::write(dir.join("tokenizer.json"), tiny_tokenizer_json())?;
    std::fs::write(dir.join("chat_template.jinja"), GEMMA4_CHAT_TEMPLATE)?;
    let gen = serde_json::json!({"bos_token_id": 2, "pad_token_id": 0,
        "eos_token_id": [1, id_of("<turn|>")], "do_sample": false});
    std::fs::write(dir.join("generation_config.json"), gen.to_string())?;
    Ok(dir.to_path_buf())
}

/// A fresh temporary folder under the system temp dir (removed by the caller if it cares).
pub fn temp_model_dir(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!("percept-tiny-{tag}-{}-{nanos}", std::process::id()))
}

/// Converts every tensor of a map to `dtype` (e.g. to write a bf16 checkpoint).
pub fn cast_all(
    t: BTreeMap<String, Tensor>,
    dtype: DType,
) -> candle_core::Result<BTreeMap<String, Tensor>> {
    t.into_iter()
        .map(|(k, v)| v.to_dtype(dtype).map(|v| (k, v)))
        .collect()
}

/// The signal of `make_reference.py`: a tone, a chirp from 50 Hz to Nyquist, splitmix64 noise.
pub fn test_signal(rate: u32, n: usize, seed: u64, tone_hz: f64) -> Vec<f32> {
    let mut rng = crate::rng::SplitMix64(seed);
    let dur = n as f64 / f64::from(rate);
    let k = (f64::from(rate) / 2.0 - 50.0) / (2.0 * dur);
    let tau = 2.0 * std::f64::consts::PI;
    (0..n)
        .map(|i| {
            let t = i as f64 / f64::from(rate);
            let u = rng.next_f64() * 2.0 - 1.0;
            (0.25 * (tau * tone_hz * t).sin()
                + 0.2 * (tau * (50.0 * t + k * t * t)).sin()
                + 0.05 * u) as f32
        })
        .collect()
}

/// Mean absolute difference of two equally long signals.
pub fn mean_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from((x - y).abs()))
        .sum::<f64>()
        / a.len() as f64
}

/// A two-channel 32-bit float WAV file.
pub fn write_wav_f32(path: &Path, rate: u32, left: &[f32], right: &[f32]) -> std::io::Result<()> {
    let data_len = (left.len() * 8) as u32;
    let mut b = Vec::new();
    b.extend_from_slice(b"RIFF");
    b.extend_from_slice(&(36 + data_len).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt ");
    b.extend_from_slice(&16u32.to_le_bytes());
    b.extend_from_slice(&3u16.to_le_bytes()); // IEEE float
    b.extend_from_slice(&2u16.to_le_bytes());
    b.extend_from_slice(&rate.to_le_bytes());
    b.extend_from_slice(&(rate * 8).to_le_bytes());
    b.extend_from_slice(&8u16.to_le_bytes());
    b.extend_from_slice(&32u16.to_le_bytes());
    b.extend_from_slice(b"data");
    b.extend_from_slice(&data_len.to_le_bytes());
    for (l, r) in left.iter().zip(right) {
        b.extend_from_slice(&l.to_le_bytes());
        b.extend_from_slice(&r.to_le_bytes());
    }
    std::fs::write(path, b)
}

/// A committed soxr output in `tests/fixtures/resample/` (little-endian f32).
pub fn resample_fixture(name: &str) -> Vec<f32> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/resample")
        .join(name);
    std::fs::read(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}
