//! percept: offline, real-time media analysis. GStreamer graphs split each source into video
//! and audio, bounded queues carry them to one worker, and events come out as JSON Lines.
//!
//! Data flow, top to bottom: [`source`] (what to open) -> [`ingest`] (graphs, supervision) ->
//! [`queue`] (bounded, counted) -> [`worker`] (analysis: [`signal`]) -> [`sink`] (events) ->
//! [`http`] / [`metrics`]. The worker hands frames and chunks to per-source [`tasks`]
//! (gates, governor), whose jobs the [`engine`] answers in batches with the Gemma 4 [`model`].

pub mod analyze;
pub mod bench;
pub mod caption;
pub mod clip_bench;
pub mod config;
pub mod control;
pub mod engine;
pub mod event;
pub mod fleet;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod model;
pub mod pipeline_bench;
pub mod preprocess;
pub mod progress;
pub mod queue;
pub mod report;
pub mod run;
pub mod signal;
pub mod sink;
pub mod source;
pub mod tasks;
pub mod testsrc;
pub mod worker;

/// Locks a mutex, recovering from poisoning: the data behind percept's mutexes stays valid
/// when a holder panics (counters, slots, boards), so one panic must not cascade.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
