//! Gemma 4 on candle: E2B/E4B (model_type `gemma4`) and the encoder-free 12B
//! (`gemma4_unified`, see [`unified`]); `config.json` `model_type` picks the architecture.
//! No media framework, async runtime or CLI: callers hand in files, images or samples and get
//! tokens back. See the crate's README.md and `examples/describe.rs`.
//!
//! Data flow: [`loader`] finds files and maps tensors (safetensors, [`gguf`], the
//! [`quant_cache`]) -> [`config`] resolves per-layer shapes -> [`text`] is the decoder (PLE, KV
//! sharing, sliding/full attention, caches) -> [`multimodal`] scatters tower soft tokens onto
//! placeholder positions -> [`generate`] runs batched prefill/decode with sampling.
//! [`tokenizer`] renders the chat template and [`prompt`] builds a turn with media;
//! [`preprocess`] turns images and audio into tower inputs; [`gemma4`] bundles a loaded
//! checkpoint. The vision/audio towers live in [`vision`]/[`audio`] (driven by [`media`]); the
//! 12B's patch/waveform embedders in [`unified`].
pub mod audio;
pub mod clippable;
pub mod config;
pub mod device;
pub mod gemma4;
pub mod generate;
pub mod gguf;
pub mod gguf_info;
pub mod gguf_mmproj;
pub mod gguf_model;
pub mod gguf_write;
#[cfg(feature = "hub")]
pub mod hub;
pub mod layers;
pub mod loader;
pub mod media;
pub mod multimodal;
pub mod prefix;
pub mod preprocess;
pub mod prompt;
pub mod q4k_avx512;
pub mod q5k_avx512;
pub mod q6k_avx512;
pub mod q8_avx512;
pub mod qmm;
pub mod quant_cache;
pub mod rng;
pub mod subnormal;
/// Tiny seeded checkpoints for tests and benchmarks (feature `test-support`).
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
pub mod text;
pub mod tokenizer;
pub mod unified;
pub mod vision;
pub mod w8a8;

pub use gemma4::Gemma4;
pub use layers::Quant;
pub use loader::LoadError;

/// Errors while running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{modality}: {placeholders} placeholder token(s) but {soft_tokens} soft token(s)")]
    Placeholders {
        modality: &'static str,
        placeholders: usize,
        soft_tokens: usize,
    },
    #[error(transparent)]
    Prompt(#[from] tokenizer::PromptError),
    #[error("bad request: {0}")]
    Request(String),
}
