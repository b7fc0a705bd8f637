#![allow(clippy::unwrap_used)]
//! A checkpoint folder exactly as the hub publishes one: bf16 weights sharded over several
//! files with `model.safetensors.index.json`, a config.json carrying the legacy keys
//! transformers writes (top level and sub-configs, both `eoa_token_*` spellings),
//! `tokenizer_config.json` with `added_tokens_decoder`, `generation_config.json` and
//! `processor_config.json`. It must give the same prompt ids and greedy tokens as the
//! single-file f32 checkpoint holding the same bf16-rounded weights.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use gemma4::generate::{Request, Sampling};
use gemma4::multimodal::SoftTokens;
use gemma4::testing::{
    cast_all, temp_model_dir, tiny_config_json, tiny_tensors, write_tiny_checkpoint, TinySpec,
    TINY_SPECIALS,
};
use gemma4::text::LoadOptions;
use gemma4::tokenizer::{ChatContent, ChatMessage};
use gemma4::Gemma4;

const SHARDS: usize = 3;

/// Keys transformers (and older checkpoints) write that Gemma 4 does not use.
fn legacy_keys(obj: &mut serde_json::Map<String, serde_json::Value>) {
    for (k, v) in [
        ("_name_or_path", serde_json::json!("google/gemma-4-E2B-it")),
        ("architectures", serde_json::Value::Null),
        (
            "id2label",
            serde_json::json!({"0": "LABEL_0", "1": "LABEL_1"}),
        ),
        ("label2id", serde_json::json!({"LABEL_0": 0, "LABEL_1": 1})),
        ("dtype", serde_json::json!("bfloat16")),
        ("torch_dtype", serde_json::json!("bfloat16")),
        ("chunk_size_feed_forward", serde_json::json!(0)),
        ("initializer_range", serde_json::json!(0.02)),
        ("output_hidden_states", serde_json::json!(false)),
        ("return_dict", serde_json::json!(true)),
    ] {
        obj.entry(k).or_insert(v);
    }
}

fn published_config(spec: &TinySpec) -> serde_json::Value {
    let mut c = tiny_config_json(spec);
    let top = c.as_object_mut().unwrap();
    let eoa = top["eoa_token_index"].clone();
    top.insert("eoa_token_id".into(), eoa);
    top.insert("transformers_version".into(), serde_json::json!("5.5.0"));
    top.insert("dtype".into(), serde_json::json!("bfloat16"));
    top.insert(
        "_name_or_path".into(),
        serde_json::json!("google/gemma-4-E2B-it"),
    );
    top.insert("id2label".into(), serde_json::json!({"0": "LABEL_0"}));
    top.insert("label2id".into(), serde_json::json!({"LABEL_0": 0}));
    top.insert("chunk_size_feed_forward".into(), serde_json::json!(0));
    for sub in ["text_config", "vision_config", "audio_config"] {
        if let Some(o) = top.get_mut(sub).and_then(|s| s.as_object_mut()) {
            legacy_keys(o);
            o.insert("use_cache".into(), serde_json::json!(true));
            o.insert("attention_dropout".into(), serde_json::json!(0.0));
        }
    }
    c
}

fn tokenizer_config() -> serde_json::Value {
    let decoder: serde_json::Map<String, serde_json::Value> = TINY_SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| {
            (
                i.to_string(),
                serde_json::json!({"content": s, "lstrip": false, "normalized": false,
                    "rstrip": false, "single_word": false, "special": true}),
            )
        })
        .collect();
    serde_json::json!({
        "added_tokens_decoder": decoder,
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "mask_token": "<mask>", "boi_token": "<|image>", "eoi_token": "<image|>",
        "image_token": "<|image|>", "boa_token": "<|audio>", "eoa_token": "<audio|>",
        "audio_token": "<|audio|>",
        "clean_up_tokenization_spaces": false,
        "model_max_length": 1_000_000_000_000_000_019_884_624_838_656f64,
        "padding_side": "left",
        "processor_class": "Gemma4Processor",
        "tokenizer_class": "GemmaTokenizer",
        "extra_special_tokens": {}
    })
}

/// The tensors rounded to bf16 and back, as the single-file f32 twin holds them.
fn rounded(spec: &TinySpec) -> BTreeMap<String, Tensor> {
    cast_all(
        cast_all(tiny_tensors(spec).unwrap(), DType::BF16).unwrap(),
        DType::F32,
    )
    .unwrap()
}

fn write_f32_twin(spec: &TinySpec, tag: &str) -> PathBuf {
    let dir = write_tiny_checkpoint(&temp_model_dir(tag), spec).unwrap();
    let t: HashMap<String, Tensor> = rounded(spec).into_iter().collect();
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    dir
}

fn write_published(spec: &TinySpec, tag: &str) -> PathBuf {
    let dir = write_tiny_checkpoint(&temp_model_dir(tag), spec).unwrap();
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let bf16 = cast_all(tiny_tensors(spec).unwrap(), DType::BF16).unwrap();
    let mut shards: Vec<HashMap<String, Tensor>> = vec![HashMap::new(); SHARDS];
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for (i, (name, t)) in bf16.into_iter().enumerate() {
        let file = format!("model-{:05}-of-{SHARDS:05}.safetensors", i % SHARDS + 1);
        total += t.elem_count() * 2;
        weight_map.insert(name.clone(), serde_json::json!(file));
        shards[i % SHARDS].insert(name, t);
    }
    for (i, s) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{SHARDS:05}.safetensors", i + 1);
        candle_core::safetensors::save(s, dir.join(file)).unwrap();
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let write = |name: &str, v: &serde_json::Value| {
        std::fs::write(dir.join(name), serde_json::to_string_pretty(v).unwrap()).unwrap()
    };
    write("model.safetensors.index.json", &index);
    write("config.json", &published_config(spec));
    write("tokenizer_config.json", &tokenizer_config());
    write(
        "generation_config.json",
        &serde_json::json!({"bos_token_id": 2, "do_sample": true, "eos_token_id": [1, 6],
            "pad_token_id": 0, "temperature": 1.0, "top_k": 64, "top_p": 0.95,
            "transformers_version": "5.5.0"}),
    );
    write(
        "processor_config.json",
        &serde_json::json!({"processor_class": "Gemma4Processor", "audio_seq_length": 750,
            "image_seq_length": 280,
            "feature_extractor": {"feature_extractor_type": "Gemma4AudioFeatureExtractor",
                "sampling_rate": 16000, "feature_size": 128},
            "image_processor": {"image_processor_type": "Gemma4ImageProcessor",
                "max_soft_tokens": 280, "patch_size": 16, "pooling_kernel_size": 3}}),
    );
    dir
}

fn prompt_ids(g: &Gemma4) -> Vec<u32> {
    let tok = g.tokenizer.as_ref().unwrap();
    let msg = ChatMessage::user(vec![ChatContent::Text("What is in the scene?".into())]);
    let rendered = tok.render_chat(&[msg], true, false).unwrap();
    tok.encode(&rendered).unwrap()
}

fn greedy(g: &Gemma4, ids: &[u32]) -> Vec<u32> {
    let req = Request {
        input_ids: ids.to_vec(),
        soft: SoftTokens::default(),
        max_new_tokens: 10,
        sampling: Sampling::default(),
    };
    g.generate(&[req], 10, &mut |_, _| {}).unwrap()[0]
        .output_ids
        .clone()
}

fn shard_dtypes(dir: &Path) -> Vec<DType> {
    (1..=SHARDS)
        .flat_map(|i| {
            let p = dir.join(format!("model-{i:05}-of-{SHARDS:05}.safetensors"));
            candle_core::safetensors::load(p, &candle_core::Device::Cpu)
                .unwrap()
                .into_values()
                .map(|t| t.dtype())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn published_bf16_shards_match_the_f32_twin() {
    for (tag, spec) in [
        ("e2b", TinySpec::default()),
        ("unified", TinySpec::unified()),
    ] {
        let twin = write_f32_twin(&spec, &format!("twin-{tag}"));
        let published = write_published(&spec, &format!("published-{tag}"));
        let dtypes = shard_dtypes(&published);
        assert!(!dtypes.is_empty() && dtypes.iter().all(|d| *d == DType::BF16));
        let a = Gemma4::load_dir(&twin, &LoadOptions::default()).unwrap();
        let b = Gemma4::load_dir(&published, &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{tag}: {e}"));
        let (ia, ib) = (prompt_ids(&a), prompt_ids(&b));
        assert_eq!(ia, ib, "{tag}: prompt ids");
        let (ga, gb) = (greedy(&a, &ia), greedy(&b, &ib));
        assert!(!ga.is_empty());
        assert_eq!(ga, gb, "{tag}: greedy tokens");
        std::fs::remove_dir_all(&twin).ok();
        std::fs::remove_dir_all(&published).ok();
    }
}
