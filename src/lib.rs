//! percept: offline, real-time media analysis.
pub mod model;
