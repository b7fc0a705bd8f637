//! Live sources: overload with exact drop accounting under the byte budget, graceful SIGTERM,
//! the HTTP surface validated by promtool.

use crate::common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

fn sigterm(child: &Child) {
    // SAFETY-free: kill(1) does the signalling.
    run_tool("kill", &["-TERM", &child.id().to_string()]);
}

fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n")?.1.to_string();
    Some((code, body))
}

fn wait_http(addr: &str) {
    let start = Instant::now();
    while http_get(addr, "/healthz").is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "HTTP never came up on {addr}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// 1080p30 sampled at 30 fps by a worker 30x too slow: the queue and the byte budget hold,
/// every dropped frame is counted, and SIGTERM still ends with complete summaries.
#[test]
fn overload_keeps_budget_and_counts_every_drop() {
    let d = tmpdir("overload");
    let cfg = d.join("overload.toml");
    std::fs::write(
        &cfg,
        "[run]\nfps = 30\n[video]\nmax_side = 1920\nqueue_frames = 8\n[queues]\nbudget_mib = 16\n\
         [analysis]\ndelay_ms = 1000\n[http]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let events = d.join("events.jsonl");
    let mut child = spawn_run(
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--source",
            "cam=test:?width=1920&height=1080&fps=30",
        ],
        &events,
    );
    std::thread::sleep(Duration::from_secs(10));
    sigterm(&child);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let ev = read_events(&events);
    assert_frame_accounting(&ev, "cam");
    let s = summary(&ev, "cam");
    assert!(u(s, "frames_sampled") >= 150, "{s}");
    assert!(u(s, "frames_dropped") >= 100, "{s}");
    assert!(u(s, "frames_analyzed") >= 5, "{s}");
    // 16 MiB budget, 6 MiB frames: never more than the budget queued.
    assert!(u(s, "queue_bytes_peak") <= 16 * 1024 * 1024, "{s}");
    assert!(u(s, "queue_bytes_peak") >= 6 * 1024 * 1024, "{s}");
    let reasons: Vec<&str> = of_kind(&ev, "cam", "drop")
        .iter()
        .map(|d| d["reason"].as_str().unwrap())
        .collect();
    assert!(
        reasons.contains(&"queue_full") || reasons.contains(&"budget"),
        "{reasons:?}"
    );
    // Audio chunks dropped whole are reported as gaps.
    let audio_dropped = f(s, "audio_seconds_dropped");
    if audio_dropped > 0.0 {
        assert!(!of_kind(&ev, "cam", "gap").is_empty());
    }
}

#[test]
fn sigterm_flushes_summary_and_metrics_pass_promtool() {
    let d = tmpdir("sigterm");
    let port = 19000 + (std::process::id() % 1000) as u16;
    let addr = format!("127.0.0.1:{port}");
    let events = d.join("events.jsonl");
    let mut child = spawn_run(
        &[
            "--listen",
            &addr,
            "--source",
            "a=test:",
            "--source",
            "b=test:?video=checkers-8&audio=none",
        ],
        &events,
    );
    wait_http(&addr);
    std::thread::sleep(Duration::from_secs(3));
    let (code, health) = http_get(&addr, "/healthz").unwrap();
    assert_eq!(code, 200, "{health}");
    assert!(health.contains("\"a\":\"running\""), "{health}");
    let (code, metrics) = http_get(&addr, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("percept_frames_sampled_total{source=\"a\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("percept_source_state{source=\"b\",state=\"running\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("percept_capture_to_analysis_seconds_bucket"),
        "{metrics}"
    );
    let prom = d.join("metrics.prom");
    std::fs::write(&prom, &metrics).unwrap();
    let out = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&prom).unwrap())
        .output()
        .expect("promtool (Debian package prometheus) must be installed");
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    sigterm(&child);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let ev = read_events(&events);
    for src in ["a", "b"] {
        assert_frame_accounting(&ev, src);
        let s = summary(&ev, src);
        assert!(u(s, "frames_analyzed") >= 2, "{s}");
        assert!(u(s, "frames_analyzed") <= 6, "1 fps: {s}");
    }
    assert!(f(summary(&ev, "a"), "audio_seconds") >= 2.0);
    assert_eq!(f(summary(&ev, "b"), "audio_seconds"), 0.0);
    // Moving ball vs still checkerboard.
    let motion = |src: &str| -> f64 {
        of_kind(&ev, src, "frame")
            .iter()
            .skip(1)
            .map(|fr| f(fr, "motion"))
            .sum()
    };
    assert!(motion("a") > 0.001, "ball moves");
    assert!(motion("b") < 1e-4, "a checkerboard is still");
}
