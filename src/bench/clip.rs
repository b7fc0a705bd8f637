//! `percept bench clip`: `percept analyze` of one long clip with random weights at a real
//! shape (default: the 12B `gemma4_unified` at q4k), the seed's demonstration of a 5-minute
//! clip sampled at 1 fps with its soundtrack. The clip is made here unless one is given: a
//! 1280x720 25 fps test pattern with speech on the soundtrack (espeak-ng, or `--speech`
//! looped), H.264 + AAC in MP4. Prints the load time and peak RSS, the analysis wall time and
//! the peak RSS of the whole process, what the summary and the transcription consumed
//! (frames, audio seconds, windows, model tokens) and the drops (none are expected: analysis
//! of a file waits for the model instead of dropping).
//!
//! Random weights never emit an end-of-turn token, so every answer runs to its budget
//! (`--max-tokens` per transcript window, 256 per summary window): the decode work is an
//! upper bound of what a real checkpoint does.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;

use super::pipeline::write_model_dir;
use crate::config::Config;
use crate::control::ModelStatus;
use crate::run::SharedModel;
use gemma4::layers::Quant;
use gemma4::loader::{ModelFiles, Weights};
use gemma4::text::LoadOptions;
use gemma4::Gemma4;

#[derive(Debug, Args)]
pub struct ClipBenchArgs {
    /// Architecture shape: 12b, e2b, e4b, or a path to a `config.json`.
    #[arg(long, default_value = "12b")]
    pub arch: String,
    #[arg(long, value_parser = crate::model_cli::quant_arg(), default_value = "q4k")]
    pub quant: Quant,
    /// The clip to analyse; made in `--out` when absent.
    #[arg(long)]
    pub clip: Option<PathBuf>,
    /// Length of the clip made when `--clip` is absent.
    #[arg(long, default_value_t = 300.0)]
    pub seconds: f64,
    /// Speech for the made clip's soundtrack, looped (default: espeak-ng reads a paragraph).
    #[arg(long)]
    pub speech: Option<PathBuf>,
    /// `[model] context`: prompt + answer tokens of one request; summary windows are cut
    /// to fit it.
    #[arg(long, default_value_t = 8192)]
    pub context: usize,
    /// `[model] prefill_chunk`.
    #[arg(long, default_value_t = 1024)]
    pub prefill_chunk: usize,
    /// `[model] max_tokens`: answer budget of a transcript window.
    #[arg(long, default_value_t = 96)]
    pub max_tokens: usize,
    /// Where the clip, the model folder and the analysis go.
    #[arg(long, default_value = "bench-clip")]
    pub out: PathBuf,
    /// Print the JSON line only.
    #[arg(long)]
    pub json: bool,
}

fn proc_status_gib(key: &str) -> f64 {
    super::model::proc_status_kib(key).unwrap_or(0) as f64 / (1u64 << 20) as f64
}

const SPEECH_TEXT: &str = "The field station recorded the river for three days. In the \
    morning the water was low and the birds came down to the banks. By noon the wind turned \
    and the rain started, first lightly, then hard enough to hide the far shore. We moved the \
    camera twice. The second night a fox crossed the gravel bar just after midnight and \
    stopped to look at the light.";

fn tool(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let out = cmd
        .output()
        .map_err(|e| anyhow::anyhow!("{what}: cannot run it ({e}); install it or pass --clip"))?;
    if !out.status.success() {
        anyhow::bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Makes the benchmark clip: `seconds` of 1280x720 25 fps test pattern with speech looped on
/// the soundtrack.
pub fn make_clip(out: &Path, seconds: f64, speech: Option<&Path>) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(out)?;
    let speech = match speech {
        Some(p) => p.to_path_buf(),
        None => {
            let p = out.join("speech.wav");
            tool(
                Command::new("espeak-ng").arg("-w").arg(&p).arg(SPEECH_TEXT),
                "espeak-ng",
            )?;
            p
        }
    };
    let clip = out.join(format!("clip-{}s.mp4", seconds.round()));
    tool(
        Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-y"])
            .args(["-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=25"])
            .args(["-stream_loop", "-1", "-i"])
            .arg(&speech)
            .args(["-t", &format!("{seconds}")])
            .args(["-c:v", "libx264", "-preset", "ultrafast", "-g", "50"])
            .args([
                "-pix_fmt", "yuv420p", "-c:a", "aac", "-ar", "48000", "-ac", "2",
            ])
            .arg(&clip),
        "ffmpeg",
    )?;
    Ok(clip)
}

/// Runs the benchmark and returns its figures.
pub fn measure(a: &ClipBenchArgs, stop: Arc<AtomicBool>) -> anyhow::Result<serde_json::Value> {
    let clip = match &a.clip {
        Some(p) => p.clone(),
        None => make_clip(&a.out, a.seconds, a.speech.as_deref())?,
    };
    let dir = a.out.join("model");
    write_model_dir(&dir, &a.arch)?;
    let mut cfg = Config::default();
    cfg.model.id = dir.display().to_string();
    cfg.model.quant = a.quant.as_str().to_string();
    cfg.model.context = a.context;
    cfg.model.prefill_chunk = a.prefill_chunk;
    cfg.model.max_tokens = a.max_tokens;
    let t0 = Instant::now();
    let opts = LoadOptions {
        quant: a.quant,
        max_context: a.context,
        ..LoadOptions::default()
    };
    let model = Gemma4::assemble(
        ModelFiles::from_dir(&dir)?,
        &opts,
        Weights::random(0x5eed, &candle_core::Device::Cpu, candle_core::DType::F32),
    )?;
    let load_s = t0.elapsed().as_secs_f64();
    let peak_load = proc_status_gib("VmHWM:");
    tracing::info!(arch = %a.arch, quant = a.quant.as_str(), load_s, "Random weights loaded.");
    let (shared, handle) = SharedModel::serve(model, &cfg.model);
    shared.live.set_model(ModelStatus::Ready {
        id: cfg.model.id.clone(),
        load_seconds: load_s,
    });
    let started = Instant::now();
    let out = a.out.join("analysis");
    // A previous run's finished analysis would be skipped, not measured.
    if out.exists() {
        std::fs::remove_dir_all(&out)?;
    }
    let result =
        crate::analyze::analyze_with(cfg, std::slice::from_ref(&clip), &out, stop, &shared);
    let wall_s = started.elapsed().as_secs_f64();
    shared.dispatch.close();
    let _ = handle.join();
    let done = result?;
    let Some(one) = done.first() else {
        anyhow::bail!("{}: nothing was analysed", clip.display());
    };
    let events = std::fs::read_to_string(one.out_dir.join("events.jsonl"))?;
    let mut stats = serde_json::Value::Null;
    let mut summary = serde_json::Value::Null;
    let mut transcripts = 0usize;
    let mut errors = Vec::new();
    for line in events.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        match v["kind"].as_str() {
            Some("summary") if v.get("text").is_some() => summary = v,
            Some("summary") => stats = v,
            Some("transcript") => transcripts += 1,
            Some("error") => errors.push(
                v["message"]
                    .as_str()
                    .and_then(|m| m.lines().next())
                    .unwrap_or("")
                    .to_string(),
            ),
            _ => {}
        }
    }
    let m = &shared.metrics.model;
    let prompt_tokens = m.tokens.with_label_values(&["prompt"]).get();
    let generated = m.tokens.with_label_values(&["generated"]).get();
    let audio_s = stats["audio_seconds"].as_f64().unwrap_or(0.0);
    Ok(serde_json::json!({
        "arch": a.arch,
        "quant": a.quant.as_str(),
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "clip": clip.display().to_string(),
        "context": a.context,
        "prefill_chunk": a.prefill_chunk,
        "max_tokens": a.max_tokens,
        "load_s": load_s,
        "peak_rss_load_gib": peak_load,
        "wall_s": wall_s,
        "peak_rss_gib": proc_status_gib("VmHWM:"),
        "frames_decoded": stats["frames_decoded"],
        "frames_sampled": stats["frames_sampled"],
        "frames_dropped": stats["frames_dropped"],
        "audio_seconds": audio_s,
        "audio_seconds_dropped": stats["audio_seconds_dropped"],
        "summary_windows": summary["windows"],
        "summary_frames": summary["frames"],
        "summary_transcript_lines": summary["transcript_lines"],
        "transcript_events": transcripts,
        "errors": errors,
        "model_requests": m.batch_size.get_sample_count(),
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated,
        "realtime_factor": if wall_s > 0.0 { audio_s / wall_s } else { 0.0 },
        "out": one.out_dir.display().to_string(),
    }))
}

/// Entry point of `percept bench clip`.
pub fn run(a: &ClipBenchArgs) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    // Ctrl-C ends the analysis early with its outputs flushed (and figures for what ran).
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let v = measure(a, stop)?;
    println!("{v}");
    if let Some(first) = v["errors"].as_array().and_then(|e| e.first()) {
        anyhow::bail!(
            "{} model requests failed, the first: {}",
            v["errors"].as_array().map_or(0, |e| e.len()),
            first.as_str().unwrap_or("")
        );
    }
    if !a.json {
        eprintln!(
            "\n{} {}: load {:.0} s (peak RSS {:.2} GiB); analysis {:.0} s for {:.0} s of audio \
             (x{:.2} real time), peak RSS {:.2} GiB; {} frames in {} summary windows, {} model \
             requests, {} prompt + {} generated tokens; dropped {} frames, {} s of audio",
            v["arch"].as_str().unwrap_or(""),
            v["quant"].as_str().unwrap_or(""),
            v["load_s"].as_f64().unwrap_or(0.0),
            v["peak_rss_load_gib"].as_f64().unwrap_or(0.0),
            v["wall_s"].as_f64().unwrap_or(0.0),
            v["audio_seconds"].as_f64().unwrap_or(0.0),
            v["realtime_factor"].as_f64().unwrap_or(0.0),
            v["peak_rss_gib"].as_f64().unwrap_or(0.0),
            v["summary_frames"],
            v["summary_windows"],
            v["model_requests"],
            v["prompt_tokens"],
            v["generated_tokens"],
            v["frames_dropped"],
            v["audio_seconds_dropped"],
        );
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use gemma4::testing::{tiny_config_json, TinySpec};

    /// The whole benchmark on a tiny unified model over a made 8-second clip: every second's
    /// frame reaches the summary, all the audio is heard, nothing is dropped.
    #[test]
    fn tiny_unified_clip_is_analysed_whole() {
        let out = gemma4::testing::temp_model_dir("clip-bench");
        let cfg_path = out.join("tiny-config.json");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(
            &cfg_path,
            tiny_config_json(&TinySpec::unified()).to_string(),
        )
        .unwrap();
        let a = ClipBenchArgs {
            arch: cfg_path.display().to_string(),
            quant: Quant::F32,
            clip: None,
            seconds: 8.0,
            speech: None,
            context: 2048,
            prefill_chunk: 256,
            max_tokens: 4,
            out: out.clone(),
            json: true,
        };
        let v = measure(&a, Arc::new(AtomicBool::new(false))).unwrap();
        assert_eq!(v["errors"], serde_json::json!([]), "{v}");
        assert_eq!(v["summary_frames"], 8, "{v}");
        assert_eq!(v["frames_dropped"], 0, "{v}");
        assert_eq!(v["audio_seconds_dropped"], 0.0, "{v}");
        let audio = v["audio_seconds"].as_f64().unwrap();
        assert!((audio - 8.0).abs() < 0.1, "{v}");
        assert!(v["summary_windows"].as_u64().unwrap() >= 1, "{v}");
        // At least one transcript window and the summary went through the model.
        assert!(v["model_requests"].as_u64().unwrap() >= 2, "{v}");
        assert!(v["prompt_tokens"].as_u64().unwrap() > 8 * 60, "{v}");
        assert!(v["peak_rss_gib"].as_f64().unwrap() >= v["peak_rss_load_gib"].as_f64().unwrap());
        let _ = std::fs::remove_dir_all(&out);
    }
}
