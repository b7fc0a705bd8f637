//! RTSP against an in-process-style server on loopback (`percept testsrc rtsp`, built on
//! gstreamer-rtsp-server, H.264 + AAC): outage and return, a stall without EOS, credentials.

use crate::common::*;
use serde_json::Value;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn port(offset: u16) -> u16 {
    20000 + (std::process::id() % 2000) as u16 * 4 + offset
}

struct Server(Child);

impl Server {
    fn start(port: u16, creds: Option<(&str, &str)>) -> Server {
        let mut cmd = Command::new(percept_bin());
        cmd.args([
            "testsrc",
            "rtsp",
            "--port",
            &port.to_string(),
            "--width",
            "320",
            "--height",
            "180",
        ]);
        if let Some((u, p)) = creds {
            cmd.args(["--user", u, "--password", p]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "RTSP server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Server(child)
    }

    fn signal(&self, sig: &str) {
        run_tool("kill", &[sig, &self.0.id().to_string()]);
    }

    fn kill(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_percept(dir: &Path, uri: &str, extra_cfg: &str) -> (Child, std::path::PathBuf) {
    let events = dir.join("events.jsonl");
    let cfg = dir.join("rtsp.toml");
    std::fs::write(
        &cfg,
        format!("[reconnect]\ninitial_seconds = 0.5\nmax_seconds = 2.0\n[http]\nenabled = false\n{extra_cfg}"),
    )
    .unwrap();
    let child = Command::new(percept_bin())
        .args([
            "run",
            "--config",
            cfg.to_str().unwrap(),
            "--events",
            events.to_str().unwrap(),
            "--source",
            uri,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (child, events)
}

/// Poll the events file until `pred` holds for some event after index `from`.
fn wait_for(
    events: &Path,
    from: usize,
    limit: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Option<(usize, Instant)> {
    let start = Instant::now();
    while start.elapsed() < limit {
        let ev = read_events(events);
        if let Some(i) = ev.iter().skip(from).position(&pred) {
            return Some((from + i, Instant::now()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn stop(child: Child) -> (std::process::ExitStatus, String) {
    run_tool("kill", &["-TERM", &child.id().to_string()]);
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn outage_of_10s_resumes_within_5s_and_reports_the_gap() {
    let d = tmpdir("rtsp-outage");
    let p = port(0);
    let server = Server::start(p, None);
    let (child, events) = spawn_percept(&d, &format!("cam=rtsp://127.0.0.1:{p}/test"), "");
    let (i, _) = wait_for(&events, 0, Duration::from_secs(30), |e| {
        e["kind"] == "frame"
    })
    .expect("first frame");
    std::thread::sleep(Duration::from_secs(2));
    server.kill();
    let down = read_events(&events).len();
    std::thread::sleep(Duration::from_secs(10));
    let _server = Server::start(p, None);
    let back = Instant::now();
    let (run_idx, _) = wait_for(&events, down, Duration::from_secs(30), |e| {
        e["kind"] == "state" && e["state"] == "running"
    })
    .expect("running again after the server returned");
    let (j, seen) = wait_for(&events, run_idx, Duration::from_secs(30), |e| {
        e["kind"] == "frame"
    })
    .expect("frames after the server returned");
    let resumed = seen.duration_since(back).as_secs_f64();
    assert!(
        resumed <= 5.0,
        "resumed {resumed:.1} s after the server came back"
    );
    let (status, err) = stop(child);
    assert!(status.success(), "{err}");
    let ev = read_events(&events);
    assert!(j > i);
    let reconnecting = of_kind(&ev, "cam", "state")
        .iter()
        .filter(|s| s["state"] == "reconnecting")
        .count();
    assert!(reconnecting >= 1);
    let gaps = of_kind(&ev, "cam", "gap");
    let outage = gaps
        .iter()
        .find(|g| g["reason"] == "outage")
        .expect("an outage gap");
    let len = f(outage, "end") - f(outage, "t");
    assert!(
        (9.0..=17.0).contains(&len),
        "gap of {len:.1} s for a 10 s outage: {outage}"
    );
    assert_frame_accounting(&ev, "cam");
    assert!(u(summary(&ev, "cam"), "reconnects") >= 1);
    println!("resumed {resumed:.2} s after the server returned; gap {len:.2} s");
}

#[test]
fn paused_server_trips_the_watchdog() {
    let d = tmpdir("rtsp-stall");
    let p = port(1);
    let server = Server::start(p, None);
    let (child, events) = spawn_percept(
        &d,
        &format!("cam=rtsp://127.0.0.1:{p}/test"),
        "[watchdog]\nstall_seconds = 5.0\n",
    );
    wait_for(&events, 0, Duration::from_secs(30), |e| {
        e["kind"] == "frame"
    })
    .expect("first frame");
    server.signal("-STOP");
    let paused = Instant::now();
    let n = read_events(&events).len();
    let (_, fired) = wait_for(&events, n, Duration::from_secs(15), |e| {
        e["kind"] == "state"
            && e["state"] == "reconnecting"
            && e["reason"].as_str().is_some_and(|r| r.contains("no data"))
    })
    .expect("watchdog fired");
    let after = fired.duration_since(paused).as_secs_f64();
    assert!((4.0..=8.0).contains(&after), "watchdog after {after:.1} s");
    server.signal("-CONT");
    let m = read_events(&events).len();
    wait_for(&events, m, Duration::from_secs(30), |e| {
        e["kind"] == "frame"
    })
    .expect("frames after resume");
    let (status, err) = stop(child);
    assert!(status.success(), "{err}");
    assert_frame_accounting(&read_events(&events), "cam");
}

#[test]
fn wrong_password_fails_cleanly_and_is_never_printed() {
    let d = tmpdir("rtsp-auth");
    let p = port(2);
    let _server = Server::start(p, Some(("viewer", "s3cret-pw")));
    let (out, events) = run_percept(
        &d,
        &[
            "--source",
            &format!("cam=rtsp://viewer:wr0ng-pw@127.0.0.1:{p}/test"),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("percept: source 'cam'") && err.contains("authentication failed"),
        "{err}"
    );
    let all = format!("{err}{}", serde_json::to_string(&events).unwrap());
    assert!(
        !all.contains("wr0ng-pw") && !all.contains("s3cret-pw"),
        "password leaked: {all}"
    );
    assert!(
        err.contains("viewer:***@"),
        "the redacted URI is logged: {err}"
    );
    // The right password works, here with RTP over UDP.
    let (child, events) = spawn_percept(
        &d,
        &format!("cam=rtsp://viewer:s3cret-pw@127.0.0.1:{p}/test?transport=udp"),
        "",
    );
    wait_for(&events, 0, Duration::from_secs(30), |e| {
        e["kind"] == "frame"
    })
    .expect("frames with the right password");
    let (status, err) = stop(child);
    assert!(status.success());
    assert!(!err.contains("s3cret-pw"), "{err}");
    let ev = read_events(&events);
    assert!(
        !of_kind(&ev, "cam", "audio").is_empty(),
        "AAC audio arrives too"
    );
}
