//! Bad input: one clear line naming the source and the cause, exit 2 when nothing can run,
//! an `error` event when others continue, never a hang or a panic.

use crate::common::*;

fn assert_fails_cleanly(dir: &std::path::Path, uri: &str, cause: &str, extra: &[&str]) {
    let mut args = vec!["--source"];
    let src = format!("bad={uri}");
    args.push(&src);
    args.extend_from_slice(extra);
    let start = std::time::Instant::now();
    let (out, events) = run_percept(dir, &args);
    assert!(start.elapsed().as_secs() < 60, "took {:?}", start.elapsed());
    assert_eq!(out.status.code(), Some(2), "{uri}: {}", stderr(&out));
    let err = stderr(&out);
    let line = err
        .lines()
        .find(|l| l.starts_with("percept: source 'bad'"))
        .unwrap_or_else(|| panic!("{uri}: no one-line error in {err}"));
    assert!(
        line.to_lowercase().contains(cause),
        "{uri}: '{line}' lacks '{cause}'"
    );
    assert!(!err.contains("panicked"), "{err}");
    let errors = of_kind(&events, "bad", "error");
    assert_eq!(errors.len(), 1, "{events:?}");
    assert_eq!(summary(&events, "bad")["final_state"], "failed");
}

#[test]
fn broken_files_fail_with_one_line() {
    let d = tmpdir("badfiles");
    assert_fails_cleanly(
        &d,
        &d.join("missing.mp4").display().to_string(),
        "no such file",
        &[],
    );
    let empty = d.join("empty.mp4");
    std::fs::write(&empty, b"").unwrap();
    assert_fails_cleanly(&d, &empty.display().to_string(), "empty", &[]);
    let random = d.join("random.mkv");
    let mut x: u64 = 42;
    let bytes: Vec<u8> = (0..200_000)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect();
    std::fs::write(&random, &bytes).unwrap();
    assert_fails_cleanly(
        &d,
        &random.display().to_string(),
        "not a recognised media file",
        &[],
    );
    let random_wav = d.join("random.wav");
    std::fs::write(&random_wav, &bytes).unwrap();
    assert_fails_cleanly(
        &d,
        &random_wav.display().to_string(),
        "not a recognised audio file",
        &[],
    );
    // A truncated mp4: the moov atom at the end is cut off.
    let full = d.join("full.mp4");
    ffmpeg(&format!(
        "-f lavfi -i testsrc2=size=320x180:rate=30 -t 5 -c:v libx264 -preset ultrafast {}",
        full.display()
    ));
    let data = std::fs::read(&full).unwrap();
    let cut = d.join("truncated.mp4");
    std::fs::write(&cut, &data[..data.len() / 2]).unwrap();
    assert_fails_cleanly(&d, &cut.display().to_string(), "", &[]);
    // An unknown codec id inside a valid Matroska file.
    let mkv = d.join("codec.mkv");
    ffmpeg(&format!(
        "-f lavfi -i testsrc2=size=320x180:rate=30 -t 2 -c:v libx264 -preset ultrafast {}",
        mkv.display()
    ));
    let mut data = std::fs::read(&mkv).unwrap();
    let id = b"V_MPEG4/ISO/AVC";
    let pos = data
        .windows(id.len())
        .position(|w| w == id)
        .expect("codec id in mkv");
    data[pos..pos + id.len()].copy_from_slice(b"V_PERCEPT/NONE!");
    std::fs::write(&mkv, &data).unwrap();
    assert_fails_cleanly(&d, &mkv.display().to_string(), "unsupported codec", &[]);
}

#[test]
fn unreachable_host_gives_up_and_one_bad_source_does_not_stop_others() {
    let d = tmpdir("unreachable");
    let cfg = d.join("fast.toml");
    std::fs::write(
        &cfg,
        "[reconnect]\ninitial_seconds = 0.2\nmax_seconds = 0.5\nconnect_attempts = 2\n",
    )
    .unwrap();
    assert_fails_cleanly(
        &d,
        "rtsp://127.0.0.1:9/stream",
        "giving up after 2 attempts",
        &["--config", cfg.to_str().unwrap()],
    );
    // With a good source beside it: exit 0, an error event for the bad one.
    let wav = d.join("ok.wav");
    ffmpeg(&format!(
        "-f lavfi -i sine=frequency=440:sample_rate=16000 -t 2 {}",
        wav.display()
    ));
    let (out, events) = run_percept(
        &d,
        &[
            "--source",
            &format!("good={}", wav.display()),
            "--source",
            &format!("bad={}", d.join("nope.mp4").display()),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(of_kind(&events, "bad", "error").len(), 1);
    assert_eq!(summary(&events, "good")["final_state"], "eos");
}

#[test]
fn a_full_disk_for_events_exits_1_naming_the_file() {
    // /dev/full fails every write with ENOSPC, as a full disk does.
    let out = std::process::Command::new(percept_bin())
        .args([
            "run",
            "--no-model",
            "--no-http",
            "--events",
            "/dev/full",
            "--source",
            "a=test:?duration=2&live=false",
        ])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.lines()
            .any(|l| l.starts_with("percept: events /dev/full:") && l.contains("space")),
        "{err}"
    );
}
