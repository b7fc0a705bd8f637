//! The configuration file: one TOML file assembled from the sections each module owns (its
//! struct, defaults, `deny_unknown_fields` and checks live beside the code that uses it).
//! This file parses section by section, adds the checks that span the whole file (secrets
//! kept out of errors, no infinite or NaN numbers) and reports every problem at once so a
//! user fixes a file in one pass.
//!
//! | section | owner |
//! |---|---|
//! | `[run]` | `run/config.rs` |
//! | `[[source]]`, `[video]`, `[audio]`, `[reconnect]`, `[watchdog]` | `ingest/config.rs` |
//! | `[queues]` | `queue.rs` |
//! | `[analysis]` | `signal.rs` |
//! | `[http]` | `http/config.rs` |
//! | `[model]` | `engine/config.rs` |
//! | `[governor]`, `[tasks]`, `[alerts]` | `tasks/config.rs` |
//! | `[captions]` | `caption/config.rs` |
//! | `[mqtt]`, `[outbox]` | `sink/config.rs` |

use serde::{Deserialize, Serialize};
use std::path::Path;

pub use crate::caption::config::CaptionConfig;
pub use crate::engine::config::ModelConfig;
pub use crate::http::config::{
    HttpConfig, API_SCHEMES, DEFAULT_API_SCHEMES, DEFAULT_LISTEN, DEFAULT_MAX_FEED_CLIENTS,
    MAX_FEED_CLIENTS_LIMIT,
};
pub use crate::ingest::config::{
    AudioConfig, ReconnectConfig, SourceConfig, VideoConfig, WatchdogConfig, MAX_QUEUE_FRAMES,
    MAX_QUEUE_SECONDS,
};
pub use crate::queue::{QueueConfig, MAX_BUDGET_MIB};
pub use crate::run::config::{RunConfig, DEFAULT_FPS, MAX_DRAIN_SECONDS};
pub use crate::signal::AnalysisConfig;
pub use crate::sink::config::{MqttConfig, OutboxConfig};
pub use crate::tasks::config::{
    AlertConfig, GovernorConfig, Instructions, TaskKind, TaskPrompts, DEFAULT_PROMPTS_TOML,
};

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
    pub outbox: OutboxConfig,
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

    /// Semantic checks of every section, then of the whole file.
    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        self.run.validate(&mut p);
        self.video.validate(&mut p);
        self.audio.validate(&mut p);
        self.queues.validate(&mut p);
        self.reconnect.validate(&mut p);
        self.watchdog.validate(&mut p);
        self.analysis.validate(&mut p);
        self.http.validate(&mut p);
        self.model.validate(&mut p);
        self.governor.validate(&mut p);
        self.captions.validate(&mut p);
        self.mqtt.validate(&mut p);
        self.outbox.validate(&mut p);
        self.alerts.validate(&mut p);
        crate::ingest::config::validate_sources(&self.sources, &mut p);
        self.check_finite(&mut p);
        p
    }

    /// Infinities and NaN anywhere in the tree, one problem each: values that pass a
    /// section's range checks yet break the run (a `Duration` from `inf` panics at shutdown).
    /// The sections' upper bounds leave non-finite values to this check.
    fn check_finite(&self, p: &mut Vec<String>) {
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
    }
}

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
    fn instructions_placement_parses_and_rejects_unknown_values() {
        assert_eq!(Config::default().tasks.instructions, Instructions::System);
        let cfg = Config::parse("[tasks]\ninstructions = \"user\"\n").unwrap();
        assert_eq!(cfg.tasks.instructions, Instructions::User);
        // The other prompts keep their defaults.
        assert_eq!(cfg.tasks.describe, TaskPrompts::default().describe);
        let e = Config::parse("[tasks]\ninstructions = \"sideways\"\n")
            .unwrap_err()
            .join("\n");
        assert!(
            e.contains("instructions") && e.contains("sideways") && e.contains("system"),
            "{e}"
        );
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

    #[test]
    fn every_section_reports_its_own_problem() {
        let text = r#"
            [run]
            fps = 0
            [video]
            max_side = 1
            [audio]
            chunk_seconds = 0
            [queues]
            budget_mib = 0
            [reconnect]
            multiplier = 0.5
            [watchdog]
            stall_seconds = 0
            [analysis]
            scene_threshold = 2
            [http]
            listen = "nowhere"
            [model]
            quant = "q3"
            [governor]
            soft_tokens = 1
            [captions]
            summary_window_seconds = 0
            [mqtt]
            qos = 2
            [outbox]
            dir = ""
            [alerts]
            webhooks = ["https://h/x"]
            [[source]]
            uri = "a.mp4"
            window_frames = 0
        "#;
        let v = Config::parse(text).unwrap().validate();
        for section in [
            "[run]",
            "[video]",
            "[audio]",
            "[queues]",
            "[reconnect]",
            "[watchdog]",
            "[analysis]",
            "[http]",
            "[model]",
            "[governor]",
            "[captions]",
            "[mqtt]",
            "[outbox]",
            "[alerts]",
            "[[source]] #1",
        ] {
            assert_eq!(
                v.iter().filter(|p| p.starts_with(section)).count(),
                1,
                "{section}: {v:#?}"
            );
        }
        assert_eq!(v.len(), 15, "{v:#?}");
    }
}
