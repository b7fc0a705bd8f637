//! `[run]`: what holds for the whole run: the default sampling rate, where events go, pacing
//! of files and how long shutdown may drain.

use serde::{Deserialize, Serialize};

/// Default `[run] fps`.
pub const DEFAULT_FPS: f64 = 1.0;
/// Longest drain after SIGTERM, in seconds.
pub const MAX_DRAIN_SECONDS: f64 = 3600.0;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Frames per second sampled for analysis (per source unless overridden).
    pub fps: f64,
    /// Where events go: "-" for stdout or a file path (JSON Lines, appended line by line).
    pub events: String,
    /// Run files at their real speed instead of as fast as the worker allows.
    pub realtime: bool,
    /// Upper bound on draining queues after Ctrl-C / SIGTERM, in seconds.
    pub drain_seconds: f64,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            fps: DEFAULT_FPS,
            events: "-".into(),
            realtime: false,
            drain_seconds: 3.0,
        }
    }
}

impl RunConfig {
    /// Problems with the section, one line each (an infinite or NaN value is reported once,
    /// by the file-level check in `config.rs`).
    pub fn validate(&self, p: &mut Vec<String>) {
        if !(self.fps > 0.0 && self.fps <= crate::ingest::config::MAX_FPS) {
            p.push(format!("[run] fps must be in (0, 120], got {}", self.fps));
        }
        if self.drain_seconds.is_nan() || self.drain_seconds < 0.0 {
            p.push(format!(
                "[run] drain_seconds must be >= 0, got {}",
                self.drain_seconds
            ));
        }
        if self.drain_seconds.is_finite() && self.drain_seconds > MAX_DRAIN_SECONDS {
            p.push(format!(
                "[run] drain_seconds must be at most {MAX_DRAIN_SECONDS}, got {}",
                self.drain_seconds
            ));
        }
    }
}
