"""PriorCache in torch DataLoader workers (fork and spawn), through the dataset of docs/training-loop.md."""

from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from clipprior.cache import PriorCache
from clipprior.cache import _read as _cache_read
from tests._cache_job import episodes, image_key, image_size, run_job

DOC = Path(__file__).resolve().parent.parent / "docs" / "training-loop.md"
N_IMAGES, N_EPISODES = 8, 6


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A cache and a data root holding the images and labels its episodes name."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        h, w = image_size(i)
        for key in (image_key(i),):
            (root / key).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / key)
        label = rng.choice(np.array([0, 1, 2, 255], np.uint8), size=(h, w))
        for key in (image_key(i).replace("JPEGImages", "Labels").replace(".jpg", ".png"),
                    image_key(i).replace(".jpg", ".png")):
            (root / key).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(label).save(root / key)
    cache = run_job(root / "priors.h5", n_images=N_IMAGES, n_episodes=N_EPISODES)
    return cache, root  # type: ignore[return-value]


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """The dataset code block of docs/training-loop.md, as an importable module (spawn workers import it)."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    (code,) = [b for b in blocks if "class CachedPriorEpisodes" in b]
    folder = tmp_path_factory.mktemp("example")
    (folder / "training_loop_example.py").write_text(code)
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module("training_loop_example")  # type: ignore[misc]
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("training_loop_example", None)


class WithWorkerInfo(Dataset):
    """The documented dataset plus who served each item (module level, so spawn can pickle it)."""

    def __init__(self, inner: Dataset) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict:
        item = self.inner[i]
        item["pid"] = os.getpid()
        item["handle_pid"] = self.inner.cache._pid  # type: ignore[attr-defined]
        return item


def _expected(cache: PriorCache, index: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    episode = cache.episode(index)
    return cache.vtp(episode.query, episode.class_id, size=(size, size))[None], cache.vvp(index, size=(size, size))


@pytest.mark.parametrize(("context", "open_in_parent"), [
    ("fork", False), ("fork", True), pytest.param("spawn", False, marks=pytest.mark.slow),
])
def test_documented_dataset_in_two_workers(data: tuple[Path, Path], example: ModuleType, context: str,
                                           open_in_parent: bool) -> None:
    cache_path, root = data
    dataset = example.CachedPriorEpisodes(cache_path, root, image_size=64, feature_size=8)
    if open_in_parent:
        dataset.cache.vtp(image_key(0), 1)  # a handle exists before the workers fork
        assert dataset.cache._pid == os.getpid()
    loader = DataLoader(WithWorkerInfo(dataset), batch_size=2, num_workers=2, multiprocessing_context=context)
    reference = PriorCache(cache_path)
    seen = []
    pids = set()
    for batch in loader:
        assert batch["query"].shape == (2, 3, 64, 64) and batch["supports"].shape == (2, 1, 3, 64, 64)
        assert batch["label"].shape == (2, 64, 64) and set(batch["label"].unique().tolist()) <= {0, 1, 255}
        assert batch["vtp"].shape == (2, 1, 8, 8) and batch["vvp"].shape == (2, 2, 8, 8)
        prior = example.prior_channels(batch["vtp"], batch["vvp"])
        assert prior.shape == (2, 4, 8, 8)
        for b, index in enumerate(batch["episode"].tolist()):
            vtp, vvp = _expected(reference, index, 8)
            assert torch.equal(batch["vtp"][b], vtp) and torch.equal(batch["vvp"][b], vvp)
            assert torch.equal(prior[b], torch.cat([vtp, vtp, vvp]) * 10)
            seen.append(index)
        pids.update(batch["pid"].tolist())
        assert batch["handle_pid"].tolist() == batch["pid"].tolist()  # each worker reads through its own handle
    assert sorted(seen) == [e.index for e in episodes(N_IMAGES, N_EPISODES)]
    assert len(pids) == 2 and os.getpid() not in pids


def test_handle_is_reopened_after_fork(data: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    cache = PriorCache(data[0])
    expected = cache.vtp(image_key(2), 1)
    first = cache._handle
    monkeypatch.setattr(_cache_read.os, "getpid", lambda: -1)  # as seen from a forked child
    assert torch.equal(cache.vtp(image_key(2), 1), expected)
    assert cache._handle is not first and first.id.valid  # the parent's handle is left alone
    monkeypatch.undo()
    first.close()


def test_many_workers_iterate_the_whole_cache(data: tuple[Path, Path]) -> None:
    class Episodes(Dataset):
        def __init__(self, cache: PriorCache) -> None:
            self.cache = cache

        def __len__(self) -> int:
            return len(self.cache)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            episode = self.cache.episodes[i]
            return self.cache.vvp(episode.index), self.cache.vvp(episode.index, size="original")

    cache = PriorCache(data[0])
    loaded = list(DataLoader(Episodes(cache), batch_size=None, num_workers=2))
    assert len(loaded) == len(cache) == N_EPISODES
    for episode, (grid, original) in zip(cache, loaded, strict=True):
        assert torch.equal(grid, cache.vvp(episode.index))  # bit-exact reads
        # resizing runs single-threaded in workers, so allow float rounding differences
        torch.testing.assert_close(original, cache.vvp(episode.index, size="original"))
        assert original.shape[-2:] == image_size(int(episode.query_image[-8:-4]))
