#!/usr/bin/env python3
"""Build the Gemma 4 (E2B/E4B family) golden parity fixture from the reference.

The reference is Hugging Face transformers 5.24.0 (see requirements.txt). The script
builds a tiny, seeded, random `Gemma4ForConditionalGeneration` from a hand-written
config, saves it in the official checkpoint layout, runs the reference processor and
model on a generated image and WAV, and writes everything the Rust port must
reproduce to tests/fixtures/gemma4/. CI never runs this; run it by hand (README.md).

Choices that matter to the Rust side (also in cases.json):
- Vocabulary of 512. The multimodal special tokens, whose real ids are > 255999, are
  remapped to 500..506 (config.json and tokenizer.json agree); <pad>=0, <eos>=1,
  <bos>=2, <|turn>=105, <turn|>=106, "\\n"=107 keep their real ids.
- Weights are stored in bfloat16 (the official dtype); the reference ran in float32
  on exactly those bf16 values, with eager attention.
- Norm weights, layer_scalar, clip bounds, std_bias/std_scale, per_dim_scale and the
  vision position table are re-randomised, so a port that ignores one of them fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import wave
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

import transformers
from transformers import (
    Gemma4AudioFeatureExtractor,
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4ImageProcessorPil,
    Gemma4Processor,
    PreTrainedTokenizerFast,
)
from transformers.models.gemma4.modeling_gemma4 import Gemma4ClippableLinear, Gemma4RMSNorm

SEED = 2
REPO = Path(__file__).resolve().parents[2]
CHAT_TEMPLATE = Path("/work/shared/reference/gemma4_chat_template.jinja")

VOCAB_SIZE = 256
# Real Gemma 4 ids are kept where they are small; the multimodal ones are remapped
# (real ids in the comments), keeping their relative order.
SPECIAL_IDS = {
    "<pad>": 0,
    "<eos>": 1,
    "<bos>": 2,
    "<unk>": 3,
    "<mask>": 4,
    # Tool tokens: real ids unknown here, placed in the reserved range.
    "<|tool>": 46,
    "<tool|>": 47,
    "<|tool_call>": 48,
    "<tool_call|>": 49,
    "<|tool_response>": 50,
    "<tool_response|>": 51,
    '<|"|>': 52,
    "<|think|>": 98,
    "<|channel>": 100,
    "<channel|>": 101,
    "<|turn>": 105,
    "<turn|>": 106,
    "<|image>": 248,  # boi, real 255999
    "<|audio>": 249,  # boa, real 256000
    "<|image|>": 250,  # image soft token, real 258880
    "<|audio|>": 251,  # audio soft token, real 258881
    "<image|>": 252,  # eoi, real 258882
    "<audio|>": 253,  # eoa, real 258883
    "<|video|>": 254,  # video soft token, real 258884
}
NEWLINE_ID = 107
FIRST_FREE = 108  # "\u2581" and printable ASCII from here, then learned merges up to LAST_FREE
LAST_FREE = 247

TEXT_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    vocab_size_per_layer_input=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=64,  # KV-shared layers get 128 (use_double_wide_mlp)
    num_hidden_layers=6,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=32,
    global_head_dim=64,
    num_global_key_value_heads=1,
    attention_k_eq_v=True,
    sliding_window=8,
    layer_types=[
        "sliding_attention",
        "sliding_attention",
        "full_attention",
        "sliding_attention",
        "sliding_attention",
        "full_attention",
    ],
    hidden_size_per_layer_input=8,
    num_kv_shared_layers=2,
    use_double_wide_mlp=True,
    final_logit_softcapping=30.0,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=1,
)
VISION_CONFIG = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    patch_size=16,
    pooling_kernel_size=3,
    position_embedding_size=64,
    use_clipped_linears=True,
    standardize=True,
)
AUDIO_CONFIG = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    # channels[0] must equal the mel bin count (128): the reference sizes the input
    # projection as (channels[0] // 4) * channels[1], i.e. it uses channels[0] in place
    # of feature_size (they coincide in the real checkpoints).
    subsampling_conv_channels=[128, 8],
    conv_kernel_size=5,
    output_proj_dims=48,
    attention_chunk_size=12,
    attention_context_left=13,
    attention_context_right=0,
)
MM_IDS = dict(
    boi_token_id=SPECIAL_IDS["<|image>"],
    eoi_token_id=SPECIAL_IDS["<image|>"],
    image_token_id=SPECIAL_IDS["<|image|>"],
    video_token_id=SPECIAL_IDS["<|video|>"],
    boa_token_id=SPECIAL_IDS["<|audio>"],
    eoa_token_index=SPECIAL_IDS["<audio|>"],
    audio_token_id=SPECIAL_IDS["<|audio|>"],
)
IMAGE_BUDGET = 70  # soft tokens for the model cases (smallest supported budget)
NEW_TOKENS = 12
EMBED_STD = 0.1
MIN_GAP = 0.02
DEBUG_CASES = ("text", "image_audio")  # cases that also store intermediate tensors

CORPUS = [
    "user",
    "model",
    "system",
    "thought",
    "Describe the weather in Paris today.",
    "What is in this image?",
    "Transcribe this audio.",
    "Describe the picture and the sound.",
    "Write a haiku about the sea.",
    "Hi!",
    "The quick brown fox jumps over the lazy dog while the sun sets behind the old stone "
    "bridge and the river carries small boats past the quiet market square.",
]

PROMPTS = {
    "text": [{"role": "user", "content": [{"type": "text", "text": "Describe the weather in Paris today."}]}],
    "image": [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}],
        }
    ],
    "audio": [
        {
            "role": "user",
            "content": [{"type": "audio"}, {"type": "text", "text": "Transcribe this audio."}],
        }
    ],
    "image_audio": [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "audio"},
                {"type": "text", "text": "Describe the picture and the sound."},
            ],
        }
    ],
    "long": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "The quick brown fox jumps over the lazy dog."}]},
    ],
}
BATCH_PROMPTS = [
    [{"role": "user", "content": [{"type": "text", "text": "Hi!"}]}],
    [{"role": "user", "content": [{"type": "text", "text": "Write a haiku about the sea."}]}],
]


# ---------------------------------------------------------------- tokenizer


def learn_merges(words: list[str], budget: int) -> list[tuple[str, str]]:
    """Tiny deterministic BPE learner: most frequent pair first, ties by string."""
    seqs = [list(w) for w in words]
    merges = []
    for _ in range(budget):
        counts: dict[tuple[str, str], int] = {}
        for s in seqs:
            for a, b in zip(s, s[1:]):
                counts[(a, b)] = counts.get((a, b), 0) + 1
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))
        if counts[pair] < 2:
            break
        merges.append(pair)
        for i, s in enumerate(seqs):
            out, j = [], 0
            while j < len(s):
                if j + 1 < len(s) and (s[j], s[j + 1]) == pair:
                    out.append(s[j] + s[j + 1])
                    j += 2
                else:
                    out.append(s[j])
                    j += 1
            seqs[i] = out
    return merges


def build_tokenizer(out_dir: Path) -> PreTrainedTokenizerFast:
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    vocab: dict[str, int] = {}
    for tok, idx in SPECIAL_IDS.items():
        vocab[tok] = idx
    for idx in range(VOCAB_SIZE):
        if idx in vocab.values():
            continue
        if idx < FIRST_FREE and idx != NEWLINE_ID:
            vocab[f"<unused{idx}>"] = idx
    vocab["\n"] = NEWLINE_ID
    next_id = FIRST_FREE
    chars = ["\u2581"] + [chr(c) for c in range(33, 127)]
    for ch in chars:
        vocab[ch] = next_id
        next_id += 1
    words = ["\u2581" + w for text in CORPUS for w in text.split(" ")]
    merges = learn_merges(words, LAST_FREE + 1 - next_id)
    for a, b in merges:
        vocab[a + b] = next_id
        next_id += 1
    # Fill the rest (up to the remapped specials) with unused tokens.
    for idx in range(next_id, VOCAB_SIZE):
        if idx not in vocab.values():
            vocab[f"<unused{idx}>"] = idx
    assert sorted(vocab.values()) == list(range(VOCAB_SIZE)), "vocab ids must be dense"

    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=False, fuse_unk=True)
    )
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.Fuse()]
    )
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, _ in sorted(SPECIAL_IDS.items(), key=lambda x: x[1])]
    )
    for t, idx in SPECIAL_IDS.items():
        assert tok.token_to_id(t) == idx, (t, tok.token_to_id(t), idx)

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        padding_side="left",
        extra_special_tokens={
            "image_token": "<|image|>",
            "boi_token": "<|image>",
            "eoi_token": "<image|>",
            "audio_token": "<|audio|>",
            "boa_token": "<|audio>",
            "eoa_token": "<audio|>",
        },
    )
    return hf_tok


# ---------------------------------------------------------------- inputs


def make_image(path: Path) -> None:
    """96 rows x 128 columns RGB: smooth gradient plus a few flat shapes."""
    h, w = 96, 128
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 255.0 * x / (w - 1)
    g = 255.0 * y / (h - 1)
    b = 127.5 + 127.5 * np.sin(2 * math.pi * (x + y) / 64.0)
    arr = np.stack([r, g, b], axis=-1).round().clip(0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(img)
    d.rectangle([10, 12, 45, 40], fill=(250, 20, 30))
    d.ellipse([70, 50, 115, 88], fill=(20, 40, 230))
    d.line([0, 95, 127, 0], fill=(255, 255, 255), width=3)
    d.polygon([(60, 8), (80, 40), (40, 40)], fill=(10, 200, 40))
    img.save(path, format="PNG")


def make_wav(path: Path, rng: np.random.Generator) -> None:
    """1.2 s, 16 kHz, mono, int16: 440 Hz tone, a 600->2400 Hz chirp, white noise."""
    sr, n = 16000, 19200
    t = np.arange(n) / sr
    tone = 0.35 * np.sin(2 * np.pi * 440.0 * t)
    chirp = 0.2 * np.sin(2 * np.pi * (600.0 * t + 0.5 * (1800.0 / 1.2) * t * t))
    noise = 0.05 * rng.standard_normal(n)
    env = np.minimum(1.0, np.minimum(t / 0.05, (1.2 - t) / 0.05))
    x = (tone + chirp + noise) * env
    pcm = np.clip(np.round(x * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sr)
        f.writeframes(pcm.tobytes())


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as f:
        assert f.getnchannels() == 1 and f.getsampwidth() == 2 and f.getframerate() == 16000
        pcm = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
    return pcm.astype(np.float32) / 32768.0


class Gemma4ProcessorNoVideo(Gemma4Processor):
    """Gemma4Processor without a video processor (that one needs torchvision)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)

    def save_pretrained(self, save_directory, **kwargs):
        # Save as the real class, minus the missing video processor.
        cls = type(self)
        orig = Gemma4Processor.get_attributes.__func__
        cls.get_attributes = classmethod(lambda c: [a for a in orig(c) if a != "video_processor"])
        try:
            return super().save_pretrained(save_directory, **kwargs)
        finally:
            del cls.get_attributes


# ---------------------------------------------------------------- model


def build_config() -> Gemma4Config:
    cfg = Gemma4Config(
        text_config=dict(TEXT_CONFIG),
        vision_config=dict(VISION_CONFIG),
        audio_config=dict(AUDIO_CONFIG),
        **MM_IDS,
    )
    cfg._attn_implementation = "eager"
    return cfg


@torch.no_grad()
def randomise(model: Gemma4ForConditionalGeneration, gen: torch.Generator) -> None:
    """Weights with unit-variance outputs; every scale-like tensor moved off its init."""

    def normal(shape, std):
        return torch.randn(shape, generator=gen) * std

    def uniform(shape, lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=gen)

    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if name.endswith("embed_tokens.weight"):
            # Small, so the residual stream is not just the current token (which makes a
            # random tied model repeat its last input token forever).
            p.copy_(normal(p.shape, EMBED_STD))
        elif name.endswith("embed_tokens_per_layer.weight"):
            p.copy_(normal(p.shape, 1.0))
        elif name.endswith("position_embedding_table"):
            p.copy_(normal(p.shape, 0.5))
        elif name.endswith("per_dim_scale"):
            p.copy_(normal(p.shape, 0.5))
        elif p.dim() == 1:  # norm weights, biases
            if "norm" in name:
                p.copy_(uniform(p.shape, 0.5, 1.5))
            else:
                p.copy_(normal(p.shape, 0.1))
        else:
            fan_in = math.prod(p.shape[1:])
            p.copy_(normal(p.shape, 1.0 / math.sqrt(fan_in)))
    # A larger final norm spreads the logits, so greedy picks are far from ties.
    lm = model.model.language_model
    lm.norm.weight.copy_(uniform(lm.norm.weight.shape, 3.0, 5.0))
    for name, b in sorted(model.named_buffers(), key=lambda kv: kv[0]):
        if name.endswith("layer_scalar"):
            b.copy_(uniform(b.shape, 0.5, 1.5))
        elif name.endswith("std_bias"):
            b.copy_(normal(b.shape, 0.5))
        elif name.endswith("std_scale"):
            b.copy_(uniform(b.shape, 0.5, 1.5))


@torch.no_grad()
def calibrate_clips(model, inputs: dict) -> None:
    """Set clip bounds inside the observed range (2nd/98th percentile) so they bite."""
    stats: dict[str, list[torch.Tensor]] = {}
    hooks = []
    mods = {n: m for n, m in model.named_modules() if isinstance(m, Gemma4ClippableLinear)}
    for n, m in mods.items():
        m.input_min.fill_(-math.inf)
        m.input_max.fill_(math.inf)
        m.output_min.fill_(-math.inf)
        m.output_max.fill_(math.inf)

        def hook(mod, args, out, n=n):
            stats[n] = [args[0].detach().flatten().float(), mod.linear(args[0]).detach().flatten().float()]

        hooks.append(m.register_forward_hook(hook))
    model(**inputs)
    for h in hooks:
        h.remove()
    for n, m in mods.items():
        x, y = stats[n]
        q = torch.tensor([0.02, 0.98])
        xi, yo = torch.quantile(x[:100000], q), torch.quantile(y[:100000], q)
        m.input_min.fill_(xi[0].item())
        m.input_max.fill_(xi[1].item())
        m.output_min.fill_(yo[0].item())
        m.output_max.fill_(yo[1].item())


@torch.no_grad()
def round_to_bf16(model) -> None:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            t.copy_(t.to(torch.bfloat16).to(torch.float32))


# ---------------------------------------------------------------- main


def t(x, dtype=None):
    x = torch.as_tensor(x)
    if dtype is not None:
        x = x.to(dtype)
    return x.detach().cpu().contiguous()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "gemma4")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--tensor-list", type=Path, default=None, help="also write tensor names+shapes here")
    args = ap.parse_args()

    assert transformers.__version__ == "5.24.0", transformers.__version__
    seed = args.seed
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    torch.set_num_threads(2)

    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    model_dir = out / "model"
    inputs_dir = out / "inputs"
    model_dir.mkdir(parents=True)
    inputs_dir.mkdir(parents=True)

    # Inputs.
    image_path = inputs_dir / "image.png"
    wav_path = inputs_dir / "audio.wav"
    make_image(image_path)
    make_wav(wav_path, rng)
    image = Image.open(image_path).convert("RGB")
    audio = read_wav(wav_path)

    # Tokenizer and processor.
    tokenizer = build_tokenizer(model_dir)
    chat_template = CHAT_TEMPLATE.read_text()
    processor = Gemma4ProcessorNoVideo(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=Gemma4ImageProcessorPil(max_soft_tokens=IMAGE_BUDGET),
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=chat_template,
        image_seq_length=IMAGE_BUDGET,
    )

    # Model.
    config = build_config()
    model = Gemma4ForConditionalGeneration(config).eval()
    randomise(model, gen)
    round_to_bf16(model)

    def encode(messages_list, images=None, audios=None):
        texts = [
            processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages_list
        ]
        kw = {}
        if images is not None:
            kw["images"] = images
        if audios is not None:
            kw["audio"] = audios
        enc = processor(text=texts, return_tensors="pt", padding=True, **kw)
        return texts, enc

    _, calib = encode([PROMPTS["image_audio"]], images=[[image]], audios=[audio])
    calibrate_clips(model, {k: v for k, v in calib.items() if k != "num_soft_tokens_per_image"})
    round_to_bf16(model)

    # Save checkpoint (bf16 copy, official layout).
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    bf16.config.dtype = torch.bfloat16
    bf16.generation_config.eos_token_id = [1, 106]
    bf16.generation_config.pad_token_id = 0
    bf16.generation_config.bos_token_id = 2
    bf16.save_pretrained(model_dir)
    del bf16
    processor.save_pretrained(model_dir)
    (model_dir / "chat_template.jinja").write_text(chat_template)
    for fname in ("processor_config.json", "tokenizer_config.json"):
        path = model_dir / fname
        cfg_json = json.loads(path.read_text())
        cfg_json["processor_class"] = "Gemma4Processor"
        path.write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")

    # Reload from disk so the expected outputs are exactly what the folder implies.
    model = Gemma4ForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    model.generation_config.eos_token_id = None

    from safetensors import safe_open

    with safe_open(model_dir / "model.safetensors", "pt") as f:
        tensor_lines = [
            f"{k}\t{list(f.get_slice(k).get_shape())}\t{f.get_slice(k).get_dtype()}" for k in sorted(f.keys())
        ]
    if args.tensor_list:
        args.tensor_list.write_text("\n".join(tensor_lines) + "\n")

    expected: dict[str, torch.Tensor] = {}
    min_gaps: list[float] = []
    cases = []

    # Image preprocessing, standalone (resize check at two budgets).
    resize_checks = []
    for budget in (70, 280):
        ip = Gemma4ImageProcessorPil(max_soft_tokens=budget)
        res = ip(images=[image], return_tensors="pt")
        pv = res["pixel_values"][0]
        pos = res["image_position_ids"][0]
        n_valid = int((pos[:, 0] >= 0).sum())
        gw = int(pos[:, 0].max()) + 1
        gh = int(pos[:, 1].max()) + 1
        ps = ip.patch_size
        patches = pv[:n_valid].reshape(gh, gw, ps, ps, 3)
        resized = patches.permute(0, 2, 1, 3, 4).reshape(gh * ps, gw * ps, 3)
        u8 = (resized * 255.0).round()
        max_err = float((u8 - resized * 255.0).abs().max())
        assert max_err < 1e-3, f"resized pixels are not k/255 ({max_err})"
        png_name = f"resized_{budget}.png"
        Image.fromarray(u8.to(torch.uint8).numpy(), "RGB").save(out / png_name, format="PNG", optimize=True)
        pre = f"resize{budget}"
        # Position ids are a raster (x, y) grid then (-1, -1) padding; the 2520-row one
        # at budget 280 is left out to keep the fixture under 2 MB.
        tensor_names = [f"{pre}.pixel_values_patch_sums"]
        expected[f"{pre}.pixel_values_patch_sums"] = t(pv.sum(-1), torch.float32)
        if budget == IMAGE_BUDGET:
            expected[f"{pre}.image_position_ids"] = t(res["image_position_ids"], torch.int64)
            tensor_names.insert(0, f"{pre}.image_position_ids")
        resize_checks.append(
            dict(
                budget=budget,
                max_patches=budget * 9,
                resized_png=png_name,
                resized_hw=[gh * ps, gw * ps],
                num_valid_patches=n_valid,
                num_soft_tokens=int(res["num_soft_tokens_per_image"][0]),
                grid_wh=[gw, gh],
                tensors=tensor_names,
            )
        )

    def add(name, x, dtype=None):
        """Store a tensor; an exact duplicate of one already stored is shared by name."""
        x = t(x, dtype)
        for other, y in expected.items():
            if y.shape == x.shape and y.dtype == x.dtype and torch.equal(y, x):
                return other
        expected[name] = x
        return name

    gen_kwargs = dict(
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        return_dict_in_generate=True,
        output_logits=True,
    )

    @torch.no_grad()
    def run_case(name, messages_list, images=None, audios=None, note=""):
        texts, enc = encode(messages_list, images=images, audios=audios)
        model_inputs = {k: v for k, v in enc.items() if k != "num_soft_tokens_per_image"}
        names = {}
        names["input_ids"] = add(f"{name}.input_ids", enc["input_ids"], torch.int64)
        names["attention_mask"] = add(f"{name}.attention_mask", enc["attention_mask"], torch.int64)
        if "mm_token_type_ids" in enc:
            names["mm_token_type_ids"] = add(f"{name}.mm_token_type_ids", enc["mm_token_type_ids"], torch.int64)
        if "pixel_values" in enc:
            names["image_position_ids"] = add(f"{name}.image_position_ids", enc["image_position_ids"], torch.int64)
            names["pixel_values_patch_sums"] = add(
                f"{name}.pixel_values_patch_sums", enc["pixel_values"].sum(-1), torch.float32
            )
            img_out = model.model.get_image_features(
                enc["pixel_values"], enc["image_position_ids"], return_dict=True
            )
            names["vision_tower_output"] = add(f"{name}.vision_tower_output", img_out.last_hidden_state, torch.float32)
            names["image_soft_tokens"] = add(
                f"{name}.image_soft_tokens", torch.cat(list(img_out.pooler_output), 0), torch.float32
            )
        if "input_features" in enc:
            names["input_features"] = add(f"{name}.input_features", enc["input_features"], torch.float32)
            names["input_features_mask"] = add(f"{name}.input_features_mask", enc["input_features_mask"], torch.uint8)
            a_out = model.model.get_audio_features(enc["input_features"], enc["input_features_mask"], return_dict=True)
            names["audio_tower_output"] = add(f"{name}.audio_tower_output", a_out.last_hidden_state, torch.float32)
            names["audio_tower_mask"] = add(f"{name}.audio_tower_mask", a_out.attention_mask, torch.uint8)
            names["audio_soft_tokens"] = add(
                f"{name}.audio_soft_tokens", a_out.pooler_output[a_out.attention_mask], torch.float32
            )
        # Positions as generate() makes them: cumsum(attention_mask) - 1, 0 on padding.
        mask = enc["attention_mask"]
        position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        ple_inputs: list[torch.Tensor] = []
        hooks = [
            layer.register_forward_pre_hook(lambda mod, a: ple_inputs.append(a[1].detach().clone()))
            for layer in model.model.language_model.layers
        ]
        out = model(**model_inputs, position_ids=position_ids, output_hidden_states=True)
        for h in hooks:
            h.remove()
        logits = out.logits
        names["logits"] = add(f"{name}.logits", logits, torch.float32)
        if name in DEBUG_CASES:
            # hidden_states[0] is the merged input embedding (soft tokens scattered in);
            # [i] is the output of decoder layer i-1; the last one is before the final norm.
            hs = torch.stack(list(out.hidden_states), 0)
            if name == "text":
                names["hidden_states"] = add(f"{name}.hidden_states", hs, torch.float32)
            else:
                names["inputs_embeds"] = add(f"{name}.inputs_embeds", hs[0], torch.float32)
            # The PLE input each decoder layer receives: [layers, batch, seq, ple_dim].
            names["per_layer_inputs"] = add(f"{name}.per_layer_inputs", torch.stack(ple_inputs, 0), torch.float32)
        names["position_ids"] = add(f"{name}.position_ids", position_ids, torch.int64)
        unpadded_max_diff = None
        if mask.shape[0] > 1:
            # Each row alone, unpadded, must give the same logits at its real positions.
            unpadded_max_diff = 0.0
            for row in range(mask.shape[0]):
                _, single = encode([messages_list[row]])
                lg = model(**{k: v for k, v in single.items() if k != "num_soft_tokens_per_image"}).logits[0]
                n = lg.shape[0]
                diff = (logits[row, -n:] - lg).abs().max().item()
                unpadded_max_diff = max(unpadded_max_diff, diff)
        g = model.generate(**model_inputs, **gen_kwargs)
        new = g.sequences[:, enc["input_ids"].shape[1] :]
        step_logits = torch.stack(list(g.logits), dim=1)
        names["generated"] = add(f"{name}.generated", new, torch.int64)
        names["step_logits"] = add(f"{name}.step_logits", step_logits, torch.float32)
        # Robustness of greedy decoding: gap between the top two raw logits per step.
        top2 = step_logits.topk(2, dim=-1).values
        gap = float((top2[..., 0] - top2[..., 1]).min())
        eos_hit = bool(torch.isin(new, torch.tensor([1, 106])).any())
        # Stopping is disabled, so every step is the plain argmax of the raw logits.
        argmax_ok = bool((step_logits.argmax(-1) == new).all())
        cases.append(
            dict(
                name=name,
                note=note,
                messages=messages_list,
                prompt_text=texts,
                input_ids=enc["input_ids"].tolist(),
                attention_mask=enc["attention_mask"].tolist(),
                seq_len=int(enc["input_ids"].shape[1]),
                generated=new.tolist(),
                generated_text=[tokenizer.decode(r) for r in new.tolist()],
                min_top2_logit_gap=gap,
                generated_contains_stop_token=eos_hit,
                generated_equals_argmax_of_step_logits=argmax_ok,
                padded_vs_unpadded_logits_max_abs_diff=unpadded_max_diff,
                tensors=names,
            )
        )
        min_gaps.append(gap)
        print(f"{name}: seq {enc['input_ids'].shape} gen {new.tolist()} gap {gap:.4f} argmax_ok {argmax_ok}")

    run_case("text", [PROMPTS["text"]])
    run_case("image", [PROMPTS["image"]], images=[[image]])
    run_case("audio", [PROMPTS["audio"]], audios=[audio])
    run_case("image_audio", [PROMPTS["image_audio"]], images=[[image]], audios=[audio])
    run_case("long", [PROMPTS["long"]], note="prompt longer than the sliding window (8)")
    run_case("batch2", BATCH_PROMPTS, note=f"padding_side={processor.tokenizer.padding_side}")

    # A port in f32 differs from torch by ~1e-5; a near-tie would make the greedy
    # tokens flaky for it. Fail loudly and pick another seed instead.
    if min(min_gaps) < MIN_GAP:
        raise SystemExit(f"greedy near-tie (min top-2 gap {min(min_gaps):.2e} < {MIN_GAP}); try another --seed")

    save_file(expected, str(out / "expected.safetensors"), metadata={"transformers": transformers.__version__})

    text_cfg = model.config.text_config
    meta = dict(
        reference=f"transformers {transformers.__version__}, torch {torch.__version__}",
        seed=seed,
        dtype_on_disk="bfloat16",
        compute_dtype="float32",
        attn_implementation="eager",
        padding_side=processor.tokenizer.padding_side,
        image_budget_for_cases=IMAGE_BUDGET,
        generation=dict(
            greedy=True,
            max_new_tokens=NEW_TOKENS,
            stop_tokens="disabled (generation_config.eos_token_id=None while generating); the saved "
            "generation_config.json still lists [1, 106]",
            note="every generated token is the argmax of the raw step_logits (no logits processors)",
        ),
        special_ids=SPECIAL_IDS,
        newline_id=NEWLINE_ID,
        kv_sharing_modes=text_cfg.kv_sharing_modes,
        inputs=dict(image="inputs/image.png", audio="inputs/audio.wav", audio_scale="int16 / 32768"),
        resize_checks=resize_checks,
        cases=cases,
    )
    (out / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")
    print("\n".join(tensor_lines[:5]), "...", len(tensor_lines), "tensors")


if __name__ == "__main__":
    main()
