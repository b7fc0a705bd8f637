//! Builds one source's GStreamer graph: the source part from its template, then, as streams
//! appear, a decoder per elementary stream and the video and audio branches
//! ([`super::branch`]) that end in appsinks feeding the source's [`SourceInput`](super::SourceInput). One
//! [`Session`] per (re)connection holds the per-connection state.

use gstreamer as gst;
use gstreamer::prelude::*;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::branch::{link_audio_branch, link_video_branch};
use super::keyframe::add_keyframe_gate;
use super::session::Session;
use super::template::{self, Vars};
use crate::source::{SourceKind, SourceSpec};

/// Kept here for callers that read a raw sample's format (see [`super::branch`]).
pub use super::branch::audio_format;

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
pub(super) fn add_and_link(
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
