//! Audio windows for recordings (`transcribe`, `summarize`): whole chunks from the first
//! voice chunk until a pause of `pause_seconds` or the length cap, no overlap, no partials.
//! Offline transcription needs no partial captions, and windows made of whole chunks on the
//! chunker's fixed grid start and end at the same media times however a run is cut up, so a
//! resumed analysis makes exactly the windows an uninterrupted one makes. Live captions use
//! [`crate::caption::AudioWindower`] instead.

use crate::config::CaptionConfig;
use crate::ingest::AUDIO_RATE;

pub struct RecordingWindow {
    pub t0: f64,
    pub samples: Vec<f32>,
}

pub struct RecordingWindower {
    cfg: CaptionConfig,
    t0: f64,
    buf: Vec<f32>,
    silence: f64,
}

impl RecordingWindower {
    pub fn new(cfg: &CaptionConfig) -> Self {
        Self {
            cfg: cfg.clone(),
            t0: 0.0,
            buf: Vec::new(),
            silence: 0.0,
        }
    }

    pub fn push(&mut self, t: f64, samples: &[f32], voice: bool) -> Option<RecordingWindow> {
        let d = samples.len() as f64 / f64::from(AUDIO_RATE);
        if self.buf.is_empty() {
            if !voice {
                return None;
            }
            self.t0 = t;
        }
        self.buf.extend_from_slice(samples);
        self.silence = if voice { 0.0 } else { self.silence + d };
        if self.silence >= self.cfg.pause_seconds
            || self.buf.len() as f64 / f64::from(AUDIO_RATE) >= self.cfg.max_window_seconds
        {
            return self.flush();
        }
        None
    }

    /// The pending speech as a last window (end of the recording).
    pub fn flush(&mut self) -> Option<RecordingWindow> {
        if self.buf.is_empty() {
            return None;
        }
        self.silence = 0.0;
        Some(RecordingWindow {
            t0: self.t0,
            samples: std::mem::take(&mut self.buf),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_whole_chunks_cut_at_pauses() {
        let cfg = CaptionConfig::default();
        let mut w = RecordingWindower::new(&cfg);
        let chunk = vec![0.1f32; 16000];
        let voice = [false, true, true, false, true, false, false, true];
        let mut out = Vec::new();
        for (i, v) in voice.iter().enumerate() {
            out.extend(w.push(i as f64, &chunk, *v));
        }
        out.extend(w.flush());
        let spans: Vec<(f64, f64)> = out
            .iter()
            .map(|x| (x.t0, x.t0 + x.samples.len() as f64 / 16000.0))
            .collect();
        // A 1 s quiet chunk is a pause (>= 0.6 s): [1, 4) then [4, 6) then [7, 8).
        assert_eq!(spans, vec![(1.0, 4.0), (4.0, 6.0), (7.0, 8.0)]);
    }
}
