//! Live captions, the pure parts: audio windows for the model ([`window`]), model
//! transcripts turned into stable partial/final captions ([`stabilize`]), and WebVTT/SRT
//! files written cue by cue ([`files`]). The model worker owns one of each per source.

pub mod files;
pub mod stabilize;
pub mod window;

pub use files::{CaptionFileError, CaptionFiles};
pub use stabilize::{suppress_repetition, CaptionUpdate, Stabilizer};
pub use window::{AudioWindow, AudioWindower};
