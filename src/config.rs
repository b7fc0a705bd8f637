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
    pub model: ModelConfig,
    pub governor: GovernorConfig,
    pub tasks: TaskPrompts,
    pub captions: CaptionConfig,
    pub alerts: AlertConfig,
    pub mqtt: MqttConfig,
    pub outbox: crate::sink::outbox::OutboxConfig,
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
    pub fn from_path(path: &std::path::Path) -> SourceConfig {
        SourceConfig {
            path: Some(path.to_path_buf()),
            ..SourceConfig::from_uri(&path.display().to_string())
        }
    }
}

/// What the model does with a source.
#[derive(
    Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash, Default, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum TaskKind {
    /// Signal analysis only; the model is never asked.
    None,
    /// Answer `questions` about the scene; positive answers become alerts.
    Watch,
    /// Describe the scene per analysed frame (or window of frames).
    #[default]
    Describe,
    /// Live captions from speech.
    Caption,
    /// The latest frame and the audio window in one request.
    ListenAndLook,
    /// Transcribe a recording window by window.
    Transcribe,
    /// Transcribe, then summarize the whole recording at its end.
    Summarize,
}

impl TaskKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::None => "none",
            TaskKind::Watch => "watch",
            TaskKind::Describe => "describe",
            TaskKind::Caption => "caption",
            TaskKind::ListenAndLook => "listen-and-look",
            TaskKind::Transcribe => "transcribe",
            TaskKind::Summarize => "summarize",
        }
    }

    pub fn uses_video(self) -> bool {
        matches!(
            self,
            TaskKind::Watch | TaskKind::Describe | TaskKind::ListenAndLook
        )
    }
}

/// The model shared by every source.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Hub id or local folder (Hugging Face layout).
    pub id: String,
    /// false: signal analysis only, the model is never loaded.
    pub enabled: bool,
    /// f32 | f16 | bf16 | q8_0 | q4k
    pub quant: String,
    /// none | projections: keep the image/audio projections and the token table (tied
    /// lm_head) at f16 while the decoder linears take `quant` (`--keep-f16`).
    pub keep_f16: crate::model::layers::KeepF16,
    /// Token budget per answer.
    pub max_tokens: usize,
    /// Longest prompt + answer per request, in tokens.
    pub context: usize,
    /// Prompt rows per request per prefill forward.
    pub prefill_chunk: usize,
    /// Most requests in one batched step (across sources).
    pub max_batch: usize,
    /// Artificial delay per batched step in milliseconds: for governor tests and demos.
    pub delay_ms: u64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            id: "google/gemma-4-E2B-it".into(),
            enabled: true,
            quant: "q8_0".into(),
            keep_f16: crate::model::layers::KeepF16::None,
            max_tokens: 96,
            context: 4096,
            prefill_chunk: 512,
            max_batch: 4,
            delay_ms: 0,
        }
    }
}

/// The real-time governor: how far the model may fall behind and how it degrades.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GovernorConfig {
    /// Lag (media seconds between the newest input and the newest result) that triggers a
    /// degradation step.
    pub max_lag_seconds: f64,
    /// Lag below which, held for `recover_seconds`, quality steps back up.
    pub recover_lag_seconds: f64,
    pub recover_seconds: f64,
    /// Image soft-token budget at full quality (280, 140 or 70 below it).
    pub soft_tokens: u32,
    /// A frame reaches the model at least this often even when nothing moves.
    pub heartbeat_seconds: f64,
    /// Audio chunk level (dBFS) that counts as a loud event and triggers a visual look.
    pub loud_dbfs: f64,
}

impl Default for GovernorConfig {
    fn default() -> Self {
        GovernorConfig {
            max_lag_seconds: 4.0,
            recover_lag_seconds: 1.5,
            recover_seconds: 10.0,
            soft_tokens: 280,
            heartbeat_seconds: 10.0,
            loud_dbfs: -12.0,
        }
    }
}

/// Default prompts per task; `config/prompts.toml` is the compiled-in default.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TaskPrompts {
    pub describe: String,
    pub describe_video: String,
    pub watch: String,
    pub caption: String,
    pub listen_and_look: String,
    pub transcribe: String,
    pub summarize: String,
}

pub const DEFAULT_PROMPTS_TOML: &str = include_str!("../config/prompts.toml");

impl Default for TaskPrompts {
    fn default() -> Self {
        #[derive(Deserialize)]
        struct File {
            tasks: TaskPromptsRaw,
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct TaskPromptsRaw {
            describe: String,
            describe_video: String,
            watch: String,
            caption: String,
            listen_and_look: String,
            transcribe: String,
            summarize: String,
        }
        // The file is compiled in and checked by a unit test; an empty prompt is the
        // fallback that test would catch.
        let t = toml::from_str::<File>(DEFAULT_PROMPTS_TOML)
            .map(|f| f.tasks)
            .unwrap_or(TaskPromptsRaw {
                describe: String::new(),
                describe_video: String::new(),
                watch: String::new(),
                caption: String::new(),
                listen_and_look: String::new(),
                transcribe: String::new(),
                summarize: String::new(),
            });
        TaskPrompts {
            describe: t.describe,
            describe_video: t.describe_video,
            watch: t.watch,
            caption: t.caption,
            listen_and_look: t.listen_and_look,
            transcribe: t.transcribe,
            summarize: t.summarize,
        }
    }
}

/// Live captions: how audio is windowed and where subtitle files go.
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
            max_window_seconds: 30.0,
            overlap_seconds: 2.0,
            pause_seconds: 0.6,
            partial_every_seconds: 2.0,
            summary_window_seconds: 120.0,
        }
    }
}

/// Alerts from `watch` answers.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AlertConfig {
    /// Folder for JPEG snapshots of alerting frames; empty = no snapshots.
    pub snapshot_dir: String,
    /// URLs that receive each alert as a JSON POST.
    pub webhooks: Vec<String>,
    /// Attempts per webhook delivery (with backoff) before it is reported as an error.
    pub webhook_attempts: u32,
    /// Smallest confidence that makes a "yes" an alert.
    pub min_confidence: f64,
}

impl Default for AlertConfig {
    fn default() -> Self {
        AlertConfig {
            snapshot_dir: "snapshots".into(),
            webhooks: Vec::new(),
            webhook_attempts: 3,
            min_confidence: 0.5,
        }
    }
}

/// Publishing events to an MQTT broker as `<topic_prefix>/<source>/<kind>`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    pub enabled: bool,
    pub host: String,
    pub port: u16,
    pub topic_prefix: String,
    pub client_id: String,
    /// 0 (at most once) or 1 (at least once).
    pub qos: u8,
    pub user: Option<String>,
    /// Name of an environment variable that holds the broker password.
    pub password_env: Option<String>,
    /// Event kinds published; empty = all.
    pub kinds: Vec<String>,
    /// Publish Home Assistant discovery configs and entity states (see README).
    pub homeassistant: bool,
    /// Home Assistant's discovery prefix.
    pub discovery_prefix: String,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            enabled: false,
            host: "127.0.0.1".into(),
            port: 1883,
            topic_prefix: "percept".into(),
            client_id: "percept".into(),
            qos: 1,
            user: None,
            password_env: None,
            kinds: Vec::new(),
            homeassistant: false,
            discovery_prefix: "homeassistant".into(),
        }
    }
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

/// The HTTP server and who may use it (README "Security").
#[derive(Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address for the page, feeds, control API, /metrics and /healthz; loopback unless you
    /// mean to expose it (then `token` is required).
    pub listen: String,
    pub enabled: bool,
    /// Bearer token every route but `/healthz` requires; the environment variable
    /// `PERCEPT_HTTP_TOKEN` wins over it. Unset: no authentication (loopback only).
    pub token: Option<String>,
    /// `Host` values served besides loopback names of the listen port: `name` (any port),
    /// `name:port`, or `*` for any (behind a reverse proxy that checks it).
    pub allowed_hosts: Vec<String>,
    /// Browser origins (`scheme://host[:port]`) allowed besides the server's own on feeds,
    /// WebSocket upgrades and state-changing routes.
    pub allowed_origins: Vec<String>,
    /// URI schemes a source added over HTTP may use: rtsp, rtsps, http, https, file, v4l2,
    /// pulse, alsa, test.
    pub api_schemes: Vec<String>,
    /// Live feed clients (SSE and WebSocket together) served at once; more get 503.
    pub max_feed_clients: usize,
}

impl std::fmt::Debug for HttpConfig {
    // The token never reaches a log through `{:?}` of the config.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field("listen", &self.listen)
            .field("enabled", &self.enabled)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("allowed_hosts", &self.allowed_hosts)
            .field("allowed_origins", &self.allowed_origins)
            .field("api_schemes", &self.api_schemes)
            .field("max_feed_clients", &self.max_feed_clients)
            .finish()
    }
}

/// Schemes `[http] api_schemes` may name.
pub const API_SCHEMES: &[&str] = &[
    "rtsp", "rtsps", "http", "https", "file", "v4l2", "pulse", "alsa", "test",
];
/// Network streams only: local files and devices stay closed to the API unless listed.
pub const DEFAULT_API_SCHEMES: &[&str] = &["rtsp", "rtsps", "http", "https"];
/// Each feed client costs a small OS thread and a 256-event subscription.
pub const DEFAULT_MAX_FEED_CLIENTS: usize = 64;
pub const MAX_FEED_CLIENTS_LIMIT: usize = 4096;

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: DEFAULT_LISTEN.into(),
            enabled: true,
            token: None,
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
            api_schemes: DEFAULT_API_SCHEMES.iter().map(|s| s.to_string()).collect(),
            max_feed_clients: DEFAULT_MAX_FEED_CLIENTS,
        }
    }
}

impl HttpConfig {
    /// The token in force: `PERCEPT_HTTP_TOKEN` when set and not empty, else `[http] token`.
    pub fn effective_token(&self) -> Option<String> {
        std::env::var("PERCEPT_HTTP_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .or_else(|| self.token.clone())
    }

    fn validate(&self, p: &mut Vec<String>) {
        if let Some(t) = &self.token {
            if t.trim().is_empty() {
                p.push("[http] token must not be empty (remove it to run without one)".into());
            } else if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
                p.push("[http] token must not contain spaces or control characters".into());
            }
        }
        for s in &self.api_schemes {
            if !API_SCHEMES.contains(&s.as_str()) {
                p.push(format!(
                    "[http] api_schemes: unknown scheme '{s}' (known: {})",
                    API_SCHEMES.join(", ")
                ));
            }
        }
        for o in &self.allowed_origins {
            let ok = o == "*"
                || url::Url::parse(o)
                    .ok()
                    .filter(|u| u.host_str().is_some())
                    .is_some_and(|u| u.origin().ascii_serialization() == o.trim_end_matches('/'));
            if !ok {
                p.push(format!(
                    "[http] allowed_origins: '{o}' is not an origin like https://example.com or http://host:8080"
                ));
            }
        }
        for h in &self.allowed_hosts {
            if h.is_empty() || h.contains(['/', ' ', '@']) {
                p.push(format!(
                    "[http] allowed_hosts: '{h}' is not a host like example.com or example.com:9464"
                ));
            }
        }
        if !(1..=MAX_FEED_CLIENTS_LIMIT).contains(&self.max_feed_clients) {
            p.push(format!(
                "[http] max_feed_clients must be in 1..={MAX_FEED_CLIENTS_LIMIT}, got {}",
                self.max_feed_clients
            ));
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
            Err(e) => return (Config::default(), vec![syntax_error(text, &e)]),
        };
        let secrets = secret_values(&toml::Value::Table(table.clone()));
        let (cfg, problems) = Self::parse_table(table);
        // A value of the wrong type is quoted by serde ("invalid type: integer `123`"): a
        // password or token must not reach a terminal, a log or a reload's error body.
        let problems = problems
            .into_iter()
            .map(|mut msg| {
                for s in &secrets {
                    msg = msg.replace(s.as_str(), "***");
                }
                msg
            })
            .collect();
        (cfg, problems)
    }

    fn parse_table(table: toml::Table) -> (Config, Vec<String>) {
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
                "model" => section(value, &mut cfg.model),
                "governor" => section(value, &mut cfg.governor),
                "tasks" => section(value, &mut cfg.tasks),
                "captions" => section(value, &mut cfg.captions),
                "alerts" => section(value, &mut cfg.alerts),
                "mqtt" => section(value, &mut cfg.mqtt),
                "outbox" => section(value, &mut cfg.outbox),
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
        check(
            ["f32", "f16", "bf16", "q8_0", "q4k"].contains(&self.model.quant.as_str()),
            format!(
                "[model] quant must be f32, f16, bf16, q8_0 or q4k, got '{}'",
                self.model.quant
            ),
        );
        check(
            self.model.max_batch >= 1 && self.model.max_tokens >= 1,
            "[model] max_batch and max_tokens must be at least 1".into(),
        );
        check(
            [70, 140, 280, 560, 1120].contains(&self.governor.soft_tokens),
            format!(
                "[governor] soft_tokens must be 70, 140, 280, 560 or 1120, got {}",
                self.governor.soft_tokens
            ),
        );
        check(
            self.governor.max_lag_seconds > self.governor.recover_lag_seconds
                && self.governor.recover_lag_seconds >= 0.0,
            "[governor] need max_lag_seconds > recover_lag_seconds >= 0".into(),
        );
        let c = &self.captions;
        check(
            c.max_window_seconds > 0.0 && c.max_window_seconds <= 30.0,
            format!(
                "[captions] max_window_seconds must be in (0, 30] (the audio tower hears 30 s), got {}",
                c.max_window_seconds
            ),
        );
        check(
            c.overlap_seconds >= 0.0 && c.overlap_seconds < c.max_window_seconds / 2.0,
            "[captions] overlap_seconds must be >= 0 and under half of max_window_seconds".into(),
        );
        check(
            c.summary_window_seconds > 0.0,
            format!(
                "[captions] summary_window_seconds must be > 0, got {}",
                c.summary_window_seconds
            ),
        );
        check(
            self.mqtt.qos <= 1,
            format!("[mqtt] qos must be 0 or 1, got {}", self.mqtt.qos),
        );
        for problem in self.outbox.problems() {
            check(false, problem);
        }
        for w in &self.alerts.webhooks {
            // Spoken directly over plain HTTP (no TLS stack in percept): https receivers go
            // behind a TLS-terminating proxy.
            check(
                w.starts_with("http://"),
                format!(
                    "[alerts] webhook '{}' must be an http:// URL (put https receivers behind a local TLS proxy)",
                    crate::tasks::webhook::redact(w)
                ),
            );
        }
        let mut names = std::collections::HashSet::new();
        for (i, s) in self.sources.iter().enumerate() {
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
            if !(1..=32).contains(&s.window_frames) {
                p.push(format!(
                    "{at}: window_frames must be in 1..=32, got {}",
                    s.window_frames
                ));
            }
            if s.task == TaskKind::Watch && s.questions.is_empty() {
                p.push(format!("{at}: task 'watch' needs at least one question"));
            }
            if s.password.is_some() && s.password_env.is_some() {
                p.push(format!("{at}: give password or password_env, not both"));
            }
        }
        self.http.validate(&mut p);
        self.check_bounds(&mut p);
        p
    }

    /// Values that pass the range checks above yet break the run: infinities and NaN (a
    /// `Duration` from `inf` panics at shutdown) and queue sizes whose up-front allocation
    /// aborts the process.
    fn check_bounds(&self, p: &mut Vec<String>) {
        if let Ok(toml::Value::Table(t)) = toml::Value::try_from(self) {
            for (section, v) in &t {
                if section == "source" {
                    if let toml::Value::Array(items) = v {
                        for (i, item) in items.iter().enumerate() {
                            non_finite(&format!("[[source]] #{}", i + 1), "", item, p);
                        }
                    }
                } else {
                    non_finite(&format!("[{section}]"), "", v, p);
                }
            }
        }
        // Non-finite values were reported just above, once.
        let mut check = |ok: bool, msg: String| {
            if !ok {
                p.push(msg);
            }
        };
        check(
            !self.run.drain_seconds.is_finite() || self.run.drain_seconds <= MAX_DRAIN_SECONDS,
            format!(
                "[run] drain_seconds must be at most {MAX_DRAIN_SECONDS}, got {}",
                self.run.drain_seconds
            ),
        );
        check(
            self.video.queue_frames <= MAX_QUEUE_FRAMES,
            format!(
                "[video] queue_frames must be at most {MAX_QUEUE_FRAMES}, got {}",
                self.video.queue_frames
            ),
        );
        check(
            !self.audio.queue_seconds.is_finite() || self.audio.queue_seconds <= MAX_QUEUE_SECONDS,
            format!(
                "[audio] queue_seconds must be at most {MAX_QUEUE_SECONDS}, got {}",
                self.audio.queue_seconds
            ),
        );
        check(
            !self.queues.budget_mib.is_finite() || self.queues.budget_mib <= MAX_BUDGET_MIB,
            format!(
                "[queues] budget_mib must be at most {MAX_BUDGET_MIB}, got {}",
                self.queues.budget_mib
            ),
        );
    }
}

/// Longest drain after SIGTERM, in seconds.
pub const MAX_DRAIN_SECONDS: f64 = 3600.0;
/// Most frames a video queue holds (its slots are allocated at start).
pub const MAX_QUEUE_FRAMES: usize = 1024;
/// Most seconds of audio an audio queue holds (its slots are allocated at start).
pub const MAX_QUEUE_SECONDS: f64 = 600.0;
/// Largest byte budget for all queues together, in MiB (1 TiB).
pub const MAX_BUDGET_MIB: f64 = 1024.0 * 1024.0;

/// Every float under `v` that is infinite or NaN, named by its section and key.
fn non_finite(section: &str, key: &str, v: &toml::Value, p: &mut Vec<String>) {
    match v {
        toml::Value::Float(x) if !x.is_finite() => {
            p.push(format!("{section} {key} must be a finite number, got {x}"));
        }
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if key.is_empty() {
                    k.clone()
                } else {
                    format!("{key}.{k}")
                };
                non_finite(section, &key, v, p);
            }
        }
        toml::Value::Array(a) => {
            for v in a {
                non_finite(section, key, v, p);
            }
        }
        _ => {}
    }
}

fn section<T: serde::de::DeserializeOwned>(value: toml::Value, into: &mut T) -> Result<(), String> {
    *into = T::deserialize(value).map_err(|e| one_line(&e.to_string()))?;
    Ok(())
}

/// A TOML syntax error as one line with its position but without the quoted source line: the
/// line may be `password = "...`.
fn syntax_error(text: &str, e: &toml::de::Error) -> String {
    let msg = one_line(e.message());
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("TOML syntax error at line {line}, column {column}: {msg}")
        }
        None => format!("TOML syntax error: {msg}"),
    }
}

/// Values of secret-looking keys (`password`, `token`, `secret`) anywhere in the tree, as
/// they could appear in an error message; short ones are left (they would blank out words).
fn secret_values(v: &toml::Value) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(v: &toml::Value, out: &mut Vec<String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let k = k.to_ascii_lowercase();
                    // `password_env` names a variable; its value is not the secret.
                    if !k.ends_with("_env")
                        && ["password", "token", "secret"]
                            .iter()
                            .any(|s| k.contains(s))
                    {
                        let text = match v {
                            toml::Value::String(s) => s.clone(),
                            toml::Value::Table(_) | toml::Value::Array(_) => {
                                walk(v, out);
                                continue;
                            }
                            other => other.to_string(),
                        };
                        if text.chars().count() >= 3 {
                            out.push(text);
                        }
                    } else {
                        walk(v, out);
                    }
                }
            }
            toml::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(v, &mut out);
    out
}

/// Collapses an error message (TOML errors span lines) into one line.
pub(crate) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert!(Config::default().validate().is_empty());
        let p = TaskPrompts::default();
        for text in [
            &p.describe,
            &p.describe_video,
            &p.watch,
            &p.caption,
            &p.listen_and_look,
            &p.transcribe,
            &p.summarize,
        ] {
            assert!(!text.trim().is_empty(), "config/prompts.toml lost a prompt");
        }
        assert!(p.watch.contains("{questions}"));
    }

    #[test]
    fn non_finite_numbers_are_one_problem_each() {
        let cfg =
            Config::parse("[run]\ndrain_seconds = inf\n[audio]\nqueue_seconds = inf\n").unwrap();
        let v = cfg.validate();
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(
            v.iter()
                .any(|p| p == "[run] drain_seconds must be a finite number, got inf"),
            "{v:?}"
        );
        let cfg = Config::parse("[[source]]\nuri = \"a.mp4\"\nfps = nan\n").unwrap();
        let v = cfg.validate().join("\n");
        assert!(
            v.contains("[[source]] #1 fps must be a finite number"),
            "{v}"
        );
    }

    #[test]
    fn syntax_and_type_errors_never_quote_secrets() {
        let p = Config::parse("[http]\nlisten = \"127.0.0.1:1\"\ntoken = \"abc-secret-123\n")
            .unwrap_err()
            .join("\n");
        assert!(p.starts_with("TOML syntax error at line 3"), "{p}");
        assert!(!p.contains("secret-123"), "{p}");
        let p = Config::parse("[[source]]\nuri = \"rtsp://h/x\"\npassword = 13572468\n")
            .unwrap_err()
            .join("\n");
        assert!(
            p.contains("[[source]] #1") && !p.contains("13572468"),
            "{p}"
        );
        let p = Config::parse("[http]\ntoken = 97531\n")
            .unwrap_err()
            .join("\n");
        assert!(p.contains("[http]") && !p.contains("97531"), "{p}");
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
