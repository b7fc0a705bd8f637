//! The real-time governor of one live source: it measures how far the model's answers trail
//! the input and trades quality for speed in steps, so no backlog ever builds.
//!
//! Steps, from full quality: the image soft-token budget halves down to 70 (e.g. 280 -> 140
//! -> 70), then the frame rate sent to the model halves, then it halves again and audio
//! reaches the model only where voice is present. The latest-wins slots in front of the
//! model already keep lag bounded by about one model step; the governor makes each step
//! cheaper so that bound shrinks, and steps back up once lag stays low.

use std::collections::VecDeque;

use crate::config::GovernorConfig;
use crate::event::GovernorState;

const BUDGETS: [u32; 5] = [70, 140, 280, 560, 1120];
/// Media seconds over which the effective frame rate is measured.
const FPS_WINDOW: f64 = 10.0;
/// Weight of the newest measurement in the RTF averages.
const EWMA: f64 = 0.3;

#[derive(Debug, Clone)]
pub struct Governor {
    cfg: GovernorConfig,
    target_fps: f64,
    /// Whether degradation applies (live sources); files use backpressure instead.
    adaptive: bool,
    level: u8,
    /// Soft-token steps available from the configured budget down to 70.
    token_steps: u8,
    lag: f64,
    rtf_video: f64,
    rtf_audio: f64,
    /// Media time of the last level change and since when lag has been low.
    changed_at: f64,
    low_since: Option<f64>,
    sent: VecDeque<f64>,
    newest_input: f64,
}

impl Governor {
    pub fn new(cfg: &GovernorConfig, target_fps: f64, adaptive: bool) -> Governor {
        let start = BUDGETS
            .iter()
            .position(|&b| b == cfg.soft_tokens)
            .unwrap_or(2);
        Governor {
            cfg: cfg.clone(),
            target_fps,
            adaptive,
            level: 0,
            token_steps: start as u8,
            lag: 0.0,
            rtf_video: 0.0,
            rtf_audio: 0.0,
            changed_at: 0.0,
            low_since: None,
            sent: VecDeque::new(),
            newest_input: 0.0,
        }
    }

    pub fn max_level(&self) -> u8 {
        self.token_steps + 2
    }

    pub fn level(&self) -> u8 {
        self.level
    }

    /// Image budget at the current level.
    pub fn soft_tokens(&self) -> u32 {
        let start = self.token_steps as usize;
        let down = (self.level as usize).min(start);
        BUDGETS[start - down]
    }

    /// Frames per second the model may receive at the current level.
    pub fn model_fps(&self) -> f64 {
        let fps_steps = self.level.saturating_sub(self.token_steps);
        self.target_fps / f64::from(1u32 << fps_steps)
    }

    /// At the last step, audio reaches the model only where voice is present.
    pub fn audio_voice_only(&self) -> bool {
        self.level >= self.max_level()
    }

    /// Any input seen (frame or chunk end), in media seconds.
    pub fn note_input(&mut self, t: f64) {
        if t > self.newest_input {
            self.newest_input = t;
        }
    }

    /// May a frame at `t` go to the model, given the last one sent at `last`?
    pub fn frame_due(&self, t: f64, last: Option<f64>) -> bool {
        match last {
            None => true,
            // A 10% margin so PTS jitter does not halve the rate.
            Some(l) => t - l >= 0.9 / self.model_fps(),
        }
    }

    pub fn note_frame_sent(&mut self, t: f64) {
        self.sent.push_back(t);
        while self.sent.front().is_some_and(|&f| t - f > FPS_WINDOW) {
            self.sent.pop_front();
        }
    }

    pub fn effective_fps(&self) -> f64 {
        match (self.sent.front(), self.sent.back()) {
            (Some(a), Some(b)) if self.sent.len() > 1 && b > a => {
                (self.sent.len() - 1) as f64 / (b - a)
            }
            _ => 0.0,
        }
    }

    /// A model answer for media ending at `media_end` took `model_s` seconds for
    /// `media_s` seconds of media (video: the frame interval; audio: the window).
    /// Returns true when the level changed.
    pub fn on_result(&mut self, media_end: f64, model_s: f64, media_s: f64, video: bool) -> bool {
        let rtf = if media_s > 0.0 {
            model_s / media_s
        } else {
            0.0
        };
        let avg = if video {
            &mut self.rtf_video
        } else {
            &mut self.rtf_audio
        };
        *avg = if *avg == 0.0 {
            rtf
        } else {
            EWMA * rtf + (1.0 - EWMA) * *avg
        };
        self.lag = (self.newest_input - media_end).max(0.0);
        if !self.adaptive {
            return false;
        }
        let now = self.newest_input;
        if self.lag > self.cfg.max_lag_seconds {
            self.low_since = None;
            // At most one change per max_lag of media, so the cheaper setting shows its effect
            // first; but a lag many times the limit (a model far too slow, often seen on the
            // very first answer) jumps one step per doubling instead of crawling down.
            if self.level < self.max_level() && now - self.changed_at >= self.cfg.max_lag_seconds {
                let over = (self.lag / self.cfg.max_lag_seconds)
                    .log2()
                    .floor()
                    .max(1.0) as u8;
                self.level = (self.level + over).min(self.max_level());
                self.changed_at = now;
                return true;
            }
        } else if self.lag < self.cfg.recover_lag_seconds {
            let since = *self.low_since.get_or_insert(now);
            if self.level > 0 && now - since >= self.cfg.recover_seconds {
                self.level -= 1;
                self.changed_at = now;
                self.low_since = Some(now);
                return true;
            }
        } else {
            self.low_since = None;
        }
        false
    }

    pub fn state(&self) -> GovernorState {
        GovernorState {
            lag_seconds: round3(self.lag),
            effective_fps: round3(self.effective_fps()),
            rtf_video: round3(self.rtf_video),
            rtf_audio: round3(self.rtf_audio),
            level: self.level,
            soft_tokens: self.soft_tokens(),
            audio_voice_only: self.audio_voice_only(),
        }
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gov() -> Governor {
        Governor::new(&GovernorConfig::default(), 1.0, true)
    }

    #[test]
    fn degrades_in_order_then_recovers() {
        let mut g = gov();
        assert_eq!((g.soft_tokens(), g.model_fps()), (280, 1.0));
        // The model answers 8 s after the media: lag 8 > 4, one step per 4 s of media.
        let mut seen = vec![(g.soft_tokens(), g.model_fps(), g.audio_voice_only())];
        let mut t = 0.0;
        while g.level() < g.max_level() {
            t += 1.0;
            g.note_input(t);
            if g.on_result(t - 8.0, 8.0, 1.0, true) {
                seen.push((g.soft_tokens(), g.model_fps(), g.audio_voice_only()));
            }
        }
        assert_eq!(
            seen,
            vec![
                (280, 1.0, false),
                (140, 1.0, false),
                (70, 1.0, false),
                (70, 0.5, false),
                (70, 0.25, true)
            ]
        );
        assert!(g.state().rtf_video > 7.0);
        // Lag falls to 0.5 s: one step back per recover_seconds (10 s) of low lag.
        let top = g.level();
        for _ in 0..25 {
            t += 1.0;
            g.note_input(t);
            g.on_result(t - 0.5, 0.5, 1.0, true);
        }
        assert_eq!(g.level(), top - 2);
    }

    #[test]
    fn a_far_too_slow_model_jumps_several_steps_at_once() {
        let mut g = gov();
        g.note_input(40.0);
        // 36 s behind with a 4 s limit: 9x = three doublings -> three steps in one go.
        assert!(g.on_result(4.0, 36.0, 1.0, true));
        assert_eq!(g.level(), 3);
        assert_eq!((g.soft_tokens(), g.model_fps()), (70, 0.5));
        g.note_input(60.0);
        assert!(g.on_result(4.0, 50.0, 1.0, true));
        assert_eq!(g.level(), g.max_level());
    }

    #[test]
    fn files_never_degrade_and_rate_gate_holds() {
        let mut g = Governor::new(&GovernorConfig::default(), 2.0, false);
        g.note_input(100.0);
        assert!(!g.on_result(0.0, 50.0, 1.0, true));
        assert_eq!(g.level(), 0);
        assert!(g.frame_due(1.0, Some(0.5)));
        assert!(!g.frame_due(1.0, Some(0.8)));
        for t in [0.0, 0.5, 1.0, 1.5, 2.0] {
            g.note_frame_sent(t);
        }
        assert!((g.effective_fps() - 2.0).abs() < 1e-9);
    }
}
