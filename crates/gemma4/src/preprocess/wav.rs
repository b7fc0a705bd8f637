//! Whole-file audio for a prompt: [`super::audio_file`] decoding (symphonia, channel mean,
//! soxr-HQ resampling), collected into one 16 kHz buffer.

use std::path::Path;

use super::PreprocessError;

/// Decode, downmix and resample to 16 kHz mono.
pub fn load_mono_16k(path: &Path) -> Result<Vec<f32>, PreprocessError> {
    super::audio_file::decode_mono_16k(path).map_err(|e| PreprocessError::AudioDecode {
        path: path.display().to_string(),
        msg: e.to_string(),
    })
}
