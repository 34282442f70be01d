"""PriorCache takes the trainer's own paths (list prefixes, absolute paths under data_root) and align_corners."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from clipprior.cache import PriorCache, resize_prior
from clipprior.errors import CacheKeyError
from tests._cache_job import episodes, image_key, run_job

N_IMAGES, N_EPISODES = 6, 5


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_job(tmp_path_factory.mktemp("keys") / "priors.h5", n_images=N_IMAGES, n_episodes=N_EPISODES)


@pytest.fixture(scope="module")
def coco_cache_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache whose keys are not in its dataset's layout: only data_root can map absolute paths onto them."""
    return run_job(tmp_path_factory.mktemp("keys-coco") / "priors.h5", n_images=N_IMAGES, n_episodes=N_EPISODES,
                   dataset="coco20i")


@pytest.mark.parametrize("path", [
    "JPEGImages/img_0002.jpg",
    "../data/VOCdevkit2012/VOC2012/JPEGImages/img_0002.jpg",  # PI-CLIP's list prefix
    "/data/VOCdevkit2012/VOC2012/JPEGImages/img_0002.jpg",
    r"C:\data\VOC2012\JPEGImages\img_0002.jpg",
    "./JPEGImages/img_0002.jpg",
])
def test_list_paths_map_by_the_list_rule(cache_path: Path, path: str) -> None:
    cache = PriorCache(cache_path)
    assert cache.image_key(path) == "JPEGImages/img_0002.jpg"
    assert torch.equal(cache.vtp(path, 1), cache.vtp("JPEGImages/img_0002.jpg", 1))
    assert cache.image_size(path) == cache.image_size("JPEGImages/img_0002.jpg")
    assert cache.has_vtp(path, 1)


def test_absolute_paths_under_data_root(coco_cache_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    cache = PriorCache(coco_cache_path, data_root="~/data/mine")
    assert cache.data_root == tmp_path / "data" / "mine"
    absolute = str(tmp_path / "data" / "mine" / "JPEGImages" / "img_0001.jpg")
    assert cache.image_key(absolute) == "JPEGImages/img_0001.jpg"
    assert cache.image_key("~/data/mine/JPEGImages/img_0001.jpg") == "JPEGImages/img_0001.jpg"
    assert torch.equal(cache.vtp(absolute, 1), cache.vtp("JPEGImages/img_0001.jpg", 1))
    # the same path without data_root: COCO's rule does not know JPEGImages/
    with pytest.raises(CacheKeyError, match=r"not inside .*train2014"):
        PriorCache(coco_cache_path).vtp(absolute, 1)
    restored = pickle.loads(pickle.dumps(cache))
    assert restored.data_root == cache.data_root and restored.image_key(absolute) == "JPEGImages/img_0001.jpg"


def test_episodes_by_trainer_paths(cache_path: Path, tmp_path: Path) -> None:
    cache = PriorCache(cache_path, data_root=tmp_path)
    episode = episodes(N_IMAGES, N_EPISODES)[3]
    prefix = "../data/VOCdevkit2012/VOC2012/"
    query, supports = prefix + episode.query_image, [str(tmp_path / s) for s in episode.support_images]
    assert cache.find_episode(query, episode.class_id, supports) == episode.index
    assert torch.equal(cache.vvp(query=query, class_id=episode.class_id, supports=supports), cache.vvp(episode.index))


def test_misses_say_what_was_tried(cache_path: Path, tmp_path: Path) -> None:
    cache = PriorCache(cache_path, data_root=tmp_path / "VOC2012")
    with pytest.raises(CacheKeyError) as err:
        cache.vtp("/elsewhere/JPEGImages/img_0099.jpg", 1)
    message = str(err.value)
    assert "img_0099.jpg" in message and "not under data_root" in message
    assert "by the pascal5i list rule: 'JPEGImages/img_0099.jpg'" in message
    with pytest.raises(CacheKeyError, match="not inside"):
        cache.vtp("somewhere/img_0001.png", 1)
    assert not cache.has_vtp("/elsewhere/img_0099.jpg", 1)
    with pytest.raises(KeyError):  # CacheKeyError is a KeyError
        cache.find_episode("JPEGImages/img_0000.jpg", 1, ["JPEGImages/nope.jpg"])


def test_align_corners_on_resizing(cache_path: Path) -> None:
    cache = PriorCache(cache_path)
    key = image_key(1)
    grid = cache.vtp(key, 1)
    for corners in (False, True):
        assert torch.equal(cache.vtp(key, 1, size=(60, 60), align_corners=corners),
                           resize_prior(grid, (60, 60), align_corners=corners))
        assert torch.equal(cache.vvp(2, size=(60, 60), align_corners=corners),
                           resize_prior(cache.vvp(2), (60, 60), align_corners=corners))
    assert not torch.equal(cache.vtp(key, 1, size=(60, 60), align_corners=True), cache.vtp(key, 1, size=(60, 60)))
    original = cache.vtp(key, 1, size="original", align_corners=True)
    assert torch.equal(original, resize_prior(grid, cache.image_size(key), align_corners=True))
