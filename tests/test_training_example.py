"""examples/train_pfenet_style.py trains a small PFENet-style model from a cache, in DataLoader workers.

The cache is made as docs/training-loop.md says (``clipprior precompute --split train``, a tiny
random CLIP, a synthetic PASCAL-5i); the loop's own sampler draws random episodes every epoch and
every one of them must be served by the cache.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from click.testing import CliRunner

from clipprior.cache import PriorCache
from clipprior.cli.main import app
from clipprior.data.synthetic import write_synthetic_pascal

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DOC = EXAMPLES.parent / "docs" / "training-loop.md"
MARK = "# from examples/train_pfenet_style.py\n"


@pytest.fixture(scope="module")
def example() -> ModuleType:
    sys.path.insert(0, str(EXAMPLES))  # spawned workers inherit sys.path and import the module by name
    try:
        yield importlib.import_module("train_pfenet_style")  # type: ignore[misc]
    finally:
        sys.path.remove(str(EXAMPLES))
        sys.modules.pop("train_pfenet_style", None)


@pytest.fixture(scope="module")
def voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # per_class=7: every class has >= 5 supports besides any query, so every 5-shot draw exists
    return write_synthetic_pascal(tmp_path_factory.mktemp("voc") / "VOC2012", per_class=7, size=(64, 96))


@pytest.fixture(scope="module")
def caches(voc: Path, tiny_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Planned-episode training caches, 1- and 5-shot."""
    out = tmp_path_factory.mktemp("caches")
    return {shot: _train_cache(voc, tiny_clip_dir, out / f"train-{shot}shot.h5", shot, "--episodes", str(n))
            for shot, n in ((1, 24), (5, 10))}


def _train_cache(voc: Path, model: Path, path: Path, shot: int, *store: str) -> Path:
    """``clipprior precompute`` of a fold-0 training cache with ``shot`` and the ``store`` options."""
    result = CliRunner().invoke(app, [
        "precompute", "--dataset", "pascal5i", "--fold", "0", "--split", "train", "--data-root", str(voc),
        "--model", str(model), "--device", "cpu", "--shot", str(shot), "--seed", "1", *store, "--out", str(path)],
        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return path


def _two_epochs(example: ModuleType, cache: Path, voc: Path, shot: int, start_method: str) -> dict:
    """Two epochs of the example loop (batches of 4, two workers); each epoch must draw every batch."""
    history = example.train(cache, voc, shot=shot, epochs=2, batch_size=4, workers=2, start_method=start_method,
                            image_size=48, feature_size=6, seed=3)
    assert [len(seen) for seen in history["episodes"]] == [history["queries"] // 4 * 4] * 2
    assert history["episodes"][0] != history["episodes"][1] and np.isfinite(history["losses"]).all()
    return history


@pytest.mark.parametrize(("shot", "start_method", "epochs"), [
    (1, "fork", 2), (5, "fork", 2), pytest.param(1, "spawn", 2, marks=pytest.mark.slow),
])
def test_loop_trains_on_every_drawn_episode(example: ModuleType, caches: dict[int, Path], voc: Path, shot: int,
                                            start_method: str, epochs: int) -> None:
    history = example.train(caches[shot], voc, shot=shot, epochs=epochs, batch_size=4, workers=2,
                            start_method=start_method, image_size=48, feature_size=6, seed=3)
    cache = PriorCache(caches[shot])
    planned = {f"{e.query_image}|{e.class_id}|{'|'.join(e.support_images)}" for e in cache.episodes}
    assert history["mode"] == "planned"
    per_epoch = [len(seen) for seen in history["episodes"]]
    assert per_epoch == [history["queries"] // 4 * 4] * epochs and per_epoch[0] >= 8  # drop_last batches of 4
    for seen in history["episodes"]:
        assert set(seen) <= planned  # every drawn episode was served from the cache
        assert len({key.split("|")[0] for key in seen}) == len(seen)  # one episode per query and epoch
    assert history["episodes"][0] != history["episodes"][1]  # fresh draws (and order) every epoch
    assert np.isfinite(history["losses"]).all()


def test_loop_in_pi_clip_order_with_crops(example: ModuleType, caches: dict[int, Path], voc: Path) -> None:
    history = example.train(caches[5], voc, shot=5, epochs=1, batch_size=2, workers=0, image_size=40,
                            feature_size=5, trainer="pfenet", pi_clip_order=True, max_iters=2)
    assert len(history["losses"]) == 2 and np.isfinite(history["losses"]).all()


def test_dataset_item_fields(example: ModuleType, caches: dict[int, Path], voc: Path) -> None:
    from clipprior.data import open_dataset

    ds = open_dataset("pascal5i", voc, fold=0, split="train")
    items = example.TrainEpisodes(ds, PriorCache(caches[5]), shot=5, seed=0, image_size=48, feature_size=6)
    item = items[0]
    assert tuple(item["query"].shape) == (3, 48, 48) and tuple(item["supports"].shape) == (5, 3, 48, 48)
    assert tuple(item["label"].shape) == (48, 48) and tuple(item["support_labels"].shape) == (5, 48, 48)
    assert tuple(item["vtp"].shape) == (1, 6, 6) and tuple(item["vvp"].shape) == (10, 6, 6)
    assert set(item["label"].unique().tolist()) <= {0, 1, 255}
    assert item["subcls"] == items.base_classes.index(item["class_id"])
    # label_b: the episode's class is a base class, so where label is 1, label_b is its rank (1-based)
    assert (item["label_b"][item["label"] == 1] == item["subcls"] + 1).all()
    main_exit = example.main(["--cache", str(caches[1]), "--data-root", str(voc), "--workers", "0", "--epochs", "1",
                              "--image-size", "32", "--feature-size", "4", "--max-iters", "1"])
    assert main_exit == 0


def test_documented_excerpts_are_the_example_code() -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    excerpts = [b[len(MARK):] for b in blocks if b.startswith(MARK)]
    assert len(excerpts) >= 4
    source = (EXAMPLES / "train_pfenet_style.py").read_text()
    for excerpt in excerpts:
        assert excerpt in source, excerpt[:200]


@pytest.mark.parametrize(("shot", "start_method"), [(1, "fork"), (5, "fork"), (1, "spawn")])
def test_loop_on_a_features_cache_is_never_missed(example: ModuleType, voc: Path, tiny_clip_dir: Path,
                                                  tmp_path: Path, shot: int, start_method: str) -> None:
    """A features cache serves any episode: the loop draws freely (the trainer's own protocol), no miss."""
    path = _train_cache(voc, tiny_clip_dir, tmp_path / f"features-{shot}.h5", shot, "--episodes", "4",
                        "--store", "features")
    history = _two_epochs(example, path, voc, shot, start_method)
    assert history["mode"] == "free"
    planned = {f"{e.query_image}|{e.class_id}|{'|'.join(e.support_images)}" for e in PriorCache(path).episodes}
    drawn = set().union(*history["episodes"])
    assert len(drawn - planned) >= len(drawn) - 4  # the cache planned 4 episodes; every other draw was served too


@pytest.mark.parametrize(("shot", "start_method"), [(1, "fork"), (5, "fork"), (1, "spawn")])
def test_loop_on_a_pool_cache_serves_every_drawn_episode(example: ModuleType, voc: Path, tiny_clip_dir: Path,
                                                         tmp_path: Path, shot: int, start_method: str) -> None:
    path = _train_cache(voc, tiny_clip_dir, tmp_path / f"pool-{shot}.h5", shot, "--supports-per-query", str(shot + 1))
    history = _two_epochs(example, path, voc, shot, start_method)
    assert history["mode"] == "pool"
    cache = PriorCache(path)
    for key in set().union(*history["episodes"]):  # every drawn episode: K distinct supports of its planned pool
        query, class_id, *supports = key.split("|")
        assert len(set(supports)) == shot and set(supports) <= set(cache.support_pool(query, int(class_id)))
