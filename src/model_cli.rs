//! `percept model info` and `percept model run`.

use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, Subcommand};

use gemma4::clippable::VisionQuant;
use gemma4::config::{Arch, Gemma4Config, KvSource};
use gemma4::generate::Sampling;
use gemma4::layers::{KeepF16, Quant};
use gemma4::loader::{ModelFiles, Weights};
use gemma4::multimodal::MediaEncoder;
use gemma4::prompt::Prompt;
use gemma4::text::LoadOptions;
use gemma4::Gemma4;

/// `percept model ...`
#[derive(Debug, Subcommand)]
pub enum ModelCmd {
    /// Architecture, parameter counts and memory estimates of a checkpoint.
    Info(InfoArgs),
    /// Run one prompt (with optional images/audio) and print the answer.
    Run(RunArgs),
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Local folder, hub id (looked up in the HF cache), a `.gguf` file, an LM Studio
    /// folder of GGUF files or `ollama:NAME[:TAG]`.
    pub model: String,
    /// The projector GGUF (`mmproj-*.gguf`) of a GGUF model; default: one beside it.
    #[arg(long)]
    pub mmproj: Option<PathBuf>,
    /// Context length (tokens) for the KV-cache estimate.
    #[arg(long, default_value_t = 8192)]
    pub context: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Local folder, hub id, a `.gguf` file, an LM Studio folder of GGUF files or
    /// `ollama:NAME[:TAG]`.
    #[arg(long)]
    pub model: String,
    /// The projector GGUF (`mmproj-*.gguf`) of a GGUF model; default: one beside it.
    #[arg(long)]
    pub mmproj: Option<PathBuf>,
    /// Image files, in prompt order (placed before the text).
    #[arg(long = "image")]
    pub images: Vec<PathBuf>,
    /// An audio file (placed before the text, after images).
    #[arg(long)]
    pub audio: Option<PathBuf>,
    /// The user prompt.
    #[arg(long)]
    pub prompt: String,
    /// Optional system prompt.
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    #[arg(long, value_parser = quant_arg(), default_value_t = Quant::F32)]
    pub quant: Quant,
    /// Keep parts at f16 although `--quant` is q8_0/q4k: `projections` = the image/audio
    /// projections into the decoder and the token table (tied lm_head).
    #[arg(long, value_parser = keep_f16_arg(), default_value_t = KeepF16::None)]
    pub keep_f16: KeepF16,
    /// The E2B/E4B vision tower's encoder linears: `int8` (AVX-512 VNNI; f32 on CPUs
    /// without it and on GPUs) or `f32` (the reference's precision).
    #[arg(long, value_parser = vision_quant_arg(), default_value_t = VisionQuant::Int8)]
    pub vision_quant: VisionQuant,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Largest context one sequence may use (full-layer caches grow up to it).
    #[arg(long, default_value_t = 8192)]
    pub max_context: usize,
    /// Prompt tokens per prefill forward.
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
    /// Image soft-token budget (70, 140, 280, 560 or 1120). Default: the checkpoint's
    /// `processor_config.json` `image_processor.max_soft_tokens`, else 280.
    #[arg(long)]
    pub max_soft_tokens: Option<usize>,
    /// Let the model think (`enable_thinking`).
    #[arg(long)]
    pub thinking: bool,
    /// Print one JSON object instead of the text.
    #[arg(long)]
    pub json: bool,
}

/// Runs a `model` subcommand. `encoder` turns image/audio files into soft tokens; `None`
/// uses the checkpoint's own towers ([`gemma4::media::TowerEncoder`]).
pub fn run(cmd: ModelCmd, encoder: Option<&dyn MediaEncoder>) -> anyhow::Result<()> {
    match cmd {
        ModelCmd::Info(a) => info(&a),
        ModelCmd::Run(a) => run_prompt(&a, encoder),
    }
}

/// `--quant`: the names of [`Quant`], listed in `--help` and in the error for any other.
pub fn quant_arg() -> impl clap::builder::TypedValueParser<Value = Quant> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(Quant::NAMES).try_map(|s| s.parse::<Quant>())
}

/// `--keep-f16`: the names of [`KeepF16`].
pub fn keep_f16_arg() -> impl clap::builder::TypedValueParser<Value = KeepF16> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(KeepF16::NAMES).try_map(|s| s.parse::<KeepF16>())
}

/// `--vision-quant`: the names of [`VisionQuant`].
pub fn vision_quant_arg() -> impl clap::builder::TypedValueParser<Value = VisionQuant> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(VisionQuant::NAMES)
        .try_map(|s| s.parse::<VisionQuant>())
}

/// Environment variable that picks the model's device: `cpu`, `cuda`, `cuda:N`, `metal` or
/// `metal:N`.
pub const DEVICE_ENV: &str = "PERCEPT_DEVICE";

/// The device `model run` and the engine load the model on, and its activation dtype:
/// `PERCEPT_DEVICE` chooses ([`gemma4::device::open`]); a missing GPU is an error that names
/// `PERCEPT_DEVICE=cpu`.
pub fn default_device() -> anyhow::Result<(candle_core::Device, candle_core::DType)> {
    let spec = std::env::var(DEVICE_ENV).ok();
    device_from(spec.as_deref().filter(|s| !s.trim().is_empty()))
}

/// [`default_device`] for an explicit `PERCEPT_DEVICE` value (`None` = the build's default).
pub fn device_from(
    spec: Option<&str>,
) -> anyhow::Result<(candle_core::Device, candle_core::DType)> {
    use gemma4::device::DeviceError;
    gemma4::device::open(spec).map_err(|e| match e {
        DeviceError::NotBuilt { spec, feature } => anyhow::anyhow!(
            "{DEVICE_ENV}={spec}: this percept was built without the `{feature}` feature"
        ),
        e @ DeviceError::Unavailable { .. } => {
            anyhow::anyhow!("{e}; {DEVICE_ENV}=cpu runs the model on the CPU")
        }
        e => anyhow::anyhow!("{DEVICE_ENV}={e}"),
    })
}

/// Parameter counts by part, from the safetensors headers. For `gemma4_unified` the
/// "towers" are the encoder-free embedders (`model.vision_embedder`, `model.embed_*`).
#[derive(Debug, Default, serde::Serialize)]
pub struct ParamCounts {
    pub decoder_linears: usize,
    pub token_embeddings: usize,
    pub per_layer_embeddings: usize,
    pub norms_and_scalars: usize,
    pub vision_tower: usize,
    pub audio_tower: usize,
    pub total: usize,
}

/// Counts parameters of a mapped checkpoint.
pub fn count_params(w: &Weights) -> ParamCounts {
    let mut c = ParamCounts::default();
    for name in w.names() {
        let n: usize = w.shape_of(&name).map(|s| s.iter().product()).unwrap_or(0);
        c.total += n;
        if name.starts_with("model.vision_tower")
            || name.starts_with("model.embed_vision")
            || name.starts_with("model.vision_embedder")
        {
            c.vision_tower += n;
        } else if name.starts_with("model.audio_tower") || name.starts_with("model.embed_audio") {
            c.audio_tower += n;
        } else if name.ends_with("embed_tokens_per_layer.weight") {
            c.per_layer_embeddings += n;
        } else if name.ends_with("embed_tokens.weight") {
            c.token_embeddings += n;
        } else if name.ends_with("proj.weight")
            || name.ends_with("per_layer_input_gate.weight")
            || name.ends_with("per_layer_projection.weight")
        {
            c.decoder_linears += n;
        } else {
            c.norms_and_scalars += n;
        }
    }
    c
}

/// Bytes of K/V for one sequence of `n` tokens at `bytes` per element: the formula
/// `2 * kv_heads * head_dim * bytes * min(n, W or n)` over cache-owning layers.
pub fn kv_bytes(cfg: &Gemma4Config, n: usize, bytes: usize) -> anyhow::Result<usize> {
    let specs = cfg.text_config.layer_specs()?;
    Ok(specs
        .iter()
        .filter(|s| s.kv == KvSource::Own)
        .map(|s| {
            let len = s.sliding_window.map(|w| w.min(n)).unwrap_or(n);
            2 * s.num_kv_heads * s.head_dim * bytes * len
        })
        .sum())
}

fn info(a: &InfoArgs) -> anyhow::Result<()> {
    let files = ModelFiles::resolve_with(&a.model, a.mmproj.as_deref())?;
    let cfg = Gemma4Config::from_file(&files.config)?;
    let w = Weights::open(
        &files.weights,
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )?;
    let counts = count_params(&w);
    let t = &cfg.text_config;
    let specs = t.layer_specs()?;
    let n_sliding = specs.iter().filter(|s| s.sliding_window.is_some()).count();
    let mut estimates = Vec::new();
    for q in [Quant::F32, Quant::Bf16, Quant::F16, Quant::Q8_0, Quant::Q4K] {
        let bpw = q.bytes_per_weight();
        // Decoder linears, token table (+ the tied head when quantized) and PLE table take
        // the quant; norms stay f32; towers stay at bf16 (2 bytes) unless f32.
        let tied_head = if q.ggml().is_some() {
            counts.token_embeddings
        } else {
            0
        };
        let quantized = counts.decoder_linears
            + counts.token_embeddings
            + tied_head
            + counts.per_layer_embeddings;
        // The unified model's embedders are mostly its two projections, which take the
        // quant (`--keep-f16 projections` keeps them at f16).
        let tower_b = if cfg.arch == Arch::Gemma4Unified {
            bpw
        } else if q == Quant::F32 {
            4.0
        } else {
            2.0
        };
        let weights = quantized as f64 * bpw
            + counts.norms_and_scalars as f64 * 4.0
            + (counts.vision_tower + counts.audio_tower) as f64 * tower_b;
        let act_bytes = if matches!(q, Quant::Bf16 | Quant::F16) {
            2
        } else {
            4
        };
        let kv = kv_bytes(&cfg, a.context, act_bytes)? as f64;
        estimates.push(serde_json::json!({
            "quant": q.as_str(),
            "weights_gib": weights / (1u64 << 30) as f64,
            "kv_gib_at_context": kv / (1u64 << 30) as f64,
            "total_gib": (weights + kv) / (1u64 << 30) as f64,
        }));
    }
    let out = serde_json::json!({
        "model": a.model,
        "dir": files.dir,
        "architecture": {
            "model_type": cfg.model_type,
            "layers": t.num_hidden_layers,
            "hidden": t.hidden_size,
            "intermediate": t.intermediate_size,
            "double_wide_mlp_on_shared_layers": t.use_double_wide_mlp,
            "heads": t.num_attention_heads,
            "sliding_layers": n_sliding,
            "full_layers": specs.len() - n_sliding,
            "head_dim_sliding": specs.iter().find(|s| s.sliding_window.is_some()).map(|s| s.head_dim),
            "head_dim_full": specs.iter().find(|s| s.sliding_window.is_none()).map(|s| s.head_dim),
            "kv_heads_sliding": specs.iter().find(|s| s.sliding_window.is_some()).map(|s| s.num_kv_heads),
            "kv_heads_full": specs.iter().find(|s| s.sliding_window.is_none()).map(|s| s.num_kv_heads),
            "sliding_window": t.sliding_window,
            "kv_shared_layers": t.num_kv_shared_layers,
            "attention_k_eq_v": t.attention_k_eq_v,
            "ple_dim": t.ple_dim(),
            "vocab": t.vocab_size,
            "final_logit_softcapping": t.final_logit_softcapping,
            "vision_tower": cfg.vision_config.is_some(),
            "audio_tower": cfg.audio_config.is_some(),
            "vision_embedder": cfg.unified_vision.is_some(),
            "audio_embedder": cfg.unified_audio.is_some(),
            "vision_mask": match (cfg.arch, t.use_bidirectional_attention.as_deref()) {
                (Arch::Gemma4Unified, Some("vision")) => "image blocks on every layer",
                (_, Some("vision")) => "image blocks on sliding layers",
                _ => "causal",
            },
        },
        "params": counts,
        "context_for_kv": a.context,
        "memory_estimates": estimates,
    });
    let mut out = out;
    gemma4::gguf_info::add_format(&mut out, &files)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        let arch = &out["architecture"];
        println!(
            "{} ({}, {})",
            a.model,
            cfg.arch.model_type(),
            files.dir.display()
        );
        println!(
            "  decoder: {} layers ({} sliding / {} full), hidden {}, heads {}, window {}, KV-shared {}, PLE {:?}",
            t.num_hidden_layers,
            n_sliding,
            specs.len() - n_sliding,
            t.hidden_size,
            t.num_attention_heads,
            t.sliding_window,
            t.num_kv_shared_layers,
            t.ple_dim()
        );
        println!(
            "  head_dim sliding/full: {}/{}, kv heads sliding/full: {}/{}",
            arch["head_dim_sliding"],
            arch["head_dim_full"],
            arch["kv_heads_sliding"],
            arch["kv_heads_full"]
        );
        println!(
            "  params (M): total {:.2} (decoder linears {:.2}, token table {:.2}, PLE table {:.2}, vision {:.2}, audio {:.2})",
            counts.total as f64 / 1e6,
            counts.decoder_linears as f64 / 1e6,
            counts.token_embeddings as f64 / 1e6,
            counts.per_layer_embeddings as f64 / 1e6,
            counts.vision_tower as f64 / 1e6,
            counts.audio_tower as f64 / 1e6
        );
        gemma4::gguf_info::print_format(&out);
        println!("  memory at {} tokens of context:", a.context);
        for e in &estimates {
            println!(
                "    {:5}  weights {:8.3} GiB  kv {:7.4} GiB  total {:8.3} GiB",
                e["quant"].as_str().unwrap_or(""),
                e["weights_gib"].as_f64().unwrap_or(0.0),
                e["kv_gib_at_context"].as_f64().unwrap_or(0.0),
                e["total_gib"].as_f64().unwrap_or(0.0)
            );
        }
    }
    Ok(())
}

fn run_prompt(a: &RunArgs, encoder: Option<&dyn MediaEncoder>) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let (device, dtype) = default_device()?;
    let opts = LoadOptions {
        device,
        dtype,
        quant: a.quant,
        keep_f16: a.keep_f16,
        max_context: a.max_context,
        vision_quant: a.vision_quant,
    };
    let files = ModelFiles::resolve_with(&a.model, a.mmproj.as_deref())?;
    gemma4::gguf_info::check_projector(&files, !a.images.is_empty(), a.audio.is_some())?;
    let model = Gemma4::load_files(files, &opts)?;
    let load_s = t0.elapsed().as_secs_f64();
    let tok = model
        .tokenizer
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("{} has no tokenizer.json", model.files.dir.display()))?;

    let t1 = Instant::now();
    let mut prompt = Prompt::new();
    if let Some(s) = &a.system {
        prompt.system(s);
    }
    prompt.thinking(a.thinking);
    if !a.images.is_empty() || a.audio.is_some() {
        let budget = a.max_soft_tokens.unwrap_or_else(|| {
            gemma4::media::processor_image_budget(&model.files.dir)
                .unwrap_or(gemma4::media::DEFAULT_IMAGE_SOFT_TOKENS)
        });
        let own = gemma4::media::TowerEncoder::new(budget);
        let enc: &dyn MediaEncoder = encoder.unwrap_or(&own);
        for p in &a.images {
            prompt.image(enc.encode_image(&model, p)?)?;
        }
        if let Some(p) = &a.audio {
            for t in enc.encode_audio(&model, p)? {
                prompt.audio(t)?;
            }
        }
    }
    let encode_s = t1.elapsed().as_secs_f64();
    prompt.text(&a.prompt);
    let sampling = Sampling {
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
    };
    let (prompt_text, req) = prompt.rendered_request(tok, a.max_tokens, sampling)?;
    let input_ids = req.input_ids.clone();
    let image_tokens = input_ids
        .iter()
        .filter(|&&t| t == tok.special.image)
        .count();
    let audio_tokens = input_ids
        .iter()
        .filter(|&&t| t == tok.special.audio)
        .count();
    let mut printed = 0usize;
    let mut so_far: Vec<u32> = Vec::new();
    let stream = !a.json;
    let gens = model.generate(std::slice::from_ref(&req), a.prefill_chunk, &mut |_, t| {
        if stream {
            // Stream text as it firms up: decode everything and print the new suffix.
            so_far.push(t);
            if let Ok(s) = tok.decode(&so_far, true) {
                if s.len() > printed && s.is_char_boundary(printed) {
                    print!("{}", &s[printed..]);
                    printed = s.len();
                    use std::io::Write;
                    let _ = std::io::stdout().flush();
                }
            }
        }
    })?;
    let g = gens
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no generation result"))?;
    let text = tok.decode(&g.output_ids, true)?;
    if a.json {
        let n_out = g.output_ids.len();
        let out = serde_json::json!({
            "prompt": prompt_text,
            "input_ids": input_ids,
            "image_tokens": image_tokens,
            "audio_tokens": audio_tokens,
            "output_ids": g.output_ids,
            "text": text,
            "stop": g.stop,
            "quant": a.quant.as_str(),
            "keep_f16": a.keep_f16.as_str(),
            "vision_quant": a.vision_quant.as_str(),
            "timings": {
                "load_s": load_s,
                "encode_s": encode_s,
                "prefill_s": g.prefill_s,
                "decode_s": g.decode_s,
                "prefill_tok_per_s": input_ids.len() as f64 / g.prefill_s.max(1e-9),
                "decode_tok_per_s": (n_out.saturating_sub(1)) as f64 / g.decode_s.max(1e-9),
            }
        });
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!();
        eprintln!(
            "[{} prompt tokens, {} generated, load {:.2}s, prefill {:.2}s, decode {:.2}s]",
            input_ids.len(),
            g.output_ids.len(),
            load_s,
            g.prefill_s,
            g.decode_s
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_spec_cpu_and_errors() {
        let (d, t) = device_from(Some(" CPU ")).unwrap();
        assert!(d.is_cpu());
        assert_eq!(t, candle_core::DType::F32);
        let e = device_from(Some("tpu")).unwrap_err().to_string();
        assert!(e.contains("expected cpu, cuda"), "{e}");
        let e = device_from(Some("cuda:x")).unwrap_err().to_string();
        assert!(e.contains("not a device number"), "{e}");
    }

    #[cfg(not(any(feature = "cuda", feature = "metal")))]
    #[test]
    fn cpu_build_defaults_to_cpu_and_names_missing_features() {
        assert!(device_from(None).unwrap().0.is_cpu());
        let e = device_from(Some("cuda:1")).unwrap_err().to_string();
        assert!(e.contains("without the `cuda` feature"), "{e}");
        let e = device_from(Some("metal")).unwrap_err().to_string();
        assert!(e.contains("without the `metal` feature"), "{e}");
    }
}
