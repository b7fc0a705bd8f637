//! Attention of one layer for a ragged batch: RoPE tables per layer type, the sliding /
//! full / bidirectional-vision masks, and scores computed in blocks against each sequence's
//! cache.

use super::*;

impl TextModel {
    /// cos/sin `[rows, head_dim]` for a layer spec at the given positions. The frequencies are
    /// the reference's f32 constants; angles and cos/sin are f32 like the reference, or f64
    /// for an f64 model (see [`upcast_dtype`]).
    pub(super) fn rope_tables(
        &self,
        spec: &LayerSpec,
        positions: &[usize],
    ) -> CResult<(Tensor, Tensor)> {
        let hd = spec.head_dim;
        let half = hd / 2;
        let theta = spec.rope.rope_theta;
        let factor = spec.rope.factor.unwrap_or(1.0);
        let inv: Vec<f64> = if spec.rope.rope_type == "proportional" {
            let prf = spec.rope.partial_rotary_factor.unwrap_or(1.0);
            let angles = ((prf * hd as f64) / 2.0).floor() as usize;
            (0..half)
                .map(|i| {
                    if i < angles {
                        // f32 like torch: base ** (arange(0, 2a, 2).float() / head_dim)
                        let e = ((2 * i) as f32 / hd as f32) as f64;
                        (1.0 / (theta as f32).powf(e as f32)) as f64 / factor
                    } else {
                        0.0
                    }
                })
                .collect()
        } else {
            (0..half)
                .map(|i| {
                    let e = (2 * i) as f32 / hd as f32;
                    (1.0 / (theta as f32).powf(e)) as f64 / factor
                })
                .collect()
        };
        let n = positions.len();
        let mut cos = Vec::with_capacity(n * hd);
        let mut sin = Vec::with_capacity(n * hd);
        let exact = upcast_dtype(self.dtype) == DType::F64;
        for &p in positions {
            for _ in 0..2 {
                for f in &inv {
                    let f = *f as f32;
                    let (c, s) = if exact {
                        let a = p as f64 * f as f64;
                        (a.cos(), a.sin())
                    } else {
                        let a = (p as f32) * f;
                        (a.cos() as f64, a.sin() as f64)
                    };
                    cos.push(c);
                    sin.push(s);
                }
            }
        }
        let cos = Tensor::from_vec(cos, (n, hd), &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (n, hd), &self.device)?.to_dtype(self.dtype)?;
        Ok((cos, sin))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention(
        &self,
        layer: &DecoderLayer,
        li: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        segments: &mut [Segment<'_>],
        rows: &[QueryRows],
        produced: &mut [Option<Vec<KvView>>],
    ) -> CResult<Tensor> {
        let a = &layer.attn;
        let spec = &a.spec;
        let t = x.dim(0)?;
        let hd = spec.head_dim;
        let nh = a.num_heads;
        let nkv = spec.num_kv_heads;
        let q = a.q_proj.forward(x)?.reshape((t, nh, hd))?;
        let q = a.q_norm.forward(&q)?;
        let q = apply_rope(&q, cos, sin)?;
        let kv_views: Vec<KvView> = match spec.kv {
            KvSource::Shared(src) => match &produced[src] {
                Some(v) => v.clone(),
                None => candle_core::bail!("layer {li} shares K/V of layer {src}, not computed"),
            },
            KvSource::Own => {
                let (Some(kp), Some(kn)) = (&a.k_proj, &a.k_norm) else {
                    candle_core::bail!("layer {li} has no k_proj");
                };
                let k_raw = kp.forward(x)?.reshape((t, nkv, hd))?;
                let v_raw = match &a.v_proj {
                    Some(vp) => vp.forward(x)?.reshape((t, nkv, hd))?,
                    // K=V: values are the raw key projection, before k-norm and RoPE.
                    None => k_raw.clone(),
                };
                let k = apply_rope(&kn.forward(&k_raw)?, cos, sin)?;
                let v = a.v_norm.forward(&v_raw)?;
                let mut views = Vec::with_capacity(segments.len());
                for (s, r) in segments.iter_mut().zip(rows.iter()) {
                    let n = r.positions.len();
                    let ks = k.narrow(0, r.start, n)?.transpose(0, 1)?;
                    let vs = v.narrow(0, r.start, n)?.transpose(0, 1)?;
                    let cache = match s.cache.layers.get_mut(li).and_then(|c| c.as_mut()) {
                        Some(c) => c,
                        None => candle_core::bail!("sequence cache has no slot for layer {li}"),
                    };
                    views.push(cache.append(&ks, &vs)?);
                }
                views
            }
        };
        let mut outs = Vec::with_capacity(rows.len());
        let groups = nh / nkv;
        for ((s, r), (kv_k, kv_v, first_pos)) in
            segments.iter().zip(rows.iter()).zip(kv_views.iter())
        {
            let lq = r.positions.len();
            let lk = kv_k.dim(1)?;
            // Query rows in blocks whose f32 scores stay within score_block_bytes: a long
            // prompt's 1024-row chunk against 7,000 cached keys is 470 MB of scores per
            // layer, held two or three times over (mask added, softmax), on a model that
            // must fit in 11 GB.
            let block = (self.score_block_bytes / (nh * lk.max(1) * 4)).max(1);
            let block_ids = match self.vision_mask {
                VisionMask::Causal => None,
                VisionMask::WindowedBlock => (spec.layer_type == LayerType::SlidingAttention)
                    .then_some(s.block_ids.as_deref())
                    .flatten(),
                VisionMask::BlockEverywhere => s.block_ids.as_deref(),
            };
            for b0 in (0..lq).step_by(block) {
                let n = block.min(lq - b0);
                let qs = q
                    .narrow(0, r.start + b0, n)?
                    .transpose(0, 1)?
                    .contiguous()?
                    .reshape((nkv, groups * n, hd))?;
                let scores = qs.matmul(&kv_k.t()?)?; // scaling = 1.0
                let scores = scores
                    .to_dtype(upcast_dtype(scores.dtype()))?
                    .reshape((nkv, groups, n, lk))?;
                let scores = match build_mask(
                    &r.positions[b0..b0 + n],
                    *first_pos,
                    lk,
                    spec.sliding_window,
                    block_ids,
                    self.vision_mask == VisionMask::BlockEverywhere,
                    s.cache.pos,
                    &self.device,
                )? {
                    Some(m) => scores.broadcast_add(&m.to_dtype(scores.dtype())?)?,
                    None => scores,
                };
                let probs = candle_nn::ops::softmax_last_dim(&scores)?
                    .to_dtype(kv_v.dtype())?
                    .reshape((nkv, groups * n, lk))?;
                let o = probs.matmul(kv_v)?; // [nkv, g*n, hd]
                let o = o
                    .reshape((nh, n, hd))?
                    .transpose(0, 1)?
                    .reshape((n, nh * hd))?;
                outs.push(o);
            }
        }
        if matches!(spec.kv, KvSource::Own) {
            produced[li] = Some(kv_views);
        }
        let o = if outs.len() == 1 {
            outs.pop()
                .ok_or_else(|| candle_core::Error::Msg("no rows".into()))?
        } else {
            Tensor::cat(&outs, 0)?
        };
        a.o_proj.forward(&o.to_dtype(x.dtype())?)
    }
}

/// Most bytes of f32 attention scores one block of query rows may take by default (see
/// `TextModel::attention`); decode steps and short prompts are one block.
pub(super) const SCORE_BLOCK_BYTES: usize = 64 << 20;

/// `x * cos + rotate_half(x) * sin` for `x: [rows, heads, hd]`, `cos/sin: [rows, hd]`.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> CResult<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let half = hd / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let cos = cos.unsqueeze(1)?;
    let sin = sin.unsqueeze(1)?;
    x.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?
}

/// Additive mask `[lq, lk]` (0 or -inf), None when nothing is masked.
///
/// Keys hold positions `first_pos..first_pos+lk`. A key is visible iff it is not in the
/// future (`k <= q`) and, on sliding layers, inside the window (`k > q - W`, so exactly W
/// keys). With vision block ids, keys of the same image block are visible in both
/// directions: still subject to the window's left edge (`create_masks_for_vision_model`), or,
/// with `block_beyond_window`, regardless of the window (`Gemma4UnifiedModel`'s default
/// masks: `OR(sliding causal, same block)`).
/// `seg_start` is the position of the segment's first row; block ids index rows from it
/// (keys from earlier calls count as non-vision: callers never split a vision block).
#[allow(clippy::too_many_arguments)]
pub fn build_mask(
    q_positions: &[usize],
    first_pos: usize,
    lk: usize,
    window: Option<usize>,
    block_ids: Option<&[i64]>,
    block_beyond_window: bool,
    seg_start: usize,
    device: &Device,
) -> CResult<Option<Tensor>> {
    let lq = q_positions.len();
    let mut m = vec![0f32; lq * lk];
    let mut any = false;
    let block_of = |p: usize| -> i64 {
        match block_ids {
            Some(b) => {
                let base = seg_start;
                if p >= base && p - base < b.len() {
                    b[p - base]
                } else {
                    -1
                }
            }
            None => -1,
        }
    };
    for (i, &qp) in q_positions.iter().enumerate() {
        let qb = block_of(qp);
        for j in 0..lk {
            let kp = first_pos + j;
            let causal = kp <= qp;
            let same_block = qb >= 0 && block_of(kp) == qb;
            let in_window = match window {
                Some(w) => kp + w > qp,
                None => true,
            };
            let visible = if block_beyond_window {
                (in_window && causal) || same_block
            } else {
                in_window && (causal || same_block)
            };
            if !visible {
                m[i * lk + j] = f32::NEG_INFINITY;
                any = true;
            }
        }
    }
    if !any {
        return Ok(None);
    }
    Ok(Some(Tensor::from_vec(m, (lq, lk), device)?))
}
