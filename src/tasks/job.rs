//! What goes to the model and what comes back: a [`Job`] with its [`JobClass`] (how it
//! waits in the dispatch), the [`Answer`], and why a job did not run ([`SkipReason`]).

use std::sync::Arc;
use std::time::Instant;

use crate::config::TaskKind;
use crate::ingest::{VideoFrame, AUDIO_RATE};

/// How a job waits for the model (see [`dispatch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobClass {
    Frame,
    PartialAudio,
    FinalAudio,
    Text,
}

/// Why media or a job did not reach the model: the `reason` label of
/// `model_skipped_total`, and the words in brackets of a `speech not transcribed` gap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// The governor's frame rate for the model was not due yet.
    Rate,
    /// Nothing moved, no heartbeat was due and no loud sound asked for a look.
    NoMotion,
    /// A newer job of the same slot replaced it (live sources: freshest wins).
    Superseded,
    /// Final caption windows piled up behind the model; the oldest went.
    ModelBehind,
    /// A live source's job while the model was still loading.
    ModelLoading,
    /// `[model] enabled = false`.
    ModelDisabled,
    /// The model could not be loaded.
    ModelUnavailable,
    /// Shutting down (or the drain deadline passed).
    Shutdown,
    /// The source was removed at runtime.
    SourceRemoved,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::Rate => "rate",
            SkipReason::NoMotion => "no_motion",
            SkipReason::Superseded => "superseded",
            SkipReason::ModelBehind => "model_behind",
            SkipReason::ModelLoading => "model_loading",
            SkipReason::ModelDisabled => "model_disabled",
            SkipReason::ModelUnavailable => "model_unavailable",
            SkipReason::Shutdown => "shutdown",
            SkipReason::SourceRemoved => "source_removed",
        }
    }

    /// The model cannot answer at all: no gap per skipped window (the `model` status and
    /// `percept_model_unavailable` say it once).
    pub(super) fn model_absent(self) -> bool {
        matches!(
            self,
            SkipReason::ModelDisabled | SkipReason::ModelUnavailable
        )
    }
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One request for the model, in media terms.
#[derive(Debug, Clone)]
pub struct Job {
    pub source: String,
    pub task: TaskKind,
    pub class: JobClass,
    /// Media span the answer is about.
    pub t: f64,
    pub end: f64,
    pub frame: Option<Arc<VideoFrame>>,
    /// A window of frames sent as video (describe with `window_frames` > 1).
    pub video: Vec<Arc<VideoFrame>>,
    pub audio: Option<Arc<Vec<f32>>>,
    /// The task's text of the prompt (instructions, questions).
    pub prompt: String,
    /// Where [`Job::prompt`] goes when the request carries media.
    pub instructions: crate::config::Instructions,
    pub soft_tokens: usize,
    pub max_tokens: usize,
    /// 0 for the first try; `watch` retries once.
    pub attempt: u8,
    /// A caption window cut at the length cap: where the next (overlapping) window starts.
    pub next_t0: Option<f64>,
    pub captured: Instant,
}

impl Job {
    pub fn audio_seconds(&self) -> f64 {
        self.audio
            .as_ref()
            .map(|a| a.len() as f64 / f64::from(AUDIO_RATE))
            .unwrap_or(0.0)
    }
}

/// What the model said for a job.
#[derive(Debug, Clone)]
pub struct Answer {
    pub text: String,
    /// Wall seconds of the batched step this job was part of (shared by the batch).
    pub model_s: f64,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    /// Requests in the batched step.
    pub batch: usize,
}
