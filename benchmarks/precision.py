"""Low-precision agreement of the priors: bf16 / fp16 models against the same model in fp32.

Runs VTP (CAM), PIR (box mask, refined prior) and VVP with the model cast to each dtype, on the
same inputs, on one device (``--device``, default cpu), and prints the largest and mean absolute
differences to the fp32 results, in units of the dtype's unit roundoff u (2^-11 for fp16, 2^-8 for
bf16) as well as absolutely, and the fraction of box-mask cells that differ. Two models:

- ``parity``: the 12-layer random CLIP of ../shared/reference/parity through clipprior's loader,
  on the recorded VTP cases (official preset, their context classes) and VVP cases;
- ``tiny``: the 4-layer tiny random CLIP of the tests (tests/conftest.py), on random 64 x 96 images.

Usage:
    .venv/bin/python benchmarks/precision.py --device cpu
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from clipprior import get_preset, load_clip  # noqa: E402
from clipprior.model import ClipBundle  # noqa: E402
from clipprior.preprocess import normalize, preprocess_query  # noqa: E402
from clipprior.priors import encode_text, pir, vtp, vvp  # noqa: E402
from tests.conftest import TOKENIZER_DIR, make_tiny_clip, reference_dir  # noqa: E402

UNIT = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def cast(clip: ClipBundle, dtype: torch.dtype) -> ClipBundle:
    import copy
    import dataclasses

    return dataclasses.replace(clip, model=copy.deepcopy(clip.model).to(dtype))


def run(clip: ClipBundle, cases: list[dict], vvp_cases: list[dict], config, text) -> dict[str, list[torch.Tensor]]:
    out: dict[str, list[torch.Tensor]] = {"cam": [], "refined": [], "box_mask": [], "attention": [], "vvp": []}
    for case in cases:
        res = vtp(clip, case["pixels"], [case["target"]], context=[case["context"]], text=text, config=config,
                  return_attention=True)
        refined = pir(res.cam, res.attention, config=config, output_size=case["size"])
        out["cam"].append(res.cam)
        out["attention"].append(res.attention)
        out["refined"].append(refined.refined)
        out["box_mask"].append(refined.box_mask)
    for case in vvp_cases:
        out["vvp"].append(vvp(clip, case["query"], case["supports"], case["labels"], config=config))
    return out


def compare(ref: dict, low: dict, dtype: torch.dtype) -> dict[str, float]:
    row: dict[str, float] = {}
    for key in ("cam", "attention", "refined", "vvp"):
        diffs = [(a.float() - b.float()).abs() for a, b in zip(ref[key], low[key], strict=True)]
        if not diffs:
            continue
        row[f"{key}_max"] = max(float(d.max()) for d in diffs)
        row[f"{key}_mean"] = float(torch.cat([d.flatten() for d in diffs]).mean())
        row[f"{key}_max_u"] = row[f"{key}_max"] / UNIT[dtype]
    cells = sum(int(m.numel()) for m in ref["box_mask"])
    row["box_mask_cells_differing"] = sum(int((a != b).sum()) for a, b in zip(ref["box_mask"], low["box_mask"],
                                                                            strict=True)) / cells
    return row


def parity_inputs(clip: ClipBundle) -> tuple[list[dict], list[dict], list[str]]:
    ref = reference_dir()
    with np.load(ref / "text.npz") as data:
        names = [str(n) for n in data["class_names"]]
    cases, vvp_cases = [], []
    for path in sorted(ref.glob("vtp_*.npz")):
        with np.load(path) as data:
            for k in range(int(data["n"])):
                target = int(data[f"{k}_target"])
                cases.append({"pixels": preprocess_query(data[f"{k}_image"], clip.patch_size)[None],
                              "target": names[target], "size": tuple(data[f"{k}_image"].shape[:2]),
                              "context": [names[int(i)] for i in data[f"{k}_present"] if int(i) != target]})
    for path in sorted(ref.glob("vvp_*.npz")):
        with np.load(path) as data:
            for k in range(int(data["n"])):
                vvp_cases.append({"query": torch.from_numpy(data[f"{k}_x"]),
                                  "supports": torch.from_numpy(data[f"{k}_s_x"]),
                                  "labels": torch.from_numpy(data[f"{k}_masks"]).long()[None]})
    return cases, vvp_cases, names


def tiny_inputs(clip: ClipBundle) -> tuple[list[dict], list[dict], list[str]]:
    rng = np.random.default_rng(0)
    names = ["cat", "dog", "bird avian"]
    cases, vvp_cases = [], []
    for i in range(3):
        image = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
        cases.append({"pixels": preprocess_query(image, clip.patch_size)[None], "target": names[i % 3],
                      "context": [], "size": (64, 96)})
        support = normalize(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))[None, None]
        labels = torch.zeros(1, 1, 64, 64, dtype=torch.long)
        labels[..., 8:40, 16:48] = 1
        vvp_cases.append({"query": preprocess_query(image[:, :64], clip.patch_size)[None], "supports": support,
                          "labels": labels})
    return cases, vvp_cases, names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        from transformers import CLIPTokenizer

        tiny = make_tiny_clip()
        tiny.save_pretrained(tmp)
        CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt")).save_pretrained(tmp)
        weights = sorted(reference_dir().glob("*.safetensors"))[0]
        models = {"parity": (load_clip(weights, device=args.device), parity_inputs, get_preset("official")),
                  "tiny": (load_clip(tmp, device=args.device), tiny_inputs, get_preset("default"))}
        for model_name, (clip, inputs, config) in models.items():
            cases, vvp_cases, names = inputs(clip)
            text = encode_text(clip, names, config)
            ref = run(clip, cases, vvp_cases, config, text)
            for dtype in (torch.bfloat16, torch.float16):
                try:
                    low_clip = cast(clip, dtype)
                    low = run(low_clip, cases, vvp_cases, config, encode_text(low_clip, names, config))
                except RuntimeError as err:  # a CPU without kernels for the dtype
                    results[f"{model_name}/{dtype}"] = {"error": str(err).splitlines()[0]}
                    continue
                row = compare(ref, low, dtype)
                results[f"{model_name}/{str(dtype).removeprefix('torch.')}"] = row
                print(f"{model_name:7s} {str(dtype).removeprefix('torch.'):9s} "
                      + "  ".join(f"{k}={v:.3g}" for k, v in row.items()))
    record = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "device": args.device,
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__, "results": results}
    if args.out:
        args.out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
