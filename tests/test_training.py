"""clipprior.training: the trainer's episode sampler (free / pool / planned), prior_channels, label_b."""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import clipprior
from clipprior.cache import PriorCache
from clipprior.data import FSSDataset, fold_classes, open_dataset
from clipprior.data.synthetic import write_synthetic_pascal
from clipprior.errors import CacheKeyError, InvalidInputError
from clipprior.training import EpisodeSampler, base_label, prior_channels, reverse_shots
from tests._cache_job import run_job


@pytest.fixture(scope="module")
def train_set(tmp_path_factory: pytest.TempPathFactory) -> FSSDataset:
    root = write_synthetic_pascal(tmp_path_factory.mktemp("voc") / "VOC2012", per_class=7, size=(80, 112))
    return open_dataset("pascal5i", root, fold=0, split="train")


def check_episode(ds: FSSDataset, episode, shot: int) -> None:
    assert episode.class_id in ds.present_classes(episode.query_label)
    assert len(episode.supports) == shot == len(set(episode.supports))
    assert all(s in ds.class_index[episode.class_id] and s != episode.query for s in episode.supports)


@pytest.mark.parametrize("shot", [1, 5])
def test_free_mode_follows_the_protocol_and_redraws_every_epoch(train_set: FSSDataset, shot: int) -> None:
    sampler = EpisodeSampler(train_set, shot=shot, seed=7)
    assert sampler.mode == "free" and len(sampler) == len(train_set.items)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        episodes = list(sampler)
        assert [e.query for e in episodes] == train_set.items
        for episode in episodes:
            check_episode(train_set, episode, shot)
        epochs.append(episodes)
    assert epochs[0] != epochs[1] != epochs[2]
    # an episode depends on (seed, epoch, index) only: any order, any copy of the sampler
    copy = pickle.loads(pickle.dumps(sampler))
    assert [copy.episode(i, epoch=1) for i in reversed(range(len(copy)))] == epochs[1][::-1]
    assert EpisodeSampler(train_set, shot=shot, seed=8).epoch_episodes(1) != epochs[1]


def test_planned_mode_draws_only_planned_episodes(tmp_path: Path) -> None:
    path = run_job(tmp_path / "planned.h5", n_images=3, n_episodes=12)  # image 1: episodes of class 1 and 2
    cache = PriorCache(path)
    sampler = EpisodeSampler(cache=cache, shot=1, seed=0)
    assert sampler.mode == "planned" and len(sampler) == 3
    chosen = set()
    for epoch in range(8):
        sampler.set_epoch(epoch)
        for episode in sampler:
            cache.find_episode(episode.query_image, episode.class_id, [s[0] for s in episode.supports])  # served
            chosen.add((episode.query_image, episode.class_id))
    assert len(chosen) == 4  # both planned classes of image 1 come up over the epochs
    with pytest.raises(InvalidInputError, match="5-shot"):
        EpisodeSampler(cache=cache, shot=5)


class PoolCache:
    """What a --supports-per-query cache offers the sampler (store and support_pool)."""

    store = "pool"

    def __init__(self, ds: FSSDataset, m: int) -> None:
        self.pools: dict[tuple[str, int], list[str]] = {}
        for c, pairs in ds.class_index.items():
            for image, _ in pairs:
                others = [i for i, _ in pairs if i != image]
                self.pools[(image, c)] = others[:m]

    def support_pool(self, query: str, class_id: int) -> list[str]:
        return self.pools[(query, class_id)]

    def __repr__(self) -> str:
        return "PoolCache('pool.h5')"


def test_pool_mode_draws_among_the_planned_supports(train_set: FSSDataset) -> None:
    cache = PoolCache(train_set, m=5)
    sampler = EpisodeSampler(train_set, shot=2, seed=3, cache=cache)
    assert sampler.mode == "pool"
    for epoch in range(3):
        for episode in sampler.epoch_episodes(epoch):
            check_episode(train_set, episode, 2)
            assert {s[0] for s in episode.supports} <= set(cache.pools[(episode.query_image, episode.class_id)])
    with pytest.raises(CacheKeyError, match=r"plans 5 support\(s\).*--supports-per-query M"):
        EpisodeSampler(train_set, shot=6, seed=3, cache=cache).episode(0)
    with pytest.raises(InvalidInputError, match="supports-per-query"):
        EpisodeSampler(train_set, cache=object(), mode="pool")


def test_mode_follows_the_cache_store(train_set: FSSDataset) -> None:
    features = SimpleNamespace(has_features=True, provenance={"store": "features"})
    assert EpisodeSampler(train_set, cache=features).mode == "free"
    pool = SimpleNamespace(provenance={"store": "pool"}, support_pool=lambda q, c: [])
    assert EpisodeSampler(train_set, cache=pool).mode == "pool"
    maps = SimpleNamespace(provenance={"store": "maps"}, episodes=[])
    with pytest.raises(InvalidInputError, match="no episodes"):
        EpisodeSampler(train_set, cache=maps)  # planned mode, and this cache plans nothing


def test_prior_channels_order_and_scale() -> None:
    vtp = torch.rand(1, 6, 6)
    vvp = torch.rand(10, 6, 6)  # 5-shot
    out = prior_channels(vtp, vvp)
    assert out.shape == (12, 6, 6)
    assert torch.equal(out[0], vtp[0] * 10) and torch.equal(out[1], vtp[0] * 10)
    assert torch.equal(out[2:], vvp * 10)
    batched = prior_channels(vtp[None].repeat(3, 1, 1, 1), vvp[None].repeat(3, 1, 1, 1), scale=1.0)
    assert batched.shape == (3, 12, 6, 6) and torch.equal(batched[1, 2:], vvp)
    assert prior_channels(vtp[0], vvp[:2]).shape == (4, 6, 6)  # 1-shot, PI-CLIP's query_merge width 516 = 512 + 4
    assert clipprior.prior_channels is prior_channels
    with pytest.raises(InvalidInputError):
        prior_channels(vtp, torch.rand(3, 6, 6))
    with pytest.raises(InvalidInputError):
        prior_channels(vtp, torch.rand(2, 5, 6))


def test_reverse_shots_and_base_label() -> None:
    vvp = torch.arange(10.0).view(10, 1, 1)
    assert reverse_shots(vvp).flatten().tolist() == [4, 3, 2, 1, 0, 9, 8, 7, 6, 5]
    assert torch.equal(reverse_shots(reverse_shots(vvp)), vvp)
    assert torch.equal(reverse_shots(vvp[:2]), vvp[:2])
    base = fold_classes("pascal5i", 1, "train")  # 1..5, 11..20
    label = np.array([[0, 1, 5, 6, 11, 20, 255]], np.uint8)
    assert base_label(label, base).tolist() == [[0, 1, 5, 0, 6, 15, 255]]


def test_sampler_errors(train_set: FSSDataset) -> None:
    with pytest.raises(InvalidInputError, match="shot"):
        EpisodeSampler(train_set, shot=0)
    with pytest.raises(InvalidInputError, match="mode"):
        EpisodeSampler(train_set, mode="any")
    with pytest.raises(InvalidInputError, match="cache="):
        EpisodeSampler(train_set, mode="planned")
    with pytest.raises(InvalidInputError, match="dataset"):
        EpisodeSampler(None)
    with pytest.raises(IndexError):
        EpisodeSampler(train_set)[len(train_set.items)]
    with pytest.raises(InvalidInputError, match="epoch"):
        EpisodeSampler(train_set).set_epoch(-1)
    assert EpisodeSampler(SimpleNamespace(items=[("a", "b")]), mode="free").queries == [("a", "b")]
