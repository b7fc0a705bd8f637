//! Audio files decoded the way the reference's loader reads them: symphonia (pure Rust) for
//! the container and codec, channels averaged, then the soxr-HQ resampler of
//! [`super::resample`] to 16 kHz. [`Input`] streams packets (percept's file sources chunk them
//! as they come); [`decode_mono_16k`] collects a whole file.

use std::fs::File;
use std::path::Path;

use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{DecoderOptions, CODEC_TYPE_NULL};
use symphonia::core::errors::Error as SymError;
use symphonia::core::formats::FormatOptions;
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;

use super::resample::Resampler;
use super::SAMPLE_RATE as AUDIO_RATE;

#[derive(Debug, thiserror::Error)]
pub enum AudioFileError {
    #[error("cannot open: {0}")]
    Open(std::io::Error),
    #[error("file is empty")]
    Empty,
    #[error("not a recognised audio file ({0})")]
    Format(String),
    #[error("no audio track")]
    NoTrack,
    #[error("unsupported codec: {0}")]
    Codec(String),
    #[error("decode failed: {0}")]
    Decode(String),
    #[error("resampler: {0}")]
    Resample(String),
}

/// Streaming conversion of any-rate interleaved audio to 16 kHz mono with an exact length:
/// channels are averaged (the reference loader's `mean(axis=-1)`), then resampled with the
/// soxr-HQ filter of [`super::resample`]. The output of `n` input frames is
/// `round(n * 16000 / rate)` samples.
pub struct MonoResampler {
    inner: Option<Resampler>,
    rate: u32,
}

impl MonoResampler {
    pub fn new(rate: u32) -> Result<MonoResampler, AudioFileError> {
        if rate == 0 {
            return Err(AudioFileError::Resample("sample rate 0".into()));
        }
        let inner = (rate != AUDIO_RATE).then(|| Resampler::new(rate, AUDIO_RATE));
        Ok(MonoResampler { inner, rate })
    }

    /// The input sample rate.
    pub fn rate(&self) -> u32 {
        self.rate
    }

    /// Downmix `interleaved` (of `channels`) and return the 16 kHz samples ready so far.
    pub fn push(&mut self, interleaved: &[f32], channels: usize) -> Vec<f32> {
        let channels = channels.max(1);
        let mono: Vec<f32> = if channels == 1 {
            interleaved.to_vec()
        } else {
            interleaved
                .chunks_exact(channels)
                .map(|f| f.iter().sum::<f32>() / channels as f32)
                .collect()
        };
        match self.inner.as_mut() {
            None => mono,
            Some(r) => {
                let mut out =
                    Vec::with_capacity(mono.len() * AUDIO_RATE as usize / self.rate as usize + 1);
                r.push(&mono, &mut out);
                out
            }
        }
    }

    /// Drain the resampler: the rest of the `round(n * 16000 / rate)` samples.
    pub fn finish(&mut self) -> Vec<f32> {
        let mut out = Vec::new();
        if let Some(r) = self.inner.as_mut() {
            r.finish(&mut out);
        }
        out
    }
}

/// An opened audio file: symphonia's reader and decoder for its first audio track.
pub struct Input {
    format: Box<dyn symphonia::core::formats::FormatReader>,
    decoder: Box<dyn symphonia::core::codecs::Decoder>,
    track_id: u32,
    /// Sample rate of the track.
    pub rate: u32,
    /// Frames in the track, when the container says.
    pub n_frames: Option<u64>,
    buf: Option<SampleBuffer<f32>>,
    /// Corrupt packets skipped so far.
    pub decode_errors: u32,
}

impl Input {
    /// Opens `path` for decoding. A panic inside the demuxer or decoder (symphonia has some
    /// on corrupt input, e.g. an overflow on a damaged MP4 `stsc` atom) is contained and
    /// becomes a [`AudioFileError::Decode`], here and in [`Input::next_block`].
    pub fn open(path: &Path) -> Result<Input, AudioFileError> {
        contained(|| Input::open_inner(path))
    }

    fn open_inner(path: &Path) -> Result<Input, AudioFileError> {
        let file = File::open(path).map_err(AudioFileError::Open)?;
        let len = file.metadata().map_err(AudioFileError::Open)?.len();
        if len == 0 {
            return Err(AudioFileError::Empty);
        }
        let mss = MediaSourceStream::new(Box::new(file), Default::default());
        let mut hint = Hint::new();
        if let Some(ext) = path.extension().and_then(|e| e.to_str()) {
            hint.with_extension(ext);
        }
        let probed = symphonia::default::get_probe()
            .format(
                &hint,
                mss,
                &FormatOptions::default(),
                &MetadataOptions::default(),
            )
            .map_err(|e| AudioFileError::Format(e.to_string()))?;
        let format = probed.format;
        let track = format
            .tracks()
            .iter()
            .find(|t| t.codec_params.codec != CODEC_TYPE_NULL)
            .ok_or(AudioFileError::NoTrack)?;
        let track_id = track.id;
        let params = track.codec_params.clone();
        let decoder = symphonia::default::get_codecs()
            .make(&params, &DecoderOptions::default())
            .map_err(|e| AudioFileError::Codec(e.to_string()))?;
        let rate = params
            .sample_rate
            .ok_or_else(|| AudioFileError::Format("no sample rate".into()))?;
        Ok(Input {
            format,
            decoder,
            track_id,
            rate,
            n_frames: params.n_frames,
            buf: None,
            decode_errors: 0,
        })
    }

    /// The next decoded packet as interleaved samples and its channel count; `None` at the
    /// end. Corrupt packets are skipped (symphonia's advice) and counted.
    pub fn next_block(&mut self) -> Result<Option<(&[f32], usize)>, AudioFileError> {
        contained(move || self.next_block_inner())
    }

    fn next_block_inner(&mut self) -> Result<Option<(&[f32], usize)>, AudioFileError> {
        loop {
            let packet = match self.format.next_packet() {
                Ok(p) => p,
                Err(SymError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Ok(None)
                }
                Err(SymError::ResetRequired) => return Ok(None),
                Err(e) => return Err(AudioFileError::Decode(e.to_string())),
            };
            if packet.track_id() != self.track_id {
                continue;
            }
            let decoded = match self.decoder.decode(&packet) {
                Ok(d) => d,
                Err(SymError::DecodeError(e)) => {
                    self.decode_errors += 1;
                    tracing::debug!(error = %e, "Skipping undecodable packet.");
                    continue;
                }
                Err(e) => return Err(AudioFileError::Decode(e.to_string())),
            };
            let spec = *decoded.spec();
            let channels = spec.channels.count();
            let buf = self
                .buf
                .get_or_insert_with(|| SampleBuffer::new(decoded.capacity() as u64, spec));
            if buf.capacity() < decoded.capacity() * channels {
                *buf = SampleBuffer::new(decoded.capacity() as u64, spec);
            }
            buf.copy_interleaved_ref(decoded);
            return Ok(Some((buf.samples(), channels)));
        }
    }
}

/// Runs a symphonia call, turning a panic into a decode error (see [`Input::open`]).
fn contained<T>(f: impl FnOnce() -> Result<T, AudioFileError>) -> Result<T, AudioFileError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let what = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        Err(AudioFileError::Decode(format!(
            "the decoder crashed on this file ({what})"
        )))
    })
}

/// The whole file as 16 kHz mono (for `model run --audio`), exactly
/// `round(frames * 16000 / rate)` samples long.
pub fn decode_mono_16k(path: &Path) -> Result<Vec<f32>, AudioFileError> {
    let mut input = Input::open(path)?;
    let mut resampler = MonoResampler::new(input.rate)?;
    let mut out = Vec::new();
    while let Some((samples, channels)) = input.next_block()? {
        out.extend(resampler.push(samples, channels));
    }
    out.extend(resampler.finish());
    Ok(out)
}
