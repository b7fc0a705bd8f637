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
