//! Live captions, the pure parts: audio windows for the model ([`window`]), model
//! transcripts turned into stable partial/final captions ([`stabilize`]), and WebVTT/SRT
//! files written cue by cue ([`files`]). The model worker owns one of each per source:
//!
//! ```text
//! for w in windower.push(chunk_t, &samples, voice) {       // and windower.flush() at EOS
//!     let text = transcribe(&w.samples);                   // the model; untrusted text
//!     for u in stabilizer.push_window(&w, &text) {
//!         emit caption event (source, u.t, u.end, u.text, u.status);
//!         if u.status is final { files.append(u.t, u.end, &u.text)? }
//!     }
//! }
//! stabilizer.finish()                                      // at EOS / shutdown, same handling
//! ```
//!
//! Every window must reach the stabilizer in order (a dropped final of a window cut at the
//! maximum length loses the words it left to the next window).

pub mod config;
pub mod files;
pub mod stabilize;
pub mod window;

pub use files::{CaptionFileError, CaptionFiles};
pub use stabilize::{suppress_repetition, CaptionUpdate, Stabilizer};
pub use window::{AudioWindow, AudioWindower};

#[cfg(test)]
mod tests {
    use super::files::{check_srt, check_vtt};
    use super::*;
    use crate::caption::config::CaptionConfig;
    use crate::event::CaptionStatus;

    const RATE: f64 = crate::ingest::AUDIO_RATE as f64;

    /// Windower -> fake model -> stabilizer -> files over a talk with sentences, pauses and
    /// one 45 s stretch without a pause. The fake model hears exactly the words inside its
    /// window (a fragment for a word cut at either edge). Checks: the files read back the
    /// talk once, in order, valid after every cue; and the caption latency with an instant
    /// model (media time from a cue's last word end to the window that made it final).
    #[test]
    fn talk_to_subtitle_files() {
        // (start, end, text) per word: 0.3 s of voice, 0.1 s gap.
        let mut words: Vec<(f64, f64, String)> = Vec::new();
        let mut t = 1.0;
        let sentence_lengths = [6, 12, 3, 20, 112, 9, 15];
        for (s, &n) in sentence_lengths.iter().enumerate() {
            for i in 0..n {
                let text = if i + 1 == n {
                    format!("s{s}w{i}.")
                } else {
                    format!("s{s}w{i}")
                };
                words.push((t, t + 0.3, text));
                t += 0.4;
            }
            t += 1.2; // a pause
        }
        let total = t + 1.0;
        let hear = |a: f64, b: f64| -> String {
            let mut out = Vec::new();
            for (ws, we, w) in &words {
                if *ws < a && *we > a {
                    out.push("ah".to_string());
                } else if *ws >= a && *we <= b {
                    out.push(w.clone());
                } else if *ws >= a && *ws < b {
                    out.push(w.chars().take(2).collect());
                }
            }
            out.join(" ")
        };
        let dir = std::env::temp_dir().join(format!("percept-caption-e2e-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (vtt, srt) = (dir.join("a.vtt"), dir.join("a.srt"));
        let mut files = CaptionFiles::create(&vtt, &srt).unwrap();
        let mut windower = AudioWindower::new(&CaptionConfig::default());
        let mut stab = Stabilizer::new();
        let mut latencies = Vec::new();
        let mut final_text = Vec::new();
        let mut handle = |w: AudioWindow, stab: &mut Stabilizer| {
            for u in stab.push_window(&w, &hear(w.t0, w.end())) {
                if u.status != CaptionStatus::Final {
                    continue;
                }
                assert!(files.append(u.t, u.end, &u.text).unwrap());
                check_vtt(&std::fs::read_to_string(&vtt).unwrap()).unwrap();
                check_srt(&std::fs::read_to_string(&srt).unwrap()).unwrap();
                let last = u.text.split(' ').next_back().unwrap();
                let true_end = words.iter().find(|(_, _, x)| x == last).unwrap().1;
                latencies.push(w.end() - true_end);
                final_text.push(u.text);
            }
        };
        let chunk = 1600; // 0.1 s
        let mut n = 0usize;
        while (n as f64) / RATE < total {
            let (a, b) = (n as f64 / RATE, (n + chunk) as f64 / RATE);
            let voice = words.iter().any(|(ws, we, _)| *ws < b && *we > a);
            for w in windower.push(a, &vec![0.1; chunk], voice) {
                handle(w, &mut stab);
            }
            n += chunk;
        }
        if let Some(w) = windower.flush() {
            handle(w, &mut stab);
        }
        let expected: Vec<&str> = words.iter().map(|w| w.2.as_str()).collect();
        assert_eq!(final_text.join(" "), expected.join(" "));
        let cues = check_srt(&std::fs::read_to_string(&srt).unwrap()).unwrap();
        assert_eq!(cues.len(), final_text.len());
        latencies.sort_by(f64::total_cmp);
        let p50 = latencies[latencies.len() / 2];
        let max = latencies[latencies.len() - 1];
        println!(
            "caption latency with an instant model over {} cues: p50 {p50:.2} s, max {max:.2} s",
            latencies.len()
        );
        assert!(max <= 7.0, "{latencies:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
