"""A synthetic precompute job for the cache tests (no CLIP): deterministic priors written through CacheWriter.

Used in-process by the tests and as a script, so a test can SIGKILL a real writer process:

    python tests/_cache_job.py OUT --images 24 --delay 0.05 --commit-every 3 [--shard 0/2]

Priors are pseudo-random but a pure function of their key, so every run, interrupted or not, sharded
or not, computes the same values.
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from clipprior.cache import CacheWriter, shard_from_environment
from clipprior.data import Episode
from clipprior.errors import CacheWriteError

PATCH = 16
CLASSES = (1, 2, 3)
CONFIG_JSON = '{"pir_layers": 8, "vvp_layers": [-1, -2]}'


def provenance(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "clipprior_version": "0.1.0", "model": "tiny", "weights_sha256": "ab" * 32, "config": CONFIG_JSON,
        "dataset": "pascal5i", "fold": 0, "split": "val", "shot": 1, "seed": 321, "episodes": 0,
        "list_sha256": "cd" * 32, "text_classes": "target",
    }
    base.update(changes)
    return base


def image_key(i: int) -> str:
    return f"JPEGImages/img_{i:04d}.jpg"


def image_size(i: int) -> tuple[int, int]:
    """Original (H, W): varied sizes, hence varied grids."""
    return 160 + 37 * (i % 5), 200 + 53 * (i % 3)


def grid(i: int) -> tuple[int, int]:
    h, w = image_size(i)
    return h // PATCH, w // PATCH


def image_classes(i: int) -> tuple[int, ...]:
    return CLASSES[: 1 + i % 2]


def _rng(*key: Any) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def fake_vtp(i: int, class_id: int) -> tuple[np.ndarray, np.ndarray]:
    cam = _rng("vtp", i, class_id).random(grid(i), dtype=np.float32)
    return cam, cam ** 2


def episodes(n_images: int, n_episodes: int, shot: int = 1) -> list[Episode]:
    out = []
    for e in range(n_episodes):
        q = e % n_images
        supports = [(q + 1 + k) % n_images for k in range(shot)]
        out.append(Episode(
            image_key(q), image_key(q).replace("JPEGImages", "Labels").replace(".jpg", ".png"),
            image_classes(q)[e % len(image_classes(q))],
            tuple((image_key(s), image_key(s).replace(".jpg", ".png")) for s in supports), index=e,
        ))
    return out


def fake_vvp(episode: Episode, shot: int) -> np.ndarray:
    q = int(episode.query_image.split("_")[-1].split(".")[0])
    return _rng("vvp", episode.index).random((2 * shot, *grid(q)), dtype=np.float32)


def run_job(out: Path, *, n_images: int = 12, n_episodes: int = 10, shot: int = 1, delay: float = 0.0,
            commit_every: int = 4, shard: tuple[int, int] | None = None, order_seed: int | None = None,
            on_progress: Callable[[int, int], None] | None = None, finalize: bool = True,
            max_buffer_bytes: int = 64 << 20, **prov: Any) -> Path | None:
    """Compute (fake) every prior the episodes need plus every (image, class) VTP, through CacheWriter.

    Shard i of n takes images i, i+n, ... and episodes i, i+n, ...; ``order_seed`` shuffles the work
    order (the final file must not depend on it).
    """
    eps = episodes(n_images, n_episodes, shot)
    images = list(range(n_images))
    episode_ids = list(range(n_episodes))
    if shard is not None:
        images = images[shard[0]::shard[1]]
        episode_ids = episode_ids[shard[0]::shard[1]]
    if order_seed is not None:
        rng = np.random.default_rng(order_seed)
        rng.shuffle(images)
        rng.shuffle(episode_ids)
    with CacheWriter(out, provenance(shot=shot, episodes=n_episodes, **prov), shard=shard,
                     max_buffer_bytes=max_buffer_bytes) as writer:
        writer.set_episodes(eps)
        done = 0
        for i in images:
            writer.add_image(image_key(i), *image_size(i))
            for c in image_classes(i):
                if writer.has_vtp(image_key(i), c):
                    continue
                writer.add_vtp(image_key(i), c, *fake_vtp(i, c))
                done += 1
                if done % commit_every == 0:
                    writer.commit()
                time.sleep(delay)
        for e in episode_ids:
            if writer.has_vvp(e):
                continue
            q = int(eps[e].query_image.split("_")[-1].split(".")[0])
            writer.add_image(image_key(q), *image_size(q))
            writer.add_vvp(e, fake_vvp(eps[e], shot))
            done += 1
            if done % commit_every == 0:
                writer.commit()
            time.sleep(delay)
        if not finalize:
            return None
        return writer.finalize(progress=on_progress)


def read_all(path: Path) -> dict[str, Any]:
    """Every dataset (as arrays) and the provenance attribute of a cache file."""
    out: dict[str, Any] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[...]) if isinstance(obj, h5py.Dataset) else None)
        out["@provenance"] = f.attrs["provenance"]
    return out


def assert_same_datasets(a: Path, b: Path) -> None:
    """Equal datasets (names, dtypes, shapes, values, bit for bit) and equal provenance."""
    da, db = read_all(a), read_all(b)
    assert sorted(da) == sorted(db), set(da) ^ set(db)
    for name in da:
        x, y = da[name], db[name]
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype, name
            assert x.shape == y.shape, name
            if x.dtype.kind == "f":
                assert x.tobytes() == y.tobytes(), name
            else:
                assert (x == y).all(), name
        else:
            assert x == y, name


def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--shot", type=int, default=1)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--finalize-delay", type=float, default=0.0, help="sleep per block while finalizing")
    parser.add_argument("--commit-every", type=int, default=4)
    parser.add_argument("--shard", default=None, help="i/n, or env for RANK/WORLD_SIZE (torchrun)")
    parser.add_argument("--file-size-limit", type=int, default=None,
                        help="bytes: no file may grow past this (RLIMIT_FSIZE: a real failed write, as a full disk)")
    args = parser.parse_args(argv)
    if args.file_size_limit is not None:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (args.file_size_limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    if args.shard == "env":  # one shard per rank under torchrun
        shard = shard_from_environment()
    else:
        shard = tuple(int(v) for v in args.shard.split("/")) if args.shard else None

    def slow_progress(done: int, total: int) -> None:
        print(f"finalizing {done}/{total}", flush=True)
        time.sleep(args.finalize_delay)

    if args.finalize_delay:
        import clipprior.cache._h5 as h5

        h5.BLOCK_BYTES = 1  # one row per block, so the kill lands mid-file
    try:
        run_job(args.out, n_images=args.images, n_episodes=args.episodes, shot=args.shot, delay=args.delay,
                commit_every=args.commit_every, shard=shard, on_progress=slow_progress)  # type: ignore[arg-type]
    except CacheWriteError as err:  # what a command does: one line, exit 1
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    print("done", flush=True)


if __name__ == "__main__":
    _main(sys.argv[1:])


def h5_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of an HDF5 file, by its path in the file (attributes left out)."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as handle:
        handle.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def assert_same_arrays(a: Path, b: Path) -> None:
    """The same datasets with the same values, bit for bit (the provenance of the two runs may differ)."""
    left, right = h5_arrays(a), h5_arrays(b)
    assert sorted(left) == sorted(right)
    for key in left:
        np.testing.assert_array_equal(left[key], right[key], err_msg=key)
