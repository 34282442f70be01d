"""Read cost per episode of each store mode, measured: episodes read per second from a cache.

Run: ``.venv/bin/python benchmarks/store_read_rate.py [--repeats 5] [--episodes 200] [--shot 1]``.

On a PASCAL-5i-shaped synthetic fold (20 classes, fold 0 train split, 500x375 images; see
:func:`clipprior.data.synthetic.write_synthetic_pascal`) with a tiny random CLIP (width 64, 4
layers, patch 16: 128 feature channels per cell, where ViT-B/16 has 1536), it builds a ``maps``
cache and a ``features`` cache and times, per mode, reading the priors of 1-shot episodes the way
a DataLoader item does (one process, CPU):

* ``maps``: ``cache.vtp(query, class)`` + ``cache.vvp(index)`` of the planned episodes;
* ``pool``: ``cache.episode_priors(query, class, supports)`` of the episodes
  :class:`clipprior.EpisodeSampler` draws from a pool cache (``--supports-per-query 4``): the VTP
  and the planned one-shot VVP of each support;
* ``features``: ``cache.episode_priors(query, class, supports)`` of random episodes of the PFENet
  protocol (any episode), VVP computed from the stored features on the CPU.

Each mode: one warm-up pass, then the median of ``--repeats`` timed passes; the ratio is taken
against ``maps`` measured in the same run. Prints one JSON line per mode.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner
from transformers import CLIPModel

from clipprior import EpisodeSampler, PriorCache
from clipprior.cli.main import app
from clipprior.data import open_dataset
from clipprior.data.synthetic import write_synthetic_pascal

REPO = Path(__file__).resolve().parent.parent


def _tiny_clip(path: Path) -> Path:
    import sys

    sys.path.insert(0, str(REPO))
    from transformers import CLIPTokenizer

    from tests.conftest import TOKENIZER_DIR, tiny_clip_config

    torch.manual_seed(0)
    CLIPModel(tiny_clip_config()).eval().save_pretrained(path)
    CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt")).save_pretrained(path)
    return path


def _build(root: Path, model: Path, out: Path, episodes: int | None, *extra: str) -> PriorCache:
    args = ["precompute", "--dataset", "pascal5i", "--fold", "0", "--split", "train", "--data-root", str(root),
            "--model", str(model), "--device", "cpu", "--out", str(out), *extra]
    if episodes is not None:
        args += ["--episodes", str(episodes)]
    res = CliRunner().invoke(app, args, catch_exceptions=False)
    if res.exit_code:
        raise SystemExit(res.output)
    return PriorCache(out)


def _time(fn, repeats: int) -> float:
    fn()  # warm-up: opens the file, builds the index, fills the chunk cache
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--shot", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        # a class list keeps at least per_class - 1 images (the size filter drops some): a query and K supports
        root = write_synthetic_pascal(tmp_path / "voc", per_class=max(4, args.shot + 2), size=(375, 500))
        model = _tiny_clip(tmp_path / "clip")
        shot = ("--shot", str(args.shot))
        maps = _build(root, model, tmp_path / "maps.h5", args.episodes, *shot)
        feats = _build(root, model, tmp_path / "features.h5", args.episodes, *shot, "--store", "features")
        pool = _build(root, model, tmp_path / "pool.h5", None, *shot, "--supports-per-query", str(args.shot + 3))
        data = open_dataset("pascal5i", root, 0, "train")
        rng = np.random.default_rng(0)
        random_eps = []
        while len(random_eps) < args.episodes:
            image, label = data.items[int(rng.integers(len(data.items)))]
            present = data.present_classes(label)
            class_id = int(present[int(rng.integers(len(present)))])
            others = [p[0] for p in data.class_index[class_id] if p != (image, label)]
            random_eps.append((image, class_id, [others[int(k)] for k in rng.permutation(len(others))[:args.shot]]))
        sampler = EpisodeSampler(data, shot=args.shot, seed=0, cache=pool)
        pool_eps = [(e.query_image, e.class_id, [s[0] for s in e.supports])
                    for epoch in range(args.episodes // len(sampler) + 1) for e in sampler.epoch_episodes(epoch)]
        # every mode reads in a random order, as a shuffled DataLoader does (no chunk-cache luck)
        pool_eps = [pool_eps[int(k)] for k in rng.permutation(len(pool_eps))[:args.episodes]]
        planned = [e for e in maps]
        planned = [planned[int(k)] for k in rng.permutation(len(planned))]

        def read_maps() -> None:
            for e in planned:
                maps.vtp(e.query, e.class_id)
                maps.vvp(e.index)

        def read_features() -> None:
            for image, class_id, supports in random_eps:
                feats.episode_priors(image, class_id, supports)

        def read_pool() -> None:
            for image, class_id, supports in pool_eps:
                pool.episode_priors(image, class_id, supports)

        base = _time(read_maps, args.repeats)
        rows = {"maps": (base, len(planned), maps.path),
                "pool": (_time(read_pool, args.repeats), len(pool_eps), pool.path),
                "features": (_time(read_features, args.repeats), len(random_eps), feats.path)}
        for mode, (seconds, n, path) in rows.items():
            rate = n / seconds
            print(json.dumps({
                "mode": mode, "shot": args.shot, "episodes": n, "reads_per_s": round(rate, 1),
                "ms_per_episode": round(1000 * seconds / n, 3), "vs_maps": round(rate / (len(planned) / base), 3),
                "file_mib": round(path.stat().st_size / 2**20, 2),
                "machine": platform.processor() or platform.machine(),
                "date": time.strftime("%Y-%m-%d"), "command": "benchmarks/store_read_rate.py",
                "threads": torch.get_num_threads(), "load_avg_1min": round(os.getloadavg()[0], 1),
            }))


if __name__ == "__main__":
    main()
