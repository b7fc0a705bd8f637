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
    pub model: ModelMetrics,
}

/// The shared model and the governor of each source it serves.
pub struct ModelMetrics {
    /// 1 once the model answers; 0 while loading, disabled or unavailable.
    pub ready: IntGauge,
    /// 1 when the model cannot be had (signal analysis only).
    pub unavailable: IntGauge,
    /// Model steps that panicked (caught: their requests got `error` events).
    pub panics: prometheus::IntCounter,
    pub requests: IntCounterVec,
    pub errors: IntCounterVec,
    /// Media not sent to the model, by reason (gated, superseded, unavailable...).
    pub skipped: IntCounterVec,
    pub batch_size: prometheus::Histogram,
    pub step_seconds: prometheus::Histogram,
    /// Wall time from capture to the model's answer.
    pub latency: HistogramVec,
    pub tokens: IntCounterVec,
    pub lag_seconds: GaugeVec,
    pub effective_fps: GaugeVec,
    pub rtf: GaugeVec,
    pub governor_level: IntGaugeVec,
    pub soft_tokens: IntGaugeVec,
}

fn fgauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> prometheus::Histogram {
    let h = prometheus::Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

impl ModelMetrics {
    #[allow(clippy::expect_used)]
    fn new(r: &Registry) -> ModelMetrics {
        let ready = IntGauge::new("model_ready", "1 once the model answers").expect("valid metric");
        r.register(Box::new(ready.clone())).expect("unique metric");
        let unavailable = IntGauge::new(
            "model_unavailable",
            "1 when the model cannot be loaded (signal analysis only)",
        )
        .expect("valid metric");
        r.register(Box::new(unavailable.clone()))
            .expect("unique metric");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "model_latency_seconds",
                "Wall time from capture to the model's answer",
            )
            .buckets(vec![0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0]),
            &["source", "task"],
        )
        .expect("valid metric");
        r.register(Box::new(latency.clone()))
            .expect("unique metric");
        let panics = prometheus::IntCounter::new(
            "model_panics_total",
            "Model steps that panicked (caught; the model was reloaded or marked unavailable)",
        )
        .expect("valid metric");
        r.register(Box::new(panics.clone())).expect("unique metric");
        ModelMetrics {
            ready,
            unavailable,
            panics,
            requests: counter(
                r,
                "model_requests_total",
                "Requests answered by the model",
                &["source", "task"],
            ),
            errors: counter(
                r,
                "model_errors_total",
                "Requests that failed or gave invalid answers",
                &["source", "task"],
            ),
            skipped: counter(
                r,
                "model_skipped_total",
                "Media not sent to the model, by reason",
                &["source", "reason"],
            ),
            batch_size: histogram(
                r,
                "model_batch_size",
                "Requests per batched model step (across sources)",
                vec![1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0],
            ),
            step_seconds: histogram(
                r,
                "model_step_seconds",
                "Wall time of one batched model step",
                vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
            ),
            latency,
            tokens: counter(
                r,
                "model_tokens_total",
                "Prompt and generated tokens",
                &["kind"],
            ),
            lag_seconds: fgauge(
                r,
                "lag_seconds",
                "Media seconds between the newest input and the newest model result",
                &["source"],
            ),
            effective_fps: fgauge(
                r,
                "effective_fps",
                "Frames per second reaching the model",
                &["source"],
            ),
            rtf: fgauge(
                r,
                "model_rtf",
                "Model seconds per media second, by modality",
                &["source", "media"],
            ),
            governor_level: gauge(
                r,
                "governor_level",
                "Degradation step of the real-time governor (0 = full quality)",
                &["source"],
            ),
            soft_tokens: gauge(
                r,
                "image_soft_tokens",
                "Image soft-token budget in use",
                &["source"],
            ),
        }
    }
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
        let r = Registry::new_custom(Some("percept".into()), crate::fleet::shard::metric_labels())
            .expect("valid prefix");
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
            model: ModelMetrics::new(&r),
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
