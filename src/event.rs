//! The event contract: one JSON object per line, every event with `source`, `kind` and `t`
//! (media seconds where it starts) and `end` for spans. Sinks serialize these and nothing else.
//!
//! Every emitted event also carries an `id`, `<run>-<source>-<seq>`: `run` is 15 lowercase hex
//! digits fixed for one `percept run` (start time in milliseconds, then 4 random digits, so
//! later runs sort after earlier ones), `seq` counts the source's events from 1 in the order
//! they were written. The same event delivered twice (MQTT, webhooks: at least once) has the
//! same id, so a consumer drops duplicates by id; within a source and run, a larger `seq` is a
//! later event. The id is given by [`crate::sink::Events::emit`].

use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Event {
    /// `<run>-<source>-<seq>` (see the module doc); None until the event is emitted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub source: String,
    pub t: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end: Option<f64>,
    #[serde(flatten)]
    pub body: Body,
}

/// Lifecycle of one source. Each transition is an event and a metric.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum SourceState {
    Connecting,
    Running,
    Reconnecting,
    Failed,
    Eos,
}

impl SourceState {
    pub const ALL: [SourceState; 5] = [
        SourceState::Connecting,
        SourceState::Running,
        SourceState::Reconnecting,
        SourceState::Failed,
        SourceState::Eos,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SourceState::Connecting => "connecting",
            SourceState::Running => "running",
            SourceState::Reconnecting => "reconnecting",
            SourceState::Failed => "failed",
            SourceState::Eos => "eos",
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Media {
    Video,
    Audio,
}

impl Media {
    pub fn as_str(self) -> &'static str {
        match self {
            Media::Video => "video",
            Media::Audio => "audio",
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Body {
    /// A sampled frame the worker analysed.
    Frame {
        width: u32,
        height: u32,
        /// Mean absolute luma change against the previous analysed frame, 0..1.
        motion: f64,
        scene_change: bool,
        /// Wall-clock milliseconds from the appsink to the end of analysis.
        latency_ms: f64,
    },
    /// An audio chunk the worker analysed (16 kHz mono).
    Audio {
        /// RMS level in dBFS (-120 for digital silence).
        level: f64,
        voice: bool,
        samples: u64,
    },
    Drop {
        media: Media,
        count: u64,
        reason: String,
    },
    Gap {
        reason: String,
    },
    State {
        state: SourceState,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        attempt: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_in: Option<f64>,
        /// The real-time governor's view of the source, when a model serves it.
        #[serde(skip_serializing_if = "Option::is_none", flatten)]
        governor: Option<GovernorState>,
        /// `K/N` when this process is one shard of a set (`percept run --shard`).
        #[serde(skip_serializing_if = "Option::is_none")]
        shard: Option<String>,
    },
    /// What the model says about the scene (one frame, or a window of frames sent as video).
    Description {
        text: String,
        frames: u32,
        soft_tokens: u32,
        model_ms: f64,
        /// Requests (across sources) in the batched step that answered this one.
        batch: u32,
        /// Wall milliseconds from capture to this answer.
        latency_ms: f64,
    },
    /// A `watch` question answered positively.
    Alert {
        question: String,
        answer: String,
        confidence: f64,
        evidence: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        snapshot: Option<String>,
    },
    /// Live speech-to-text: `partial` while the words may still change, then `final`.
    Caption {
        text: String,
        status: CaptionStatus,
    },
    /// Recording transcription (one window).
    Transcript {
        text: String,
    },
    /// What was seen and heard together (`listen-and-look`).
    Scene {
        text: String,
        audio_seconds: f64,
        model_ms: f64,
        batch: u32,
        latency_ms: f64,
    },
    /// A text summary (the `summarize` task), kind `summary` like the per-source
    /// statistics; it is told apart by `text`.
    #[serde(rename = "summary")]
    TextSummary {
        text: String,
        /// Windows the recording was summarized in (the running summary carried across).
        windows: u32,
        /// Frames the summary looked at, in all windows.
        frames: u32,
        /// Transcript lines it read, in all windows.
        transcript_lines: u32,
    },
    Error {
        message: String,
        /// Untrusted model output that caused the error, verbatim (JSON-escaped).
        #[serde(skip_serializing_if = "Option::is_none")]
        raw: Option<String>,
    },
    Summary(Summary),
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CaptionStatus {
    Partial,
    Final,
}

/// Governor figures carried by `state` events (and exported as metrics).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct GovernorState {
    /// Media seconds between the newest input and the newest model result.
    pub lag_seconds: f64,
    /// Frames per second reaching the model.
    pub effective_fps: f64,
    /// Model seconds per media second, per modality (below 1: faster than real time).
    pub rtf_video: f64,
    pub rtf_audio: f64,
    /// Degradation step, 0 = full quality.
    pub level: u8,
    /// Image soft-token budget at this level.
    pub soft_tokens: u32,
    pub audio_voice_only: bool,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Summary {
    pub frames_decoded: u64,
    pub frames_sampled: u64,
    pub frames_analyzed: u64,
    pub frames_dropped: u64,
    pub audio_seconds: f64,
    pub audio_seconds_dropped: f64,
    pub gaps: u64,
    pub reconnects: u64,
    pub keyframe_only: bool,
    /// Highest total of queued bytes seen across all sources, and the budget it is held to.
    pub queue_bytes_peak: u64,
    pub queue_budget_bytes: u64,
    pub final_state: Option<SourceState>,
    pub wall_seconds: f64,
}

impl Event {
    pub fn new(source: &str, t: f64, end: Option<f64>, body: Body) -> Event {
        Event {
            id: None,
            source: source.to_string(),
            t: round_ms(t),
            end: end.map(round_ms),
            body,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self.body {
            Body::Frame { .. } => "frame",
            Body::Audio { .. } => "audio",
            Body::Drop { .. } => "drop",
            Body::Gap { .. } => "gap",
            Body::State { .. } => "state",
            Body::Error { .. } => "error",
            Body::Summary(_) | Body::TextSummary { .. } => "summary",
            Body::Description { .. } => "description",
            Body::Alert { .. } => "alert",
            Body::Caption { .. } => "caption",
            Body::Transcript { .. } => "transcript",
            Body::Scene { .. } => "scene",
        }
    }
}

/// Media times are printed to the microsecond: enough for sample-exact audio at 16 kHz
/// (62.5 us per sample) without float noise in the JSON.
fn round_ms(t: f64) -> f64 {
    (t * 1e6).round() / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_flat_with_kind() {
        let e = Event::new(
            "door",
            1.0000004,
            None,
            Body::Frame {
                width: 640,
                height: 360,
                motion: 0.5,
                scene_change: true,
                latency_ms: 3.0,
            },
        );
        let v: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!(v["kind"], "frame");
        assert_eq!(v["source"], "door");
        assert_eq!(v["t"], 1.0);
        assert!(v.get("end").is_none());
        let s = Event::new("door", 0.0, Some(2.0), Body::Summary(Summary::default()));
        let v: serde_json::Value = serde_json::to_value(&s).unwrap();
        assert_eq!(v["kind"], "summary");
        assert_eq!(v["frames_sampled"], 0);
        assert_eq!(v["end"], 2.0);
    }
}
