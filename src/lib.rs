//! percept: offline, real-time media analysis.
pub mod model;
pub mod preprocess;
