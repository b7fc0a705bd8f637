//! The task sections: `[tasks]` (default prompts), `[governor]` (how far the model may fall
//! behind) and `[alerts]` (what a `watch` "yes" becomes), and what a `[[source]]` entry asks
//! of the model (`task`, `questions`, `window_frames`).

use serde::{Deserialize, Serialize};

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

/// Most frames one `describe` request may carry (`window_frames`).
pub const MAX_WINDOW_FRAMES: u32 = 32;

/// Problems with what one `[[source]]` entry asks of the model, each prefixed with `at`
/// (the entry's place in the file).
pub fn validate_source_task(
    at: &str,
    task: TaskKind,
    questions: &[String],
    window_frames: u32,
    p: &mut Vec<String>,
) {
    if !(1..=MAX_WINDOW_FRAMES).contains(&window_frames) {
        p.push(format!(
            "{at}: window_frames must be in 1..={MAX_WINDOW_FRAMES}, got {window_frames}"
        ));
    }
    if task == TaskKind::Watch && questions.is_empty() {
        p.push(format!("{at}: task 'watch' needs at least one question"));
    }
}

/// `[governor]`: the real-time governor, how far the model may fall behind and how it
/// degrades.
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

impl GovernorConfig {
    /// Problems with the section, one line each.
    pub fn validate(&self, p: &mut Vec<String>) {
        if ![70, 140, 280, 560, 1120].contains(&self.soft_tokens) {
            p.push(format!(
                "[governor] soft_tokens must be 70, 140, 280, 560 or 1120, got {}",
                self.soft_tokens
            ));
        }
        if !(self.max_lag_seconds > self.recover_lag_seconds && self.recover_lag_seconds >= 0.0) {
            p.push("[governor] need max_lag_seconds > recover_lag_seconds >= 0".into());
        }
    }
}

/// Where a task's prompt goes in a request that carries media (`[tasks] instructions`).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Instructions {
    /// In a system turn before the user turn: the instructions (and a `watch` source's
    /// questions) then come before the first media placeholder, so every request of a source
    /// shares them as a prompt prefix whose K/V is computed once (`model::prefix`); the user
    /// turn holds the media alone, which the model card asks to come first in a turn anyway.
    #[default]
    System,
    /// After the media in the user turn (percept before 2026-12): every request prefills
    /// its instructions again, since their K/V depends on the media before them.
    User,
}

/// `[tasks]`: default prompts per task; `config/prompts.toml` is the compiled-in default.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TaskPrompts {
    /// `system` | `user`: see [`Instructions`]. Requests without media (a `summarize`
    /// window) keep the prompt in the user turn either way.
    pub instructions: Instructions,
    pub describe: String,
    pub describe_video: String,
    pub watch: String,
    pub caption: String,
    pub listen_and_look: String,
    pub transcribe: String,
    pub summarize: String,
}

pub const DEFAULT_PROMPTS_TOML: &str = include_str!("../../config/prompts.toml");

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
            instructions: Instructions::default(),
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

/// `[alerts]`: alerts from `watch` answers.
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

impl AlertConfig {
    /// Problems with the section, one line each (webhook URLs redacted).
    pub fn validate(&self, p: &mut Vec<String>) {
        for w in &self.webhooks {
            // Spoken directly over plain HTTP (no TLS stack in percept): https receivers go
            // behind a TLS-terminating proxy.
            if !w.starts_with("http://") {
                p.push(format!(
                    "[alerts] webhook '{}' must be an http:// URL (put https receivers behind a local TLS proxy)",
                    super::webhook::redact(w)
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_task_problems_name_the_entry() {
        let mut p = Vec::new();
        validate_source_task("[[source]] #2 (door)", TaskKind::Watch, &[], 33, &mut p);
        assert_eq!(
            p,
            [
                "[[source]] #2 (door): window_frames must be in 1..=32, got 33",
                "[[source]] #2 (door): task 'watch' needs at least one question",
            ]
        );
        p.clear();
        validate_source_task("x", TaskKind::Watch, &["a person?".into()], 32, &mut p);
        assert!(p.is_empty(), "{p:?}");
    }
}
