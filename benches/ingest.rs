//! Ingest benchmark: CPU seconds per minute of 1080p30 H.264 sampled at 1 fps, percept
//! (keyframe-only and forced full decode) next to ffmpeg on the same file in the same run,
//! as ratios; then the RSS of a live overload run over time.
//!
//! `cargo bench --bench ingest`. Environment: `PERCEPT_BENCH_OVERLOAD_SECS` (default 600),
//! `PERCEPT_BENCH_REPEAT` (default 5; the minimum of the repeats is reported).
#![allow(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn children_cpu() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we own; RUSAGE_CHILDREN is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU seconds (user + system) of one command run to completion.
fn cpu_of(cmd: &mut Command) -> f64 {
    let before = children_cpu();
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("spawn");
    assert!(status.success(), "{cmd:?} failed");
    children_cpu() - before
}

fn percept_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("bench path");
    // target/<profile>/deps/ingest-xxxx -> target/<profile>/percept
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("percept");
    assert!(
        bin.exists(),
        "build the binary first: cargo build --release ({})",
        bin.display()
    );
    bin
}

fn main() {
    let repeat: usize = std::env::var("PERCEPT_BENCH_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let overload_secs: u64 = std::env::var("PERCEPT_BENCH_OVERLOAD_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-media");
    std::fs::create_dir_all(&work).expect("bench dir");
    let clip = work.join("1080p30-gop30-60s.mp4");
    if !clip.exists() {
        println!("making {} (once)...", clip.display());
        let ok = Command::new("ffmpeg")
            .args([
                "-hide_banner",
                "-loglevel",
                "error",
                "-y",
                "-f",
                "lavfi",
                "-i",
                "testsrc2=size=1920x1080:rate=30",
                "-t",
                "60",
            ])
            .args([
                "-c:v", "libx264", "-preset", "veryfast", "-g", "30", "-pix_fmt", "yuv420p",
            ])
            .arg(&clip)
            .status()
            .expect("ffmpeg");
        assert!(ok.success());
    }
    let bin = percept_bin();
    let full_cfg = work.join("full.toml");
    std::fs::write(&full_cfg, "[video]\nkeyframe_only = false\n").expect("write config");
    let clip_s = clip.to_str().expect("utf-8 path");
    let percept = |cfg: Option<&Path>| {
        let mut c = Command::new(&bin);
        c.args([
            "run",
            "--no-http",
            "--events",
            "/dev/null",
            "--source",
            clip_s,
        ]);
        if let Some(cfg) = cfg {
            c.arg("--config").arg(cfg);
        }
        c
    };
    let ffmpeg = |keyonly: bool| {
        let mut c = Command::new("ffmpeg");
        c.args(["-hide_banner", "-loglevel", "error"]);
        if keyonly {
            c.args(["-skip_frame", "nokey"]);
        }
        c.args(["-i", clip_s, "-vf", "fps=1", "-f", "null", "-"]);
        c
    };
    println!(
        "ingest CPU seconds per minute of 1080p30 H.264 (GOP 1 s) at 1 fps, min of {repeat} runs:"
    );
    // What percept also does per sampled frame: scale to 768 wide and convert to RGB.
    let ffmpeg_scaled = || {
        let mut c = Command::new("ffmpeg");
        c.args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-skip_frame",
            "nokey",
            "-i",
            clip_s,
        ])
        .args([
            "-vf",
            "fps=1,scale=768:432",
            "-pix_fmt",
            "rgb24",
            "-f",
            "null",
            "-",
        ]);
        c
    };
    // Interleaved rounds, so that load from other processes on a shared machine hits both
    // sides of each ratio alike; the minimum of each is reported.
    let (mut p_key, mut f_key, mut p_full, mut f_full, mut f_key_scaled) = (
        f64::INFINITY,
        f64::INFINITY,
        f64::INFINITY,
        f64::INFINITY,
        f64::INFINITY,
    );
    for _ in 0..repeat {
        p_key = p_key.min(cpu_of(&mut percept(None)));
        f_key = f_key.min(cpu_of(&mut ffmpeg(true)));
        f_key_scaled = f_key_scaled.min(cpu_of(&mut ffmpeg_scaled()));
        p_full = p_full.min(cpu_of(&mut percept(Some(&full_cfg))));
        f_full = f_full.min(cpu_of(&mut ffmpeg(false)));
    }
    println!("  keyframe-only  percept {p_key:7.2} s   ffmpeg -skip_frame nokey {f_key:7.2} s   ratio {:.2} (target <= 1.3)", p_key / f_key);
    println!("  full decode    percept {p_full:7.2} s   ffmpeg                   {f_full:7.2} s   ratio {:.2} (target <= 1.1)", p_full / f_full);
    println!("  keyframe-only  vs ffmpeg that also scales to 768x432 RGB {f_key_scaled:7.2} s   ratio {:.2}", p_key / f_key_scaled);
    println!(
        "  keyframe-only saves {:.1}x over full decode in percept",
        p_full / p_key
    );

    if overload_secs == 0 {
        return;
    }
    println!("overload: live 1080p30 test source sampled at 30 fps, worker 30x too slow, {overload_secs} s:");
    let cfg = work.join("overload.toml");
    std::fs::write(
        &cfg,
        "[run]\nfps = 30\n[video]\nmax_side = 1920\nqueue_frames = 8\n[queues]\nbudget_mib = 64\n[analysis]\ndelay_ms = 1000\n[http]\nenabled = false\n",
    )
    .expect("write config");
    let events = work.join("overload.jsonl");
    let mut child = Command::new(&bin)
        .args([
            "run",
            "--config",
            cfg.to_str().expect("utf-8"),
            "--events",
            events.to_str().expect("utf-8"),
        ])
        .args(["--source", "cam=test:?width=1920&height=1080&fps=30"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn percept");
    let start = Instant::now();
    let mut samples = Vec::new();
    while start.elapsed() < Duration::from_secs(overload_secs) {
        std::thread::sleep(Duration::from_secs(1));
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
        if let Some(kb) = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
        {
            samples.push((start.elapsed().as_secs_f64(), kb / 1024.0));
        }
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let warm: Vec<f64> = samples
        .iter()
        .filter(|(t, _)| *t >= 30.0)
        .map(|(_, m)| *m)
        .collect();
    let all: Vec<f64> = samples.iter().map(|(_, m)| *m).collect();
    let max = all.iter().cloned().fold(0.0, f64::max);
    let (wmin, wmax) = warm
        .iter()
        .fold((f64::INFINITY, 0.0f64), |(a, b), &m| (a.min(m), b.max(m)));
    println!("  peak RSS {max:.1} MiB; after the first 30 s RSS stays within {wmin:.1}..{wmax:.1} MiB (spread {:.1} MiB, target <= 20)", wmax - wmin);
    let text = std::fs::read_to_string(&events).unwrap_or_default();
    if let Some(summary) = text.lines().rev().find(|l| l.contains("\"summary\"")) {
        println!("  summary: {summary}");
    }
}
