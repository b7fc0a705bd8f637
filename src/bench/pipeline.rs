//! `percept bench pipeline`: the whole live path (GStreamer test sources -> queues -> worker
//! -> tasks -> batched Gemma 4) with random weights at the real E2B/E4B shape, for 1, 2 and 4
//! sources in one process and one loaded model. Prints, per source count: model requests
//! per second, batch occupancy, audio real-time factor, capture-to-answer latency p50/p95,
//! and the governor's lag (max and at the end) with its deepest degradation step.
//!
//! Every source runs `listen-and-look` (the latest frame plus the last 5 s of audio in one
//! request), so each request carries both modalities.
//!
//! Each source count runs with prompt-prefix reuse off and on (`--prefix-cache`; see
//! `model::prefix`) and, with `--instructions user,system`, with the task's prompt after the
//! media and in a system turn before it (`[tasks] instructions`); each row reports the prompt tokens per request, the tokens the
//! decoder computed per request (prefix builds included) and the mean model step time.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;

use super::model::{real_text_config, GEMMA4_12B_CONFIG};
use crate::config::{Config, Instructions, SourceConfig, TaskKind};
use crate::run::{self, Overrides, RunExtras, SharedModel};
use gemma4::layers::Quant;
use gemma4::loader::{ModelFiles, Weights};
use gemma4::testing::{tiny_tokenizer_json, tiny_vocab_size};
use gemma4::text::LoadOptions;
use gemma4::tokenizer::GEMMA4_CHAT_TEMPLATE;
use gemma4::Gemma4;

#[derive(Debug, Args)]
pub struct PipelineBenchArgs {
    /// Architecture shape: e2b or e4b.
    #[arg(long, default_value = "e2b")]
    pub arch: String,
    #[arg(long, value_parser = crate::model_cli::quant_arg(), default_value = "q8_0")]
    pub quant: Quant,
    /// Source counts to run, one after the other (comma separated).
    #[arg(long, default_value = "1,2,4", value_delimiter = ',')]
    pub sources: Vec<usize>,
    /// Seconds per source count.
    #[arg(long, default_value_t = 600)]
    pub seconds: u64,
    /// Token budget per answer.
    #[arg(long, default_value_t = 16)]
    pub max_tokens: usize,
    /// Where the per-run event files go.
    #[arg(long, default_value = "bench-pipeline")]
    pub out: PathBuf,
    /// Prompt-prefix K/V reuse for the runs: `off,on` runs each source count both ways
    /// (the "before" and "after" rows), `on` or `off` one way.
    #[arg(long, default_value = "off,on", value_delimiter = ',', value_parser = ["off", "on"])]
    pub prefix_cache: Vec<String>,
    /// Where the task's prompt goes (`[tasks] instructions`): `user,system` runs each
    /// source count with both layouts.
    #[arg(long, default_value = "system", value_delimiter = ',', value_parser = ["system", "user"])]
    pub instructions: Vec<String>,
}

/// A model folder with a real config shape (`e2b`/`e4b`: text plus the vision and audio
/// towers at their defaults, which are the released shapes; `12b`: the `gemma4_unified`
/// preset; or a `config.json`) and the tiny test tokenizer, whose special-token ids replace
/// the config's; weights come from [`Weights::random`].
pub fn write_model_dir(dir: &Path, arch: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tok: serde_json::Value = serde_json::from_str(&tiny_tokenizer_json())?;
    let id = |s: &str| -> anyhow::Result<u64> {
        tok["added_tokens"]
            .as_array()
            .and_then(|a| a.iter().find(|t| t["content"] == s))
            .and_then(|t| t["id"].as_u64())
            .ok_or_else(|| anyhow::anyhow!("tiny tokenizer has no {s}"))
    };
    let mut cfg: serde_json::Value = match arch {
        "e2b" | "e4b" => {
            let text = serde_json::to_value(real_text_config(arch)?)?;
            let hidden = text["hidden_size"].clone();
            serde_json::json!({
                "model_type": "gemma4",
                "text_config": text,
                "vision_config": {},
                "audio_config": {"output_proj_dims": hidden},
            })
        }
        "12b" => serde_json::from_str(GEMMA4_12B_CONFIG)?,
        path if path.ends_with(".json") => serde_json::from_str(&std::fs::read_to_string(path)?)?,
        _ => anyhow::bail!("unknown arch {arch:?} (e2b, e4b, 12b or a config.json path)"),
    };
    let vocab = cfg["text_config"]["vocab_size"].as_u64().unwrap_or(0);
    if (vocab as usize) < tiny_vocab_size() {
        anyhow::bail!(
            "{arch}: vocab_size {vocab} is smaller than the benchmark tokenizer's {} ids",
            tiny_vocab_size()
        );
    }
    for (key, tok) in [
        ("boi_token_id", "<|image>"),
        ("eoi_token_id", "<image|>"),
        ("image_token_id", "<|image|>"),
        ("video_token_id", "<|video|>"),
        ("boa_token_id", "<|audio>"),
        ("eoa_token_index", "<audio|>"),
        ("audio_token_id", "<|audio|>"),
    ] {
        cfg[key] = serde_json::json!(id(tok)?);
    }
    cfg["eos_token_id"] = serde_json::json!([1, id("<turn|>")?]);
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    std::fs::write(dir.join("tokenizer.json"), tiny_tokenizer_json())?;
    std::fs::write(dir.join("chat_template.jinja"), GEMMA4_CHAT_TEMPLATE)?;
    // ModelFiles wants a weights file; the random backend never reads it.
    candle_core::safetensors::save(
        &std::collections::HashMap::<String, candle_core::Tensor>::new(),
        dir.join("model.safetensors"),
    )?;
    Ok(())
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

pub fn run(a: &PipelineBenchArgs) -> anyhow::Result<()> {
    gstreamer::init()?;
    let dir = a.out.join("model");
    write_model_dir(&dir, &a.arch)?;
    let t0 = Instant::now();
    let opts = LoadOptions {
        quant: a.quant,
        max_context: 2048,
        ..LoadOptions::default()
    };
    let mut model = Gemma4::assemble(
        ModelFiles::from_dir(&dir)?,
        &opts,
        Weights::random(0x5eed, &candle_core::Device::Cpu, candle_core::DType::F32),
    )?;
    eprintln!(
        "{} {} random weights loaded in {:.1} s",
        a.arch,
        a.quant.as_str(),
        t0.elapsed().as_secs_f64()
    );
    let mut rows = Vec::new();
    let runs = a.sources.iter().flat_map(|&n| {
        a.instructions.iter().flat_map(move |layout| {
            a.prefix_cache
                .iter()
                .map(move |p| (n, layout.as_str(), p == "on"))
        })
    });
    for (n, layout, reuse) in runs {
        // Off first drops whatever an earlier run kept, so each run starts cold.
        model.prefixes.set_enabled(false);
        model.prefixes.set_enabled(reuse);
        model.prefixes.reset_stats();
        let mut cfg = Config::default();
        cfg.model.id = dir.display().to_string();
        cfg.model.max_tokens = a.max_tokens;
        cfg.http.enabled = false;
        cfg.captions.dir = String::new();
        cfg.tasks.instructions = if layout == "user" {
            Instructions::User
        } else {
            Instructions::System
        };
        let tag = if reuse { "on" } else { "off" };
        let events = a
            .out
            .join(format!("events-{n}-{layout}-prefix-{tag}.jsonl"));
        let _ = std::fs::remove_file(&events);
        cfg.run.events = events.display().to_string();
        cfg.sources = (1..=n)
            .map(|i| {
                let mut s = SourceConfig::from_uri(&format!("cam{i}=test:?live=true"));
                s.task = TaskKind::ListenAndLook;
                s
            })
            .collect();
        let (shared, handle) = SharedModel::serve(model, &cfg.model);
        let stop = Arc::new(AtomicBool::new(false));
        let timer = {
            let stop = stop.clone();
            let secs = a.seconds;
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(secs));
                stop.store(true, Ordering::Relaxed);
            })
        };
        let started = Instant::now();
        run::run_with(
            &cfg,
            &Overrides::default(),
            stop,
            Arc::new(AtomicBool::new(false)),
            RunExtras {
                model: Some(shared.clone()),
                ..RunExtras::default()
            },
        )?;
        let wall = started.elapsed().as_secs_f64();
        let _ = timer.join();
        shared.dispatch.close();
        model = handle
            .join()
            .map_err(|_| anyhow::anyhow!("the model thread panicked"))?;
        let mut row = summarize(n, &events, wall, cfg.model.max_batch)?;
        let st = model.prefixes.stats();
        row["prefix_cache"] = serde_json::json!(tag);
        row["instructions"] = serde_json::json!(layout);
        row["prompt_tokens_per_request"] = serde_json::json!(if st.requests > 0 {
            st.prompt_tokens as f64 / st.requests as f64
        } else {
            0.0
        });
        row["computed_prompt_tokens_per_request"] = serde_json::json!(st.computed_per_request());
        row["prefix_stats"] = serde_json::to_value(st)?;
        rows.push(row);
        println!("{}", rows.last().map(|r| r.to_string()).unwrap_or_default());
    }
    eprintln!("\nsources  instructions  prefix  prompt/computed tok/req  step s  req/s   batch-occupancy  audio-RTF  latency p50/p95 (s)  lag max/end (s)  deepest level");
    for r in &rows {
        eprintln!(
            "{:>7}  {:>12}  {:>6}  {:>10.1} / {:<10.1}  {:>6.2}  {:>6.3}  {:>15.2}  {:>9.2}  {:>8.1} / {:<8.1}  {:>6.1} / {:<6.1}  {:>5}",
            r["sources"],
            r["instructions"].as_str().unwrap_or(""),
            r["prefix_cache"].as_str().unwrap_or(""),
            r["prompt_tokens_per_request"].as_f64().unwrap_or(0.0),
            r["computed_prompt_tokens_per_request"].as_f64().unwrap_or(0.0),
            r["step_s_mean"].as_f64().unwrap_or(0.0),
            r["requests_per_s"].as_f64().unwrap_or(0.0),
            r["batch_occupancy"].as_f64().unwrap_or(0.0),
            r["audio_rtf"].as_f64().unwrap_or(0.0),
            r["latency_p50_s"].as_f64().unwrap_or(0.0),
            r["latency_p95_s"].as_f64().unwrap_or(0.0),
            r["lag_max_s"].as_f64().unwrap_or(0.0),
            r["lag_end_s"].as_f64().unwrap_or(0.0),
            r["deepest_level"]
        );
    }
    Ok(())
}

fn summarize(
    n: usize,
    events: &Path,
    wall: f64,
    max_batch: usize,
) -> anyhow::Result<serde_json::Value> {
    let text = std::fs::read_to_string(events)?;
    let mut lat = Vec::new();
    let mut batches = Vec::new();
    // Model seconds of each request's step, to average per step below.
    let mut step_s = Vec::new();
    // Audio RTF of the whole system: model time spent per second of audio heard, each
    // request charged its share of the batched step it ran in.
    let mut audio_model_s = 0.0;
    let mut audio_s = 0.0;
    let mut lag_max: f64 = 0.0;
    let mut lag_end = std::collections::HashMap::new();
    let mut level = 0;
    let mut requests = 0usize;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        match v["kind"].as_str() {
            Some("scene") | Some("description") => {
                requests += 1;
                lat.push(v["latency_ms"].as_f64().unwrap_or(0.0) / 1000.0);
                batches.push(v["batch"].as_f64().unwrap_or(1.0));
                step_s.push(v["model_ms"].as_f64().unwrap_or(0.0) / 1000.0);
                let audio = v["audio_seconds"].as_f64().unwrap_or(0.0);
                if audio > 0.0 {
                    let share = v["batch"].as_f64().unwrap_or(1.0).max(1.0);
                    audio_model_s += v["model_ms"].as_f64().unwrap_or(0.0) / 1000.0 / share;
                    audio_s += audio;
                }
            }
            Some("state") if v.get("lag_seconds").is_some() => {
                let l = v["lag_seconds"].as_f64().unwrap_or(0.0);
                lag_max = lag_max.max(l);
                lag_end.insert(v["source"].to_string(), l);
                level = level.max(v["level"].as_u64().unwrap_or(0));
            }
            _ => {}
        }
    }
    // Each request reports its step's size, so weight steps by 1/size to get per-step means.
    let steps: f64 = batches.iter().map(|b| 1.0 / b).sum();
    let occupancy = if steps > 0.0 {
        batches.len() as f64 / steps / max_batch as f64
    } else {
        0.0
    };
    // A step of b requests is reported b times: weight each report by 1/b.
    let step_s_mean = if steps > 0.0 {
        step_s
            .iter()
            .zip(&batches)
            .map(|(s, b)| s / b.max(1.0))
            .sum::<f64>()
            / steps
    } else {
        0.0
    };
    Ok(serde_json::json!({
        "sources": n,
        "step_s_mean": step_s_mean,
        "wall_s": wall,
        "requests": requests,
        "requests_per_s": requests as f64 / wall.max(1e-9),
        "batch_occupancy": occupancy,
        "mean_batch": occupancy * max_batch as f64,
        "audio_rtf": if audio_s > 0.0 { audio_model_s / audio_s } else { 0.0 },
        "audio_seconds_heard": audio_s,
        "latency_p50_s": percentile(&mut lat.clone(), 0.5),
        "latency_p95_s": percentile(&mut lat, 0.95),
        "lag_max_s": lag_max,
        "lag_end_s": lag_end.values().cloned().fold(0.0, f64::max),
        "deepest_level": level,
    }))
}
