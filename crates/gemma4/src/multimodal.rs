//! Placing tower soft tokens onto placeholder positions (`masked_scatter` semantics).
//!
//! The k-th placeholder of a modality (in reading order) receives the k-th soft-token row of
//! that modality, items concatenated in prompt order; the number of placeholders must equal
//! the number of rows. Placeholder positions look up the pad id for the token table and for
//! the per-layer embeddings, as the reference does; the PLE projection then sees the merged
//! embeddings.

use candle_core::Tensor;

use super::text::TextModel;
use super::ModelError;

/// Placeholder ids of the three modalities (from the config/tokenizer).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct PlaceholderIds {
    pub image: u32,
    pub video: u32,
    pub audio: u32,
    pub pad: u32,
}

/// Soft tokens of one request, per modality, each item `[n_tokens, text_hidden]`.
#[derive(Debug, Clone, Default)]
pub struct SoftTokens {
    pub images: Vec<Tensor>,
    pub videos: Vec<Tensor>,
    pub audios: Vec<Tensor>,
}

impl SoftTokens {
    pub fn is_empty(&self) -> bool {
        self.images.is_empty() && self.videos.is_empty() && self.audios.is_empty()
    }
}

/// Input embeddings `[n, hidden]` and per-layer inputs `[n, layers, ple_dim]` of one prompt.
pub struct PromptEmbeddings {
    pub embeds: Tensor,
    pub ple: Option<Tensor>,
    /// Vision block id per position (`-1` = not vision), for the bidirectional mask.
    pub block_ids: Vec<i64>,
}

/// Merges a prompt's token embeddings with its soft tokens.
pub fn embed_prompt(
    text: &TextModel,
    ids: &[u32],
    soft: &SoftTokens,
    ph: &PlaceholderIds,
) -> Result<PromptEmbeddings, ModelError> {
    let n = ids.len();
    let hidden = text.config().hidden_size;
    let is_mm = |t: u32| t == ph.image || t == ph.video || t == ph.audio;
    let llm_ids: Vec<u32> = ids
        .iter()
        .map(|&t| if is_mm(t) { ph.pad } else { t })
        .collect();
    let base = text.embed_tokens(&llm_ids)?;
    let dev = text.device();
    let dt = text.dtype();
    // Gather table: rows 0..n are the token embeddings, then image, video, audio rows.
    let mut sources = vec![base.clone()];
    let mut offset = n;
    let mut index: Vec<u32> = (0..n as u32).collect();
    for (what, id, items) in [
        ("image", ph.image, &soft.images),
        ("video", ph.video, &soft.videos),
        ("audio", ph.audio, &soft.audios),
    ] {
        let slots: Vec<usize> = (0..n).filter(|&i| ids[i] == id).collect();
        let mut rows = 0;
        for t in items.iter() {
            let (r, hdim) = t.dims2()?;
            if hdim != hidden {
                return Err(ModelError::Request(format!(
                    "{what} soft tokens have width {hdim}, the decoder expects {hidden}"
                )));
            }
            rows += r;
            sources.push(t.to_device(dev)?.to_dtype(dt)?);
        }
        if slots.len() != rows {
            return Err(ModelError::Placeholders {
                modality: what,
                placeholders: slots.len(),
                soft_tokens: rows,
            });
        }
        for (k, &i) in slots.iter().enumerate() {
            index[i] = (offset + k) as u32;
        }
        offset += rows;
    }
    let embeds = if soft.is_empty() {
        base
    } else {
        let table = Tensor::cat(&sources, 0)?;
        let idx = Tensor::from_vec(index, n, dev)?;
        table.index_select(&idx, 0)?
    };
    let token_part = text.ple_token_inputs(&llm_ids)?;
    let ple = text.ple_inputs(&embeds, token_part.as_ref())?;
    // Vision blocks: maximal runs of image/video placeholders (upstream
    // `get_block_sequence_ids_for_mask`).
    let mut block_ids = vec![-1i64; n];
    let mut next = -1i64;
    for i in 0..n {
        let v = ids[i] == ph.image || ids[i] == ph.video;
        if v {
            let prev_v = i > 0 && (ids[i - 1] == ph.image || ids[i - 1] == ph.video);
            if !prev_v {
                next += 1;
            }
            block_ids[i] = next;
        }
    }
    Ok(PromptEmbeddings {
        embeds,
        ple,
        block_ids,
    })
}

/// Turns media files into soft tokens `[n_tokens, text_hidden]` (after the multimodal
/// embedder). Implemented over the vision/audio towers; the CLI and the worker take one.
pub trait MediaEncoder {
    fn encode_image(
        &self,
        model: &super::Gemma4,
        path: &std::path::Path,
    ) -> Result<Tensor, ModelError>;
    /// One tensor per 30 s clip: the audio tower hears at most 30 s, so longer files
    /// become consecutive audio items of the prompt.
    fn encode_audio(
        &self,
        model: &super::Gemma4,
        path: &std::path::Path,
    ) -> Result<Vec<Tensor>, ModelError>;
}
