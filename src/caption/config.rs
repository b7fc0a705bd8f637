//! `[captions]`: how audio is windowed for live captions and recordings, and where subtitle
//! files go.

use serde::{Deserialize, Serialize};

/// The longest audio Gemma 4's audio tower hears in one request, seconds.
pub const MAX_WINDOW_SECONDS: f64 = 30.0;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CaptionConfig {
    /// Folder for `<source>.vtt` and `<source>.srt`; empty = no files.
    pub dir: String,
    /// Longest audio window sent to the model (Gemma 4 hears at most 30 s).
    pub max_window_seconds: f64,
    /// Audio shared by consecutive windows so words cut at an edge are heard whole.
    pub overlap_seconds: f64,
    /// Non-voice time that ends a window (a pause).
    pub pause_seconds: f64,
    /// While speech goes on, a partial caption at least this often.
    pub partial_every_seconds: f64,
    /// Recordings (`percept analyze`): the longest window of the running summary, media
    /// seconds (windows are also cut to fit `[model] context`).
    pub summary_window_seconds: f64,
}

impl Default for CaptionConfig {
    fn default() -> Self {
        CaptionConfig {
            dir: "captions".into(),
            max_window_seconds: MAX_WINDOW_SECONDS,
            overlap_seconds: 2.0,
            pause_seconds: 0.6,
            partial_every_seconds: 2.0,
            summary_window_seconds: 120.0,
        }
    }
}

impl CaptionConfig {
    /// Problems with the section, one line each.
    pub fn validate(&self, p: &mut Vec<String>) {
        if !(self.max_window_seconds > 0.0 && self.max_window_seconds <= MAX_WINDOW_SECONDS) {
            p.push(format!(
                "[captions] max_window_seconds must be in (0, 30] (the audio tower hears 30 s), got {}",
                self.max_window_seconds
            ));
        }
        if !(self.overlap_seconds >= 0.0 && self.overlap_seconds < self.max_window_seconds / 2.0) {
            p.push(
                "[captions] overlap_seconds must be >= 0 and under half of max_window_seconds"
                    .into(),
            );
        }
        if self.summary_window_seconds.is_nan() || self.summary_window_seconds <= 0.0 {
            p.push(format!(
                "[captions] summary_window_seconds must be > 0, got {}",
                self.summary_window_seconds
            ));
        }
    }
}
