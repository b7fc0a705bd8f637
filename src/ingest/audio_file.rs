//! Audio-only recordings through symphonia: pure Rust, sample-exact, faster than real time.
//! Decoded audio is downmixed to mono, resampled to 16 kHz and chunked like the GStreamer path.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{DecoderOptions, CODEC_TYPE_NULL};
use symphonia::core::errors::Error as SymError;
use symphonia::core::formats::FormatOptions;
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;

use super::chunker::Chunker;
use super::{SourceInput, AUDIO_RATE};
use crate::preprocess::resample::Resampler;

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
/// soxr-HQ filter of [`crate::preprocess::resample`]. The output of `n` input frames is
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

/// The live audio branch's conversion: GStreamer delivers interleaved f32 at the source's own
/// rate and channel count, and this applies the very [`MonoResampler`] of the file path, so
/// a stream and a file of the same signal give the same 16 kHz samples. Keeps one resampler
/// per contiguous run: a timestamp jump or a format change drains the old one first.
#[derive(Default)]
pub struct LiveAudio {
    run: Option<LiveRun>,
}

struct LiveRun {
    resampler: MonoResampler,
    channels: usize,
    /// Media time of the run's first sample (None: the stream has no timestamps).
    anchor: Option<f64>,
    frames_in: u64,
    samples_out: u64,
}

impl LiveRun {
    fn time_of_output(&self) -> Option<f64> {
        self.anchor
            .map(|a| a + self.samples_out as f64 / f64::from(AUDIO_RATE))
    }

    fn expected_input_time(&self) -> Option<f64> {
        self.anchor
            .map(|a| a + self.frames_in as f64 / f64::from(self.resampler.rate()))
    }
}

/// 16 kHz mono samples and the media time of the first one (None when untimed).
pub type TimedSamples = (Option<f64>, Vec<f32>);

impl LiveAudio {
    /// Converts one buffer whose first frame plays at media time `t`.
    pub fn push(
        &mut self,
        t: Option<f64>,
        interleaved: &[f32],
        rate: u32,
        channels: usize,
    ) -> Result<Vec<TimedSamples>, AudioFileError> {
        let mut out = Vec::new();
        let continues = self.run.as_ref().is_some_and(|r| {
            r.resampler.rate() == rate
                && r.channels == channels
                && match (t, r.expected_input_time()) {
                    (Some(t), Some(e)) => (t - e).abs() <= super::chunker::DISCONT_TOLERANCE,
                    _ => true,
                }
        });
        if !continues {
            out.extend(self.finish());
            self.run = Some(LiveRun {
                resampler: MonoResampler::new(rate)?,
                channels,
                anchor: t,
                frames_in: 0,
                samples_out: 0,
            });
        }
        if let Some(r) = self.run.as_mut() {
            let at = r.time_of_output();
            let y = r.resampler.push(interleaved, channels);
            r.frames_in += (interleaved.len() / channels.max(1)) as u64;
            r.samples_out += y.len() as u64;
            if !y.is_empty() {
                out.push((at, y));
            }
        }
        Ok(out)
    }

    /// Drains the current run (end of stream, or before a discontinuity).
    pub fn finish(&mut self) -> Vec<TimedSamples> {
        let Some(mut r) = self.run.take() else {
            return Vec::new();
        };
        let at = r.time_of_output();
        let y = r.resampler.finish();
        if y.is_empty() {
            Vec::new()
        } else {
            vec![(at, y)]
        }
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

/// Decode `path` into `feed`. Returns the number of 16 kHz samples delivered.
pub fn run(
    feed: &SourceInput,
    path: &Path,
    chunk_seconds: f64,
    realtime: bool,
    stop: &AtomicBool,
) -> Result<u64, AudioFileError> {
    let mut input = Input::open(path)?;
    if let Some(frames) = input.n_frames {
        feed.set_duration(frames as f64 / f64::from(input.rate));
    }
    let mut resampler = MonoResampler::new(input.rate)?;
    let mut chunker = Chunker::new(chunk_seconds);
    let started = Instant::now();
    let mut delivered = 0u64;
    let deliver = |samples: &[f32], chunker: &mut Chunker| -> u64 {
        for c in chunker.push(None, samples).chunks {
            feed.push_audio(c);
        }
        samples.len() as u64
    };
    loop {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let Some((samples, channels)) = input.next_block()? else {
            break;
        };
        let out = resampler.push(samples, channels);
        delivered += deliver(&out, &mut chunker);
        if realtime {
            let media = delivered as f64 / f64::from(AUDIO_RATE);
            let ahead = media - started.elapsed().as_secs_f64();
            if ahead > 0.0 {
                std::thread::sleep(Duration::from_secs_f64(ahead.min(1.0)));
            }
        }
    }
    let tail = resampler.finish();
    delivered += deliver(&tail, &mut chunker);
    if let Some(c) = chunker.flush() {
        feed.push_audio(c);
    }
    if input.decode_errors > 0 {
        tracing::warn!(source = %feed.name, decode_errors = input.decode_errors, "Some packets could not be decoded.");
    }
    Ok(delivered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resampled_length_is_exact_and_tone_survives() {
        for rate in [8_000u32, 22_050, 44_100, 48_000, 16_000] {
            let n = rate as usize * 3 + 123;
            let f = 440.0f32;
            let stereo: Vec<f32> = (0..n)
                .flat_map(|i| {
                    let s = 0.5 * (2.0 * std::f32::consts::PI * f * i as f32 / rate as f32).sin();
                    [s, s]
                })
                .collect();
            let mut r = MonoResampler::new(rate).unwrap();
            let mut out = Vec::new();
            for piece in stereo.chunks(2 * 777) {
                out.extend(r.push(piece, 2));
            }
            out.extend(r.finish());
            let expected = (n as f64 * 16_000.0 / f64::from(rate)).round() as usize;
            assert_eq!(out.len(), expected, "rate {rate}");
            // Zero crossings in the steady middle second match 440 Hz.
            let mid = &out[16_000..32_000];
            let crossings = mid.windows(2).filter(|w| w[0] < 0.0 && w[1] >= 0.0).count();
            assert!((438..=442).contains(&crossings), "rate {rate}: {crossings}");
        }
    }
}
