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
//! **Which prefix.** Requests carry no "this is the system prompt" marker, so the prefix is
//! read from the prompts: the longest run before the first media placeholder that a request
//! shares with another request of its batch or with one of the last [`SEEN`] prompts. A
//! prefix is built the second time it is seen (one extra forward over it, which the request
//! that sees it second then does not prefill) and used from then on.
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
    /// Index of the longest kept prefix of `ids` for `model`.
    fn longest(&self, model: u64, ids: &[u32]) -> Option<usize> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.model == model && ids.starts_with(&e.ids))
            .max_by_key(|(_, e)| e.ids.len())
            .map(|(i, _)| i)
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
                    reused: 0,
                })
                .collect());
        }
        let id = model.instance_id();
        let own: Vec<&[u32]> = requests
            .iter()
            .map(|r| &r.input_ids[..shareable_len(&r.input_ids, &opts.placeholders)])
            .collect();
        // Prefixes to build: what a request shares with the others or with a recent prompt,
        // when that is longer than what is kept for it by at least `min_tokens`.
        let mut builds: Vec<&[u32]> = Vec::new();
        for (i, ids) in own.iter().enumerate() {
            let kept = g.longest(id, ids).map(|e| g.entries[e].ids.len());
            let shared = own
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .map(|(_, o)| common_len(ids, o))
                .chain(g.seen.iter().map(|s| common_len(ids, s)))
                .max()
                .unwrap_or(0);
            if shared >= kept.unwrap_or(0) + g.limits.min_tokens {
                builds.push(&ids[..shared]);
            }
        }
        // Shortest first, so a longer prefix extends a shorter one built just before it.
        builds.sort_by_key(|b| b.len());
        builds.dedup();
        for ids in builds {
            let base = g.longest(id, ids);
            let (cache, from) = match base {
                Some(e) if g.entries[e].ids.len() == ids.len() => continue,
                Some(e) => (g.entries[e].cache.deep_copy()?, g.entries[e].ids.len()),
                None => (model.new_cache(), 0),
            };
            // Kept without the spare rows a live cache allocates (at least 64 per layer:
            // 42 MiB of f32 K/V on the 12B's layers for a 6-token prefix).
            let cache = prefill_text(model, opts, cache, &ids[from..])?.compacted()?;
            g.stats.prefix_tokens += (ids.len() - from) as u64;
            g.stats.prefixes_built += 1;
            let bytes = cache.bytes();
            g.insert(Entry {
                model: id,
                ids: ids.to_vec(),
                cache,
                bytes,
            });
        }
        let mut out = Vec::with_capacity(requests.len());
        for ids in &own {
            g.remember(ids);
            match g.longest(id, ids) {
                Some(e) => {
                    g.touch(e);
                    let hit = &g.entries[0];
                    let reused = hit.ids.len();
                    out.push(Start {
                        cache: hit.cache.deep_copy()?,
                        reused,
                    });
                    g.stats.reused_tokens += reused as u64;
                }
                None => out.push(Start {
                    cache: model.new_cache(),
                    reused: 0,
                }),
            }
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

/// Length of the common start of `a` and `b`.
pub fn common_len(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
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
    fn common_len_counts_the_shared_start() {
        assert_eq!(common_len(&[1, 2, 3], &[1, 2, 4]), 2);
        assert_eq!(common_len(&[1, 2], &[1, 2, 3]), 2);
        assert_eq!(common_len(&[9], &[1]), 0);
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
