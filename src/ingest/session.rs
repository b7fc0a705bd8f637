//! The state of one connection of a source's graph, shared by its streaming threads.

use gstreamer as gst;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::audio_file::LiveAudio;
use super::chunker::Chunker;
use super::graph::GraphParams;
use super::keyframe::KeyframeGate;
use super::sampler::Sampler;
use super::SourceInput;
use crate::lock;

/// Per-connection state shared by the graph's streaming threads.
pub struct Session {
    pub feed: Arc<SourceInput>,
    pub(super) params: GraphParams,
    /// Media seconds at running time 0 of this connection.
    offset: f64,
    pub(super) alive: AtomicBool,
    started: AtomicBool,
    first_t: AtomicU64,
    pub(super) video_claimed: AtomicBool,
    pub(super) audio_claimed: AtomicBool,
    pub(super) video_linked: AtomicBool,
    pub(super) audio_linked: AtomicBool,
    pub(super) sampler: Mutex<Sampler>,
    pub(super) gate: Mutex<KeyframeGate>,
    pub(super) chunker: Mutex<Chunker>,
    /// Audio at the source's rate -> 16 kHz mono, the file path's resampler.
    pub(super) live_audio: Mutex<LiveAudio>,
}

impl Session {
    pub fn new(feed: Arc<SourceInput>, params: GraphParams, offset: f64) -> Arc<Session> {
        Arc::new(Session {
            feed,
            offset,
            alive: AtomicBool::new(true),
            started: AtomicBool::new(false),
            first_t: AtomicU64::new(0f64.to_bits()),
            video_claimed: AtomicBool::new(false),
            audio_claimed: AtomicBool::new(false),
            video_linked: AtomicBool::new(false),
            audio_linked: AtomicBool::new(false),
            sampler: Mutex::new(Sampler::new(params.fps)),
            gate: Mutex::new(KeyframeGate::new(params.keyframe_only, params.fps)),
            chunker: Mutex::new(Chunker::new(params.chunk_seconds)),
            live_audio: Mutex::new(LiveAudio::default()),
            params,
        })
    }

    /// Media time of the first buffer, once one has arrived.
    pub fn first_media_time(&self) -> Option<f64> {
        self.started
            .load(Ordering::Acquire)
            .then(|| f64::from_bits(self.first_t.load(Ordering::Relaxed)))
    }

    /// Stop delivering: a torn-down connection may still push while it shuts down.
    pub fn close(&self) {
        if self.alive.swap(false, Ordering::AcqRel) {
            self.flush_audio();
        }
    }

    /// Deliver the partial audio chunk at the end of a stream.
    pub(super) fn flush_audio(&self) {
        for (t, samples) in lock(&self.live_audio).finish() {
            for c in lock(&self.chunker).push(t, &samples).chunks {
                self.feed.push_audio(c);
            }
        }
        let tail = lock(&self.chunker).flush();
        if let Some(c) = tail {
            self.feed.push_audio(c);
        }
    }

    pub fn has_video(&self) -> bool {
        self.video_linked.load(Ordering::Relaxed)
    }

    pub fn has_audio(&self) -> bool {
        self.audio_linked.load(Ordering::Relaxed)
    }

    pub(super) fn mark_started(&self, t: f64) {
        if !self.started.load(Ordering::Relaxed) {
            self.first_t.store(t.to_bits(), Ordering::Relaxed);
            self.started.store(true, Ordering::Release);
        }
    }
}

pub(super) fn secs(t: gst::ClockTime) -> f64 {
    t.nseconds() as f64 / 1e9
}

/// Media seconds of a buffer: running time in its segment plus the connection's offset.
pub(super) fn media_time(
    session: &Session,
    segment: &gst::Segment,
    pts: Option<gst::ClockTime>,
) -> Option<f64> {
    let seg = segment.downcast_ref::<gst::ClockTime>()?;
    let rt = seg.to_running_time(pts?)?;
    Some(session.offset + secs(rt))
}
