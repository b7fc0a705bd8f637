//! Integrity checks of the committed golden parity fixtures (tests/fixtures/gemma4*).
//!
//! The fixtures are made by hand with the Python reference (tests/parity/); these checks
//! only make sure the files the model tests rely on are present and agree with each
//! other (cases.json <-> expected.safetensors <-> config.json <-> tokenizer.json), so a
//! partial regeneration or a bad merge is caught without Python.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One tensor of a safetensors file: dtype, shape and its raw little-endian bytes.
struct RawTensor {
    dtype: String,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// Minimal safetensors reader (8-byte LE header length, JSON header, data), enough for
/// checks without pulling a tensor crate into the test build.
fn read_safetensors(path: &Path) -> BTreeMap<String, RawTensor> {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let header_len = u64::from_le_bytes(data[..8].try_into().expect("8 bytes")) as usize;
    let header: Value = serde_json::from_slice(&data[8..8 + header_len]).expect("header json");
    let body = &data[8 + header_len..];
    let mut out = BTreeMap::new();
    for (name, info) in header.as_object().expect("header object") {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info["dtype"].as_str().expect("dtype").to_string();
        let shape = info["shape"]
            .as_array()
            .expect("shape")
            .iter()
            .map(|d| d.as_u64().expect("dim") as usize)
            .collect();
        let offsets = info["data_offsets"].as_array().expect("offsets");
        let (start, end) = (
            offsets[0].as_u64().expect("start") as usize,
            offsets[1].as_u64().expect("end") as usize,
        );
        out.insert(
            name.clone(),
            RawTensor {
                dtype,
                shape,
                bytes: body[start..end].to_vec(),
            },
        );
    }
    out
}

fn as_i64(t: &RawTensor) -> Vec<i64> {
    assert_eq!(t.dtype, "I64");
    t.bytes
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

fn flat_i64(v: &Value) -> Vec<i64> {
    match v {
        Value::Array(items) => items.iter().flat_map(flat_i64).collect(),
        other => vec![other.as_i64().expect("integer")],
    }
}

fn check_fixture(name: &str) {
    let dir = fixture_dir(name);
    let cases = read_json(&dir.join("cases.json"));
    let config = read_json(&dir.join("model").join("config.json"));
    let tokenizer = read_json(&dir.join("model").join("tokenizer.json"));
    let expected = read_safetensors(&dir.join("expected.safetensors"));
    let model = read_safetensors(&dir.join("model").join("model.safetensors"));
    let vocab = config["text_config"]["vocab_size"].as_u64().expect("vocab") as usize;

    // Every checkpoint tensor is BF16 and uses the official prefixes.
    for (tname, t) in &model {
        assert_eq!(t.dtype, "BF16", "{name}: {tname}");
        assert!(tname.starts_with("model."), "{name}: {tname}");
    }
    assert_eq!(
        model["model.language_model.embed_tokens.weight"].shape[0],
        vocab
    );

    // Special ids in config.json match tokenizer.json's added tokens.
    let added: BTreeMap<String, i64> = tokenizer["added_tokens"]
        .as_array()
        .expect("added_tokens")
        .iter()
        .map(|t| {
            (
                t["content"].as_str().expect("content").to_string(),
                t["id"].as_i64().expect("id"),
            )
        })
        .collect();
    for (key, token) in [
        ("boi_token_id", "<|image>"),
        ("eoi_token_id", "<image|>"),
        ("image_token_id", "<|image|>"),
        ("video_token_id", "<|video|>"),
        ("boa_token_id", "<|audio>"),
        ("eoa_token_index", "<audio|>"),
        ("audio_token_id", "<|audio|>"),
    ] {
        assert_eq!(config[key].as_i64(), Some(added[token]), "{name}: {key}");
    }

    let case_list = cases["cases"].as_array().expect("cases");
    assert_eq!(case_list.len(), 6, "{name}");
    for case in case_list {
        let cname = case["name"].as_str().expect("name");
        let tensors = case["tensors"].as_object().expect("tensors");
        for (what, tname) in tensors {
            let tname = tname.as_str().expect("tensor name");
            assert!(
                expected.contains_key(tname),
                "{name}/{cname}: {what} -> {tname} missing"
            );
        }
        let ids = &expected[tensors["input_ids"].as_str().expect("ids")];
        assert_eq!(as_i64(ids), flat_i64(&case["input_ids"]), "{name}/{cname}");
        let generated = &expected[tensors["generated"].as_str().expect("generated")];
        assert_eq!(
            as_i64(generated),
            flat_i64(&case["generated"]),
            "{name}/{cname}"
        );
        let (batch, seq) = (ids.shape[0], ids.shape[1]);
        assert_eq!(generated.shape, vec![batch, 12], "{name}/{cname}");
        let logits = &expected[tensors["logits"].as_str().expect("logits")];
        assert_eq!(logits.dtype, "F32");
        assert_eq!(logits.shape, vec![batch, seq, vocab], "{name}/{cname}");
        let steps = &expected[tensors["step_logits"].as_str().expect("steps")];
        assert_eq!(steps.shape, vec![batch, 12, vocab], "{name}/{cname}");
        assert_eq!(
            case["generated_equals_argmax_of_step_logits"].as_bool(),
            Some(true),
            "{name}/{cname}"
        );
    }

    for file in [
        "inputs/image.png",
        "inputs/audio.wav",
        "resized_70.png",
        "resized_280.png",
    ] {
        assert!(dir.join(file).is_file(), "{name}: {file}");
    }
}

#[test]
fn gemma4_fixture_is_consistent() {
    check_fixture("gemma4");
}

#[test]
fn gemma4_unified_fixture_is_consistent() {
    check_fixture("gemma4_unified");
}
