//! Cutting a live 16 kHz mono stream into the audio windows the model transcribes.
//!
//! Only voice opens a window, so silence costs no model time and yields no captions. While
//! speech goes on the growing window is handed out as a *partial* every
//! `partial_every_seconds`; a pause or the longest window the audio tower hears cuts it as
//! *final*. A window cut at its maximum length is followed by one that starts
//! `overlap_seconds` earlier, so a word cut at the edge is heard whole in one of them (the
//! stabilizer removes the words both windows share).
//!
//! Granularity: the voice flag is per chunk, so pauses are detected at chunk boundaries. A
//! pause ends after the first chunk that brings the non-voice run to `pause_seconds` (with
//! 0.5 s chunks a 0.6 s pause is seen after 1 s), and pause cuts fall on chunk boundaries.
//! Cuts at the maximum length are sample exact, or in the middle of the latest non-voice
//! run in the window's second half when there is one (no word is cut there).
//!
//! Deterministic: the windows depend only on the chunks (times, samples, flags), never on
//! wall-clock time, so a resumed analysis that replays the same audio cuts the same windows.

use crate::caption::config::CaptionConfig;
use crate::ingest::AUDIO_RATE;

/// Non-voice audio kept before the first voice chunk (and after the last one at a pause),
/// so a soft onset or a trailing consonant the VAD missed is still heard.
pub const PREROLL_SECONDS: f64 = 0.3;

/// Timestamp jitter under this is not a gap or an overlap (chunk times are rounded).
const TIME_TOLERANCE_SECONDS: f64 = 0.001;

const RATE: f64 = AUDIO_RATE as f64;

/// One window for the model.
#[derive(Debug, Clone, PartialEq)]
pub struct AudioWindow {
    /// Media seconds of the first sample.
    pub t0: f64,
    /// 16 kHz mono.
    pub samples: Vec<f32>,
    /// `false`: the window may still grow (a partial); `true`: it is cut and will not change.
    pub is_final: bool,
    /// On a final window cut at the maximum length: where the next window starts (it
    /// re-hears `[next_t0, end)`, so words cut at this window's end are heard whole there).
    /// `None` on partials and on windows cut at a pause.
    pub next_t0: Option<f64>,
}

impl AudioWindow {
    /// Media seconds just after the last sample.
    pub fn end(&self) -> f64 {
        self.t0 + self.samples.len() as f64 / RATE
    }

    pub fn duration(&self) -> f64 {
        self.samples.len() as f64 / RATE
    }
}

/// Turns 16 kHz mono chunks with a voice flag into audio windows; one per source. See the
/// module docs for the rules.
#[derive(Debug, Clone)]
pub struct AudioWindower {
    max: usize,
    overlap: usize,
    pause: usize,
    partial_every: usize,
    preroll_len: usize,
    /// The latest non-voice samples (at most `preroll_len`), contiguous with the next chunk.
    preroll: Vec<f32>,
    active: Option<Active>,
    /// Media time where the next chunk should start; `None` before the first chunk.
    next_t: Option<f64>,
}

/// The window being grown. Positions are sample indices into `samples`.
#[derive(Debug, Clone)]
struct Active {
    t0: f64,
    samples: Vec<f32>,
    /// Audio before this was already in an earlier final window (the overlap); a window
    /// with no voice after it says nothing new.
    fresh_from: usize,
    /// Just past the latest voice chunk; 0 when that chunk lies before this window.
    voice_end: usize,
    /// Non-voice samples since the latest voice chunk.
    silence: usize,
    /// Window length when the latest partial went out (or where fresh audio starts).
    last_partial: usize,
    /// The latest run of non-voice chunks inside the window, `[start, end)`.
    quiet: Option<(usize, usize)>,
}

impl Active {
    fn has_fresh_voice(&self) -> bool {
        self.voice_end > self.fresh_from
    }

    fn window(&self, len: usize, is_final: bool) -> AudioWindow {
        AudioWindow {
            t0: self.t0,
            samples: self.samples[..len].to_vec(),
            is_final,
            next_t0: None,
        }
    }
}

fn seconds_to_samples(s: f64) -> usize {
    (s.max(0.0) * RATE).round() as usize
}

impl AudioWindower {
    pub fn new(cfg: &CaptionConfig) -> AudioWindower {
        let max = seconds_to_samples(cfg.max_window_seconds).max(2);
        // The config validator keeps the overlap under half a window; clamping again here
        // is what guarantees every cut makes progress, whatever config reaches us.
        let overlap = seconds_to_samples(cfg.overlap_seconds).min(max / 2 - 1);
        AudioWindower {
            max,
            overlap,
            pause: seconds_to_samples(cfg.pause_seconds).max(1),
            partial_every: seconds_to_samples(cfg.partial_every_seconds).max(1),
            preroll_len: seconds_to_samples(PREROLL_SECONDS),
            preroll: Vec::new(),
            active: None,
            next_t: None,
        }
    }

    /// Feeds one chunk that starts at media time `t` (seconds). Chunks must come in time
    /// order; a gap of at least `pause_seconds` ends the window like a pause, a shorter one
    /// is filled with silence, and audio that overlaps what was already pushed is skipped.
    /// Returns the windows this chunk completes, in time order (partials and finals).
    pub fn push(&mut self, t: f64, samples: &[f32], voice: bool) -> Vec<AudioWindow> {
        let mut out = Vec::new();
        let mut t = t;
        let mut samples = samples;
        if let Some(expected) = self.next_t {
            let gap = t - expected;
            if gap > TIME_TOLERANCE_SECONDS {
                let gap_len = seconds_to_samples(gap);
                if gap_len >= self.pause || self.active.is_none() {
                    self.cut_pause(&mut out);
                    // Pre-roll must be contiguous with the voice it leads into.
                    self.preroll.clear();
                } else {
                    let silence = vec![0.0; gap_len];
                    self.process(expected, &silence, false, &mut out);
                }
            } else if gap < -TIME_TOLERANCE_SECONDS {
                let skip = seconds_to_samples(-gap).min(samples.len());
                samples = &samples[skip..];
                t = expected;
            }
        }
        self.next_t = Some(t + samples.len() as f64 / RATE);
        if !samples.is_empty() {
            self.process(t, samples, voice, &mut out);
        }
        out
    }

    /// The final window of the speech still pending (at end of stream or shutdown), if
    /// any; the windower then starts afresh.
    pub fn flush(&mut self) -> Option<AudioWindow> {
        let mut out = Vec::new();
        self.cut_pause(&mut out);
        self.preroll.clear();
        self.next_t = None;
        out.pop()
    }

    fn process(&mut self, t: f64, chunk: &[f32], voice: bool, out: &mut Vec<AudioWindow>) {
        let Some(a) = self.active.as_mut() else {
            if !voice {
                self.preroll.extend_from_slice(chunk);
                let excess = self.preroll.len().saturating_sub(self.preroll_len);
                self.preroll.drain(..excess);
                return;
            }
            let mut samples = std::mem::take(&mut self.preroll);
            let t0 = t - samples.len() as f64 / RATE;
            let start = samples.len();
            samples.extend_from_slice(chunk);
            let len = samples.len();
            self.active = Some(Active {
                t0,
                samples,
                fresh_from: 0,
                voice_end: len,
                silence: 0,
                last_partial: start,
                quiet: None,
            });
            self.after_chunk(out);
            return;
        };
        let start = a.samples.len();
        a.samples.extend_from_slice(chunk);
        let len = a.samples.len();
        if voice {
            a.voice_end = len;
            a.silence = 0;
        } else {
            a.silence += chunk.len();
            a.quiet = match a.quiet {
                Some((qs, qe)) if qe == start => Some((qs, len)),
                _ => Some((start, len)),
            };
        }
        self.after_chunk(out);
    }

    /// Applies the cut rules after a chunk was added to the active window.
    fn after_chunk(&mut self, out: &mut Vec<AudioWindow>) {
        while self
            .active
            .as_ref()
            .is_some_and(|a| a.samples.len() >= self.max)
        {
            self.cut_max(out);
        }
        let Some(a) = self.active.as_mut() else {
            return;
        };
        if a.silence >= self.pause {
            self.cut_pause(out);
            return;
        }
        let len = a.samples.len();
        let new_voice = a.voice_end > a.last_partial;
        if new_voice && len - a.last_partial >= self.partial_every {
            out.push(a.window(len, false));
            a.last_partial = len;
        }
    }

    /// The window reached its maximum length: cut it, and start the next one `overlap`
    /// samples before the cut.
    fn cut_max(&mut self, out: &mut Vec<AudioWindow>) {
        let Some(mut a) = self.active.take() else {
            return;
        };
        let soft = a
            .quiet
            .map(|(qs, qe)| (qs + qe) / 2)
            .filter(|&mid| mid >= self.max / 2 && mid <= self.max);
        let cut = soft.unwrap_or(self.max);
        // cut >= max/2 > overlap (see `new`), so every cut moves the window forward.
        let shift = cut - self.overlap;
        if a.voice_end.min(cut) > a.fresh_from {
            let mut w = a.window(cut, true);
            w.next_t0 = Some(a.t0 + shift as f64 / RATE);
            out.push(w);
        }
        a.samples.drain(..shift);
        a.t0 += shift as f64 / RATE;
        a.fresh_from = self.overlap;
        a.voice_end = if a.voice_end > cut {
            a.voice_end - shift
        } else {
            0
        };
        a.last_partial = self.overlap;
        a.quiet = a
            .quiet
            .filter(|&(_, qe)| qe > shift)
            .map(|(qs, qe)| (qs.saturating_sub(shift), qe - shift));
        self.active = Some(a);
    }

    /// A pause (or the end of input): the final window runs to the last voice plus a short
    /// tail; a window with nothing new since the previous cut is dropped.
    fn cut_pause(&mut self, out: &mut Vec<AudioWindow>) {
        let Some(a) = self.active.take() else {
            return;
        };
        let len = a.samples.len();
        let end = if a.has_fresh_voice() {
            (a.voice_end + self.preroll_len).min(len)
        } else {
            len
        };
        if a.has_fresh_voice() {
            out.push(a.window(end, true));
        }
        let tail = &a.samples[end.max(len.saturating_sub(self.preroll_len))..];
        self.preroll = tail.to_vec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Audio pushed into a windower, and the windows it made. Sample value = its global
    /// index, so a window's samples prove where they came from.
    struct TestStream {
        w: AudioWindower,
        n: usize,
        out: Vec<AudioWindow>,
    }

    impl TestStream {
        fn new(cfg: &CaptionConfig) -> TestStream {
            TestStream {
                w: AudioWindower::new(cfg),
                n: 0,
                out: Vec::new(),
            }
        }

        fn push(&mut self, seconds: f64, voice: bool) {
            let len = seconds_to_samples(seconds);
            let samples: Vec<f32> = (self.n..self.n + len).map(|i| i as f32).collect();
            let t = self.n as f64 / RATE;
            self.out.extend(self.w.push(t, &samples, voice));
            self.n += len;
        }

        /// `seconds` of audio in 0.1 s chunks.
        fn run(&mut self, seconds: f64, voice: bool) {
            let chunks = (seconds * 10.0).round() as usize;
            for _ in 0..chunks {
                self.push(0.1, voice);
            }
        }

        fn finals(&self) -> Vec<&AudioWindow> {
            self.out.iter().filter(|w| w.is_final).collect()
        }
    }

    fn assert_genuine(w: &AudioWindow) {
        let first = (w.t0 * RATE).round() as usize;
        for (i, s) in w.samples.iter().enumerate() {
            assert_eq!(*s, (first + i) as f32, "window at {} sample {i}", w.t0);
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    #[test]
    fn silence_makes_no_windows() {
        let mut f = TestStream::new(&CaptionConfig::default());
        f.run(40.0, false);
        assert!(f.out.is_empty());
        assert!(f.w.flush().is_none());
    }

    #[test]
    fn pause_cuts_a_final_with_preroll_and_partials_in_between() {
        let mut f = TestStream::new(&CaptionConfig::default());
        f.run(1.0, false);
        f.run(5.0, true);
        f.run(1.0, false);
        let partials: Vec<_> = f.out.iter().filter(|w| !w.is_final).collect();
        // A partial every 2 s of speech, each from the window start.
        assert_eq!(partials.len(), 2, "{:?}", f.out.len());
        assert!(partials.iter().all(|w| close(w.t0, 0.7)));
        assert!(close(partials[0].end(), 3.0) && close(partials[1].end(), 5.0));
        let finals = f.finals();
        assert_eq!(finals.len(), 1);
        // 0.3 s before the first voice chunk, 0.3 s after the last.
        assert!(close(finals[0].t0, 0.7), "{}", finals[0].t0);
        assert!(close(finals[0].end(), 6.3), "{}", finals[0].end());
        // Detected once 0.6 s of non-voice had passed: the final is the last window out.
        assert!(f.out.last().is_some_and(|w| w.is_final));
        for w in &f.out {
            assert_genuine(w);
        }
    }

    #[test]
    fn preroll_only_what_exists() {
        let mut f = TestStream::new(&CaptionConfig::default());
        f.run(1.0, true);
        f.run(1.0, false);
        let finals = f.finals();
        assert_eq!(finals.len(), 1);
        assert!(close(finals[0].t0, 0.0));
    }

    #[test]
    fn long_speech_is_cut_at_max_with_overlap() {
        let mut f = TestStream::new(&CaptionConfig::default());
        f.run(70.0, true);
        let last = f.w.flush().expect("pending speech");
        f.out.push(last);
        let finals = f.finals();
        assert_eq!(finals.len(), 3);
        assert!(close(finals[0].t0, 0.0) && close(finals[0].end(), 30.0));
        assert!(close(finals[1].t0, 28.0) && close(finals[1].end(), 58.0));
        assert!(close(finals[2].t0, 56.0) && close(finals[2].end(), 70.0));
        assert_eq!(finals[0].next_t0, Some(finals[1].t0));
        assert_eq!(finals[1].next_t0, Some(finals[2].t0));
        assert_eq!(finals[2].next_t0, None, "flushed, nothing follows");
        for w in &f.out {
            assert!(w.duration() <= 30.0 + 1e-9);
            assert_genuine(w);
        }
        // After a cut at max length the partials restart from the new window's start.
        let p = f
            .out
            .iter()
            .find(|w| !w.is_final && w.t0 > 1.0)
            .expect("partial of the second window");
        assert!(close(p.t0, 28.0));
        assert!(close(p.end(), 32.0), "{}", p.end());
    }

    #[test]
    fn max_cut_prefers_a_short_quiet_run() {
        let mut f = TestStream::new(&CaptionConfig::default());
        f.run(20.0, true);
        f.run(0.4, false); // shorter than the pause
        f.run(15.0, true);
        let finals = f.finals();
        assert_eq!(finals.len(), 1);
        assert!(close(finals[0].end(), 20.2), "{}", finals[0].end());
        let rest = f.w.flush().expect("pending");
        assert!(close(rest.t0, 18.2), "{}", rest.t0);
        assert_genuine(&rest);
    }

    #[test]
    fn a_window_with_nothing_new_after_the_overlap_is_dropped() {
        let mut f = TestStream::new(&CaptionConfig::default());
        f.run(30.0, true);
        f.run(2.0, false);
        assert_eq!(f.finals().len(), 1);
        assert!(f.w.flush().is_none());
    }

    #[test]
    fn a_long_gap_is_a_pause_and_a_short_one_is_silence() {
        let mut w = AudioWindower::new(&CaptionConfig::default());
        let voice = vec![0.5f32; 1600];
        assert!(w.push(0.0, &voice, true).is_empty());
        let out = w.push(0.2, &voice, true); // 0.1 s gap: filled
        assert!(out.is_empty());
        let out = w.push(5.0, &voice, true); // 4.7 s gap: a pause
        assert_eq!(out.len(), 1);
        assert!(out[0].is_final && close(out[0].t0, 0.0) && close(out[0].end(), 0.3));
        assert!(out[0].samples[1600..3200].iter().all(|&s| s == 0.0));
        let rest = w.flush().expect("pending");
        assert!(close(rest.t0, 5.0), "no pre-roll across a gap");
    }

    #[test]
    fn one_huge_chunk_is_cut_repeatedly() {
        let mut f = TestStream::new(&CaptionConfig::default());
        f.push(100.0, true);
        let finals = f.finals();
        assert_eq!(finals.len(), 3);
        for w in &f.out {
            assert_genuine(w);
            assert!(w.duration() <= 30.0 + 1e-9);
        }
        assert!(close(f.w.flush().expect("pending").end(), 100.0));
    }

    /// Random chunk sizes and voice flags: windows are genuine, bounded, in order, cover
    /// every voice chunk, and the same input gives the same windows.
    #[test]
    fn random_streams_hold_the_invariants() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = seed;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        for case in 0..20 {
            let cfg = CaptionConfig {
                max_window_seconds: [30.0, 5.0, 8.0][case % 3],
                overlap_seconds: [2.0, 1.0, 0.0][case % 3],
                ..CaptionConfig::default()
            };
            let mut plan = Vec::new();
            let mut voice = false;
            for _ in 0..300 {
                if next() % 5 == 0 {
                    voice = !voice;
                }
                let secs = [0.02, 0.1, 0.25, 0.5, 1.0, 3.0][(next() % 6) as usize];
                plan.push((secs, voice));
            }
            let runs: Vec<Vec<AudioWindow>> = (0..2)
                .map(|_| {
                    let mut f = TestStream::new(&cfg);
                    for &(s, v) in &plan {
                        f.push(s, v);
                    }
                    f.out.extend(f.w.flush());
                    f.out
                })
                .collect();
            assert_eq!(runs[0], runs[1], "deterministic");
            let out = &runs[0];
            let mut prev_final_end = 0.0f64;
            let mut prev_final_t0 = -1.0f64;
            for w in out.iter() {
                assert_genuine(w);
                assert!(w.duration() <= cfg.max_window_seconds + 1e-9);
                if w.is_final {
                    assert!(w.t0 > prev_final_t0, "finals in order");
                    assert!(w.t0 >= prev_final_end - cfg.overlap_seconds - 1e-6);
                    prev_final_end = w.end();
                    prev_final_t0 = w.t0;
                }
            }
            // Every voice chunk lies inside some final window.
            let mut t = 0.0;
            for &(s, v) in &plan {
                let len = seconds_to_samples(s) as f64 / RATE;
                if v {
                    let (a, b) = (t, t + len);
                    let mut covered = a;
                    let mut finals: Vec<_> = out.iter().filter(|w| w.is_final).collect();
                    finals.sort_by(|x, y| x.t0.total_cmp(&y.t0));
                    for w in finals {
                        if w.t0 <= covered + 1e-6 && w.end() > covered {
                            covered = w.end();
                        }
                    }
                    assert!(covered >= b - 1e-6, "case {case}: voice {a}..{b} uncovered");
                }
                t += len;
            }
        }
    }
}
