"""Float64 logits of the committed gemma4_unified fixture (run by hand, after the fixture).

The fixture's logits come from a float32 eager run; on this tiny model with attention
scaling 1.0 they are themselves up to ~1e-3 away from exact arithmetic (image case). This
script reruns the same model and inputs in float64 (eager), so that percept loaded in
float64 can be held to 1e-4 and percept in float32 compared with the reference's own
float32 distance to exact arithmetic.

"In float64" has to be enforced: transformers 5.24 loaded in float64 still computes its
RMSNorms (here also the pre-projection norm of the image and audio embedders), the attention
softmax and the RoPE angles in float32, which alone moves the logits by up to 8.3e-4 (image)
on this model. f64_upcasts.keep_float64 keeps them in float64; percept in float64 does the
same.

The inputs are exactly what percept is fed: the pixel values are the processor's float32
`uint8 * (1/255)` of the reference's resized pixels (`resized_70.png`), cast to float64 by
the model (dividing by 255 in float64 instead moves the image logits by 1.8e-4), and the
audio frames are the stored float32 `input_features`.

Writes tests/fixtures/gemma4_unified/expected_f64.safetensors with `<case>.<row>` logits
[T_row, vocab] of the unpadded rows, stored as float32 (rounding <= 1e-6 at |logit| <= 30).
Needs the pinned venv of tests/parity/README.md.

    python tests/parity/make_gemma4_unified_f64_logits.py
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
import transformers.models.gemma4_unified.modeling_gemma4_unified as mu
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import Gemma4UnifiedForConditionalGeneration

sys.path.insert(0, str(Path(__file__).parent))
from f64_upcasts import keep_float64  # noqa: E402

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "gemma4_unified"


def main() -> None:
    assert transformers.__version__ == "5.24.0", transformers.__version__
    exp = load_file(FIX / "expected.safetensors")
    cases = {c["name"]: c for c in json.loads((FIX / "cases.json").read_text())["cases"]}
    # The reference's exact resized pixels, rescaled as the processor does (uint8 times a
    # Python float gives float32), merged into 48x48 patches in raster order.
    img = np.array(Image.open(FIX / "resized_70.png").convert("RGB"))
    gh, gw = img.shape[0] // 48, img.shape[1] // 48
    pv = (torch.tensor(img) * (1 / 255)).reshape(gh, 48, gw, 48, 3)
    assert pv.dtype == torch.float32
    pv = pv.permute(0, 2, 1, 3, 4).reshape(gh * gw, 48 * 48 * 3)
    pv = torch.cat([pv, torch.zeros(70 - gh * gw, pv.shape[1])])[None]
    sums = exp["image.pixel_values_patch_sums"]
    assert torch.allclose(pv.double().sum(-1), sums.double(), rtol=2e-6, atol=1e-4)

    model = Gemma4UnifiedForConditionalGeneration.from_pretrained(
        FIX / "model", dtype=torch.float64, attn_implementation="eager"
    ).eval()

    def run():
        out = {}
        for name in ["text", "long", "batch2", "image", "audio", "image_audio"]:
            t = cases[name]["tensors"]
            ids, mask = exp[t["input_ids"]], exp[t["attention_mask"]]
            # Row by row, unpadded: fully masked padding queries give NaN rows in float64.
            for row in range(ids.shape[0]):
                keep = mask[row].bool()
                kw = dict(
                    input_ids=ids[row][keep][None],
                    mm_token_type_ids=exp[t["mm_token_type_ids"]][row][keep][None],
                )
                if "image_position_ids" in t:
                    kw.update(pixel_values=pv, image_position_ids=exp[t["image_position_ids"]])
                if "input_features" in t:
                    kw.update(
                        input_features=exp[t["input_features"]],
                        input_features_mask=exp[t["input_features_mask"]].bool(),
                    )
                with torch.no_grad():
                    out[f"{name}.{row}"] = (model(**kw).logits[0], exp[t["logits"]][row][keep])
        return out

    as_shipped = run()
    keep_float64(mu, mu.Gemma4UnifiedRMSNorm, mu.Gemma4UnifiedTextRotaryEmbedding)
    exact = run()
    for key, (logits, f32) in exact.items():
        shipped = as_shipped[key][0]
        print(
            f"{key}: fixture f32 vs f64 {float((f32 - logits).abs().max()):.2e}, "
            f"unpatched f64 vs f64 {float((shipped - logits).abs().max()):.2e}"
        )
    out = {k: v[0].float().contiguous() for k, v in exact.items()}
    meta = {"transformers": transformers.__version__, "compute": "float64 incl. norms, softmax, rope"}
    save_file(out, FIX / "expected_f64.safetensors", metadata=meta)


if __name__ == "__main__":
    main()
