//! Starts and stops the at-least-once outputs of a run (MQTT, webhooks) over one outbox
//! folder: `[outbox] max_mib` is shared evenly by the destinations.

use std::path::Path;

use crate::config::{Config, TaskKind};
use crate::sink::homeassistant::SourceInfo;
use crate::sink::mqtt::MqttSink;
use crate::sink::outbox::Outbox;
use crate::sink::Events;
use crate::tasks::webhook::Webhooks;

/// The running outputs; `stop` delivers what it can in a bounded time, leaving the rest on
/// disk for the next start.
#[derive(Default)]
pub struct Outputs {
    pub mqtt: Option<MqttSink>,
    pub webhooks: Option<Webhooks>,
}

impl Outputs {
    /// `names` are the effective names of `cfg.sources`, in order (for Home Assistant).
    pub fn start(
        cfg: &Config,
        events: &Events,
        registry: &prometheus::Registry,
        names: &[String],
    ) -> Result<Outputs, String> {
        let destinations = usize::from(cfg.mqtt.enabled) + cfg.alerts.webhooks.len();
        if destinations == 0 {
            return Ok(Outputs::default());
        }
        crate::sink::outbox::metrics(Some(registry));
        let share = (cfg.outbox.max_mib.saturating_mul(1 << 20)) / destinations as u64;
        let dir = Path::new(&cfg.outbox.dir);
        let mut out = Outputs::default();
        if cfg.mqtt.enabled {
            let outbox = Outbox::open(&dir.join("mqtt"), share)
                .map_err(|e| format!("[outbox] for MQTT: {e}"))?;
            let sources: Vec<SourceInfo> = names
                .iter()
                .zip(&cfg.sources)
                .map(|(name, sc)| SourceInfo {
                    name: name.clone(),
                    questions: if sc.task == TaskKind::Watch {
                        sc.questions.clone()
                    } else {
                        Vec::new()
                    },
                })
                .collect();
            out.mqtt = Some(
                MqttSink::start(&cfg.mqtt, outbox, events, &sources)
                    .map_err(|e| format!("[mqtt]: {e}"))?,
            );
        }
        if !cfg.alerts.webhooks.is_empty() {
            out.webhooks = Some(Webhooks::start(
                &cfg.alerts.webhooks,
                cfg.alerts.webhook_attempts,
                dir,
                share,
                events,
            )?);
        }
        Ok(out)
    }

    pub fn stop(self) {
        // Both flush at once (each within its own bound).
        let Outputs { mqtt, webhooks } = self;
        let web = std::thread::spawn(move || {
            if let Some(w) = webhooks {
                w.stop();
            }
        });
        if let Some(m) = mqtt {
            let st = m.stop();
            tracing::info!(
                published = st.published,
                acked = st.acked,
                dropped = st.dropped,
                pending = st.pending,
                "MQTT sink stopped."
            );
        }
        let _ = web.join();
    }
}
