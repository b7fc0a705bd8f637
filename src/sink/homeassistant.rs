//! Home Assistant MQTT discovery (`[mqtt] homeassistant = true`): each source appears in
//! Home Assistant as a device, with no YAML on the Home Assistant side.
//!
//! Per source `<s>` (topic level of the source name) and node `<n>` (the `client_id`, made
//! id-safe), retained configs are published to `<discovery_prefix>/<component>/<n>/<object>/config`:
//! - `binary_sensor` per `watch` question: state `ON` while the latest answer is yes (an
//!   alert), `OFF` after a no, on `<topic_prefix>/<s>/ha/watch/<question slug>`;
//! - `sensor` "Description": the latest description, scene or final caption text, on
//!   `<topic_prefix>/<s>/ha/text` as JSON `{"text", "kind", "t", "id"}` (state: the text's
//!   first 255 characters, Home Assistant's limit; the whole text is an attribute);
//! - `image` "Snapshot": the latest alert snapshot, JPEG bytes on `<topic_prefix>/<s>/ha/snapshot`.
//!
//! Every entity is available while `<topic_prefix>/status` is `online`: percept publishes
//! `online` (retained) on each connect, `offline` when it stops, and the broker publishes
//! its last will `offline` when percept dies or its connection is lost.
//!
//! States are retained too, so Home Assistant shows the latest ones after its own restart.
//! Configs are sent again on every connect (a broker without persistence forgets them).

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde_json::json;

use crate::event::{Body, CaptionStatus, Event};
use crate::sink::config::MqttConfig;
use crate::sink::mqtt::topic_level;

/// A source known from the config before its first event.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceInfo {
    pub name: String,
    /// Its `watch` questions (empty for other tasks).
    pub questions: Vec<String>,
}

/// One MQTT message to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

#[derive(Default)]
struct Device {
    questions: Vec<String>,
    /// Latest answer per question, to publish only changes.
    answers: BTreeMap<String, bool>,
}

pub struct HomeAssistant {
    discovery: String,
    prefix: String,
    node: String,
    devices: Mutex<BTreeMap<String, Device>>,
}

/// `[a-zA-Z0-9_-]` only (discovery topic levels and ids).
fn id_safe(s: &str) -> String {
    let out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() {
        "_".into()
    } else {
        out
    }
}

/// A stable short id for a question: its words (40 characters at most), then a hash of the
/// whole text so two questions with the same beginning differ.
pub fn question_slug(q: &str) -> String {
    let mut words = String::new();
    for c in q.trim().chars().flat_map(char::to_lowercase) {
        if c.is_ascii_alphanumeric() {
            words.push(c);
        } else if !words.ends_with('_') && !words.is_empty() {
            words.push('_');
        }
    }
    let words: String = words.trim_end_matches('_').chars().take(40).collect();
    let key = crate::sink::outbox::url_key(q);
    let hash = key.trim_start_matches("webhook-");
    format!("{}_{}", words.trim_end_matches('_'), &hash[..8])
}

impl HomeAssistant {
    pub fn new(cfg: &MqttConfig, sources: &[SourceInfo]) -> HomeAssistant {
        let devices = sources
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    Device {
                        questions: s.questions.clone(),
                        answers: BTreeMap::new(),
                    },
                )
            })
            .collect();
        HomeAssistant {
            discovery: cfg.discovery_prefix.trim_end_matches('/').to_string(),
            prefix: cfg.topic_prefix.trim_end_matches('/').to_string(),
            node: id_safe(&cfg.client_id),
            devices: Mutex::new(devices),
        }
    }

    /// The last-will topic: `online` / `offline`.
    pub fn availability_topic(&self) -> String {
        format!("{}/status", self.prefix)
    }

    fn state_topic(&self, source: &str, what: &str) -> String {
        format!("{}/{}/ha/{what}", self.prefix, topic_level(source))
    }

    fn config(
        &self,
        component: &str,
        source: &str,
        object: &str,
        mut body: serde_json::Value,
    ) -> Msg {
        let sid = id_safe(source);
        let object_id = format!("{sid}_{object}");
        if let Some(o) = body.as_object_mut() {
            o.insert(
                "unique_id".into(),
                json!(format!("{}_{object_id}", self.node)),
            );
            o.insert(
                "availability_topic".into(),
                json!(self.availability_topic()),
            );
            o.insert("payload_available".into(), json!("online"));
            o.insert("payload_not_available".into(), json!("offline"));
            o.insert(
                "device".into(),
                json!({
                    "identifiers": [format!("{}_{sid}", self.node)],
                    "name": source,
                    "manufacturer": "percept",
                    "model": "percept source",
                    "sw_version": env!("CARGO_PKG_VERSION"),
                }),
            );
        }
        Msg {
            topic: format!(
                "{}/{component}/{}/{object_id}/config",
                self.discovery, self.node
            ),
            payload: body.to_string().into_bytes(),
            retain: true,
        }
    }

    fn question_config(&self, source: &str, question: &str) -> Msg {
        let slug = question_slug(question);
        self.config(
            "binary_sensor",
            source,
            &format!("watch_{slug}"),
            json!({
                "name": question,
                "state_topic": self.state_topic(source, &format!("watch/{slug}")),
                "payload_on": "ON",
                "payload_off": "OFF",
            }),
        )
    }

    fn device_configs(&self, source: &str, dev: &Device) -> Vec<Msg> {
        let text = self.state_topic(source, "text");
        let mut out = vec![
            self.config(
                "sensor",
                source,
                "description",
                json!({
                    "name": "Description",
                    "state_topic": text,
                    "value_template": "{{ value_json.text[:255] }}",
                    "json_attributes_topic": text,
                    "icon": "mdi:text-box-outline",
                }),
            ),
            self.config(
                "image",
                source,
                "snapshot",
                json!({
                    "name": "Snapshot",
                    "image_topic": self.state_topic(source, "snapshot"),
                    "content_type": "image/jpeg",
                }),
            ),
        ];
        for q in &dev.questions {
            out.push(self.question_config(source, q));
        }
        out
    }

    /// On each connect: every known device's configs, then `online`.
    pub fn connect_messages(&self) -> Vec<Msg> {
        let devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<Msg> = devices
            .iter()
            .flat_map(|(name, dev)| self.device_configs(name, dev))
            .collect();
        out.push(Msg {
            topic: self.availability_topic(),
            payload: b"online".to_vec(),
            retain: true,
        });
        out
    }

    /// Messages an event causes: the configs of a source seen for the first time (added at
    /// runtime), then entity states.
    pub fn on_event(&self, ev: &Event) -> Vec<Msg> {
        let mut out = Vec::new();
        {
            let mut devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
            if !devices.contains_key(&ev.source) {
                let dev = Device::default();
                out.extend(self.device_configs(&ev.source, &dev));
                devices.insert(ev.source.clone(), dev);
            }
        }
        let text = match &ev.body {
            Body::Description { text, .. } | Body::Scene { text, .. } => Some(text),
            Body::Caption {
                text,
                status: CaptionStatus::Final,
            } => Some(text),
            _ => None,
        };
        if let Some(text) = text {
            out.push(Msg {
                topic: self.state_topic(&ev.source, "text"),
                payload: json!({"text": text, "kind": ev.kind(), "t": ev.t, "id": ev.id})
                    .to_string()
                    .into_bytes(),
                retain: true,
            });
        }
        if let Body::Alert {
            snapshot: Some(path),
            ..
        } = &ev.body
        {
            match std::fs::read(path) {
                Ok(jpeg) if jpeg.len() <= crate::sink::mqtt::MAX_PAYLOAD_BYTES => out.push(Msg {
                    topic: self.state_topic(&ev.source, "snapshot"),
                    payload: jpeg,
                    retain: true,
                }),
                Ok(_) => {
                    tracing::warn!(source = %ev.source, "Home Assistant: snapshot too big to publish.")
                }
                Err(e) => {
                    tracing::warn!(source = %ev.source, error = %e, "Home Assistant: cannot read the snapshot.")
                }
            }
        }
        out
    }

    /// A `watch` answer: the binary sensor's config if the question is new, and its state
    /// when it changed (or was never sent).
    pub fn on_answer(&self, source: &str, question: &str, yes: bool) -> Vec<Msg> {
        let mut out = Vec::new();
        let mut devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        let dev = devices.entry(source.to_string()).or_insert_with(|| {
            let dev = Device::default();
            out.extend(self.device_configs(source, &dev));
            dev
        });
        if !dev.questions.iter().any(|q| q == question) {
            dev.questions.push(question.to_string());
            out.push(self.question_config(source, question));
        }
        if dev.answers.insert(question.to_string(), yes) != Some(yes) {
            out.push(Msg {
                topic: self.state_topic(source, &format!("watch/{}", question_slug(question))),
                payload: if yes { b"ON".to_vec() } else { b"OFF".to_vec() },
                retain: true,
            });
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn discovery_follows_the_schema() {
        let cfg = MqttConfig {
            client_id: "percept home".into(),
            ..MqttConfig::default()
        };
        let ha = HomeAssistant::new(
            &cfg,
            &[SourceInfo {
                name: "door".into(),
                questions: vec!["Is someone at the door?".into()],
            }],
        );
        let msgs = ha.connect_messages();
        assert_eq!(msgs.len(), 4);
        let bs = msgs
            .iter()
            .find(|m| {
                m.topic.starts_with(
                    "homeassistant/binary_sensor/percept_home/door_watch_is_someone_at_the_door_",
                )
            })
            .unwrap();
        assert!(bs.retain && bs.topic.ends_with("/config"));
        let v: serde_json::Value = serde_json::from_slice(&bs.payload).unwrap();
        assert_eq!(v["name"], "Is someone at the door?");
        assert_eq!(v["availability_topic"], "percept/status");
        assert_eq!(v["device"]["identifiers"][0], "percept_home_door");
        assert!(v["state_topic"]
            .as_str()
            .unwrap()
            .starts_with("percept/door/ha/watch/is_someone_at_the_door_"));
        let last = msgs.last().unwrap();
        assert_eq!(
            (last.topic.as_str(), &last.payload[..]),
            ("percept/status", &b"online"[..])
        );
        // Only changes are published; a new question announces itself first.
        assert_eq!(
            ha.on_answer("door", "Is someone at the door?", true).len(),
            1
        );
        assert!(ha
            .on_answer("door", "Is someone at the door?", true)
            .is_empty());
        assert_eq!(
            ha.on_answer("door", "Is someone at the door?", false)[0].payload,
            b"OFF"
        );
        let m = ha.on_answer("door", "A parcel?", true);
        assert_eq!(m.len(), 2);
        assert!(m[0].topic.ends_with("/config"));
        assert_ne!(
            question_slug("Is a car there?"),
            question_slug("Is a car there now?")
        );
    }
}
