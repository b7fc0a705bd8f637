//! Runtime control shared by the HTTP API, SIGHUP and the run loop: add or remove sources and
//! change a source's task without reloading the model, plus the live board the web page reads
//! (model status, latest frame per source).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};

use crate::config::TaskKind;
use crate::event::SourceState;
use crate::ingest::VideoFrame;

/// A source as the control API shows it (never its credentials).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SourceInfo {
    pub name: String,
    /// The URI with any password redacted.
    pub uri: String,
    pub state: Option<SourceState>,
    pub task: TaskKind,
    pub questions: Vec<String>,
    pub prompt: Option<String>,
}

/// `POST /v1/sources`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AddSource {
    pub name: Option<String>,
    pub uri: String,
    #[serde(default)]
    pub task: Option<TaskKind>,
    #[serde(default)]
    pub questions: Vec<String>,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub fps: Option<f64>,
}

/// `PUT /v1/sources/{name}/task`: fields left out keep their value.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct TaskUpdate {
    pub task: Option<TaskKind>,
    pub questions: Option<Vec<String>>,
    pub prompt: Option<String>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum ControlError {
    /// HTTP 404.
    #[error("no source named '{0}'")]
    NotFound(String),
    /// HTTP 409.
    #[error("{0}")]
    Conflict(String),
    /// HTTP 400.
    #[error("{0}")]
    Invalid(String),
    /// HTTP 503: the run is shutting down.
    #[error("percept is shutting down")]
    ShuttingDown,
}

/// Implemented by the run loop.
pub trait ControlApi: Send + Sync {
    fn list(&self) -> Vec<SourceInfo>;
    fn add(&self, req: AddSource) -> Result<SourceInfo, ControlError>;
    fn remove(&self, name: &str) -> Result<(), ControlError>;
    fn set_task(&self, name: &str, update: TaskUpdate) -> Result<SourceInfo, ControlError>;
    /// Re-read the config file (what SIGHUP does).
    fn reload(&self) -> Result<(), ControlError>;
}

/// Whether the shared model can answer.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum ModelStatus {
    /// `[model] enabled = false` or no source has a model task.
    Disabled,
    Loading {
        id: String,
    },
    Ready {
        id: String,
        load_seconds: f64,
    },
    /// The model cannot be had (offline, not cached, bad folder): signals only.
    Unavailable {
        id: String,
        message: String,
    },
}

/// The newest frame the model looked at, per source, for the web page.
#[derive(Debug, Clone)]
pub struct LatestFrame {
    pub t: f64,
    frame: Arc<VideoFrame>,
    /// Encoded when first asked for: most frames are never viewed.
    jpeg: Arc<OnceLock<Option<Vec<u8>>>>,
    pub description: Option<String>,
}

impl LatestFrame {
    pub fn jpeg(&self) -> Option<Vec<u8>> {
        self.jpeg.get_or_init(|| self.frame.jpeg()).clone()
    }
}

/// What the page and `/healthz` read besides events.
#[derive(Default)]
pub struct LiveBoard {
    model: Mutex<Option<ModelStatus>>,
    frames: Mutex<HashMap<String, LatestFrame>>,
    /// The newest sampled frame per source (model or not), for the page.
    sampled: Mutex<HashMap<String, crate::ingest::latest::LatestSampled>>,
    /// The last few frames the model looked at (all sources), so an answer that comes back
    /// after a newer frame was sent still finds its own (see [`LiveBoard::frame_at`]).
    recent: Mutex<std::collections::VecDeque<(String, LatestFrame)>>,
}

/// Frames kept in [`LiveBoard`]'s recent ring.
const RECENT_FRAMES: usize = 8;

impl LiveBoard {
    pub fn set_model(&self, s: ModelStatus) {
        *self.model.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
    }

    pub fn model(&self) -> ModelStatus {
        self.model
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or(ModelStatus::Disabled)
    }

    pub fn set_frame(&self, source: &str, frame: Arc<VideoFrame>) {
        let latest = LatestFrame {
            t: frame.t,
            frame,
            jpeg: Arc::default(),
            description: None,
        };
        {
            let mut r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            r.push_back((source.to_string(), latest.clone()));
            while r.len() > RECENT_FRAMES {
                r.pop_front();
            }
        }
        self.frames
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(source.to_string(), latest);
    }

    /// The frame of `source` the model looked at with media time `t` (within 1 ms), if it
    /// is the newest or still among the last few.
    pub fn frame_at(&self, source: &str, t: f64) -> Option<LatestFrame> {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .rev()
            .find(|(s, f)| s == source && (f.t - t).abs() < 1e-3)
            .map(|(_, f)| f.clone())
    }

    /// Attach the model's words to the frame at `t` (if it is still the latest).
    pub fn describe_frame(&self, source: &str, t: f64, text: &str) {
        if let Some(f) = self
            .frames
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(source)
        {
            if (f.t - t).abs() < 1e-6 {
                f.description = Some(text.to_string());
            }
        }
    }

    pub fn frame(&self, source: &str) -> Option<LatestFrame> {
        self.frames
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(source)
            .cloned()
    }

    pub fn remove_source(&self, source: &str) {
        self.frames
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(source);
        self.sampled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(source);
    }

    /// Where a source's newest sampled frame can be read (see `SourceInput::latest`).
    pub fn track_sampled(&self, source: &str, latest: crate::ingest::latest::LatestSampled) {
        self.sampled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(source.to_string(), latest);
    }

    /// The newest sampled frame of a source, None before its first one.
    pub fn sampled(&self, source: &str) -> Option<crate::ingest::latest::SampledView> {
        let l = self
            .sampled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(source)
            .cloned();
        l.and_then(|l| l.get())
    }
}
