//! Whole-file audio for `model run --audio`: the same symphonia decoder and 16 kHz mono
//! resampler as the ingest path ([`crate::ingest::audio_file`]), collected into one buffer.

use std::path::Path;

use super::PreprocessError;

/// Decode, downmix and resample to 16 kHz mono.
pub fn load_mono_16k(path: &Path) -> Result<Vec<f32>, PreprocessError> {
    crate::ingest::audio_file::decode_mono_16k(path).map_err(|e| PreprocessError::AudioDecode {
        path: path.display().to_string(),
        msg: e.to_string(),
    })
}
