#![allow(clippy::unwrap_used)]
//! The `percept model` subcommands against the golden fixture checkpoint.

use std::process::Command;

fn fixture_model() -> String {
    format!(
        "{}/crates/gemma4/tests/fixtures/gemma4/model",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[test]
fn model_run_json_reproduces_reference_greedy_tokens() {
    let out = Command::new(env!("CARGO_BIN_EXE_percept"))
        .args([
            "model",
            "run",
            "--model",
            &fixture_model(),
            "--prompt",
            "Describe the weather in Paris today.",
            "--max-tokens",
            "12",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["output_ids"], reference_tokens("text"));
    assert_eq!(v["input_ids"].as_array().unwrap().len(), 40);
    assert_eq!(v["image_tokens"], 0);
    for k in ["prompt", "text", "timings", "audio_tokens"] {
        assert!(v.get(k).is_some(), "missing {k}");
    }
}

#[test]
fn model_info_reports_shapes_and_memory() {
    let out = Command::new(env!("CARGO_BIN_EXE_percept"))
        .args([
            "model",
            "info",
            &fixture_model(),
            "--context",
            "100",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["architecture"]["layers"], 6);
    assert_eq!(v["architecture"]["head_dim_full"], 64);
    assert_eq!(v["memory_estimates"].as_array().unwrap().len(), 5);
    // KV at 100 tokens, f32: own layers 0,1 (sliding, W=8: 2*2*32*4*8 each), 2 (full, 1 kv
    // head of 64: 2*1*64*4*100), 3 (sliding).
    let kv = v["memory_estimates"][0]["kv_gib_at_context"]
        .as_f64()
        .unwrap()
        * (1u64 << 30) as f64;
    assert_eq!(
        kv.round() as usize,
        3 * 2 * 2 * 32 * 4 * 8 + 2 * 64 * 4 * 100
    );
}

fn run_json(extra: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_percept"))
        .args([
            "model",
            "run",
            "--model",
            &fixture_model(),
            "--max-tokens",
            "12",
            "--json",
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The 12 greedy tokens transformers 5.24.0 produced for `case` (cases.json of the fixture).
fn reference_tokens(case: &str) -> serde_json::Value {
    let path = format!(
        "{}/crates/gemma4/tests/fixtures/gemma4/cases.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let case = cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == case)
        .unwrap_or_else(|| panic!("case {case} in cases.json"));
    case["generated"][0].clone()
}

fn input(name: &str) -> String {
    format!(
        "{}/crates/gemma4/tests/fixtures/gemma4/inputs/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// End to end through preprocessing, the towers, placement and the decoder: the greedy
/// tokens of cases "image", "audio" and "image_audio" of the reference (image budget 70).
#[test]
fn model_run_with_media_reproduces_reference_tokens() {
    let img = input("image.png");
    let wav = input("audio.wav");
    // The reference's precision: percept's default int8 vision tower moves soft tokens by
    // ~1% (towers_parity::vision_tower_int8_tracks_f32), enough to change a random tiny
    // model's greedy tokens.
    let v = run_json(&[
        "--image",
        &img,
        "--max-soft-tokens",
        "70",
        "--vision-quant",
        "f32",
        "--prompt",
        "What is in this image?",
    ]);
    assert_eq!(v["image_tokens"], 63);
    assert_eq!(v["output_ids"], reference_tokens("image"));
    let v = run_json(&["--audio", &wav, "--prompt", "Transcribe this audio."]);
    assert_eq!(v["audio_tokens"], 30);
    assert_eq!(v["output_ids"], reference_tokens("audio"));
    let v = run_json(&[
        "--image",
        &img,
        "--audio",
        &wav,
        "--max-soft-tokens",
        "70",
        "--vision-quant",
        "f32",
        "--prompt",
        "Describe the picture and the sound.",
    ]);
    assert_eq!(v["input_ids"].as_array().unwrap().len(), 137);
    assert_eq!(v["output_ids"], reference_tokens("image_audio"));
}

#[test]
fn missing_media_file_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_percept"))
        .args([
            "model",
            "run",
            "--model",
            &fixture_model(),
            "--prompt",
            "x",
            "--image",
            "nope.png",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.png"));
}

/// Audio longer than the tower's 30 s becomes one audio item per 30 s clip (70 s -> 3),
/// each with the soft tokens its length gives, instead of being cut at 30 s.
#[test]
fn long_audio_is_split_into_30s_clips() {
    let dir = std::env::temp_dir().join(format!("percept-long-audio-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let wav = dir.join("long.wav");
    let st = Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
        ])
        .arg("sine=frequency=440:sample_rate=16000:duration=70")
        .arg(&wav)
        .status()
        .expect("ffmpeg");
    assert!(st.success());
    let v = run_json(&[
        "--audio",
        wav.to_str().unwrap(),
        "--prompt",
        "What is this sound?",
    ]);
    let prompt = v["prompt"].as_str().unwrap();
    assert_eq!(prompt.matches("<|audio>").count(), 3, "{prompt}");
    let per_clip = |s: usize| percept::preprocess::mel::audio_token_count(s);
    let expect = 2 * per_clip(480_000) + per_clip(160_000);
    assert_eq!(v["audio_tokens"], expect);
}

// ---- gemma4_unified (the 12B architecture) -------------------------------------------

fn unified_dir() -> String {
    format!(
        "{}/crates/gemma4/tests/fixtures/gemma4_unified",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn unified_reference_tokens(case: &str) -> serde_json::Value {
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{}/cases.json", unified_dir())).unwrap(),
    )
    .unwrap();
    cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == case)
        .unwrap()["generated"][0]
        .clone()
}

fn unified_run(extra: &[&str]) -> serde_json::Value {
    let model = format!("{}/model", unified_dir());
    let out = Command::new(env!("CARGO_BIN_EXE_percept"))
        .args([
            "model",
            "run",
            "--model",
            &model,
            "--max-tokens",
            "12",
            "--json",
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn unified_model_info_reports_the_architecture() {
    let model = format!("{}/model", unified_dir());
    let out = Command::new(env!("CARGO_BIN_EXE_percept"))
        .args(["model", "info", &model, "--context", "100", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let a = &v["architecture"];
    assert_eq!(a["model_type"], "gemma4_unified");
    assert_eq!(a["layers"], 6);
    assert_eq!(a["kv_heads_sliding"], 2);
    assert_eq!(a["kv_heads_full"], 1);
    assert_eq!(a["head_dim_full"], 64);
    assert_eq!(a["ple_dim"], serde_json::Value::Null);
    assert_eq!(a["vision_embedder"], true);
    assert_eq!(a["vision_mask"], "image blocks on every layer");
    // Vision: patch_ln1 (2 x 6912) + dense (16 x 6912 + 16) + ln2/pos_norm (2 x 2 x 16) +
    // positions (32 x 2 x 16) + projection (64 x 16); audio: projection (64 x 640).
    assert_eq!(
        v["params"]["vision_tower"],
        2 * 6912 + 16 * 6912 + 16 + 4 * 16 + 32 * 2 * 16 + 64 * 16
    );
    assert_eq!(v["params"]["audio_tower"], 64 * 640);
    assert_eq!(v["params"]["per_layer_embeddings"], 0);
    // KV at 100 tokens, f32: 4 sliding layers (W = 8, 2 kv heads x 32) + 2 full layers
    // (1 kv head x 64, all 100 positions).
    let kv = v["memory_estimates"][0]["kv_gib_at_context"]
        .as_f64()
        .unwrap()
        * (1u64 << 30) as f64;
    assert_eq!(
        kv.round() as usize,
        4 * 2 * 2 * 32 * 4 * 8 + 2 * 2 * 64 * 4 * 100
    );
}

/// `percept model run` on the unified fixture reproduces the reference's 12 greedy tokens
/// for text, image (budget 70), audio and image+audio, end to end from the files.
#[test]
fn unified_model_run_reproduces_reference_tokens() {
    let v = unified_run(&["--prompt", "Describe the weather in Paris today."]);
    assert_eq!(v["output_ids"], unified_reference_tokens("text"));
    let img = format!("{}/inputs/image.png", unified_dir());
    let wav = format!("{}/inputs/audio.wav", unified_dir());
    let v = unified_run(&[
        "--image",
        &img,
        "--max-soft-tokens",
        "70",
        "--prompt",
        "What is in this image?",
    ]);
    assert_eq!(v["image_tokens"], 63);
    assert_eq!(v["output_ids"], unified_reference_tokens("image"));
    // Without --max-soft-tokens the checkpoint's processor_config.json budget (70) applies.
    let v = unified_run(&["--image", &img, "--prompt", "What is in this image?"]);
    assert_eq!(v["image_tokens"], 63);
    let v = unified_run(&["--audio", &wav, "--prompt", "Transcribe this audio."]);
    assert_eq!(v["audio_tokens"], 30);
    assert_eq!(v["output_ids"], unified_reference_tokens("audio"));
    let v = unified_run(&[
        "--image",
        &img,
        "--audio",
        &wav,
        "--max-soft-tokens",
        "70",
        "--vision-quant",
        "f32",
        "--prompt",
        "Describe the picture and the sound.",
    ]);
    assert_eq!(v["input_ids"].as_array().unwrap().len(), 137);
    assert_eq!(v["output_ids"], unified_reference_tokens("image_audio"));
}

/// Any WAV is decoded and resampled to 16 kHz mono first: the fixture's 1.2 s clip at
/// 44.1 kHz stereo gives the same 30 audio tokens (640 samples each).
#[test]
fn unified_model_run_resamples_audio() {
    let dir = std::env::temp_dir().join(format!("percept-unified-wav-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let wav = dir.join("a44.wav");
    let st = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-y", "-i"])
        .arg(format!("{}/inputs/audio.wav", unified_dir()))
        .args(["-ar", "44100", "-ac", "2"])
        .arg(&wav)
        .status()
        .expect("ffmpeg");
    assert!(st.success());
    let v = unified_run(&[
        "--audio",
        wav.to_str().unwrap(),
        "--prompt",
        "Transcribe this audio.",
    ]);
    assert_eq!(v["audio_tokens"], 30);
    assert_eq!(v["output_ids"].as_array().unwrap().len(), 12);
}

fn info_json(model: &str, env: &[(&str, &std::path::Path)]) -> serde_json::Value {
    let mut c = Command::new(env!("CARGO_BIN_EXE_percept"));
    c.args(["model", "info", model, "--json"]);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{model}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `model info` says the format, the tensor types per file and the quantized cache's state
/// for each kind of input: a hub folder (sharded safetensors), a GGUF file, an LM Studio
/// folder and an `ollama:` name.
#[test]
fn model_info_reports_format_tensor_types_and_cache_for_each_kind_of_input() {
    use percept::model::testing::{temp_model_dir, write_tiny_checkpoint, TinySpec};
    let d = temp_model_dir("info-kinds");
    let cache = d.join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let gguf = |n: &str| {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("crates/gemma4/tests/fixtures/gguf")
            .join(n)
    };

    // Hub folder: two shards and an index; the first shard rewritten in bf16.
    let hub = d.join("hub");
    let spec = TinySpec {
        sharded: true,
        ..TinySpec::default()
    };
    write_tiny_checkpoint(&hub, &spec).unwrap();
    let shard = hub.join("model-00001-of-00002.safetensors");
    let t = candle_core::safetensors::load(&shard, &candle_core::Device::Cpu).unwrap();
    let n0 = t.len();
    let t: std::collections::HashMap<_, _> = t
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(candle_core::DType::BF16).unwrap()))
        .collect();
    candle_core::safetensors::save(&t, &shard).unwrap();
    let v = info_json(hub.to_str().unwrap(), &[("XDG_CACHE_HOME", &cache)]);
    assert_eq!(v["format"], "safetensors");
    let files = v["safetensors"].as_array().unwrap();
    assert_eq!(files.len(), 2);
    assert_eq!(files[0]["tensor_types"], serde_json::json!({"BF16": n0}));
    let n1 = files[1]["tensor_types"]["F32"].as_u64().unwrap();
    assert_eq!(files[1]["tensors"].as_u64().unwrap(), n1);
    assert!(n1 > 10);
    // A tiny checkpoint is quantized at each load: the cache does not apply, and says why.
    assert_eq!(v["quant_cache"]["applies"], false);
    assert!(v["quant_cache"]["why_not"]
        .as_str()
        .unwrap()
        .contains("64 MiB"));
    assert_eq!(v["quant_cache"]["entries"].as_array().unwrap().len(), 4);
    assert!(v["quant_cache"]["entries"][0]["path"]
        .as_str()
        .unwrap()
        .starts_with(cache.to_str().unwrap()));
    // With the cache forced on, written entries show their size.
    let out = Command::new(env!("CARGO_BIN_EXE_percept"))
        .args([
            "model",
            "run",
            "--model",
            hub.to_str().unwrap(),
            "--prompt",
            "hi",
        ])
        .args(["--max-tokens", "1", "--quant", "q8_0"])
        .env("XDG_CACHE_HOME", &cache)
        .env("PERCEPT_QUANT_CACHE", "always")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut c = Command::new(env!("CARGO_BIN_EXE_percept"));
    let out = c
        .args(["model", "info", hub.to_str().unwrap()])
        .env("XDG_CACHE_HOME", &cache)
        .env("PERCEPT_QUANT_CACHE", "always")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("format: safetensors"), "{text}");
    assert!(text.contains(&format!("BF16 x{n0}")), "{text}");
    let q8 = text
        .lines()
        .find(|l| l.contains("q8_0  keep_f16=none"))
        .unwrap();
    assert!(q8.contains("cached,"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("q4k") && l.contains("not cached")),
        "{text}"
    );

    // A GGUF file: its types, the projector found beside it, no cache.
    let v = info_json(
        gguf("gemma4-q8_0.gguf").to_str().unwrap(),
        &[("XDG_CACHE_HOME", &cache)],
    );
    assert_eq!(v["format"], "gguf");
    assert!(v["gguf"][0]["tensor_types"]["Q8_0"].as_u64().unwrap() > 40);
    assert!(v["projector"].as_str().unwrap().contains("mmproj-gemma4-"));
    assert_eq!(v["quant_cache"]["applies"], false);

    // An LM Studio folder: <publisher>/<repo>/ with the model and its mmproj.
    let repo = d.join("lmstudio/lmstudio-community/gemma-4-tiny-GGUF");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::copy(
        gguf("gemma4-q8_0.gguf"),
        repo.join("gemma-4-tiny-Q8_0.gguf"),
    )
    .unwrap();
    std::fs::copy(
        gguf("mmproj-gemma4-f32.gguf"),
        repo.join("mmproj-gemma-4-tiny-F32.gguf"),
    )
    .unwrap();
    let v = info_json(repo.to_str().unwrap(), &[("XDG_CACHE_HOME", &cache)]);
    assert_eq!(v["format"], "gguf");
    let files = v["gguf"].as_array().unwrap();
    assert_eq!(files.len(), 2);
    assert!(files[0]["tensor_types"]["Q8_0"].as_u64().unwrap() > 40);
    assert!(files[1]["tensor_types"]["F32"].as_u64().unwrap() > 10);
    assert_eq!(
        v["projector"].as_str().unwrap(),
        repo.join("mmproj-gemma-4-tiny-F32.gguf").to_str().unwrap()
    );
    assert_eq!(v["quant_cache"]["applies"], false);

    // ollama:NAME:TAG through a manifest store.
    let store = d.join("ollama");
    let blobs = store.join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let hex = "e".repeat(64);
    std::fs::copy(gguf("gemma4-f32.gguf"), blobs.join(format!("sha256-{hex}"))).unwrap();
    let manifest = serde_json::json!({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.model", "digest": format!("sha256:{hex}"), "size": 1}]});
    let mdir = store.join("manifests/registry.ollama.ai/library/gemma4tiny");
    std::fs::create_dir_all(&mdir).unwrap();
    std::fs::write(mdir.join("e2b"), manifest.to_string()).unwrap();
    let v = info_json(
        "ollama:gemma4tiny:e2b",
        &[("XDG_CACHE_HOME", &cache), ("OLLAMA_MODELS", &store)],
    );
    assert_eq!(v["format"], "gguf");
    assert_eq!(
        v["gguf"][0]["path"].as_str().unwrap(),
        blobs.join(format!("sha256-{hex}")).to_str().unwrap()
    );
    assert!(v["gguf"][0]["tensor_types"]["F32"].as_u64().unwrap() > 40);
    assert_eq!(v["projector"], serde_json::Value::Null);
    assert_eq!(v["quant_cache"]["applies"], false);
    let _ = std::fs::remove_dir_all(&d);
}
