"""A synthetic PASCAL-5i fold with a prior cache whose priors are known functions of the ground truth.

Used by the ``show`` and ``evaluate`` command tests. The priors are stored at the image's full
size (the cache accepts any grid), so reading them back at the original size involves no
resizing and every IoU is exactly what the construction says:

* VTP refined = 1 on the target and on the ignore lines, 0 elsewhere: IoU 1 at any threshold in (0, 1];
* VTP raw = 0.75 on the left half of the target's columns, 0.25 on the rest of the target, 0 elsewhere;
* VVP = two channels, both 0.9 on the target's top rows and 0.1 elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clipprior.cache import CacheWriter
from clipprior.data import load_label, open_dataset, sample_episodes
from clipprior.data.synthetic import write_synthetic_pascal


def raw_prior(target: np.ndarray) -> np.ndarray:
    cols = np.nonzero(target.any(axis=0))[0]
    prior = np.where(target, 0.25, 0.0)
    if cols.size:
        left = cols[: max(1, cols.size // 2)]
        prior[:, left] = np.where(target[:, left], 0.75, 0.0)
    return prior


def vvp_prior(target: np.ndarray) -> np.ndarray:
    rows = np.nonzero(target.any(axis=1))[0]
    top = np.zeros_like(target)
    top[rows[: max(1, rows.size // 3)]] = True
    one = np.where(target & top, 0.9, 0.1)
    return np.stack([one, one])


def make_synthetic_cache(tmp: Path, fold: int = 0, n_episodes: int = 12, name: str | None = None) -> tuple[Path, Path]:
    """Write (once per tmp dir) a synthetic VOC root and a cache for ``fold``; returns (cache path, data root)."""
    root = tmp / "VOC2012"
    if not root.exists():
        write_synthetic_pascal(root, per_class=2, size=(64, 96))
    dataset = open_dataset("pascal5i", root, fold=fold)
    episodes = sample_episodes(dataset, n_episodes, shot=1, seed=fold)
    out = tmp / (name or f"fold{fold}.h5")
    provenance = {"dataset": "pascal5i", "fold": fold, "split": "val", "model": "synthetic", "shot": 1}
    with CacheWriter(out, provenance) as writer:
        writer.set_episodes(
            (i, e.query_image, e.query_label, e.class_id, [s[0] for s in e.supports], [s[1] for s in e.supports])
            for i, e in enumerate(episodes)
        )
        for i, e in enumerate(episodes):
            label = load_label(root / e.query_label)
            target = label == e.class_id
            if not writer.has_image(e.query_image):
                writer.add_image(e.query_image, *label.shape)
            if not writer.has_vtp(e.query_image, e.class_id):
                refined = (target | (label == 255)).astype(np.float32)
                writer.add_vtp(e.query_image, e.class_id, raw_prior(target), refined)
            writer.add_vvp(i, vvp_prior(target))
        path = writer.finalize()
    return path, root


def expected_scores(cache_path: Path, root: Path, threshold: float) -> dict[str, dict[str, float]]:
    """Brute-force mIoU (mean over classes of accumulated I / U) and FB-IoU of the three priors."""
    from clipprior.cache import PriorCache

    cache = PriorCache(cache_path)
    counts: dict[str, dict[int, np.ndarray]] = {k: {} for k in ("vtp_raw", "vtp_refined", "vvp")}
    for e in cache.episodes:
        label = load_label(root / e.query_label)
        valid = label != 255
        target = label == e.class_id
        maps = {
            "vtp_raw": raw_prior(target),
            "vtp_refined": (target | (label == 255)).astype(float),
            "vvp": (vvp_prior(target).mean(0) - 0.1) / (0.8 + 1e-7),  # min-max normalised mean
        }
        for kind, prior in maps.items():
            pred = (prior >= threshold) & valid
            gt = target & valid
            bg_pred, bg_gt = ~pred & valid, ~gt & valid
            c = counts[kind].setdefault(e.class_id, np.zeros(4))
            c += [(pred & gt).sum(), (pred | gt).sum(), (bg_pred & bg_gt).sum(), (bg_pred | bg_gt).sum()]
    out = {}
    for kind, per_class in counts.items():
        arr = np.array(list(per_class.values()))
        out[kind] = {
            "miou": float(np.mean(arr[:, 0] / arr[:, 1])),
            "fbiou": float((arr[:, 0].sum() / arr[:, 1].sum() + arr[:, 2].sum() / arr[:, 3].sum()) / 2),
            "classes": sorted(per_class),
        }
    return out
