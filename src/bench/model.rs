//! `percept bench model`: random weights at the real E2B/E4B/12B shapes (or any
//! `config.json`), per quantization: load time, peak RSS, prefill and decode tokens/s, and
//! decode speed as a fraction of the memory-bandwidth bound measured in the same process.
//! For the encoder-free 12B (`gemma4_unified`) it also times the vision embedder per frame
//! at each image budget and the audio embedder per second of audio.
//!
//! Each quantization runs in a child process so that peak RSS (`VmHWM`) is its own.

use std::time::Instant;

use clap::Args;

use gemma4::clippable::VisionQuant;
use gemma4::config::{Gemma4Config, TextConfig};
use gemma4::layers::Quant;
use gemma4::loader::Weights;
use gemma4::rng::SplitMix64;
use gemma4::text::{LoadOptions, LogitRows, Segment, TextModel};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Architectures: e2b, e4b, 12b, or a path to a `config.json` (comma separated).
    #[arg(long, default_value = "e2b", value_delimiter = ',')]
    pub arch: Vec<String>,
    /// Quantizations (comma separated).
    #[arg(long, value_parser = crate::model_cli::quant_arg(), default_value = "q4k,q8_0", value_delimiter = ',')]
    pub quant: Vec<Quant>,
    /// Prompt tokens for the prefill measurement.
    #[arg(long, default_value_t = 256)]
    pub prompt: usize,
    /// Decode steps.
    #[arg(long, default_value_t = 16)]
    pub decode: usize,
    /// Print JSON lines only.
    #[arg(long)]
    pub json: bool,
    /// Instead of whole models: time single E4B-shaped quantized matmuls (and with q4k the
    /// 12B MLP shapes in Q4_K and Q6_K), percept's CPU kernel (`qmm`) against candle's
    /// `QMatMul`, at 1 and `--prompt` activation rows.
    #[arg(long)]
    pub kernels: bool,
    /// Instead of prefill/decode: the load path of the quantized cache at each (arch, quant):
    /// cold (quantize random weights at the real shape, write the cache file, load it), warm
    /// (cache file in the page cache), cold cache (file evicted with posix_fadvise) and the
    /// time `cat file > /dev/null` takes on the same file, each load in a fresh process.
    #[arg(long)]
    pub load: bool,
    /// With `--load`: where the cache files go (default: the quantized cache folder); they
    /// are removed afterwards unless `--keep-files`.
    #[arg(long)]
    pub load_dir: Option<std::path::PathBuf>,
    /// With `--load`: keep the cache files written.
    #[arg(long)]
    pub keep_files: bool,
    /// Internal: run one (arch, quant) in this process.
    #[arg(long, hide = true)]
    pub child: bool,
    /// Internal: one `--load` step in this process (`write` or `open`) on this file.
    #[arg(long, hide = true, requires = "load_file")]
    pub load_step: Option<String>,
    #[arg(long, hide = true)]
    pub load_file: Option<std::path::PathBuf>,
}

/// Text config of a real checkpoint shape (values from the published configs; see
/// shared/reference/gemma4.md). E4B's `use_double_wide_mlp` is assumed false.
pub fn real_text_config(arch: &str) -> anyhow::Result<TextConfig> {
    let (layers, hidden, ffn, kv, period, shared, dw) = match arch {
        "e2b" => (35, 1536, 6144, 1, 5, 20, true),
        "e4b" => (42, 2560, 10240, 2, 6, 18, false),
        _ => anyhow::bail!("unknown arch {arch:?} (e2b, e4b)"),
    };
    let types: Vec<&str> = (0..layers)
        .map(|i| {
            if (i + 1) % period == 0 {
                "full_attention"
            } else {
                "sliding_attention"
            }
        })
        .collect();
    let v = serde_json::json!({
        "vocab_size": 262144, "vocab_size_per_layer_input": 262144,
        "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
        "num_attention_heads": 8, "num_key_value_heads": kv, "head_dim": 256,
        "global_head_dim": 512, "sliding_window": 512, "layer_types": types,
        "hidden_size_per_layer_input": 256, "num_kv_shared_layers": shared,
        "use_double_wide_mlp": dw, "final_logit_softcapping": 30.0,
        "max_position_embeddings": 131072, "attention_k_eq_v": false,
    });
    Ok(serde_json::from_value(v)?)
}

/// The 12B (`gemma4_unified`) shape. Confirmed (shared/reference/gemma4.md, issue 5): 48
/// layers, hidden 3840, window 1024, one full layer in six, 8 local / 1 global kv heads, K=V
/// on global layers, no PLE, vision patches 48x48 into mm_embed_dim 3840, audio frames of
/// 640 samples. Assumed from Gemma 3 12B (same hidden and depth; check against the released
/// `config.json`, which `--arch path/to/config.json` takes directly): 16 query heads,
/// head_dim 256 (512 on full layers, the Gemma 4 default), intermediate 15360.
pub const GEMMA4_12B_CONFIG: &str = r#"{
  "model_type": "gemma4_unified",
  "text_config": {
    "model_type": "gemma4_unified_text", "vocab_size": 262144, "hidden_size": 3840,
    "intermediate_size": 15360, "num_hidden_layers": 48, "num_attention_heads": 16,
    "num_key_value_heads": 8, "head_dim": 256, "global_head_dim": 512,
    "num_global_key_value_heads": 1, "attention_k_eq_v": true, "sliding_window": 1024,
    "final_logit_softcapping": 30.0, "max_position_embeddings": 262144,
    "use_bidirectional_attention": "vision"
  },
  "vision_config": {"patch_size": 16, "pooling_kernel_size": 3, "mm_embed_dim": 3840,
    "mm_posemb_size": 1120, "output_proj_dims": 3840},
  "audio_config": {"audio_embed_dim": 640}
}"#;

/// The whole config of a benchmark architecture: `e2b`, `e4b` (text only), `12b`, or a
/// path to a `config.json` of either architecture.
pub fn real_config(arch: &str) -> anyhow::Result<Gemma4Config> {
    match arch {
        "e2b" | "e4b" => {
            // Empty tower configs take the upstream defaults, which are the released towers'
            // shapes (vision 768 wide x 16 layers, audio 1024 x 12; the same in E2B and E4B).
            let v = serde_json::json!({"model_type": "gemma4", "text_config": real_text_config(arch)?,
                "vision_config": {}, "audio_config": {}});
            Ok(Gemma4Config::from_json_str(&v.to_string(), arch)?)
        }
        "12b" => Ok(Gemma4Config::from_json_str(GEMMA4_12B_CONFIG, "12b")?),
        path if path.ends_with(".json") => Ok(Gemma4Config::from_file(std::path::Path::new(path))?),
        _ => anyhow::bail!("unknown arch {arch:?} (e2b, e4b, 12b or a config.json path)"),
    }
}

/// A `/proc/self/status` figure in KiB (`VmRSS:`, `VmHWM:`).
pub fn proc_status_kib(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Read bandwidth in bytes per second, all threads, the way a decode step reads its weights
/// (see [`crate::bench::bandwidth`]; a memcpy rate understated it ~2x).
pub fn measure_read_bandwidth() -> f64 {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    crate::bench::bandwidth::measure_read_bandwidth(threads, crate::bench::bandwidth::DEFAULT_BYTES)
}

/// One (arch, quant) measurement in this process (what a child process of [`run`] does).
pub fn run_one(
    arch: &str,
    quant: Quant,
    prompt: usize,
    decode: usize,
) -> anyhow::Result<serde_json::Value> {
    let full = real_config(arch)?;
    let cfg = full.text_config.clone();
    // Measured before the load and after the timed work; the higher one makes the bound
    // (and so the fraction of it reached) the stricter when other load comes and goes. The
    // first reading comes before the model exists so that its 1 GiB buffer never sits
    // on top of the weights in the peak RSS reported.
    let bw_before = measure_read_bandwidth();
    let t0 = Instant::now();
    let w = Weights::random(0x5eed, &candle_core::Device::Cpu, candle_core::DType::F32);
    let opts = LoadOptions {
        quant,
        max_context: prompt + decode + 8,
        ..LoadOptions::default()
    };
    let m = TextModel::load(&w, &cfg, &opts)?;
    let load_s = t0.elapsed().as_secs_f64();
    let rss_after_load = proc_status_kib("VmRSS:").unwrap_or(0);
    let peak_load = proc_status_kib("VmHWM:").unwrap_or(0);

    let mut rng = SplitMix64(7);
    let ids: Vec<u32> = (0..prompt)
        .map(|_| {
            // Ordinary vocabulary ids (past the specials), within the table of small shapes.
            let v = cfg.vocab_size as u64;
            let lo = if v > 201_000 { 1000 } else { 0 };
            (lo + rng.next_u64() % (v - lo).min(200_000)) as u32
        })
        .collect();
    let mut cache = m.new_cache();
    let t = Instant::now();
    let e = m.embed_tokens(&ids)?;
    let tp = m.ple_token_inputs(&ids)?;
    let p = m.ple_inputs(&e, tp.as_ref())?;
    let mut segs = [Segment {
        cache: &mut cache,
        len: prompt,
        logits: LogitRows::Last,
        block_ids: None,
    }];
    let l = m.forward(&e, p.as_ref(), &mut segs)?;
    let prefill_s = t.elapsed().as_secs_f64();
    let mut tok = gemma4::generate::argmax(&l[0].squeeze(0)?.to_vec1::<f32>()?);
    // One untimed step first (as llama-bench warms up): the first step after a prefill pays
    // for growing the caches and for the allocator's first decode-sized buffers.
    let mut step_ms = Vec::with_capacity(decode + 1);
    for _ in 0..=decode {
        let t = Instant::now();
        let e = m.embed_tokens(&[tok])?;
        let tp = m.ple_token_inputs(&[tok])?;
        let p = m.ple_inputs(&e, tp.as_ref())?;
        let mut segs = [Segment {
            cache: &mut cache,
            len: 1,
            logits: LogitRows::Last,
            block_ids: None,
        }];
        let l = m.forward(&e, p.as_ref(), &mut segs)?;
        tok = gemma4::generate::argmax(&l[0].squeeze(0)?.to_vec1::<f32>()?);
        step_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let warmup_ms = step_ms.remove(0);
    let decode_s = step_ms.iter().sum::<f64>() / 1e3;
    let mut sorted = step_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let median_ms = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let media = media_timings(&full, &w)?;
    let peak_run = proc_status_kib("VmHWM:").unwrap_or(0);
    let bw = measure_read_bandwidth().max(bw_before);
    let bytes_tok = m.decode_bytes_per_token() as f64;
    let decode_tps = decode as f64 / decode_s;
    let bound_tps = bw / bytes_tok;
    Ok(serde_json::json!({
        "arch": arch,
        "quant": quant.as_str(),
        "device": "cpu",
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "load_s": load_s,
        "weight_gib": m.weight_bytes() as f64 / (1u64 << 30) as f64,
        "rss_after_load_gib": rss_after_load as f64 / (1u64 << 20) as f64,
        "peak_rss_load_gib": peak_load as f64 / (1u64 << 20) as f64,
        "peak_rss_gib": peak_run as f64 / (1u64 << 20) as f64,
        "prompt_tokens": prompt,
        "prefill_tok_s": prompt as f64 / prefill_s,
        "decode_steps": decode,
        "decode_tok_s": decode_tps,
        "decode_warmup_step_ms": warmup_ms,
        "decode_step_ms_median": median_ms,
        "decode_step_ms_max": sorted.last().copied().unwrap_or(0.0),
        "decode_bytes_per_token_gib": bytes_tok / (1u64 << 30) as f64,
        "read_bandwidth_gb_s": bw / 1e9,
        "bandwidth_bound_tok_s": bound_tps,
        "fraction_of_bound": decode_tps / bound_tps,
        // The same from the median step: a step slowed by other load on a shared machine
        // weighs on the mean but not here.
        "fraction_of_bound_median_step": if median_ms > 0.0 { 1e3 / median_ms / bound_tps } else { 0.0 },
        "kv_cache_mib": cache.bytes() as f64 / (1u64 << 20) as f64,
        "media": media,
    }))
}

/// Largest absolute difference and cosine similarity of two tensors of one shape.
fn deviation(a: &candle_core::Tensor, b: &candle_core::Tensor) -> anyhow::Result<(f64, f64)> {
    let a = a.flatten_all()?.to_vec1::<f32>()?;
    let b = b.flatten_all()?.to_vec1::<f32>()?;
    let (mut max_abs, mut dot, mut na, mut nb) = (0f64, 0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(&b) {
        let (x, y) = (x as f64, y as f64);
        max_abs = max_abs.max((x - y).abs());
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    Ok((
        max_abs,
        dot / (na.sqrt() * nb.sqrt()).max(f64::MIN_POSITIVE),
    ))
}

/// Media fronts at their real shapes: soft tokens and milliseconds per 1280x720 frame at each
/// image budget, and per second (12B: encoder-free embedders) or per 10 s (E2B/E4B: log-mel
/// + audio tower, f32) of audio.
fn media_timings(cfg: &Gemma4Config, w: &Weights) -> anyhow::Result<serde_json::Value> {
    use gemma4::preprocess::{image::RgbImage, unified::preprocess_image};
    use gemma4::unified::{AudioEmbedder, VisionEmbedder};
    let hidden = cfg.text_config.hidden_size;
    let dev = candle_core::Device::Cpu;
    let mut out = serde_json::Map::new();
    let frame = || {
        let (fw, fh) = (1280, 720);
        RgbImage::new(
            fw,
            fh,
            (0..fw * fh * 3).map(|i| (i * 131 % 251) as u8).collect(),
        )
    };
    if let Some(vc) = &cfg.vision_config {
        // Each `vision_quant`, one after the other per budget (same load on the machine);
        // int8 rows also say how far their soft tokens are from f32's.
        let towers = VisionQuant::ALL
            .iter()
            .rev()
            .map(|&vq| {
                let t = gemma4::vision::VisionTower::load_quant(w, vc, hidden, Quant::F32, vq)?;
                Ok((vq, t))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let frame = frame();
        let mut rows = Vec::new();
        for budget in [70, 280] {
            let t = Instant::now();
            let input = gemma4::preprocess::image::preprocess(&frame, budget)?;
            let pre_ms = t.elapsed().as_secs_f64() * 1e3;
            let mut f32_soft: Option<(candle_core::Tensor, f64)> = None;
            for (vq, tower) in &towers {
                let t = Instant::now();
                let soft = tower.encode(&input)?;
                let ms = t.elapsed().as_secs_f64() * 1e3;
                let mut row = serde_json::json!({
                    "budget": budget, "tokens": soft.dim(0)?, "vision_quant": vq.as_str(),
                    "storage": tower.encoder_storage(),
                    "preprocess_ms": pre_ms, "embed_ms": ms,
                });
                match &f32_soft {
                    None => f32_soft = Some((soft, ms)),
                    Some((reference, f32_ms)) => {
                        let (max_abs, cosine) = deviation(reference, &soft)?;
                        row["ratio_to_f32"] = (ms / f32_ms).into();
                        row["max_abs_vs_f32"] = max_abs.into();
                        row["cosine_vs_f32"] = cosine.into();
                    }
                }
                rows.push(row);
            }
        }
        out.insert("image_1280x720".into(), rows.into());
    }
    if let Some(ac) = &cfg.audio_config {
        let tower = gemma4::audio::AudioTower::load(w, ac, hidden)?;
        let samples: Vec<f32> = (0..160_000).map(|i| ((i as f32) * 0.05).sin()).collect();
        let t = Instant::now();
        let mel = gemma4::preprocess::mel::MelExtractor::new().extract(&samples);
        let mel_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let soft = tower.encode(&mel)?;
        out.insert(
            "audio_per_10s".into(),
            serde_json::json!({"tokens": soft.dim(0)?, "mel_ms": mel_ms,
                "embed_ms": t.elapsed().as_secs_f64() * 1e3}),
        );
    }
    if let Some(vc) = &cfg.unified_vision {
        let v = VisionEmbedder::load(w, vc, hidden)?;
        let frame = frame();
        let mut rows = Vec::new();
        for budget in gemma4::preprocess::image::SUPPORTED_SOFT_TOKENS {
            let t = Instant::now();
            let input = preprocess_image(&frame, budget)?;
            let pre_ms = t.elapsed().as_secs_f64() * 1e3;
            let t = Instant::now();
            // A small position table (test shapes) cannot place the largest grids: report
            // that budget as an error instead of failing the run.
            match v.encode(&input, &dev) {
                Ok(soft) => rows.push(serde_json::json!({
                    "budget": budget, "tokens": soft.dim(0)?,
                    "preprocess_ms": pre_ms, "embed_ms": t.elapsed().as_secs_f64() * 1e3,
                })),
                Err(e) => rows.push(serde_json::json!({"budget": budget, "error": e.to_string()})),
            }
        }
        out.insert("image_1280x720".into(), rows.into());
    }
    if let Some(ac) = &cfg.unified_audio {
        let a = AudioEmbedder::load(w, ac, hidden)?;
        let samples: Vec<f32> = (0..16_000).map(|i| ((i as f32) * 0.05).sin()).collect();
        let t = Instant::now();
        let soft = a.encode(&samples, &dev)?;
        out.insert(
            "audio_per_second".into(),
            serde_json::json!({"tokens": soft.dim(0)?, "embed_ms": t.elapsed().as_secs_f64() * 1e3}),
        );
    }
    Ok(if out.is_empty() {
        serde_json::Value::Null
    } else {
        out.into()
    })
}

/// Best-of-`reps` seconds of `f`, after one untimed call (which also lets candle build its
/// repacked copy).
fn time_best(reps: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// `--kernels`: one line per (quant, shape, rows) with both implementations. One activation
/// row is timed the way decode meets it: over enough copies of the matrix (768 MiB) that the
/// weights come from memory, not from a cache a single matrix would fit in; the bandwidth
/// column is then comparable to the read bandwidth printed at the end.
fn run_kernels(a: &BenchArgs) -> anyhow::Result<()> {
    use candle_core::quantized::{QMatMul, QStorage, QTensor};
    use candle_core::{Device, Module, Tensor};
    let mut rng = SplitMix64(3);
    let mut random = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
            .collect()
    };
    use candle_core::quantized::GgmlDType;
    const STREAM_BYTES: f64 = 768.0 * (1u64 << 20) as f64;
    // E4B: MLP gate/up, MLP down, q_proj, at each --quant.
    // (n, k) and the block types to time at that shape.
    type Case<'a> = (usize, usize, Vec<(&'a str, GgmlDType)>);
    let mut cases: Vec<Case> = [(10240usize, 2560usize), (2560, 10240), (2048, 2560)]
        .into_iter()
        .map(|(n, k)| {
            let qs = a
                .quant
                .iter()
                .filter_map(|q| Some((q.as_str(), q.ggml()?)))
                .collect();
            (n, k, qs)
        })
        .collect();
    // 12B MLP gate/up and down in both block types of a llama.cpp Q4_K_M file (Q6_K holds
    // ffn_down on half the layers, attn_v on some, and the tied token table).
    if a.quant.contains(&Quant::Q4K) {
        for (n, k) in [(15360usize, 3840usize), (3840, 15360)] {
            cases.push((n, k, vec![("q4k", GgmlDType::Q4K), ("q6k", GgmlDType::Q6K)]));
        }
    }
    for (n, k, quants) in cases {
        let w = random(n * k);
        for (name, g) in quants {
            let qt = gemma4::qmm::quantize_par(&w, n, k, g)?;
            let bytes = qt.storage_size_in_bytes() as f64;
            let data = qt.data()?;
            for m in [1, a.prompt] {
                let copies = if m == 1 {
                    (STREAM_BYTES / bytes).ceil() as usize
                } else {
                    1
                };
                let ours: Vec<QTensor> = (0..copies)
                    .map(|_| {
                        QTensor::new(QStorage::from_data(data.clone(), &Device::Cpu, g)?, (n, k))
                    })
                    .collect::<candle_core::Result<_>>()?;
                let theirs: Vec<QMatMul> = (0..copies)
                    .map(|_| {
                        Ok(QMatMul::QTensor(std::sync::Arc::new(QTensor::new(
                            QStorage::from_data(data.clone(), &Device::Cpu, g)?,
                            (n, k),
                        )?)))
                    })
                    .collect::<candle_core::Result<_>>()?;
                let x = random(m * k);
                let xt = Tensor::from_slice(&x, (m, k), &Device::Cpu)?;
                let mut dst = vec![0f32; m * n];
                let reps = if m == 1 { 5 } else { 3 };
                let ours_s = time_best(reps, || {
                    for qt in &ours {
                        gemma4::qmm::matmul(qt, &x, m, &mut dst)?;
                    }
                    Ok(())
                })? / copies as f64;
                let theirs_s = time_best(reps, || {
                    for cq in &theirs {
                        cq.forward(&xt)?;
                    }
                    Ok(())
                })? / copies as f64;
                let flop = 2.0 * (m * n * k) as f64;
                let v = serde_json::json!({
                    "quant": name, "n": n, "k": k, "m": m, "copies": copies,
                    "qmm_ms": ours_s * 1e3, "candle_ms": theirs_s * 1e3,
                    "qmm_weight_gb_s": bytes / ours_s / 1e9,
                    "candle_weight_gb_s": bytes / theirs_s / 1e9,
                    "qmm_gflop_s": flop / ours_s / 1e9,
                    "candle_gflop_s": flop / theirs_s / 1e9,
                });
                if a.json {
                    println!("{v}");
                } else {
                    println!(
                        "{name:5} [{n:5}x{k:5}] m={m:4}  qmm {:8.3} ms ({:5.1} GB/s of weights, {:6.1} GFLOP/s)  candle {:8.3} ms ({:5.1} GB/s, {:6.1} GFLOP/s)",
                        ours_s * 1e3,
                        bytes / ours_s / 1e9,
                        flop / ours_s / 1e9,
                        theirs_s * 1e3,
                        bytes / theirs_s / 1e9,
                        flop / theirs_s / 1e9,
                    );
                }
            }
        }
    }
    println!("read bandwidth {:.1} GB/s", measure_read_bandwidth() / 1e9);
    Ok(())
}

/// The decoder tensors a checkpoint of `cfg` holds (name, shape, and `stored`, the dtype
/// dense ones are kept in), found by loading the decoder over [`Weights::shapes`].
pub fn decoder_tensors(
    cfg: &TextConfig,
    stored: candle_core::DType,
) -> anyhow::Result<Vec<(String, Vec<usize>, candle_core::DType)>> {
    let w = Weights::shapes(&candle_core::Device::Cpu, candle_core::DType::F32);
    let opts = LoadOptions {
        max_context: 8,
        ..LoadOptions::default()
    };
    drop(TextModel::load(&w, cfg, &opts)?);
    Ok(w.recorded()
        .into_iter()
        .map(|(n, s)| (n, s, stored))
        .collect())
}

/// One decode step of token 2 (`<bos>`) in a fresh cache: what a first answer costs beyond
/// the load, and what touches every decoder weight once (the tied head reads the whole table).
fn first_step(m: &TextModel) -> anyhow::Result<()> {
    let ids = [2u32];
    let mut cache = m.new_cache();
    let e = m.embed_tokens(&ids)?;
    let tp = m.ple_token_inputs(&ids)?;
    let p = m.ple_inputs(&e, tp.as_ref())?;
    let mut segs = [Segment {
        cache: &mut cache,
        len: 1,
        logits: LogitRows::Last,
        block_ids: None,
    }];
    let l = m.forward(&e, p.as_ref(), &mut segs)?;
    std::hint::black_box(gemma4::generate::argmax(
        &l[0].flatten_all()?.to_vec1::<f32>()?,
    ));
    Ok(())
}

/// `/proc/self/status` figures in GiB: peak RSS, and the anonymous and file-backed parts
/// of the RSS now (a mapped cache file shows as file-backed, a copy as anonymous).
fn rss_json() -> serde_json::Value {
    let gib = |k: &str| proc_status_kib(k).unwrap_or(0) as f64 / (1u64 << 20) as f64;
    serde_json::json!({"peak_rss_gib": gib("VmHWM:"), "rss_anon_gib": gib("RssAnon:"),
        "rss_file_gib": gib("RssFile:")})
}

/// One `--load` step in this process. `write`: quantize random weights at the real shape
/// into the cache file `path`, then load it (the first start at a quant). `open`: load the
/// existing file (a later start). Both time the load and the first decode step after it.
pub fn load_step(
    arch: &str,
    quant: Quant,
    step: &str,
    path: &std::path::Path,
) -> anyhow::Result<serde_json::Value> {
    let cfg = real_config(arch)?.text_config;
    let t0 = Instant::now();
    let mut out = serde_json::Map::new();
    if step == "write" {
        // Dense tensors (norms, scalars) in bf16, as the published checkpoints hold them.
        let tensors = decoder_tensors(&cfg, candle_core::DType::BF16)?;
        let w = Weights::random(0x5eed, &candle_core::Device::Cpu, candle_core::DType::F32);
        gemma4::quant_cache::write_from(
            &w,
            &tensors,
            quant,
            Default::default(),
            vec![gemma4::gguf::Value::Str(format!("random {arch}"))],
            path,
        )?;
        out.insert("write_s".into(), t0.elapsed().as_secs_f64().into());
    } else if step != "open" {
        anyhow::bail!("unknown load step {step:?} (write, open)");
    }
    let t = Instant::now();
    let w = Weights::open_gguf(
        &[path.to_path_buf()],
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )?;
    let opts = LoadOptions {
        quant,
        max_context: 64,
        ..LoadOptions::default()
    };
    let m = TextModel::load(&w, &cfg, &opts)?;
    out.insert("load_s".into(), t.elapsed().as_secs_f64().into());
    out.insert("rss_after_load".into(), rss_json());
    first_step(&m)?;
    out.insert("ready_s".into(), t.elapsed().as_secs_f64().into());
    out.insert("total_s".into(), t0.elapsed().as_secs_f64().into());
    out.insert("rss_after_first_step".into(), rss_json());
    out.insert(
        "weight_gib".into(),
        (m.weight_bytes() as f64 / (1u64 << 30) as f64).into(),
    );
    Ok(out.into())
}

/// Drops `path`'s pages from the page cache (`posix_fadvise(DONTNEED)`: clean pages of a
/// file nobody maps go; `/proc/sys/vm/drop_caches` needs privileges containers lack).
pub fn evict(path: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::io::AsRawFd;
    let f = std::fs::File::open(path)?;
    f.sync_all()?;
    // SAFETY: a valid open descriptor; the call only gives advice about its pages.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    anyhow::ensure!(rc == 0, "posix_fadvise on {}: error {rc}", path.display());
    Ok(())
}

/// Fraction of `path`'s pages in the page cache (`mincore` over a fresh mapping, which
/// reads nothing).
pub fn resident_fraction(path: &std::path::Path) -> anyhow::Result<f64> {
    let f = std::fs::File::open(path)?;
    // SAFETY: mapped read-only and never read through; only mincore looks at it.
    #[allow(unsafe_code)]
    let m = unsafe { memmap2::Mmap::map(&f)? };
    if m.is_empty() {
        return Ok(1.0);
    }
    let page = 4096usize;
    let pages = m.len().div_ceil(page);
    let mut v = vec![0u8; pages];
    // SAFETY: `m` is a live mapping of `m.len()` bytes and `v` has one byte per page.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::mincore(
            m.as_ptr() as *mut libc::c_void,
            m.len(),
            v.as_mut_ptr().cast(),
        )
    };
    anyhow::ensure!(rc == 0, "mincore on {}", path.display());
    Ok(v.iter().filter(|&&b| b & 1 == 1).count() as f64 / pages as f64)
}

/// `--load`: per (arch, quant), a cold load (child: quantize + write + load), a timed `cat`
/// of the evicted file, a warm load (child), a cold-cache load (child, file evicted), each
/// with its first decode step; one JSON object or line each.
fn run_load(a: &BenchArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let dir = a.load_dir.clone().unwrap_or_else(gemma4::quant_cache::dir);
    std::fs::create_dir_all(&dir)?;
    for arch in &a.arch {
        for q in &a.quant {
            let name = std::path::Path::new(arch)
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("model");
            let path = dir.join(format!("bench-{name}-{}.gguf", q.as_str()));
            let _ = std::fs::remove_file(&path);
            let child = |step: &str| -> anyhow::Result<serde_json::Value> {
                let out = std::process::Command::new(&exe)
                    .args(["bench", "model", "--arch", arch, "--quant", q.as_str()])
                    .args(["--load-step", step, "--load-file"])
                    .arg(&path)
                    .output()?;
                anyhow::ensure!(
                    out.status.success(),
                    "{arch}/{} {step}: {}",
                    q.as_str(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                Ok(serde_json::from_str(
                    String::from_utf8_lossy(&out.stdout).trim(),
                )?)
            };
            let result = (|| -> anyhow::Result<serde_json::Value> {
                let cold = child("write")?;
                evict(&path)?;
                let before_cat = resident_fraction(&path)?;
                let t = Instant::now();
                let st = std::process::Command::new("sh")
                    .arg("-c")
                    .arg("cat \"$0\" > /dev/null")
                    .arg(&path)
                    .status()?;
                anyhow::ensure!(st.success(), "cat {} failed", path.display());
                let cat_s = t.elapsed().as_secs_f64();
                let warm = child("open")?;
                evict(&path)?;
                let before_cold = resident_fraction(&path)?;
                let cold_cache = child("open")?;
                let bytes = std::fs::metadata(&path)?.len();
                Ok(serde_json::json!({
                    "arch": arch, "quant": q.as_str(),
                    "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
                    "file_gib": bytes as f64 / (1u64 << 30) as f64,
                    "cat_s": cat_s, "resident_before_cat": before_cat,
                    "resident_before_cold_cache": before_cold,
                    "cold": cold, "warm": warm, "cold_cache": cold_cache,
                    "cold_cache_ready_over_cat": cold_cache["ready_s"].as_f64().unwrap_or(0.0) / cat_s,
                }))
            })();
            if !a.keep_files {
                let _ = std::fs::remove_file(&path);
            }
            let v = match result {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("{arch}/{}: failed: {e:#}", q.as_str());
                    continue;
                }
            };
            if a.json {
                println!("{v}");
                continue;
            }
            let f = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
            println!(
                "{arch:4} {:5} cache file {:.2} GiB; cold (quantize + write {:.1} s, load {:.2} s, first step) {:.1} s",
                q.as_str(),
                f(&v["file_gib"]),
                f(&v["cold"]["write_s"]),
                f(&v["cold"]["load_s"]),
                f(&v["cold"]["total_s"]),
            );
            for (label, k) in [("warm      ", "warm"), ("cold cache", "cold_cache")] {
                println!(
                    "     {label}: load {:6.2} s, ready (load + first step) {:6.2} s, peak RSS {:5.2} GiB (anon {:5.2} + file {:5.2} after the step)",
                    f(&v[k]["load_s"]),
                    f(&v[k]["ready_s"]),
                    f(&v[k]["rss_after_first_step"]["peak_rss_gib"]),
                    f(&v[k]["rss_after_first_step"]["rss_anon_gib"]),
                    f(&v[k]["rss_after_first_step"]["rss_file_gib"]),
                );
            }
            println!(
                "     cat file > /dev/null (evicted, {:.0}% resident): {:.2} s; cold cache ready / cat = {:.2} ({:.0}% resident before that load)",
                100.0 * f(&v["resident_before_cat"]),
                f(&v["cat_s"]),
                f(&v["cold_cache_ready_over_cat"]),
                100.0 * f(&v["resident_before_cold_cache"]),
            );
        }
    }
    Ok(())
}

/// Entry point of `percept bench model`.
pub fn run(a: &BenchArgs) -> anyhow::Result<()> {
    if a.kernels {
        return run_kernels(a);
    }
    if let (Some(step), Some(path)) = (&a.load_step, &a.load_file) {
        let (Some(arch), Some(q)) = (a.arch.first(), a.quant.first()) else {
            anyhow::bail!("a load step needs one arch and one quant");
        };
        println!("{}", load_step(arch, *q, step, path)?);
        return Ok(());
    }
    if a.load {
        return run_load(a);
    }
    if a.child {
        let (Some(arch), Some(q)) = (a.arch.first(), a.quant.first()) else {
            anyhow::bail!("child run needs one arch and one quant");
        };
        println!("{}", run_one(arch, *q, a.prompt, a.decode)?);
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    for arch in &a.arch {
        for q in &a.quant {
            let out = std::process::Command::new(&exe)
                .args([
                    "bench",
                    "model",
                    "--child",
                    "--arch",
                    arch,
                    "--quant",
                    q.as_str(),
                ])
                .args([
                    "--prompt",
                    &a.prompt.to_string(),
                    "--decode",
                    &a.decode.to_string(),
                ])
                .output()?;
            if !out.status.success() {
                eprintln!(
                    "{arch}/{}: failed: {}",
                    q.as_str(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                continue;
            }
            let line = String::from_utf8_lossy(&out.stdout);
            let v: serde_json::Value = serde_json::from_str(line.trim())?;
            if a.json {
                println!("{v}");
            } else {
                println!(
                    "{arch:4} {:5} load {:6.1}s  weights {:5.2} GiB  peak RSS load {:5.2} / run {:5.2} GiB  prefill {:7.1} tok/s  decode {:6.2} tok/s  ({:.0}% of {:.2} tok/s bound at {:.1} GB/s read; median step {:.0}%)",
                    q.as_str(),
                    v["load_s"].as_f64().unwrap_or(0.0),
                    v["weight_gib"].as_f64().unwrap_or(0.0),
                    v["peak_rss_load_gib"].as_f64().unwrap_or(0.0),
                    v["peak_rss_gib"].as_f64().unwrap_or(0.0),
                    v["prefill_tok_s"].as_f64().unwrap_or(0.0),
                    v["decode_tok_s"].as_f64().unwrap_or(0.0),
                    100.0 * v["fraction_of_bound"].as_f64().unwrap_or(0.0),
                    v["bandwidth_bound_tok_s"].as_f64().unwrap_or(0.0),
                    v["read_bandwidth_gb_s"].as_f64().unwrap_or(0.0),
                    100.0 * v["fraction_of_bound_median_step"].as_f64().unwrap_or(0.0),
                );
                if let Some(rows) = v["media"]["image_1280x720"].as_array() {
                    for r in rows.iter().filter(|r| r.get("error").is_none()) {
                        let vs_f32 = match r["ratio_to_f32"].as_f64() {
                            Some(x) => format!(
                                " ({x:.2}x of f32; soft tokens vs f32: cosine {:.4}, max abs {:.3})",
                                r["cosine_vs_f32"].as_f64().unwrap_or(0.0),
                                r["max_abs_vs_f32"].as_f64().unwrap_or(0.0)
                            ),
                            None => String::new(),
                        };
                        let quant = match r["vision_quant"].as_str() {
                            Some(q) if Some(q) != r["storage"].as_str() => {
                                format!("{q} (runs {})", r["storage"].as_str().unwrap_or("?"))
                            }
                            Some(q) => q.to_string(),
                            None => String::new(),
                        };
                        println!(
                            "     image 1280x720 @ {:4} {quant:4}: {:4} tokens, preprocess {:7.1} ms, embed {:7.1} ms{vs_f32}",
                            r["budget"], r["tokens"],
                            r["preprocess_ms"].as_f64().unwrap_or(0.0),
                            r["embed_ms"].as_f64().unwrap_or(0.0)
                        );
                    }
                }
                if let Some(a) = v["media"]["audio_per_10s"].as_object() {
                    println!(
                        "     audio 10 s: {} tokens, log-mel {:.1} ms, tower {:.1} ms",
                        a["tokens"],
                        a["mel_ms"].as_f64().unwrap_or(0.0),
                        a["embed_ms"].as_f64().unwrap_or(0.0)
                    );
                }
                if let Some(a) = v["media"]["audio_per_second"].as_object() {
                    println!(
                        "     audio: {} tokens per second, embed {:.1} ms per second",
                        a["tokens"],
                        a["embed_ms"].as_f64().unwrap_or(0.0)
                    );
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use gemma4::config::KvSource;

    #[test]
    fn real_shapes_resolve() {
        let e2b = real_text_config("e2b").unwrap().layer_specs().unwrap();
        assert_eq!(e2b.len(), 35);
        assert_eq!(e2b.iter().filter(|s| s.sliding_window.is_none()).count(), 7);
        assert_eq!(
            e2b.iter()
                .filter(|s| matches!(s.kv, KvSource::Shared(_)))
                .count(),
            20
        );
        assert_eq!(e2b[34].intermediate_size, 12288);
        assert_eq!(e2b[4].head_dim, 512);
        let e4b = real_text_config("e4b").unwrap().layer_specs().unwrap();
        assert_eq!(e4b.len(), 42);
        assert_eq!(e4b[5].num_kv_heads, 2);
        let c12 = real_config("12b").unwrap();
        assert_eq!(c12.arch, gemma4::config::Arch::Gemma4Unified);
        let s = c12.text_config.layer_specs().unwrap();
        assert_eq!(s.len(), 48);
        assert_eq!(s.iter().filter(|s| s.sliding_window.is_none()).count(), 8);
        assert_eq!(
            (s[0].num_kv_heads, s[0].head_dim, s[0].sliding_window),
            (8, 256, Some(1024))
        );
        assert_eq!(
            (s[5].num_kv_heads, s[5].head_dim, s[5].k_eq_v),
            (1, 512, true)
        );
        assert!(s.iter().all(|s| s.kv == KvSource::Own));
        assert_eq!(c12.text_config.ple_dim(), None);
        assert_eq!(c12.unified_vision.unwrap().patch_dim(), 6912);
    }

    /// The whole benchmark path (random weights, decoder, embedders, JSON) on a tiny
    /// `gemma4_unified` shape given as a config.json path.
    #[test]
    fn tiny_unified_shape_runs() {
        let spec = gemma4::testing::TinySpec {
            mm_posemb_size: 64,
            ..gemma4::testing::TinySpec::unified()
        };
        let dir = gemma4::testing::temp_model_dir("bench-unified");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        let cfg = gemma4::testing::tiny_config_json(&spec);
        std::fs::write(&path, cfg.to_string()).unwrap();
        let v = run_one(path.to_str().unwrap(), Quant::F32, 12, 3).unwrap();
        assert_eq!(v["prompt_tokens"], 12);
        assert!(v["decode_tok_s"].as_f64().unwrap() > 0.0);
        let img = v["media"]["image_1280x720"].as_array().unwrap();
        assert_eq!(img.len(), 5);
        // 1280x720 at 70 tokens -> 288x528 -> 6 x 11 merged patches.
        assert_eq!(img[0]["tokens"], 66);
        assert!(img
            .iter()
            .all(|r| r["tokens"].as_u64().unwrap() <= r["budget"].as_u64().unwrap()));
        assert_eq!(v["media"]["audio_per_second"]["tokens"], 25);
    }

    /// `--load`'s steps on a tiny shape with rows of 256 (so q4k applies): the cache file
    /// written from random weights holds every decoder tensor and loads the very model the
    /// quantizing load builds from the same weights.
    #[test]
    fn load_steps_write_a_cache_that_loads_the_quantized_model() {
        let spec = crate::model::testing::TinySpec {
            hidden: 256,
            intermediate: 512,
            head_dim: 64,
            global_head_dim: 128,
            ple_dim: 256,
            ..crate::model::testing::TinySpec::default()
        };
        let dir = crate::model::testing::temp_model_dir("bench-load");
        std::fs::create_dir_all(&dir).unwrap();
        let cfg_path = dir.join("config.json");
        let cfg = crate::model::testing::tiny_config_json(&spec);
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let arch = cfg_path.to_str().unwrap();
        let file = dir.join("cache.gguf");
        let w = load_step(arch, Quant::Q4K, "write", &file).unwrap();
        assert!(w["write_s"].as_f64().unwrap() > 0.0);
        let o = load_step(arch, Quant::Q4K, "open", &file).unwrap();
        assert!(o["ready_s"].as_f64().unwrap() >= o["load_s"].as_f64().unwrap());
        assert!(o["rss_after_load"]["peak_rss_gib"].as_f64().unwrap() > 0.0);
        // Every decoder tensor, quantized where the quantizing load quantizes.
        let text = real_config(arch).unwrap().text_config;
        let f = crate::model::gguf::GgufFile::open(&file).unwrap();
        let tensors = decoder_tensors(&text, candle_core::DType::F32).unwrap();
        assert!(tensors.len() > 50, "{tensors:?}");
        for (n, _, _) in &tensors {
            assert!(f.get(n).is_some(), "{n} missing from the cache file");
        }
        let q = f
            .get("model.language_model.layers.0.mlp.down_proj.weight")
            .unwrap();
        assert_eq!(q.type_name(), "Q4_K");
        // With dense tensors kept in f32, the same logits as the quantizing load of the same
        // random weights.
        let random = Weights::random(0x5eed, &candle_core::Device::Cpu, candle_core::DType::F32);
        let f32_file = dir.join("cache-f32.gguf");
        crate::model::quant_cache::write_from(
            &random,
            &tensors,
            Quant::Q4K,
            Default::default(),
            vec![],
            &f32_file,
        )
        .unwrap();
        let opts = LoadOptions {
            quant: Quant::Q4K,
            max_context: 16,
            ..LoadOptions::default()
        };
        let a = TextModel::load(&random, &text, &opts).unwrap();
        let cached = Weights::open_gguf(
            &[f32_file],
            &candle_core::Device::Cpu,
            candle_core::DType::F32,
        )
        .unwrap();
        let b = TextModel::load(&cached, &text, &opts).unwrap();
        let logits = |m: &TextModel| {
            let ids = [2u32, 40, 41];
            let mut cache = m.new_cache();
            let e = m.embed_tokens(&ids).unwrap();
            let tp = m.ple_token_inputs(&ids).unwrap();
            let p = m.ple_inputs(&e, tp.as_ref()).unwrap();
            let mut segs = [Segment {
                cache: &mut cache,
                len: 3,
                logits: LogitRows::Last,
                block_ids: None,
            }];
            let l = m.forward(&e, p.as_ref(), &mut segs).unwrap();
            l[0].flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        assert_eq!(logits(&a), logits(&b));
        // A read brings the whole file into the page cache.
        std::fs::read(&file).unwrap();
        assert_eq!(resident_fraction(&file).unwrap(), 1.0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tiny_gemma4_shape_times_its_towers() {
        let spec = gemma4::testing::TinySpec::default();
        let dir = gemma4::testing::temp_model_dir("bench-gemma4");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        let mut cfg = gemma4::testing::tiny_config_json(&spec);
        // Small towers (the tiny checkpoints of the tests have none).
        cfg["vision_config"] = serde_json::json!({
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16,
            "position_embedding_size": 128});
        cfg["audio_config"] = serde_json::json!({
            "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "subsampling_conv_channels": [128, 8], "output_proj_dims": 48});
        std::fs::write(&path, cfg.to_string()).unwrap();
        let v = run_one(path.to_str().unwrap(), Quant::Q4K, 20, 3).unwrap();
        assert!(v["decode_tok_s"].as_f64().unwrap() > 0.0);
        let img = v["media"]["image_1280x720"].as_array().unwrap();
        let budgets: Vec<u64> = img.iter().map(|r| r["budget"].as_u64().unwrap()).collect();
        assert_eq!(budgets, [70, 70, 280, 280]);
        let quants: Vec<&str> = img
            .iter()
            .map(|r| r["vision_quant"].as_str().unwrap())
            .collect();
        assert_eq!(quants, ["f32", "int8", "f32", "int8"]);
        // int8 rows measure themselves against the f32 tower on the same frame.
        assert!(
            img.iter()
                .filter(|r| r["vision_quant"] == "int8")
                .all(|r| r["cosine_vs_f32"].as_f64().unwrap() > 0.95),
            "{img:?}"
        );
        assert!(img.iter().all(|r| {
            let t = r["tokens"].as_u64().unwrap();
            t > 0 && t <= r["budget"].as_u64().unwrap()
        }));
        // 10 s of audio at 40 ms per soft token.
        assert_eq!(v["media"]["audio_per_10s"]["tokens"], 250);
    }
}
