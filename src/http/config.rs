//! `[http]`: the HTTP server and who may use it (README "Security").

use serde::{Deserialize, Serialize};

/// Default `[http] listen`: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9464";
/// Schemes `[http] api_schemes` may name.
pub const API_SCHEMES: &[&str] = &[
    "rtsp", "rtsps", "http", "https", "file", "v4l2", "pulse", "alsa", "test",
];
/// Network streams only: local files and devices stay closed to the API unless listed.
pub const DEFAULT_API_SCHEMES: &[&str] = &["rtsp", "rtsps", "http", "https"];
/// Each feed client costs a small OS thread and a 256-event subscription.
pub const DEFAULT_MAX_FEED_CLIENTS: usize = 64;
pub const MAX_FEED_CLIENTS_LIMIT: usize = 4096;

#[derive(Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address for the page, feeds, control API, /metrics and /healthz; loopback unless you
    /// mean to expose it (then `token` is required).
    pub listen: String,
    pub enabled: bool,
    /// Bearer token every route but `/healthz` requires; the environment variable
    /// `PERCEPT_HTTP_TOKEN` wins over it. Unset: no authentication (loopback only).
    pub token: Option<String>,
    /// `Host` values served besides loopback names of the listen port: `name` (any port),
    /// `name:port`, or `*` for any (behind a reverse proxy that checks it).
    pub allowed_hosts: Vec<String>,
    /// Browser origins (`scheme://host[:port]`) allowed besides the server's own on feeds,
    /// WebSocket upgrades and state-changing routes.
    pub allowed_origins: Vec<String>,
    /// URI schemes a source added over HTTP may use: rtsp, rtsps, http, https, file, v4l2,
    /// pulse, alsa, test.
    pub api_schemes: Vec<String>,
    /// Live feed clients (SSE and WebSocket together) served at once; more get 503.
    pub max_feed_clients: usize,
}

impl std::fmt::Debug for HttpConfig {
    // The token never reaches a log through `{:?}` of the config.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field("listen", &self.listen)
            .field("enabled", &self.enabled)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("allowed_hosts", &self.allowed_hosts)
            .field("allowed_origins", &self.allowed_origins)
            .field("api_schemes", &self.api_schemes)
            .field("max_feed_clients", &self.max_feed_clients)
            .finish()
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: DEFAULT_LISTEN.into(),
            enabled: true,
            token: None,
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
            api_schemes: DEFAULT_API_SCHEMES.iter().map(|s| s.to_string()).collect(),
            max_feed_clients: DEFAULT_MAX_FEED_CLIENTS,
        }
    }
}

impl HttpConfig {
    /// The token in force: `PERCEPT_HTTP_TOKEN` when set and not empty, else `[http] token`.
    pub fn effective_token(&self) -> Option<String> {
        std::env::var("PERCEPT_HTTP_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .or_else(|| self.token.clone())
    }

    /// Problems with the section, one line each; the token itself is never quoted.
    pub fn validate(&self, p: &mut Vec<String>) {
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            p.push(format!(
                "[http] listen must be an address like 127.0.0.1:9464, got '{}'",
                self.listen
            ));
        }
        if let Some(t) = &self.token {
            if t.trim().is_empty() {
                p.push("[http] token must not be empty (remove it to run without one)".into());
            } else if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
                p.push("[http] token must not contain spaces or control characters".into());
            }
        }
        for s in &self.api_schemes {
            if !API_SCHEMES.contains(&s.as_str()) {
                p.push(format!(
                    "[http] api_schemes: unknown scheme '{s}' (known: {})",
                    API_SCHEMES.join(", ")
                ));
            }
        }
        for o in &self.allowed_origins {
            let ok = o == "*"
                || url::Url::parse(o)
                    .ok()
                    .filter(|u| u.host_str().is_some())
                    .is_some_and(|u| u.origin().ascii_serialization() == o.trim_end_matches('/'));
            if !ok {
                p.push(format!(
                    "[http] allowed_origins: '{o}' is not an origin like https://example.com or http://host:8080"
                ));
            }
        }
        for h in &self.allowed_hosts {
            if h.is_empty() || h.contains(['/', ' ', '@']) {
                p.push(format!(
                    "[http] allowed_hosts: '{h}' is not a host like example.com or example.com:9464"
                ));
            }
        }
        if !(1..=MAX_FEED_CLIENTS_LIMIT).contains(&self.max_feed_clients) {
            p.push(format!(
                "[http] max_feed_clients must be in 1..={MAX_FEED_CLIENTS_LIMIT}, got {}",
                self.max_feed_clients
            ));
        }
    }
}
