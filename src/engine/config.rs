//! `[model]`: the model every source shares, how it is loaded and how much it may do per
//! step.

use serde::{Deserialize, Serialize};

/// Quantizations `[model] quant` may name.
pub const QUANTS: &[&str] = &["f32", "f16", "bf16", "q8_0", "q4k"];

/// The model shared by every source.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Hub id or local folder (Hugging Face layout).
    pub id: String,
    /// false: signal analysis only, the model is never loaded.
    pub enabled: bool,
    /// f32 | f16 | bf16 | q8_0 | q4k
    pub quant: String,
    /// none | projections: keep the image/audio projections and the token table (tied
    /// lm_head) at f16 while the decoder linears take `quant` (`--keep-f16`).
    pub keep_f16: crate::model::layers::KeepF16,
    /// int8 | f32: the E2B/E4B vision tower's encoder linears in int8 (AVX-512 VNNI; f32
    /// on CPUs without it and on GPUs) or f32, the reference's precision
    /// (`--vision-quant`). int8 is ~4x faster per frame; soft tokens move by about as much
    /// as moving the pixels by half a gray level does.
    pub vision_quant: crate::model::clippable::VisionQuant,
    /// Token budget per answer.
    pub max_tokens: usize,
    /// Longest prompt + answer per request, in tokens.
    pub context: usize,
    /// Prompt rows per request per prefill forward.
    pub prefill_chunk: usize,
    /// Most requests in one batched step (across sources).
    pub max_batch: usize,
    /// Artificial delay per batched step in milliseconds: for governor tests and demos.
    pub delay_ms: u64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            id: "google/gemma-4-E2B-it".into(),
            enabled: true,
            quant: "q8_0".into(),
            keep_f16: crate::model::layers::KeepF16::None,
            vision_quant: crate::model::clippable::VisionQuant::Int8,
            max_tokens: 96,
            context: 4096,
            prefill_chunk: 512,
            max_batch: 4,
            delay_ms: 0,
        }
    }
}

impl ModelConfig {
    /// Problems with the section, one line each.
    pub fn validate(&self, p: &mut Vec<String>) {
        if !QUANTS.contains(&self.quant.as_str()) {
            p.push(format!(
                "[model] quant must be f32, f16, bf16, q8_0 or q4k, got '{}'",
                self.quant
            ));
        }
        if self.max_batch == 0 || self.max_tokens == 0 {
            p.push("[model] max_batch and max_tokens must be at least 1".into());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use crate::model::clippable::VisionQuant;

    #[test]
    fn vision_quant_defaults_to_int8_and_rejects_other_names() {
        let parse = crate::config::Config::parse;
        assert_eq!(
            parse("[model]\n").unwrap().model.vision_quant,
            VisionQuant::Int8
        );
        let c = parse("[model]\nvision_quant = \"f32\"\n").unwrap();
        assert_eq!(c.model.vision_quant, VisionQuant::F32);
        let err = parse("[model]\nvision_quant = \"int4\"\n").unwrap_err();
        assert_eq!(err.len(), 1, "{err:?}");
        assert!(
            err[0].contains("int4") && err[0].contains("int8") && err[0].contains("f32"),
            "{err:?}"
        );
    }
}
