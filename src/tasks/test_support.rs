//! Test helpers: a source's feed, queues and task without a graph or a model.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::Receiver;

use super::reply::{Reply, ReplyTo};
use super::{SourceTask, TaskEnv, TaskSpec};
use crate::config::{AlertConfig, CaptionConfig, GovernorConfig, TaskKind, TaskPrompts};
use crate::control::LiveBoard;
use crate::event::Event;
use crate::ingest::{AudioChunk, SourceInput, VideoFrame};
use crate::metrics::Metrics;
use crate::queue::{bounded, ByteBudget, QueueRx, WhenFull};
use crate::sink::Events;

/// What a task needs besides its state, with default settings and no files.
pub fn env() -> TaskEnv {
    TaskEnv {
        prompts: TaskPrompts::default(),
        governor: GovernorConfig::default(),
        captions: CaptionConfig {
            dir: String::new(),
            ..CaptionConfig::default()
        },
        alerts: AlertConfig::default(),
        scene_threshold: 0.3,
        max_tokens: 8,
        context: 4096,
        live_board: Arc::new(LiveBoard::default()),
        caption_dir: None,
        transcript_files: None,
        board: None,
        checkpoint: None,
    }
}

/// One source as `percept run` wires it: its feed, the worker's ends of its queues, and
/// every event it emits.
pub struct TestSource {
    pub feed: Arc<SourceInput>,
    pub video: QueueRx<VideoFrame>,
    pub audio: QueueRx<AudioChunk>,
    pub events: Receiver<Event>,
}

/// A source named `name`; `live` picks the live when-full rules (files block). Sources
/// made with the same `metrics` and `budget` share them, as in one run.
pub fn source(
    name: &str,
    live: bool,
    metrics: &Arc<Metrics>,
    budget: &Arc<ByteBudget>,
) -> TestSource {
    let stop = Arc::new(AtomicBool::new(false));
    let (vpol, apol) = if live {
        (WhenFull::DropOldest, WhenFull::DropNewest)
    } else {
        (WhenFull::Block, WhenFull::Block)
    };
    let (vtx, video) = bounded(4, vpol, budget.clone(), stop.clone());
    let (atx, audio) = bounded(8, apol, budget.clone(), stop);
    let sink = Events::with_writer(None);
    let events = sink.subscribe(10_000);
    let feed = SourceInput::new(name.to_string(), vtx, atx, metrics.clone(), sink);
    TestSource {
        feed,
        video,
        audio,
        events,
    }
}

/// Where a source's outcomes go, and the worker's end of that channel.
pub fn reply_to(metrics: &Arc<Metrics>) -> (ReplyTo, Receiver<Reply>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    (ReplyTo::new(tx, metrics.clone()), rx)
}

/// A task of `kind` for `feed`.
pub fn task(feed: &Arc<SourceInput>, kind: TaskKind, live: bool) -> SourceTask {
    let spec = TaskSpec {
        task: kind,
        questions: Vec::new(),
        prompt: None,
        window_frames: 1,
    };
    SourceTask::new(feed.clone(), spec, 5.0, live, env())
}

/// A small grey frame at media time `t`.
pub fn frame(t: f64) -> VideoFrame {
    VideoFrame {
        t,
        width: 8,
        height: 8,
        rgb: vec![128; 8 * 8 * 3],
        captured: Instant::now(),
    }
}
