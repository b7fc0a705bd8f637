//! File sources: timing of sampled frames, contiguous audio, every container kind.

use crate::common::*;

fn check_av(events: &[serde_json::Value], name: &str, seconds: f64) {
    let frames = of_kind(events, name, "frame");
    let expected = seconds.round() as i64;
    assert!(
        (frames.len() as i64 - expected).abs() <= 1,
        "{} frames for {seconds} s",
        frames.len()
    );
    for fr in &frames {
        let t = f(fr, "t");
        assert!(
            (t - t.round()).abs() <= 0.04,
            "frame at {t} is not on a whole second"
        );
    }
    assert_frame_accounting(events, name);
    let s = summary(events, name);
    assert_eq!(u(s, "frames_dropped"), 0, "files use backpressure: {s}");
    assert_eq!(s["final_state"], "eos");
}

#[test]
fn mp4_h264_aac_60s_gives_one_frame_per_second_and_contiguous_audio() {
    let d = tmpdir("mp4");
    let file = d.join("clip.mp4");
    gst_launch(&format!(
        "videotestsrc num-buffers=1800 pattern=ball ! video/x-raw,width=640,height=360,framerate=30/1 \
         ! x264enc speed-preset=ultrafast key-int-max=30 ! h264parse ! mp4mux name=m ! filesink location={} \
         audiotestsrc num-buffers=2813 samplesperbuffer=1024 wave=sine ! audio/x-raw,rate=48000,channels=2 \
         ! audioconvert ! avenc_aac ! m.",
        file.display()
    ));
    let (out, events) = run_percept(&d, &["--source", &format!("clip={}", file.display())]);
    assert!(out.status.success(), "{}", stderr(&out));
    check_av(&events, "clip", 60.0);
    assert_audio_contiguous(&events, "clip", 60.0);
    let s = summary(&events, "clip");
    // A keyframe every second at 1 fps: only keyframes are decoded, not even the first
    // GOP's delta frames (held back until the second keyframe settled it).
    assert_eq!(s["keyframe_only"], true, "{s}");
    assert!(u(s, "frames_decoded") <= 61, "{s}");
    assert!((f(s, "audio_seconds") - 60.0).abs() < 0.2, "{s}");
}

#[test]
fn mkv_vp9_opus_video_only_and_audio_only() {
    let d = tmpdir("mkv");
    let mkv = d.join("clip.mkv");
    ffmpeg(&format!(
        "-f lavfi -i testsrc2=size=320x180:rate=25 -f lavfi -i sine=frequency=300:sample_rate=48000 -t 20 \
         -c:v libvpx-vp9 -deadline realtime -cpu-used 8 -b:v 300k -c:a libopus {}",
        mkv.display()
    ));
    let video_only = d.join("video.mp4");
    ffmpeg(&format!(
        "-f lavfi -i testsrc2=size=320x180:rate=30 -t 12 -c:v libx264 -preset ultrafast -g 60 {}",
        video_only.display()
    ));
    let audio_only = d.join("audio.m4a");
    ffmpeg(&format!(
        "-f lavfi -i sine=frequency=500:sample_rate=44100 -t 15 -c:a aac {}",
        audio_only.display()
    ));
    let ts = d.join("clip.ts");
    ffmpeg(&format!(
        "-f lavfi -i testsrc2=size=320x180:rate=30 -f lavfi -i sine=frequency=300:sample_rate=48000 -t 10 \
         -c:v libx264 -preset ultrafast -g 30 -c:a aac {}",
        ts.display()
    ));
    let (out, events) = run_percept(
        &d,
        &[
            "--source",
            &format!("mkv={}", mkv.display()),
            "--source",
            &format!("vid={}", video_only.display()),
            "--source",
            &format!("aud={}", audio_only.display()),
            "--source",
            &format!("ts={}", ts.display()),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    check_av(&events, "mkv", 20.0);
    assert_audio_contiguous(&events, "mkv", 20.0);
    check_av(&events, "vid", 12.0);
    assert!(of_kind(&events, "vid", "audio").is_empty());
    // A 2 s GOP cannot give 1 fps from keyframes alone: full decode.
    // The first GOP's held delta frames are released to the decoder: nothing is lost.
    let vid = summary(&events, "vid");
    assert_eq!(vid["keyframe_only"], false);
    assert_eq!(u(vid, "frames_decoded"), 360, "{vid}");
    assert!(of_kind(&events, "aud", "frame").is_empty());
    assert_audio_contiguous(&events, "aud", 15.0);
    check_av(&events, "ts", 10.0);
    assert_audio_contiguous(&events, "ts", 10.0);
}

#[test]
fn speech_is_voice_and_silence_is_not() {
    let d = tmpdir("speech");
    let speech = d.join("speech.wav");
    run_tool(
        "espeak-ng",
        &[
            "-w",
            speech.to_str().unwrap(),
            "Good morning. This is a test of the voice activity detector, speaking for a few seconds.",
        ],
    );
    let silence = d.join("silence.flac");
    ffmpeg(&format!(
        "-f lavfi -i anullsrc=r=44100:cl=stereo -t 5 {}",
        silence.display()
    ));
    let (out, events) = run_percept(
        &d,
        &[
            "--source",
            &format!("speech={}", speech.display()),
            "--source",
            &format!("quiet={}", silence.display()),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let sp = of_kind(&events, "speech", "audio");
    let voiced = sp.iter().filter(|a| a["voice"] == true).count();
    assert!(sp.len() >= 4, "{sp:?}");
    assert!(
        voiced * 10 >= sp.len() * 6,
        "only {voiced} of {} speech chunks voiced",
        sp.len()
    );
    let q = of_kind(&events, "quiet", "audio");
    assert_eq!(q.len(), 5);
    assert!(
        q.iter()
            .all(|a| a["voice"] == false && f(a, "level") <= -100.0),
        "{q:?}"
    );
    assert_audio_contiguous(&events, "quiet", 5.0);
}

/// symphonia (audio-only path) and GStreamer (the A/V path) agree on sample counts.
#[test]
fn symphonia_and_gstreamer_give_the_same_sample_count() {
    let d = tmpdir("samples");
    for (name, args) in [
        (
            "mono16k.wav",
            "-f lavfi -i sine=frequency=440:sample_rate=16000 -t 7.3 -ac 1",
        ),
        (
            "stereo44k.flac",
            "-f lavfi -i sine=frequency=440:sample_rate=44100 -t 7.3 -ac 2",
        ),
        (
            "stereo48k.wav",
            "-f lavfi -i sine=frequency=440:sample_rate=48000 -t 7.3 -ac 2",
        ),
    ] {
        let path = d.join(name);
        ffmpeg(&format!("{args} {}", path.display()));
        // Through symphonia.
        let (out, ev) = run_percept(&d, &["--source", &format!("s={}", path.display())]);
        assert!(out.status.success(), "{}", stderr(&out));
        let sym: u64 = of_kind(&ev, "s", "audio")
            .iter()
            .map(|a| u(a, "samples"))
            .sum();
        // Through GStreamer: the same file behind a custom template forces the graph path.
        let tpl = d.join("file.gst");
        std::fs::write(&tpl, "filesrc location={location} ! parsebin name=demux").unwrap();
        let cfg = d.join(format!("{name}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[[source]]\nname = \"g\"\nuri = \"{}\"\ntemplate = \"{}\"\n",
                path.display(),
                tpl.display()
            ),
        )
        .unwrap();
        let (out, ev) = run_percept(&d, &["--config", cfg.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
        let gst: u64 = of_kind(&ev, "g", "audio")
            .iter()
            .map(|a| u(a, "samples"))
            .sum();
        let expected = (7.3f64 * 16000.0).round() as u64;
        assert_eq!(sym, expected, "{name}: symphonia");
        assert!(
            gst.abs_diff(sym) <= 1,
            "{name}: gstreamer {gst} vs symphonia {sym}"
        );
    }
}

/// HTTP and HLS: a playlist with segments served over loopback.
#[test]
fn hls_over_http_plays_to_the_end() {
    let d = tmpdir("hls");
    ffmpeg(&format!(
        "-f lavfi -i testsrc2=size=320x180:rate=30 -f lavfi -i sine=frequency=300:sample_rate=48000 -t 8 \
         -c:v libx264 -preset ultrafast -g 30 -c:a aac -f hls -hls_time 2 -hls_playlist_type vod {}",
        d.join("index.m3u8").display()
    ));
    let mp4 = d.join("clip.mp4");
    ffmpeg(&format!(
        "-f lavfi -i testsrc2=size=320x180:rate=30 -t 5 -c:v libx264 -preset ultrafast -g 30 -movflags +faststart {}",
        mp4.display()
    ));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let mut server = std::process::Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(&d)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed().as_secs() < 20, "http server did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (out, events) = run_percept(
        &d,
        &[
            "--source",
            &format!("hls=http://127.0.0.1:{port}/index.m3u8"),
            "--source",
            &format!("web=http://127.0.0.1:{port}/clip.mp4"),
        ],
    );
    let _ = server.kill();
    let _ = server.wait();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(summary(&events, "hls")["final_state"], "eos");
    let frames = of_kind(&events, "hls", "frame").len();
    assert!((7..=9).contains(&frames), "{frames} frames from 8 s of HLS");
    assert!(!of_kind(&events, "hls", "audio").is_empty());
    assert_frame_accounting(&events, "hls");
    check_av(&events, "web", 5.0);
}
