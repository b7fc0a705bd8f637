//! A run's shared state without a worker, model or HTTP: reloads, concurrent adds, paths.

use super::prepare::prepare_one;
use super::*;
use crate::control::{AddSource, ControlApi, ControlError};
use crate::source::{RtspTransport, SourceKind};

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "percept-run-{tag}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A run's shared state as `run_with` builds it, with no worker, model or HTTP: the
/// control messages wait in the returned receiver.
fn shared(
    cfg: &Config,
    config: Option<PathBuf>,
) -> (Arc<Shared>, crossbeam_channel::Receiver<Control>) {
    gstreamer::init().unwrap();
    let (ctl_tx, ctl_rx) = crossbeam_channel::unbounded();
    let (replies, _) = crossbeam_channel::unbounded();
    let metrics = Arc::new(Metrics::new());
    let env = crate::tasks::test_support::env();
    let s = Shared {
        cfg: Mutex::new(cfg.clone()),
        overrides: Overrides {
            config_path: config,
            ..Overrides::default()
        },
        sources: Mutex::new(Vec::new()),
        ctl_tx,
        replies,
        events: Events::with_writer(None),
        metrics,
        board: Arc::new(StateBoard::default()),
        budget: ByteBudget::new(64 << 20),
        queue_stop: Arc::new(AtomicBool::new(false)),
        dispatch: Arc::new(Dispatch::default()),
        env,
        closing: AtomicBool::new(false),
        restarting: AtomicUsize::new(0),
        resume: None,
    };
    let s = Arc::new(s);
    for p in prepare(cfg).unwrap() {
        let r = s.start(p).unwrap();
        lock(&s.sources).push(r);
    }
    (s, ctl_rx)
}

/// Stops every source thread (they run real GStreamer graphs) and waits a while for them.
fn stop_all(s: &Shared) {
    for r in lock(&s.sources).iter() {
        r.stop.store(true, Ordering::Relaxed);
    }
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10)
        && lock(&s.sources)
            .iter()
            .any(|r| r.handle.as_ref().is_some_and(|h| !h.is_finished()))
    {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn running(s: &Shared) -> Vec<String> {
    lock(&s.sources)
        .iter()
        .filter(|r| !r.removed)
        .map(|r| r.spec.name.clone())
        .collect()
}

/// The task the worker was last told `name` has (when it was added, or changed since).
fn told(rx: &crossbeam_channel::Receiver<Control>, name: &str) -> Option<TaskSpec> {
    let mut last = None;
    for msg in rx.try_iter() {
        match msg {
            Control::Add(src) if src.feed.name == name => {
                last = src.task.map(|t| t.state.spec.clone());
            }
            Control::SetTask { name: n, spec } if n == name => last = Some(spec),
            _ => {}
        }
    }
    last
}

const BASE: &str = "[run]\nfps = 2.0\n[model]\nenabled = true\n";

#[test]
fn reload_keeps_derived_names_and_restarts_changed_sources() {
    let d = tmpdir("reload-names");
    let path = d.join("c.toml");
    let two = format!(
        "{BASE}[[source]]\nuri = \"test:?live=true\"\n[[source]]\nuri = \"test:?live=true\"\n\
         [[source]]\nname = \"cam\"\nuri = \"test:?live=true\"\nfps = 1.0\n"
    );
    std::fs::write(&path, &two).unwrap();
    let cfg = Config::load(&path).unwrap();
    let (s, rx) = shared(&cfg, Some(path.clone()));
    assert_eq!(running(&s), ["test", "test-2", "cam"]);

    // The same file: nothing changes, `test-2` included.
    s.reload().unwrap();
    assert_eq!(running(&s), ["test", "test-2", "cam"]);
    assert_eq!(lock(&s.sources).len(), 3, "no source restarted");

    // cam's fps changes (it restarts) and its window grows (a task setting).
    std::fs::write(
        &path,
        two.replace("fps = 1.0\n", "fps = 4.0\nwindow_frames = 3\n"),
    )
    .unwrap();
    s.reload().unwrap();
    assert_eq!(running(&s), ["test", "test-2", "cam"]);
    {
        let sources = lock(&s.sources);
        let cams: Vec<&Running> = sources.iter().filter(|r| r.spec.name == "cam").collect();
        assert_eq!(cams.len(), 2, "cam restarted");
        assert!(cams[0].removed && !cams[1].removed);
        assert_eq!(cams[1].key.fps, 4.0);
        let t = cams[1].task.as_ref().unwrap();
        assert_eq!(t.window_frames, 3);
    }
    assert_eq!(told(&rx, "cam").unwrap().window_frames, 3);
    stop_all(&s);
}

#[test]
fn reload_adds_sources_with_every_setting_and_reports_every_failure() {
    let d = tmpdir("reload-add");
    let path = d.join("c.toml");
    std::fs::write(
        &path,
        format!("{BASE}[[source]]\nname = \"a\"\nuri = \"test:?live=true\"\n"),
    )
    .unwrap();
    let cfg = Config::load(&path).unwrap();
    let (s, rx) = shared(&cfg, Some(path.clone()));
    let var = format!("PERCEPT_TEST_DOOR_{}", std::process::id());
    std::env::set_var(&var, "s3cret");
    std::fs::write(
        &path,
        format!(
            "{BASE}[[source]]\nname = \"a\"\nuri = \"test:?live=true\"\n\
             [[source]]\nname = \"broken\"\nuri = \"rtsp://127.0.0.1:9/x\"\npassword_env = \"PERCEPT_TEST_UNSET_{pid}\"\n\
             [[source]]\nname = \"door\"\nuri = \"rtsp://127.0.0.1:9/x\"\nuser = \"admin\"\npassword_env = \"{var}\"\ntransport = \"udp\"\n\
             [[source]]\nname = \"also-broken\"\nuri = \"rtsp://127.0.0.1:9/y\"\npassword_env = \"PERCEPT_TEST_UNSET_{pid}\"\n\
             [[source]]\nname = \"hall\"\nuri = \"test:?live=true\"\nwindow_frames = 4\n",
            pid = std::process::id(),
        ),
    )
    .unwrap();
    let err = s.reload().unwrap_err().to_string();
    assert!(
        err.contains("'broken'") && err.contains("also-broken"),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "{err}");
    assert_eq!(running(&s), ["a", "door", "hall"]);
    {
        let sources = lock(&s.sources);
        let door = sources.iter().find(|r| r.spec.name == "door").unwrap();
        match &door.spec.kind {
            SourceKind::Rtsp {
                credentials,
                transport,
                ..
            } => {
                let c = credentials.as_ref().expect("credentials");
                assert_eq!((c.user.as_str(), c.password.as_str()), ("admin", "s3cret"));
                assert_eq!(*transport, RtspTransport::Udp);
            }
            other => panic!("{other:?}"),
        }
        let hall = sources.iter().find(|r| r.spec.name == "hall").unwrap();
        assert_eq!(hall.task.as_ref().unwrap().window_frames, 4);
    }
    assert_eq!(told(&rx, "hall").unwrap().window_frames, 4);
    stop_all(&s);
}

/// Requests for one name at once: one source starts, the others get 409, and the
/// running source keeps its model slot.
#[test]
fn concurrent_adds_of_one_name_start_one_source() {
    let cfg = Config::parse(BASE).unwrap();
    let (s, _rx) = shared(&cfg, None);
    for round in 0..6 {
        let name = format!("cam{round}");
        let barrier = Arc::new(std::sync::Barrier::new(12));
        let handles: Vec<_> = (0..12)
            .map(|_| {
                let (s, b, name) = (s.clone(), barrier.clone(), name.clone());
                std::thread::spawn(move || {
                    b.wait();
                    s.add(AddSource {
                        name: Some(name),
                        uri: "test:?live=true".into(),
                        task: Some(TaskKind::Describe),
                        questions: Vec::new(),
                        prompt: None,
                        fps: None,
                    })
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let ok = results.iter().filter(|r| r.is_ok()).count();
        let conflicts = results
            .iter()
            .filter(|r| matches!(r, Err(ControlError::Conflict(_))))
            .count();
        assert_eq!((ok, conflicts), (1, 11), "{results:?}");
        assert_eq!(running(&s).iter().filter(|n| **n == name).count(), 1);
    }
    stop_all(&s);
}

/// `percept analyze take=1.wav` opens `take=1.wav`, not a source named `take` at `1.wav`.
#[test]
fn a_recording_path_is_opened_as_given() {
    let cfg = Config::default();
    let mut sc = SourceConfig::from_path(std::path::Path::new("take=1.wav"));
    sc.name = Some("take_1".into());
    let p = prepare_one(&cfg, &sc).unwrap();
    assert_eq!(p.spec.kind, SourceKind::File(PathBuf::from("take=1.wav")));
    assert_eq!(p.spec.name, "take_1");
    let mut c = cfg.clone();
    c.sources = vec![sc];
    assert!(c.validate().is_empty());
}
