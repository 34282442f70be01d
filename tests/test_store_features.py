"""``--store features``: a cache that serves the VVP of any episode, planned or not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from clipprior import PriorCache, load_clip
from clipprior.cache._features import feature_map, unpack_features
from clipprior.cli.main import app
from clipprior.data import open_dataset, prompt_names
from clipprior.errors import CacheKeyError
from clipprior.precompute.load import fss_mask
from clipprior.preprocess import vvp_inputs
from clipprior.priors import compute_priors, vvp

#: float16 unit features: each cosine is off by at most ~sqrt(D) * 2**-11 (D = 64 here); measured ~3e-4.
FEATURE_TOL = 2e-3


def _precompute(data_root: Path, model: Path, out: Path, *extra: str) -> PriorCache:
    args = ["precompute", "--dataset", "pascal5i", "--fold", "0", "--split", "train", "--data-root", str(data_root),
            "--model", str(model), "--device", "cpu", "--episodes", "4", "--seed", "5", "--out", str(out), *extra]
    res = CliRunner().invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return PriorCache(out)


@pytest.fixture(scope="module")
def features_cache(tmp_path_factory, data_root, tiny_clip_dir) -> PriorCache:
    return _precompute(data_root, tiny_clip_dir, tmp_path_factory.mktemp("feat") / "f.h5", "--store", "features")


def _random_episodes(data, rng: np.random.Generator, n: int, shot: int) -> list[tuple[str, str, int, list]]:
    out = []
    while len(out) < n:
        image, label = data.items[int(rng.integers(len(data.items)))]
        present = data.present_classes(label)
        if not present:
            continue
        class_id = int(present[int(rng.integers(len(present)))])
        pool = [p for p in data.class_index[class_id] if p != (image, label)]
        if len(pool) < shot:
            continue
        picks = rng.choice(len(pool), size=shot, replace=False)
        out.append((image, label, class_id, [pool[int(k)] for k in picks]))
    return out


def test_features_cache_serves_unplanned_episodes_like_vvp_from_images(features_cache, data_root, clip):
    cache = features_cache
    assert cache.has_features and cache.provenance["store"] == "features"
    data = open_dataset("pascal5i", data_root, 0, "train")
    config = cache.config
    planned = {(e.query_image, e.class_id, e.support_images) for e in cache}
    unplanned = 0
    errors = []
    for image, _label, class_id, supports in _random_episodes(data, np.random.default_rng(0), 6, shot=1):
        unplanned += (image, class_id, tuple(s[0] for s in supports)) not in planned
        vtp_map, vvp_map = cache.episode_priors(image, class_id, supports)
        # vvp() from the images, float32: the query and the masked support as the engine prepares them.
        qpix, _ = vvp_inputs(data.load_image(image), None, clip.patch_size, config)
        simg, slab = supports[0]
        spix, smask = vvp_inputs(data.load_image(simg), fss_mask(data.load_label(slab), class_id), clip.patch_size,
                                 config)
        ref = vvp(clip, qpix[None], spix[None, None], smask[None, None], config=config)[0]
        assert vvp_map.shape == ref.shape and vtp_map.shape == (1, *ref.shape[-2:])
        errors.append(float((vvp_map - ref).abs().max()))
        torch.testing.assert_close(vtp_map[0], cache.vtp(image, class_id))
    assert max(errors) <= FEATURE_TOL, errors
    assert unplanned >= 4  # the random episodes are (mostly) not the cache's planned ones


@pytest.mark.parametrize("shot", [2])
def test_k_shot_channel_order_matches_compute_priors(features_cache, data_root, clip, shot):
    cache = features_cache
    data = open_dataset("pascal5i", data_root, 0, "train")
    names = prompt_names("pascal5i")
    for image, _label, class_id, supports in _random_episodes(data, np.random.default_rng(shot), 2, shot=shot):
        _, got = cache.episode_priors(image, class_id, supports, size=(20, 30))
        masks = [fss_mask(data.load_label(lab), class_id) for _, lab in supports]
        images = [data.load_image(s) for s, _ in supports]
        ref = compute_priors(clip, data.load_image(image), names[class_id - 1], images, masks, config=cache.config).vvp
        ref = torch.nn.functional.interpolate(ref[None], size=(20, 30), mode="bilinear", align_corners=False)[0]
        assert got.shape == (2 * shot, 20, 30)  # layer-major: last layer's K shots, then the previous layer's
        assert float((got - ref).abs().max()) <= FEATURE_TOL


def test_planned_episodes_agree_with_their_stored_maps(features_cache):
    cache = features_cache
    for episode in cache:
        _, got = cache.episode_priors(episode.query, episode.class_id, episode.supports)
        assert float((got - cache.vvp(episode.index)).abs().max()) <= FEATURE_TOL


def test_maps_cache_serves_planned_episodes_and_says_how_to_serve_others(tmp_path, data_root, tiny_clip_dir):
    cache = _precompute(data_root, tiny_clip_dir, tmp_path / "m.h5")
    assert not cache.has_features and "store" not in cache.provenance
    episode = next(iter(cache))
    vtp_map, vvp_map = cache.episode_priors(episode.query, episode.class_id, episode.supports, size=(8, 8),
                                            align_corners=True)
    assert vtp_map.shape == (1, 8, 8) and vvp_map.shape == (2, 8, 8)
    with pytest.raises(CacheKeyError, match="--store features"):
        cache.query_features(episode.query)
    others = [k for k in cache.images if k not in episode.support_images and k != episode.query_image]
    with pytest.raises(CacheKeyError, match=r"no episode with query.*--store features"):
        cache.episode_priors(episode.query, episode.class_id, others[:1])


def test_features_cache_holds_the_declared_feature_tables(features_cache):
    import h5py

    from clipprior.cache._format import TABLES, kinds_of

    with h5py.File(features_cache.path, "r") as f:
        for table in TABLES.values():
            rows = f[table.grid].shape[0]
            assert rows > 0, table.group
            for path, dtype in table.key_columns:
                assert f[path].shape == (rows,) and f[path].dtype == dtype
            for kind in kinds_of(table.group):
                assert f[kind.name].shape[0] == rows and f[kind.name].dtype == kind.dtype
                assert f[kind.name].ndim == 1 + kind.ndim


def test_inspect_and_verify_list_the_feature_tables(features_cache):
    """inspect and verify iterate the declared tables: a features cache shows its optional feature tables."""
    from click.testing import CliRunner

    from clipprior.cache import TABLES, check_cache
    from clipprior.cli.main import app

    result = CliRunner().invoke(app, ["inspect", str(features_cache.path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    query, support = len(features_cache.feature_keys()[0]), len(features_cache.feature_keys()[1])
    assert f"query features entries   │ {query} x " in result.output
    assert f"support features entries │ {support} x " in result.output
    report = check_cache(features_cache)
    assert list(report.entries) == list(TABLES) and report.entries["qfeat"] == query
    assert report.describe_entries().endswith(f"{query} query features and {support} support features entries")
    result = CliRunner().invoke(app, ["verify", str(features_cache.path)], terminal_width=200)
    assert result.exit_code == 0 and report.describe_entries() in result.output


def test_feature_packing_round_trip():
    feats = torch.randn(2, 12, 8)
    back = unpack_features(feature_map(feats, (3, 4)), 2)
    unit = feats / feats.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(back, unit)


def _features_args(data_root: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return ["precompute", "--dataset", "pascal5i", "--fold", "0", "--split", "train", "--data-root", str(data_root),
            "--model", str(model), "--device", "cpu", "--episodes", "2", "--seed", "5", "--store", "features",
            "--batch-size", "2", "--chunk-images", "3", "--workers", "1", "--out", str(out), *extra]


def _assert_same_features(a: PriorCache, b: PriorCache) -> None:
    queries, supports = a.feature_keys()
    assert (sorted(queries), sorted(supports)) == tuple(sorted(k) for k in b.feature_keys())
    assert sorted(a.vtp_keys()) == sorted(b.vtp_keys())
    for key in queries:
        np.testing.assert_array_equal(a.query_features(key).numpy(), b.query_features(key).numpy(), err_msg=key)
    for key in supports:
        for x, y in zip(a.support_features(*key), b.support_features(*key), strict=True):
            np.testing.assert_array_equal(x.numpy(), y.numpy(), err_msg=str(key))
    for key in a.vtp_keys():
        np.testing.assert_array_equal(a.vtp(*key).numpy(), b.vtp(*key).numpy(), err_msg=str(key))


def test_features_cover_the_lists_and_an_interrupted_run_resumes_to_the_same_cache(tmp_path, data_root, tiny_clip_dir,
                                                                                  monkeypatch):
    reference = tmp_path / "reference.h5"
    assert CliRunner().invoke(app, _features_args(data_root, tiny_clip_dir, reference)).exit_code == 0
    ref = PriorCache(reference)
    data = open_dataset("pascal5i", data_root, 0, "train")
    queries, supports = ref.feature_keys()
    assert set(queries) == {image for image, label in data.items if data.present_classes(label)}
    assert set(supports) == {(image, c) for c in data.classes for image, _ in data.class_index[c]}
    assert {(image, c) for image, label in data.items for c in data.present_classes(label)} <= set(ref.vtp_keys())

    import clipprior.precompute.features as stage

    calls = {"n": 0}
    real = stage.support_pass

    def dies_midway(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # after the query chunks and some support chunks were committed
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path / "interrupted.h5"
    monkeypatch.setattr(stage, "support_pass", dies_midway)
    stopped = CliRunner().invoke(app, _features_args(data_root, tiny_clip_dir, out))
    assert stopped.exit_code != 0 and not out.exists()
    monkeypatch.setattr(stage, "support_pass", real)
    resumed = CliRunner().invoke(app, _features_args(data_root, tiny_clip_dir, out))
    assert resumed.exit_code == 0, resumed.output
    _assert_same_features(ref, PriorCache(out))


def test_features_shards_merge_to_the_single_run(tmp_path, data_root, tiny_clip_dir, features_cache):
    single = tmp_path / "single.h5"
    assert CliRunner().invoke(app, _features_args(data_root, tiny_clip_dir, single)).exit_code == 0
    for i in range(2):
        res = CliRunner().invoke(app, _features_args(data_root, tiny_clip_dir, tmp_path / "s.h5", "--shard", f"{i}/2"))
        assert res.exit_code == 0, res.output
    merged = tmp_path / "merged.h5"
    res = CliRunner().invoke(app, ["merge", str(merged), *map(str, sorted(tmp_path.glob("s.shard-*")))])
    assert res.exit_code == 0, res.output
    assert PriorCache(merged).has_features
    _assert_same_features(PriorCache(single), PriorCache(merged))


def test_features_skip_a_broken_support_and_serve_the_rest(tmp_path, data_root, tiny_clip_dir):
    import shutil

    root = tmp_path / "voc"
    shutil.copytree(data_root, root)
    data = open_dataset("pascal5i", root, 0, "train")
    broken = data.class_index[data.classes[0]][0][0]
    (root / broken).write_bytes(b"")  # a zero-byte JPEG
    out = tmp_path / "skip.h5"
    raised = CliRunner().invoke(app, _features_args(root, tiny_clip_dir, tmp_path / "raise.h5", "--episodes", "1"))
    assert raised.exit_code == 1 and broken in raised.output and "Traceback" not in raised.output
    res = CliRunner().invoke(app, _features_args(root, tiny_clip_dir, out, "--on-error", "skip"))
    assert res.exit_code == 0, res.output
    assert Path(broken).name in res.output
    cache = PriorCache(out)
    queries, supports = cache.feature_keys()
    assert supports and all(image != broken for image, _ in supports) and broken not in queries
    assert len(queries) == len({image for image, label in data.items if data.present_classes(label)}) - 1
    with pytest.raises(CacheKeyError, match="broken"):
        cache.support_features(broken, 6)


class _Fold:
    """One official reference case as a fold: the query is the list, the supports are class 1's support list."""

    def __init__(self, case: dict[str, np.ndarray]) -> None:
        shots = case["supports"].shape[0]
        self.images = {"q": case["query"], **{f"s{i}": case["supports"][i] for i in range(shots)}}
        self.labels = {"q.png": np.where(case["masks"][0] == 255, 255, 1).astype(np.uint8),
                       **{f"s{i}.png": case["masks"][i] for i in range(shots)}}
        self.classes = [1]
        self.items = [("q", "q.png")]
        self.class_index = {1: [(f"s{i}", f"s{i}.png") for i in range(shots)]}

    def load_image(self, path: str) -> np.ndarray:
        return self.images[path]

    def load_label(self, path: str) -> np.ndarray:
        return self.labels[path]

    def present_classes(self, label: str) -> list[int]:
        return [1]


class _FeatureCollect:
    """A writer keeping the feature stage's entries as given (float32, before the cache's float16 storage)."""

    def __init__(self) -> None:
        self.queries: dict[str, torch.Tensor] = {}
        self.supports: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.vtp: set[tuple[str, int]] = set()
        self.images: set[str] = set()

    def has_query_features(self, image: str) -> bool:
        return image in self.queries

    def has_support_features(self, image: str, class_id: int) -> bool:
        return (image, class_id) in self.supports

    def add_query_features(self, image: str, features) -> None:
        self.queries[image] = torch.as_tensor(np.asarray(features, dtype=np.float32))

    def add_support_features(self, image: str, class_id: int, features, mask) -> None:
        self.supports[(image, class_id)] = (torch.as_tensor(np.asarray(features, dtype=np.float32)),
                                            torch.as_tensor(np.asarray(mask, dtype=np.float32)))

    def has_vtp(self, image: str, class_id: int) -> bool:
        return (image, class_id) in self.vtp

    def add_vtp(self, image: str, class_id: int, cam, refined) -> None:
        self.vtp.add((image, class_id))

    def has_image(self, image: str) -> bool:
        return image in self.images

    def add_image(self, image: str, height: int, width: int) -> None:
        self.images.add(image)

    def commit(self) -> int:
        return 0


def _reference_cases() -> list[tuple[str, int]]:
    from tests.conftest import reference_dir

    out = []
    for path in sorted(reference_dir().glob("vvp_*.npz")):
        with np.load(path) as data:
            out += [(path.name, k) for k in range(int(data["n"]))]
    return out


@pytest.mark.parametrize(("file", "k"), _reference_cases())
def test_official_geometry_features_give_the_official_vvp(file, k):
    """The feature stage in the official geometry, read back as any episode, equals the official ``vvp``."""
    from clipprior import get_preset
    from clipprior.cache._features import vvp_from_stored
    from clipprior.precompute import store_features
    from tests.conftest import reference_dir

    ref = reference_dir()
    with np.load(ref / file) as data:
        case = {key.split("_", 1)[1]: data[key] for key in data.files if key.startswith(f"{k}_")}
    clip = load_clip(sorted(ref.glob("*.safetensors"))[0], device="cpu")
    config = get_preset("official").replace(geometry="official", geometry_size=case["query"].shape[0])
    fold, writer = _Fold(case), _FeatureCollect()
    store_features(clip, fold, writer, class_names=["cat"], config=config, workers=0)
    shots = case["supports"].shape[0]
    got = vvp_from_stored(writer.queries["q"], [writer.supports[(f"s{i}", 1)] for i in range(shots)], config)
    np.testing.assert_allclose(got.numpy(), case["vvp"], atol=1e-4, rtol=0)  # (L*K, h, w), official order
