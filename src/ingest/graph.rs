//! Builds one source's GStreamer graph: the source part from its template, then a video and
//! an audio branch attached as streams appear, each ending in an appsink that feeds the
//! source's [`Feed`]. One [`Session`] per (re)connection holds the per-connection state.

use crate::lock;
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;
use gstreamer_video::prelude::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::audio_file::LiveAudio;
use super::chunker::Chunker;
use super::template::{self, Vars};
use super::{Feed, VideoFrame};
use crate::source::{SourceKind, SourceSpec};

#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("{0}")]
    Template(#[from] template::TemplateError),
    #[error("cannot build graph: {0}")]
    Parse(String),
    #[error("cannot start graph: {0}")]
    Start(String),
}

/// What a graph needs to know besides its source.
#[derive(Debug, Clone)]
pub struct GraphParams {
    pub fps: f64,
    pub max_side: u32,
    pub keyframe_only: bool,
    /// Run at the clock's pace (live sources, `--realtime`).
    pub sync: bool,
    pub chunk_seconds: f64,
    /// A user's template for the source part, already read.
    pub custom_template: Option<String>,
    pub rtsp_latency_ms: u32,
    /// `max-threads` for libav decoders (0 = auto).
    pub decoder_threads: u32,
}

/// Per-connection state shared by the graph's streaming threads.
pub struct Session {
    pub feed: Arc<Feed>,
    params: GraphParams,
    /// Media seconds at running time 0 of this connection.
    offset: f64,
    alive: AtomicBool,
    started: AtomicBool,
    first_t: AtomicU64,
    video_claimed: AtomicBool,
    audio_claimed: AtomicBool,
    video_linked: AtomicBool,
    audio_linked: AtomicBool,
    sampler: Mutex<Sampler>,
    gate: Mutex<KeyframeGate>,
    chunker: Mutex<Chunker>,
    /// Audio at the source's rate -> 16 kHz mono, the file path's resampler.
    live_audio: Mutex<LiveAudio>,
}

impl Session {
    pub fn new(feed: Arc<Feed>, params: GraphParams, offset: f64) -> Arc<Session> {
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
    fn flush_audio(&self) {
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

    fn mark_started(&self, t: f64) {
        if !self.started.load(Ordering::Relaxed) {
            self.first_t.store(t.to_bits(), Ordering::Relaxed);
            self.started.store(true, Ordering::Release);
        }
    }
}

/// Picks frames at `fps` on a grid anchored at media time 0, from timestamps, never counts.
#[derive(Debug)]
pub struct Sampler {
    interval: f64,
    next_due: Option<f64>,
}

/// Timestamps within this of a grid point count as on it (rounding in containers).
const GRID_EPS: f64 = 0.002;

impl Sampler {
    pub fn new(fps: f64) -> Sampler {
        Sampler {
            interval: 1.0 / fps,
            next_due: None,
        }
    }

    pub fn admit(&mut self, t: f64) -> bool {
        if let Some(due) = self.next_due {
            if t + GRID_EPS < due {
                return false;
            }
        }
        self.next_due = Some((((t + GRID_EPS) / self.interval).floor() + 1.0) * self.interval);
        true
    }
}

/// Decides whether delta frames can be dropped before the decoder: only when keyframes come
/// at least as often as the target rate, which is checked on the stream itself.
///
/// Delta frames are never dropped before the next keyframe proves them unneeded: until
/// then they are held back (compressed, at most one target interval of them). A keyframe
/// in time discards them undecoded; a delta frame past the interval (the GOP is, or has
/// become, too long) releases them to the decoder in order, and decoding stays full from
/// there on. So nothing the sampler needs is ever lost, and a short GOP costs no delta
/// decoding at all, not even for the first one.
#[derive(Debug)]
pub struct KeyframeGate {
    allowed: bool,
    interval: f64,
    key_only: bool,
    fell_back: bool,
    last_key: Option<f64>,
}

/// What to do with one encoded buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateAction {
    Pass,
    /// Keep it aside until the decode mode is known.
    Hold,
    /// Push what is held, in order, then this buffer: full decode.
    Release,
    /// Forget what is held and pass this keyframe: keyframe-only decode.
    DiscardHeld,
}

/// Slack on the keyframe interval: encoders place keyframes on frame boundaries.
const KEY_SLACK: f64 = 0.05;

impl KeyframeGate {
    pub fn new(allowed: bool, fps: f64) -> KeyframeGate {
        KeyframeGate {
            allowed,
            interval: 1.0 / fps,
            key_only: false,
            fell_back: false,
            last_key: None,
        }
    }

    pub fn key_only(&self) -> bool {
        self.key_only
    }

    /// Delta frames are held (rather than passed) from the first keyframe until the gate
    /// falls back to full decoding.
    fn holding(&self) -> bool {
        self.allowed && self.last_key.is_some() && !self.fell_back
    }

    /// Give up on keyframe-only decoding for good (also when too much would be held).
    pub fn fall_back(&mut self) -> GateAction {
        let was_holding = self.holding();
        self.key_only = false;
        self.fell_back = true;
        if was_holding {
            GateAction::Release
        } else {
            GateAction::Pass
        }
    }

    /// Decide what happens to one encoded buffer (`t`: its media seconds, if known).
    pub fn action(&mut self, t: Option<f64>, delta: bool) -> GateAction {
        if !self.allowed {
            return GateAction::Pass;
        }
        if delta {
            if !self.holding() {
                return GateAction::Pass;
            }
            return match (t, self.last_key) {
                (Some(t), Some(last)) if t <= last + self.interval + KEY_SLACK => GateAction::Hold,
                // Past one target interval without a keyframe (or no time to tell): the GOP
                // is too long for keyframe-only decoding.
                _ => self.fall_back(),
            };
        }
        let mut action = GateAction::Pass;
        if let (Some(t), Some(last)) = (t, self.last_key) {
            let gap = t - last;
            if gap > self.interval + KEY_SLACK {
                // Once a long GOP is seen, decode everything from here on: scene-cut keyframes
                // can make a single short interval look like a fast GOP. Switching back at a
                // keyframe keeps every later delta frame decodable.
                action = self.fall_back();
            } else if gap > 0.0 && self.holding() {
                self.key_only = true;
                action = GateAction::DiscardHeld;
            }
        }
        if t.is_some() {
            self.last_key = t;
        }
        action
    }
}

/// Drop a buffer from a probe by consuming it. (`PadProbeReturn::Drop` makes GStreamer 1.22
/// unref an already-released buffer with these bindings: criticals, then a stalled stream.)
fn drop_buffer(info: &mut gst::PadProbeInfo) -> gst::PadProbeReturn {
    drop(info.take_buffer());
    gst::PadProbeReturn::Handled
}

fn secs(t: gst::ClockTime) -> f64 {
    t.nseconds() as f64 / 1e9
}

/// Media seconds of a buffer: running time in its segment plus the connection's offset.
fn media_time(
    session: &Session,
    segment: &gst::Segment,
    pts: Option<gst::ClockTime>,
) -> Option<f64> {
    let seg = segment.downcast_ref::<gst::ClockTime>()?;
    let rt = seg.to_running_time(pts?)?;
    Some(session.offset + secs(rt))
}

/// The source part of the graph as a gst-launch description.
fn source_description(spec: &SourceSpec, p: &GraphParams) -> Result<String, GraphError> {
    if let Some(t) = &p.custom_template {
        let vars = custom_vars(spec, p);
        return Ok(template::render(&spec.name, t, &vars)?);
    }
    let d = match &spec.kind {
        SourceKind::File(path) => template::render(
            "file",
            template::FILE,
            &Vars::new().quoted("location", &path.to_string_lossy()),
        )?,
        SourceKind::Rtsp {
            location,
            transport,
            ..
        } => template::render(
            "rtsp",
            template::RTSP,
            &Vars::new()
                .quoted("location", location)
                .raw("protocols", transport.protocols())
                .raw("latency_ms", p.rtsp_latency_ms)
                .raw("tcp_timeout_us", 5_000_000u64)
                .raw("udp_timeout_us", 5_000_000u64),
        )?,
        SourceKind::Http { location } => template::render(
            "http",
            template::HTTP,
            &Vars::new()
                .quoted("location", location)
                .raw("live", spec.kind.is_live()),
        )?,
        SourceKind::V4l2 { device } => template::render(
            "v4l2",
            template::V4L2,
            &Vars::new().quoted("device", device),
        )?,
        SourceKind::Pulse { .. } => template::render("pulse", template::PULSE, &Vars::new())?,
        SourceKind::Alsa { device } => template::render(
            "alsa",
            template::ALSA,
            &Vars::new().quoted("device", device),
        )?,
        SourceKind::Test(t) => {
            let mut parts = Vec::new();
            if let Some(pattern) = &t.video {
                let nb = t
                    .duration
                    .map_or(-1, |d| (d * f64::from(t.framerate)).round() as i64);
                parts.push(template::render(
                    "test_video",
                    template::TEST_VIDEO,
                    &Vars::new()
                        .raw("live", t.live)
                        .quoted("pattern", pattern)
                        .raw("num_buffers", nb)
                        .raw("width", t.width)
                        .raw("height", t.height)
                        .raw("fps", t.framerate),
                )?);
            }
            if let Some(wave) = &t.audio {
                // 480 samples per buffer at 48 kHz: 100 buffers a second.
                let nb = t.duration.map_or(-1, |d| (d * 100.0).round() as i64);
                parts.push(template::render(
                    "test_audio",
                    template::TEST_AUDIO,
                    &Vars::new()
                        .raw("live", t.live)
                        .quoted("wave", wave)
                        .raw("num_buffers", nb),
                )?);
            }
            parts.join("  ")
        }
    };
    Ok(d)
}

/// Placeholders a custom template may use.
fn custom_vars(spec: &SourceSpec, p: &GraphParams) -> Vars {
    let location = match &spec.kind {
        SourceKind::File(path) => path.to_string_lossy().into_owned(),
        SourceKind::Rtsp { location, .. } | SourceKind::Http { location } => location.clone(),
        SourceKind::V4l2 { device } | SourceKind::Alsa { device } => device.clone(),
        SourceKind::Pulse { device } => device.clone().unwrap_or_default(),
        SourceKind::Test(_) => String::new(),
    };
    Vars::new()
        .quoted("location", &location)
        .raw("fps", p.fps)
        .raw("latency_ms", p.rtsp_latency_ms)
}

/// Build the graph for one connection. Nothing runs until the caller sets it to PLAYING.
pub fn build(spec: &SourceSpec, session: &Arc<Session>) -> Result<gst::Pipeline, GraphError> {
    let desc = source_description(spec, &session.params)?;
    // The description holds the location: credentials and signed query values are hidden.
    tracing::debug!(source = %spec.name, graph = %crate::source::redact_text(&desc), "Building graph.");
    // Ghost pads are made here, not by the parser: it would also ghost not-yet-existing
    // sometimes pads (parsebin's), which breaks their later exposure.
    let bin = gst::parse::bin_from_description(&desc, false)
        .map_err(|e| GraphError::Parse(e.to_string()))?;
    let mut static_outputs = Vec::new();
    let pipeline = gst::Pipeline::with_name(&format!("percept-{}", spec.name));
    let threads = session.params.decoder_threads;
    pipeline.connect_deep_element_added(move |_, _, element| {
        let is_libav_decoder = element
            .factory()
            .is_some_and(|f| f.name().starts_with("avdec_"));
        if is_libav_decoder && element.has_property("max-threads") {
            element.set_property("max-threads", threads as i32);
        }
        // With direct rendering, GStreamer 1.22's decoder base class copies every frame
        // libav still references (make_writable) into fresh, page-faulting memory; without
        // it, frames are copied once into pooled buffers.
        if is_libav_decoder && element.has_property("direct-rendering") {
            element.set_property("direct-rendering", false);
        }
    });
    pipeline
        .add(&bin)
        .map_err(|e| GraphError::Parse(e.to_string()))?;

    for element in bin.iterate_elements().into_iter().flatten() {
        configure_source_element(&element, spec);
        let has_sometimes = element.pad_template_list().iter().any(|t| {
            t.direction() == gst::PadDirection::Src && t.presence() == gst::PadPresence::Sometimes
        });
        if has_sometimes {
            watch_pads(&element, session);
        }
        static_outputs.extend(element.src_pads().into_iter().filter(|p| !p.is_linked()));
    }
    // Static outputs (raw test sources, capture devices) are routed now.
    for (i, target) in static_outputs.into_iter().enumerate() {
        let ghost = gst::GhostPad::builder_with_target(&target)
            .map_err(|e| GraphError::Parse(e.to_string()))?
            .name(format!("out_{i}"))
            .build();
        bin.add_pad(&ghost)
            .map_err(|e| GraphError::Parse(e.to_string()))?;
        route(ghost.upcast_ref(), &pipeline.clone().upcast(), session);
    }
    Ok(pipeline)
}

/// Settings that must never travel through a launch line.
fn configure_source_element(element: &gst::Element, spec: &SourceSpec) {
    let factory = element
        .factory()
        .map(|f| f.name().to_string())
        .unwrap_or_default();
    match (&spec.kind, factory.as_str()) {
        (
            SourceKind::Rtsp {
                credentials: Some(c),
                ..
            },
            "rtspsrc",
        ) => {
            element.set_property("user-id", &c.user);
            element.set_property("user-pw", &c.password);
        }
        (SourceKind::Pulse { device: Some(d) }, "pulsesrc") => element.set_property("device", d),
        _ => {}
    }
}

fn watch_pads(element: &gst::Element, session: &Arc<Session>) {
    let weak = Arc::downgrade(session);
    element.connect_pad_added(move |element, pad| {
        let Some(session) = weak.upgrade() else {
            return;
        };
        if pad.direction() != gst::PadDirection::Src {
            return;
        }
        let parent = element.parent().and_then(|p| p.downcast::<gst::Bin>().ok());
        if let Some(parent) = parent {
            route(pad, &parent, &session);
        }
    });
}

fn post_error(element: Option<gst::Element>, msg: &str) {
    if let Some(e) = element {
        gst::element_error!(e, gst::CoreError::Negotiation, ("{}", msg));
    }
}

/// Attach whatever handles a newly available stream.
fn route(pad: &gst::Pad, parent: &gst::Bin, session: &Arc<Session>) {
    tracing::debug!(pad = %pad.name(), element = ?pad.parent_element().map(|e| e.name()), "route");
    let caps = pad.current_caps().unwrap_or_else(|| pad.query_caps(None));
    let name = caps
        .structure(0)
        .map(|s| s.name().to_string())
        .unwrap_or_default();
    let res = if name == "video/x-raw" {
        if !session.video_linked.swap(true, Ordering::AcqRel) {
            session.video_claimed.store(true, Ordering::Relaxed);
            link_video_branch(pad, parent, session, &caps)
        } else {
            link_fakesink(pad, parent)
        }
    } else if name == "audio/x-raw" {
        if !session.audio_linked.swap(true, Ordering::AcqRel) {
            session.audio_claimed.store(true, Ordering::Relaxed);
            link_audio_branch(pad, parent, session)
        } else {
            link_fakesink(pad, parent)
        }
    } else if name == "application/x-rtp" {
        link_via(pad, parent, session, "parsebin")
    } else if name.starts_with("video/") || name == "image/jpeg" {
        if !session.video_claimed.swap(true, Ordering::AcqRel) {
            add_keyframe_gate(pad, session);
            link_decoder(pad, parent, session)
        } else {
            link_fakesink(pad, parent)
        }
    } else if name.starts_with("audio/") {
        if !session.audio_claimed.swap(true, Ordering::AcqRel) {
            link_decoder(pad, parent, session)
        } else {
            link_fakesink(pad, parent)
        }
    } else {
        tracing::debug!(source = %session.feed.name, caps = %name, "Ignoring stream.");
        link_fakesink(pad, parent)
    };
    if let Err(e) = res {
        post_error(
            pad.parent_element(),
            &format!("cannot attach {name} stream: {e}"),
        );
    }
}

/// Add `element` (an element or a branch bin) to `parent`, link `pad` to its sink pad and
/// start it with the rest of the graph.
fn add_and_link(
    parent: &gst::Bin,
    pad: &gst::Pad,
    element: &impl IsA<gst::Element>,
) -> Result<(), String> {
    let sink = element
        .static_pad("sink")
        .ok_or_else(|| "element without sink pad".to_string())?;
    parent.add(element).map_err(|e| e.to_string())?;
    pad.link(&sink).map_err(|e| format!("{e:?}"))?;
    element
        .sync_state_with_parent()
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Pull the sample an appsink offers, unless this connection has been torn down.
fn pull_live(sink: &gst_app::AppSink, session: &Session) -> Result<gst::Sample, gst::FlowError> {
    let sample = sink.pull_sample().map_err(|_| gst::FlowError::Flushing)?;
    if !session.alive.load(Ordering::Acquire) {
        return Err(gst::FlowError::Flushing);
    }
    Ok(sample)
}

fn link_fakesink(pad: &gst::Pad, parent: &gst::Bin) -> Result<(), String> {
    let sink = gst::ElementFactory::make("fakesink")
        .property("sync", false)
        .property("async", false)
        .build()
        .map_err(|e| e.to_string())?;
    add_and_link(parent, pad, &sink)
}

fn link_via(
    pad: &gst::Pad,
    parent: &gst::Bin,
    session: &Arc<Session>,
    factory: &str,
) -> Result<(), String> {
    let element = gst::ElementFactory::make(factory)
        .build()
        .map_err(|e| format!("{factory}: {e}"))?;
    watch_pads(&element, session);
    add_and_link(parent, pad, &element)
}

/// Each elementary stream gets its own bounded queue (and thread) before decoding. A demuxer
/// pushes all streams from one thread: without this, the audio sink waiting to preroll
/// would block the thread the video needs, and the graph would never start.
fn link_decoder(pad: &gst::Pad, parent: &gst::Bin, session: &Arc<Session>) -> Result<(), String> {
    let queue = gst::ElementFactory::make("queue")
        .property("max-size-buffers", 0u32)
        .property("max-size-bytes", 64u32 * 1024 * 1024)
        .property("max-size-time", 10_000_000_000u64)
        .build()
        .map_err(|e| format!("queue: {e}"))?;
    add_and_link(parent, pad, &queue)?;
    let src = queue.static_pad("src").ok_or("queue without src pad")?;
    link_via(&src, parent, session, "decodebin")
}

/// Encoded frames held back while the keyframe gate decides (see [`KeyframeGate`]).
#[derive(Default)]
struct Held {
    buffers: Vec<gst::Buffer>,
    bytes: usize,
}

/// Held frames past this are not worth the wait: decode everything instead.
const MAX_HELD_BYTES: usize = 32 << 20;
const MAX_HELD_BUFFERS: usize = 1024;

/// Push held frames to the decoder side, in order, ahead of whatever comes next.
fn release(pad: &gst::Pad, held: &Mutex<Held>) {
    let buffers = std::mem::take(&mut *lock(held)).buffers;
    if buffers.is_empty() {
        return;
    }
    let Some(peer) = pad.peer() else {
        return;
    };
    for buffer in buffers {
        // A failure (flushing, not linked) shows again on the next push, which reports it.
        if peer.chain(buffer).is_err() {
            break;
        }
    }
}

fn add_keyframe_gate(pad: &gst::Pad, session: &Arc<Session>) {
    let held = Arc::new(Mutex::new(Held::default()));
    let weak = Arc::downgrade(session);
    let on_buffers = Arc::clone(&held);
    pad.add_probe(gst::PadProbeType::BUFFER, move |pad, info| {
        let Some(session) = weak.upgrade() else {
            return gst::PadProbeReturn::Remove;
        };
        let Some(buffer) = info.buffer() else {
            return gst::PadProbeReturn::Ok;
        };
        let delta = buffer.flags().contains(gst::BufferFlags::DELTA_UNIT);
        let t = buffer.pts().or(buffer.dts()).map(secs);
        let size = buffer.size();
        let mut gate = lock(&session.gate);
        let was = gate.key_only();
        let mut action = gate.action(t, delta);
        if action == GateAction::Hold {
            let h = lock(&on_buffers);
            if h.buffers.len() >= MAX_HELD_BUFFERS || h.bytes + size > MAX_HELD_BYTES {
                action = gate.fall_back();
            }
        }
        let now = gate.key_only();
        drop(gate);
        if was != now {
            session.feed.stats.keyframe_only.store(now, Ordering::Relaxed);
            session
                .feed
                .metrics
                .keyframe_only
                .with_label_values(&[&session.feed.name])
                .set(i64::from(now));
            tracing::info!(source = %session.feed.name, keyframe_only = now, "Decode mode changed.");
        }
        session.feed.touch();
        match action {
            GateAction::Pass => gst::PadProbeReturn::Ok,
            GateAction::Hold => {
                if let Some(buffer) = info.take_buffer() {
                    let mut h = lock(&on_buffers);
                    h.bytes += size;
                    h.buffers.push(buffer);
                }
                gst::PadProbeReturn::Handled
            }
            GateAction::Release => {
                release(pad, &on_buffers);
                gst::PadProbeReturn::Ok
            }
            GateAction::DiscardHeld => {
                *lock(&on_buffers) = Held::default();
                gst::PadProbeReturn::Ok
            }
        }
    });
    let weak = Arc::downgrade(session);
    pad.add_probe(gst::PadProbeType::EVENT_DOWNSTREAM, move |pad, info| {
        let Some(event) = info.event() else {
            return gst::PadProbeReturn::Ok;
        };
        match event.type_() {
            // The stream ended with frames held: keyframe-only decoding drops them (nothing
            // after the last keyframe is due before the next sample); undecided, they are
            // all there is, so they are decoded.
            gst::EventType::Eos if !lock(&held).buffers.is_empty() => {
                let key_only = weak.upgrade().is_some_and(|s| {
                    let mut gate = lock(&s.gate);
                    gate.key_only() || {
                        gate.fall_back();
                        false
                    }
                });
                if key_only {
                    *lock(&held) = Held::default();
                } else {
                    release(pad, &held);
                }
            }
            gst::EventType::FlushStop => *lock(&held) = Held::default(),
            _ => {}
        }
        gst::PadProbeReturn::Ok
    });
}

/// Output size: longest side at most `max_side`, aspect ratio kept, even dimensions.
pub fn scaled_size(width: u32, height: u32, par: (i32, i32), max_side: u32) -> (u32, u32) {
    let w = f64::from(width) * f64::from(par.0.max(1)) / f64::from(par.1.max(1));
    let h = f64::from(height);
    let scale = (f64::from(max_side) / w.max(h)).min(1.0);
    let even = |x: f64| ((x * scale / 2.0).round() as u32 * 2).max(2);
    (even(w), even(h))
}

fn input_size(caps: &gst::CapsRef) -> Option<(u32, u32, (i32, i32))> {
    let s = caps.structure(0)?;
    let w = s.get::<i32>("width").ok()?;
    let h = s.get::<i32>("height").ok()?;
    let par = s
        .get::<gst::Fraction>("pixel-aspect-ratio")
        .map(|f| (f.numer(), f.denom()))
        .unwrap_or((1, 1));
    Some((w as u32, h as u32, par))
}

fn branch(desc: &str, name: &str, sync: bool) -> Result<gst::Bin, String> {
    let d =
        template::render(name, desc, &Vars::new().raw("sync", sync)).map_err(|e| e.to_string())?;
    gst::parse::bin_from_description(&d, true).map_err(|e| e.to_string())
}

fn link_video_branch(
    pad: &gst::Pad,
    parent: &gst::Bin,
    session: &Arc<Session>,
    caps: &gst::Caps,
) -> Result<(), String> {
    // videoconvertscale (GStreamer 1.22) scales and converts in one pass; older GStreamer
    // gets the two elements it replaced.
    let desc = if gst::ElementFactory::find("videoconvertscale").is_some() {
        template::VIDEO_BRANCH.to_string()
    } else {
        template::VIDEO_BRANCH.replace(
            "videoconvertscale name=vscale",
            "videoscale name=vscale ! videoconvert",
        )
    };
    let bin = branch(&desc, "video_branch", session.params.sync)?;
    let (w, h) = input_size(caps)
        .map(|(w, h, par)| scaled_size(w, h, par, session.params.max_side))
        .unwrap_or((
            session.params.max_side,
            session.params.max_side * 9 / 16 / 2 * 2,
        ));
    let out_caps = gst_video::VideoCapsBuilder::new()
        .format(gst_video::VideoFormat::Rgb)
        .width(w as i32)
        .height(h as i32)
        .pixel_aspect_ratio(gst::Fraction::new(1, 1))
        .build();
    bin.by_name("vcaps")
        .ok_or("video branch template lacks 'vcaps'")?
        .set_property("caps", &out_caps);
    let sink = bin
        .by_name("video_sink")
        .and_then(|e| e.downcast::<gst_app::AppSink>().ok())
        .ok_or("video branch template lacks appsink 'video_sink'")?;
    let weak = Arc::downgrade(session);
    sink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |sink| {
                let session = weak.upgrade().ok_or(gst::FlowError::Flushing)?;
                on_video_sample(sink, &session)
            })
            .build(),
    );
    // The sampler sits before scaling and conversion: only kept frames cost anything more.
    let probe_pad = bin
        .by_name("vscale")
        .and_then(|e| e.static_pad("sink"))
        .ok_or("video branch template lacks 'vscale'")?;
    let weak = Arc::downgrade(session);
    let decoded = session
        .feed
        .metrics
        .frames_decoded
        .with_label_values(&[&session.feed.name]);
    probe_pad.add_probe(gst::PadProbeType::BUFFER, move |pad, info| {
        let Some(session) = weak.upgrade() else {
            return gst::PadProbeReturn::Remove;
        };
        let Some(buffer) = info.buffer() else {
            return gst::PadProbeReturn::Ok;
        };
        session
            .feed
            .stats
            .frames_decoded
            .fetch_add(1, Ordering::Relaxed);
        decoded.inc();
        session.feed.touch();
        let segment = pad.sticky_event::<gst::event::Segment>(0);
        let t = segment.and_then(|s| media_time(&session, s.segment(), buffer.pts()));
        let keep = t.is_some_and(|t| lock(&session.sampler).admit(t));
        if keep {
            gst::PadProbeReturn::Ok
        } else {
            drop_buffer(info)
        }
    });
    add_and_link(parent, pad, &bin)
}

fn on_video_sample(
    sink: &gst_app::AppSink,
    session: &Session,
) -> Result<gst::FlowSuccess, gst::FlowError> {
    let sample = pull_live(sink, session)?;
    let buffer = sample.buffer().ok_or(gst::FlowError::Error)?;
    let caps = sample.caps().ok_or(gst::FlowError::NotNegotiated)?;
    let info = gst_video::VideoInfo::from_caps(caps).map_err(|_| gst::FlowError::NotNegotiated)?;
    let Some(t) = sample
        .segment()
        .and_then(|seg| media_time(session, seg, buffer.pts()))
    else {
        return Ok(gst::FlowSuccess::Ok);
    };
    let frame = gst_video::VideoFrameRef::from_buffer_ref_readable(buffer, &info)
        .map_err(|_| gst::FlowError::Error)?;
    let (w, h) = (info.width() as usize, info.height() as usize);
    let stride = frame.plane_stride()[0] as usize;
    let data = frame.plane_data(0).map_err(|_| gst::FlowError::Error)?;
    let mut rgb = Vec::with_capacity(w * h * 3);
    for row in 0..h {
        rgb.extend_from_slice(&data[row * stride..row * stride + w * 3]);
    }
    session.mark_started(t);
    session.feed.push_frame(VideoFrame {
        t,
        width: w as u32,
        height: h as u32,
        rgb,
        captured: Instant::now(),
    });
    Ok(gst::FlowSuccess::Ok)
}

fn link_audio_branch(
    pad: &gst::Pad,
    parent: &gst::Bin,
    session: &Arc<Session>,
) -> Result<(), String> {
    let bin = branch(template::AUDIO_BRANCH, "audio_branch", session.params.sync)?;
    let sink = bin
        .by_name("audio_sink")
        .and_then(|e| e.downcast::<gst_app::AppSink>().ok())
        .ok_or("audio branch template lacks appsink 'audio_sink'")?;
    let weak = Arc::downgrade(session);
    let weak_eos = Arc::downgrade(session);
    sink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |sink| {
                let session = weak.upgrade().ok_or(gst::FlowError::Flushing)?;
                on_audio_sample(sink, &session)
            })
            .eos(move |_| {
                if let Some(session) = weak_eos.upgrade() {
                    session.flush_audio();
                }
            })
            .build(),
    );
    add_and_link(parent, pad, &bin)
}

fn on_audio_sample(
    sink: &gst_app::AppSink,
    session: &Session,
) -> Result<gst::FlowSuccess, gst::FlowError> {
    let sample = pull_live(sink, session)?;
    let buffer = sample.buffer().ok_or(gst::FlowError::Error)?;
    let t = sample
        .segment()
        .and_then(|seg| media_time(session, seg, buffer.pts()));
    let map = buffer.map_readable().map_err(|_| gst::FlowError::Error)?;
    let samples: Vec<f32> = map
        .as_slice()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if let Some(t) = t {
        session.mark_started(t);
    }
    let (rate, channels) = audio_format(&sample).ok_or(gst::FlowError::NotNegotiated)?;
    let pieces = lock(&session.live_audio)
        .push(t, &samples, rate, channels)
        .map_err(|_| gst::FlowError::NotNegotiated)?;
    for (t, samples) in pieces {
        let out = lock(&session.chunker).push(t, &samples);
        if let Some((t0, t1)) = out.gap {
            session.feed.gap(t0, t1, "discontinuity");
        }
        for c in out.chunks {
            session.feed.push_audio(c);
        }
    }
    Ok(gst::FlowSuccess::Ok)
}

/// Rate and channel count of a raw audio sample (the branch keeps the source's own).
pub fn audio_format(sample: &gst::Sample) -> Option<(u32, usize)> {
    let s = sample.caps()?.structure(0)?;
    let rate = s.get::<i32>("rate").ok()?;
    let channels = s.get::<i32>("channels").ok()?;
    (rate > 0 && channels > 0).then_some((rate as u32, channels as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_picks_one_frame_per_grid_interval() {
        let mut s = Sampler::new(1.0);
        let kept: Vec<f64> = (0..300)
            .map(|i| f64::from(i) / 30.0)
            .filter(|&t| s.admit(t))
            .collect();
        assert_eq!(kept.len(), 10);
        for (i, t) in kept.iter().enumerate() {
            assert!((t - i as f64).abs() < 0.04, "{kept:?}");
        }
        let mut s = Sampler::new(2.0);
        assert_eq!((0..60).filter(|&i| s.admit(f64::from(i) / 30.0)).count(), 4);
    }

    /// Feed a stream of (t, delta) to a gate the way the probe does; the buffers (by index)
    /// that reach the decoder, in order.
    fn decoded(g: &mut KeyframeGate, frames: &[(f64, bool)]) -> Vec<usize> {
        let (mut out, mut held) = (Vec::new(), Vec::new());
        for (i, &(t, delta)) in frames.iter().enumerate() {
            match g.action(Some(t), delta) {
                GateAction::Pass => out.push(i),
                GateAction::Hold => held.push(i),
                GateAction::Release => {
                    out.append(&mut held);
                    out.push(i);
                }
                GateAction::DiscardHeld => {
                    held.clear();
                    out.push(i);
                }
            }
        }
        // At the end, as the EOS probe does: dropped when keyframe-only, else decoded.
        if !g.key_only() {
            out.append(&mut held);
        }
        out
    }

    fn gop_stream(seconds: u32, fps: u32, gop: u32) -> Vec<(f64, bool)> {
        (0..seconds * fps)
            .map(|i| (f64::from(i) / f64::from(fps), i % gop != 0))
            .collect()
    }

    #[test]
    fn gate_switches_to_keyframes_only_when_gop_allows() {
        let mut g = KeyframeGate::new(true, 1.0);
        let out = decoded(&mut g, &gop_stream(10, 30, 30));
        assert!(g.key_only());
        // Not a single delta frame is decoded: the first GOP's were held, then discarded.
        assert_eq!(out, (0..10).map(|s| s * 30).collect::<Vec<_>>());
    }

    #[test]
    fn gate_releases_held_frames_in_order_when_the_gop_is_long() {
        // A 2 s GOP at 1 fps: never key-only, even after a scene-cut keyframe (i = 75), and
        // every frame reaches the decoder exactly once, in order.
        let mut stream = gop_stream(20, 30, 60);
        stream[75].1 = false;
        let mut g = KeyframeGate::new(true, 1.0);
        let out = decoded(&mut g, &stream);
        assert!(!g.key_only());
        assert_eq!(out, (0..stream.len()).collect::<Vec<_>>());
        // A stream that ends while frames are held still gets them (the probe flushes at EOS).
        let mut g = KeyframeGate::new(true, 1.0);
        let short = gop_stream(1, 30, 30);
        assert_eq!(decoded(&mut g, &short), (0..30).collect::<Vec<_>>());
        // A GOP that lengthens after keyframe-only decoding began: its held frames are
        // released (none lost), then everything is decoded.
        let stream: Vec<(f64, bool)> = (0..300)
            .map(|i| {
                let key = if i < 150 { i % 30 == 0 } else { i % 60 == 30 };
                (f64::from(i) / 30.0, !key)
            })
            .collect();
        let mut g = KeyframeGate::new(true, 1.0);
        let out = decoded(&mut g, &stream);
        assert!(!g.key_only());
        let mut want: Vec<usize> = (0..5).map(|s| s * 30).collect();
        want.extend(150..300);
        assert_eq!(out, want);
        // Disabled by config.
        let mut g = KeyframeGate::new(false, 1.0);
        let stream = gop_stream(10, 30, 30);
        assert_eq!(decoded(&mut g, &stream).len(), stream.len());
    }

    #[test]
    fn scaling_keeps_aspect_and_never_upscales() {
        assert_eq!(scaled_size(1920, 1080, (1, 1), 768), (768, 432));
        assert_eq!(scaled_size(320, 240, (1, 1), 768), (320, 240));
        assert_eq!(scaled_size(720, 576, (16, 15), 768), (768, 576));
    }
}
