//! The sink sections: `[mqtt]` (publishing events to a broker) and `[outbox]` (where what
//! MQTT and webhooks must still deliver waits).

use serde::{Deserialize, Serialize};

/// `[mqtt]`: publishing events to an MQTT broker as `<topic_prefix>/<source>/<kind>`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    pub enabled: bool,
    pub host: String,
    pub port: u16,
    pub topic_prefix: String,
    pub client_id: String,
    /// 0 (at most once) or 1 (at least once).
    pub qos: u8,
    pub user: Option<String>,
    /// Name of an environment variable that holds the broker password.
    pub password_env: Option<String>,
    /// Event kinds published; empty = all.
    pub kinds: Vec<String>,
    /// Publish Home Assistant discovery configs and entity states (see README).
    pub homeassistant: bool,
    /// Home Assistant's discovery prefix.
    pub discovery_prefix: String,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            enabled: false,
            host: "127.0.0.1".into(),
            port: 1883,
            topic_prefix: "percept".into(),
            client_id: "percept".into(),
            qos: 1,
            user: None,
            password_env: None,
            kinds: Vec::new(),
            homeassistant: false,
            discovery_prefix: "homeassistant".into(),
        }
    }
}

impl MqttConfig {
    /// Problems with the section, one line each.
    pub fn validate(&self, p: &mut Vec<String>) {
        if self.qos > 1 {
            p.push(format!("[mqtt] qos must be 0 or 1, got {}", self.qos));
        }
    }
}

/// Default `[outbox] max_mib`.
pub const DEFAULT_OUTBOX_MAX_MIB: u64 = 256;
/// Largest `[outbox] max_mib` (1 TiB).
pub const MAX_OUTBOX_MIB: u64 = 1 << 20;

/// `[outbox]`: where undelivered MQTT messages and webhook alerts wait, and how much of the
/// disk they may take.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// Folder holding one subfolder per destination (created when MQTT or webhooks are on).
    pub dir: String,
    /// Upper bound on all records, MiB, shared evenly by the destinations; beyond it the
    /// oldest records are dropped (and counted).
    pub max_mib: u64,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            dir: "outbox".into(),
            max_mib: DEFAULT_OUTBOX_MAX_MIB,
        }
    }
}

impl OutboxConfig {
    /// Problems with the section, one line each.
    pub fn validate(&self, p: &mut Vec<String>) {
        if self.dir.trim().is_empty() {
            p.push("[outbox] dir must not be empty".to_string());
        }
        if self.max_mib == 0 || self.max_mib > MAX_OUTBOX_MIB {
            p.push(format!(
                "[outbox] max_mib must be in 1..={MAX_OUTBOX_MIB}, got {}",
                self.max_mib
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_bounds() {
        let mut p = Vec::new();
        OutboxConfig::default().validate(&mut p);
        assert!(p.is_empty(), "{p:?}");
        let bad = OutboxConfig {
            dir: " ".into(),
            max_mib: 0,
        };
        bad.validate(&mut p);
        assert_eq!(
            p,
            [
                "[outbox] dir must not be empty",
                "[outbox] max_mib must be in 1..=1048576, got 0"
            ]
        );
    }
}
