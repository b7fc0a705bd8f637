//! percept: offline, real-time media analysis.
