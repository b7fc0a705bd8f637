#!/usr/bin/env python3
"""Build the Gemma 4 unified (12B family, encoder-free) golden parity fixture.

Same approach, prompts, tokenizer, image and WAV as make_gemma4_fixture.py (shared code is
imported from it), for `Gemma4UnifiedForConditionalGeneration` of transformers 5.24.0:
no vision or audio tower, raw 48x48 pixel patches and raw 640-sample waveform frames are
projected straight into the decoder; sliding layers attend bidirectionally inside an
image (use_bidirectional_attention="vision"). Output: tests/fixtures/gemma4_unified/.

The unified image processor exists only with the torchvision backend, so this script
needs torchvision (requirements.txt); CI never runs it.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import transformers
from transformers import (
    Gemma4UnifiedAudioFeatureExtractor,
    Gemma4UnifiedConfig,
    Gemma4UnifiedForConditionalGeneration,
    Gemma4UnifiedImageProcessor,
    Gemma4UnifiedProcessor,
    Gemma4UnifiedVideoProcessor,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_gemma4_fixture as base  # noqa: E402

REPO = base.REPO
SEED = 1
IMAGE_BUDGET = 70
NEW_TOKENS = 12
MIN_GAP = 0.02
ALT_TAIL = 40

TEXT_CONFIG = dict(
    vocab_size=base.VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=64,
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
    num_kv_shared_layers=0,
    use_double_wide_mlp=False,
    use_bidirectional_attention="vision",
    final_logit_softcapping=30.0,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=1,
)
VISION_CONFIG = dict(
    patch_size=16,
    pooling_kernel_size=3,
    # The embedder's RMSNorm + projection are sized by output_proj_dims but fed the
    # mm_embed_dim-wide patch embeddings: the two must be equal.
    mm_embed_dim=16,
    output_proj_dims=16,
    mm_posemb_size=32,
)
AUDIO_CONFIG = dict(audio_embed_dim=640)


def build_config() -> Gemma4UnifiedConfig:
    cfg = Gemma4UnifiedConfig(
        text_config=dict(TEXT_CONFIG),
        vision_config=dict(VISION_CONFIG),
        audio_config=dict(AUDIO_CONFIG),
        **base.MM_IDS,
    )
    cfg._attn_implementation = "eager"
    return cfg


@torch.no_grad()
def randomise(model, gen: torch.Generator) -> None:
    def normal(shape, std):
        return torch.randn(shape, generator=gen) * std

    def uniform(shape, lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=gen)

    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if name.endswith("embed_tokens.weight"):
            p.copy_(normal(p.shape, base.EMBED_STD))
        elif name.endswith("pos_embedding"):
            p.copy_(normal(p.shape, 0.5))
        elif name.endswith(".bias"):
            p.copy_(normal(p.shape, 0.1))
        elif p.dim() == 1:  # RMSNorm / LayerNorm weights
            p.copy_(uniform(p.shape, 0.5, 1.5))
        else:
            fan_in = math.prod(p.shape[1:])
            p.copy_(normal(p.shape, 1.0 / math.sqrt(fan_in)))
    lm = model.model.language_model
    lm.norm.weight.copy_(uniform(lm.norm.weight.shape, 3.0, 5.0))
    for name, b in sorted(model.named_buffers(), key=lambda kv: kv[0]):
        if name.endswith("layer_scalar"):
            b.copy_(uniform(b.shape, 0.5, 1.5))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "gemma4_unified")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--tensor-list", type=Path, default=None)
    args = ap.parse_args()

    assert transformers.__version__ == "5.24.0", transformers.__version__
    seed = args.seed
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    torch.set_num_threads(2)

    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    model_dir = out / "model"
    inputs_dir = out / "inputs"
    model_dir.mkdir(parents=True)
    inputs_dir.mkdir(parents=True)

    # Same inputs as the E2B fixture (the WAV noise is seeded with the E2B seed).
    image_path = inputs_dir / "image.png"
    wav_path = inputs_dir / "audio.wav"
    base.make_image(image_path)
    base.make_wav(wav_path, np.random.default_rng(base.SEED))
    image = Image.open(image_path).convert("RGB")
    audio = base.read_wav(wav_path)

    tokenizer = base.build_tokenizer(model_dir)
    chat_template = base.CHAT_TEMPLATE.read_text()
    processor = Gemma4UnifiedProcessor(
        feature_extractor=Gemma4UnifiedAudioFeatureExtractor(),
        image_processor=Gemma4UnifiedImageProcessor(max_soft_tokens=IMAGE_BUDGET),
        tokenizer=tokenizer,
        video_processor=Gemma4UnifiedVideoProcessor(),
        chat_template=chat_template,
        image_seq_length=IMAGE_BUDGET,
    )

    config = build_config()
    model = Gemma4UnifiedForConditionalGeneration(config).eval()
    randomise(model, gen)
    base.round_to_bf16(model)

    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    bf16.config.dtype = torch.bfloat16
    bf16.generation_config.eos_token_id = [1, 106]
    bf16.generation_config.pad_token_id = 0
    bf16.generation_config.bos_token_id = 2
    bf16.save_pretrained(model_dir)
    del bf16
    processor.save_pretrained(model_dir)

    model = Gemma4UnifiedForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    model.generation_config.eos_token_id = None

    with safe_open(model_dir / "model.safetensors", "pt") as f:
        tensor_lines = [
            f"{k}\t{list(f.get_slice(k).get_shape())}\t{f.get_slice(k).get_dtype()}" for k in sorted(f.keys())
        ]
    if args.tensor_list:
        args.tensor_list.write_text("\n".join(tensor_lines) + "\n")

    expected: dict[str, torch.Tensor] = {}
    cases = []
    min_gaps: list[float] = []
    alt_info: dict[str, dict] = {}

    def add(name, x, dtype=None):
        x = base.t(x, dtype)
        for other, y in expected.items():
            if y.shape == x.shape and y.dtype == x.dtype and torch.equal(y, x):
                return other
        expected[name] = x
        return name

    # Image preprocessing (torchvision bicubic + antialias, then 3x3 patch merge).
    resize_checks = []
    for budget in (70, 280):
        ip = Gemma4UnifiedImageProcessor(max_soft_tokens=budget)
        res = ip(images=[image], return_tensors="pt")
        pv = res["pixel_values"][0]  # [budget, 48*48*3], merged patches, (py, px, c) inside
        pos = res["image_position_ids"][0]
        n_valid = int((pos[:, 0] >= 0).sum())
        mp = ip.patch_size * ip.pooling_kernel_size
        gw = int(pos[:n_valid, 0].max()) + 1
        gh = int(pos[:n_valid, 1].max()) + 1
        # Merged patches come out in raster order over the merged grid (checked below).
        grid = torch.stack(torch.meshgrid(torch.arange(gw), torch.arange(gh), indexing="xy"), -1).reshape(-1, 2)
        assert torch.equal(pos[:n_valid], grid), "unexpected merged patch order"
        resized = pv[:n_valid].reshape(gh, gw, mp, mp, 3).permute(0, 2, 1, 3, 4).reshape(gh * mp, gw * mp, 3)
        u8 = (resized * 255.0).round()
        assert float((u8 - resized * 255.0).abs().max()) < 1e-3, "resized pixels are not k/255"
        png_name = f"resized_{budget}.png"
        Image.fromarray(u8.to(torch.uint8).numpy(), "RGB").save(out / png_name, format="PNG", optimize=True)
        pre = f"resize{budget}"
        add(f"{pre}.image_position_ids", res["image_position_ids"], torch.int64)
        add(f"{pre}.pixel_values_patch_sums", pv.sum(-1), torch.float32)
        resize_checks.append(
            dict(
                budget=budget,
                resized_png=png_name,
                resized_hw=[gh * mp, gw * mp],
                num_valid_merged_patches=n_valid,
                num_soft_tokens=int(res["num_soft_tokens_per_image"][0]),
                padded_to=int(pv.shape[0]),
                tensors=[f"{pre}.image_position_ids", f"{pre}.pixel_values_patch_sums"],
            )
        )

    def encode(messages_list, images=None, audios=None):
        texts = [
            processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages_list
        ]
        kw = {}
        if images is not None:
            kw["images"] = images
        if audios is not None:
            kw["audio"] = audios
        return texts, processor(text=texts, return_tensors="pt", padding=True, **kw)

    gen_kwargs = dict(do_sample=False, max_new_tokens=NEW_TOKENS, return_dict_in_generate=True, output_logits=True)

    @torch.no_grad()
    def run_case(name, messages_list, images=None, audios=None, note=""):
        texts, enc = encode(messages_list, images=images, audios=audios)
        model_inputs = {k: v for k, v in enc.items() if k != "num_soft_tokens_per_image"}
        names = {}
        names["input_ids"] = add(f"{name}.input_ids", enc["input_ids"], torch.int64)
        names["attention_mask"] = add(f"{name}.attention_mask", enc["attention_mask"], torch.int64)
        names["mm_token_type_ids"] = add(f"{name}.mm_token_type_ids", enc["mm_token_type_ids"], torch.int64)
        if "pixel_values" in enc:
            names["image_position_ids"] = add(f"{name}.image_position_ids", enc["image_position_ids"], torch.int64)
            names["pixel_values_patch_sums"] = add(
                f"{name}.pixel_values_patch_sums", enc["pixel_values"].sum(-1), torch.float32
            )
            img = model.model.get_image_features(enc["pixel_values"], enc["image_position_ids"], return_dict=True)
            # Before the final RMSNorm + projection (after pos_norm), padding included.
            names["vision_embedder_hidden"] = add(
                f"{name}.vision_embedder_hidden", img.last_hidden_state, torch.float32
            )
            names["image_soft_tokens"] = add(
                f"{name}.image_soft_tokens", torch.cat(list(img.pooler_output), 0), torch.float32
            )
        if "input_features" in enc:
            names["input_features"] = add(f"{name}.input_features", enc["input_features"], torch.float32)
            names["input_features_mask"] = add(f"{name}.input_features_mask", enc["input_features_mask"], torch.uint8)
            a = model.model.get_audio_features(enc["input_features"], enc["input_features_mask"], return_dict=True)
            names["audio_soft_tokens"] = add(
                f"{name}.audio_soft_tokens", a.pooler_output[a.attention_mask], torch.float32
            )

        mask = enc["attention_mask"]
        position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        attn_masks = {}
        lm = model.model.language_model
        hooks = []
        for layer_idx in (0, 2):  # first sliding and first full layer

            def grab(mod, a, kw, layer_idx=layer_idx):
                attn_masks.setdefault(layer_idx, kw["attention_mask"].detach().clone())

            hooks.append(lm.layers[layer_idx].self_attn.register_forward_pre_hook(grab, with_kwargs=True))
        out_ = model(**model_inputs, position_ids=position_ids, output_hidden_states=True)
        for h in hooks:
            h.remove()
        logits = out_.logits
        names["logits"] = add(f"{name}.logits", logits, torch.float32)
        names["position_ids"] = add(f"{name}.position_ids", position_ids, torch.int64)
        if name in ("text", "image"):
            # 1 = may attend, [B, 1, T, T], as the eager attention received it.
            names["sliding_mask"] = add(f"{name}.sliding_mask", attn_masks[0] == 0, torch.uint8)
            names["full_mask"] = add(f"{name}.full_mask", attn_masks[2] == 0, torch.uint8)
        if name == "image":
            # The reference has two mask constructions for use_bidirectional_attention="vision":
            # - default (DynamicCache; what forward() and generate() above use): masks built by
            #   masking_utils.create_masks_for_generate with block_sequence_ids, i.e.
            #   OR(sliding-causal, same-image) on sliding layers and OR(causal, same-image) on
            #   full layers: an image attends to all of itself on every layer;
            # - Gemma4UnifiedForConditionalGeneration.create_masks_for_generate (only used by
            #   generate() with a compileable/static cache): full layers causal only, sliding
            #   layers AND(window, OR(causal, same-image)), as its docstring describes.
            # Store the second variant too (masks + logits of the last ALT_TAIL positions).
            alt = Gemma4UnifiedForConditionalGeneration.create_masks_for_generate(
                model.config,
                out_.hidden_states[0],
                enc["attention_mask"],
                None,
                position_ids,
                mm_token_type_ids=enc["mm_token_type_ids"],
            )
            alt_inputs = dict(model_inputs, attention_mask=alt)
            alt_logits = model(**alt_inputs, position_ids=position_ids).logits

            def attend(m):
                return m if m.dtype == torch.bool else m == 0

            names["sliding_mask_static_cache"] = add(
                f"{name}.sliding_mask_static_cache", attend(alt["sliding_attention"]), torch.uint8
            )
            names["full_mask_static_cache"] = add(
                f"{name}.full_mask_static_cache", attend(alt["full_attention"]), torch.uint8
            )
            names["logits_static_cache_tail"] = add(
                f"{name}.logits_static_cache_tail", alt_logits[:, -ALT_TAIL:], torch.float32
            )
            alt_info[name] = dict(
                tail_start=int(alt_logits.shape[1] - ALT_TAIL),
                max_abs_diff_vs_default=float((alt_logits - logits).abs().max()),
            )
        if name == "text":
            hs = torch.stack(list(out_.hidden_states), 0)
            names["hidden_states"] = add(f"{name}.hidden_states", hs, torch.float32)
        if name == "image_audio":
            names["inputs_embeds"] = add(f"{name}.inputs_embeds", out_.hidden_states[0], torch.float32)

        unpadded_max_diff = None
        if mask.shape[0] > 1:
            unpadded_max_diff = 0.0
            for row in range(mask.shape[0]):
                _, single = encode([messages_list[row]])
                lg = model(**{k: v for k, v in single.items() if k != "num_soft_tokens_per_image"}).logits[0]
                diff = (logits[row, -lg.shape[0] :] - lg).abs().max().item()
                unpadded_max_diff = max(unpadded_max_diff, diff)

        g = model.generate(**model_inputs, **gen_kwargs)
        new = g.sequences[:, enc["input_ids"].shape[1] :]
        step_logits = torch.stack(list(g.logits), dim=1)
        names["generated"] = add(f"{name}.generated", new, torch.int64)
        names["step_logits"] = add(f"{name}.step_logits", step_logits, torch.float32)
        top2 = step_logits.topk(2, dim=-1).values
        gap = float((top2[..., 0] - top2[..., 1]).min())
        min_gaps.append(gap)
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
                generated_contains_stop_token=bool(torch.isin(new, torch.tensor([1, 106])).any()),
                generated_equals_argmax_of_step_logits=argmax_ok,
                padded_vs_unpadded_logits_max_abs_diff=unpadded_max_diff,
                static_cache_mask_variant=alt_info.get(name),
                tensors=names,
            )
        )
        print(f"{name}: seq {tuple(enc['input_ids'].shape)} gen {new.tolist()} gap {gap:.4f} argmax_ok {argmax_ok}")

    run_case("text", [base.PROMPTS["text"]])
    run_case("image", [base.PROMPTS["image"]], images=[[image]])
    run_case("audio", [base.PROMPTS["audio"]], audios=[audio])
    run_case("image_audio", [base.PROMPTS["image_audio"]], images=[[image]], audios=[audio])
    run_case("long", [base.PROMPTS["long"]], note="prompt longer than the sliding window (8)")
    run_case("batch2", base.BATCH_PROMPTS, note=f"padding_side={processor.tokenizer.padding_side}")

    if min(min_gaps) < MIN_GAP:
        raise SystemExit(f"greedy near-tie (min top-2 gap {min(min_gaps):.2e} < {MIN_GAP}); try another --seed")

    save_file(expected, str(out / "expected.safetensors"), metadata={"transformers": transformers.__version__})
    meta = dict(
        reference=f"transformers {transformers.__version__}, torch {torch.__version__}",
        model_class="Gemma4UnifiedForConditionalGeneration",
        seed=seed,
        dtype_on_disk="bfloat16",
        compute_dtype="float32",
        attn_implementation="eager",
        padding_side=processor.tokenizer.padding_side,
        image_budget_for_cases=IMAGE_BUDGET,
        generation=dict(
            greedy=True,
            max_new_tokens=NEW_TOKENS,
            stop_tokens="disabled while generating; generation_config.json lists [1, 106]",
            note="every generated token is the argmax of the raw step_logits",
        ),
        special_ids=base.SPECIAL_IDS,
        newline_id=base.NEWLINE_ID,
        inputs=dict(image="inputs/image.png", audio="inputs/audio.wav", audio_scale="int16 / 32768"),
        resize_checks=resize_checks,
        cases=cases,
    )
    (out / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(len(tensor_lines), "tensors")


if __name__ == "__main__":
    main()
