//! Headless Chromium driven over the DevTools protocol, for tests that assert what a person
//! sees: open a page, wait for a condition in it, read values, take screenshots at a given
//! viewport. `Browser::launch` returns None (test skipped, said on stderr) where Chromium is
//! not installed, unless `PERCEPT_REQUIRE_CHROMIUM` is set.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Browser {
    child: Child,
    ws: tungstenite::WebSocket<TcpStream>,
    next_id: u64,
}

fn available() -> bool {
    let found = Command::new("chromium")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        assert!(
            std::env::var_os("PERCEPT_REQUIRE_CHROMIUM").is_none(),
            "PERCEPT_REQUIRE_CHROMIUM is set but `chromium` cannot be run"
        );
        eprintln!("SKIPPED: `chromium` is not installed (Debian: apt-get install chromium)");
    }
    found
}

/// `GET` on Chromium's DevTools HTTP endpoint (it answers with a Content-Length).
fn devtools_get(port: u16, path: &str) -> Value {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").unwrap();
    let mut reader = BufReader::new(s);
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    serde_json::from_slice(&body).unwrap()
}

impl Browser {
    /// Chromium showing `url`, its profile under `dir`.
    pub fn launch(url: &str, dir: &Path) -> Option<Browser> {
        if !available() {
            return None;
        }
        let mut child = Command::new("chromium")
            .args([
                "--headless",
                "--disable-gpu",
                "--no-sandbox",
                "--no-first-run",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                "--window-size=1280,800",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", dir.join("profile").display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chromium");
        // Chromium says where DevTools listens on stderr; keep draining it so it never blocks.
        let stderr = child.stderr.take().unwrap();
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("DevTools listening on ws://127.0.0.1:") {
                    let port: u16 = rest.split('/').next().unwrap().parse().unwrap();
                    let _ = port_tx.send(port);
                }
            }
        });
        let port = port_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("chromium's DevTools port");
        let until = Instant::now() + Duration::from_secs(60);
        let ws_url = loop {
            let pages = devtools_get(port, "/json/list");
            let page =
                pages.as_array().unwrap().iter().find(|p| {
                    p["type"] == "page" && p["url"].as_str().unwrap_or("").starts_with(url)
                });
            if let Some(p) = page {
                break p["webSocketDebuggerUrl"].as_str().unwrap().to_string();
            }
            assert!(Instant::now() < until, "no page in {pages}");
            std::thread::sleep(Duration::from_millis(100));
        };
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let (ws, _) = tungstenite::client::client(ws_url.as_str(), stream).expect("devtools");
        let mut b = Browser {
            child,
            ws,
            next_id: 0,
        };
        b.viewport(1280, 800, false);
        // The target exists before its document has loaded (it starts as about:blank).
        b.wait(
            "the page to load",
            "location.href !== 'about:blank' && document.readyState === 'complete'",
        );
        Some(b)
    }

    pub fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = serde_json::json!({ "id": id, "method": method, "params": params });
        self.ws
            .send(tungstenite::Message::Text(msg.to_string().into()))
            .unwrap();
        loop {
            if let tungstenite::Message::Text(t) = self.ws.read().expect("devtools reply") {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v["id"] == id {
                    assert!(v.get("error").is_none(), "{method}: {v}");
                    return v["result"].clone();
                }
            }
        }
    }

    /// The value of a JavaScript expression (promises awaited).
    pub fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            serde_json::json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }),
        );
        if let Some(ex) = r.get("exceptionDetails") {
            panic!("{expr}: {ex}");
        }
        r["result"]["value"].clone()
    }

    /// Waits (up to a minute: the machine may be loaded) until `expr` is true.
    pub fn wait(&mut self, what: &str, expr: &str) {
        let until = Instant::now() + Duration::from_secs(60);
        while self.eval(expr) != Value::Bool(true) {
            assert!(
                Instant::now() < until,
                "timed out waiting for {what} ({expr})"
            );
            std::thread::sleep(Duration::from_millis(150));
        }
    }

    pub fn viewport(&mut self, width: u32, height: u32, mobile: bool) {
        // The window's size includes browser UI; the viewport is what gets captured.
        self.call(
            "Emulation.setDeviceMetricsOverride",
            serde_json::json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile }),
        );
    }

    /// PNG of the viewport, also written to `path` for a person to look at.
    pub fn screenshot(&mut self, path: &Path) -> image::RgbImage {
        let shot = self.call(
            "Page.captureScreenshot",
            serde_json::json!({ "format": "png" }),
        );
        use base64::Engine as _;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        std::fs::write(path, &png).unwrap();
        image::load_from_memory(&png)
            .expect("decode screenshot")
            .to_rgb8()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Distinct colours and the share of pixels unlike the most common one: a rendered page has
/// hundreds of colours and content over much of it; a blank or error page has neither.
pub fn richness(img: &image::RgbImage) -> (usize, f64) {
    let mut counts = std::collections::HashMap::new();
    for p in img.pixels() {
        *counts.entry(p.0).or_insert(0usize) += 1;
    }
    let top = counts.values().copied().max().unwrap_or(0);
    let total = (img.width() * img.height()) as usize;
    (counts.len(), 1.0 - top as f64 / total.max(1) as f64)
}
