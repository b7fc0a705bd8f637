//! Keyframe-only decoding when the stream allows it: [`KeyframeGate`] decides per encoded
//! buffer, and a pad probe in front of the video decoder ([`add_keyframe_gate`]) holds,
//! releases or discards buffers as it says.

use gstreamer as gst;
use gstreamer::prelude::*;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use super::session::{secs, Session};
use crate::lock;

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

/// Put the source's keyframe gate on `pad`, the encoded video stream before its decoder.
pub(super) fn add_keyframe_gate(pad: &gst::Pad, session: &Arc<Session>) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
