//! Shared-prefix K/V reuse: prompt tokens that requests have in common are computed once.
//!
//! Requests of one source repeat the same opening: the chat turn header, any system prompt,
//! instructions placed before the media. [`PrefixCache`] keeps the K/V of such a prefix
//! (every layer that owns a cache, full and sliding; KV-shared layers read their source
//! layer's cache) in a small LRU keyed by the token ids and the decoder's
//! [`TextModel::instance_id`]. A request whose prompt starts with a kept prefix starts from
//! a copy of its caches and prefills only the rest.
//!
//! **Same tokens.** Starting from a kept prefix is a chunked prefill with one more chunk
//! boundary, at the prefix end: the prefix rows saw exactly the keys they see in a whole
//! prompt (causal, window), and the copy holds what the request's own cache held at that
//! point, sliding layers included (a sliding cache keeps the last `W - 1` positions plus
//! slack, whatever the prefix length, and the copy keeps its first position). A prefix
//! never reaches a media placeholder (its K/V would depend on the media, and an image block
//! must not be split) and always leaves at least one prompt token to prefill (the first
//! answer token comes from the last prompt row's logits).
//!
//! **Which prefix, and the same answer whatever came before.** A request's prefix is its
//! own shareable part: everything before its first media placeholder (never the last prompt
//! token), when at least [`PrefixLimits::min_tokens`] long. With reuse on, every such request
//! prefills that part alone from an empty cache and then the rest, whether or not a copy is
//! kept, so its numbers (and a long greedy answer of a random test model, which any rounding
//! difference would change) never depend on what the process saw before: a resumed
//! recording, or one shard of a fleet, answers exactly as a single run does. The part is kept
//! (LRU) the second time it is seen, in this batch or among the last [`SEEN`] prompts, and
//! requests after that start from a copy of it.
//!
//! **Not reused: the overlap of consecutive caption windows.** A caption window's audio soft
//! tokens come from the audio tower over the whole clip (its conformer attends across the
//! clip, and its subsampling convolutions see the neighbouring frames), so the soft tokens
//! of the seconds two windows share differ between the windows, and so does every K/V row
//! from the first audio placeholder on. Reusing them would change the answer; only the text
//! before the audio is shared, which the rule above already covers.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use super::generate::{GenerateOptions, Request};
use super::multimodal::{embed_prompt, PlaceholderIds, SoftTokens};
use super::text::{LogitRows, Segment, SeqCache, TextModel};
use super::ModelError;

/// How many recent prompts a new prompt is compared with to find a shared prefix.
pub const SEEN: usize = 16;

/// Bounds of a [`PrefixCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixLimits {
    /// Kept prefixes (least recently used goes first).
    pub entries: usize,
    /// Allocated K/V bytes of all kept prefixes; the newest one is kept even alone above it.
    pub bytes: usize,
    /// Shortest prefix worth keeping, and the least a longer prefix must add to a kept one.
    pub min_tokens: usize,
}

impl Default for PrefixLimits {
    fn default() -> Self {
        Self {
            entries: 8,
            bytes: 256 << 20,
            min_tokens: 4,
        }
    }
}

/// Counters since the cache was made (or [`PrefixCache::reset_stats`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, serde::Serialize)]
pub struct PrefixStats {
    pub requests: u64,
    /// Prompt tokens of those requests.
    pub prompt_tokens: u64,
    /// Prompt tokens whose K/V came from a kept prefix (not computed for the request).
    pub reused_tokens: u64,
    /// Tokens computed to build kept prefixes (once per prefix, not per request).
    pub prefix_tokens: u64,
    pub prefixes_built: u64,
    pub evicted: u64,
}

impl PrefixStats {
    /// Prompt tokens the decoder computed per request: each request's own prefill plus the
    /// prefix builds, spread over all requests.
    pub fn computed_per_request(&self) -> f64 {
        if self.requests == 0 {
            return 0.0;
        }
        (self.prompt_tokens - self.reused_tokens + self.prefix_tokens) as f64 / self.requests as f64
    }
}

struct Entry {
    model: u64,
    ids: Vec<u32>,
    cache: SeqCache,
    bytes: usize,
}

struct Inner {
    enabled: bool,
    limits: PrefixLimits,
    /// Most recently used first.
    entries: Vec<Entry>,
    /// Shareable parts of recent prompts, newest first.
    seen: VecDeque<Vec<u32>>,
    stats: PrefixStats,
}

impl Inner {
    /// Index of the kept prefix that is exactly `ids` for `model`.
    fn exact(&self, model: u64, ids: &[u32]) -> Option<usize> {
        self.entries
            .iter()
            .position(|e| e.model == model && e.ids == ids)
    }

    fn insert(&mut self, e: Entry) {
        self.entries.insert(0, e);
        let mut total: usize = self.entries.iter().map(|e| e.bytes).sum();
        while self.entries.len() > 1
            && (self.entries.len() > self.limits.entries || total > self.limits.bytes)
        {
            if let Some(old) = self.entries.pop() {
                total -= old.bytes;
                self.stats.evicted += 1;
            }
        }
    }

    fn touch(&mut self, i: usize) {
        let e = self.entries.remove(i);
        self.entries.insert(0, e);
    }

    fn remember(&mut self, ids: &[u32]) {
        if ids.is_empty() {
            return;
        }
        self.seen.retain(|s| s.as_slice() != ids);
        self.seen.push_front(ids.to_vec());
        self.seen.truncate(SEEN);
    }
}

/// Where one request starts: its cache and how many prompt tokens that cache already holds.
pub struct Start {
    pub cache: SeqCache,
    /// Prompt positions the cache holds (the request prefills from there).
    pub held: usize,
    /// Of those, the positions copied from a kept prefix (not computed for this request).
    pub reused: usize,
}

/// Kept prompt prefixes of one model (see the module docs). Interior mutability, so
/// generation keeps taking `&self`; the lock is held for a whole batch's lookups and builds.
pub struct PrefixCache {
    inner: Mutex<Inner>,
}

impl Default for PrefixCache {
    fn default() -> Self {
        Self::new(PrefixLimits::default())
    }
}

impl PrefixCache {
    pub fn new(limits: PrefixLimits) -> Self {
        Self {
            inner: Mutex::new(Inner {
                enabled: true,
                limits,
                entries: Vec::new(),
                seen: VecDeque::new(),
                stats: PrefixStats::default(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state is a cache: whatever a panicking holder left is still a valid cache.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Turns reuse on or off (on by default). Off drops every kept prefix; the counters
    /// go on counting requests and prompt tokens, so an "off" run reports what it computed.
    pub fn set_enabled(&self, on: bool) {
        let mut g = self.lock();
        g.enabled = on;
        if !on {
            g.entries.clear();
            g.seen.clear();
        }
    }

    pub fn enabled(&self) -> bool {
        self.lock().enabled
    }

    pub fn stats(&self) -> PrefixStats {
        self.lock().stats
    }

    pub fn reset_stats(&self) {
        self.lock().stats = PrefixStats::default();
    }

    /// Kept prefixes: (token count, allocated K/V bytes), most recently used first.
    pub fn kept(&self) -> Vec<(usize, usize)> {
        self.lock()
            .entries
            .iter()
            .map(|e| (e.ids.len(), e.bytes))
            .collect()
    }

    /// The caches the requests start from, building the prefixes this batch shows to be
    /// shared. Requests must already be checked (non-empty, within the context).
    pub fn starts(
        &self,
        model: &TextModel,
        opts: &GenerateOptions,
        requests: &[Request],
    ) -> Result<Vec<Start>, ModelError> {
        let mut g = self.lock();
        g.stats.requests += requests.len() as u64;
        g.stats.prompt_tokens += requests
            .iter()
            .map(|r| r.input_ids.len() as u64)
            .sum::<u64>();
        if !g.enabled {
            return Ok(requests
                .iter()
                .map(|_| Start {
                    cache: model.new_cache(),
                    held: 0,
                    reused: 0,
                })
                .collect());
        }
        let id = model.instance_id();
        let own: Vec<&[u32]> = requests
            .iter()
            .map(|r| &r.input_ids[..shareable_len(&r.input_ids, &opts.placeholders)])
            .collect();
        let cuts: Vec<Vec<usize>> = own
            .iter()
            .map(|ids| boundaries(ids, opts.turn_start, g.limits.min_tokens))
            .collect();
        let mut out = Vec::with_capacity(requests.len());
        for (i, &ids) in own.iter().enumerate() {
            // The request's prompt splits at its own boundaries whatever was seen before, and
            // each part is prefilled onto the part before it: a kept copy and a fresh
            // computation hold the same values, so the answer never depends on history.
            let mut cache = None;
            let mut held = 0;
            let mut reused = 0;
            for &end in &cuts[i] {
                let part = &ids[..end];
                if let Some(e) = g.exact(id, part) {
                    g.touch(e);
                    cache = Some(g.entries[0].cache.deep_copy()?);
                    (held, reused) = (end, end);
                    continue;
                }
                let shared = own
                    .iter()
                    .enumerate()
                    .any(|(j, o)| j != i && o.starts_with(part))
                    || g.seen.iter().any(|s| s.starts_with(part));
                let base = match cache.take() {
                    Some(c) => c,
                    None => model.new_cache(),
                };
                let built = prefill_text(model, opts, base, &ids[held..end])?;
                if shared {
                    // Kept the second time it is seen; requests from here on copy it.
                    let kept = built.compacted()?;
                    let bytes = kept.bytes();
                    g.stats.prefix_tokens += (end - held) as u64;
                    g.stats.prefixes_built += 1;
                    g.insert(Entry {
                        model: id,
                        ids: part.to_vec(),
                        cache: kept,
                        bytes,
                    });
                    cache = Some(g.entries[0].cache.deep_copy()?);
                    reused = end;
                } else {
                    // Computed for this request alone: part of its own prefill.
                    cache = Some(built);
                }
                held = end;
            }
            g.remember(ids);
            g.stats.reused_tokens += reused as u64;
            out.push(Start {
                cache: cache.unwrap_or_else(|| model.new_cache()),
                held,
                reused,
            });
        }
        Ok(out)
    }
}

/// The longest part of a prompt that may be kept: up to the first media placeholder, and
/// never the last prompt token.
pub fn shareable_len(ids: &[u32], ph: &PlaceholderIds) -> usize {
    let media = ids
        .iter()
        .position(|&t| t == ph.image || t == ph.video || t == ph.audio)
        .unwrap_or(ids.len());
    media.min(ids.len().saturating_sub(1))
}

/// Where a request's prompt is split for reuse: before each chat turn that starts inside its
/// shareable part, and at the end of that part; parts shorter than `min_tokens` from the start
/// are not split off.
pub fn boundaries(shareable: &[u32], turn_start: Option<u32>, min_tokens: usize) -> Vec<usize> {
    let mut cuts: Vec<usize> = turn_start
        .map(|t| {
            shareable
                .iter()
                .enumerate()
                .filter(|&(p, &id)| id == t && p > 0)
                .map(|(p, _)| p)
                .collect()
        })
        .unwrap_or_default();
    cuts.push(shareable.len());
    cuts.retain(|&c| c >= min_tokens.max(1));
    cuts.dedup();
    cuts
}

/// Prefills text-only `ids` onto `cache`, in chunks of `opts.prefill_chunk`, without logits.
fn prefill_text(
    model: &TextModel,
    opts: &GenerateOptions,
    mut cache: SeqCache,
    ids: &[u32],
) -> Result<SeqCache, ModelError> {
    let pe = embed_prompt(model, ids, &SoftTokens::default(), &opts.placeholders)?;
    let chunk = opts.prefill_chunk.max(1);
    let mut done = 0;
    while done < ids.len() {
        let n = chunk.min(ids.len() - done);
        let embeds = pe.embeds.narrow(0, done, n)?;
        let ple = pe.ple.as_ref().map(|p| p.narrow(0, done, n)).transpose()?;
        let mut segs = [Segment {
            cache: &mut cache,
            len: n,
            logits: LogitRows::None,
            block_ids: None,
        }];
        model.forward(&embeds, ple.as_ref(), &mut segs)?;
        done += n;
    }
    Ok(cache)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ph() -> PlaceholderIds {
        PlaceholderIds {
            image: 100,
            video: 101,
            audio: 102,
            pad: 0,
        }
    }

    #[test]
    fn the_shareable_part_stops_at_media_and_before_the_last_token() {
        assert_eq!(shareable_len(&[5, 6, 7, 100, 100, 8], &ph()), 3);
        assert_eq!(shareable_len(&[5, 6, 102, 7], &ph()), 2);
        assert_eq!(shareable_len(&[5, 6, 7, 8], &ph()), 3);
        assert_eq!(shareable_len(&[100, 5], &ph()), 0);
        assert_eq!(shareable_len(&[5], &ph()), 0);
        assert_eq!(shareable_len(&[], &ph()), 0);
    }

    #[test]
    fn per_request_figure_charges_prefix_builds() {
        let s = PrefixStats {
            requests: 4,
            prompt_tokens: 400,
            reused_tokens: 120,
            prefix_tokens: 40,
            ..PrefixStats::default()
        };
        assert_eq!(s.computed_per_request(), 80.0);
    }
}
