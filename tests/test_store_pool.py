"""Pool caches (``precompute --supports-per-query M``): M planned supports per (query, class), any K served."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from clipprior import EpisodeSampler, PriorCache, load_clip, pool_episodes
from clipprior.cli.main import app
from clipprior.data import open_dataset, prompt_names
from clipprior.data.synthetic import write_synthetic_pascal
from clipprior.errors import CacheKeyError, DatasetError, InvalidInputError
from clipprior.precompute.load import fss_mask
from clipprior.priors import compute_priors

#: Maps are stored as float16: values in [0, 1] are off by at most 2**-11.
STORED_TOL = 1e-3


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_pascal(tmp_path_factory.mktemp("voc"), per_class=4, size=(72, 100))


def _pool_args(data_root: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return ["precompute", "--dataset", "pascal5i", "--fold", "0", "--split", "train", "--data-root", str(data_root),
            "--model", str(model), "--device", "cpu", "--seed", "2", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def pool_cache(tmp_path_factory, data_root, tiny_clip_dir) -> PriorCache:
    out = tmp_path_factory.mktemp("pool") / "pool.h5"
    result = CliRunner().invoke(app, _pool_args(data_root, tiny_clip_dir, out, "--shot", "2",
                                                "--supports-per-query", "3"), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return PriorCache(out)


def test_pool_episodes_plan_every_query_and_present_class(data_root):
    data = open_dataset("pascal5i", data_root, 0, "train")
    episodes = pool_episodes(data, 3, seed=7)
    assert episodes == pool_episodes(data, 3, seed=7) and episodes != pool_episodes(data, 3, seed=8)
    pools: dict[tuple[str, int], list] = {}
    for e in episodes:
        assert len(e.supports) == 1 and e.supports[0] != (e.query_image, e.query_label)
        pools.setdefault((e.query_image, e.class_id), []).append(e.supports[0])
    expected = {(image, int(c)) for image, label in data.items for c in data.present_classes(label)}
    assert set(pools) == expected
    for (image, class_id), pool in pools.items():
        label = dict(data.items)[image]
        others = [p for p in data.class_index[class_id] if p != (image, label)]
        assert len(set(pool)) == len(pool) == min(3, len(others)) and set(pool) <= set(others)


def test_pool_of_a_query_does_not_depend_on_the_rest_of_the_list(data_root):
    data = open_dataset("pascal5i", data_root, 0, "train")
    full = pool_episodes(data, 2, seed=1)
    data.items = data.items[:3]  # a shorter list: the first queries keep their pools
    assert pool_episodes(data, 2, seed=1) == full[:len(pool_episodes(data, 2, seed=1))]


@pytest.mark.parametrize(("value", "name"), [(0, "supports_per_query"), (True, "supports_per_query"), (-1, "seed")])
def test_pool_episodes_refuse_bad_arguments(data_root, value, name):
    data = open_dataset("pascal5i", data_root, 0, "train")
    kwargs = {"supports_per_query": 2, "seed": 0, name: value}
    with pytest.raises(InvalidInputError, match=name):
        pool_episodes(data, **kwargs)


def test_pool_cache_records_its_store_and_pools(pool_cache, data_root):
    cache = pool_cache
    assert cache.store == "pool" and cache.has_pool and not cache.has_features
    assert cache.provenance["supports_per_query"] == 3 and cache.provenance["shot"] == 1
    data = open_dataset("pascal5i", data_root, 0, "train")
    for image, label in data.items:
        for class_id in data.present_classes(label):
            pool = cache.support_pool(image, class_id)
            assert 1 <= len(pool) <= 3 and image not in pool
    assert cache.support_pool("JPEGImages/none.jpg", 6) == []


def test_any_k_of_a_pool_is_the_k_shot_vvp_of_the_images(pool_cache, data_root, tiny_clip_dir):
    cache = pool_cache
    data = open_dataset("pascal5i", data_root, 0, "train")
    clip = load_clip(tiny_clip_dir, device="cpu")
    names = prompt_names("pascal5i")
    labels = dict(data.items)
    checked = 0
    for (image, class_id), pool in list(cache._index.pools.items())[:6]:
        if len(pool) < 2:
            continue
        supports = [pool[1], pool[0]]  # any order, any subset
        vtp_map, vvp_map = cache.episode_priors(image, class_id, supports)
        support_labels = [next(lab for img, lab in data.class_index[class_id] if img == s) for s in supports]
        ref = compute_priors(clip, data.load_image(image), names[class_id - 1], [data.load_image(s) for s in supports],
                             [fss_mask(data.load_label(lab), class_id) for lab in support_labels],
                             config=cache.config, query_label=data.load_label(labels[image])).vvp
        assert vvp_map.shape == ref.shape == (4, *ref.shape[-2:])  # layer-major: 2 layers x 2 shots
        assert float((vvp_map - ref).abs().max()) <= STORED_TOL
        torch.testing.assert_close(vtp_map[0], cache.vtp(image, class_id))
        checked += 1
    assert checked >= 3


def test_sampler_draws_only_what_the_pool_serves_and_a_miss_says_how_to_build_one(pool_cache, data_root):
    data = open_dataset("pascal5i", data_root, 0, "train")
    sampler = EpisodeSampler(data, shot=2, seed=0, cache=pool_cache)
    assert sampler.mode == "pool"
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for episode in sampler:
            keys = [s[0] for s in episode.supports]
            assert set(keys) <= set(pool_cache.support_pool(episode.query_image, episode.class_id))
            pool_cache.episode_priors(episode.query_image, episode.class_id, keys)  # served
    too_many = EpisodeSampler(data, shot=4, seed=0, cache=pool_cache)
    with pytest.raises((CacheKeyError, DatasetError), match=r"--supports-per-query"):
        too_many.epoch_episodes(0)


def test_pool_cache_names_its_pool_when_asked_for_other_supports(pool_cache):
    (image, class_id), pool = next(iter(pool_cache._index.pools.items()))
    others = [k for k in pool_cache.images if k not in pool and k != image]
    with pytest.raises(CacheKeyError, match=r"support_pool") as err:
        pool_cache.episode_priors(image, class_id, [others[0]])
    assert "--store features" in str(err.value)


@pytest.mark.parametrize(("extra", "message"), [
    (("--store", "features"), "--store features"),
    (("--episodes", "4"), "--episodes"),
    (("--shot", "5"), "--supports-per-query 5"),
])
def test_cli_refuses_what_a_pool_cannot_mean(tmp_path, data_root, tiny_clip_dir, extra, message):
    result = CliRunner().invoke(app, _pool_args(data_root, tiny_clip_dir, tmp_path / "x.h5",
                                                "--supports-per-query", "2", *extra))
    assert result.exit_code != 0 and message in result.output
    assert "Traceback" not in result.output and not (tmp_path / "x.h5").exists()


def test_maps_cache_stacks_planned_one_shot_episodes(tmp_path, data_root, tiny_clip_dir):
    """episode_priors of a maps cache: the planned episode, or a stack of planned one-shot episodes."""
    out = tmp_path / "m.h5"
    result = CliRunner().invoke(app, _pool_args(data_root, tiny_clip_dir, out, "--episodes", "12"),
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    cache = PriorCache(out)
    assert cache.store == "maps" and not cache.has_pool
    by_pair: dict[tuple[str, int], list[str]] = {}
    for e in cache:
        by_pair.setdefault((e.query, e.class_id), []).extend(e.supports)
    (query, class_id), supports = max(by_pair.items(), key=lambda kv: len(set(kv[1])))
    supports = list(dict.fromkeys(supports))
    _, single = cache.episode_priors(query, class_id, supports[:1])
    np.testing.assert_array_equal(single.numpy(), cache.vvp(query=query, class_id=class_id,
                                                            supports=supports[:1]).numpy())
    if len(supports) >= 2:
        _, both = cache.episode_priors(query, class_id, supports[:2])
        parts = [cache.vvp(query=query, class_id=class_id, supports=[s]) for s in supports[:2]]
        np.testing.assert_array_equal(both.numpy(), torch.stack(parts, 1).reshape(-1, *both.shape[-2:]).numpy())
