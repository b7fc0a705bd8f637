//! Who may use the HTTP server, checked in one middleware in front of every route, in this
//! order (README "Security"):
//!
//! 1. `Origin`: a request that carries one (browsers send it on WebSocket upgrades, feeds
//!    opened by scripts and every POST/PUT/DELETE) must come from the server's own origin or
//!    from `[http] allowed_origins`, else 403. This is what keeps a web page the user happens
//!    to open from reading the feeds or driving the API.
//! 2. `Host`: a loopback name or address with the listen port, the listen address itself (any
//!    address literal when listening on 0.0.0.0 or ::), or an `[http] allowed_hosts` entry,
//!    else 403: DNS rebinding, which needs a name, cannot reach the API.
//! 3. The token (`[http] token`, `PERCEPT_HTTP_TOKEN` wins): `Authorization: Bearer <token>`
//!    on every route but `/healthz`; `?token=` on the page and the feeds, where browsers
//!    cannot set headers; a wrong or missing token is 401. Opening the page with a good
//!    `?token=` also sets an `HttpOnly`, `SameSite=Strict` cookie so that the page's own
//!    requests (frame images, feeds, API calls) carry it without script changes.
//! 4. `POST /v1/reload` takes only a JSON body (`Content-Type: application/json`): a plain
//!    HTML form cannot send one.
//! 5. `POST /v1/sources` may only open the URI schemes in `[http] api_schemes`, else 403.
//!
//! Live feed clients are capped by [`FeedSlots`] (`[http] max_feed_clients`, 503 beyond).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiError;
use crate::http::config::HttpConfig;

/// Largest body the guard reads to check a source's scheme or a reload's JSON.
const MAX_CHECKED_BODY: usize = 1024 * 1024;

/// The longest attacker-supplied text (a Host, an Origin) echoed in an error.
const MAX_ECHO: usize = 80;

/// The checks of one server, made once it knows its bound address.
pub struct Guard {
    token: Option<String>,
    allowed_hosts: Vec<String>,
    allowed_origins: Vec<String>,
    api_schemes: Vec<String>,
    listen: SocketAddr,
    feeds: Arc<FeedSlots>,
}

/// Why a server must not start: a non-loopback address without a token.
pub fn check_exposure(cfg: &HttpConfig) -> Result<(), String> {
    let Ok(addr) = cfg.listen.parse::<SocketAddr>() else {
        // `validate` reports a malformed address.
        return Ok(());
    };
    if addr.ip().is_loopback() || cfg.effective_token().is_some() {
        return Ok(());
    }
    Err(format!(
        "listen address {addr} is not loopback and no token is set: set [http] token or \
         PERCEPT_HTTP_TOKEN (or listen on 127.0.0.1)"
    ))
}

impl Guard {
    pub fn new(cfg: &HttpConfig, listen: SocketAddr) -> Guard {
        let lower = |v: &[String]| -> Vec<String> {
            v.iter()
                .map(|s| s.trim().trim_end_matches('/').to_ascii_lowercase())
                .collect()
        };
        Guard {
            token: cfg.effective_token(),
            allowed_hosts: lower(&cfg.allowed_hosts),
            allowed_origins: lower(&cfg.allowed_origins),
            api_schemes: cfg.api_schemes.clone(),
            listen,
            feeds: Arc::new(FeedSlots::new(cfg.max_feed_clients)),
        }
    }

    /// The cookie a page opened with `?token=` gets; per port, since cookies ignore ports.
    fn cookie_name(&self) -> String {
        format!("percept_token_{}", self.listen.port())
    }

    /// `Host` (or the HTTP/2 authority) is one this server answers to.
    fn host_ok(&self, host: &str) -> bool {
        let host = host.trim().to_ascii_lowercase();
        let Some((name, port)) = split_host(&host) else {
            return false;
        };
        let name = name.strip_suffix('.').unwrap_or(name);
        let port_ok = port == self.listen.port();
        if self
            .allowed_hosts
            .iter()
            .any(|a| a == "*" || *a == host || a == name)
        {
            return true;
        }
        if !port_ok {
            return false;
        }
        if name == "localhost" || name.ends_with(".localhost") {
            return true;
        }
        match name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            // An address literal names a machine, not a DNS name an attacker controls, so it
            // cannot rebind: a server on 0.0.0.0 answers to any of its addresses (what a
            // container's health probe sends), one on a given IP to that IP.
            Ok(ip) => {
                ip.is_loopback() || self.listen.ip().is_unspecified() || ip == self.listen.ip()
            }
            Err(_) => false,
        }
    }

    /// `origin` is this server's own (same Host, http or https) or an allowed one.
    fn origin_ok(&self, origin: &str, host: &str) -> bool {
        let origin = origin.trim().trim_end_matches('/').to_ascii_lowercase();
        let host = host.trim().to_ascii_lowercase();
        origin == format!("http://{host}")
            || origin == format!("https://{host}")
            || self
                .allowed_origins
                .iter()
                .any(|a| a == "*" || *a == origin)
    }

    fn token_ok(&self, req: &Request, path: &str) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        if path == "/healthz" {
            return true;
        }
        let headers = req.headers();
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, rest) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            });
        if bearer.is_some_and(|b| constant_time_eq(b.as_bytes(), token.as_bytes())) {
            return true;
        }
        if takes_query_token(path) {
            if let Some(q) = query_token(req.uri().query()) {
                if constant_time_eq(q.as_bytes(), token.as_bytes()) {
                    return true;
                }
            }
        }
        cookie(headers, &self.cookie_name())
            .is_some_and(|c| constant_time_eq(c.as_bytes(), hex(token).as_bytes()))
    }

    /// The feed client cap, shared with the feed handlers through request extensions.
    pub fn feeds(&self) -> Arc<FeedSlots> {
        self.feeds.clone()
    }
}

/// Routes where browsers cannot set an `Authorization` header.
fn takes_query_token(path: &str) -> bool {
    matches!(path, "/" | "/v1/events" | "/v1/ws")
}

/// `host[:port]`, IPv6 in brackets; no port means 80.
fn split_host(host: &str) -> Option<(&str, u16)> {
    if host.is_empty() {
        return None;
    }
    if host.starts_with('[') {
        let end = host.find(']')?;
        let (name, rest) = host.split_at(end + 1);
        return match rest.strip_prefix(':') {
            Some(p) => Some((name, p.parse().ok()?)),
            None if rest.is_empty() => Some((name, 80)),
            None => None,
        };
    }
    match host.rsplit_once(':') {
        Some((name, p)) => Some((name, p.parse().ok()?)),
        None => Some((host, 80)),
    }
}

/// `token` from a query string. `+` stays a plus: base64 tokens (`openssl rand -base64`)
/// pasted into a URL hold `+`, `/` and `=` as typed.
fn query_token(query: Option<&str>) -> Option<String> {
    query?
        .split('&')
        .find_map(|kv| kv.strip_prefix("token="))
        .map(crate::source::percent_decode)
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// A token as a cookie value: hex, so `;`, `,` or `=` in it cannot break the header.
fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// Equal contents, in time that depends only on the lengths: a wrong token's first bytes
/// cannot be found by timing.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    let n = a.len().max(b.len());
    for i in 0..n {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= std::hint::black_box(x ^ y);
    }
    diff == 0
}

/// Attacker-supplied text fit for a one-line error.
fn echo(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .take(MAX_ECHO)
        .collect()
}

fn forbidden(message: String) -> Response {
    ApiError::new(StatusCode::FORBIDDEN, message).into_response()
}

/// The middleware: see the module doc for the order.
pub async fn check(State(g): State<Arc<Guard>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        if !g.origin_ok(origin, &host) {
            return forbidden(format!(
                "origin '{}' is not allowed: add it to [http] allowed_origins",
                echo(origin)
            ));
        }
    }
    if !g.host_ok(&host) {
        return forbidden(format!(
            "host '{}' is not allowed: use 127.0.0.1:{} or add it to [http] allowed_hosts",
            echo(&host),
            g.listen.port()
        ));
    }
    if !g.token_ok(&req, &path) {
        let mut r = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong token: send Authorization: Bearer <token>",
        )
        .into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"percept\""),
        );
        return r;
    }
    let method = req.method().clone();
    if method == Method::POST && path == "/v1/reload" {
        if !is_json(req.headers()) {
            return ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "POST /v1/reload takes a JSON body (Content-Type: application/json)",
            )
            .into_response();
        }
        let (req2, body) = match read_body(req).await {
            Ok(x) => x,
            Err(r) => return r,
        };
        if !body.iter().all(u8::is_ascii_whitespace)
            && serde_json::from_slice::<serde_json::Value>(&body).is_err()
        {
            return ApiError::new(StatusCode::BAD_REQUEST, "invalid JSON body").into_response();
        }
        req = req2;
    }
    if method == Method::POST && path == "/v1/sources" {
        let (req2, body) = match read_body(req).await {
            Ok(x) => x,
            Err(r) => return r,
        };
        if let Some(r) = scheme_refusal(&g, &body) {
            return r;
        }
        req = req2;
    }
    let page_token = (path == "/" && g.token.is_some())
        .then(|| query_token(req.uri().query()))
        .flatten()
        .filter(|q| {
            g.token
                .as_ref()
                .is_some_and(|t| constant_time_eq(q.as_bytes(), t.as_bytes()))
        });
    req.extensions_mut().insert(g.feeds());
    let mut resp = next.run(req).await;
    if let Some(t) = page_token {
        // The token is already in the page's own URL; the cookie lets the page's images and
        // feeds carry it. Strict: never sent on a request started by another site.
        let value = format!(
            "{}={}; Path=/; HttpOnly; SameSite=Strict",
            g.cookie_name(),
            hex(&t)
        );
        if let Ok(v) = header::HeaderValue::from_str(&value) {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    resp
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

/// The body read whole (up to [`MAX_CHECKED_BODY`]) and a request that carries it again.
async fn read_body(req: Request) -> Result<(Request, Bytes), Response> {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_CHECKED_BODY)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body over {MAX_CHECKED_BODY} bytes"),
            )
            .into_response()
        })?;
    Ok((Request::from_parts(parts, Body::from(bytes.clone())), bytes))
}

/// 403 when the source in a `POST /v1/sources` body opens a scheme not in `api_schemes`.
/// Bodies that are not JSON or whose URI does not parse go on to the handler, which
/// answers 400 with the reason.
fn scheme_refusal(g: &Guard, body: &[u8]) -> Option<Response> {
    let req: crate::control::AddSource = serde_json::from_slice(body).ok()?;
    let spec = crate::source::parse(&req.uri).ok()?;
    let scheme = spec.kind.scheme();
    if g.api_schemes.iter().any(|s| s == scheme) {
        return None;
    }
    Some(forbidden(format!(
        "sources with scheme '{scheme}' cannot be added over HTTP: add '{scheme}' to [http] api_schemes (allowed now: {})",
        g.api_schemes.join(", ")
    )))
}

/// How many live feed clients are connected, against `[http] max_feed_clients`.
#[derive(Debug)]
pub struct FeedSlots {
    max: usize,
    used: AtomicUsize,
}

/// One connected feed client; its slot is freed on drop.
#[derive(Debug)]
pub struct FeedPermit(Arc<FeedSlots>);

impl FeedSlots {
    pub fn new(max: usize) -> FeedSlots {
        FeedSlots {
            max,
            used: AtomicUsize::new(0),
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// A slot, or None when `max` clients are connected.
    pub fn try_acquire(self: &Arc<Self>) -> Option<FeedPermit> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| FeedPermit(self.clone()))
    }

    pub fn in_use(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

impl Drop for FeedPermit {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(cfg: HttpConfig) -> Guard {
        Guard::new(&cfg, "127.0.0.1:9464".parse().unwrap())
    }

    #[test]
    fn hosts() {
        let g = guard(HttpConfig {
            allowed_hosts: vec!["cam.example".into(), "nvr.lan:8080".into()],
            ..HttpConfig::default()
        });
        for ok in [
            "127.0.0.1:9464",
            "127.9.9.9:9464",
            "localhost:9464",
            "LOCALHOST.:9464",
            "[::1]:9464",
            "cam.example",
            "cam.example:1234",
            "nvr.lan:8080",
        ] {
            assert!(g.host_ok(ok), "{ok}");
        }
        for bad in [
            "",
            "evil.example:9464",
            "127.0.0.1:9465",
            "localhost",
            "nvr.lan:8081",
            "10.0.0.1:9464",
            "[::1]x",
            "localhost:x",
        ] {
            assert!(!g.host_ok(bad), "{bad}");
        }
        let lan = Guard::new(&HttpConfig::default(), "10.0.0.7:9464".parse().unwrap());
        assert!(lan.host_ok("10.0.0.7:9464"));
        assert!(!lan.host_ok("10.0.0.8:9464"));
        let any = Guard::new(&HttpConfig::default(), "0.0.0.0:9464".parse().unwrap());
        assert!(any.host_ok("10.0.0.8:9464"));
        assert!(any.host_ok("[fd00::1]:9464"));
        assert!(!any.host_ok("10.0.0.8:9465"));
        assert!(!any.host_ok("nvr.lan:9464"));
    }

    #[test]
    fn origins() {
        let g = guard(HttpConfig {
            allowed_origins: vec!["https://Dash.example/".into()],
            ..HttpConfig::default()
        });
        assert!(g.origin_ok("http://127.0.0.1:9464", "127.0.0.1:9464"));
        assert!(g.origin_ok("https://dash.example", "127.0.0.1:9464"));
        assert!(!g.origin_ok("http://evil.example", "127.0.0.1:9464"));
        assert!(!g.origin_ok("null", "127.0.0.1:9464"));
        assert!(!g.origin_ok("http://localhost:9464", "127.0.0.1:9464"));
    }

    #[test]
    fn query_tokens_keep_plus_signs() {
        assert_eq!(
            query_token(Some("kind=alert&token=ab+c/d%3D=")).as_deref(),
            Some("ab+c/d==")
        );
        assert_eq!(query_token(Some("kind=alert")), None);
        assert_eq!(query_token(None), None);
    }

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn feed_slots_are_freed_on_drop() {
        let s = Arc::new(FeedSlots::new(2));
        let a = s.try_acquire().unwrap();
        let _b = s.try_acquire().unwrap();
        assert!(s.try_acquire().is_none());
        drop(a);
        assert_eq!(s.in_use(), 1);
        assert!(s.try_acquire().is_some());
    }

    #[test]
    fn exposure_needs_a_token() {
        let mut c = HttpConfig {
            listen: "0.0.0.0:9464".into(),
            ..HttpConfig::default()
        };
        if std::env::var_os("PERCEPT_HTTP_TOKEN").is_none() {
            let e = check_exposure(&c).unwrap_err();
            assert!(e.contains("token") && !e.contains('\n'), "{e}");
        }
        c.token = Some("s3cret-token".into());
        assert!(check_exposure(&c).is_ok());
        c.token = None;
        c.listen = "[::1]:9464".into();
        assert!(check_exposure(&c).is_ok());
    }
}
