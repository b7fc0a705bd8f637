//! Source URIs: one syntax for files, network streams, capture devices and the synthetic
//! `test:` source. Credentials are split off here so that nothing downstream ever sees them
//! inside a URL (logs, events and metric labels carry the redacted form or the short name).

use std::fmt;
use std::path::PathBuf;

/// Why a source string cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SourceError {
    #[error("source '{0}': empty source")]
    Empty(String),
    #[error("source '{uri}': {reason}")]
    Invalid { uri: String, reason: String },
}

/// How RTSP media is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RtspTransport {
    /// Interleaved over the RTSP TCP connection: works through NAT and firewalls.
    #[default]
    Tcp,
    Udp,
    /// rtspsrc's own order (UDP, multicast, then TCP after its 5 s timeout).
    Auto,
}

impl RtspTransport {
    /// The value of rtspsrc's `protocols` property.
    pub fn protocols(self) -> &'static str {
        match self {
            RtspTransport::Tcp => "tcp",
            RtspTransport::Udp => "udp",
            RtspTransport::Auto => "udp+udp-mcast+tcp",
        }
    }
}

/// Secrets kept out of every URL we print. `Debug` is redacted on purpose.
#[derive(Clone, PartialEq, Default)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Credentials {{ user: {:?}, password: \"***\" }}",
            self.user
        )
    }
}

/// What the synthetic `test:` source generates.
#[derive(Debug, Clone, PartialEq)]
pub struct TestSpec {
    /// videotestsrc pattern, or None for no video.
    pub video: Option<String>,
    /// audiotestsrc wave, or None for no audio.
    pub audio: Option<String>,
    pub width: u32,
    pub height: u32,
    pub framerate: u32,
    /// Seconds of media before EOS; None runs until stopped.
    pub duration: Option<f64>,
    pub live: bool,
}

impl Default for TestSpec {
    fn default() -> Self {
        TestSpec {
            video: Some("ball".into()),
            audio: Some("sine".into()),
            width: 640,
            height: 360,
            framerate: 30,
            duration: None,
            live: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum SourceKind {
    File(PathBuf),
    Rtsp {
        /// The URL with the userinfo removed: safe to hand to rtspsrc and to print.
        location: String,
        credentials: Option<Credentials>,
        transport: RtspTransport,
    },
    /// http(s) progressive files and HLS playlists.
    Http {
        location: String,
    },
    V4l2 {
        device: String,
    },
    Pulse {
        device: Option<String>,
    },
    Alsa {
        device: String,
    },
    Test(TestSpec),
}

impl SourceKind {
    /// Live sources run in real time and drop under load; files use backpressure.
    pub fn is_live(&self) -> bool {
        match self {
            SourceKind::File(_) => false,
            SourceKind::Http { location } => location.contains(".m3u8"),
            SourceKind::Test(t) => t.live,
            _ => true,
        }
    }

    /// Sources worth reconnecting to after an error, a stall or an EOS.
    pub fn reconnects(&self) -> bool {
        matches!(
            self,
            SourceKind::Rtsp { .. } | SourceKind::Http { .. } | SourceKind::V4l2 { .. }
        )
    }
}

/// A parsed source: a short name for events and metrics plus what to open.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceSpec {
    pub name: String,
    pub kind: SourceKind,
    /// The URI as the user gave it, with any password replaced: for logs only.
    pub display: String,
}

const AUDIO_EXTENSIONS: &[&str] = &["wav", "flac", "mp3", "ogg", "oga", "m4a", "aac", "opus"];

impl SourceSpec {
    /// Audio-only recordings decode through symphonia rather than GStreamer.
    pub fn audio_file_path(&self) -> Option<&std::path::Path> {
        match &self.kind {
            SourceKind::File(p) => {
                let ext = p.extension()?.to_str()?.to_ascii_lowercase();
                AUDIO_EXTENSIONS
                    .contains(&ext.as_str())
                    .then_some(p.as_path())
            }
            _ => None,
        }
    }
}

/// True for characters allowed in a source name: names end up in metric labels and MQTT topics.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

/// Replace the password in `user:password@` and secret-looking query values with `***`.
pub fn redact(uri: &str) -> String {
    let mut out = uri.to_string();
    if let Some(scheme_end) = out.find("://") {
        let rest_start = scheme_end + 3;
        let authority_end = out[rest_start..]
            .find(['/', '?', '#'])
            .map_or(out.len(), |i| rest_start + i);
        if let Some(at) = out[rest_start..authority_end].rfind('@') {
            let userinfo = &out[rest_start..rest_start + at];
            let redacted = match userinfo.find(':') {
                Some(colon) => format!("{}:***", &userinfo[..colon]),
                None => userinfo.to_string(),
            };
            out.replace_range(rest_start..rest_start + at, &redacted);
        }
    }
    if let Some(q) = out.find('?') {
        let (head, query) = out.split_at(q + 1);
        let parts: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if is_secret_key(k) => format!("{k}=***"),
                _ => kv.to_string(),
            })
            .collect();
        out = format!("{head}{}", parts.join("&"));
    }
    out
}

fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "password",
        "passwd",
        "pwd",
        "token",
        "secret",
        "key",
        "auth",
        "signature",
    ]
    .iter()
    .any(|s| k.contains(s))
}

fn invalid(uri: &str, reason: impl Into<String>) -> SourceError {
    SourceError::Invalid {
        uri: redact(uri),
        reason: reason.into(),
    }
}

/// Parse `[name=]URI`. Without a name one is derived from the URI (never containing it whole).
pub fn parse(arg: &str) -> Result<SourceSpec, SourceError> {
    let arg = arg.trim();
    if arg.is_empty() {
        return Err(SourceError::Empty(arg.into()));
    }
    let (name, uri) = match arg.split_once('=') {
        Some((n, rest)) if valid_name(n) && !n.contains('.') && !rest.is_empty() => {
            (Some(n.to_string()), rest)
        }
        _ => (None, arg),
    };
    let kind = parse_kind(uri)?;
    let name = name.unwrap_or_else(|| derive_name(&kind));
    Ok(SourceSpec {
        name,
        kind,
        display: redact(uri),
    })
}

fn parse_kind(uri: &str) -> Result<SourceKind, SourceError> {
    if let Some(rest) = uri.strip_prefix("test:") {
        return parse_test(uri, rest).map(SourceKind::Test);
    }
    let Some((scheme, _)) = uri.split_once("://") else {
        return Ok(SourceKind::File(PathBuf::from(uri)));
    };
    match scheme.to_ascii_lowercase().as_str() {
        "file" => {
            let u = url::Url::parse(uri).map_err(|e| invalid(uri, e.to_string()))?;
            let path = u
                .to_file_path()
                .map_err(|()| invalid(uri, "not a local file path"))?;
            Ok(SourceKind::File(path))
        }
        "rtsp" | "rtsps" | "rtspt" => parse_rtsp(uri),
        "http" | "https" => {
            let u = url::Url::parse(uri).map_err(|e| invalid(uri, e.to_string()))?;
            if u.host_str().is_none() {
                return Err(invalid(uri, "missing host"));
            }
            Ok(SourceKind::Http {
                location: u.to_string(),
            })
        }
        "v4l2" => {
            let device = uri["v4l2://".len()..].to_string();
            let device = if device.is_empty() {
                "/dev/video0".into()
            } else {
                device
            };
            Ok(SourceKind::V4l2 { device })
        }
        "pulse" => {
            let d = &uri["pulse://".len()..];
            Ok(SourceKind::Pulse {
                device: (!d.is_empty()).then(|| d.to_string()),
            })
        }
        "alsa" => {
            let d = &uri["alsa://".len()..];
            Ok(SourceKind::Alsa {
                device: if d.is_empty() {
                    "default".into()
                } else {
                    d.into()
                },
            })
        }
        other => Err(invalid(uri, format!("unsupported scheme '{other}'"))),
    }
}

fn parse_rtsp(uri: &str) -> Result<SourceKind, SourceError> {
    let mut u = url::Url::parse(uri).map_err(|e| invalid(uri, e.to_string()))?;
    if u.host_str().is_none() {
        return Err(invalid(uri, "missing host"));
    }
    let mut transport = RtspTransport::Tcp;
    let mut kept = Vec::new();
    for (k, v) in u.query_pairs() {
        if k == "transport" {
            transport = match v.as_ref() {
                "tcp" => RtspTransport::Tcp,
                "udp" => RtspTransport::Udp,
                "auto" => RtspTransport::Auto,
                other => return Err(invalid(uri, format!("unknown transport '{other}'"))),
            };
        } else {
            kept.push((k.into_owned(), v.into_owned()));
        }
    }
    if u.scheme() == "rtspt" {
        transport = RtspTransport::Tcp;
    }
    let credentials = if !u.username().is_empty() || u.password().is_some() {
        let decode = |s: &str| {
            url::form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        Some(Credentials {
            user: decode(u.username()),
            password: decode(u.password().unwrap_or("")),
        })
    } else {
        None
    };
    // Dropping userinfo here is what keeps rtspsrc from logging it ("Connecting to ...").
    let _ = u.set_username("");
    let _ = u.set_password(None);
    if kept.is_empty() {
        u.set_query(None);
    } else {
        u.query_pairs_mut().clear().extend_pairs(kept);
    }
    Ok(SourceKind::Rtsp {
        location: u.to_string(),
        credentials,
        transport,
    })
}

fn parse_test(uri: &str, rest: &str) -> Result<TestSpec, SourceError> {
    let mut spec = TestSpec::default();
    let query = rest.trim_start_matches("//").trim_start_matches('?');
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| invalid(uri, format!("expected key=value, got '{kv}'")))?;
        let num = |what: &str| -> Result<f64, SourceError> {
            v.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| invalid(uri, format!("{what} must be a positive number, got '{v}'")))
        };
        match k {
            "video" => spec.video = (v != "none").then(|| v.to_string()),
            "audio" => spec.audio = (v != "none").then(|| v.to_string()),
            "width" => spec.width = num("width")? as u32,
            "height" => spec.height = num("height")? as u32,
            "fps" | "framerate" => spec.framerate = num("fps")? as u32,
            "duration" => spec.duration = Some(num("duration")?),
            "live" => {
                spec.live = match v {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => {
                        return Err(invalid(
                            uri,
                            format!("live must be true or false, got '{v}'"),
                        ))
                    }
                }
            }
            other => return Err(invalid(uri, format!("unknown test parameter '{other}'"))),
        }
    }
    if spec.video.is_none() && spec.audio.is_none() {
        return Err(invalid(uri, "a test source needs video or audio"));
    }
    Ok(spec)
}

fn sanitize(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(48)
        .collect();
    if cleaned.is_empty() {
        "source".into()
    } else {
        cleaned
    }
}

fn derive_name(kind: &SourceKind) -> String {
    match kind {
        SourceKind::File(p) => sanitize(
            &p.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        ),
        SourceKind::Rtsp { location, .. } | SourceKind::Http { location } => {
            url::Url::parse(location)
                .ok()
                .and_then(|u| u.host_str().map(sanitize))
                .unwrap_or_else(|| "stream".into())
        }
        SourceKind::V4l2 { device } => sanitize(device.rsplit('/').next().unwrap_or("camera")),
        SourceKind::Pulse { .. } | SourceKind::Alsa { .. } => "mic".into(),
        SourceKind::Test(_) => "test".into(),
    }
}

/// Make names unique by suffixing `-2`, `-3`, ... in order of appearance.
pub fn dedupe_names(specs: &mut [SourceSpec]) {
    let mut seen = std::collections::HashSet::new();
    for spec in specs.iter_mut() {
        if seen.insert(spec.name.clone()) {
            continue;
        }
        let mut n = 2;
        while seen.contains(&format!("{}-{n}", spec.name)) {
            n += 1;
        }
        spec.name = format!("{}-{n}", spec.name);
        seen.insert(spec.name.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtsp_credentials_are_split_off_and_redacted() {
        let s = parse("door=rtsp://admin:s3cr%40t@10.0.0.5:554/stream1?transport=udp").unwrap();
        assert_eq!(s.name, "door");
        assert!(!s.display.contains("s3cr"), "{}", s.display);
        assert_eq!(
            s.display,
            "rtsp://admin:***@10.0.0.5:554/stream1?transport=udp"
        );
        match s.kind {
            SourceKind::Rtsp {
                location,
                credentials,
                transport,
            } => {
                assert_eq!(location, "rtsp://10.0.0.5:554/stream1");
                let c = credentials.unwrap();
                assert_eq!(c.user, "admin");
                assert_eq!(c.password, "s3cr@t");
                assert!(!format!("{c:?}").contains("s3cr"));
                assert_eq!(transport, RtspTransport::Udp);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn names_are_derived_and_deduplicated() {
        let mut v = vec![
            parse("/tmp/a b.mp4").unwrap(),
            parse("file:///tmp/a%20b.mp4").unwrap(),
            parse("rtsp://cam.local/x").unwrap(),
        ];
        dedupe_names(&mut v);
        assert_eq!(v[0].name, "a_b");
        assert_eq!(v[1].name, "a_b-2");
        assert_eq!(v[2].name, "cam_local");
    }

    #[test]
    fn test_source_parameters() {
        let s = parse(
            "test:?video=smpte&audio=none&width=1920&height=1080&fps=30&duration=5&live=false",
        )
        .unwrap();
        let SourceKind::Test(t) = s.kind else {
            panic!()
        };
        assert_eq!(t.video.as_deref(), Some("smpte"));
        assert_eq!(t.audio, None);
        assert_eq!((t.width, t.height, t.framerate), (1920, 1080, 30));
        assert_eq!(t.duration, Some(5.0));
        assert!(!t.live);
        assert!(parse("test:?bogus=1").is_err());
        assert!(parse("test:?video=none&audio=none").is_err());
        assert!(parse("gopher://x").is_err());
    }

    #[test]
    fn redact_query_secrets() {
        assert_eq!(
            redact("https://h/x.m3u8?token=abc&q=1"),
            "https://h/x.m3u8?token=***&q=1"
        );
        assert_eq!(redact("/plain/path.mp4"), "/plain/path.mp4");
    }
}
