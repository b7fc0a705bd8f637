//! Cuts a 16 kHz mono stream into fixed-length chunks with sample-exact timestamps. Time
//! comes from buffer timestamps: a run of contiguous buffers is anchored once and then
//! counted in samples, and a jump in the timestamps starts a new run (reported as a gap).

use super::{AudioChunk, AUDIO_RATE};
use std::time::Instant;

/// Timestamp jitter tolerated before a buffer counts as discontinuous, in seconds. Matches
/// the order of GStreamer's own audio sink tolerance (40 ms).
pub const DISCONT_TOLERANCE: f64 = 0.04;

#[derive(Debug)]
pub struct Chunker {
    chunk_samples: usize,
    /// Media time of `samples_done` == 0 in the current run.
    anchor: Option<f64>,
    samples_done: u64,
    buf: Vec<f32>,
}

/// What one push produced.
#[derive(Debug, Default)]
pub struct ChunkerOutput {
    pub chunks: Vec<AudioChunk>,
    /// A hole in the timeline (t0, t1) found before this buffer.
    pub gap: Option<(f64, f64)>,
}

impl Chunker {
    pub fn new(chunk_seconds: f64) -> Chunker {
        let chunk_samples = ((chunk_seconds * f64::from(AUDIO_RATE)).round() as usize).max(1);
        Chunker {
            chunk_samples,
            anchor: None,
            samples_done: 0,
            buf: Vec::with_capacity(chunk_samples),
        }
    }

    /// Media time just after the last sample pushed.
    pub fn position(&self) -> Option<f64> {
        self.anchor
            .map(|a| a + (self.samples_done + self.buf.len() as u64) as f64 / f64::from(AUDIO_RATE))
    }

    /// Add samples whose first sample plays at media time `t` (None: continues the run).
    pub fn push(&mut self, t: Option<f64>, samples: &[f32]) -> ChunkerOutput {
        let mut out = ChunkerOutput::default();
        match (self.position(), t) {
            (None, Some(t)) => self.restart(t),
            (None, None) => self.restart(0.0),
            (Some(expected), Some(t)) if (t - expected).abs() > DISCONT_TOLERANCE => {
                if let Some(c) = self.flush() {
                    out.chunks.push(c);
                }
                if t > expected {
                    out.gap = Some((expected, t));
                }
                self.restart(t);
            }
            _ => {}
        }
        let mut rest = samples;
        while !rest.is_empty() {
            let take = (self.chunk_samples - self.buf.len()).min(rest.len());
            self.buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.buf.len() == self.chunk_samples {
                if let Some(c) = self.flush() {
                    out.chunks.push(c);
                }
            }
        }
        out
    }

    /// Emit whatever is buffered as a (possibly short) chunk.
    pub fn flush(&mut self) -> Option<AudioChunk> {
        let anchor = self.anchor?;
        if self.buf.is_empty() {
            return None;
        }
        let t = anchor + self.samples_done as f64 / f64::from(AUDIO_RATE);
        self.samples_done += self.buf.len() as u64;
        let samples = std::mem::replace(&mut self.buf, Vec::with_capacity(self.chunk_samples));
        Some(AudioChunk {
            t,
            samples,
            captured: Instant::now(),
        })
    }

    fn restart(&mut self, t: f64) {
        self.anchor = Some(t);
        self.samples_done = 0;
        self.buf.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_buffers_give_exact_chunk_times() {
        let mut c = Chunker::new(1.0);
        let mut chunks = Vec::new();
        // 10 ms buffers with slightly jittered timestamps: time comes from the count.
        for i in 0..350u32 {
            let jitter = if i % 2 == 0 { 0.003 } else { -0.002 };
            let t = f64::from(i) * 0.01 + jitter;
            chunks.extend(c.push(Some(t.max(0.0)), &[0.0; 160]).chunks);
        }
        chunks.extend(c.flush());
        let ts: Vec<f64> = chunks.iter().map(|c| c.t).collect();
        assert_eq!(ts.len(), 4);
        for (i, t) in ts.iter().enumerate() {
            assert!((t - i as f64 - 0.003).abs() < 1e-9, "{ts:?}");
        }
        assert_eq!(chunks[3].samples.len(), 8000);
        let total: usize = chunks.iter().map(|c| c.samples.len()).sum();
        assert_eq!(total, 350 * 160);
    }

    #[test]
    fn timestamp_jump_flushes_and_reports_gap() {
        let mut c = Chunker::new(1.0);
        let a = c.push(Some(0.0), &[0.0; 8000]);
        assert!(a.chunks.is_empty());
        let b = c.push(Some(2.5), &[0.0; 16000]);
        assert_eq!(b.gap, Some((0.5, 2.5)));
        assert_eq!(b.chunks.len(), 2);
        assert_eq!(b.chunks[0].t, 0.0);
        assert_eq!(b.chunks[0].samples.len(), 8000);
        assert_eq!(b.chunks[1].t, 2.5);
    }
}
