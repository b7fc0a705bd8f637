//! Live ingest: one GStreamer graph (or a symphonia decoder) per source, split into a video
//! branch and an audio branch that feed bounded queues into the worker.
//!
//! Data flow: `supervisor` owns a source's lifecycle and (re)builds its `graph` from
//! `template`s, with one `session` per connection; `keyframe` decides which encoded video
//! reaches the decoder and `sampler` which decoded frames are kept; the video and audio
//! `branch`es end in appsinks that call into the source's [`SourceInput`], which timestamps, chunks
//! and queues media and counts every drop. `config` holds the `[[source]]`, `[video]`,
//! `[audio]`, `[reconnect]` and `[watchdog]` sections.

pub mod audio_file;
mod branch;
pub mod chunker;
pub mod config;
pub mod graph;
pub mod keyframe;
pub mod latest;
pub mod sampler;
pub mod session;
pub mod supervisor;
pub mod template;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::event::{Body, Event, Media};
use crate::metrics::Metrics;
use crate::queue::{DropReason, Pushed, QueueTx};
use crate::sink::Events;

/// Audio handed to the worker is always this rate, mono f32.
pub const AUDIO_RATE: u32 = crate::model::preprocess::SAMPLE_RATE;

/// One sampled frame, RGB24, tightly packed rows.
#[derive(Debug, Clone)]
pub struct VideoFrame {
    /// Media seconds (running time plus the source's offset).
    pub t: f64,
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
    /// When the appsink handed it over, for capture-to-analysis latency.
    pub captured: Instant,
}

impl VideoFrame {
    /// JPEG (quality 85), for snapshots and the web page.
    pub fn jpeg(&self) -> Option<Vec<u8>> {
        use image::ImageEncoder;
        let mut buf = Vec::new();
        let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 85);
        enc.write_image(
            &self.rgb,
            self.width,
            self.height,
            image::ExtendedColorType::Rgb8,
        )
        .ok()?;
        Some(buf)
    }
}

/// A chunk of 16 kHz mono audio starting at sample-exact media time `t`.
#[derive(Debug, Clone)]
pub struct AudioChunk {
    pub t: f64,
    pub samples: Vec<f32>,
    pub captured: Instant,
}

impl AudioChunk {
    pub fn duration(&self) -> f64 {
        self.samples.len() as f64 / f64::from(AUDIO_RATE)
    }
}

/// Counters of one source, kept across reconnects; they become its `summary`.
#[derive(Debug, Default)]
pub struct SourceStats {
    pub frames_decoded: AtomicU64,
    pub frames_sampled: AtomicU64,
    pub frames_analyzed: AtomicU64,
    pub frames_dropped: AtomicU64,
    pub audio_samples_in: AtomicU64,
    pub audio_samples_analyzed: AtomicU64,
    pub audio_samples_dropped: AtomicU64,
    pub gaps: AtomicU64,
    pub reconnects: AtomicU64,
    pub keyframe_only: AtomicBool,
}

/// Drops waiting to be reported: the worker turns them into `drop` (and, for audio, `gap`)
/// events at most a few times a second, so an overload cannot flood the event stream.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingDrop {
    pub media: Media,
    pub reason: DropReason,
    pub count: u64,
    pub t0: f64,
    pub t1: f64,
}

/// The input end of one source: where its graph (or decoder) pushes media into the source's
/// two queues, with the counters, metrics and events that account for it. Shared by the
/// graph's streaming threads, the supervisor and the worker; lives as long as the source,
/// across reconnects. (Not the HTTP event feeds of `http::feed`.)
pub struct SourceInput {
    pub name: String,
    pub video: QueueTx<VideoFrame>,
    pub audio: QueueTx<AudioChunk>,
    pub stats: SourceStats,
    pub metrics: Arc<Metrics>,
    pub events: Events,
    /// The last error reported for this source, for the one-line message at exit.
    pub last_error: Mutex<Option<String>>,
    pending: Mutex<Vec<PendingDrop>>,
    /// Instant of the last buffer seen anywhere in the graph, as ms since `created`.
    last_activity_ms: AtomicU64,
    /// End of the last media seen, in media seconds (f64 bits), for gap reports.
    last_media_end: AtomicU64,
    /// Media duration when known (files), f64 bits, NaN when unknown: for progress.
    duration: AtomicU64,
    created: Instant,
    /// The newest sampled frame, for viewers (the page), with or without a model.
    pub latest: latest::LatestSampled,
}

impl SourceInput {
    pub fn new(
        name: String,
        video: QueueTx<VideoFrame>,
        audio: QueueTx<AudioChunk>,
        metrics: Arc<Metrics>,
        events: Events,
    ) -> Arc<SourceInput> {
        Arc::new(SourceInput {
            name,
            video,
            audio,
            stats: SourceStats::default(),
            metrics,
            events,
            last_error: Mutex::new(None),
            pending: Mutex::new(Vec::new()),
            last_activity_ms: AtomicU64::new(0),
            last_media_end: AtomicU64::new(f64::NAN.to_bits()),
            duration: AtomicU64::new(f64::NAN.to_bits()),
            created: Instant::now(),
            latest: latest::LatestSampled::default(),
        })
    }

    pub fn emit(&self, t: f64, end: Option<f64>, body: Body) {
        self.events.emit(Event::new(&self.name, t, end, body));
    }

    pub fn touch(&self) {
        let ms = self.created.elapsed().as_millis() as u64;
        self.last_activity_ms.store(ms, Ordering::Relaxed);
    }

    /// Seconds since the last buffer (or since `mark_start`).
    pub fn idle_seconds(&self) -> f64 {
        let now = self.created.elapsed().as_millis() as u64;
        now.saturating_sub(self.last_activity_ms.load(Ordering::Relaxed)) as f64 / 1000.0
    }

    pub fn note_media_end(&self, end: f64) {
        let cur = f64::from_bits(self.last_media_end.load(Ordering::Relaxed));
        if cur.is_nan() || end > cur {
            self.last_media_end.store(end.to_bits(), Ordering::Relaxed);
        }
    }

    pub fn last_media_end(&self) -> Option<f64> {
        let v = f64::from_bits(self.last_media_end.load(Ordering::Relaxed));
        (!v.is_nan()).then_some(v)
    }

    pub fn set_duration(&self, seconds: f64) {
        self.duration.store(seconds.to_bits(), Ordering::Relaxed);
    }

    pub fn duration(&self) -> Option<f64> {
        let v = f64::from_bits(self.duration.load(Ordering::Relaxed));
        (v.is_finite() && v > 0.0).then_some(v)
    }

    /// Report a gap in the media timeline now.
    pub fn gap(&self, t0: f64, t1: f64, reason: &str) {
        if t1 <= t0 {
            return;
        }
        self.stats.gaps.fetch_add(1, Ordering::Relaxed);
        self.metrics.gaps.with_label_values(&[&self.name]).inc();
        self.metrics
            .gap_seconds
            .with_label_values(&[&self.name])
            .inc_by(t1 - t0);
        self.emit(
            t0,
            Some(t1),
            Body::Gap {
                reason: reason.into(),
            },
        );
    }

    fn record_drop(&self, media: Media, reason: DropReason, count: u64, t0: f64, t1: f64) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        match pending
            .iter_mut()
            .find(|p| p.media == media && p.reason == reason)
        {
            Some(p) => {
                p.count += count;
                p.t0 = p.t0.min(t0);
                p.t1 = p.t1.max(t1);
            }
            None => pending.push(PendingDrop {
                media,
                reason,
                count,
                t0,
                t1,
            }),
        }
    }

    /// Take the drops recorded since the last call.
    pub fn take_drops(&self) -> Vec<PendingDrop> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Count a sampled frame lost before analysis.
    pub fn drop_frames(&self, frames: &[VideoFrame], reason: DropReason) {
        if frames.is_empty() {
            return;
        }
        let n = frames.len() as u64;
        self.stats.frames_dropped.fetch_add(n, Ordering::Relaxed);
        self.metrics
            .frames_dropped
            .with_label_values(&[&self.name, reason.as_str()])
            .inc_by(n);
        let t0 = frames.iter().map(|f| f.t).fold(f64::INFINITY, f64::min);
        let t1 = frames.iter().map(|f| f.t).fold(f64::NEG_INFINITY, f64::max);
        self.record_drop(Media::Video, reason, n, t0, t1);
    }

    /// Count audio lost before analysis (whole chunks).
    pub fn drop_audio(&self, chunks: &[AudioChunk], reason: DropReason) {
        for c in chunks {
            let n = c.samples.len() as u64;
            self.stats
                .audio_samples_dropped
                .fetch_add(n, Ordering::Relaxed);
            self.metrics
                .audio_seconds_dropped
                .with_label_values(&[&self.name, reason.as_str()])
                .inc_by(c.duration());
            self.record_drop(Media::Audio, reason, 1, c.t, c.t + c.duration());
        }
    }

    /// Hand a sampled frame to the worker under the queue's policy.
    pub fn push_frame(&self, frame: VideoFrame) {
        self.touch();
        self.stats.frames_sampled.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .frames_sampled
            .with_label_values(&[&self.name])
            .inc();
        self.note_media_end(frame.t);
        self.latest.offer(&frame);
        let bytes = frame.rgb.len() + std::mem::size_of::<VideoFrame>();
        match self.video.push(frame, bytes) {
            Pushed::Queued => {}
            Pushed::QueuedEvicting(old) => self.drop_frames(&old, DropReason::QueueFull),
            Pushed::Rejected(f, why) => self.drop_frames(&[f], why),
            Pushed::Closed(f) => self.drop_frames(&[f], DropReason::Shutdown),
        }
    }

    /// Hand an audio chunk to the worker under the queue's policy.
    pub fn push_audio(&self, chunk: AudioChunk) {
        self.touch();
        let n = chunk.samples.len() as u64;
        self.stats.audio_samples_in.fetch_add(n, Ordering::Relaxed);
        self.metrics
            .audio_seconds_in
            .with_label_values(&[&self.name])
            .inc_by(chunk.duration());
        self.note_media_end(chunk.t + chunk.duration());
        let bytes = chunk.samples.len() * 4 + std::mem::size_of::<AudioChunk>();
        match self.audio.push(chunk, bytes) {
            Pushed::Queued => {}
            Pushed::QueuedEvicting(old) => self.drop_audio(&old, DropReason::QueueFull),
            Pushed::Rejected(c, why) => self.drop_audio(&[c], why),
            Pushed::Closed(c) => self.drop_audio(&[c], DropReason::Shutdown),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{bounded, ByteBudget, WhenFull};

    fn chunk(t: f64, n: usize) -> AudioChunk {
        AudioChunk {
            t,
            samples: vec![0.0; n],
            captured: Instant::now(),
        }
    }

    /// Live audio refused because other queues hold the byte budget is counted as
    /// `budget`, as live video is; only a full audio queue is `queue_full`.
    #[test]
    fn audio_refused_by_the_budget_is_counted_as_budget() {
        let stop = Arc::new(AtomicBool::new(false));
        let budget = ByteBudget::new(64 * 1024);
        let (vtx, _vrx) = bounded(4, WhenFull::DropOldest, budget.clone(), stop.clone());
        let (atx, _arx) = bounded(2, WhenFull::DropNewest, budget.clone(), stop.clone());
        let metrics = Arc::new(Metrics::new());
        let feed = SourceInput::new(
            "a".into(),
            vtx,
            atx,
            metrics.clone(),
            Events::with_writer(None),
        );
        // Another source's queue holds all but a few bytes of the budget.
        let (other, orx) = bounded::<u8>(1, WhenFull::DropNewest, budget.clone(), stop);
        assert!(matches!(other.push(0, 60 * 1024), Pushed::Queued));
        feed.push_audio(chunk(0.0, 4000));
        assert_eq!(orx.try_recv(), Some(0));
        // With the budget free again, a full audio queue is `queue_full`.
        for i in 1..=3 {
            feed.push_audio(chunk(f64::from(i) * 0.25, 4000));
        }
        let text = metrics.render();
        let line = |reason: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with("percept_audio_seconds_dropped_total")
                        && l.contains(&format!("reason=\"{reason}\""))
                })
                .map(str::to_string)
        };
        assert!(
            line("budget").is_some_and(|l| l.ends_with(" 0.25")),
            "{text}"
        );
        assert!(
            line("queue_full").is_some_and(|l| l.ends_with(" 0.25")),
            "{text}"
        );
        let reasons: Vec<DropReason> = feed.take_drops().iter().map(|d| d.reason).collect();
        assert_eq!(reasons, vec![DropReason::Budget, DropReason::QueueFull]);
    }
}
