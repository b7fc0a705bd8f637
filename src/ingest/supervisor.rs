//! One source's lifecycle: connect, run, watch for stalls, reconnect with capped exponential
//! backoff and jitter, and report every state change and every outage as events and metrics.

use gstreamer as gst;
use gstreamer::prelude::*;
use rand::Rng;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::graph::{self, GraphParams};
use super::session::Session;
use super::{audio_file, SourceInput};
use crate::event::{Body, SourceState};
use crate::ingest::config::ReconnectConfig;
use crate::source::{redact_text as redact, SourceKind, SourceSpec};

/// Current state of every source, for `/healthz`.
#[derive(Default)]
pub struct StateBoard {
    states: Mutex<BTreeMap<String, SourceState>>,
}

impl StateBoard {
    pub fn set(&self, source: &str, state: SourceState) {
        self.states
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(source.to_string(), state);
    }

    pub fn get(&self, source: &str) -> Option<SourceState> {
        self.states
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(source)
            .copied()
    }

    pub fn snapshot(&self) -> BTreeMap<String, SourceState> {
        self.states
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Seconds a file may take to give its first sample before it is called damaged (at least
/// `[watchdog] stall_seconds`); generous, since a loaded machine starts graphs slowly.
const FILE_START_SECONDS: f64 = 20.0;

/// How one connection ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Eos,
    Stopped,
    Stalled(f64),
    Error { message: String, fatal: bool },
}

pub struct Supervisor {
    pub spec: SourceSpec,
    pub params: GraphParams,
    pub reconnect: ReconnectConfig,
    pub stall_seconds: f64,
    pub realtime: bool,
    pub feed: Arc<SourceInput>,
    pub stop: Arc<AtomicBool>,
    pub board: Arc<StateBoard>,
}

/// Delay before reconnect attempt `attempt` (1-based): exponential, capped, jittered.
pub fn backoff(cfg: &ReconnectConfig, attempt: u32, rng: &mut impl Rng) -> Duration {
    let base = cfg.initial_seconds
        * cfg
            .multiplier
            .powi(attempt.saturating_sub(1).min(64) as i32);
    let capped = base.min(cfg.max_seconds);
    let spread = if cfg.jitter > 0.0 {
        rng.random_range(-cfg.jitter..cfg.jitter)
    } else {
        0.0
    };
    Duration::from_secs_f64(
        (capped * (1.0 + spread)).clamp(0.0, cfg.max_seconds * (1.0 + cfg.jitter)),
    )
}

impl Supervisor {
    fn set_state(
        &self,
        state: SourceState,
        reason: Option<String>,
        attempt: Option<u32>,
        retry_in: Option<f64>,
    ) {
        self.board.set(&self.spec.name, state);
        self.feed.metrics.set_state(&self.spec.name, state);
        let t = self.feed.last_media_end().unwrap_or(0.0);
        self.feed.emit(
            t,
            None,
            Body::State {
                state,
                reason,
                attempt,
                retry_in,
                governor: None,
                shard: crate::fleet::shard::label(),
            },
        );
    }

    fn error(&self, message: &str) {
        let t = self.feed.last_media_end().unwrap_or(0.0);
        tracing::error!(source = %self.spec.name, uri = %self.spec.display, "{message}");
        *self
            .feed
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(message.to_string());
        self.feed.emit(
            t,
            None,
            Body::Error {
                message: message.to_string(),
                raw: None,
            },
        );
    }

    /// Run until EOS, a fatal error, too many failed attempts, or stop. Returns the final state.
    pub fn run(self) -> SourceState {
        let epoch = Instant::now();
        // A custom template means the user wants GStreamer for this file.
        if let (Some(path), None) = (self.spec.audio_file_path(), &self.params.custom_template) {
            return self.run_audio_file(path.to_path_buf());
        }
        if let SourceKind::File(path) = &self.spec.kind {
            if let Err(msg) = check_file(path) {
                self.set_state(SourceState::Connecting, None, None, None);
                self.error(&msg);
                self.set_state(SourceState::Failed, Some(msg), None, None);
                return SourceState::Failed;
            }
        }
        let retries = self.spec.kind.reconnects();
        let live = self.spec.kind.is_live() || self.realtime;
        let mut rng = rand::rng();
        let mut attempt = 0u32;
        let mut ever_ran = false;
        let mut outage_from: Option<f64> = None;
        self.set_state(SourceState::Connecting, None, None, None);
        loop {
            let offset = if self.spec.kind.is_live() {
                epoch.elapsed().as_secs_f64()
            } else {
                0.0
            };
            let session = Session::new(self.feed.clone(), self.params.clone(), offset);
            let (outcome, started) = match graph::build(&self.spec, &session) {
                Ok(pipeline) => self.run_pipeline(
                    &pipeline,
                    &session,
                    live,
                    &mut outage_from,
                    &mut attempt,
                    &mut ever_ran,
                ),
                Err(e) => (
                    Outcome::Error {
                        message: e.to_string(),
                        fatal: true,
                    },
                    false,
                ),
            };
            if started {
                ever_ran = true;
            }
            match outcome {
                Outcome::Stopped => {
                    self.set_state(SourceState::Eos, Some("stopped".into()), None, None);
                    return SourceState::Eos;
                }
                // A camera may send EOS when it reboots; an HTTP file or playlist that ends is done.
                Outcome::Eos if !retries || matches!(self.spec.kind, SourceKind::Http { .. }) => {
                    if !session.has_video() && !session.has_audio() {
                        let msg = "no audio or video stream found".to_string();
                        self.error(&msg);
                        self.set_state(SourceState::Failed, Some(msg), None, None);
                        return SourceState::Failed;
                    }
                    self.set_state(SourceState::Eos, None, None, None);
                    return SourceState::Eos;
                }
                Outcome::Error { message, fatal } if fatal || !retries => {
                    self.error(&message);
                    self.set_state(SourceState::Failed, Some(message), None, None);
                    return SourceState::Failed;
                }
                other => {
                    let reason = match &other {
                        Outcome::Eos => "end of stream".to_string(),
                        Outcome::Stalled(s) => format!("no data for {s:.1} s"),
                        Outcome::Error { message, .. } => message.clone(),
                        // Handled by the first arm; kept for exhaustiveness.
                        Outcome::Stopped => "stopped".to_string(),
                    };
                    if outage_from.is_none() {
                        outage_from = self.feed.last_media_end().or(Some(offset));
                    }
                    attempt += 1;
                    let limit = if ever_ran {
                        self.reconnect.max_attempts
                    } else {
                        self.reconnect.connect_attempts
                    };
                    if limit > 0 && attempt >= limit {
                        let msg = format!("giving up after {attempt} attempts: {reason}");
                        self.error(&msg);
                        self.set_state(SourceState::Failed, Some(msg), None, None);
                        return SourceState::Failed;
                    }
                    let delay = backoff(&self.reconnect, attempt, &mut rng);
                    tracing::warn!(source = %self.spec.name, attempt, delay_s = delay.as_secs_f64(), %reason, "Reconnecting.");
                    self.feed.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    self.feed
                        .metrics
                        .reconnects
                        .with_label_values(&[&self.spec.name])
                        .inc();
                    self.set_state(
                        SourceState::Reconnecting,
                        Some(reason),
                        Some(attempt),
                        Some(delay.as_secs_f64()),
                    );
                    if !self.sleep(delay) {
                        self.set_state(SourceState::Eos, Some("stopped".into()), None, None);
                        return SourceState::Eos;
                    }
                }
            }
        }
    }

    /// Sleep unless stopped; false when stopped.
    fn sleep(&self, d: Duration) -> bool {
        let end = Instant::now() + d;
        while Instant::now() < end {
            if self.stop.load(Ordering::Relaxed) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20).min(end - Instant::now()));
        }
        !self.stop.load(Ordering::Relaxed)
    }

    /// Play one connection until it ends. Returns the outcome and whether media arrived.
    fn run_pipeline(
        &self,
        pipeline: &gst::Pipeline,
        session: &Arc<Session>,
        live: bool,
        outage_from: &mut Option<f64>,
        attempt: &mut u32,
        ever_ran: &mut bool,
    ) -> (Outcome, bool) {
        let Some(bus) = pipeline.bus() else {
            return (
                Outcome::Error {
                    message: "pipeline has no bus".into(),
                    fatal: true,
                },
                false,
            );
        };
        self.feed.touch();
        let mut started = false;
        let outcome = if pipeline.set_state(gst::State::Playing).is_err() {
            // The reason is on the bus.
            bus.timed_pop_filtered(gst::ClockTime::from_seconds(2), &[gst::MessageType::Error])
                .map(|m| describe(&m, &self.spec))
                .unwrap_or(Outcome::Error {
                    message: "cannot start graph".into(),
                    fatal: false,
                })
        } else {
            loop {
                if self.stop.load(Ordering::Relaxed) {
                    break Outcome::Stopped;
                }
                if !started {
                    if let Some(t0) = session.first_media_time() {
                        started = true;
                        *attempt = 0;
                        *ever_ran = true;
                        if let Some(from) = outage_from.take() {
                            self.feed.gap(from, t0, "outage");
                        }
                        self.set_state(SourceState::Running, None, None, None);
                        if let Some(d) = pipeline.query_duration::<gst::ClockTime>() {
                            self.feed.set_duration(d.nseconds() as f64 / 1e9);
                        }
                    }
                }
                if let Some(msg) = bus.timed_pop(gst::ClockTime::from_mseconds(100)) {
                    use gst::MessageView;
                    match msg.view() {
                        MessageView::Eos(_) => break Outcome::Eos,
                        MessageView::Error(_) => break describe(&msg, &self.spec),
                        MessageView::Warning(w) => {
                            tracing::warn!(source = %self.spec.name, warning = %redact(&w.error().to_string()), "GStreamer warning.");
                        }
                        _ => {}
                    }
                }
                // Files under backpressure legitimately wait on the worker: no watchdog there.
                if live {
                    let idle = self.feed.idle_seconds();
                    if idle >= self.stall_seconds {
                        break Outcome::Stalled(idle);
                    }
                } else if !started {
                    // Before its first sample a file cannot be held back by the worker: a
                    // graph that gives nothing for this long is stuck on a damaged file (a
                    // demuxer can wait forever on one without posting an error).
                    let idle = self.feed.idle_seconds();
                    if idle >= FILE_START_SECONDS.max(self.stall_seconds) {
                        break Outcome::Error {
                            message: format!(
                                "no audio or video after {idle:.0} s: the file is damaged or truncated"
                            ),
                            fatal: true,
                        };
                    }
                }
            }
        };
        session.close();
        teardown(pipeline.clone());
        (outcome, started)
    }

    fn run_audio_file(&self, path: std::path::PathBuf) -> SourceState {
        self.set_state(SourceState::Connecting, None, None, None);
        if let Err(msg) = check_file(&path) {
            self.error(&msg);
            self.set_state(SourceState::Failed, Some(msg), None, None);
            return SourceState::Failed;
        }
        self.set_state(SourceState::Running, None, None, None);
        match audio_file::run(
            &self.feed,
            &path,
            self.params.chunk_seconds,
            self.realtime,
            &self.stop,
        ) {
            Ok(_) => {
                self.set_state(SourceState::Eos, None, None, None);
                SourceState::Eos
            }
            Err(e) => {
                let msg = e.to_string();
                self.error(&msg);
                self.set_state(SourceState::Failed, Some(msg), None, None);
                SourceState::Failed
            }
        }
    }
}

/// Problems with a local file that GStreamer would report vaguely.
fn check_file(path: &std::path::Path) -> Result<(), String> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err("no such file".into()),
        Err(e) => Err(format!("cannot open: {e}")),
        Ok(m) if m.is_dir() => Err("is a directory, not a media file".into()),
        Ok(m) if m.len() == 0 => Err("file is empty".into()),
        Ok(_) => std::fs::File::open(path)
            .map(|_| ())
            .map_err(|e| format!("cannot open: {e}")),
    }
}

/// One line from a bus error: the message, the cause GStreamer gives, never a password.
fn describe(msg: &gst::Message, spec: &SourceSpec) -> Outcome {
    let gst::MessageView::Error(err) = msg.view() else {
        return Outcome::Error {
            message: "unknown error".into(),
            fatal: false,
        };
    };
    let e = err.error();
    let fatal =
        e.matches(gst::ResourceError::NotAuthorized) || matches!(spec.kind, SourceKind::File(_));
    let mut text = e.to_string();
    if e.matches(gst::ResourceError::NotAuthorized) {
        text = format!("authentication failed (wrong user or password?): {text}");
    } else if e.matches(gst::StreamError::TypeNotFound) || e.matches(gst::StreamError::WrongType) {
        text = format!("not a recognised media file: {text}");
    } else if e.matches(gst::CoreError::MissingPlugin) || e.matches(gst::StreamError::CodecNotFound)
    {
        text = format!("unsupported codec: {text}");
    }
    // The debug string's last line usually names the concrete cause.
    if let Some(debug) = err.debug() {
        if let Some(last) = debug.lines().rev().find(|l| !l.trim().is_empty()) {
            let last = last.trim();
            if !last.contains(".c(") && !last.starts_with('/') && last != text {
                text = format!("{text}: {last}");
            }
        }
    }
    let text = redact(&text.replace('\n', " "));
    Outcome::Error {
        message: text,
        fatal,
    }
}

/// Set a graph to NULL without letting a dead network peer block the supervisor: rtspsrc
/// may wait for a TEARDOWN reply.
fn teardown(pipeline: gst::Pipeline) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = pipeline.set_state(gst::State::Null);
        let _ = tx.send(());
    });
    if rx.recv_timeout(Duration::from_secs(3)).is_err() {
        tracing::warn!("Graph teardown is slow; continuing without waiting.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let cfg = ReconnectConfig {
            initial_seconds: 0.5,
            max_seconds: 4.0,
            multiplier: 2.0,
            jitter: 0.2,
            ..Default::default()
        };
        let mut rng = rand::rng();
        for (attempt, nominal) in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (10, 4.0)] {
            for _ in 0..50 {
                let d = backoff(&cfg, attempt, &mut rng).as_secs_f64();
                assert!(
                    d >= nominal * 0.8 - 1e-9 && d <= nominal * 1.2 + 1e-9,
                    "{attempt}: {d}"
                );
            }
        }
    }
}
