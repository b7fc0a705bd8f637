#![allow(clippy::unwrap_used)]

//! Integration tests: one binary, a module per area. Media is made by the tests themselves
//! (GStreamer test sources, x264, ffmpeg, espeak-ng).

mod analyze;
mod bad_input;
mod bench_vs_llamacpp;
mod browser;
mod common;
mod config_files;
mod control_api;
mod durable;
mod faults;
mod files;
mod fleet;
mod http_surfaces;
mod live;
mod model_worker;
mod mqtt;
mod page;
mod report;
mod rtsp;
mod security;
