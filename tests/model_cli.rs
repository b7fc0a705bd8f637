#![allow(clippy::unwrap_used)]
//! The `percept model` subcommands against the golden fixture checkpoint.

use std::process::Command;

fn fixture_model() -> String {
    format!("{}/tests/fixtures/gemma4/model", env!("CARGO_MANIFEST_DIR"))
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
        "{}/tests/fixtures/gemma4/cases.json",
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
        "{}/tests/fixtures/gemma4/inputs/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// End to end through preprocessing, the towers, placement and the decoder: the greedy
/// tokens of cases "image", "audio" and "image_audio" of the reference (image budget 70).
#[test]
fn model_run_with_media_reproduces_reference_tokens() {
    let img = input("image.png");
    let wav = input("audio.wav");
    let v = run_json(&[
        "--image",
        &img,
        "--max-soft-tokens",
        "70",
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
