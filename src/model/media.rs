//! [`MediaEncoder`] over the vision and audio towers: files -> preprocessing -> tower ->
//! soft tokens `[n, text_hidden]`. Towers load lazily from the model's mapped weights on
//! first use, so text-only runs never touch them.

use std::cell::OnceCell;
use std::path::Path;

use candle_core::Tensor;

use super::audio::AudioTower;
use super::multimodal::MediaEncoder;
use super::vision::VisionTower;
use super::{Gemma4, ModelError};
use crate::preprocess;

/// Default image soft-token budget (the reference's default `max_soft_tokens`).
pub const DEFAULT_IMAGE_SOFT_TOKENS: usize = 280;

/// Encodes images and audio with the checkpoint's own towers.
pub struct TowerEncoder {
    /// Image budget: one of 70, 140, 280, 560, 1120.
    pub max_soft_tokens: usize,
    vision: OnceCell<VisionTower>,
    audio: OnceCell<AudioTower>,
}

impl TowerEncoder {
    pub fn new(max_soft_tokens: usize) -> Self {
        Self {
            max_soft_tokens,
            vision: OnceCell::new(),
            audio: OnceCell::new(),
        }
    }

    fn vision(&self, m: &Gemma4) -> Result<&VisionTower, ModelError> {
        if self.vision.get().is_none() {
            let cfg =
                m.config.vision_config.as_ref().ok_or_else(|| {
                    ModelError::Request("this checkpoint has no vision tower".into())
                })?;
            let t = VisionTower::load(&m.weights, cfg, m.config.text_config.hidden_size)?;
            let _ = self.vision.set(t);
        }
        self.vision
            .get()
            .ok_or_else(|| ModelError::Request("vision tower failed to initialise".into()))
    }

    fn audio(&self, m: &Gemma4) -> Result<&AudioTower, ModelError> {
        if self.audio.get().is_none() {
            let cfg =
                m.config.audio_config.as_ref().ok_or_else(|| {
                    ModelError::Request("this checkpoint has no audio tower".into())
                })?;
            let t = AudioTower::load(&m.weights, cfg, m.config.text_config.hidden_size)?;
            let _ = self.audio.set(t);
        }
        self.audio
            .get()
            .ok_or_else(|| ModelError::Request("audio tower failed to initialise".into()))
    }
}

impl TowerEncoder {
    /// Soft tokens of an in-memory RGB frame at `budget` (70..1120).
    pub fn encode_rgb(
        &self,
        model: &Gemma4,
        img: &preprocess::image::RgbImage,
        budget: usize,
    ) -> Result<Tensor, ModelError> {
        let input = preprocess::image::preprocess(img, budget)
            .map_err(|e| ModelError::Request(format!("frame: {e}")))?;
        self.vision(model)?.encode(&input)
    }

    /// Soft tokens of 16 kHz mono samples (the first 30 s, as the reference keeps).
    pub fn encode_samples(&self, model: &Gemma4, samples: &[f32]) -> Result<Tensor, ModelError> {
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
        let tower = self.audio(model)?;
        preprocess::mel::MelExtractor::new()
            .extract_clips(&samples)
            .iter()
            .map(|m| tower.encode(m))
            .collect()
    }
}
