//! MQTT sink against a real Mosquitto broker (Debian's `mosquitto`), started here on a free
//! loopback port with a config that allows anonymous clients.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use percept::config::MqttConfig;
use percept::event::{Body, CaptionStatus, Event};
use percept::sink::mqtt::MqttSink;
use percept::sink::outbox::Outbox;
use percept::sink::Events;
use rumqttc::{Client, MqttOptions, Packet, QoS};
use serde_json::Value;

use crate::common::tmpdir;

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

struct Broker {
    child: Child,
    _dir: PathBuf,
}

impl Broker {
    fn start(port: u16) -> Broker {
        Broker::start_with(port, None)
    }

    /// With `login`, anonymous clients are refused and only that user/password gets in.
    fn start_with(port: u16, login: Option<(&str, &str)>) -> Broker {
        let dir = tmpdir("mosquitto");
        let conf = dir.join("mosquitto.conf");
        let mut text = format!("listener {port} 127.0.0.1\npersistence false\n");
        match login {
            None => text.push_str("allow_anonymous true\n"),
            Some((user, pass)) => {
                let file = dir.join("passwd");
                crate::common::run_tool(
                    "mosquitto_passwd",
                    &["-b", "-c", file.to_str().unwrap(), user, pass],
                );
                text.push_str(&format!(
                    "allow_anonymous false\npassword_file {}\n",
                    file.display()
                ));
            }
        }
        std::fs::write(&conf, text).unwrap();
        // Debian puts the broker in /usr/sbin, which is not on every user's PATH.
        let bin = ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("mosquitto");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto (apt-get install mosquitto; deploy/install-deps.sh)");
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "mosquitto did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Broker { child, _dir: dir }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A subscriber on `filter`; returns once the broker confirmed the subscription. Messages
/// arrive as (topic, JSON payload).
fn subscribe(port: u16, filter: &str) -> (Client, Receiver<(String, Value)>) {
    subscribe_as(port, filter, None)
}

fn subscribe_as(
    port: u16,
    filter: &str,
    login: Option<(&str, &str)>,
) -> (Client, Receiver<(String, Value)>) {
    let mut opts = MqttOptions::new(format!("it-sub-{port}"), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    if let Some((user, pass)) = login {
        opts.set_credentials(user, pass);
    }
    let (client, mut connection) = Client::new(opts, 16);
    client.subscribe(filter, QoS::AtLeastOnce).unwrap();
    let (tx, rx) = crossbeam_channel::unbounded();
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        for n in connection.iter() {
            match n {
                Ok(rumqttc::Event::Incoming(Packet::SubAck(_))) => {
                    let _ = ready_tx.try_send(());
                }
                Ok(rumqttc::Event::Incoming(Packet::Publish(p))) => {
                    let v: Value = serde_json::from_slice(&p.payload).unwrap();
                    if tx.send((p.topic.clone(), v)).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("subscription confirmed");
    (client, rx)
}

/// The sink with a fresh outbox of its own.
fn start(cfg: &MqttConfig, events: &Events) -> MqttSink {
    let outbox = Outbox::open(&tmpdir("outbox").join("mqtt"), 1 << 30).unwrap();
    MqttSink::start(cfg, outbox, events, &[]).unwrap()
}

fn cfg(port: u16, kinds: &[&str]) -> MqttConfig {
    MqttConfig {
        enabled: true,
        port,
        client_id: format!("percept-it-{port}"),
        kinds: kinds.iter().map(|k| k.to_string()).collect(),
        ..MqttConfig::default()
    }
}

fn alert(source: &str, t: f64) -> Event {
    Event::new(
        source,
        t,
        Some(t + 1.0),
        Body::Alert {
            question: "Is someone at the door?".into(),
            answer: "yes".into(),
            confidence: 0.9,
            evidence: "a person <script> at the door".into(),
            snapshot: None,
        },
    )
}

fn caption(source: &str, t: f64, text: &str) -> Event {
    Event::new(
        source,
        t,
        Some(t + 1.0),
        Body::Caption {
            text: text.into(),
            status: CaptionStatus::Final,
        },
    )
}

fn wait_connected(sink: &MqttSink) {
    let t = Instant::now();
    while !sink.stats().connected {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "sink never connected"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn events_reach_the_broker_on_their_topics() {
    let port = free_port();
    let _broker = Broker::start(port);
    let (_sub, rx) = subscribe(port, "percept/#");
    let events = Events::with_writer(None);
    let sink = start(&cfg(port, &["alert", "caption"]), &events);
    wait_connected(&sink);
    events.emit(Event::new(
        "door",
        0.5,
        None,
        Body::Gap {
            reason: "not a configured kind".into(),
        },
    ));
    events.emit(alert("door", 1.0));
    events.emit(caption("meeting/room+1", 2.0, "Hello there."));
    let mut got = Vec::new();
    while got.len() < 2 {
        got.push(rx.recv_timeout(Duration::from_secs(10)).expect("message"));
    }
    assert_eq!(got[0].0, "percept/door/alert");
    assert_eq!(got[0].1["question"], "Is someone at the door?");
    assert_eq!(got[0].1["kind"], "alert");
    assert_eq!(got[0].1["source"], "door");
    assert_eq!(got[0].1["t"], 1.0);
    // The second event of `door` (the gap was the first): `<run>-door-2`.
    let id = got[0].1["id"].as_str().unwrap();
    assert!(id.ends_with("-door-2") && id.len() == 15 + 7, "{id}");
    assert_eq!(got[0].1["evidence"], "a person <script> at the door");
    // Topic wildcards and level separators in a source name are neutralized.
    assert_eq!(got[1].0, "percept/meeting_room_1/caption");
    assert_eq!(got[1].1["status"], "final");
    assert_eq!(got[1].1["text"], "Hello there.");
    let stats = sink.stop();
    assert_eq!(stats.published, 2);
    assert_eq!(stats.dropped, 0);
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
}

#[test]
fn stop_flushes_what_is_queued() {
    let port = free_port();
    let _broker = Broker::start(port);
    let (_sub, rx) = subscribe(port, "percept/hall/caption");
    let events = Events::with_writer(None);
    let sink = start(&cfg(port, &[]), &events);
    wait_connected(&sink);
    let n = 300;
    for i in 0..n {
        events.emit(caption("hall", i as f64, &format!("line {i}")));
    }
    let t = Instant::now();
    let stats = sink.stop();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(stats.published, n);
    for i in 0..n {
        let (topic, v) = rx.recv_timeout(Duration::from_secs(10)).expect("message");
        assert_eq!(topic, "percept/hall/caption");
        assert_eq!(v["text"], format!("line {i}"));
    }
}

#[test]
fn reconnects_when_the_broker_comes_back() {
    let port = free_port();
    let events = Events::with_writer(None);
    // Broker down: start and emit must not block.
    let t = Instant::now();
    let sink = start(&cfg(port, &["alert"]), &events);
    for i in 0..50 {
        events.emit(alert("door", i as f64));
    }
    assert!(t.elapsed() < Duration::from_secs(1));
    std::thread::sleep(Duration::from_millis(500));
    assert!(!sink.stats().connected);

    let broker = Broker::start(port);
    let (_sub, rx) = subscribe(port, "percept/door/alert");
    // Reconnection happens within the backoff; keep emitting until one arrives.
    let t = Instant::now();
    let mut t_media = 100.0;
    let got = loop {
        events.emit(alert("door", t_media));
        if let Ok(m) = rx.recv_timeout(Duration::from_millis(200)) {
            break m;
        }
        t_media += 1.0;
        assert!(t.elapsed() < Duration::from_secs(20), "no reconnect");
    };
    assert_eq!(got.0, "percept/door/alert");
    assert!(sink.stats().connected);

    // Down again: still no blocking, and stop stays bounded.
    drop(broker);
    for i in 0..20 {
        events.emit(alert("door", 1000.0 + i as f64));
    }
    let t = Instant::now();
    sink.stop();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

#[test]
fn password_from_the_environment() {
    let port = free_port();
    let _broker = Broker::start_with(port, Some(("cam", "s3cret")));
    let (_sub, rx) = subscribe_as(port, "percept/#", Some(("cam", "s3cret")));
    let events = Events::with_writer(None);
    // A unique name: tests run in parallel threads of one process.
    let var = format!("PERCEPT_IT_MQTT_PASSWORD_{port}");
    std::env::set_var(&var, "s3cret");
    let good = MqttConfig {
        user: Some("cam".into()),
        password_env: Some(var),
        ..cfg(port, &["alert"])
    };
    let sink = start(&good, &events);
    wait_connected(&sink);
    events.emit(alert("door", 3.0));
    let (topic, v) = rx.recv_timeout(Duration::from_secs(10)).expect("message");
    assert_eq!(topic, "percept/door/alert");
    assert_eq!(v["t"], 3.0);
    sink.stop();

    // Without the password the broker refuses: no block, no crash, nothing published.
    let anonymous = MqttConfig {
        client_id: format!("percept-it-anon-{port}"),
        ..cfg(port, &["alert"])
    };
    let sink = start(&anonymous, &events);
    events.emit(alert("door", 4.0));
    std::thread::sleep(Duration::from_millis(500));
    let stats = sink.stop();
    assert!(!stats.connected);
    assert_eq!(stats.published, 0);
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
}

/// End to end: `percept run` with `[mqtt] enabled` publishes the model's descriptions (and
/// only the kinds asked for) to `percept/<source>/<kind>`.
#[test]
fn percept_run_publishes_model_events() {
    let port = free_port();
    let _broker = Broker::start(port);
    let (_client, rx) = subscribe(port, "percept/#");
    let d = tmpdir("mqtt-run");
    let cfg = d.join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\nid = \"{}\"\nmax_tokens = 4\n\
             [governor]\nsoft_tokens = 70\nheartbeat_seconds = 1.0\n\
             [mqtt]\nenabled = true\nport = {port}\nkinds = [\"description\", \"summary\"]\n\
             [outbox]\ndir = \"{}\"\n",
            crate::common::fixture_model(),
            d.join("outbox").display()
        ),
    )
    .unwrap();
    let (out, ev) = crate::common::run_percept(
        &d,
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--source",
            "porch=test:?duration=3&live=false",
        ],
    );
    assert!(out.status.success(), "{}", crate::common::stderr(&out));
    let mut got = Vec::new();
    while let Ok(m) = rx.recv_timeout(Duration::from_secs(5)) {
        got.push(m);
        if got.len() >= 4 {
            break;
        }
    }
    let descriptions: Vec<&Value> = got
        .iter()
        .filter(|(topic, _)| topic == "percept/porch/description")
        .map(|(_, v)| v)
        .collect();
    let in_file = crate::common::of_kind(&ev, "porch", "description");
    assert_eq!(descriptions.len(), in_file.len(), "{got:?}");
    assert_eq!(descriptions[0]["text"], in_file[0]["text"]);
    assert!(
        got.iter().any(|(t, _)| t == "percept/porch/summary"),
        "{got:?}"
    );
    assert!(
        got.iter().all(|(t, _)| !t.ends_with("/frame")),
        "kinds filter"
    );
}

/// A broker that keeps sessions on disk across a graceful restart (SIGTERM saves them), so a
/// persistent subscriber misses nothing while it is down.
struct PersistentBroker {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl PersistentBroker {
    fn start(port: u16, dir: &std::path::Path) -> PersistentBroker {
        // Started as root, mosquitto drops to its own user, which must be able to save.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
                 persistence_location {}/\nmax_queued_messages 0\n",
                dir.display()
            ),
        )
        .unwrap();
        let bin = ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("mosquitto");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto");
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "mosquitto did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        PersistentBroker {
            child: Some(child),
            port,
            dir: dir.to_path_buf(),
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            crate::common::run_tool("kill", &["-TERM", &c.id().to_string()]);
            let _ = c.wait();
        }
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "mosquitto did not stop"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn restart(&mut self) {
        let dir = self.dir.clone();
        *self = PersistentBroker::start(self.port, &dir);
    }
}

impl Drop for PersistentBroker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A message as it arrived: topic, payload bytes, retain flag.
type Raw = (String, Vec<u8>, bool);

/// A subscriber on `filters` that keeps reconnecting (a persistent session when `id` is
/// given: the broker keeps its subscriptions and queues QoS 1 messages while it is away).
fn subscribe_raw(port: u16, filters: &[&str], id: Option<&str>) -> (Client, Receiver<Raw>) {
    let client_id = id.map_or_else(
        || format!("it-raw-{port}-{}", filters.len()),
        str::to_string,
    );
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5))
        .set_clean_session(id.is_none())
        .set_max_packet_size(4 << 20, 4 << 20);
    let (client, mut connection) = Client::new(opts, 16);
    for f in filters {
        client.subscribe(*f, QoS::AtLeastOnce).unwrap();
    }
    let (tx, rx) = crossbeam_channel::unbounded();
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(filters.len());
    std::thread::spawn(move || {
        for n in connection.iter() {
            match n {
                Ok(rumqttc::Event::Incoming(Packet::SubAck(_))) => {
                    let _ = ready_tx.try_send(());
                }
                Ok(rumqttc::Event::Incoming(Packet::Publish(p))) => {
                    if tx
                        .send((p.topic.clone(), p.payload.to_vec(), p.retain))
                        .is_err()
                    {
                        break;
                    }
                }
                Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                Ok(_) => {}
                // The broker is down: poll again (rumqttc reconnects).
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    });
    for _ in filters {
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("subscription confirmed");
    }
    (client, rx)
}

fn ids_of_kind(events: &[Value], kind: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["kind"] == kind)
        .map(|e| e["id"].as_str().expect("every event has an id").to_string())
        .collect()
}

/// Issue 15: the broker is down while percept produces events; percept is killed with
/// SIGKILL, started again, and the broker comes back: every event of the first run arrives
/// (at least once: duplicates are told apart by `id`), none is lost.
#[test]
fn broker_down_and_sigkill_lose_no_event() {
    let port = free_port();
    let d = tmpdir("mqtt-sigkill");
    let broker_dir = d.join("broker");
    std::fs::create_dir_all(&broker_dir).unwrap();
    let mut broker = PersistentBroker::start(port, &broker_dir);
    let sub_id = format!("it-sigkill-{port}");
    let (sub, rx) = subscribe_raw(port, &["percept/#"], Some(&sub_id));
    // Down: the subscriber's session (and subscription) is kept on the broker's disk.
    broker.stop();
    let cfg = d.join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[run]\nfps = 5.0\n[mqtt]\nenabled = true\nport = {port}\nkinds = [\"frame\", \"summary\"]\n\
             [outbox]\ndir = \"{}\"\n",
            d.join("outbox").display()
        ),
    )
    .unwrap();
    let events1 = d.join("events1.jsonl");
    let mut child = crate::common::spawn_run(
        &[
            "--no-http",
            "--no-model",
            "--config",
            cfg.to_str().unwrap(),
            "--source",
            "cam=test:?live=true",
        ],
        &events1,
    );
    // Run until a good number of frames are in the events file, then SIGKILL.
    let t = Instant::now();
    loop {
        let n = ids_of_kind(&crate::common::read_events(&events1), "frame").len();
        if n >= 8 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no frames from percept"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().unwrap();
    let _ = child.wait();
    let ev1 = crate::common::read_events(&events1);
    let first = ids_of_kind(&ev1, "frame");
    assert!(first.len() >= 8);
    // Ids: one run id, then the source, then 1, 2, 3... in file order.
    let run = first[0].split('-').next().unwrap().to_string();
    assert_eq!(run.len(), 15, "{run}");
    for (i, e) in ev1.iter().enumerate() {
        assert_eq!(e["id"], format!("{run}-cam-{}", i + 1), "{e}");
    }
    let pending = Outbox::open(&d.join("outbox").join("mqtt"), 1 << 30)
        .unwrap()
        .len();
    assert!(
        pending >= first.len(),
        "{pending} records for {} frames",
        first.len()
    );

    // Restarted, then the broker comes back.
    let events2 = d.join("events2.jsonl");
    let mut child = crate::common::spawn_run(
        &[
            "--no-http",
            "--no-model",
            "--config",
            cfg.to_str().unwrap(),
            "--source",
            "cam=test:?live=true",
        ],
        &events2,
    );
    std::thread::sleep(Duration::from_secs(1));
    broker.restart();
    let mut want: std::collections::HashSet<String> = first.iter().cloned().collect();
    let mut arrived = std::collections::HashSet::new();
    let mut wait_for = |want: &mut std::collections::HashSet<String>| {
        let t = Instant::now();
        while !want.is_empty() {
            let left = Duration::from_secs(30).saturating_sub(t.elapsed());
            let Ok((topic, payload, _)) = rx.recv_timeout(left) else {
                panic!(
                    "{} events never arrived: {:?}",
                    want.len(),
                    want.iter().take(5).collect::<Vec<_>>()
                );
            };
            let v: Value = serde_json::from_slice(&payload).unwrap();
            let id = v["id"].as_str().unwrap().to_string();
            if topic == "percept/cam/frame" {
                want.remove(&id);
            }
            arrived.insert(id);
        }
    };
    wait_for(&mut want);
    crate::common::run_tool("kill", &["-TERM", &child.id().to_string()]);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let second = ids_of_kind(&crate::common::read_events(&events2), "frame");
    assert!(!second.is_empty());
    let mut want: std::collections::HashSet<String> = second.iter().cloned().collect();
    wait_for(&mut want);
    // The run ids differ, so nothing of run 2 can be mistaken for a duplicate of run 1.
    assert_ne!(
        first[0].rsplitn(3, '-').nth(2),
        second[0].rsplitn(3, '-').nth(2)
    );
    // Everything was acknowledged: the outbox is empty again.
    assert!(Outbox::open(&d.join("outbox").join("mqtt"), 1 << 30)
        .unwrap()
        .is_empty());
    let _ = sub.disconnect();
}

/// Issue 18: Home Assistant discovery configs (retained) for each source, states that follow
/// the answers, the latest text and snapshot, and availability.
#[test]
fn home_assistant_discovery_and_states() {
    let port = free_port();
    let _broker = Broker::start(port);
    let (_sub, rx) = subscribe_raw(port, &["homeassistant/#", "percept/#"], None);
    let events = Events::with_writer(None);
    let q1 = "Is someone at the door?";
    let q2 = "Is a package left on the doorstep?";
    let c = MqttConfig {
        homeassistant: true,
        ..cfg(port, &["alert"])
    };
    let outbox = Outbox::open(&tmpdir("outbox-ha").join("mqtt"), 1 << 30).unwrap();
    let sources = [percept::sink::homeassistant::SourceInfo {
        name: "door".into(),
        questions: vec![q1.into(), q2.into()],
    }];
    let sink = MqttSink::start(&c, outbox, &events, &sources).unwrap();
    wait_connected(&sink);
    let next = |what: &str| -> Raw {
        loop {
            let m = rx
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("no {what}"));
            if m.0 == what || (what.ends_with('#') && m.0.starts_with(what.trim_end_matches('#'))) {
                return m;
            }
        }
    };
    // Four configs, then online.
    let mut configs = std::collections::BTreeMap::new();
    while configs.len() < 4 {
        let (topic, payload, _) = next("homeassistant/#");
        let v: Value = serde_json::from_slice(&payload).unwrap();
        configs.insert(topic, v);
    }
    let node = format!("percept-it-{port}");
    let sensor = &configs[&format!("homeassistant/sensor/{node}/door_description/config")];
    assert_eq!(sensor["state_topic"], "percept/door/ha/text");
    assert_eq!(sensor["unique_id"], format!("{node}_door_description"));
    assert_eq!(sensor["availability_topic"], "percept/status");
    assert_eq!(sensor["payload_available"], "online");
    assert_eq!(sensor["payload_not_available"], "offline");
    assert_eq!(sensor["device"]["identifiers"][0], format!("{node}_door"));
    assert_eq!(sensor["device"]["name"], "door");
    let image = &configs[&format!("homeassistant/image/{node}/door_snapshot/config")];
    assert_eq!(image["image_topic"], "percept/door/ha/snapshot");
    assert_eq!(image["content_type"], "image/jpeg");
    let watch: Vec<&Value> = configs
        .iter()
        .filter(|(t, _)| t.starts_with(&format!("homeassistant/binary_sensor/{node}/door_watch_")))
        .map(|(_, v)| v)
        .collect();
    assert_eq!(watch.len(), 2);
    let q1_state = watch
        .iter()
        .find(|v| v["name"] == q1)
        .map(|v| v["state_topic"].as_str().unwrap().to_string())
        .unwrap();
    assert!(watch.iter().all(|v| v["device"] == sensor["device"]));
    assert_eq!(next("percept/status").1, b"online");

    // A yes turns the binary sensor ON, a no OFF.
    events.answer("door", q1, true);
    assert_eq!(next(&q1_state).1, b"ON");
    let jpeg = tmpdir("ha-snap").join("a.jpg");
    std::fs::write(&jpeg, b"\xff\xd8\xff\xe0 not really a jpeg \xff\xd9").unwrap();
    events.emit(Event::new(
        "door",
        5.0,
        Some(6.0),
        Body::Alert {
            question: q1.into(),
            answer: "yes".into(),
            confidence: 0.9,
            evidence: "a person".into(),
            snapshot: Some(jpeg.to_string_lossy().into_owned()),
        },
    ));
    assert_eq!(
        next("percept/door/ha/snapshot").1,
        std::fs::read(&jpeg).unwrap()
    );
    events.emit(Event::new(
        "door",
        7.0,
        None,
        Body::Description {
            text: "A courier rings the bell.".into(),
            frames: 1,
            soft_tokens: 70,
            model_ms: 1.0,
            batch: 1,
            latency_ms: 1.0,
        },
    ));
    let text: Value = serde_json::from_slice(&next("percept/door/ha/text").1).unwrap();
    assert_eq!(text["text"], "A courier rings the bell.");
    assert_eq!(text["kind"], "description");
    events.answer("door", q1, false);
    assert_eq!(next(&q1_state).1, b"OFF");

    // Retained: a subscriber arriving later gets configs and latest states at once.
    let (_late, late) = subscribe_raw(
        port,
        &["homeassistant/#", "percept/door/ha/#"],
        Some(&format!("late-{port}")),
    );
    let mut retained = std::collections::BTreeMap::new();
    while let Ok((topic, payload, retain)) = late.recv_timeout(Duration::from_secs(2)) {
        assert!(retain, "{topic}");
        retained.insert(topic, payload);
    }
    assert_eq!(retained.len(), 4 + 3, "{:?}", retained.keys());
    assert_eq!(retained[&q1_state], b"OFF");

    // A clean stop says offline.
    sink.stop();
    assert_eq!(next("percept/status").1, b"offline");
}

/// Issue 18: percept's last will turns the devices unavailable when percept dies.
#[test]
fn home_assistant_will_on_sigkill() {
    let port = free_port();
    let _broker = Broker::start(port);
    let (_sub, rx) = subscribe_raw(port, &["homeassistant/#", "percept/status"], None);
    let d = tmpdir("mqtt-will");
    let cfg = d.join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[mqtt]\nenabled = true\nport = {port}\nkinds = [\"summary\"]\nhomeassistant = true\n\
             client_id = \"will-{port}\"\n[outbox]\ndir = \"{}\"\n",
            d.join("outbox").display()
        ),
    )
    .unwrap();
    let mut child = crate::common::spawn_run(
        &[
            "--no-http",
            "--no-model",
            "--config",
            cfg.to_str().unwrap(),
            "--source",
            "porch=test:?live=true",
        ],
        &d.join("events.jsonl"),
    );
    let config = format!("homeassistant/sensor/will-{port}/porch_description/config");
    let (mut online, mut announced) = (false, false);
    let mut seen = Vec::new();
    while !(online && announced) {
        let Ok((topic, payload, _)) = rx.recv_timeout(Duration::from_secs(30)) else {
            let _ = child.kill();
            panic!("no online or no config; saw {seen:?}");
        };
        online |= topic == "percept/status" && payload == b"online";
        announced |= topic == config;
        seen.push(topic);
    }
    child.kill().unwrap();
    let _ = child.wait();
    let t = Instant::now();
    loop {
        let left = Duration::from_secs(10).saturating_sub(t.elapsed());
        let (topic, payload, _) = rx.recv_timeout(left).expect("the will");
        if topic == "percept/status" {
            assert_eq!(payload, b"offline");
            break;
        }
    }
}
