//! Batched generation: chunked prefill and decode over ragged packed batches.
//!
//! Every request keeps its own cache, position and sampler; rows of all active requests are
//! packed into one forward. No row ever attends another request's keys or padding, so a
//! batch yields the tokens that single runs yield.

use std::time::Instant;

use candle_core::Tensor;

use super::multimodal::{embed_prompt, PlaceholderIds, SoftTokens};
use super::prefix::{PrefixCache, Start};
use super::text::{LogitRows, Segment, SeqCache, TextModel};
use super::ModelError;
use crate::rng::SplitMix64;

/// Sampling settings; `temperature <= 0` means greedy.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Sampling {
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// One generation request: prompt ids (placeholders already expanded), the soft tokens of
/// its media in prompt order, a token budget and sampling.
#[derive(Debug, Clone)]
pub struct Request {
    pub input_ids: Vec<u32>,
    pub soft: SoftTokens,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
}

/// Why a request stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// A stop id was generated (it is the last of `output_ids`).
    Eos,
    /// The token budget ran out.
    Length,
}

/// Result of one request.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Generation {
    pub output_ids: Vec<u32>,
    pub stop: StopReason,
    pub prompt_tokens: usize,
    /// Prompt tokens whose K/V came from a kept prefix ([`PrefixCache`]) instead of this
    /// request's prefill.
    pub cached_prompt_tokens: usize,
    /// Seconds spent in prefill forwards (shared by the whole batch).
    pub prefill_s: f64,
    /// Seconds spent in decode forwards (shared by the whole batch).
    pub decode_s: f64,
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Prompt rows per request per prefill forward.
    pub prefill_chunk: usize,
    /// Ids that end a request (generation_config `eos_token_id` and the config's).
    pub stop_ids: Vec<u32>,
    pub placeholders: PlaceholderIds,
    /// The chat template's turn opener (`<|turn>`): where a kept prompt prefix may end
    /// ([`crate::prefix`]).
    pub turn_start: Option<u32>,
}

/// Picks the next token from `[vocab]` f32 logits.
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut SplitMix64) -> u32 {
    if s.temperature <= 0.0 {
        return argmax(logits);
    }
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i, ((l as f64 - max) / s.temperature).exp()))
        .collect();
    let z: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= z);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut keep = probs.len();
    if s.top_p < 1.0 {
        let mut c = 0.0;
        for (i, p) in probs.iter().enumerate() {
            c += p.1;
            if c >= s.top_p {
                keep = i + 1;
                break;
            }
        }
    }
    let kept = &probs[..keep];
    let total: f64 = kept.iter().map(|p| p.1).sum();
    let mut u = rng.next_f64() * total;
    for p in kept {
        u -= p.1;
        if u <= 0.0 {
            return p.0 as u32;
        }
    }
    kept.last().map(|p| p.0 as u32).unwrap_or(0)
}

/// Index of the largest value (first one on ties).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

struct Active {
    cache: SeqCache,
    /// Prompt positions the cache held at the start (a kept prefix); `embeds`, `ple` and
    /// `block_ids` cover the prompt from here on.
    base: usize,
    /// Of `base`, positions copied from a kept prefix.
    cached: usize,
    embeds: Tensor,
    ple: Option<Tensor>,
    block_ids: Vec<i64>,
    prefilled: usize,
    prompt_len: usize,
    out: Vec<u32>,
    done: Option<StopReason>,
    rng: SplitMix64,
}

/// Runs all requests to completion. `on_token(request_index, token)` is called for every
/// generated token as soon as it is known (per-request streams).
pub fn generate_batch(
    model: &TextModel,
    opts: &GenerateOptions,
    requests: &[Request],
    on_token: &mut dyn FnMut(usize, u32),
) -> Result<Vec<Generation>, ModelError> {
    run_batch(model, opts, None, requests, on_token)
}

/// [`generate_batch`] that starts each request from the longest prompt prefix `prefixes`
/// keeps for it (building the prefixes the batch shows to be shared) and prefills only the
/// rest. The greedy tokens are those of [`generate_batch`].
pub fn generate_batch_reusing(
    model: &TextModel,
    opts: &GenerateOptions,
    prefixes: &PrefixCache,
    requests: &[Request],
    on_token: &mut dyn FnMut(usize, u32),
) -> Result<Vec<Generation>, ModelError> {
    run_batch(model, opts, Some(prefixes), requests, on_token)
}

fn run_batch(
    model: &TextModel,
    opts: &GenerateOptions,
    prefixes: Option<&PrefixCache>,
    requests: &[Request],
    on_token: &mut dyn FnMut(usize, u32),
) -> Result<Vec<Generation>, ModelError> {
    for r in requests {
        if r.input_ids.is_empty() {
            return Err(ModelError::Request("empty prompt".into()));
        }
        // Refused before any work: the decoder would otherwise find out at the prefill chunk
        // that crosses the limit, possibly many minutes in.
        if r.input_ids.len() >= model.max_context() {
            return Err(ModelError::Request(format!(
                "prompt of {} tokens does not fit max_context {} (with room for one answer token)",
                r.input_ids.len(),
                model.max_context()
            )));
        }
    }
    let starts = match prefixes {
        Some(p) => p.starts(model, opts, requests)?,
        None => requests
            .iter()
            .map(|_| Start {
                cache: model.new_cache(),
                held: 0,
                reused: 0,
            })
            .collect(),
    };
    let mut act = Vec::with_capacity(requests.len());
    for (r, st) in requests.iter().zip(starts) {
        // A kept prefix holds no media placeholder, so every soft token lands in the rest.
        let pe = embed_prompt(model, &r.input_ids[st.held..], &r.soft, &opts.placeholders)?;
        act.push(Active {
            cache: st.cache,
            base: st.held,
            cached: st.reused,
            embeds: pe.embeds,
            ple: pe.ple,
            block_ids: pe.block_ids,
            prefilled: st.held,
            prompt_len: r.input_ids.len(),
            out: Vec::new(),
            done: if r.max_new_tokens == 0 {
                Some(StopReason::Length)
            } else {
                None
            },
            rng: SplitMix64(r.sampling.seed),
        });
    }
    let chunk = opts.prefill_chunk.max(1);
    let bidir = model.bidirectional_vision();
    let mut prefill_s = 0.0;
    let mut decode_s = 0.0;
    loop {
        // Which requests take part in this forward, with how many rows.
        let mut plan: Vec<(usize, usize, bool)> = Vec::new(); // (req, rows, is_prefill)
        let prefilling = act
            .iter()
            .any(|a| a.done.is_none() && a.prefilled < a.prompt_len);
        for (i, a) in act.iter().enumerate() {
            if a.done.is_some() {
                continue;
            }
            if a.prefilled < a.prompt_len {
                let mut end = (a.prefilled + chunk).min(a.prompt_len);
                if bidir {
                    // Never split an image block across forwards: its tokens see each other.
                    while end < a.prompt_len
                        && a.block_ids[end - a.base] >= 0
                        && a.block_ids[end - a.base] == a.block_ids[end - a.base - 1]
                    {
                        end += 1;
                    }
                }
                plan.push((i, end - a.prefilled, true));
            } else if !prefilling {
                plan.push((i, 1, false));
            }
        }
        if plan.is_empty() {
            break;
        }
        let t0 = Instant::now();
        let mut emb_parts = Vec::with_capacity(plan.len());
        let mut ple_parts = Vec::with_capacity(plan.len());
        for &(i, n, pre) in &plan {
            let a = &act[i];
            if pre {
                emb_parts.push(a.embeds.narrow(0, a.prefilled - a.base, n)?);
                if let Some(p) = &a.ple {
                    ple_parts.push(p.narrow(0, a.prefilled - a.base, n)?);
                }
            } else {
                let last = *a.out.last().ok_or_else(|| {
                    ModelError::Request("decode step without a previous token".into())
                })?;
                let e = model.embed_tokens(&[last])?;
                let tp = model.ple_token_inputs(&[last])?;
                if let Some(p) = model.ple_inputs(&e, tp.as_ref())? {
                    ple_parts.push(p);
                }
                emb_parts.push(e);
            }
        }
        let embeds = Tensor::cat(&emb_parts, 0)?;
        let ple = if ple_parts.is_empty() {
            None
        } else {
            Some(Tensor::cat(&ple_parts, 0)?)
        };
        // Split borrows: segments hold &mut caches of the planned requests.
        let mut planned: Vec<Option<&mut Active>> = act.iter_mut().map(Some).collect();
        let mut segs = Vec::with_capacity(plan.len());
        for &(i, n, pre) in &plan {
            let a = planned[i]
                .take()
                .ok_or_else(|| ModelError::Request("request planned twice".into()))?;
            let finishes = !pre || a.prefilled + n == a.prompt_len;
            let block_ids = if bidir && pre {
                let from = a.prefilled - a.base;
                Some(a.block_ids[from..from + n].to_vec())
            } else {
                None
            };
            segs.push(Segment {
                cache: &mut a.cache,
                len: n,
                logits: if finishes {
                    LogitRows::Last
                } else {
                    LogitRows::None
                },
                block_ids,
            });
        }
        let logits = model.forward(&embeds, ple.as_ref(), &mut segs)?;
        drop(segs);
        let dt = t0.elapsed().as_secs_f64();
        if prefilling {
            prefill_s += dt;
        } else {
            decode_s += dt;
        }
        for (&(i, n, pre), l) in plan.iter().zip(logits) {
            let a = &mut act[i];
            if pre {
                a.prefilled += n;
                if a.prefilled < a.prompt_len {
                    continue;
                }
            }
            let row = l.squeeze(0)?.to_vec1::<f32>()?;
            let tok = sample(&row, &requests[i].sampling, &mut a.rng);
            a.out.push(tok);
            on_token(i, tok);
            if opts.stop_ids.contains(&tok) {
                a.done = Some(StopReason::Eos);
            } else if a.out.len() >= requests[i].max_new_tokens
                || a.cache.pos + 1 > model.max_context()
            {
                a.done = Some(StopReason::Length);
            }
        }
    }
    Ok(act
        .into_iter()
        .map(|a| Generation {
            output_ids: a.out,
            stop: a.done.unwrap_or(StopReason::Length),
            prompt_tokens: a.prompt_len,
            cached_prompt_tokens: a.cached,
            prefill_s,
            decode_s,
        })
        .collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn top_p_keeps_the_nucleus() {
        let logits = [10.0f32, 9.0, -20.0, -20.0];
        let s = Sampling {
            temperature: 1.0,
            top_p: 0.5,
            seed: 1,
        };
        let mut rng = SplitMix64(1);
        for _ in 0..50 {
            assert_eq!(sample(&logits, &s, &mut rng), 0);
        }
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
    }
}
