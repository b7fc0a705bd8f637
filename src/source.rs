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

    /// The URI scheme this source was given with, as `[http] api_schemes` names it: `file`
    /// (also for plain paths), `rtsp` (also `rtspt`), `rtsps`, `http`, `https`, `v4l2`,
    /// `pulse`, `alsa` or `test`.
    pub fn scheme(&self) -> &'static str {
        match self {
            SourceKind::File(_) => "file",
            SourceKind::Rtsp { location, .. } => {
                if location.starts_with("rtsps:") {
                    "rtsps"
                } else {
                    "rtsp"
                }
            }
            SourceKind::Http { location } => {
                if location.starts_with("https:") {
                    "https"
                } else {
                    "http"
                }
            }
            SourceKind::V4l2 { .. } => "v4l2",
            SourceKind::Pulse { .. } => "pulse",
            SourceKind::Alsa { .. } => "alsa",
            SourceKind::Test(_) => "test",
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
///
/// Users type passwords unencoded, so a password may hold `/`, `?`, `#` or `@`: the userinfo
/// is taken to run from the first `:` (when no `/`, `?` or `#` comes before it) to the last
/// `@`. A URL like `rtsp://host:554/a@b` is then shown as `rtsp://host:***@b`: showing too
/// little is the safe side of the ambiguity.
pub fn redact(uri: &str) -> String {
    let mut out = uri.to_string();
    if let Some(scheme_end) = out.find("://") {
        let rest_start = scheme_end + 3;
        let rest = &out[rest_start..];
        let first_delim = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let colon = rest.find(':').filter(|&c| c < first_delim);
        let last_at = rest.rfind('@');
        match (colon, last_at) {
            (Some(c), Some(at)) if c < at => {
                out.replace_range(rest_start + c + 1..rest_start + at, "***");
            }
            _ => {}
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

/// [`redact`] applied to every URL inside a longer text (a gst-launch description, an error
/// message): each `scheme://...` run up to whitespace or a quote is redacted on its own.
pub fn redact_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        // The scheme: letters, digits, '+', '-', '.' just before "://".
        let scheme_start = rest[..i]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
            .map_or(0, |p| p + 1);
        let end = rest[i..]
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>'))
            .map_or(rest.len(), |e| i + e);
        out.push_str(&rest[..scheme_start]);
        out.push_str(&redact(&rest[scheme_start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Percent-decoding of URL userinfo (and of `?token=`). Unlike form decoding, `+` stays a
/// plus sign: RTSP passwords such as `a+b`, and base64 tokens, must arrive as typed.
pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
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
        "credential",
    ]
    .iter()
    .any(|s| k.contains(s))
        // Signed URLs (CloudFront, Azure SAS) call it `sig`.
        || k == "sig"
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
        Some(Credentials {
            user: percent_decode(u.username()),
            password: percent_decode(u.password().unwrap_or("")),
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

/// Largest width or height of a `test:` source, in pixels.
pub const TEST_MAX_SIDE: u32 = 7680;
/// Largest frame of a `test:` source: 8K UHD (7680x4320).
pub const TEST_MAX_PIXELS: u64 = 7680 * 4320;
/// Highest `test:` frame rate.
pub const TEST_MAX_FPS: u32 = 240;
/// Longest finite `test:` duration, in seconds (one week).
pub const TEST_MAX_DURATION: f64 = 7.0 * 86_400.0;

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
    // Bounds keep a typo (or an API caller) from asking GStreamer for frames it cannot
    // allocate: 40000x40000 RGBA is 6.4 GB per frame.
    if !(16..=TEST_MAX_SIDE).contains(&spec.width) || !(16..=TEST_MAX_SIDE).contains(&spec.height) {
        return Err(invalid(
            uri,
            format!(
                "width and height must be in 16..={TEST_MAX_SIDE}, got {}x{}",
                spec.width, spec.height
            ),
        ));
    }
    if u64::from(spec.width) * u64::from(spec.height) > TEST_MAX_PIXELS {
        return Err(invalid(
            uri,
            format!(
                "{}x{} is more than {TEST_MAX_PIXELS} pixels (8K UHD)",
                spec.width, spec.height
            ),
        ));
    }
    if !(1..=TEST_MAX_FPS).contains(&spec.framerate) {
        return Err(invalid(
            uri,
            format!("fps must be in 1..={TEST_MAX_FPS}, got {}", spec.framerate),
        ));
    }
    if spec.duration.is_some_and(|d| d > TEST_MAX_DURATION) {
        return Err(invalid(
            uri,
            format!(
                "duration must be at most {TEST_MAX_DURATION} s (omit it to run until stopped)"
            ),
        ));
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
    fn rtsp_password_plus_is_a_plus_not_a_space() {
        let s = parse("rtsp://admin:a+b%2Bc%20d@10.0.0.5/s").unwrap();
        let SourceKind::Rtsp { credentials, .. } = s.kind else {
            panic!()
        };
        let c = credentials.unwrap();
        assert_eq!(c.password, "a+b+c d");
        let s = parse("rtsp://us+er:x@10.0.0.5/s").unwrap();
        let SourceKind::Rtsp { credentials, .. } = s.kind else {
            panic!()
        };
        assert_eq!(credentials.unwrap().user, "us+er");
    }

    #[test]
    fn redact_hides_passwords_holding_url_delimiters() {
        for pw in ["pa/ss", "pa?ss", "pa#ss", "p@ss/w?#rd", "a:b", "x/@y"] {
            let uri = format!("rtsp://admin:{pw}@10.0.0.5:554/stream1");
            let r = redact(&uri);
            assert_eq!(r, "rtsp://admin:***@10.0.0.5:554/stream1", "{pw}");
            let uri = format!("https://admin:{pw}@cdn.example/live.m3u8?token=abc");
            let r = redact(&uri);
            assert_eq!(
                r, "https://admin:***@cdn.example/live.m3u8?token=***",
                "{pw}"
            );
        }
        // Nothing to hide: left alone.
        for plain in [
            "rtsp://10.0.0.5:554/stream1",
            "rtsp://admin@10.0.0.5/s",
            "https://h/a:b/c",
            "https://h/x@y",
        ] {
            assert_eq!(redact(plain), plain);
        }
    }

    #[test]
    fn redact_text_finds_every_url() {
        let desc =
            "souphttpsrc location=\"https://u:p/w@cdn.example/x.m3u8?sig=zz&a=1\" is-live=true ! \
                    decodebin  rtspsrc location=\"rtsp://admin:s3cr?t@cam/x\" protocols=tcp";
        let r = redact_text(desc);
        assert!(
            !r.contains("p/w") && !r.contains("zz") && !r.contains("s3cr"),
            "{r}"
        );
        assert!(
            r.contains("is-live=true ! decodebin") || r.contains("is-live=true !"),
            "{r}"
        );
        assert!(r.contains("protocols=tcp"), "{r}");
        assert!(
            r.contains("https://u:***@cdn.example/x.m3u8?sig=***&a=1"),
            "{r}"
        );
    }

    #[test]
    fn test_source_sizes_are_bounded() {
        for bad in [
            "test:?width=40000&height=40000",
            "test:?width=8&height=8",
            "test:?width=7680&height=7680",
            "test:?fps=1000",
            "test:?fps=0.5",
            "test:?duration=1e300",
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.starts_with("source 'test:"), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
        assert!(parse("test:?width=7680&height=4320&fps=60").is_ok());
    }

    #[test]
    fn schemes_as_api_schemes_names_them() {
        let cases = [
            ("/tmp/a.mp4", "file"),
            ("file:///tmp/a.mp4", "file"),
            ("x=file:///tmp/a.mp4", "file"),
            ("rtsp://h/x", "rtsp"),
            ("rtspt://h/x", "rtsp"),
            ("rtsps://h/x", "rtsps"),
            ("http://h/x", "http"),
            ("https://h/x", "https"),
            ("v4l2://", "v4l2"),
            ("pulse://", "pulse"),
            ("alsa://", "alsa"),
            ("test:", "test"),
        ];
        for (uri, scheme) in cases {
            assert_eq!(parse(uri).unwrap().kind.scheme(), scheme, "{uri}");
        }
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
