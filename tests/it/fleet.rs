//! The fleet: live sources sharded over real `percept run` processes, and recordings shared
//! out to real `percept analyze --queue` workers through a real `redis-server`.

use crate::common::*;
use percept::fleet::shard::owner;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CLIP: &str = "test:?video=smpte&audio=sine&width=160&height=120&fps=5&duration=1&live=false";

fn source(name: &str) -> String {
    format!("{name}={CLIP}")
}

/// Names, of `pool`, that shard `k` of `n` owns and that it does not.
fn split(pool: &[String], k: u32, n: u32) -> (Vec<String>, Vec<String>) {
    pool.iter().cloned().partition(|s| owner(s, n) == k)
}

fn sources_with_summary(events: &[Value]) -> BTreeSet<String> {
    events
        .iter()
        .filter(|e| e["kind"] == "summary")
        .map(|e| e["source"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn shards_run_each_source_exactly_once_and_label_state_events() {
    let d = tmpdir("fleet-shards");
    let names: Vec<String> = (0..8).map(|i| format!("cam{i}")).collect();
    let n = 3;
    let children: Vec<(u32, PathBuf, Child)> = (0..n)
        .map(|k| {
            let events = d.join(format!("shard{k}.jsonl"));
            let mut c = Command::new(percept_bin());
            c.args([
                "run",
                "--no-http",
                "--no-model",
                "--shard",
                &format!("{k}/{n}"),
            ])
            .arg("--events")
            .arg(&events);
            for s in &names {
                c.args(["--source", &source(s)]);
            }
            let child = c
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            (k, events, child)
        })
        .collect();
    let mut seen = BTreeMap::new();
    for (k, events, child) in children {
        let out = child.wait_with_output().unwrap();
        let err = stderr(&out);
        let ev = read_events(&events);
        let ran = sources_with_summary(&ev);
        let (mine, _) = split(&names, k, n);
        assert!(out.status.success(), "shard {k}: {err}");
        if mine.is_empty() {
            assert!(err.contains("has no source"), "{err}");
        }
        assert_eq!(
            ran,
            mine.iter().cloned().collect::<BTreeSet<_>>(),
            "shard {k}"
        );
        let states: Vec<&Value> = ev.iter().filter(|e| e["kind"] == "state").collect();
        assert!(!mine.is_empty() || states.is_empty());
        for s in states {
            assert_eq!(s["shard"], format!("{k}/{n}"), "{s}");
        }
        for s in ran {
            assert!(seen.insert(s.clone(), k).is_none(), "{s} ran twice");
        }
    }
    assert_eq!(seen.len(), names.len(), "{seen:?}");
}

/// `percept run` in the background with its HTTP address read from its log.
struct Served {
    child: Child,
    addr: String,
    log: std::sync::mpsc::Receiver<String>,
}

// The child goes back to the caller, who waits for it.
#[allow(clippy::zombie_processes)]
fn serve(args: &[&str]) -> Served {
    let mut child = Command::new(percept_bin())
        .arg("run")
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let start = Instant::now();
    let mut lines = Vec::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60).saturating_sub(start.elapsed()))
            .unwrap_or_else(|_| panic!("no HTTP address in the log: {lines:?}"));
        if let Some(a) = line.split("addr=").nth(1) {
            let addr = a.split_whitespace().next().unwrap().to_string();
            // Lines seen so far go back for the caller.
            let (tx2, rx2) = std::sync::mpsc::channel();
            for l in lines {
                tx2.send(l).unwrap();
            }
            std::thread::spawn(move || {
                for l in rx {
                    if tx2.send(l).is_err() {
                        break;
                    }
                }
            });
            return Served {
                child,
                addr,
                log: rx2,
            };
        }
        lines.push(line);
    }
}

fn request(addr: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let code = buf.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = buf
        .split_once("\r\n\r\n")
        .map(|b| b.1.to_string())
        .unwrap_or_default();
    (code, body)
}

fn wait_exit(child: &mut Child, secs: u64) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if start.elapsed() > Duration::from_secs(secs) {
            let _ = child.kill();
            panic!("still running after {secs} s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_empty_shard_serves_health_and_metrics_and_refuses_foreign_sources() {
    let d = tmpdir("fleet-empty-shard");
    let n = 16;
    let pool: Vec<String> = (0..40).map(|i| format!("door{i}")).collect();
    // A shard that owns neither configured source, a name it owns and one it does not.
    let configured = ["yard", "gate"];
    let k = (0..n)
        .find(|&k| configured.iter().all(|c| owner(c, n) != k))
        .unwrap();
    let (mine, theirs) = split(&pool, k, n);
    let events = d.join("events.jsonl");
    let shard = format!("{k}/{n}");
    // Synthetic sources over the API need their scheme listed.
    let config = d.join("shard.toml");
    std::fs::write(&config, "[http]\napi_schemes = [\"test\"]\n").unwrap();
    let mut s = serve(&[
        "--config",
        config.to_str().unwrap(),
        "--no-model",
        "--shard",
        &shard,
        "--events",
        events.to_str().unwrap(),
        "--source",
        &source(configured[0]),
        "--source",
        &source(configured[1]),
    ]);
    let said: Vec<String> = s.log.try_iter().collect();
    assert!(
        said.iter()
            .any(|l| l.contains(&format!("shard {shard} has no source"))),
        "{said:?}"
    );
    // Still up, healthy, and its metrics say which shard it is.
    let (code, body) = request(&s.addr, "GET", "/healthz", None);
    assert_eq!(code, 200, "{body}");
    let (code, metrics) = request(&s.addr, "GET", "/metrics", None);
    assert_eq!(code, 200);
    assert!(
        metrics.contains(&format!("percept_queue_budget_bytes{{shard=\"{shard}\"}}")),
        "{metrics}"
    );
    assert!(s.child.try_wait().unwrap().is_none(), "exited while empty");
    // A source another shard owns is refused, naming that shard.
    let other = &theirs[0];
    let (code, body) = request(
        &s.addr,
        "POST",
        "/v1/sources",
        Some(&format!(r#"{{"name":"{other}","uri":"{CLIP}"}}"#)),
    );
    assert_eq!(code, 409, "{body}");
    let want = format!("shard {}/{n}", owner(other, n));
    assert!(body.contains(&want), "{body} lacks {want}");
    // One it owns runs; when it ends nothing is left and the shard exits 0.
    let (code, body) = request(
        &s.addr,
        "POST",
        "/v1/sources",
        Some(&format!(r#"{{"name":"{}","uri":"{CLIP}"}}"#, mine[0])),
    );
    assert_eq!(code, 201, "{body}");
    let status = wait_exit(&mut s.child, 60);
    assert!(status.success(), "{status:?}");
    let ev = read_events(&events);
    assert_eq!(
        sources_with_summary(&ev),
        [mine[0].clone()].into_iter().collect()
    );
    let states = of_kind(&ev, &mine[0], "state");
    assert!(!states.is_empty());
    assert!(
        states.iter().all(|e| e["shard"] == shard.as_str()),
        "{states:?}"
    );

    // Without HTTP an empty shard has nothing to do: it says so and exits 0 at once.
    let out = Command::new(percept_bin())
        .args(["run", "--no-http", "--no-model", "--shard", &shard])
        .args(["--source", &source(configured[0])])
        .arg("--events")
        .arg(d.join("none.jsonl"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("has no source"), "{}", stderr(&out));
    // A bad spec is one line and exit 2.
    for bad in ["3/3", "x/2", "hostname/4"] {
        let out = Command::new(percept_bin())
            .args(["run", "--no-http", "--shard", bad, "--source", CLIP])
            .env("HOSTNAME", "gateway")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}");
        assert!(stderr(&out).contains("--shard"), "{}", stderr(&out));
    }
}

#[test]
fn hostname_gives_the_statefulset_ordinal() {
    let d = tmpdir("fleet-hostname");
    let pool: Vec<String> = (0..12).map(|i| format!("cam{i}")).collect();
    let (mine, _) = split(&pool, 2, 3);
    let events = d.join("e.jsonl");
    let mut c = Command::new(percept_bin());
    c.args(["run", "--no-http", "--no-model", "--shard", "hostname/3"])
        .arg("--events")
        .arg(&events)
        .env("HOSTNAME", "percept-2");
    for s in &pool {
        c.args(["--source", &source(s)]);
    }
    let out = c.stdin(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        sources_with_summary(&read_events(&events)),
        mine.into_iter().collect()
    );
}

// ---- the Redis Streams work queue ----

/// A `redis-server` of its own on a free port, stopped on drop.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start(dir: &Path) -> Redis {
        for _ in 0..20 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server (Debian package redis-server)");
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if child.try_wait().unwrap().is_some() {
                    break; // port taken meanwhile: try another
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Redis { child, port };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("cannot start redis-server");
    }

    fn url(&self, name: &str) -> String {
        format!("redis://127.0.0.1:{}/{name}", self.port)
    }

    /// `redis-cli` output lines (raw, one value a line).
    fn cli(&self, args: &[&str]) -> Vec<String> {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A spoken recording of `n` sentences with pauses.
fn speech(dir: &Path, file: &str, words: &str, n: usize) -> PathBuf {
    let pause = dir.join("pause.wav");
    if !pause.exists() {
        ffmpeg(&format!(
            "-f lavfi -t 1.2 -i anullsrc=r=22050:cl=mono {}",
            pause.display()
        ));
    }
    let mut a: Vec<String> = ["-hide_banner", "-loglevel", "error", "-y"]
        .map(String::from)
        .to_vec();
    for i in 1..=n {
        let s = dir.join(format!("{file}-{i}.wav"));
        run_tool(
            "espeak-ng",
            &[
                "-w",
                s.to_str().unwrap(),
                &format!("Sentence {i} about {words}."),
            ],
        );
        a.extend(["-i".into(), s.display().to_string()]);
        a.extend(["-i".into(), pause.display().to_string()]);
    }
    let out = dir.join("recs").join(format!("{file}.wav"));
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    a.extend([
        "-filter_complex".into(),
        format!("concat=n={}:v=0:a=1", 2 * n),
        out.display().to_string(),
    ]);
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    run_tool("ffmpeg", &refs);
    out
}

fn model_config(d: &Path, name: &str, delay_ms: u64) -> PathBuf {
    let p = d.join(name);
    std::fs::write(
        &p,
        format!(
            "[model]\nid = \"{}\"\nmax_tokens = 6\ndelay_ms = {delay_ms}\n",
            fixture_model()
        ),
    )
    .unwrap();
    p
}

/// What the user keeps of a recording's folder (as in the analyze tests): analysis events
/// with times and text, and the subtitle files.
fn kept(dir: &Path) -> (Vec<String>, String, String) {
    let mut v: Vec<String> = read_events(&dir.join("events.jsonl"))
        .into_iter()
        .filter(|e| {
            matches!(e["kind"].as_str(), Some("audio" | "frame" | "transcript"))
                || (e["kind"] == "summary" && e.get("text").is_some())
        })
        .map(|e: Value| format!("{} {} {} {}", e["kind"], e["t"], e["end"], e["text"]))
        .collect();
    v.sort();
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    (v, read("transcript.vtt"), read("transcript.srt"))
}

fn checkpoint(dir: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(dir.join("checkpoint.json")).ok()?).ok()
}

fn worker(queue: &str, out: &Path, cfg: &Path, log: &Path) -> Child {
    Command::new(percept_bin())
        .args([
            "analyze",
            "--queue",
            queue,
            "--claim-after",
            "2",
            "--until-empty",
        ])
        .arg("--out")
        .arg(out)
        .arg("--config")
        .arg(cfg)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

#[test]
fn three_workers_share_recordings_and_survive_a_sigkill() {
    let d = tmpdir("fleet-queue");
    let redis = Redis::start(&d);
    let topics = ["the river", "the forest", "the owls"];
    for (i, t) in topics.iter().enumerate() {
        speech(&d, &format!("site{i}"), t, 3);
    }
    let recs = d.join("recs");
    let fast = model_config(&d, "fast.toml", 0);
    let slow = model_config(&d, "slow.toml", 30);
    // The reference: one machine, one run.
    let reference = d.join("reference");
    let out = Command::new(percept_bin())
        .arg("analyze")
        .arg(&recs)
        .arg("--out")
        .arg(&reference)
        .arg("--config")
        .arg(&fast)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    let queue = redis.url("field");
    let out = Command::new(percept_bin())
        .args(["enqueue", "--queue", &queue])
        .arg(&recs)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("3 recordings queued"),
        "{}",
        stderr(&out)
    );
    let shared = d.join("shared");
    let logs: Vec<PathBuf> = (0..3).map(|i| d.join(format!("worker{i}.log"))).collect();
    let mut workers: Vec<Child> = logs
        .iter()
        .map(|l| worker(&queue, &shared, &slow, l))
        .collect();

    // Kill, with SIGKILL, the worker holding a recording it has checkpointed but not finished.
    let start = Instant::now();
    let (victim, name) = 'found: loop {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no recording in progress"
        );
        let pending = redis.cli(&["XPENDING", "field", "percept", "-", "+", "10"]);
        for entry in pending.chunks(4) {
            let [id, consumer, ..] = entry else { continue };
            let fields = redis.cli(&["XRANGE", "field", id, id]);
            let Some(i) = fields.iter().position(|f| f == "name") else {
                continue;
            };
            let name = fields[i + 1].clone();
            let busy = checkpoint(&shared.join(&name))
                .is_some_and(|c| c["done"] == false && c["media_t"].as_f64().unwrap_or(0.0) > 0.0);
            let pid: u32 = consumer.rsplit('-').next().unwrap().parse().unwrap();
            if busy {
                if let Some(w) = workers.iter_mut().find(|w| w.id() == pid) {
                    w.kill().unwrap();
                    w.wait().unwrap();
                    break 'found (pid, name);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let before = checkpoint(&shared.join(&name)).unwrap();
    assert_eq!(before["done"], false, "killed too late: {before}");

    for w in workers.iter_mut().filter(|w| w.id() != victim) {
        let status = wait_exit(w, 900);
        assert!(status.success(), "{status:?}");
    }
    let log_text: Vec<String> = logs
        .iter()
        .map(|l| std::fs::read_to_string(l).unwrap())
        .collect();
    let all = log_text.join("\n");
    // Every recording done once, the killed one resumed by another worker.
    let names: Vec<String> = (0..3).map(|i| format!("site{i}")).collect();
    for n in &names {
        let done = all
            .lines()
            .filter(|l| l.contains(&format!("{n} (")) && l.contains(" -> "))
            .count();
        assert_eq!(done, 1, "{n} done {done} times:\n{all}");
        assert_eq!(
            kept(&shared.join(n)),
            kept(&reference.join(n)),
            "{n} differs from the single-machine run"
        );
        assert_eq!(checkpoint(&shared.join(n)).unwrap()["done"], true);
    }
    let resumed = all
        .lines()
        .find(|l| l.contains(&format!("{name} (resumed at")))
        .unwrap_or_else(|| panic!("{name} was not resumed:\n{all}"));
    assert!(!resumed.contains(&format!("-{victim})")), "{resumed}");
    assert!(all.contains("Taking over a job"), "{all}");
    // Nothing pending, nothing dead.
    assert_eq!(
        redis
            .cli(&["XPENDING", "field", "percept"])
            .first()
            .map(String::as_str),
        Some("0")
    );
    assert_eq!(redis.cli(&["XLEN", "field:dead"]), ["0"]);
}

#[test]
fn a_recording_that_fails_three_times_is_dead_lettered_with_its_error() {
    let d = tmpdir("fleet-dead");
    let redis = Redis::start(&d);
    let recs = d.join("recs");
    std::fs::create_dir_all(&recs).unwrap();
    let broken = recs.join("broken.wav");
    std::fs::write(&broken, b"RIFF....WAVEthis is not audio at all").unwrap();
    let cfg = model_config(&d, "m.toml", 0);
    let queue = redis.url("q");
    let out = Command::new(percept_bin())
        .args(["enqueue", "--queue", &queue])
        .arg(&broken)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let job_line = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(job_line.contains("broken.wav\tbroken"), "{job_line}");
    // Queued again: the same folder name (the same recording), a new job.
    let out = Command::new(percept_bin())
        .args(["enqueue", "--queue", &queue])
        .arg(&broken)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("\tbroken\n"));
    let log = d.join("w.log");
    let mut w = worker(&queue, &d.join("out"), &cfg, &log);
    let status = wait_exit(&mut w, 120);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{text}");
    assert!(text.contains("failure 3 of 3"), "{text}");
    assert!(text.contains("2 dead-lettered"), "{text}");
    let dead = redis.cli(&["XRANGE", "q:dead", "-", "+"]);
    let errors: Vec<&String> = dead
        .iter()
        .enumerate()
        .filter(|(i, _)| *i > 0 && dead[i - 1] == "error")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(errors.len(), 2, "{dead:?}");
    assert!(errors[0].contains("broken.wav"), "{dead:?}");
    assert_eq!(redis.cli(&["XPENDING", "q", "percept"])[0], "0");

    // Bad queue URLs and an unreachable server: one line, exit 2, no password shown.
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for (args, want) in [
        (
            vec!["enqueue", "--queue", "http://h/q", broken.to_str().unwrap()],
            "scheme must be redis://",
        ),
        (
            vec![
                "enqueue",
                "--queue",
                "redis://:hunter2@127.0.0.1/",
                broken.to_str().unwrap(),
            ],
            "no queue name",
        ),
        (
            vec![
                "analyze",
                "--queue",
                &format!("redis://:hunter2@127.0.0.1:{closed}/q"),
                "--out",
                d.to_str().unwrap(),
            ],
            "cannot connect",
        ),
    ] {
        let out = Command::new(percept_bin())
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
}

// ---- the image's chart ----

/// A Python venv with Helm's own Go SDK (helm-python-sdk: `helm lint` and template rendering
/// without a helm binary or a cluster) and the Kubernetes OpenAPI schemas
/// (kubernetes-validate), from PyPI; made once under the target folder.
fn helm_venv() -> PathBuf {
    let v = Path::new(env!("CARGO_TARGET_TMPDIR")).join("helm-check-venv");
    let ready = v.join("ready");
    if !ready.exists() {
        let _ = std::fs::remove_dir_all(&v);
        run_tool("python3", &["-m", "venv", v.to_str().unwrap()]);
        run_tool(
            v.join("bin/pip").to_str().unwrap(),
            &[
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "helm-python-sdk==0.2.2",
                "kubernetes-validate==1.37.0",
                "pyyaml",
            ],
        );
        std::fs::write(&ready, "").unwrap();
    }
    v
}

/// Sample names in a Prometheus text exposition.
fn exposed(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

#[test]
fn chart_renders_validates_and_names_only_real_metrics() {
    let d = tmpdir("fleet-chart");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = helm_venv();
    let out = Command::new(venv.join("bin/python"))
        .arg(root.join("deploy/helm/check.py"))
        .arg(root.join("deploy/helm/percept"))
        .arg(&d)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(out.status.success(), "{said}");
    assert!(said.contains("helm lint --strict: ok"), "{said}");
    assert!(said.contains("rendered shards=3"), "{said}");
    // Prometheus's own checker on the rendered rules.
    let rules = d.join("rules.yaml");
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("SUCCESS: 5 rules found"));
    // The ConfigMap's TOML is a valid percept config.
    let out = Command::new(percept_bin())
        .args(["config", "check"])
        .arg(d.join("live.toml"))
        .arg(d.join("worker.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Every metric the rules and the dashboard name is in a running percept's /metrics: a
    // live source with the tiny model, its worker slowed so frames and audio are dropped.
    let wanted: Vec<String> = std::fs::read_to_string(d.join("metrics.txt"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert!(wanted.len() >= 8, "{wanted:?}");
    let cfg = d.join("stress.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\nid = \"{}\"\nmax_tokens = 4\n\n[analysis]\ndelay_ms = 1500\n\n\
             [video]\nqueue_frames = 1\n\n[audio]\nqueue_seconds = 1.0\n\n[captions]\ndir = \"\"\n",
            fixture_model()
        ),
    )
    .unwrap();
    let mut s = serve(&[
        "--config",
        cfg.to_str().unwrap(),
        "--events",
        d.join("events.jsonl").to_str().unwrap(),
        "--fps",
        "5",
        "--task",
        "describe",
        "--source",
        "cam=test:?live=true&width=160&height=120",
    ]);
    let start = Instant::now();
    let missing = loop {
        let (_, metrics) = request(&s.addr, "GET", "/metrics", None);
        let have = exposed(&metrics);
        let missing: Vec<&String> = wanted.iter().filter(|m| !have.contains(*m)).collect();
        if missing.is_empty() || start.elapsed() > Duration::from_secs(90) {
            break missing;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let _ = s.child.kill();
    let _ = s.child.wait();
    assert!(
        missing.is_empty(),
        "named by the chart but not in /metrics: {missing:?}"
    );
}
