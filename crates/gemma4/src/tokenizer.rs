//! Tokenizer, chat template and media placeholder expansion.
//!
//! Special ids are looked up by their strings in the shipped `tokenizer.json`, never
//! hard-coded. The chat template is the model's own (`chat_template.jinja`, else the
//! `chat_template` of `tokenizer_config.json`), rendered with minijinja; the rendered prompt
//! already starts with `<bos>`, so it is encoded without adding special tokens.
//! Expansion follows `processing_gemma4.py`:
//! - image: `<|image>` + N x `<|image|>` + `<image|>`
//! - audio: `<|audio>` + M x `<|audio|>` + `<audio|>`
//! - video: per frame `mm:ss <|image>` + N x `<|video|>` + `<image|>`, frames joined by a space.

use std::path::Path;

use minijinja::{Environment, Value};

use super::loader::{LoadError, ModelFiles};

/// The official Gemma 4 chat template (as shipped by the checkpoints): used when a checkpoint
/// has none of its own.
pub const GEMMA4_CHAT_TEMPLATE: &str = include_str!("gemma4_chat_template.jinja");

pub const IMAGE_TOKEN: &str = "<|image|>";
pub const BOI_TOKEN: &str = "<|image>";
pub const EOI_TOKEN: &str = "<image|>";
pub const AUDIO_TOKEN: &str = "<|audio|>";
pub const BOA_TOKEN: &str = "<|audio>";
pub const EOA_TOKEN: &str = "<audio|>";
pub const VIDEO_TOKEN: &str = "<|video|>";

/// Ids of the special tokens, read from the tokenizer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SpecialTokens {
    pub pad: u32,
    pub bos: u32,
    pub eos: u32,
    pub turn_start: Option<u32>,
    pub turn_end: Option<u32>,
    pub image: u32,
    pub boi: u32,
    pub eoi: u32,
    pub audio: u32,
    pub boa: u32,
    pub eoa: u32,
    pub video: u32,
}

/// One content item of a chat message.
#[derive(Debug, Clone, PartialEq)]
pub enum ChatContent {
    Text(String),
    Image,
    Audio,
    Video,
}

/// A chat message (`role` is `system`, `user` or `assistant`/`model`).
#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: Vec<ChatContent>,
}

impl ChatMessage {
    pub fn user(content: Vec<ChatContent>) -> Self {
        Self {
            role: "user".into(),
            content,
        }
    }

    pub fn system(text: &str) -> Self {
        Self {
            role: "system".into(),
            content: vec![ChatContent::Text(text.into())],
        }
    }

    fn to_value(&self) -> serde_json::Value {
        let items: Vec<serde_json::Value> = self
            .content
            .iter()
            .map(|c| match c {
                ChatContent::Text(t) => serde_json::json!({"type": "text", "text": t}),
                ChatContent::Image => serde_json::json!({"type": "image"}),
                ChatContent::Audio => serde_json::json!({"type": "audio"}),
                ChatContent::Video => serde_json::json!({"type": "video"}),
            })
            .collect();
        // A plain string for a text-only system message keeps `messages[0]['content'] | trim`
        // working as in the reference.
        if self.content.len() == 1 {
            if let ChatContent::Text(t) = &self.content[0] {
                return serde_json::json!({"role": self.role, "content": t});
            }
        }
        serde_json::json!({"role": self.role, "content": items})
    }
}

/// How many soft tokens each media item in a prompt takes, in prompt order per modality.
#[derive(Debug, Clone, PartialEq)]
pub enum MediaItem {
    Image {
        tokens: usize,
    },
    Audio {
        tokens: usize,
    },
    /// One entry per frame: timestamp in seconds; every frame takes `tokens_per_frame`.
    Video {
        tokens_per_frame: usize,
        timestamps_s: Vec<f64>,
    },
}

/// Errors of tokenization and templating.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("chat template: {0}")]
    Template(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("prompt has {found} {what} placeholder(s) but {given} item(s) were given")]
    Count {
        what: &'static str,
        found: usize,
        given: usize,
    },
}

/// The tokenizer plus template of one checkpoint.
pub struct Gemma4Tokenizer {
    tok: tokenizers::Tokenizer,
    template: String,
    /// True when the checkpoint had no template and the built-in official one is used.
    pub template_is_builtin: bool,
    pub special: SpecialTokens,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for Gemma4Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gemma4Tokenizer")
            .field("special", &self.special)
            .finish()
    }
}

fn read(path: &Path) -> Result<String, LoadError> {
    std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })
}

impl Gemma4Tokenizer {
    /// Loads `tokenizer.json` and the chat template of a checkpoint.
    pub fn load(files: &ModelFiles) -> Result<Self, LoadError> {
        let tpath = files.tokenizer.as_ref().ok_or_else(|| {
            LoadError::NotFound(format!("{} has no tokenizer.json", files.dir.display()))
        })?;
        let mut tok = tokenizers::Tokenizer::from_file(tpath)
            .map_err(|e| LoadError::Tokenizer(format!("{}: {e}", tpath.display())))?;
        let tokenizer_config = match &files.tokenizer_config {
            Some(p) => Some(
                serde_json::from_str::<serde_json::Value>(&read(p)?).map_err(|e| {
                    LoadError::Parse {
                        path: p.clone(),
                        message: e.to_string(),
                    }
                })?,
            ),
            None => None,
        };
        mark_reference_specials(&mut tok, tokenizer_config.as_ref());
        let mut template = None;
        if let Some(p) = &files.chat_template {
            template = Some(read(p)?);
        }
        if template.is_none() {
            if let Some(v) = &tokenizer_config {
                template = match v.get("chat_template") {
                    Some(serde_json::Value::String(s)) => Some(s.clone()),
                    Some(serde_json::Value::Array(list)) => list
                        .iter()
                        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                        .or_else(|| list.first())
                        .and_then(|t| t.get("template"))
                        .and_then(|t| t.as_str())
                        .map(String::from),
                    _ => None,
                };
            }
        }
        let template_is_builtin = template.is_none();
        if template_is_builtin {
            tracing::warn!("checkpoint has no chat template; using the built-in Gemma 4 template");
        }
        let template = template.unwrap_or_else(|| GEMMA4_CHAT_TEMPLATE.to_string());
        Self::from_parts(tok, template, template_is_builtin)
    }

    /// Builds from an in-memory tokenizer and template.
    pub fn from_parts(
        tok: tokenizers::Tokenizer,
        template: String,
        template_is_builtin: bool,
    ) -> Result<Self, LoadError> {
        let need = |s: &str| {
            tok.token_to_id(s)
                .ok_or_else(|| LoadError::Tokenizer(format!("tokenizer has no {s:?} token")))
        };
        let special = SpecialTokens {
            pad: need("<pad>")?,
            bos: need("<bos>")?,
            eos: need("<eos>")?,
            turn_start: tok.token_to_id("<|turn>"),
            turn_end: tok.token_to_id("<turn|>"),
            image: need(IMAGE_TOKEN)?,
            boi: need(BOI_TOKEN)?,
            eoi: need(EOI_TOKEN)?,
            audio: need(AUDIO_TOKEN)?,
            boa: need(BOA_TOKEN)?,
            eoa: need(EOA_TOKEN)?,
            video: need(VIDEO_TOKEN)?,
        };
        Ok(Self {
            tok,
            template,
            template_is_builtin,
            special,
            bos_token: "<bos>".into(),
            eos_token: "<eos>".into(),
        })
    }

    /// Encodes text without adding special tokens (the template already has `<bos>`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, PromptError> {
        let enc = self
            .tok
            .encode(text, false)
            .map_err(|e| PromptError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids; `skip_special` drops special tokens.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, PromptError> {
        self.tok
            .decode(ids, skip_special)
            .map_err(|e| PromptError::Tokenizer(e.to_string()))
    }

    pub fn token_to_id(&self, s: &str) -> Option<u32> {
        self.tok.token_to_id(s)
    }

    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }

    /// Renders the chat template.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        enable_thinking: bool,
    ) -> Result<String, PromptError> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(py_methods);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", &self.template)
            .map_err(|e| PromptError::Template(format!("{e:#}")))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| PromptError::Template(format!("{e:#}")))?;
        let msgs: Vec<serde_json::Value> = messages.iter().map(ChatMessage::to_value).collect();
        let ctx = minijinja::context! {
            messages => Value::from(minijinja::value::Serde(msgs)),
            bos_token => self.bos_token.clone(),
            eos_token => self.eos_token.clone(),
            add_generation_prompt => add_generation_prompt,
            enable_thinking => enable_thinking,
        };
        tmpl.render(ctx)
            .map_err(|e| PromptError::Template(format!("{e:#}")))
    }

    /// Replaces the single-token media placeholders of a rendered prompt by their expanded
    /// forms, in order per modality. Counts must match exactly.
    pub fn expand_media(&self, rendered: &str, media: &[MediaItem]) -> Result<String, PromptError> {
        expand_media(rendered, media)
    }
}

/// Marks as special every token that transformers treats as special when it loads this
/// checkpoint, so `decode(ids, true)` drops exactly what the reference's
/// `tokenizer.decode(ids, skip_special_tokens=True)` drops:
/// - `added_tokens_decoder` entries of `tokenizer_config.json` with `"special": true`;
/// - the named special tokens there (`bos_token`, `eos_token`, `pad_token`, `unk_token`,
///   `mask_token`, the media tokens such as `boi_token`, and `additional_special_tokens` /
///   `extra_special_tokens`);
/// - and, whatever the files say, the reserved `<unusedN>` added tokens: a sampled one is
///   never text a user should see.
///
/// Only tokens the tokenizer already knows are marked (ids and encoding stay the same); an
/// added token keeps its matching flags (`lstrip`, `normalized`, ...).
pub fn mark_reference_specials(
    tok: &mut tokenizers::Tokenizer,
    tokenizer_config: Option<&serde_json::Value>,
) {
    let mut names: Vec<String> = Vec::new();
    if let Some(cfg) = tokenizer_config {
        if let Some(map) = cfg.get("added_tokens_decoder").and_then(|m| m.as_object()) {
            for entry in map.values() {
                if entry.get("special").and_then(|s| s.as_bool()) == Some(true) {
                    if let Some(c) = entry.get("content").and_then(|c| c.as_str()) {
                        names.push(c.to_string());
                    }
                }
            }
        }
        let content = |v: &serde_json::Value| -> Option<String> {
            match v {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => {
                    o.get("content").and_then(|c| c.as_str()).map(String::from)
                }
                _ => None,
            }
        };
        if let Some(obj) = cfg.as_object() {
            for (key, value) in obj {
                if key.ends_with("_token") && key != "chat_template" {
                    names.extend(content(value));
                }
            }
        }
        for key in ["additional_special_tokens", "extra_special_tokens"] {
            match cfg.get(key) {
                Some(serde_json::Value::Array(list)) => {
                    names.extend(list.iter().filter_map(content))
                }
                Some(serde_json::Value::Object(map)) => {
                    names.extend(map.values().filter_map(content))
                }
                _ => {}
            }
        }
    }
    let added = tok.get_added_tokens_decoder();
    names.extend(
        added
            .values()
            .filter(|t| is_unused_token(&t.content))
            .map(|t| t.content.clone()),
    );
    let mut marks: Vec<tokenizers::AddedToken> = Vec::new();
    for name in names {
        let Some(id) = tok.token_to_id(&name) else {
            continue;
        };
        let mut t = added
            .get(&id)
            .cloned()
            .unwrap_or_else(|| tokenizers::AddedToken::from(name.clone(), true));
        if t.special || t.content != name {
            continue;
        }
        t.special = true;
        marks.push(t);
    }
    if !marks.is_empty() {
        if let Err(e) = tok.add_special_tokens(marks) {
            tracing::warn!(error = %e, "Could not mark the checkpoint's special tokens; decoded text may show them.");
        }
    }
}

/// `<unused0>` ... `<unused6241>`: reserved ids of the Gemma vocabulary.
fn is_unused_token(s: &str) -> bool {
    s.strip_prefix("<unused")
        .and_then(|r| r.strip_suffix('>'))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// See [`Gemma4Tokenizer::expand_media`].
pub fn expand_media(rendered: &str, media: &[MediaItem]) -> Result<String, PromptError> {
    let images: Vec<usize> = media
        .iter()
        .filter_map(|m| match m {
            MediaItem::Image { tokens } => Some(*tokens),
            _ => None,
        })
        .collect();
    let audios: Vec<usize> = media
        .iter()
        .filter_map(|m| match m {
            MediaItem::Audio { tokens } => Some(*tokens),
            _ => None,
        })
        .collect();
    let videos: Vec<(usize, &Vec<f64>)> = media
        .iter()
        .filter_map(|m| match m {
            MediaItem::Video {
                tokens_per_frame,
                timestamps_s,
            } => Some((*tokens_per_frame, timestamps_s)),
            _ => None,
        })
        .collect();
    let count = |p: &str| rendered.matches(p).count();
    for (what, found, given) in [
        ("image", count(IMAGE_TOKEN), images.len()),
        ("audio", count(AUDIO_TOKEN), audios.len()),
        ("video", count(VIDEO_TOKEN), videos.len()),
    ] {
        if found != given {
            return Err(PromptError::Count { what, found, given });
        }
    }
    let (mut ii, mut ai, mut vi) = (0, 0, 0);
    let mut out = String::with_capacity(rendered.len());
    let mut rest = rendered;
    loop {
        let next = [IMAGE_TOKEN, AUDIO_TOKEN, VIDEO_TOKEN]
            .iter()
            .filter_map(|p| rest.find(p).map(|i| (i, *p)))
            .min_by_key(|(i, _)| *i);
        let Some((at, which)) = next else {
            out.push_str(rest);
            break;
        };
        out.push_str(&rest[..at]);
        match which {
            IMAGE_TOKEN => {
                out.push_str(&image_expansion(images[ii]));
                ii += 1;
            }
            AUDIO_TOKEN => {
                out.push_str(BOA_TOKEN);
                out.push_str(&AUDIO_TOKEN.repeat(audios[ai]));
                out.push_str(EOA_TOKEN);
                ai += 1;
            }
            _ => {
                let (n, ts) = videos[vi];
                out.push_str(&video_expansion(n, ts));
                vi += 1;
            }
        }
        rest = &rest[at + which.len()..];
    }
    Ok(out)
}

/// `<|image>` + n x `<|image|>` + `<image|>`.
pub fn image_expansion(n: usize) -> String {
    format!("{BOI_TOKEN}{}{EOI_TOKEN}", IMAGE_TOKEN.repeat(n))
}

/// Per frame `mm:ss <|image>` + n x `<|video|>` + `<image|>`, joined by spaces.
pub fn video_expansion(n: usize, timestamps_s: &[f64]) -> String {
    timestamps_s
        .iter()
        .map(|&s| {
            let mm = (s / 60.0).floor() as u64;
            let ss = (s % 60.0).floor() as u64;
            format!(
                "{mm:02}:{ss:02} {BOI_TOKEN}{}{EOI_TOKEN}",
                VIDEO_TOKEN.repeat(n)
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The few Python string methods chat templates call (`split`, `strip`, `startswith`, ...).
fn py_methods(
    _state: &mut minijinja::State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, minijinja::Error> {
    let unknown = || {
        minijinja::Error::new(
            minijinja::ErrorKind::UnknownMethod,
            format!("method {method} is not available"),
        )
    };
    let Some(s) = value.as_str() else {
        return Err(unknown());
    };
    let arg = |i: usize| args.get(i).and_then(|a| a.as_str().map(String::from));
    match method {
        "split" => {
            let parts: Vec<Value> = match arg(0) {
                Some(sep) => s.split(sep.as_str()).map(Value::from).collect(),
                None => s.split_whitespace().map(Value::from).collect(),
            };
            Ok(Value::from(parts))
        }
        "strip" => Ok(Value::from(match arg(0) {
            Some(c) => s.trim_matches(|x| c.contains(x)).to_string(),
            None => s.trim().to_string(),
        })),
        "lstrip" => Ok(Value::from(s.trim_start().to_string())),
        "rstrip" => Ok(Value::from(s.trim_end().to_string())),
        "startswith" => Ok(Value::from(
            arg(0).map(|p| s.starts_with(&p)).unwrap_or(false),
        )),
        "endswith" => Ok(Value::from(
            arg(0).map(|p| s.ends_with(&p)).unwrap_or(false),
        )),
        "upper" => Ok(Value::from(s.to_uppercase())),
        "lower" => Ok(Value::from(s.to_lowercase())),
        "replace" => match (arg(0), arg(1)) {
            (Some(a), Some(b)) => Ok(Value::from(s.replace(&a, &b))),
            _ => Err(unknown()),
        },
        _ => Err(unknown()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The tiny tokenizer plus reserved `<unusedN>` tokens, with `<|tool_call>` and the
    /// unused ones not special in tokenizer.json (as in hub files where only
    /// tokenizer_config.json's `added_tokens_decoder` marks a token special).
    fn tokenizer_with_unused() -> tokenizers::Tokenizer {
        let mut j: serde_json::Value =
            serde_json::from_str(&crate::testing::tiny_tokenizer_json()).unwrap();
        let n = j["model"]["vocab"].as_object().unwrap().len();
        for (k, name) in ["<unused0>", "<unused17>"].iter().enumerate() {
            j["model"]["vocab"][name] = serde_json::json!(n + k);
            j["added_tokens"]
                .as_array_mut()
                .unwrap()
                .push(serde_json::json!({
                "id": n + k, "content": name, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": false}));
        }
        for t in j["added_tokens"].as_array_mut().unwrap() {
            if t["content"] == "<|tool_call>" || t["content"] == "<|turn>" {
                t["special"] = serde_json::json!(false);
            }
        }
        tokenizers::Tokenizer::from_bytes(j.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn decode_drops_what_the_reference_skips() {
        let mut tok = tokenizer_with_unused();
        let id = |t: &tokenizers::Tokenizer, s: &str| t.token_to_id(s).unwrap();
        let text = tok
            .encode("Hi there, 3 cats.", false)
            .unwrap()
            .get_ids()
            .to_vec();
        let mut ids = vec![id(&tok, "<bos>"), id(&tok, "<|turn>")];
        ids.extend(&text[..4]);
        ids.push(id(&tok, "<unused0>"));
        ids.extend(&text[4..]);
        ids.extend([
            id(&tok, "<|tool_call>"),
            id(&tok, "<unused17>"),
            id(&tok, "<turn|>"),
            id(&tok, "<eos>"),
        ]);
        // Before: the files alone leave non-special control tokens in the text.
        let raw = tok.decode(&ids, true).unwrap();
        assert!(
            raw.contains("<unused0>") && raw.contains("<|tool_call>"),
            "{raw}"
        );
        let config = serde_json::json!({
            "added_tokens_decoder": {
                "5": {"content": "<|turn>", "special": true, "lstrip": false, "normalized": false,
                      "rstrip": false, "single_word": false},
                "19": {"content": "<|tool_call>", "special": true, "lstrip": false,
                       "normalized": false, "rstrip": false, "single_word": false}
            },
            "bos_token": "<bos>", "eos_token": {"content": "<eos>"}, "add_bos_token": true
        });
        let before = tok
            .encode("a <|tool_call> b", false)
            .unwrap()
            .get_ids()
            .to_vec();
        mark_reference_specials(&mut tok, Some(&config));
        assert_eq!(tok.decode(&ids, true).unwrap(), "Hi there, 3 cats.");
        // Ids and encoding are unchanged: only the special flag moved.
        assert_eq!(
            tok.encode("a <|tool_call> b", false).unwrap().get_ids(),
            &before[..]
        );
        assert_eq!(
            id(&tok, "<unused17>"),
            id(&tokenizer_with_unused(), "<unused17>")
        );
        // Without the flag, the tokens are still there for prompts and debugging.
        assert!(tok.decode(&ids, false).unwrap().contains("<unused0>"));
        assert!(
            is_unused_token("<unused6241>")
                && !is_unused_token("<unused>")
                && !is_unused_token("<unusedx>")
        );
    }

    #[test]
    fn video_stamps_are_mm_ss() {
        let s = video_expansion(2, &[0.0, 61.5]);
        assert_eq!(
            s,
            "00:00 <|image><|video|><|video|><image|> 01:01 <|image><|video|><|video|><image|>"
        );
    }

    #[test]
    fn expansion_counts_are_checked() {
        let e = expand_media("a <|image|> b", &[]);
        assert!(matches!(e, Err(PromptError::Count { what: "image", .. })));
        let ok = expand_media(
            "<|image|>x<|audio|>",
            &[
                MediaItem::Audio { tokens: 1 },
                MediaItem::Image { tokens: 2 },
            ],
        )
        .unwrap();
        assert_eq!(
            ok,
            "<|image><|image|><|image|><image|>x<|audio><|audio|><audio|>"
        );
    }
}
