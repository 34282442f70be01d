"""What the official geometry changes: native vs official priors on the reference model, at 60x60.

Run: ``.venv/bin/python benchmarks/geometry_change.py`` (needs ../shared/reference/parity). For each
bundled photo and two flipped-crop supports, the ``official`` preset's priors are computed in the
native and in the official geometry (``PriorConfig.geometry``) and both resized to the official
model's 60x60 feature grid (bilinear, align_corners=True); prints the mean absolute differences.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clipprior import compute_priors, get_preset, load_clip
from clipprior.photos import flip_crop, load_photo

REPO = Path(__file__).resolve().parent.parent
REF = REPO.parent / "shared" / "reference" / "parity"


def _at60(maps: torch.Tensor) -> torch.Tensor:
    return F.interpolate(maps[None].float(), size=(60, 60), mode="bilinear", align_corners=True)[0]


def main() -> None:
    clip = load_clip(sorted(REF.glob("*.safetensors"))[0], device="cpu")
    names = [m["name"] for m in json.loads((REPO / "clipprior/assets/photos/photos.json").read_text())]
    native = get_preset("official")
    official = native.replace(geometry="official")
    rows = []
    for name in names:
        query = load_photo(name)
        for box in [(0.1, 0.0, 0.9, 1.0), (0.0, 0.1, 1.0, 0.9)]:
            support = flip_crop(query, box)
            args = (clip, query.image, query.class_name, [support.image], [support.mask.astype("uint8")])
            a, b = compute_priors(*args, config=native), compute_priors(*args, config=official)
            rows.append({"photo": name, "size": list(query.image.shape[:2]),
                         "vvp_mad": float((_at60(a.vvp) - _at60(b.vvp)).abs().mean()),
                         "vtp_mad": float((_at60(a.refined[None]) - _at60(b.refined[None])).abs().mean())})
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({k: float(np.mean([r[k] for r in rows])) for k in ("vvp_mad", "vtp_mad")}))


if __name__ == "__main__":
    main()
