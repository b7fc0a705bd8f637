//! What the page shows when it opens (or reconnects): the last hour of events worth reading,
//! a per-second motion / audio-level strip of the last five minutes per source, running
//! figures per source (state, fps, lag, drops, governor step), and the frame the model looked
//! at for each recent alert and description.
//!
//! One std thread follows [`crate::sink::Events`] on its own bounded subscription from the
//! moment the server starts, so nothing here ever slows the pipeline: when it falls behind it
//! loses events, like any feed client. It ends when the events bus does.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;

use crate::control::LiveBoard;
use crate::event::{Body, CaptionStatus, Event, Media};
use crate::sink::Events;

/// How far back the timeline reaches, milliseconds of wall clock.
pub const TIMELINE_MS: u64 = 60 * 60 * 1000;
/// Most timeline entries kept (all sources), whatever their age.
pub const MAX_ENTRIES: usize = 5000;
/// Seconds (one bucket each) of the motion / audio strip.
pub const STRIP_SECONDS: u64 = 300;
/// Frames (JPEG, a few tens of KiB each) kept for alerts and descriptions.
pub const MAX_FRAMES: usize = 200;
/// Events the history may fall behind by before it loses some.
const CAPACITY: usize = 4096;
/// The window over which the sampled frame rate is measured, seconds.
const FPS_WINDOW: u64 = 5;
/// Alert snapshot files larger than this are not read into memory.
const MAX_SNAPSHOT_BYTES: u64 = 8 * 1024 * 1024;

/// One second of one source's signals.
#[derive(Debug, Clone, Default, PartialEq)]
struct Bucket {
    /// Unix seconds.
    sec: u64,
    /// Highest motion score (0..1), None without video in this second.
    motion: Option<f64>,
    scene: bool,
    /// Highest audio level (dBFS), None without audio in this second.
    level: Option<f64>,
    voice: bool,
    frames: u32,
}

/// Running figures of one source, as the page's card shows them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceFigures {
    pub state: Option<String>,
    /// The governor's view (lag, model fps, step), when a model serves the source.
    pub governor: Option<Value>,
    /// Video frames and audio chunks lost before analysis since the server started.
    pub frames_dropped: u64,
    pub audio_chunks_dropped: u64,
    /// Capture-to-analysis milliseconds of the newest analysed frame.
    pub frame_latency_ms: Option<f64>,
    /// Newest audio level (dBFS) and voice flag.
    pub level: Option<f64>,
    pub voice: bool,
    /// Frames analysed per second over the last few seconds.
    pub fps: f64,
}

#[derive(Debug, Clone, Serialize)]
struct Entry {
    /// Wall clock when percept emitted it, ms since the Unix epoch.
    at_ms: u64,
    /// The frame behind it is at `/v1/sources/{source}/snapshot.jpg?t={t}`.
    frame: bool,
    event: Value,
}

#[derive(Default)]
struct Source {
    strip: VecDeque<Bucket>,
    figures: SourceFigures,
}

#[derive(Default)]
struct State {
    entries: VecDeque<Entry>,
    sources: HashMap<String, Source>,
    /// Oldest first.
    frames: VecDeque<KeptFrame>,
}

/// The frame behind an answer: source, media time, JPEG.
struct KeptFrame {
    source: String,
    t: f64,
    jpeg: Arc<Vec<u8>>,
}

/// Shared between the follower thread and the HTTP handlers.
pub struct History {
    state: Mutex<State>,
    live: Arc<LiveBoard>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Whether an event belongs on the timeline (the rest feeds strips and figures).
fn on_timeline(e: &Event) -> bool {
    match &e.body {
        Body::Caption { status, .. } => *status == CaptionStatus::Final,
        Body::Summary(_) | Body::Frame { .. } | Body::Audio { .. } | Body::Drop { .. } => false,
        _ => true,
    }
}

impl History {
    /// Starts following `events` now.
    pub fn start(events: &Events, live: Arc<LiveBoard>) -> Arc<History> {
        let h = Arc::new(History {
            state: Mutex::default(),
            live,
        });
        let rx = events.subscribe(CAPACITY);
        let follower = Arc::clone(&h);
        let spawned = std::thread::Builder::new()
            .name("percept-history".into())
            .spawn(move || {
                // Ends when the last `Events` handle is gone.
                for e in rx {
                    follower.record(&e, now_ms());
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "Cannot start the page's history thread; the page shows live events only.");
        }
        h
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes one event in, received at `at_ms`.
    fn record(&self, e: &Event, at_ms: u64) {
        let frame = match &e.body {
            Body::Alert { snapshot, .. } => self
                .model_frame(e)
                .or_else(|| snapshot.as_deref().and_then(read_snapshot)),
            Body::Description { .. } | Body::Scene { .. } => self.model_frame(e),
            _ => None,
        };
        let json = if on_timeline(e) {
            match serde_json::to_value(e) {
                Ok(v) => Some(v),
                Err(err) => {
                    tracing::error!(error = %err, "Cannot serialize an event for the page.");
                    None
                }
            }
        } else {
            None
        };
        let has_frame = frame.is_some();
        let mut st = self.lock();
        if let Some(jpeg) = frame {
            st.frames.push_back(KeptFrame {
                source: e.source.clone(),
                t: e.t,
                jpeg: Arc::new(jpeg),
            });
            while st.frames.len() > MAX_FRAMES {
                st.frames.pop_front();
            }
        }
        if let Some(event) = json {
            st.entries.push_back(Entry {
                at_ms,
                frame: has_frame,
                event,
            });
            while st.entries.len() > MAX_ENTRIES
                || st
                    .entries
                    .front()
                    .is_some_and(|f| f.at_ms + TIMELINE_MS < at_ms)
            {
                st.entries.pop_front();
            }
        }
        let src = st.sources.entry(e.source.clone()).or_default();
        let sec = at_ms / 1000;
        match &e.body {
            Body::Frame {
                motion,
                scene_change,
                latency_ms,
                ..
            } => {
                let b = bucket(&mut src.strip, sec);
                b.motion = Some(b.motion.map_or(*motion, |m| m.max(*motion)));
                b.scene |= *scene_change;
                b.frames += 1;
                src.figures.frame_latency_ms = Some(*latency_ms);
            }
            Body::Audio { level, voice, .. } => {
                let b = bucket(&mut src.strip, sec);
                b.level = Some(b.level.map_or(*level, |l| l.max(*level)));
                b.voice |= *voice;
                src.figures.level = Some(*level);
                src.figures.voice = *voice;
            }
            Body::Drop { media, count, .. } => match media {
                Media::Video => src.figures.frames_dropped += count,
                Media::Audio => src.figures.audio_chunks_dropped += count,
            },
            Body::State {
                state, governor, ..
            } => {
                src.figures.state = Some(state.as_str().to_string());
                if let Some(g) = governor {
                    src.figures.governor = serde_json::to_value(g).ok();
                }
            }
            _ => {}
        }
    }

    /// The frame the model looked at for this answer, if the board still has it.
    fn model_frame(&self, e: &Event) -> Option<Vec<u8>> {
        // A window of frames is answered at its start; its newest frame is at its end.
        self.live
            .frame_at(&e.source, e.t)
            .or_else(|| e.end.and_then(|end| self.live.frame_at(&e.source, end)))?
            .jpeg()
    }

    /// The JPEG kept for the answer of `source` at media time `t`.
    pub fn frame(&self, source: &str, t: f64) -> Option<Arc<Vec<u8>>> {
        self.lock()
            .frames
            .iter()
            .rev()
            .find(|f| f.source == source && (f.t - t).abs() < 1e-3)
            .map(|f| Arc::clone(&f.jpeg))
    }

    /// Everything the page needs to draw its history, as of now.
    pub fn snapshot(&self) -> Value {
        let now = now_ms();
        let st = self.lock();
        let mut sources = serde_json::Map::new();
        for (name, s) in &st.sources {
            let from = (now / 1000).saturating_sub(STRIP_SECONDS);
            let strip: Vec<Value> = s
                .strip
                .iter()
                .filter(|b| b.sec >= from)
                .map(|b| {
                    serde_json::json!([
                        b.sec,
                        b.motion.map(round4),
                        b.scene,
                        b.level.map(round2),
                        b.voice,
                        b.frames
                    ])
                })
                .collect();
            let mut figures = s.figures.clone();
            // Complete seconds only: the current one is still filling.
            let recent: u32 = s
                .strip
                .iter()
                .filter(|b| b.sec + FPS_WINDOW >= now / 1000 && b.sec < now / 1000)
                .map(|b| b.frames)
                .sum();
            figures.fps = round2(f64::from(recent) / FPS_WINDOW as f64);
            sources.insert(
                name.clone(),
                serde_json::json!({ "figures": figures, "strip": strip }),
            );
        }
        let timeline: Vec<&Entry> = st
            .entries
            .iter()
            .filter(|e| e.at_ms + TIMELINE_MS >= now)
            .collect();
        serde_json::json!({ "now_ms": now, "sources": sources, "timeline": timeline })
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

/// The bucket of second `sec`, made (and old ones dropped) as needed.
fn bucket(strip: &mut VecDeque<Bucket>, sec: u64) -> &mut Bucket {
    if strip.back().is_none_or(|b| b.sec < sec) {
        strip.push_back(Bucket {
            sec,
            ..Bucket::default()
        });
    }
    while strip.front().is_some_and(|b| b.sec + STRIP_SECONDS < sec) {
        strip.pop_front();
    }
    // An event received out of order lands in the newest bucket: close enough for a strip.
    let last = strip.len() - 1;
    &mut strip[last]
}

/// An alert snapshot percept itself wrote (the path comes from its own event).
fn read_snapshot(path: &str) -> Option<Vec<u8>> {
    let p = std::path::Path::new(path);
    if p.extension().and_then(|e| e.to_str()) != Some("jpg") {
        return None;
    }
    let meta = std::fs::metadata(p).ok()?;
    if !meta.is_file() || meta.len() > MAX_SNAPSHOT_BYTES {
        return None;
    }
    std::fs::read(p).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::SourceState;

    fn ev(source: &str, t: f64, body: Body) -> Event {
        Event::new(source, t, None, body)
    }

    #[test]
    fn strip_figures_and_timeline_from_events() {
        let h = History {
            state: Mutex::default(),
            live: Arc::new(LiveBoard::default()),
        };
        // Whole seconds, so the four frames fall two by two into two buckets.
        let at = (now_ms() / 1000 - 3) * 1000;
        h.record(
            &ev(
                "a",
                1.0,
                Body::Audio {
                    level: -20.0,
                    voice: true,
                    samples: 8000,
                },
            ),
            at,
        );
        for i in 0..4u32 {
            h.record(
                &ev(
                    "a",
                    f64::from(i),
                    Body::Frame {
                        width: 4,
                        height: 4,
                        motion: 0.1 * f64::from(i),
                        scene_change: i == 3,
                        latency_ms: 12.0,
                    },
                ),
                at + 500 * u64::from(i),
            );
        }
        h.record(
            &ev(
                "a",
                1.0,
                Body::Drop {
                    media: Media::Video,
                    count: 3,
                    reason: "queue_full".into(),
                },
            ),
            at,
        );
        h.record(
            &ev(
                "a",
                2.0,
                Body::Caption {
                    text: "half".into(),
                    status: CaptionStatus::Partial,
                },
            ),
            at,
        );
        h.record(
            &ev(
                "a",
                2.0,
                Body::Caption {
                    text: "whole".into(),
                    status: CaptionStatus::Final,
                },
            ),
            at,
        );
        h.record(
            &ev(
                "a",
                2.0,
                Body::State {
                    state: SourceState::Running,
                    reason: None,
                    attempt: None,
                    retry_in: None,
                    governor: None,
                    shard: None,
                },
            ),
            at,
        );
        let v = h.snapshot();
        let a = &v["sources"]["a"];
        assert_eq!(a["figures"]["frames_dropped"], 3);
        assert_eq!(a["figures"]["state"], "running");
        assert_eq!(a["figures"]["level"], -20.0);
        assert_eq!(a["figures"]["voice"], true);
        let strip = a["strip"].as_array().unwrap();
        assert_eq!(strip.len(), 2, "{strip:?}");
        assert_eq!(strip[0][1], 0.1);
        assert_eq!(strip[0][3], -20.0);
        assert_eq!(strip[1][1], 0.3);
        assert_eq!(strip[1][2], true);
        // Two frames in each of two complete seconds of the 5 s window.
        assert_eq!(a["figures"]["fps"], 0.8);
        let kinds: Vec<&str> = v["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["event"]["kind"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["caption", "state"]);
        assert_eq!(v["timeline"][0]["event"]["text"], "whole");
    }

    #[test]
    fn keeps_the_model_frame_of_a_description() {
        let live = Arc::new(LiveBoard::default());
        let h = History {
            state: Mutex::default(),
            live: live.clone(),
        };
        live.set_frame(
            "a",
            Arc::new(crate::ingest::VideoFrame {
                t: 4.5,
                width: 8,
                height: 8,
                rgb: vec![90; 8 * 8 * 3],
                captured: std::time::Instant::now(),
            }),
        );
        let d = |t| {
            ev(
                "a",
                t,
                Body::Description {
                    text: "x".into(),
                    frames: 1,
                    soft_tokens: 1,
                    model_ms: 1.0,
                    batch: 1,
                    latency_ms: 1.0,
                },
            )
        };
        // A newer frame was sent before the answer about 4.5 came back.
        live.set_frame(
            "a",
            Arc::new(crate::ingest::VideoFrame {
                t: 5.5,
                width: 8,
                height: 8,
                rgb: vec![20; 8 * 8 * 3],
                captured: std::time::Instant::now(),
            }),
        );
        h.record(&d(4.5), now_ms());
        h.record(&d(9.0), now_ms());
        assert!(h.frame("a", 4.5).is_some());
        assert!(h.frame("a", 9.0).is_none());
        let v = h.snapshot();
        assert_eq!(v["timeline"][0]["frame"], true);
        assert_eq!(v["timeline"][1]["frame"], false);
    }
}
