//! [`MediaEncoder`] over the checkpoint's own media path: files -> preprocessing -> tower ->
//! soft tokens `[n, text_hidden]`. For `gemma4` (E2B/E4B) that is the vision/audio towers
//! with mel features; for `gemma4_unified` (12B) the encoder-free embedders over merged
//! 48x48 pixel patches and 640-sample waveform frames. Everything loads lazily from the
//! model's mapped weights on first use, so text-only runs never touch it.

use std::cell::OnceCell;
use std::path::Path;

use candle_core::Tensor;

use super::audio::AudioTower;
use super::config::Arch;
use super::multimodal::MediaEncoder;
use super::unified::{AudioEmbedder, VisionEmbedder};
use super::vision::VisionTower;
use super::{Gemma4, ModelError};
use crate::preprocess;

/// Default image soft-token budget (the reference's default `max_soft_tokens`).
pub const DEFAULT_IMAGE_SOFT_TOKENS: usize = 280;

/// The image budget a checkpoint's processor uses (`processor_config.json`
/// `image_processor.max_soft_tokens`), if it ships one.
pub fn processor_image_budget(dir: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(dir.join("processor_config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let n = v.get("image_processor")?.get("max_soft_tokens")?.as_u64()? as usize;
    preprocess::image::SUPPORTED_SOFT_TOKENS
        .contains(&n)
        .then_some(n)
}

/// Encodes images and audio with the checkpoint's own towers.
pub struct TowerEncoder {
    /// Image budget: one of 70, 140, 280, 560, 1120.
    pub max_soft_tokens: usize,
    vision: OnceCell<VisionTower>,
    audio: OnceCell<AudioTower>,
    unified_vision: OnceCell<VisionEmbedder>,
    unified_audio: OnceCell<AudioEmbedder>,
}

impl TowerEncoder {
    pub fn new(max_soft_tokens: usize) -> Self {
        Self {
            max_soft_tokens,
            vision: OnceCell::new(),
            audio: OnceCell::new(),
            unified_vision: OnceCell::new(),
            unified_audio: OnceCell::new(),
        }
    }

    fn unified_vision(&self, m: &Gemma4) -> Result<&VisionEmbedder, ModelError> {
        loaded(&self.unified_vision, || {
            let cfg = m.config.unified_vision.as_ref().ok_or_else(|| {
                ModelError::Request("this checkpoint has no vision_config".into())
            })?;
            let hidden = m.config.text_config.hidden_size;
            let quant = m.opts.projection_quant();
            Ok(VisionEmbedder::load_with(&m.weights, cfg, hidden, quant)?)
        })
    }

    fn unified_audio(&self, m: &Gemma4) -> Result<&AudioEmbedder, ModelError> {
        loaded(&self.unified_audio, || {
            let cfg =
                m.config.unified_audio.as_ref().ok_or_else(|| {
                    ModelError::Request("this checkpoint has no audio_config".into())
                })?;
            let hidden = m.config.text_config.hidden_size;
            let quant = m.opts.projection_quant();
            Ok(AudioEmbedder::load_with(&m.weights, cfg, hidden, quant)?)
        })
    }

    fn vision(&self, m: &Gemma4) -> Result<&VisionTower, ModelError> {
        loaded(&self.vision, || {
            let cfg =
                m.config.vision_config.as_ref().ok_or_else(|| {
                    ModelError::Request("this checkpoint has no vision tower".into())
                })?;
            let hidden = m.config.text_config.hidden_size;
            let quant = m.opts.projection_quant();
            Ok(VisionTower::load_quant(
                &m.weights,
                cfg,
                hidden,
                quant,
                m.opts.vision_quant,
            )?)
        })
    }

    fn audio(&self, m: &Gemma4) -> Result<&AudioTower, ModelError> {
        loaded(&self.audio, || {
            let cfg =
                m.config.audio_config.as_ref().ok_or_else(|| {
                    ModelError::Request("this checkpoint has no audio tower".into())
                })?;
            let hidden = m.config.text_config.hidden_size;
            let quant = m.opts.projection_quant();
            Ok(AudioTower::load_with(&m.weights, cfg, hidden, quant)?)
        })
    }
}

/// The value in `cell`, loaded by `load` on first use (a failed load is retried next time).
fn loaded<T>(
    cell: &OnceCell<T>,
    load: impl FnOnce() -> Result<T, ModelError>,
) -> Result<&T, ModelError> {
    if let Some(v) = cell.get() {
        return Ok(v);
    }
    let v = load()?;
    Ok(cell.get_or_init(|| v))
}

impl TowerEncoder {
    /// Storage of the projections into the decoder of the parts loaded so far
    /// (`f32`, `f16`, `q8_0`, `q4k`), by tensor name.
    pub fn projection_storage(&self) -> Vec<(&'static str, &'static str)> {
        let mut out = Vec::new();
        if let Some(v) = self.unified_vision.get() {
            let (patch, proj) = v.projection_storage();
            out.push(("vision_embedder.patch_dense", patch));
            out.push(("embed_vision.embedding_projection", proj));
        }
        if let Some(a) = self.unified_audio.get() {
            out.push(("embed_audio.embedding_projection", a.projection_storage()));
        }
        if let Some(v) = self.vision.get() {
            out.push(("embed_vision.embedding_projection", v.projection_storage()));
        }
        if let Some(a) = self.audio.get() {
            out.push(("embed_audio.embedding_projection", a.projection_storage()));
        }
        out
    }

    /// Soft tokens of an in-memory RGB frame at `budget` (70..1120).
    pub fn encode_rgb(
        &self,
        model: &Gemma4,
        img: &preprocess::image::RgbImage,
        budget: usize,
    ) -> Result<Tensor, ModelError> {
        if model.config.arch == Arch::Gemma4Unified {
            let input = preprocess::unified::preprocess_image(img, budget)
                .map_err(|e| ModelError::Request(format!("frame: {e}")))?;
            return self
                .unified_vision(model)?
                .encode(&input, model.text.device());
        }
        let input = preprocess::image::preprocess(img, budget)
            .map_err(|e| ModelError::Request(format!("frame: {e}")))?;
        self.vision(model)?.encode(&input)
    }

    /// Soft tokens of 16 kHz mono samples (the first 30 s, as the reference keeps).
    pub fn encode_samples(&self, model: &Gemma4, samples: &[f32]) -> Result<Tensor, ModelError> {
        if model.config.arch == Arch::Gemma4Unified {
            let e = self.unified_audio(model)?;
            let first = preprocess::unified::audio_items(samples, e.samples_per_token());
            let item = first.first().copied().unwrap_or(&[]);
            return e.encode(item, model.text.device());
        }
        let mel = preprocess::mel::MelExtractor::new().extract(samples);
        self.audio(model)?.encode(&mel)
    }
}

fn pre_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Request(format!("{}: {e}", path.display()))
}

impl MediaEncoder for TowerEncoder {
    fn encode_image(&self, model: &Gemma4, path: &Path) -> Result<Tensor, ModelError> {
        let img = preprocess::image::load_rgb(path).map_err(|e| pre_err(path, e))?;
        if model.config.arch == Arch::Gemma4Unified {
            let input = preprocess::unified::preprocess_image(&img, self.max_soft_tokens)
                .map_err(|e| pre_err(path, e))?;
            return self
                .unified_vision(model)?
                .encode(&input, model.text.device());
        }
        let input = preprocess::image::preprocess(&img, self.max_soft_tokens)
            .map_err(|e| pre_err(path, e))?;
        self.vision(model)?.encode(&input)
    }

    /// Each 30 s clip on its own (the reference feature extractor keeps only the first 30 s
    /// of one item; percept splits instead of dropping the rest).
    fn encode_audio(&self, model: &Gemma4, path: &Path) -> Result<Vec<Tensor>, ModelError> {
        let samples = preprocess::wav::load_mono_16k(path).map_err(|e| pre_err(path, e))?;
        if samples.is_empty() {
            return Err(pre_err(path, "no audio samples"));
        }
        if model.config.arch == Arch::Gemma4Unified {
            // One item per 750 tokens (30 s), each its own `<|audio>...<audio|>` span.
            let e = self.unified_audio(model)?;
            return preprocess::unified::audio_items(&samples, e.samples_per_token())
                .into_iter()
                .map(|s| e.encode(s, model.text.device()))
                .collect();
        }
        let tower = self.audio(model)?;
        preprocess::mel::MelExtractor::new()
            .extract_clips(&samples)
            .iter()
            .map(|m| tower.encode(m))
            .collect()
    }
}
