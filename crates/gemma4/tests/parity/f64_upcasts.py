"""Keeps a Gemma 4 reference model in float64 where transformers 5.24 hard-codes float32.

Loaded with dtype=float64, the 5.24 Gemma 4 models (gemma4 and gemma4_unified) still compute
every RMSNorm (decoder norms, q/k/v norms, PLE and multimodal pre-projection norms), the
eager attention softmax and the RoPE angles and their cos/sin in float32. Those roundings
move the logits of the tiny fixtures by 1e-4..8e-4, and percept's float32 roundings in the
same places differ from torch's (other reduction orders, other exp/cos), so comparing two
such half-float64 runs measures float32 noise, not the port. `keep_float64` makes the three
stay in float64 for float64 inputs; float32 inputs take the original code unchanged (the
float32 towers that golden_f64.py runs beside the float64 decoder). percept loaded in
float64 does the same. The RoPE frequencies stay the float32 constants the model is built
with; only the angles and their cos/sin are float64.
"""

from types import ModuleType

import torch


def keep_float64(modeling: ModuleType, norm_cls: type, rope_cls: type) -> None:
    """Patches `norm_cls.forward`, `modeling.eager_attention_forward` and `rope_cls.forward`."""
    norm_f32, attention_f32, rope_f32 = norm_cls.forward, modeling.eager_attention_forward, rope_cls.forward
    f64 = torch.float64

    def rms_norm(self, x):
        if x.dtype != f64:
            return norm_f32(self, x)
        y = x * torch.pow(x.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        return y * self.weight.to(f64) if self.with_scale else y

    def eager_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kw):
        if query.dtype != f64:
            return attention_f32(module, query, key, value, attention_mask, dropout, scaling, softcap, **kw)
        groups = module.num_key_value_groups
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
        scores = query @ key.transpose(2, 3) * (module.head_dim**-0.5 if scaling is None else scaling)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = torch.softmax(scores, dim=-1)
        return (probs @ value).transpose(1, 2).contiguous(), probs

    def rope(self, x, position_ids, layer_type):
        if x.dtype != f64:
            return rope_f32(self, x, position_ids, layer_type)
        inv_freq = getattr(self, f"{layer_type}_inv_freq").to(x.device, f64)
        angles = position_ids[..., None].to(f64) * inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        scale = getattr(self, f"{layer_type}_attention_scaling")
        return angles.cos() * scale, angles.sin() * scale

    norm_cls.forward = rms_norm
    modeling.eager_attention_forward = eager_attention
    rope_cls.forward = rope
