#!/usr/bin/env python3
"""How far is the reference's own float32 result from exact? Recompute a fixture in float64.

Loads the fixture's checkpoint (bf16 on disk) into the reference model in float64, with its
norms, softmax and RoPE kept in float64 too (transformers 5.24 hard-codes float32 there:
f64_upcasts.py), re-encodes every case with the fixture's processor settings, checks the
input ids are the stored ones, and prints per case how far the reference's float32 logits
are from the float64 ones. With `--write` it also replaces `<case>.logits` in
expected.safetensors with the float64 result (stored as float32) and records the figures in
cases.json, and stores the float64 greedy continuation as `<case>.generated_f64`.

The committed fixture stores the float64 logits (`--write`; tests/model_parity.rs checks
both precisions): percept loaded in float64 must match them within 1e-4, percept in float32
is held to the float32 noise floor of this random model (the reference's own float32 run is
more than 1e-4 from them, see `reference_f32_logits_max_abs_diff_from_f64` in cases.json).

    python tests/parity/golden_f64.py tests/fixtures/gemma4 [--write]

Run by hand with the pinned reference (requirements.txt); CI never runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import transformers

sys.path.insert(0, str(Path(__file__).parent))
import make_gemma4_fixture as fx  # noqa: E402
import transformers.models.gemma4.modeling_gemma4 as modeling  # noqa: E402
from f64_upcasts import keep_float64  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("fixture", type=Path)
    ap.add_argument("--write", action="store_true", help="replace the stored logits with the float64 ones")
    args = ap.parse_args()
    assert transformers.__version__ == "5.24.0", transformers.__version__
    torch.set_num_threads(2)
    d: Path = args.fixture
    model_dir = d / "model"
    meta = json.loads((d / "cases.json").read_text())
    expected = load_file(str(d / "expected.safetensors"))

    # The tokenizer exactly as the fixture script built it (loading the saved one brings
    # the saved processor defaults along, which the audio feature extractor rejects).
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = fx.build_tokenizer(Path(tmp))
    processor = fx.Gemma4ProcessorNoVideo(
        feature_extractor=fx.Gemma4AudioFeatureExtractor(),
        image_processor=fx.Gemma4ImageProcessorPil(max_soft_tokens=meta["image_budget_for_cases"]),
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=(model_dir / "chat_template.jinja").read_text(),
        image_seq_length=meta["image_budget_for_cases"],
    )
    image = Image.open(d / meta["inputs"]["image"]).convert("RGB")
    audio = fx.read_wav(d / meta["inputs"]["audio"])

    def load(dtype):
        return fx.Gemma4ForConditionalGeneration.from_pretrained(
            model_dir, dtype=dtype, attn_implementation="eager"
        ).eval()

    keep_float64(modeling, modeling.Gemma4RMSNorm, modeling.Gemma4TextRotaryEmbedding)
    m32, m64 = load(torch.float32), load(torch.float64)
    # The Rust parity test feeds the decoder the reference's float32 soft tokens (the
    # towers have their own checks), so the float64 decoder gets exactly those: its image
    # and audio features come from the float32 towers. (The 5.24 audio tower cannot run in
    # float64 anyway: it builds float32 position tensors.)
    towers32 = m32.model

    def to64(out):
        for k, v in out.items():
            if torch.is_tensor(v) and v.is_floating_point():
                out[k] = v.to(torch.float64)
        return out

    def via32(method):
        def call(*args, **kwargs):
            args = [a.to(torch.float32) if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
            with torch.no_grad():
                return to64(getattr(towers32, method)(*args, **kwargs))

        return call

    m64.model.get_image_features = via32("get_image_features")
    m64.model.get_audio_features = via32("get_audio_features")

    def forward(model, dtype, messages, with_image, with_audio):
        texts = [processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)]
        kw = {}
        if with_image:
            kw["images"] = [[image]]
        if with_audio:
            kw["audio"] = [audio]
        enc = processor(text=texts, return_tensors="pt", padding=True, **kw)
        inputs = {k: v for k, v in enc.items() if k != "num_soft_tokens_per_image"}
        for k in ("pixel_values", "input_features"):
            if k in inputs:
                inputs[k] = inputs[k].to(dtype)
        with torch.no_grad():
            logits = lg_prompt = model(**inputs).logits[0]
            if dtype != torch.float64:
                return enc["input_ids"][0], logits, None
            # Greedy, stop tokens disabled as in the fixture's float32 run; each step is a
            # full forward over prompt + tokens so far (no cache to get wrong).
            new = []
            for _ in range(fx.NEW_TOKENS):
                new.append(int(logits[-1].argmax()))
                for k, v in inputs.items():
                    if k == "input_ids":
                        inputs[k] = torch.cat([v, v.new_tensor([[new[-1]]])], 1)
                    elif k == "attention_mask":
                        inputs[k] = torch.cat([v, v.new_ones(1, 1)], 1)
                    elif k.endswith("token_type_ids"):
                        inputs[k] = torch.cat([v, v.new_zeros(1, 1)], 1)
                logits = model(**inputs).logits[0]
            return enc["input_ids"][0], lg_prompt, torch.tensor(new)

    for case in meta["cases"]:
        name = case["name"]
        tensors = case["tensors"]
        with_image = "image_soft_tokens" in tensors
        with_audio = "audio_soft_tokens" in tensors
        stored = expected[tensors["logits"]]
        golden = torch.zeros_like(stored)
        generated = torch.zeros_like(expected[tensors["generated"]])
        f32_vs_f64 = 0.0
        # Row by row, unpadded: the padded batch gives NaN rows in float64 (fully masked
        # padding queries), and each row's logits at its real positions are the same.
        for row, messages in enumerate(case["messages"]):
            ids64, lg64, gen64 = forward(m64, torch.float64, messages, with_image, with_audio)
            _, lg32, _ = forward(m32, torch.float32, messages, with_image, with_audio)
            mask = torch.tensor(case["attention_mask"][row])
            pad = int((mask == 0).sum())
            want_ids = torch.tensor(case["input_ids"][row][pad:])
            assert torch.equal(ids64, want_ids), f"{name} row {row}: input ids differ from the fixture"
            golden[row, pad:] = lg64.to(torch.float32)
            generated[row] = gen64
            f32_vs_f64 = max(f32_vs_f64, float((lg32.double() - lg64).abs().max()))
            # The greedy tokens of the f32 run must also be the f64 argmax at the prompt's end.
            first = int(expected[tensors["generated"]][row][0])
            assert int(lg64[-1].argmax()) == first, f"{name} row {row}: f64 argmax differs"
        expected[tensors["logits"]] = golden
        case["reference_f32_logits_max_abs_diff_from_f64"] = f32_vs_f64
        # Where the float32 run's greedy choice was a near tie (image: 2.3e-5 at step 12),
        # float64 may pick the other token; percept in float64 is checked against these.
        tensors["generated_f64"] = f"{name}.generated_f64"
        expected[tensors["generated_f64"]] = generated
        same = torch.equal(generated, expected[tensors["generated"]])
        print(f"{name}: reference f32 vs f64 max |diff| {f32_vs_f64:.2e}, greedy tokens equal: {same}")

    if not args.write:
        return
    meta["logits_compute_dtype"] = (
        "float64 incl. norms, softmax and rope (tests/parity/golden_f64.py); generation in float32"
    )
    save_file(expected, str(d / "expected.safetensors"), metadata={"transformers": transformers.__version__})
    (d / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
