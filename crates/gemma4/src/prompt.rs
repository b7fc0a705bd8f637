//! One chat turn with media, built the way the reference processor builds it: the chat
//! template renders the turn, each image / video / audio placeholder is expanded to its soft
//! tokens' count, and the text is encoded. Every caller (a CLI prompt, a live pipeline's job)
//! goes through [`Prompt`], so the two cannot drift apart.

use candle_core::Tensor;

use crate::generate::{Request, Sampling};
use crate::multimodal::SoftTokens;
use crate::tokenizer::{ChatContent, ChatMessage, Gemma4Tokenizer, MediaItem};
use crate::ModelError;

/// A user turn (with an optional system turn before it) under construction. Media parts take
/// their soft tokens from the towers ([`crate::media`]) in the order they appear.
#[derive(Default)]
pub struct Prompt {
    system: Option<String>,
    content: Vec<ChatContent>,
    media: Vec<MediaItem>,
    soft: SoftTokens,
    thinking: bool,
}

impl Prompt {
    pub fn new() -> Prompt {
        Prompt::default()
    }

    /// A system turn before the user's.
    pub fn system(&mut self, text: &str) -> &mut Prompt {
        self.system = Some(text.to_string());
        self
    }

    /// Renders the template with thinking on (`enable_thinking`).
    pub fn thinking(&mut self, on: bool) -> &mut Prompt {
        self.thinking = on;
        self
    }

    /// An image, as its soft tokens `[n, hidden]`.
    pub fn image(&mut self, soft: Tensor) -> Result<&mut Prompt, ModelError> {
        self.media.push(MediaItem::Image {
            tokens: soft.dim(0)?,
        });
        self.soft.images.push(soft);
        self.content.push(ChatContent::Image);
        Ok(self)
    }

    /// A video: each frame's soft tokens with its time in seconds from the clip's start (the
    /// reference's `mm:ss` stamps). Every frame has the same token count.
    pub fn video(
        &mut self,
        frames: Vec<Tensor>,
        timestamps_s: Vec<f64>,
    ) -> Result<&mut Prompt, ModelError> {
        if frames.len() != timestamps_s.len() {
            return Err(ModelError::Request(format!(
                "video: {} frames but {} timestamps",
                frames.len(),
                timestamps_s.len()
            )));
        }
        let Some(first) = frames.first() else {
            return Ok(self);
        };
        let tokens_per_frame = first.dim(0)?;
        for f in &frames {
            if f.dim(0)? != tokens_per_frame {
                return Err(ModelError::Request(
                    "video: frames with different soft-token counts".into(),
                ));
            }
        }
        self.media.push(MediaItem::Video {
            tokens_per_frame,
            timestamps_s,
        });
        self.soft.videos.extend(frames);
        self.content.push(ChatContent::Video);
        Ok(self)
    }

    /// An audio clip, as its soft tokens `[n, hidden]`.
    pub fn audio(&mut self, soft: Tensor) -> Result<&mut Prompt, ModelError> {
        self.media.push(MediaItem::Audio {
            tokens: soft.dim(0)?,
        });
        self.soft.audios.push(soft);
        self.content.push(ChatContent::Audio);
        Ok(self)
    }

    /// Text after the media so far.
    pub fn text(&mut self, text: &str) -> &mut Prompt {
        self.content.push(ChatContent::Text(text.to_string()));
        self
    }

    /// The prompt text: the template rendered with the media placeholders expanded.
    pub fn render(&self, tok: &Gemma4Tokenizer) -> Result<String, ModelError> {
        let mut messages = Vec::with_capacity(2);
        if let Some(s) = &self.system {
            messages.push(ChatMessage::system(s));
        }
        messages.push(ChatMessage::user(self.content.clone()));
        let rendered = tok.render_chat(&messages, true, self.thinking)?;
        Ok(tok.expand_media(&rendered, &self.media)?)
    }

    /// A generation request for this prompt.
    pub fn request(
        self,
        tok: &Gemma4Tokenizer,
        max_new_tokens: usize,
        sampling: Sampling,
    ) -> Result<Request, ModelError> {
        Ok(self.rendered_request(tok, max_new_tokens, sampling)?.1)
    }

    /// [`Prompt::request`] with the prompt text it encoded (see [`Prompt::render`]).
    pub fn rendered_request(
        self,
        tok: &Gemma4Tokenizer,
        max_new_tokens: usize,
        sampling: Sampling,
    ) -> Result<(String, Request), ModelError> {
        let text = self.render(tok)?;
        let request = Request {
            input_ids: tok.encode(&text)?,
            soft: self.soft,
            max_new_tokens,
            sampling,
        };
        Ok((text, request))
    }
}
