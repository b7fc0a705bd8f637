//! The decoder's K/V caches: one [`LayerCache`] per layer that owns one (KV-shared layers read
//! their source layer's), bundled per sequence in a [`SeqCache`] with its position.

use candle_core::{Result as CResult, Tensor};

/// Positions a sliding layer's cache holds beyond its window `w` before it compacts: a
/// quarter window (256 on the 12B), at least 4. Was W (a 2W buffer from the first token
/// on: 1.3 GB of f32 keys/values on the 12B's 40 sliding layers even for a 150-token
/// prompt); a quarter keeps the compaction copy (W-1 rows) to one per W/4 decoded tokens.
pub fn sliding_slack(w: usize) -> usize {
    (w / 4).max(4)
}

/// One layer's K/V cache for one sequence: `[kv_heads, capacity, head_dim]` buffers holding
/// positions `first_pos .. first_pos + len`.
///
/// Sliding layers keep at most `window - 1` past keys between calls (the query itself is the
/// W-th key), compacting when the buffer fills, so their memory is bounded by the window plus
/// [`sliding_slack`] (or one chunk). All layers grow by doubling; full layers up to `max_len`.
#[derive(Debug, Clone)]
pub struct LayerCache {
    pub(super) k: Option<Tensor>,
    pub(super) v: Option<Tensor>,
    pub(super) len: usize,
    pub(super) first_pos: usize,
    pub(super) window: Option<usize>,
    pub(super) max_len: usize,
}

impl LayerCache {
    pub(super) fn new(window: Option<usize>, max_len: usize) -> Self {
        Self {
            k: None,
            v: None,
            len: 0,
            first_pos: 0,
            window,
            max_len,
        }
    }

    /// Number of positions currently held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// An independent copy. `Clone` shares the K/V storage, and `append` writes into it in
    /// place, so a clone and its original would overwrite each other's next positions; a
    /// copy keeps the same capacity, length and first position, so it continues exactly as
    /// the original would.
    pub fn deep_copy(&self) -> CResult<Self> {
        Ok(Self {
            k: self.k.as_ref().map(Tensor::copy).transpose()?,
            v: self.v.as_ref().map(Tensor::copy).transpose()?,
            ..*self
        })
    }

    /// An independent copy whose buffers hold just the positions held (no spare capacity):
    /// what a kept prompt prefix stores. A cache copied from it grows on its first append
    /// like any cache that ran out of room.
    pub fn compacted(&self) -> CResult<Self> {
        let trim = |t: &Option<Tensor>| -> CResult<Option<Tensor>> {
            match t {
                Some(t) if self.len > 0 => {
                    // A fresh buffer: `copy` of a view clones its whole storage.
                    let (kvh, _, hd) = t.dims3()?;
                    let buf = Tensor::zeros((kvh, self.len, hd), t.dtype(), t.device())?;
                    buf.slice_set(&t.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                    Ok(Some(buf))
                }
                _ => Ok(None),
            }
        };
        Ok(Self {
            k: trim(&self.k)?,
            v: trim(&self.v)?,
            ..*self
        })
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Allocated key+value bytes.
    pub fn capacity_bytes(&self) -> usize {
        self.k
            .as_ref()
            .map(|k| 2 * k.elem_count() * k.dtype().size_in_bytes())
            .unwrap_or(0)
    }

    /// Appends `[kv, n, hd]` keys/values and returns views over everything held.
    pub(super) fn append(
        &mut self,
        k_new: &Tensor,
        v_new: &Tensor,
    ) -> CResult<(Tensor, Tensor, usize)> {
        let (kvh, n, hd) = k_new.dims3()?;
        let needed = self.len + n;
        let cap = self.k.as_ref().map(|k| k.dims()[1]).unwrap_or(0);
        if needed > cap {
            let (keep, new_cap) = match self.window {
                // Short sequences grow the buffer like a full layer, up to W + slack.
                Some(w) if needed <= w + sliding_slack(w) => {
                    let mut c = cap.max(64);
                    while c < needed {
                        c *= 2;
                    }
                    (self.len, c.min(w + sliding_slack(w)))
                }
                Some(w) => {
                    // Only the last W-1 past keys can still be seen by later queries; they
                    // move to the front and the slack takes the next appends, so the copy
                    // comes once per `sliding_slack(w)` decoded tokens.
                    let keep = self.len.min(w.saturating_sub(1));
                    (keep, (w + sliding_slack(w)).max(keep + n))
                }
                None => {
                    if needed > self.max_len {
                        candle_core::bail!(
                            "context of {needed} positions exceeds the configured maximum of {}",
                            self.max_len
                        );
                    }
                    let mut c = cap.max(64);
                    while c < needed {
                        c *= 2;
                    }
                    (self.len, c.min(self.max_len))
                }
            };
            let dev = k_new.device();
            let dt = k_new.dtype();
            let k_buf = Tensor::zeros((kvh, new_cap, hd), dt, dev)?;
            let v_buf = Tensor::zeros((kvh, new_cap, hd), dt, dev)?;
            if keep > 0 {
                if let (Some(k), Some(v)) = (&self.k, &self.v) {
                    let from = self.len - keep;
                    k_buf.slice_set(&k.narrow(1, from, keep)?.contiguous()?, 1, 0)?;
                    v_buf.slice_set(&v.narrow(1, from, keep)?.contiguous()?, 1, 0)?;
                }
            }
            self.first_pos += self.len - keep;
            self.len = keep;
            self.k = Some(k_buf);
            self.v = Some(v_buf);
        }
        let (k, v) = match (&self.k, &self.v) {
            (Some(k), Some(v)) => (k, v),
            _ => candle_core::bail!("kv cache buffer missing"),
        };
        k.slice_set(&k_new.contiguous()?, 1, self.len)?;
        v.slice_set(&v_new.contiguous()?, 1, self.len)?;
        self.len += n;
        Ok((
            k.narrow(1, 0, self.len)?,
            v.narrow(1, 0, self.len)?,
            self.first_pos,
        ))
    }
}

/// All caches of one sequence plus its position.
#[derive(Debug, Clone)]
pub struct SeqCache {
    pub(super) layers: Vec<Option<LayerCache>>,
    /// Positions consumed so far (the next token's position).
    pub pos: usize,
}

impl SeqCache {
    /// Total allocated K/V bytes.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(LayerCache::capacity_bytes)
            .sum()
    }

    /// Positions held by layer `i`'s own cache (None for KV-shared layers).
    pub fn layer_len(&self, i: usize) -> Option<usize> {
        self.layers.get(i).and_then(|c| c.as_ref().map(|c| c.len()))
    }

    /// An independent copy of every layer's cache (see [`LayerCache::deep_copy`]): what a
    /// request starts from when it reuses a kept prompt prefix.
    pub fn deep_copy(&self) -> CResult<SeqCache> {
        let layers = self
            .layers
            .iter()
            .map(|c| c.as_ref().map(LayerCache::deep_copy).transpose())
            .collect::<CResult<Vec<_>>>()?;
        Ok(SeqCache {
            layers,
            pos: self.pos,
        })
    }

    /// [`SeqCache::deep_copy`] without spare capacity (see [`LayerCache::compacted`]).
    pub fn compacted(&self) -> CResult<SeqCache> {
        let layers = self
            .layers
            .iter()
            .map(|c| c.as_ref().map(LayerCache::compacted).transpose())
            .collect::<CResult<Vec<_>>>()?;
        Ok(SeqCache {
            layers,
            pos: self.pos,
        })
    }
}
