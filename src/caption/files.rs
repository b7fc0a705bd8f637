//! WebVTT and SRT subtitle files written one complete cue at a time. Each cue goes out in a
//! single write straight to the file (no user-space buffer), so both files are valid at every
//! moment: after SIGTERM, a crash or SIGKILL they hold every cue appended so far.
//!
//! Cue text is model output, i.e. untrusted: it is put on at most two lines of about 42
//! characters (more only for very long text), blank lines never reach a cue (a blank line
//! ends a cue), `&`, `<` and `>` are escaped in WebVTT (so no markup and no `-->`), and SRT,
//! which has no escaping, gets `-->` defused.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Characters per subtitle line before the text is wrapped.
pub const LINE_CHARS: usize = 42;

#[derive(Debug, thiserror::Error)]
pub enum CaptionFileError {
    #[error("writing captions {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CaptionFileError + '_ {
    move |source| CaptionFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A pair of subtitle files for one source. Times are media seconds.
#[derive(Debug)]
pub struct CaptionFiles {
    vtt: File,
    vtt_path: PathBuf,
    srt: File,
    srt_path: PathBuf,
    cues: usize,
    /// End of the latest cue in milliseconds; later cues start no earlier.
    last_end_ms: u64,
    /// Added to every cue's times: the end of an earlier run's cues in a continued file.
    offset_ms: u64,
}

impl CaptionFiles {
    /// Creates (truncates) both files, with the `WEBVTT` header written at once.
    pub fn create(vtt: &Path, srt: &Path) -> Result<CaptionFiles, CaptionFileError> {
        for p in [vtt, srt] {
            if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(io_err(dir))?;
            }
        }
        let mut vtt_file = File::create(vtt).map_err(io_err(vtt))?;
        vtt_file.write_all(b"WEBVTT\n\n").map_err(io_err(vtt))?;
        let srt_file = File::create(srt).map_err(io_err(srt))?;
        Ok(CaptionFiles {
            vtt: vtt_file,
            vtt_path: vtt.to_path_buf(),
            srt: srt_file,
            srt_path: srt.to_path_buf(),
            cues: 0,
            last_end_ms: 0,
            offset_ms: 0,
        })
    }

    /// Opens the files of a source across runs: earlier runs' cues are kept (never
    /// truncated) and this run's cues follow them, their times shifted to start after the
    /// last kept cue (media time starts again at zero each run, and cue times must not go
    /// back). A cue cut short by a crash, or one that is in only one of the two files, is
    /// dropped first (both files rewritten beside and renamed over the old ones), so the
    /// files stay valid WebVTT and SRT with the same cues. New files when there are none.
    pub fn continue_or_create(vtt: &Path, srt: &Path) -> Result<CaptionFiles, CaptionFileError> {
        if !vtt.exists() && !srt.exists() {
            return CaptionFiles::create(vtt, srt);
        }
        let read = |p: &Path| -> Result<String, CaptionFileError> {
            match std::fs::read(p) {
                Ok(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
                Err(e) => Err(io_err(p)(e)),
            }
        };
        let (vtt_text, srt_text) = (read(vtt)?, read(srt)?);
        let v = complete_prefix(&vtt_text, check_vtt);
        let s = complete_prefix(&srt_text, check_srt);
        let n = v.0.len().min(s.0.len());
        let whole = v.1 && s.1 && v.0.len() == n && s.0.len() == n;
        let mut files = if whole {
            let open = |p: &Path| {
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(p)
                    .map_err(io_err(p))
            };
            let last_end_ms = s.0.last().map(|c| to_ms(c.end)).unwrap_or(0);
            CaptionFiles {
                vtt: open(vtt)?,
                vtt_path: vtt.to_path_buf(),
                srt: open(srt)?,
                srt_path: srt.to_path_buf(),
                cues: n,
                last_end_ms,
                offset_ms: 0,
            }
        } else {
            tracing::warn!(vtt = %vtt.display(), srt = %srt.display(), kept = n, "Caption files end in an incomplete cue or differ; keeping their complete common cues.");
            // SRT text is the cue text unescaped (VTT's is escaped), so it is written again.
            let cues: Vec<(f64, f64, String)> = s.0[..n]
                .iter()
                .map(|c| (c.start, c.end, c.text.clone()))
                .collect();
            CaptionFiles::open_resume(vtt, srt, &cues)?
        };
        files.offset_ms = files.last_end_ms;
        Ok(files)
    }

    /// Both files' data on disk (a checkpoint may then point past these cues).
    pub fn sync(&self) -> Result<(), CaptionFileError> {
        self.vtt.sync_data().map_err(io_err(&self.vtt_path))?;
        self.srt.sync_data().map_err(io_err(&self.srt_path))
    }

    /// Resuming an interrupted analysis: both files are rewritten from the committed `cues`
    /// `(t, end, text)` (whatever they held is replaced, so a cue written after the last
    /// checkpoint is not duplicated), then appends continue the numbering. The new files are
    /// written beside the old ones and renamed over them, so an interruption here leaves the
    /// old files whole.
    pub fn open_resume(
        vtt: &Path,
        srt: &Path,
        cues: &[(f64, f64, String)],
    ) -> Result<CaptionFiles, CaptionFileError> {
        let tmp_vtt = tmp_path(vtt);
        let tmp_srt = tmp_path(srt);
        let mut files = CaptionFiles::create(&tmp_vtt, &tmp_srt)?;
        for (t, end, text) in cues {
            files.append(*t, *end, text)?;
        }
        std::fs::rename(&tmp_vtt, vtt).map_err(io_err(vtt))?;
        std::fs::rename(&tmp_srt, srt).map_err(io_err(srt))?;
        // The open handles follow the renamed files.
        files.vtt_path = vtt.to_path_buf();
        files.srt_path = srt.to_path_buf();
        Ok(files)
    }

    /// Writes one cue to both files. Empty text (after cleaning) writes nothing and returns
    /// `false`. A cue that would start before the previous one ends is moved to its end, and
    /// every cue lasts at least 1 ms, so the files stay valid whatever times come in.
    pub fn append(&mut self, t: f64, end: f64, text: &str) -> Result<bool, CaptionFileError> {
        let lines = cue_lines(text);
        if lines.is_empty() {
            return Ok(false);
        }
        let start_ms = (self.offset_ms + to_ms(t)).max(self.last_end_ms);
        let end_ms = (self.offset_ms + to_ms(end)).max(start_ms + 1);
        let timing_vtt = format!(
            "{} --> {}",
            timestamp(start_ms, '.'),
            timestamp(end_ms, '.')
        );
        let timing_srt = format!(
            "{} --> {}",
            timestamp(start_ms, ','),
            timestamp(end_ms, ',')
        );
        let mut vtt_cue = timing_vtt;
        for l in &lines {
            vtt_cue.push('\n');
            vtt_cue.push_str(&escape_vtt(l));
        }
        vtt_cue.push_str("\n\n");
        let mut srt_cue = format!("{}\n{timing_srt}", self.cues + 1);
        for l in &lines {
            srt_cue.push('\n');
            srt_cue.push_str(&defuse_srt(l));
        }
        srt_cue.push_str("\n\n");
        // One write per file: a reader (or a kill) sees the cue whole or not at all.
        self.vtt
            .write_all(vtt_cue.as_bytes())
            .map_err(io_err(&self.vtt_path))?;
        self.srt
            .write_all(srt_cue.as_bytes())
            .map_err(io_err(&self.srt_path))?;
        self.cues += 1;
        self.last_end_ms = end_ms;
        Ok(true)
    }

    /// Cues written so far (the number of the latest SRT cue).
    pub fn cues(&self) -> usize {
        self.cues
    }

    pub fn vtt_path(&self) -> &Path {
        &self.vtt_path
    }

    pub fn srt_path(&self) -> &Path {
        &self.srt_path
    }
}

/// The cues of the longest prefix of `text` that `check` accepts (cut at cue boundaries),
/// and whether that is the whole text.
fn complete_prefix(
    text: &str,
    check: fn(&str) -> Result<Vec<ParsedCue>, String>,
) -> (Vec<ParsedCue>, bool) {
    let mut end = text.len();
    loop {
        if let Ok(c) = check(&text[..end]) {
            return (c, end == text.len());
        }
        // "\n\n" is ASCII, so end stays on a char boundary.
        match text[..end.saturating_sub(1)].rfind("\n\n") {
            Some(i) if i + 2 < end => end = i + 2,
            _ => return (Vec::new(), false),
        }
    }
}

fn tmp_path(p: &Path) -> PathBuf {
    let mut name = p.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".resume-tmp");
    p.with_file_name(name)
}

fn to_ms(t: f64) -> u64 {
    if t.is_finite() && t > 0.0 {
        (t * 1000.0).round() as u64
    } else {
        0
    }
}

/// `HH:MM:SS.mmm` (WebVTT) or `HH:MM:SS,mmm` (SRT); hours grow past two digits if needed.
fn timestamp(ms: u64, sep: char) -> String {
    let (h, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (m, rest) = (rest / 60_000, rest % 60_000);
    let (s, ms) = (rest / 1000, rest % 1000);
    format!("{h:02}:{m:02}:{s:02}{sep}{ms:03}")
}

/// The text on one paragraph, wrapped to lines of about [`LINE_CHARS`]: two lines split
/// near the middle when it fits in two, greedy lines beyond that.
fn cue_lines(text: &str) -> Vec<String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.is_empty() {
        return Vec::new();
    }
    let one = words.join(" ");
    let len = one.chars().count();
    if len <= LINE_CHARS {
        return vec![one];
    }
    if len <= 2 * LINE_CHARS {
        // The space closest to the middle gives two balanced lines.
        let mid = len / 2;
        let split = one
            .char_indices()
            .filter(|(_, c)| *c == ' ')
            .map(|(i, _)| i)
            .min_by_key(|&i| one[..i].chars().count().abs_diff(mid));
        if let Some(i) = split {
            return vec![one[..i].to_string(), one[i + 1..].to_string()];
        }
        return vec![one];
    }
    let mut lines = Vec::new();
    let mut line = String::new();
    for w in words {
        if !line.is_empty() && line.chars().count() + 1 + w.chars().count() > LINE_CHARS {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(w);
    }
    lines.push(line);
    lines
}

fn escape_vtt(line: &str) -> String {
    line.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn defuse_srt(line: &str) -> String {
    let mut s = line.to_string();
    // Replacing once can rebuild the arrow ("--->"), so until none is left.
    while s.contains("-->") {
        s = s.replace("-->", "->");
    }
    s
}

/// One cue read back by [`check_vtt`] / [`check_srt`].
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCue {
    pub start: f64,
    pub end: f64,
    pub text: String,
}

/// Checks a WebVTT file as this module writes it (header, complete cues, increasing
/// times, no empty cue, no `-->` in text) and returns its cues. For tests and checks.
pub fn check_vtt(text: &str) -> Result<Vec<ParsedCue>, String> {
    let body = text
        .strip_prefix("WEBVTT\n\n")
        .ok_or("missing WEBVTT header and blank line")?;
    parse_blocks(body, None)
}

/// Checks an SRT file as this module writes it (numbered from 1, complete cues, increasing
/// times, no empty cue) and returns its cues. For tests and checks.
pub fn check_srt(text: &str) -> Result<Vec<ParsedCue>, String> {
    parse_blocks(text, Some(()))
}

fn parse_blocks(body: &str, numbered: Option<()>) -> Result<Vec<ParsedCue>, String> {
    if !body.is_empty() && !body.ends_with("\n\n") {
        return Err("last cue is not complete (no blank line after it)".into());
    }
    let sep = if numbered.is_some() { ',' } else { '.' };
    let mut cues: Vec<ParsedCue> = Vec::new();
    for (i, block) in body
        .strip_suffix("\n\n")
        .unwrap_or(body)
        .split("\n\n")
        .enumerate()
    {
        if block.is_empty() {
            if body.is_empty() {
                break;
            }
            return Err(format!("cue {}: empty block", i + 1));
        }
        let mut lines = block.lines();
        if numbered.is_some() {
            let n = lines.next().ok_or("missing number")?;
            if n != (i + 1).to_string() {
                return Err(format!("cue {}: numbered {n:?}", i + 1));
            }
        }
        let timing = lines.next().ok_or(format!("cue {}: no timing", i + 1))?;
        let (a, b) = timing
            .split_once(" --> ")
            .ok_or(format!("cue {}: bad timing {timing:?}", i + 1))?;
        let start = parse_ts(a, sep).ok_or(format!("cue {}: bad start {a:?}", i + 1))?;
        let end = parse_ts(b, sep).ok_or(format!("cue {}: bad end {b:?}", i + 1))?;
        if end <= start {
            return Err(format!("cue {}: ends at {end} before it starts", i + 1));
        }
        if let Some(prev) = cues.last() {
            if start < prev.start {
                return Err(format!("cue {}: starts before cue {}", i + 1, i));
            }
        }
        let text: Vec<&str> = lines.collect();
        if text.is_empty() || text.iter().any(|l| l.trim().is_empty()) {
            return Err(format!("cue {}: empty text line", i + 1));
        }
        if text.iter().any(|l| l.contains("-->")) {
            return Err(format!("cue {}: --> inside text", i + 1));
        }
        cues.push(ParsedCue {
            start,
            end,
            text: text.join("\n"),
        });
    }
    Ok(cues)
}

fn parse_ts(s: &str, sep: char) -> Option<f64> {
    let (hms, ms) = s.split_once(sep)?;
    let mut parts = hms.split(':');
    let h: u64 = parts.next()?.parse().ok()?;
    let m: u64 = parts.next()?.parse().ok()?;
    let sec: u64 = parts.next()?.parse().ok()?;
    if parts.next().is_some() || m > 59 || sec > 59 || ms.len() != 3 {
        return None;
    }
    let ms: u64 = ms.parse().ok()?;
    Some(((h * 3600 + m * 60 + sec) * 1000 + ms) as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "percept-caption-files-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn read_both(f: &CaptionFiles) -> (Vec<ParsedCue>, Vec<ParsedCue>) {
        let vtt = std::fs::read_to_string(f.vtt_path()).unwrap();
        let srt = std::fs::read_to_string(f.srt_path()).unwrap();
        let v = check_vtt(&vtt).unwrap_or_else(|e| panic!("{e}\n{vtt}"));
        let s = check_srt(&srt).unwrap_or_else(|e| panic!("{e}\n{srt}"));
        assert_eq!(v.len(), s.len());
        for (a, b) in v.iter().zip(&s) {
            assert_eq!((a.start, a.end), (b.start, b.end));
        }
        (v, s)
    }

    #[test]
    fn valid_after_every_append() {
        let d = tmp("valid");
        let mut f = CaptionFiles::create(&d.join("sub/a.vtt"), &d.join("sub/a.srt")).unwrap();
        assert_eq!(
            std::fs::read_to_string(d.join("sub/a.vtt")).unwrap(),
            "WEBVTT\n\n"
        );
        assert!(read_both(&f).0.is_empty());
        let inputs = [
            (0.5, 1.25, "Hello there."),
            (
                1.0,
                2.0,
                "Overlapping start is moved after the previous end.",
            ),
            (3.0, 3.0, "zero length"),
            (4.0, 5.0, "   \n\n  "),
            (
                5.0,
                6.5,
                "a <b>bold</b> & \"quoted\" --> arrow\n\nwith a blank line",
            ),
            (3725.5, 3727.0, "after an hour"),
        ];
        let mut written = 0;
        for (t, end, text) in inputs {
            if f.append(t, end, text).unwrap() {
                written += 1;
            }
            let (v, _) = read_both(&f);
            assert_eq!(v.len(), written);
        }
        assert_eq!(f.cues(), 5);
        let vtt = std::fs::read_to_string(d.join("sub/a.vtt")).unwrap();
        assert!(vtt.contains("00:00:00.500 --> 00:00:01.250\nHello there.\n"));
        assert!(vtt.contains("00:00:01.250 --> 00:00:02.000\n"));
        assert!(vtt.contains("00:00:03.000 --> 00:00:03.001\nzero length"));
        assert!(vtt.contains("a &lt;b&gt;bold&lt;/b&gt; &amp; \"quoted\"\n--&gt; arrow"));
        assert!(vtt.contains("01:02:05.500 --> 01:02:07.000"));
        let srt = std::fs::read_to_string(d.join("sub/a.srt")).unwrap();
        assert!(srt.starts_with("1\n00:00:00,500 --> 00:00:01,250\nHello there.\n\n2\n"));
        assert!(srt.contains("\n5\n01:02:05,500 --> 01:02:07,000\nafter an hour\n\n"));
        assert!(srt.contains("-> arrow"));
    }

    #[test]
    fn long_text_wraps_to_two_balanced_lines() {
        let lines = cue_lines("the quick brown fox jumps over the lazy dog and runs far away");
        assert_eq!(lines.len(), 2);
        assert!(lines.iter().all(|l| l.chars().count() <= LINE_CHARS));
        let diff = lines[0].len().abs_diff(lines[1].len());
        assert!(diff < 10, "{lines:?}");
        let many = cue_lines(&"word ".repeat(40));
        assert!(many.len() > 2 && many.iter().all(|l| l.chars().count() <= LINE_CHARS));
        assert!(cue_lines(" \n ").is_empty());
    }

    #[test]
    fn resume_rewrites_committed_cues_and_continues_numbering() {
        let d = tmp("resume");
        let (vtt, srt) = (d.join("t.vtt"), d.join("t.srt"));
        let mut f = CaptionFiles::create(&vtt, &srt).unwrap();
        for i in 0..4 {
            f.append(i as f64, i as f64 + 0.5, &format!("cue {i}"))
                .unwrap();
        }
        drop(f);
        // The checkpoint only knew the first two; the third and fourth are redone.
        let committed: Vec<(f64, f64, String)> = (0..2)
            .map(|i| (i as f64, i as f64 + 0.5, format!("cue {i}")))
            .collect();
        let mut f = CaptionFiles::open_resume(&vtt, &srt, &committed).unwrap();
        assert_eq!(f.cues(), 2);
        f.append(2.0, 2.5, "cue 2").unwrap();
        let (v, s) = read_both(&f);
        assert_eq!(v.len(), 3);
        let texts: Vec<_> = s.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(texts, ["cue 0", "cue 1", "cue 2"]);
        assert!(std::fs::read_to_string(&srt)
            .unwrap()
            .contains("\n3\n00:00:02,000"));
        let leftovers: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn a_restart_continues_the_files_after_the_earlier_cues() {
        let d = tmp("continue");
        let (vtt, srt) = (d.join("cam.vtt"), d.join("cam.srt"));
        let mut f = CaptionFiles::continue_or_create(&vtt, &srt).unwrap();
        f.append(1.0, 2.0, "first run one").unwrap();
        f.append(3.0, 4.5, "first run two").unwrap();
        drop(f);
        // The second run's media time starts at zero again.
        let mut f = CaptionFiles::continue_or_create(&vtt, &srt).unwrap();
        assert_eq!(f.cues(), 2);
        f.append(0.5, 1.0, "second run").unwrap();
        let (v, s) = read_both(&f);
        let texts: Vec<_> = s.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(texts, ["first run one", "first run two", "second run"]);
        assert_eq!((v[2].start, v[2].end), (5.0, 5.5));
        assert!(std::fs::read_to_string(&srt)
            .unwrap()
            .contains("\n3\n00:00:05,000 --> 00:00:05,500\nsecond run\n"));

        // A crash tore the last VTT cue and the SRT lacks it: both keep the common cues.
        drop(f);
        let torn = std::fs::read_to_string(&vtt).unwrap() + "00:00:06.000 --> 00:00:0";
        std::fs::write(&vtt, torn).unwrap();
        let srt_text = std::fs::read_to_string(&srt).unwrap();
        let cut = srt_text.find("3\n00:00:05").unwrap();
        std::fs::write(&srt, &srt_text[..cut]).unwrap();
        let mut f = CaptionFiles::continue_or_create(&vtt, &srt).unwrap();
        assert_eq!(f.cues(), 2);
        f.append(0.0, 1.0, "third run & <more>").unwrap();
        let (v, s) = read_both(&f);
        assert_eq!(v.len(), 3);
        assert_eq!(s[2].text, "third run & <more>");
        assert_eq!((v[2].start, v[2].end), (4.5, 5.5));
    }

    #[test]
    fn validators_reject_broken_files() {
        assert!(check_vtt("").is_err());
        assert!(check_vtt("WEBVTT\n\n00:00:01.000 --> 00:00:02.000\nhi\n").is_err());
        assert!(check_vtt("WEBVTT\n\n00:00:02.000 --> 00:00:01.000\nhi\n\n").is_err());
        assert!(check_vtt("WEBVTT\n\n00:00:01.000 --> 00:00:02.000\n\n").is_err());
        assert!(check_srt("2\n00:00:01,000 --> 00:00:02,000\nhi\n\n").is_err());
        assert!(check_srt(
            "1\n00:00:05,000 --> 00:00:06,000\nb\n\n2\n00:00:01,000 --> 00:00:02,000\na\n\n"
        )
        .is_err());
        assert!(check_srt("").is_ok_and(|c| c.is_empty()));
    }
}
