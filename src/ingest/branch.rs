//! The two branches a graph ends in: decoded video sampled, scaled to RGB and handed to the
//! source's [`SourceInput`](super::SourceInput) as frames; decoded audio resampled to 16 kHz mono and cut
//! into chunks. Both end in an appsink whose callbacks run on GStreamer streaming threads.

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;
use gstreamer_video::prelude::*;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::graph::add_and_link;
use super::session::{media_time, Session};
use super::template::{self, Vars};
use super::VideoFrame;
use crate::lock;

/// Drop a buffer from a probe by consuming it. (`PadProbeReturn::Drop` makes GStreamer 1.22
/// unref an already-released buffer with these bindings: criticals, then a stalled stream.)
fn drop_buffer(info: &mut gst::PadProbeInfo) -> gst::PadProbeReturn {
    drop(info.take_buffer());
    gst::PadProbeReturn::Handled
}

/// Pull the sample an appsink offers, unless this connection has been torn down.
fn pull_live(sink: &gst_app::AppSink, session: &Session) -> Result<gst::Sample, gst::FlowError> {
    let sample = sink.pull_sample().map_err(|_| gst::FlowError::Flushing)?;
    if !session.alive.load(Ordering::Acquire) {
        return Err(gst::FlowError::Flushing);
    }
    Ok(sample)
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

pub(super) fn link_video_branch(
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

pub(super) fn link_audio_branch(
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
    fn scaling_keeps_aspect_and_never_upscales() {
        assert_eq!(scaled_size(1920, 1080, (1, 1), 768), (768, 432));
        assert_eq!(scaled_size(320, 240, (1, 1), 768), (320, 240));
        assert_eq!(scaled_size(720, 576, (16, 15), 768), (768, 576));
    }
}
