//! The configuration tree. Every section has documented defaults and rejects unknown keys;
//! `validate` reports every problem at once so a user fixes a file in one pass.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::source::RtspTransport;

pub const DEFAULT_FPS: f64 = 1.0;
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9464";

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub run: RunConfig,
    #[serde(rename = "source")]
    pub sources: Vec<SourceConfig>,
    pub video: VideoConfig,
    pub audio: AudioConfig,
    pub queues: QueueConfig,
    pub reconnect: ReconnectConfig,
    pub watchdog: WatchdogConfig,
    pub analysis: AnalysisConfig,
    pub http: HttpConfig,
}

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
}

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

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Total bytes queued across all sources' queues, in MiB.
    pub budget_mib: f64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig { budget_mib: 64.0 }
    }
}

impl QueueConfig {
    pub fn budget_bytes(&self) -> usize {
        (self.budget_mib * 1024.0 * 1024.0) as usize
    }
}

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

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AnalysisConfig {
    /// Motion score (0..1) above which a frame counts as a scene change.
    pub scene_threshold: f64,
    /// Chunk level below which audio is never voice, in dBFS.
    pub voice_min_dbfs: f64,
    /// Artificial delay per analysed item in milliseconds: for overload tests and demos.
    pub delay_ms: u64,
}

impl Default for AnalysisConfig {
    fn default() -> Self {
        AnalysisConfig {
            scene_threshold: 0.3,
            voice_min_dbfs: -50.0,
            delay_ms: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address for /metrics and /healthz; loopback unless you mean to expose it.
    pub listen: String,
    pub enabled: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: DEFAULT_LISTEN.into(),
            enabled: true,
        }
    }
}

/// Every problem found in a config file, each one line.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {} problem(s):\n  {}", problems.len(), problems.join("\n  "))]
pub struct ConfigErrors {
    pub path: String,
    pub problems: Vec<String>,
}

impl Config {
    /// Read, parse and validate a TOML file, collecting all problems.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let fail = |problems| ConfigErrors {
            path: path.display().to_string(),
            problems,
        };
        let text =
            std::fs::read_to_string(path).map_err(|e| fail(vec![format!("cannot read: {e}")]))?;
        let (cfg, mut problems) = Self::parse_collect(&text);
        problems.extend(cfg.validate());
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(fail(problems))
        }
    }

    /// Parse TOML section by section so one bad section does not hide problems in the others.
    pub fn parse(text: &str) -> Result<Config, Vec<String>> {
        let (cfg, problems) = Self::parse_collect(text);
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(problems)
        }
    }

    /// Parse what can be parsed; sections with problems keep their defaults.
    fn parse_collect(text: &str) -> (Config, Vec<String>) {
        let table: toml::Table = match text.parse() {
            Ok(t) => t,
            Err(e) => {
                let e: toml::de::Error = e;
                return (Config::default(), vec![one_line(&e.to_string())]);
            }
        };
        let mut problems = Vec::new();
        let mut cfg = Config::default();
        for (key, value) in table {
            let res = match key.as_str() {
                "run" => section(value, &mut cfg.run),
                "video" => section(value, &mut cfg.video),
                "audio" => section(value, &mut cfg.audio),
                "queues" => section(value, &mut cfg.queues),
                "reconnect" => section(value, &mut cfg.reconnect),
                "watchdog" => section(value, &mut cfg.watchdog),
                "analysis" => section(value, &mut cfg.analysis),
                "http" => section(value, &mut cfg.http),
                "source" => match value {
                    toml::Value::Array(items) => {
                        for (i, item) in items.into_iter().enumerate() {
                            match SourceConfig::deserialize(item) {
                                Ok(s) => cfg.sources.push(s),
                                Err(e) => problems.push(format!(
                                    "[[source]] #{}: {}",
                                    i + 1,
                                    one_line(&e.to_string())
                                )),
                            }
                        }
                        Ok(())
                    }
                    _ => Err("expected [[source]] entries".to_string()),
                },
                other => Err(format!("unknown section '{other}'")),
            };
            if let Err(e) = res {
                problems.push(if key == "source" || e.starts_with("unknown section") {
                    e
                } else {
                    format!("[{key}]: {e}")
                });
            }
        }
        (cfg, problems)
    }

    /// Semantic checks across the whole tree.
    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        let mut check = |ok: bool, msg: String| {
            if !ok {
                p.push(msg);
            }
        };
        check(
            self.run.fps > 0.0 && self.run.fps <= 120.0,
            format!("[run] fps must be in (0, 120], got {}", self.run.fps),
        );
        check(
            self.run.drain_seconds >= 0.0,
            format!(
                "[run] drain_seconds must be >= 0, got {}",
                self.run.drain_seconds
            ),
        );
        check(
            (16..=4096).contains(&self.video.max_side),
            format!(
                "[video] max_side must be in 16..=4096, got {}",
                self.video.max_side
            ),
        );
        check(
            self.video.queue_frames >= 1,
            "[video] queue_frames must be at least 1".into(),
        );
        check(
            self.audio.chunk_seconds >= 0.1 && self.audio.chunk_seconds <= 30.0,
            format!(
                "[audio] chunk_seconds must be in [0.1, 30], got {}",
                self.audio.chunk_seconds
            ),
        );
        check(
            self.audio.queue_seconds >= self.audio.chunk_seconds,
            format!(
                "[audio] queue_seconds ({}) must be at least chunk_seconds ({})",
                self.audio.queue_seconds, self.audio.chunk_seconds
            ),
        );
        check(
            self.queues.budget_mib >= 1.0,
            format!(
                "[queues] budget_mib must be at least 1, got {}",
                self.queues.budget_mib
            ),
        );
        let r = &self.reconnect;
        check(
            r.initial_seconds > 0.0,
            format!(
                "[reconnect] initial_seconds must be > 0, got {}",
                r.initial_seconds
            ),
        );
        check(
            r.max_seconds >= r.initial_seconds,
            format!(
                "[reconnect] max_seconds ({}) must be >= initial_seconds ({})",
                r.max_seconds, r.initial_seconds
            ),
        );
        check(
            r.multiplier >= 1.0,
            format!("[reconnect] multiplier must be >= 1, got {}", r.multiplier),
        );
        check(
            (0.0..1.0).contains(&r.jitter),
            format!("[reconnect] jitter must be in [0, 1), got {}", r.jitter),
        );
        check(
            r.connect_attempts >= 1,
            "[reconnect] connect_attempts must be at least 1".into(),
        );
        check(
            self.watchdog.stall_seconds > 0.0,
            format!(
                "[watchdog] stall_seconds must be > 0, got {}",
                self.watchdog.stall_seconds
            ),
        );
        check(
            (0.0..=1.0).contains(&self.analysis.scene_threshold),
            format!(
                "[analysis] scene_threshold must be in [0, 1], got {}",
                self.analysis.scene_threshold
            ),
        );
        check(
            self.http.listen.parse::<std::net::SocketAddr>().is_ok(),
            format!(
                "[http] listen must be an address like 127.0.0.1:9464, got '{}'",
                self.http.listen
            ),
        );
        let mut names = std::collections::HashSet::new();
        for (i, s) in self.sources.iter().enumerate() {
            let at = format!(
                "[[source]] #{} ({})",
                i + 1,
                s.name.as_deref().unwrap_or("unnamed")
            );
            match crate::source::parse(&s.uri) {
                Ok(_) => {}
                Err(e) => p.push(format!("{at}: {e}")),
            }
            if let Some(fps) = s.fps {
                if !(fps > 0.0 && fps <= 120.0) {
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
            if s.password.is_some() && s.password_env.is_some() {
                p.push(format!("{at}: give password or password_env, not both"));
            }
        }
        p
    }
}

fn section<T: serde::de::DeserializeOwned>(value: toml::Value, into: &mut T) -> Result<(), String> {
    *into = T::deserialize(value).map_err(|e| one_line(&e.to_string()))?;
    Ok(())
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert!(Config::default().validate().is_empty());
    }

    #[test]
    fn all_problems_reported_at_once() {
        let text = r#"
            [run]
            fps = 0
            [video]
            colour = "red"
            [reconnect]
            jitter = 2.0
            [bogus]
            x = 1
            [[source]]
            uri = "gopher://x"
            [[source]]
            uri = "a.mp4"
            nope = 1
        "#;
        let problems = match Config::parse(text) {
            Err(p) => p,
            Ok(cfg) => cfg.validate(),
        };
        let all = problems.join("\n");
        assert!(all.contains("[video]") && all.contains("colour"), "{all}");
        assert!(all.contains("unknown section 'bogus'"), "{all}");
        assert!(
            all.contains("[[source]] #2") && all.contains("nope"),
            "{all}"
        );
        assert_eq!(problems.len(), 3, "{all}");
        // Semantic problems come from validate once the structure parses.
        let cfg = Config::parse(
            "[run]\nfps = 0\n[reconnect]\njitter = 2.0\n[[source]]\nuri = \"gopher://x\"\n",
        )
        .unwrap();
        let v = cfg.validate().join("\n");
        assert!(v.contains("[run] fps"), "{v}");
        assert!(v.contains("[reconnect] jitter"), "{v}");
        assert!(v.contains("unsupported scheme 'gopher'"), "{v}");
    }
}
