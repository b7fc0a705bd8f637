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
    let sink = MqttSink::start(&cfg(port, &["alert", "caption"]), &events).unwrap();
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
    let sink = MqttSink::start(&cfg(port, &[]), &events).unwrap();
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
    let sink = MqttSink::start(&cfg(port, &["alert"]), &events).unwrap();
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
    let sink = MqttSink::start(&good, &events).unwrap();
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
    let sink = MqttSink::start(&anonymous, &events).unwrap();
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
             [mqtt]\nenabled = true\nport = {port}\nkinds = [\"description\", \"summary\"]\n",
            crate::common::fixture_model()
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
