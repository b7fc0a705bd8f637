//! Media preprocessing as the Gemma 4 reference processors do it (transformers 5.24.0):
//! [`image`] (RGB, aspect-preserving PIL-bicubic resize to a soft-token budget, patchify),
//! [`mel`] (log-mel features + validity mask, 30 s clips), [`wav`] (decode + mono + 16 kHz),
//! [`unified`] (the encoder-free 12B: torchvision resize, merged 48x48 patches, waveform frames).

pub mod audio_file;
pub mod image;
pub mod mel;
pub mod resample;
pub mod unified;
pub mod wav;

/// The sample rate every audio input is resampled to (the feature extractor's rate).
pub const SAMPLE_RATE: u32 = 16_000;

/// Errors while decoding or preprocessing media.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("decoding image {path}: {source}")]
    ImageDecode {
        path: String,
        #[source]
        source: ::image::ImageError,
    },
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("decoding audio {path}: {msg}")]
    AudioDecode { path: String, msg: String },
    #[error("unsupported soft-token budget {0} (one of 70, 140, 280, 560, 1120)")]
    Budget(usize),
    #[error("cannot resize {height}x{width}: {msg}")]
    Resize {
        height: usize,
        width: usize,
        msg: String,
    },
    #[error("empty input: {0}")]
    Empty(String),
}
