//! `report.html` from `percept analyze`, opened from disk in headless Chromium: it renders with
//! no network, its SVG timeline spans the recording, its thumbnails decode and open their
//! moment in the transcript, and a `<script>` in model text stays text.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::browser::{richness, Browser};
use crate::common::*;

/// 12 s of video (a moving test card, then colour bars from 6 s: a scene change) with two
/// spoken sentences.
fn clip(d: &Path) -> PathBuf {
    let speech = d.join("speech.wav");
    run_tool(
        "espeak-ng",
        &[
            "-w",
            speech.to_str().unwrap(),
            "The river is high today. Two herons stand on the far bank.",
        ],
    );
    let out = d.join("clip.mp4");
    ffmpeg(&format!(
        "-f lavfi -i testsrc2=s=320x240:r=10:d=6 -f lavfi -i smptebars=s=320x240:r=10:d=6 -i {} \
         -filter_complex [0:v][1:v]concat=n=2:v=1:a=0[v];[2:a]apad[a] -map [v] -map [a] -t 12 \
         -c:v libx264 -pix_fmt yuv420p -g 10 -c:a aac {}",
        speech.display(),
        out.display()
    ));
    out
}

fn analyze(rec: &Path, out: &Path, d: &Path) {
    let cfg = d.join("model.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\nid = \"{}\"\nmax_tokens = 6\n[run]\nfps = 2\n",
            fixture_model()
        ),
    )
    .unwrap();
    let o = Command::new(percept_bin())
        .arg("analyze")
        .arg(rec)
        .arg("--out")
        .arg(out)
        .arg("--config")
        .arg(&cfg)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

fn file_url(p: &Path) -> String {
    format!("file://{}", p.canonicalize().unwrap().display())
}

fn check_sizes(b: &mut Browser, dir: &Path, name: &str) {
    for (w, h, mobile) in [(1280, 800, false), (390, 844, true)] {
        b.viewport(w, h, mobile);
        std::thread::sleep(std::time::Duration::from_millis(800));
        let o = b.eval("[document.documentElement.scrollWidth, window.innerWidth]");
        assert!(
            o[0].as_u64() <= o[1].as_u64(),
            "{name} {w}x{h} overflows: {o}"
        );
        let shot = b.screenshot(&dir.join(format!("{name}-{w}x{h}.png")));
        let (colours, content) = richness(&shot);
        assert!(colours > 150, "{name} {w}x{h}: {colours} colours");
        assert!(content > 0.2, "{name} {w}x{h}: content {content:.2}");
    }
    b.viewport(1280, 800, false);
}

#[test]
fn analyze_writes_a_report_with_timeline_thumbnails_and_transcript() {
    let d = tmpdir("report");
    let rec = clip(&d);
    let out = d.join("out");
    analyze(&rec, &out, &d);
    let dir = out.join("clip");
    let report = dir.join("report.html");
    let html = std::fs::read_to_string(&report).expect("report.html beside summary.md");
    assert!(dir.join("summary.md").is_file());
    // Readable offline: nothing is fetched and nothing runs.
    assert!(!html.contains("<script"));
    assert!(!html.contains("http://") && !html.contains("https://"));
    let events = read_events(&dir.join("events.jsonl"));
    let transcripts = events.iter().filter(|e| e["kind"] == "transcript").count();
    assert!(transcripts >= 1, "no transcript in {events:?}");

    let Some(mut b) = Browser::launch(&file_url(&report), &d) else {
        return;
    };
    b.wait("the report", "!!document.querySelector('h1')");
    assert_eq!(
        b.eval("document.querySelector('h1').textContent"),
        "clip.mp4"
    );
    assert_eq!(
        b.eval("document.querySelectorAll('ol.transcript li').length"),
        transcripts
    );
    // The timeline spans the recording: its axis is the clip's length and the audio row is
    // drawn from the first to the last column.
    let span = b.eval(
        "(() => { const s = document.getElementById('timeline-svg'); \
           const r = Array.from(s.querySelectorAll('rect.level')); \
           return [Number(s.dataset.duration), Math.min(...r.map(x => x.x.baseVal.value)), \
                   Math.max(...r.map(x => x.x.baseVal.value + x.width.baseVal.value)), \
                   s.getBoundingClientRect().width, s.querySelectorAll('rect.seg').length, \
                   s.querySelectorAll('line.scene').length, s.querySelectorAll('rect.voice').length]; })()",
    );
    let dur = span[0].as_f64().unwrap();
    assert!((dur - 12.0).abs() < 1.0, "{span}");
    assert!(span[1].as_f64().unwrap() < 64.0 + 2.0, "{span}");
    assert!(span[2].as_f64().unwrap() > 992.0 - 2.0, "{span}");
    assert!(span[3].as_f64().unwrap() > 1000.0, "{span}");
    assert_eq!(span[4].as_u64().unwrap() as usize, transcripts, "{span}");
    assert!(span[5].as_u64().unwrap() >= 1, "the cut at 6 s: {span}");
    assert!(span[6].as_u64().unwrap() >= 1, "speech: {span}");
    // Thumbnails decode, one at the scene change among them.
    let thumbs = b.eval(
        "Array.from(document.querySelectorAll('.thumb')).map(a => [a.querySelector('img').complete && a.querySelector('img').naturalWidth, Number(a.dataset.t), a.classList.contains('scene'), a.getAttribute('href')])",
    );
    let thumbs = thumbs.as_array().unwrap();
    assert!(thumbs.len() >= 2, "{thumbs:?}");
    for t in thumbs {
        assert_eq!(t[0], 240, "{t}");
        assert!(t[3].as_str().unwrap().starts_with("#seg-"), "{t}");
    }
    assert!(
        thumbs
            .iter()
            .any(|t| t[2] == true && (t[1].as_f64().unwrap() - 6.0).abs() < 1.0),
        "{thumbs:?}"
    );
    // A thumbnail opens its moment in the transcript.
    b.eval("document.querySelector('.thumb').click()");
    b.wait(
        "the transcript segment",
        "!!document.querySelector(':target') && document.querySelector(':target').id.startsWith('seg-')",
    );
    check_sizes(&mut b, &d, "report");
}

#[test]
fn model_text_in_the_report_stays_text() {
    let d = tmpdir("report-escape");
    let rec = clip(&d);
    let events = d.join("events.jsonl");
    std::fs::write(
        &events,
        [
            r#"{"source":"clip","t":0.0,"end":1.0,"kind":"audio","level":-20.0,"voice":true,"samples":16000}"#,
            r#"{"source":"clip","t":1.0,"end":12.0,"kind":"audio","level":-60.0,"voice":false,"samples":176000}"#,
            r#"{"source":"clip","t":0.5,"kind":"frame","width":320,"height":240,"motion":0.0,"scene_change":false,"latency_ms":1.0}"#,
            r#"{"source":"clip","t":0.0,"end":4.0,"kind":"transcript","text":"<script>document.title='owned'</script><img src=x onerror=\"document.title='owned'\">"}"#,
            r#"{"source":"clip","t":12.0,"kind":"summary","text":"<b>bold</b> & <script>document.title='owned'</script>","windows":1,"frames":1,"transcript_lines":1}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let path = percept::report::write(&rec, &events, &d).unwrap();
    let Some(mut b) = Browser::launch(&file_url(&path), &d) else {
        return;
    };
    b.wait("the report", "!!document.querySelector('h1')");
    assert_eq!(b.eval("document.title"), "clip.mp4 - percept report");
    assert_eq!(
        b.eval("document.querySelectorAll('script, b, img[src=x]').length"),
        0
    );
    assert_eq!(
        b.eval("document.querySelector('#seg-0').lastChild.textContent"),
        "<script>document.title='owned'</script><img src=x onerror=\"document.title='owned'\">"
    );
    assert_eq!(
        b.eval("document.querySelector('.summary').textContent"),
        "<b>bold</b> & <script>document.title='owned'</script>"
    );
}
