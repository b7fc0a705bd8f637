//! GStreamer graph templates from `pipelines/`: compiled in, or read from a user's file, with
//! `{placeholder}`s filled from quoted values.

use std::collections::BTreeMap;
use std::path::Path;

pub const FILE: &str = include_str!("../../pipelines/file.gst");
pub const RTSP: &str = include_str!("../../pipelines/rtsp.gst");
pub const HTTP: &str = include_str!("../../pipelines/http.gst");
pub const V4L2: &str = include_str!("../../pipelines/v4l2.gst");
pub const PULSE: &str = include_str!("../../pipelines/pulse.gst");
pub const ALSA: &str = include_str!("../../pipelines/alsa.gst");
pub const TEST_VIDEO: &str = include_str!("../../pipelines/test_video.gst");
pub const TEST_AUDIO: &str = include_str!("../../pipelines/test_audio.gst");
pub const VIDEO_BRANCH: &str = include_str!("../../pipelines/video_branch.gst");
pub const AUDIO_BRANCH: &str = include_str!("../../pipelines/audio_branch.gst");

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TemplateError {
    #[error("template {name}: unknown placeholder {{{key}}}")]
    Unknown { name: String, key: String },
    #[error("template {name}: unclosed '{{'")]
    Unclosed { name: String },
    #[error("reading template {path}: {error}")]
    Read { path: String, error: String },
}

/// Values for placeholders. Strings are quoted for gst-launch syntax when inserted.
#[derive(Debug, Default, Clone)]
pub struct Vars(BTreeMap<&'static str, String>);

impl Vars {
    pub fn new() -> Vars {
        Vars::default()
    }

    /// A value inserted verbatim (numbers, booleans, enum nicks).
    pub fn raw(mut self, key: &'static str, value: impl ToString) -> Vars {
        self.0.insert(key, value.to_string());
        self
    }

    /// A string value, quoted and escaped.
    pub fn quoted(mut self, key: &'static str, value: &str) -> Vars {
        self.0.insert(key, quote(value));
        self
    }
}

/// Quote a value for gst-launch: paths with spaces or quotes stay one property value.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

pub fn render(name: &str, template: &str, vars: &Vars) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(template.len() + 64);
    let mut rest = template.trim();
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| TemplateError::Unclosed { name: name.into() })?;
        let key = &after[..close];
        let value = vars.0.get(key).ok_or_else(|| TemplateError::Unknown {
            name: name.into(),
            key: key.into(),
        })?;
        out.push_str(value);
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

pub fn read(path: &Path) -> Result<String, TemplateError> {
    std::fs::read_to_string(path).map_err(|e| TemplateError::Read {
        path: path.display().to_string(),
        error: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_and_quotes() {
        let v = Vars::new().quoted("location", "/tmp/a \"b\".mp4");
        assert_eq!(
            render("file", FILE, &v).unwrap(),
            r#"filesrc location="/tmp/a \"b\".mp4" ! parsebin name=demux"#
        );
        assert_eq!(
            render("file", "x {nope}", &v),
            Err(TemplateError::Unknown {
                name: "file".into(),
                key: "nope".into()
            })
        );
    }
}
