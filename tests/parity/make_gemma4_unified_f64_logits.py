"""Float64 logits of the committed gemma4_unified fixture (run by hand, after the fixture).

The fixture's logits come from a float32 eager run; on this tiny model with attention
scaling 1.0 they are themselves up to ~1e-3 away from exact arithmetic (image case). This
script reruns the same model and inputs in float64 (eager) so the Rust tests can check that
the Rust f32 port is about as close to exact math as the reference f32 run is.

Writes tests/fixtures/gemma4_unified/expected_f64.safetensors with `<case>.<row>` f32 logits
[T_row, vocab] of the unpadded rows. Needs the pinned venv of tests/parity/README.md.

    python tests/parity/make_gemma4_unified_f64_logits.py
"""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import Gemma4UnifiedForConditionalGeneration

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "gemma4_unified"


def main() -> None:
    exp = load_file(FIX / "expected.safetensors")
    cases = {c["name"]: c for c in json.loads((FIX / "cases.json").read_text())["cases"]}
    # The reference's exact resized pixels, merged into 48x48 patches in raster order.
    img = np.array(Image.open(FIX / "resized_70.png").convert("RGB"))
    gh, gw = img.shape[0] // 48, img.shape[1] // 48
    pv = (torch.tensor(img).to(torch.float64) / 255.0).reshape(gh, 48, gw, 48, 3)
    pv = pv.permute(0, 2, 1, 3, 4).reshape(gh * gw, 48 * 48 * 3)
    pv = torch.cat([pv, torch.zeros(70 - gh * gw, pv.shape[1], dtype=torch.float64)])[None]
    model = Gemma4UnifiedForConditionalGeneration.from_pretrained(
        FIX / "model", dtype=torch.float64, attn_implementation="eager"
    ).eval()
    out = {}
    for name in ["text", "long", "batch2", "image", "audio", "image_audio"]:
        t = cases[name]["tensors"]
        ids, mask = exp[t["input_ids"]], exp[t["attention_mask"]]
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
                    input_features=exp[t["input_features"]].to(torch.float64),
                    input_features_mask=exp[t["input_features_mask"]].bool(),
                )
            with torch.no_grad():
                logits = model(**kw).logits[0]
            out[f"{name}.{row}"] = logits.float().contiguous()
            f32 = exp[t["logits"]][row][keep]
            print(f"{name} row {row}: fixture f32 vs f64 max diff {float((f32 - logits).abs().max()):.3e}")
    save_file(out, FIX / "expected_f64.safetensors")


if __name__ == "__main__":
    main()
