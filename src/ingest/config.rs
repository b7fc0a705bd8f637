//! The ingest sections: each `[[source]]` entry, `[video]` and `[audio]` (what the graphs
//! hand the worker and how much their queues hold), `[reconnect]` and `[watchdog]` (how a
//! source's supervisor retries and when it declares a stall).

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::source::RtspTransport;
use crate::tasks::config::TaskKind;

/// Most frames a video queue holds (its slots are allocated at start).
pub const MAX_QUEUE_FRAMES: usize = 1024;
/// Most seconds of audio an audio queue holds (its slots are allocated at start).
pub const MAX_QUEUE_SECONDS: f64 = 600.0;
/// Highest sampling rate, frames per second (`[run] fps` and a source's `fps`).
pub const MAX_FPS: f64 = 120.0;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Short name used in events and metric labels.
    pub name: Option<String>,
    /// Path, file://, rtsp://, http(s)://, v4l2://, pulse://, alsa:// or test:.
    pub uri: String,
    /// Overrides `run.fps` for this source.
    pub fps: Option<f64>,
    /// RTSP transport; overrides `?transport=` in the URI.
    pub transport: Option<RtspTransport>,
    /// A custom GStreamer graph template for this source (see pipelines/README.md).
    pub template: Option<PathBuf>,
    /// RTSP credentials kept out of the URI (they override userinfo in the URI).
    pub user: Option<String>,
    /// Prefer an environment variable: `password_env`.
    pub password: Option<String>,
    /// Name of an environment variable that holds the RTSP password.
    pub password_env: Option<String>,
    /// What the model does with this source (default `describe`; `none` = signals only).
    #[serde(default)]
    pub task: TaskKind,
    /// `watch` questions about the scene, each answered per analysed frame.
    #[serde(default)]
    pub questions: Vec<String>,
    /// Replaces the task's default prompt for this source.
    #[serde(default)]
    pub prompt: Option<String>,
    /// `describe`: frames per request. 1 describes each frame; more sends a window of
    /// frames as video (`mm:ss`-stamped, 70 soft tokens each).
    #[serde(default = "one")]
    pub window_frames: u32,
    /// A recording given as a path (`percept analyze`): opened as that file whatever its
    /// name looks like (`take=1.wav` is not `name=URI`); `uri` then only names it in logs.
    #[serde(skip)]
    pub path: Option<PathBuf>,
}

fn one() -> u32 {
    1
}

impl SourceConfig {
    /// A source given only by URI (a `--source` flag), with default settings.
    pub fn from_uri(uri: &str) -> SourceConfig {
        SourceConfig {
            name: None,
            uri: uri.to_string(),
            fps: None,
            transport: None,
            template: None,
            user: None,
            password: None,
            password_env: None,
            task: TaskKind::default(),
            questions: Vec::new(),
            prompt: None,
            window_frames: 1,
            path: None,
        }
    }

    /// A recording file, kept as a path (see [`SourceConfig::path`]).
    pub fn from_path(path: &Path) -> SourceConfig {
        SourceConfig {
            path: Some(path.to_path_buf()),
            ..SourceConfig::from_uri(&path.display().to_string())
        }
    }
}

/// Problems with the `[[source]]` entries, each named by its place in the file and its name;
/// names must be unique across entries.
pub fn validate_sources(sources: &[SourceConfig], p: &mut Vec<String>) {
    let mut names = std::collections::HashSet::new();
    for (i, s) in sources.iter().enumerate() {
        let at = format!(
            "[[source]] #{} ({})",
            i + 1,
            s.name.as_deref().unwrap_or("unnamed")
        );
        if s.path.is_none() {
            if let Err(e) = crate::source::parse(&s.uri) {
                p.push(format!("{at}: {e}"));
            }
        }
        if let Some(fps) = s.fps {
            if !(fps > 0.0 && fps <= MAX_FPS) {
                p.push(format!("{at}: fps must be in (0, 120], got {fps}"));
            }
        }
        if let Some(n) = &s.name {
            if !names.insert(n.clone()) {
                p.push(format!("{at}: duplicate source name '{n}'"));
            }
            if n.is_empty()
                || !n
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                p.push(format!(
                    "{at}: name may use only letters, digits, '_' and '-'"
                ));
            }
        }
        if let Some(t) = &s.template {
            if !t.is_file() {
                p.push(format!("{at}: template {} does not exist", t.display()));
            }
        }
        crate::tasks::config::validate_source_task(&at, s.task, &s.questions, s.window_frames, p);
        if s.password.is_some() && s.password_env.is_some() {
            p.push(format!("{at}: give password or password_env, not both"));
        }
    }
}

/// `[video]`: the frames each graph's video branch hands the worker.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct VideoConfig {
    /// Longest side of frames handed to the worker, in pixels (aspect ratio kept).
    pub max_side: u32,
    /// Decode only keyframes when the stream's keyframe interval allows the target fps.
    pub keyframe_only: bool,
    /// Frames a video queue holds before its when-full policy applies.
    pub queue_frames: usize,
    /// Threads per software decoder; 0 = one per core. One thread costs the least CPU per
    /// frame (frame threading adds ~7-10% here), which matters with many cameras.
    pub decoder_threads: u32,
}

impl Default for VideoConfig {
    fn default() -> Self {
        VideoConfig {
            max_side: 768,
            keyframe_only: true,
            queue_frames: 4,
            decoder_threads: 1,
        }
    }
}

impl VideoConfig {
    /// Problems with the section, one line each.
    pub fn validate(&self, p: &mut Vec<String>) {
        if !(16..=4096).contains(&self.max_side) {
            p.push(format!(
                "[video] max_side must be in 16..=4096, got {}",
                self.max_side
            ));
        }
        if self.queue_frames == 0 {
            p.push("[video] queue_frames must be at least 1".into());
        }
        if self.queue_frames > MAX_QUEUE_FRAMES {
            p.push(format!(
                "[video] queue_frames must be at most {MAX_QUEUE_FRAMES}, got {}",
                self.queue_frames
            ));
        }
    }
}

/// `[audio]`: the chunks each graph's audio branch hands the worker.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AudioConfig {
    /// Length of one audio chunk in seconds (16 kHz mono f32).
    pub chunk_seconds: f64,
    /// Seconds of audio a queue holds before its when-full policy applies.
    pub queue_seconds: f64,
}

impl Default for AudioConfig {
    fn default() -> Self {
        AudioConfig {
            chunk_seconds: 1.0,
            queue_seconds: 10.0,
        }
    }
}

impl AudioConfig {
    /// Problems with the section, one line each (an infinite or NaN value is reported once,
    /// by the file-level check in `config.rs`).
    pub fn validate(&self, p: &mut Vec<String>) {
        if !(self.chunk_seconds >= 0.1 && self.chunk_seconds <= 30.0) {
            p.push(format!(
                "[audio] chunk_seconds must be in [0.1, 30], got {}",
                self.chunk_seconds
            ));
        }
        // Written as "not at least" so that NaN on either side is a problem too.
        let at_least = self.queue_seconds >= self.chunk_seconds;
        if !at_least {
            p.push(format!(
                "[audio] queue_seconds ({}) must be at least chunk_seconds ({})",
                self.queue_seconds, self.chunk_seconds
            ));
        }
        if self.queue_seconds.is_finite() && self.queue_seconds > MAX_QUEUE_SECONDS {
            p.push(format!(
                "[audio] queue_seconds must be at most {MAX_QUEUE_SECONDS}, got {}",
                self.queue_seconds
            ));
        }
    }
}

/// `[reconnect]`: how a source's supervisor retries a failed connection.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ReconnectConfig {
    /// First retry delay in seconds; doubles (times `multiplier`) on each failure.
    pub initial_seconds: f64,
    /// Cap on the retry delay.
    pub max_seconds: f64,
    pub multiplier: f64,
    /// Random spread of each delay, as a fraction (0.2 = +/-20%).
    pub jitter: f64,
    /// Attempts for the very first connection before the source is declared failed.
    pub connect_attempts: u32,
    /// Reconnect attempts in a row after the source has run once; 0 = forever.
    pub max_attempts: u32,
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        ReconnectConfig {
            initial_seconds: 0.5,
            max_seconds: 30.0,
            multiplier: 2.0,
            jitter: 0.2,
            connect_attempts: 5,
            max_attempts: 0,
        }
    }
}

impl ReconnectConfig {
    /// Problems with the section, one line each.
    pub fn validate(&self, p: &mut Vec<String>) {
        if self.initial_seconds.is_nan() || self.initial_seconds <= 0.0 {
            p.push(format!(
                "[reconnect] initial_seconds must be > 0, got {}",
                self.initial_seconds
            ));
        }
        let at_least = self.max_seconds >= self.initial_seconds;
        if !at_least {
            p.push(format!(
                "[reconnect] max_seconds ({}) must be >= initial_seconds ({})",
                self.max_seconds, self.initial_seconds
            ));
        }
        if self.multiplier.is_nan() || self.multiplier < 1.0 {
            p.push(format!(
                "[reconnect] multiplier must be >= 1, got {}",
                self.multiplier
            ));
        }
        if !(0.0..1.0).contains(&self.jitter) {
            p.push(format!(
                "[reconnect] jitter must be in [0, 1), got {}",
                self.jitter
            ));
        }
        if self.connect_attempts == 0 {
            p.push("[reconnect] connect_attempts must be at least 1".into());
        }
    }
}

/// `[watchdog]`: when a running source counts as stalled.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WatchdogConfig {
    /// A running source with no buffer for this long is treated as stalled and restarted.
    pub stall_seconds: f64,
}

impl Default for WatchdogConfig {
    fn default() -> Self {
        WatchdogConfig { stall_seconds: 5.0 }
    }
}

impl WatchdogConfig {
    /// Problems with the section, one line each.
    pub fn validate(&self, p: &mut Vec<String>) {
        if self.stall_seconds.is_nan() || self.stall_seconds <= 0.0 {
            p.push(format!(
                "[watchdog] stall_seconds must be > 0, got {}",
                self.stall_seconds
            ));
        }
    }
}
