//! Gemma 4 (E2B/E4B, model_type `gemma4`) on candle.
//!
//! Data flow: [`loader`] finds files and maps tensors -> [`config`] resolves per-layer
//! shapes -> [`text`] is the decoder (PLE, KV sharing, sliding/full attention, caches) ->
//! [`multimodal`] scatters tower soft tokens onto placeholder positions -> [`generate`]
//! runs batched prefill/decode with sampling. [`tokenizer`] renders the chat template and
//! expands media placeholders. The vision/audio towers live in `vision`/`audio`.
pub mod config;
pub mod layers;
pub mod loader;
