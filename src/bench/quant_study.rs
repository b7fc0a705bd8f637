//! `percept bench quant`: what q8_0 and q4k cost against f32, per modality.
//!
//! For each model (a checkpoint folder, or random weights at the real 12B layer widths with
//! only a few layers and a smaller vocabulary so it fits in a few GiB) and a fixed prompt
//! set (text, image, audio), the f32 model's greedy continuation is appended to each prompt
//! and every variant (quant x `--keep-f16`) is run teacher-forced over the whole sequence.
//! Per variant and prompt it reports, against f32:
//! - **prompt**: top-1 agreement and KL(f32 || quant) (mean, max) of the next-token
//!   distributions at every prompt position;
//! - **greedy**: the same over the continuation positions, plus how many of the f32 greedy
//!   tokens the quantized model reproduces before its first different choice (with equal
//!   prefixes, greedy decoding is teacher forcing, so this is its own greedy continuation's
//!   agreement).
//!
//! Soft tokens are recomputed by each variant's own media path, so the image/audio
//! projections' storage (`--keep-f16 projections` or not) is part of what is measured.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use clap::Args;

use gemma4::layers::{KeepF16, Quant};
use gemma4::loader::{ModelFiles, Weights};
use gemma4::media::TowerEncoder;
use gemma4::multimodal::{embed_prompt, SoftTokens};
use gemma4::preprocess::image::RgbImage;
use gemma4::rng::SplitMix64;
use gemma4::text::{LoadOptions, LogitRows, Segment};
use gemma4::tokenizer::{ChatContent, ChatMessage, MediaItem};
use gemma4::Gemma4;

#[derive(Debug, Args)]
pub struct QuantArgs {
    /// Checkpoint folders (e.g. crates/gemma4/tests/fixtures/gemma4_unified/model), comma separated.
    #[arg(long, value_delimiter = ',')]
    pub model: Vec<PathBuf>,
    /// Random-weight models at real layer widths: `12b` (comma separated).
    #[arg(long, value_delimiter = ',')]
    pub arch: Vec<String>,
    /// Decoder layers of the random-weight models (the last one is a full-attention layer).
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    /// Vocabulary of the random-weight models (the real 262144 x 3840 table alone is 4 GiB
    /// in f32).
    #[arg(long, default_value_t = 16384)]
    pub vocab: usize,
    /// Quantizations compared with f32 (comma separated).
    #[arg(long, value_parser = crate::model_cli::quant_arg(), default_value = "q8_0,q4k", value_delimiter = ',')]
    pub quant: Vec<Quant>,
    /// Greedy continuation length.
    #[arg(long, default_value_t = 8)]
    pub continuation: usize,
    /// Image soft-token budget of the image prompt.
    #[arg(long, default_value_t = 70)]
    pub image_budget: usize,
    /// Print JSON lines only.
    #[arg(long)]
    pub json: bool,
}

/// Agreement of one variant with f32 over a set of positions.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Agreement {
    pub positions: usize,
    /// Fraction of positions whose argmax equals f32's.
    pub top1: f64,
    /// KL(p_f32 || p_quant) in nats.
    pub kl_mean: f64,
    pub kl_max: f64,
}

/// One (variant, prompt) row of the study.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StudyRow {
    pub model: String,
    pub quant: &'static str,
    pub keep_f16: &'static str,
    pub prompt: &'static str,
    pub prompt_tokens: usize,
    pub media_tokens: usize,
    /// Next-token distributions at every prompt position.
    pub teacher_forced: Agreement,
    /// The positions predicting the f32 greedy continuation.
    pub greedy: Agreement,
    /// f32 greedy tokens reproduced before the first different choice.
    pub greedy_prefix: usize,
    /// Mean entropy (nats) of f32's next-token distributions over the prompt: how peaked
    /// the distributions the KL is measured on are.
    pub f32_entropy: f64,
    pub continuation: usize,
    /// Storage of the token table, the tied lm_head, a decoder linear and the media
    /// projections, for the record.
    pub storage: serde_json::Value,
}

/// A prompt of the fixed set: ids (media expanded) and its soft tokens.
pub struct StudyPrompt {
    pub name: &'static str,
    pub ids: Vec<u32>,
    pub soft: SoftTokens,
}

const TEXT_PROMPT: &str = "A delivery van stops in front of the bakery at dawn. Two people unload \
     crates of flour while a dog watches from the doorway. Describe the scene and say what is \
     likely to happen next.";
const IMAGE_PROMPT: &str = "Describe this image in one sentence.";
const AUDIO_PROMPT: &str = "Transcribe this audio.";

/// A deterministic test card: gradients, stripes and a bright square (no file needed).
pub fn study_image() -> RgbImage {
    let (w, h) = (320usize, 240usize);
    let mut data = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let sq = (100..180).contains(&x) && (60..140).contains(&y);
            let stripe = (x / 16) % 2 == 0;
            data.push(if sq { 250 } else { (x * 255 / w) as u8 });
            data.push(if sq { 40 } else { (y * 255 / h) as u8 });
            data.push(if stripe { 200 } else { 30 });
        }
    }
    RgbImage::new(w, h, data)
}

/// Two seconds of 16 kHz audio: a chirp with a tremolo and a little noise.
pub fn study_audio() -> Vec<f32> {
    let mut rng = SplitMix64(11);
    (0..32_000)
        .map(|i| {
            let t = i as f32 / 16_000.0;
            let f = 220.0 + 300.0 * t;
            0.4 * (2.0 * std::f32::consts::PI * f * t).sin() * (0.6 + 0.4 * (7.0 * t).sin())
                + rng.uniform(0.02)
        })
        .collect()
}

/// The fixed prompt set (text, image, audio) for `m`, media encoded by `enc`. With a
/// tokenizer the chat template is used; without one (random-weight models) the ids are a
/// seeded sequence of ordinary tokens around the expanded media span.
pub fn study_prompts(
    m: &Gemma4,
    enc: &TowerEncoder,
    budget: usize,
) -> anyhow::Result<Vec<StudyPrompt>> {
    let image = enc.encode_rgb(m, &study_image(), budget)?;
    let audio = enc.encode_samples(m, &study_audio())?;
    let cases: [(&'static str, Option<MediaItem>, &str); 3] = [
        ("text", None, TEXT_PROMPT),
        (
            "image",
            Some(MediaItem::Image {
                tokens: image.dim(0)?,
            }),
            IMAGE_PROMPT,
        ),
        (
            "audio",
            Some(MediaItem::Audio {
                tokens: audio.dim(0)?,
            }),
            AUDIO_PROMPT,
        ),
    ];
    let mut out = Vec::new();
    for (name, media, text) in cases {
        let ids = match &m.tokenizer {
            Some(tok) => {
                let mut content = Vec::new();
                match media {
                    Some(MediaItem::Image { .. }) => content.push(ChatContent::Image),
                    Some(MediaItem::Audio { .. }) => content.push(ChatContent::Audio),
                    _ => {}
                }
                content.push(ChatContent::Text(text.into()));
                let rendered = tok.render_chat(&[ChatMessage::user(content)], true, false)?;
                let items: Vec<MediaItem> = media.clone().into_iter().collect();
                let ids = tok.encode(&tok.expand_media(&rendered, &items)?)?;
                // Tiny test tokenizers may spell ordinary text with a media id; such a
                // prompt cannot carry the soft tokens, so fall back to synthetic ids.
                let ph = m.placeholders();
                let n_media = ids
                    .iter()
                    .filter(|&&t| t == ph.image || t == ph.audio || t == ph.video)
                    .count();
                let want = match &media {
                    Some(MediaItem::Image { tokens }) | Some(MediaItem::Audio { tokens }) => {
                        *tokens
                    }
                    _ => 0,
                };
                if n_media == want {
                    ids
                } else {
                    synthetic_ids(m, media.as_ref(), text.len() / 4)
                }
            }
            None => synthetic_ids(m, media.as_ref(), text.len() / 4),
        };
        let mut soft = SoftTokens::default();
        match name {
            "image" => soft.images.push(image.clone()),
            "audio" => soft.audios.push(audio.clone()),
            _ => {}
        }
        out.push(StudyPrompt { name, ids, soft });
    }
    Ok(out)
}

/// `bos, n/2 text ids, [media span], n/2 text ids` with ids drawn past the special tokens.
fn synthetic_ids(m: &Gemma4, media: Option<&MediaItem>, n: usize) -> Vec<u32> {
    let c = &m.config;
    let vocab = c.text_config.vocab_size as u64;
    let specials = [
        c.boi_token_id,
        c.eoi_token_id,
        c.image_token_id,
        c.video_token_id,
        c.boa_token_id,
        c.eoa_token_index,
        c.audio_token_id,
    ];
    // Ordinary ids start past the highest special id below the vocabulary.
    let lo = specials
        .iter()
        .filter(|&&s| (s as u64) < vocab)
        .max()
        .map(|&s| s as u64 + 1)
        .unwrap_or(3);
    let mut rng = SplitMix64(0xC0FFEE ^ n as u64);
    let mut draw = |k: usize| -> Vec<u32> {
        (0..k)
            .map(|_| (lo + rng.next_u64() % (vocab - lo).max(1)) as u32)
            .collect()
    };
    let mut ids = vec![c.text_config.bos_token_id.unwrap_or(2)];
    ids.extend(draw(n / 2));
    match media {
        Some(MediaItem::Image { tokens }) => {
            ids.push(c.boi_token_id);
            ids.extend(std::iter::repeat_n(c.image_token_id, *tokens));
            ids.push(c.eoi_token_id);
        }
        Some(MediaItem::Audio { tokens }) => {
            ids.push(c.boa_token_id);
            ids.extend(std::iter::repeat_n(c.audio_token_id, *tokens));
            ids.push(c.eoa_token_index);
        }
        _ => {}
    }
    ids.extend(draw(n - n / 2));
    ids
}

/// f32 logits `[n, vocab]` of every position of one prompt in one prefill.
pub fn all_logits(m: &Gemma4, ids: &[u32], soft: &SoftTokens) -> anyhow::Result<Vec<Vec<f32>>> {
    Ok(m.prompt_logits(ids, soft)?
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?)
}

/// The most likely token that is not a media placeholder (random models do pick them, and
/// a placeholder in the continuation would need soft tokens).
fn argmax_text(m: &Gemma4, logits: &[f32]) -> u32 {
    let ph = m.placeholders();
    let mut best: Option<usize> = None;
    for (i, &x) in logits.iter().enumerate() {
        let t = i as u32;
        if t == ph.image || t == ph.audio || t == ph.video {
            continue;
        }
        if best.is_none_or(|b| x > logits[b]) {
            best = Some(i);
        }
    }
    best.unwrap_or(0) as u32
}

/// `n` greedy tokens after the prompt (cached decode; stop ids are not honoured, so the
/// length is fixed; media placeholders are never chosen).
pub fn greedy(m: &Gemma4, ids: &[u32], soft: &SoftTokens, n: usize) -> anyhow::Result<Vec<u32>> {
    let pe = embed_prompt(&m.text, ids, soft, &m.placeholders())?;
    let mut cache = m.text.new_cache();
    let mut out = Vec::with_capacity(n);
    let mut segs = [Segment {
        cache: &mut cache,
        len: ids.len(),
        logits: LogitRows::Last,
        block_ids: Some(pe.block_ids.clone()),
    }];
    let mut l = m.text.forward(&pe.embeds, pe.ple.as_ref(), &mut segs)?;
    for step in 0..n {
        let last = l
            .first()
            .ok_or_else(|| anyhow::anyhow!("no logits"))?
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let tok = argmax_text(m, &last);
        out.push(tok);
        if step + 1 == n {
            break;
        }
        let e = m.text.embed_tokens(&[tok])?;
        let tp = m.text.ple_token_inputs(&[tok])?;
        let p = m.text.ple_inputs(&e, tp.as_ref())?;
        let mut segs = [Segment {
            cache: &mut cache,
            len: 1,
            logits: LogitRows::Last,
            block_ids: None,
        }];
        l = m.text.forward(&e, p.as_ref(), &mut segs)?;
    }
    Ok(out)
}

fn log_softmax(l: &[f32]) -> Vec<f64> {
    let max = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = l.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
    l.iter().map(|&x| x as f64 - z).collect()
}

/// Entropy in nats of the distribution of a logit row.
pub fn entropy(logits: &[f32]) -> f64 {
    -log_softmax(logits).iter().map(|l| l.exp() * l).sum::<f64>()
}

/// KL(p || q) in nats of two logit rows.
pub fn kl_divergence(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    let lp = log_softmax(p_logits);
    let lq = log_softmax(q_logits);
    lp.iter()
        .zip(&lq)
        .map(|(a, b)| a.exp() * (a - b))
        .sum::<f64>()
        .max(0.0)
}

/// Agreement of `other` with `reference` over rows `range`.
pub fn agreement(
    reference: &[Vec<f32>],
    other: &[Vec<f32>],
    range: std::ops::Range<usize>,
) -> Agreement {
    let mut a = Agreement::default();
    let mut agree = 0usize;
    for i in range {
        let (r, o) = (&reference[i], &other[i]);
        if gemma4::generate::argmax(r) == gemma4::generate::argmax(o) {
            agree += 1;
        }
        let kl = kl_divergence(r, o);
        a.kl_mean += kl;
        a.kl_max = a.kl_max.max(kl);
        a.positions += 1;
    }
    if a.positions > 0 {
        a.top1 = agree as f64 / a.positions as f64;
        a.kl_mean /= a.positions as f64;
    }
    a
}

/// Where a study model comes from.
#[derive(Debug, Clone)]
pub enum StudySource {
    /// A checkpoint folder.
    Dir(PathBuf),
    /// Random weights under this folder's config.json (see [`write_random_model_dir`]).
    Random(PathBuf),
}

impl StudySource {
    fn load(&self, opts: &LoadOptions) -> anyhow::Result<Gemma4> {
        Ok(match self {
            StudySource::Dir(d) => Gemma4::load_dir(d, opts)?,
            StudySource::Random(d) => Gemma4::assemble(
                ModelFiles::from_dir(d)?,
                opts,
                Weights::random(0x5eed, &Device::Cpu, DType::F32),
            )?,
        })
    }
}

/// Writes a random-weight model folder at the real 12B layer widths (hidden 3840,
/// intermediate 15360, 16 heads, head_dim 256/512, 8/1 kv heads, K=V on full layers,
/// window 1024, the 12B vision/audio embedders) with `layers` decoder layers (the last one
/// full attention) and a `vocab`-entry table. Media token ids are placed inside the table.
pub fn write_random_model_dir(dir: &Path, layers: usize, vocab: usize) -> anyhow::Result<()> {
    anyhow::ensure!(layers >= 1, "need at least one layer");
    anyhow::ensure!(vocab >= 64, "vocab {vocab} too small");
    std::fs::create_dir_all(dir)?;
    let mut cfg: serde_json::Value = serde_json::from_str(super::model::GEMMA4_12B_CONFIG)?;
    let types: Vec<&str> = (0..layers)
        .map(|i| {
            if i + 1 == layers {
                "full_attention"
            } else {
                "sliding_attention"
            }
        })
        .collect();
    let t = &mut cfg["text_config"];
    t["num_hidden_layers"] = layers.into();
    t["layer_types"] = serde_json::json!(types);
    t["vocab_size"] = vocab.into();
    t["bos_token_id"] = 2.into();
    t["pad_token_id"] = 0.into();
    for (k, v) in [
        ("boi_token_id", 10),
        ("eoi_token_id", 11),
        ("image_token_id", 12),
        ("video_token_id", 13),
        ("boa_token_id", 14),
        ("eoa_token_index", 15),
        ("audio_token_id", 16),
    ] {
        cfg[k] = v.into();
    }
    cfg["eos_token_id"] = serde_json::json!([1]);
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    // ModelFiles wants a weights file; the random backend never reads it.
    candle_core::safetensors::save(
        &std::collections::HashMap::<String, Tensor>::new(),
        dir.join("model.safetensors"),
    )?;
    Ok(())
}

fn storage_of(m: &Gemma4, enc: &TowerEncoder) -> serde_json::Value {
    let (table, head) = m.text.table_storage();
    let mut v = serde_json::json!({
        "embed_tokens": table,
        "lm_head": head,
        "decoder_linear": m.text.decoder_linear_storage(0),
    });
    for (name, s) in enc.projection_storage() {
        v[name] = s.into();
    }
    v
}

/// The study over one model: f32 reference, then every (quant, keep_f16) variant.
pub fn study(
    label: &str,
    src: &StudySource,
    quants: &[Quant],
    continuation: usize,
    budget: usize,
    on_row: &mut dyn FnMut(&StudyRow),
) -> anyhow::Result<Vec<StudyRow>> {
    let opts = |quant: Quant, keep_f16: KeepF16| LoadOptions {
        quant,
        keep_f16,
        max_context: 4096,
        ..LoadOptions::default()
    };
    // The f32 reference: each prompt's greedy continuation and its logits, then dropped.
    let mut reference = Vec::new();
    {
        let m = src.load(&opts(Quant::F32, KeepF16::None))?;
        let enc = TowerEncoder::new(budget);
        for p in study_prompts(&m, &enc, budget)? {
            let cont = greedy(&m, &p.ids, &p.soft, continuation)?;
            let mut full = p.ids.clone();
            full.extend(&cont[..cont.len().saturating_sub(1)]);
            let logits = all_logits(&m, &full, &p.soft)?;
            reference.push((p.name, p.ids.len(), cont, full, logits));
        }
    }
    let mut rows = Vec::new();
    for &q in quants {
        for keep in [KeepF16::None, KeepF16::Projections] {
            let m = src.load(&opts(q, keep))?;
            let enc = TowerEncoder::new(budget);
            let prompts = study_prompts(&m, &enc, budget)?;
            for (p, (name, n_prompt, cont, full, ref_logits)) in prompts.iter().zip(&reference) {
                anyhow::ensure!(p.ids.len() == *n_prompt, "{name}: prompt length changed");
                let logits = all_logits(&m, full, &p.soft)?;
                // Row i predicts token i+1: prompt rows 0..n-1 predict prompt tokens,
                // rows n-1.. predict the continuation.
                let tf = agreement(ref_logits, &logits, 0..n_prompt - 1);
                let gr = agreement(ref_logits, &logits, n_prompt - 1..full.len());
                let prefix = (n_prompt - 1..full.len())
                    .zip(cont)
                    .take_while(|(i, t)| argmax_text(&m, &logits[*i]) == **t)
                    .count();
                let media_tokens = p
                    .soft
                    .images
                    .iter()
                    .chain(&p.soft.audios)
                    .try_fold(0usize, |acc, t| -> anyhow::Result<usize> {
                        Ok(acc + t.dim(0)?)
                    })?;
                let f32_entropy = (0..n_prompt - 1)
                    .map(|i| entropy(&ref_logits[i]))
                    .sum::<f64>()
                    / (n_prompt - 1).max(1) as f64;
                let row = StudyRow {
                    model: label.to_string(),
                    quant: q.as_str(),
                    keep_f16: keep.as_str(),
                    prompt: name,
                    prompt_tokens: *n_prompt,
                    media_tokens,
                    teacher_forced: tf,
                    greedy: gr,
                    greedy_prefix: prefix,
                    f32_entropy,
                    continuation: cont.len(),
                    storage: storage_of(&m, &enc),
                };
                on_row(&row);
                rows.push(row);
            }
        }
    }
    Ok(rows)
}

/// Entry point of `percept bench quant`.
pub fn run(a: &QuantArgs) -> anyhow::Result<()> {
    let mut sources = Vec::new();
    for d in &a.model {
        sources.push((d.display().to_string(), StudySource::Dir(d.clone())));
    }
    for arch in &a.arch {
        anyhow::ensure!(
            arch == "12b",
            "random-weight study supports 12b, got {arch:?}"
        );
        let dir = std::env::temp_dir().join(format!("percept-quant-{arch}-{}", std::process::id()));
        write_random_model_dir(&dir, a.layers, a.vocab)?;
        let label = format!(
            "random {arch} widths, {} layers (last full), vocab {} (real: 48 layers, vocab 262144)",
            a.layers, a.vocab
        );
        sources.push((label, StudySource::Random(dir)));
    }
    anyhow::ensure!(!sources.is_empty(), "give --model DIR and/or --arch 12b");
    if !a.json {
        println!(
            "{:6} {:11} {:6} {:>5} | {:>8} {:>10} {:>10} | {:>8} {:>10} {:>10} {:>6}",
            "quant",
            "keep_f16",
            "prompt",
            "tok",
            "top1",
            "KL mean",
            "KL max",
            "g.top1",
            "g.KL mean",
            "g.KL max",
            "prefix"
        );
    }
    for (label, src) in &sources {
        if !a.json {
            println!("== {label}");
        }
        let json = a.json;
        study(
            label,
            src,
            &a.quant,
            a.continuation,
            a.image_budget,
            &mut |r| {
                if json {
                    println!("{}", serde_json::to_string(r).unwrap_or_default());
                } else {
                    println!(
                        "{:6} {:11} {:6} {:>5} | {:>8.4} {:>10.3e} {:>10.3e} | {:>8.4} {:>10.3e} {:>10.3e} {:>3}/{:<2} H {:.2}  {}",
                        r.quant,
                        r.keep_f16,
                        r.prompt,
                        r.prompt_tokens,
                        r.teacher_forced.top1,
                        r.teacher_forced.kl_mean,
                        r.teacher_forced.kl_max,
                        r.greedy.top1,
                        r.greedy.kl_mean,
                        r.greedy.kl_max,
                        r.greedy_prefix,
                        r.continuation,
                        r.f32_entropy,
                        r.storage
                    );
                }
            },
        )?;
        if let StudySource::Random(d) = src {
            let _ = std::fs::remove_dir_all(d);
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Random-weight comparisons are only meaningful if a quantized table (read chunk by
    /// chunk) holds the same values as the dense one.
    #[test]
    fn random_tables_read_the_same_rows_dense_and_by_chunk() {
        let w = Weights::random(1, &Device::Cpu, DType::F32);
        let full = w.get_dtype("t.weight", &[10, 64], DType::F32).unwrap();
        let part = w.get_rows_f32("t.weight", 3, 4, 64).unwrap();
        assert_eq!(
            full.narrow(0, 3, 4).unwrap().to_vec2::<f32>().unwrap(),
            part.to_vec2::<f32>().unwrap()
        );
    }

    #[test]
    fn kl_is_zero_for_equal_rows_and_positive_otherwise() {
        let a = [1.0f32, 2.0, 3.0];
        assert!(kl_divergence(&a, &a).abs() < 1e-12);
        let b = [3.0f32, 2.0, 1.0];
        // p = softmax(1,2,3) = (0.090, 0.245, 0.665); KL(p||q) = sum p (lp - lq) = 2*(0.665-0.090).
        assert!((kl_divergence(&a, &b) - 2.0 * (0.665241 - 0.090031)).abs() < 1e-4);
        let ag = agreement(&[a.to_vec(), a.to_vec()], &[a.to_vec(), b.to_vec()], 0..2);
        assert_eq!(ag.positions, 2);
        assert_eq!(ag.top1, 0.5);
        assert!(ag.kl_max > ag.kl_mean && ag.kl_mean > 0.0);
    }
}
