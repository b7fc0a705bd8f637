//! percept: offline, real-time media analysis. GStreamer graphs split each source into video
//! and audio, bounded queues carry them to one worker, and events come out as JSON Lines.
//!
//! Data flow, top to bottom: [`source`] (what to open) -> [`ingest`] (graphs, supervision) ->
//! [`queue`] (bounded, counted) -> [`worker`] (analysis: [`signal`]) -> [`sink`] (events) ->
//! [`http`] / [`metrics`]. The Gemma 4 model lives in [`model`].

pub mod caption;
pub mod config;
pub mod control;
pub mod event;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod model;
pub mod preprocess;
pub mod progress;
pub mod queue;
pub mod run;
pub mod signal;
pub mod sink;
pub mod source;
pub mod testsrc;
pub mod worker;
