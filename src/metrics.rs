//! Metric names and registration in one place. Labels are bounded: the source's short name,
//! a media kind, a reason or a state from a fixed set. Never a URL.

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::event::SourceState;

pub struct Metrics {
    pub registry: Registry,
    pub frames_decoded: IntCounterVec,
    pub frames_sampled: IntCounterVec,
    pub frames_analyzed: IntCounterVec,
    pub frames_dropped: IntCounterVec,
    pub audio_seconds_in: prometheus::CounterVec,
    pub audio_seconds_analyzed: prometheus::CounterVec,
    pub audio_seconds_dropped: prometheus::CounterVec,
    pub queue_depth: IntGaugeVec,
    pub queue_bytes: IntGaugeVec,
    pub queue_budget_bytes: IntGauge,
    pub queue_bytes_total: IntGauge,
    pub latency: HistogramVec,
    pub source_state: IntGaugeVec,
    pub reconnects: IntCounterVec,
    pub gaps: IntCounterVec,
    pub gap_seconds: prometheus::CounterVec,
    pub keyframe_only: IntGaugeVec,
    pub level_dbfs: GaugeVec,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn fcounter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::CounterVec {
    let c = prometheus::CounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

impl Metrics {
    // Names and label sets are constants checked by the tests, so registration cannot fail.
    #[allow(clippy::expect_used)]
    pub fn new() -> Metrics {
        let r = Registry::new_custom(Some("percept".into()), None).expect("valid prefix");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "capture_to_analysis_seconds",
                "Wall time from the appsink to the end of analysis",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["source", "media"],
        )
        .expect("valid metric");
        r.register(Box::new(latency.clone()))
            .expect("unique metric");
        let queue_budget_bytes =
            IntGauge::new("queue_budget_bytes", "Byte budget shared by all queues")
                .expect("valid metric");
        r.register(Box::new(queue_budget_bytes.clone()))
            .expect("unique metric");
        let queue_bytes_total =
            IntGauge::new("queue_bytes_all_sources", "Bytes queued across all queues")
                .expect("valid metric");
        r.register(Box::new(queue_bytes_total.clone()))
            .expect("unique metric");
        let level = GaugeVec::new(
            Opts::new("audio_level_dbfs", "Level of the last analysed audio chunk"),
            &["source"],
        )
        .expect("valid metric");
        r.register(Box::new(level.clone())).expect("unique metric");
        Metrics {
            frames_decoded: counter(
                &r,
                "frames_decoded_total",
                "Video frames out of the decoder",
                &["source"],
            ),
            frames_sampled: counter(
                &r,
                "frames_sampled_total",
                "Frames kept by the rate sampler",
                &["source"],
            ),
            frames_analyzed: counter(
                &r,
                "frames_analyzed_total",
                "Frames the worker analysed",
                &["source"],
            ),
            frames_dropped: counter(
                &r,
                "frames_dropped_total",
                "Sampled frames dropped, by reason",
                &["source", "reason"],
            ),
            audio_seconds_in: fcounter(
                &r,
                "audio_seconds_in_total",
                "Seconds of audio chunked",
                &["source"],
            ),
            audio_seconds_analyzed: fcounter(
                &r,
                "audio_seconds_analyzed_total",
                "Seconds of audio the worker analysed",
                &["source"],
            ),
            audio_seconds_dropped: fcounter(
                &r,
                "audio_seconds_dropped_total",
                "Seconds of audio dropped, by reason",
                &["source", "reason"],
            ),
            queue_depth: gauge(
                &r,
                "queue_depth",
                "Items queued for the worker",
                &["source", "media"],
            ),
            queue_bytes: gauge(
                &r,
                "queue_bytes",
                "Bytes queued for the worker",
                &["source", "media"],
            ),
            queue_budget_bytes,
            queue_bytes_total,
            latency,
            source_state: gauge(
                &r,
                "source_state",
                "1 for the source's current state",
                &["source", "state"],
            ),
            reconnects: counter(&r, "reconnects_total", "Reconnect attempts", &["source"]),
            gaps: counter(&r, "gaps_total", "Gaps in the media timeline", &["source"]),
            gap_seconds: fcounter(
                &r,
                "gap_seconds_total",
                "Media seconds lost to gaps",
                &["source"],
            ),
            keyframe_only: gauge(
                &r,
                "keyframe_only",
                "1 while the source decodes keyframes only",
                &["source"],
            ),
            level_dbfs: level,
            registry: r,
        }
    }

    pub fn set_state(&self, source: &str, state: SourceState) {
        for s in SourceState::ALL {
            self.source_state
                .with_label_values(&[source, s.as_str()])
                .set(i64::from(s == state));
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
