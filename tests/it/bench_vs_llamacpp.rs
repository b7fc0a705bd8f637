//! `percept bench vs-llamacpp` end to end at a tiny shape: the GGUF it writes is loaded and
//! run by percept's real child process; llama-bench is a stand-in script that answers like
//! llama-bench (`-o json`), or dies by SIGKILL as an OOM-killed process does.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::common::{percept_bin, tmpdir};

/// A tiny `gemma4` text shape whose 256-wide rows take Q4_K/Q6_K blocks (the narrower ones
/// fall back to Q8_0, as llama-quantize does), with per-layer embeddings and one full layer.
fn tiny_shape(dir: &Path) -> PathBuf {
    let p = dir.join("tiny.json");
    let cfg = serde_json::json!({
        "model_type": "gemma4",
        "text_config": {
            "vocab_size": 512, "vocab_size_per_layer_input": 512, "hidden_size": 256,
            "intermediate_size": 512, "num_hidden_layers": 5, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 128, "global_head_dim": 256,
            "sliding_window": 16, "hidden_size_per_layer_input": 32,
            "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention",
                            "sliding_attention", "full_attention"],
            "num_kv_shared_layers": 0, "final_logit_softcapping": 30.0,
            "max_position_embeddings": 4096, "attention_k_eq_v": false
        }
    });
    std::fs::write(&p, cfg.to_string()).unwrap();
    p
}

fn script(dir: &Path, body: &str) -> PathBuf {
    let p = dir.join("llama-bench");
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn bench(dir: &Path, llama: &Path) -> std::process::Output {
    let shape = tiny_shape(dir);
    Command::new(percept_bin())
        .args(["bench", "vs-llamacpp", "--arch"])
        .arg(&shape)
        .args(["--quant", "q4k", "--llama-bench"])
        .arg(llama)
        .arg("--dir")
        .arg(dir)
        .args([
            "--reps",
            "2",
            "--prompts",
            "8,24",
            "--gen",
            "3",
            "--depth",
            "20",
        ])
        .args(["-t", "2", "--bandwidth-mib", "16"])
        .env("XDG_CACHE_HOME", dir.join("cache"))
        .output()
        .unwrap()
}

#[test]
fn both_sides_run_on_the_written_gguf_and_the_table_has_every_row() {
    let dir = tmpdir("vs-llamacpp");
    // The stand-in checks that it was given the file percept wrote, and answers per call.
    let llama = script(
        &dir,
        r#"case "$*" in *"-m "*percept-vs-llamacpp-tiny-q4k.gguf*) ;; *) echo "bad args: $*" >&2; exit 2;; esac
case "$*" in
  *--no-warmup*) echo '[{"n_prompt": 1, "n_gen": 0, "n_depth": 0, "avg_ts": 90.0}]' ;;
  *"-n 0"*) echo '[{"n_prompt": 8, "n_gen": 0, "n_depth": 0, "avg_ts": 400.0},
                   {"n_prompt": 24, "n_gen": 0, "n_depth": 0, "avg_ts": 500.0}]' ;;
  *) echo '[{"n_prompt": 0, "n_gen": 3, "n_depth": 0, "avg_ts": 50.0},
            {"n_prompt": 0, "n_gen": 3, "n_depth": 20, "avg_ts": 40.0}]' ;;
esac"#,
    );
    let out = bench(&dir, &llama);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(!stdout.contains("FAILED"), "{stdout}");
    // Every row has a llama.cpp figure, a percept figure from the real child and a ratio.
    for (row, llama_fig) in [
        ("prefill 8, tok/s", "400.00"),
        ("prefill 24, tok/s", "500.00"),
        ("decode @0, tok/s", "50.00"),
        ("decode @20, tok/s", "40.00"),
        ("peak RSS, GiB", ""),
        ("start to ready, s", ""),
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(row))
            .unwrap_or_else(|| panic!("no {row:?} row in\n{stdout}"));
        assert!(line.contains(llama_fig), "{line}");
        let cells: Vec<&str> = line[row.len()..].split_whitespace().collect();
        let ratio: f64 = cells.last().unwrap().parse().unwrap_or(0.0);
        assert!(ratio > 0.0, "no ratio in {line:?}");
    }
    assert!(stdout.contains("avx512f"), "{stdout}");
    // Written afresh and removed at the end (no --keep).
    assert!(!dir.join("percept-vs-llamacpp-tiny-q4k.gguf").exists());
}

#[test]
fn a_killed_llama_bench_is_a_failed_row_and_a_nonzero_exit() {
    let dir = tmpdir("vs-llamacpp-oom");
    let llama = script(&dir, "kill -9 $$");
    let out = bench(&dir, &llama);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    let failed = stdout
        .lines()
        .find(|l| l.starts_with("FAILED llama.cpp"))
        .unwrap_or_else(|| panic!("no failed row in\n{stdout}"));
    assert!(failed.contains("killed by SIGKILL"), "{failed}");
    assert!(stderr.contains("tiny/q4k failed"), "{stderr}");
    // percept's own side still ran and is reported.
    let line = stdout.lines().find(|l| l.starts_with("prefill 8")).unwrap();
    assert!(
        line.split_whitespace().any(|c| c.parse::<f64>().is_ok()),
        "{line}"
    );
}

#[test]
fn no_llama_bench_is_one_line_naming_the_ways_to_get_one() {
    let dir = tmpdir("vs-llamacpp-none");
    let out = Command::new(percept_bin())
        .args(["bench", "vs-llamacpp"])
        .env("XDG_CACHE_HOME", dir.join("cache"))
        .env_remove("PERCEPT_LLAMA_BENCH")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("--llama-bench")
            && stderr.contains("PERCEPT_LLAMA_BENCH")
            && stderr.contains("--llama-src"),
        "{stderr}"
    );
    let out = Command::new(percept_bin())
        .args(["bench", "vs-llamacpp", "--llama-src"])
        .arg(&dir)
        .env("XDG_CACHE_HOME", dir.join("cache"))
        .env_remove("PERCEPT_LLAMA_BENCH")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("not a llama.cpp source tree"), "{stderr}");
}

/// The tiny text shape with a tiny `gemma4v` tower (32 wide, 2 layers).
fn tiny_shape_with_tower(dir: &Path) -> PathBuf {
    let p = tiny_shape(dir);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["vision_config"] = serde_json::json!({
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16,
        "position_embedding_size": 64, "use_clipped_linears": true
    });
    std::fs::write(&p, cfg.to_string()).unwrap();
    p
}

/// A stand-in llama-mtmd-cli beside the stand-in llama-bench: checks that it was given the
/// text GGUF, the projector and the frame percept wrote, and logs like llama-mtmd-cli.
fn mtmd_script(dir: &Path, soft_tokens: usize) -> PathBuf {
    let p = dir.join("llama-mtmd-cli");
    let body = format!(
        r#"#!/bin/sh
case "$*" in *"-m "*tiny-q4k.gguf*"--mmproj "*projector-f16.gguf*"--image "*frame-160x90.png*"--image-max-tokens 70"*) ;; *) echo "bad args: $*" >&2; exit 2;; esac
echo "encoding image slice..." >&2
echo "image slice encoded in 25 ms" >&2
echo "decoding image batch 1/1, n_tokens_batch = {soft_tokens}" >&2
"#
    );
    std::fs::write(&p, body).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn bench_vision(dir: &Path, llama: &Path) -> std::process::Output {
    let shape = tiny_shape_with_tower(dir);
    Command::new(percept_bin())
        .args(["bench", "vs-llamacpp", "--arch"])
        .arg(&shape)
        .args(["--quant", "q4k", "--llama-bench"])
        .arg(llama)
        .arg("--dir")
        .arg(dir)
        .args([
            "--reps",
            "1",
            "--prompts",
            "8",
            "--gen",
            "2",
            "--depth",
            "0",
        ])
        .args(["-t", "2", "--bandwidth-mib", "16", "--frame", "160x90"])
        .env("XDG_CACHE_HOME", dir.join("cache"))
        .env_remove("PERCEPT_LLAMA_MTMD_CLI")
        .output()
        .unwrap()
}

const LLAMA_BENCH_ANSWERS: &str = r#"case "$*" in
  *--no-warmup*) echo '[{"n_prompt": 1, "n_gen": 0, "n_depth": 0, "avg_ts": 90.0}]' ;;
  *"-n 0"*) echo '[{"n_prompt": 8, "n_gen": 0, "n_depth": 0, "avg_ts": 400.0}]' ;;
  *) echo '[{"n_prompt": 0, "n_gen": 2, "n_depth": 0, "avg_ts": 50.0}]' ;;
esac"#;

#[test]
fn the_vision_row_times_both_towers_on_the_written_projector() {
    let dir = tmpdir("vs-llamacpp-vision");
    let llama = script(&dir, LLAMA_BENCH_ANSWERS);
    // 160x90 at 70 soft tokens resizes to 528x288: 11 x 6 = 66 soft tokens on both sides.
    mtmd_script(&dir, 66);
    let out = bench_vision(&dir, &llama);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let row = |name: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name:?} row in\n{stdout}"))
            .to_string()
    };
    // llama.cpp's 25 ms, percept's own time from the real child, a ratio.
    let ms = row("vision 160x90 @70, ms");
    let cells: Vec<&str> = ms.split_whitespace().skip(4).collect();
    assert_eq!(cells[0], "25", "{ms}");
    assert!(cells[1].parse::<f64>().unwrap() > 0.0, "{ms}");
    assert!(cells[2].parse::<f64>().unwrap() > 0.0, "{ms}");
    let tokens = row("vision soft tokens @70");
    assert_eq!(
        tokens.split_whitespace().skip(4).collect::<Vec<_>>(),
        ["66", "66", "1.00"],
        "{tokens}"
    );
    // The projector and the frame are removed with the GGUF (no --keep).
    assert!(!dir
        .join("percept-vs-llamacpp-tiny-projector-f16.gguf")
        .exists());
    assert!(!dir.join("percept-vs-llamacpp-frame-160x90.png").exists());
}

#[test]
fn differing_soft_token_counts_fail_the_vision_row() {
    let dir = tmpdir("vs-llamacpp-vision-tokens");
    let llama = script(&dir, LLAMA_BENCH_ANSWERS);
    mtmd_script(&dir, 70);
    let out = bench_vision(&dir, &llama);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    let failed = stdout
        .lines()
        .find(|l| l.starts_with("FAILED percept"))
        .unwrap_or_else(|| panic!("no failed row in\n{stdout}"));
    assert!(
        failed.contains("vision soft tokens @70") && failed.contains("gave 66, llama.cpp's 70"),
        "{failed}"
    );
}
