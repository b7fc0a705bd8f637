//! Audio-only recordings through symphonia: pure Rust, sample-exact, faster than real time.
//! Decoded audio is downmixed to mono, resampled to 16 kHz and chunked like the GStreamer path.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::chunker::Chunker;
use super::{SourceInput, AUDIO_RATE};
pub use crate::model::preprocess::audio_file::{AudioFileError, Input, MonoResampler};

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
