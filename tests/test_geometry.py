"""Official geometry (PriorConfig.geometry="official"): the priors the official model computes in its forward.

Golden: on the parity cases (../shared/reference/parity), the VVP that clipprior computes from the
images with the official geometry equals the official code's ``vvp`` (1e-4, float32 before storage),
through ``compute_priors`` and through the precompute engine.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from clipprior import PriorConfig, compute_priors, get_preset, load_clip
from clipprior.errors import InvalidInputError
from clipprior.precompute import build_provenance, geometry_description, run_precompute
from clipprior.preprocess import stretch, stretch_label, vtp_image, vvp_inputs
from tests.conftest import reference_dir

REF = reference_dir()
TOL = 1e-4


def _weights(ref: Path) -> Path:
    return sorted(ref.glob("*.safetensors"))[0]


def _vvp_cases() -> list[tuple[str, int]]:
    out = []
    for path in sorted(REF.glob("vvp_*.npz")):
        with np.load(path) as data:
            out += [(path.name, k) for k in range(int(data["n"]))]
    return out


def _case(file: str, k: int) -> dict[str, np.ndarray]:
    with np.load(REF / file) as data:
        return {key.split("_", 1)[1]: data[key] for key in data.files if key.startswith(f"{k}_")}


@pytest.fixture(scope="module")
def clip():
    return load_clip(_weights(REF), device="cpu")


def _official(size: int) -> PriorConfig:
    return get_preset("official").replace(geometry="official", geometry_size=size)


@pytest.mark.parametrize(("file", "k"), _vvp_cases())
def test_official_geometry_pixels_are_the_trainers_tensors(file, k):
    case = _case(file, k)
    size = case["query"].shape[0]
    config = _official(size)
    pixels, _ = vvp_inputs(case["query"], None, 16, config)
    np.testing.assert_allclose(pixels[None].numpy(), case["x"], atol=1e-5, rtol=0)
    for shot in range(case["supports"].shape[0]):
        spix, slab = vvp_inputs(case["supports"][shot], case["masks"][shot], 16, config)
        np.testing.assert_allclose(spix.numpy(), case["s_x"][0, shot], atol=1e-5, rtol=0)
        assert torch.equal(slab, torch.from_numpy(case["masks"][shot].astype(np.int64)))


@pytest.mark.parametrize(("file", "k"), _vvp_cases())
def test_official_geometry_vvp_from_images_equals_official_vvp(clip, file, k):
    case = _case(file, k)
    size = case["query"].shape[0]
    supports = list(case["supports"])
    masks = list(case["masks"])
    config = _official(size).replace(text_classes="target")  # VVP does not depend on the softmax class set
    pri = compute_priors(clip, case["query"], "cat", supports, masks, config=config)
    np.testing.assert_allclose(pri.vvp.numpy(), case["vvp"], atol=TOL, rtol=0)


class _Data:
    """An in-memory dataset: image and label arrays by key."""

    def __init__(self, images: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> None:
        self.images, self.labels = images, labels

    def load_image(self, path: str) -> np.ndarray:
        return self.images[path]

    def load_label(self, path: str) -> np.ndarray:
        return self.labels[path]


class _Collect:
    """A writer that keeps what the engine writes, in float32 (before any storage rounding)."""

    def __init__(self) -> None:
        self.vtp: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        self.vvp: dict[int, np.ndarray] = {}
        self.images: dict[str, tuple[int, int]] = {}

    def has_vtp(self, image_key: str, class_id: int) -> bool:
        return (image_key, class_id) in self.vtp

    def has_vvp(self, episode_index: int) -> bool:
        return episode_index in self.vvp

    def has_image(self, image_key: str) -> bool:
        return image_key in self.images

    def add_image(self, image_key: str, height: int, width: int) -> None:
        self.images[image_key] = (height, width)

    def add_vtp(self, image_key: str, class_id: int, cam, refined) -> None:
        self.vtp[(image_key, class_id)] = (np.asarray(cam), np.asarray(refined))

    def add_vvp(self, episode_index: int, vvp) -> None:
        self.vvp[episode_index] = np.asarray(vvp, dtype=np.float32)

    def commit(self) -> int:
        return 0

    def set_episodes(self, episodes) -> None:
        self.episodes = list(episodes)


@pytest.mark.parametrize(("file", "k"), _vvp_cases())
def test_official_geometry_engine_vvp_equals_official_vvp(clip, file, k):
    case = _case(file, k)
    size = case["query"].shape[0]
    shots = case["supports"].shape[0]
    query_label = np.where(case["masks"][0] == 255, 255, 1).astype(np.uint8)  # the target class is present
    images = {"q": case["query"], **{f"s{i}": case["supports"][i] for i in range(shots)}}
    labels = {"q.png": query_label, **{f"s{i}.png": case["masks"][i] for i in range(shots)}}
    episode = SimpleNamespace(query_image="q", query_label="q.png", class_id=1,
                              supports=tuple((f"s{i}", f"s{i}.png") for i in range(shots)))
    writer = _Collect()
    names = ["cat"]
    run_precompute(clip, _Data(images, labels), [episode], writer, class_names=names, config=_official(size))
    np.testing.assert_allclose(writer.vvp[0], case["vvp"], atol=TOL, rtol=0)
    # VTP: the official validation path (stretch, uint8, back up to a multiple of the patch size).
    cam, refined = writer.vtp[("q", 1)]
    grid = (-(-size // 16), -(-size // 16))
    assert cam.shape == grid and refined.shape == grid


def test_stretch_is_opencv_linear_and_nearest():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    got = stretch(image, 64).numpy()
    # Upscaling, PIL's float bilinear is the same half-pixel, edge-replicating interpolation as INTER_LINEAR.
    for c in range(3):
        ref = np.asarray(Image.fromarray(image[..., c].astype(np.float32), mode="F").resize((64, 64),
                                                                                            Image.Resampling.BILINEAR))
        np.testing.assert_allclose(got[c], ref, atol=1e-3)
    label = rng.integers(0, 3, (20, 30)).astype(np.uint8)
    out = stretch_label(label, 64).numpy()
    rows = (np.arange(64) * 20 // 64)
    cols = (np.arange(64) * 30 // 64)
    np.testing.assert_array_equal(out, label[rows][:, cols])


def test_vtp_image_official_path():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    config = PriorConfig(geometry="official", geometry_size=96)
    got = vtp_image(image, 16, config)
    square = stretch(image, 96).permute(1, 2, 0).numpy().astype(np.uint8)  # truncation, as numpy's astype
    ref = np.asarray(Image.fromarray(square).resize((80, 64), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(got, ref)
    assert vtp_image(image, 16, PriorConfig()).shape == (64, 80, 3)
    with pytest.raises(InvalidInputError, match="smaller than one 16x16 patch"):
        vtp_image(image[:8], 16, config)


def test_geometry_config_and_provenance(clip):
    config = PriorConfig(geometry="official")
    assert config.geometry_size == 473 and PriorConfig().geometry == "native"
    assert PriorConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="geometry"):
        PriorConfig(geometry="square")
    assert geometry_description(config).startswith("official: VVP on the query and supports stretched to 473x473")
    prov = build_provenance(clip, config, dataset="pascal5i", fold=0, split="val", shot=1, seed=0, n_episodes=1,
                            list_checksum="x", class_names=["cat"])
    assert prov["geometry"] == geometry_description(config)
    assert '"geometry": "official"' in prov["config"] and '"geometry_size": 473' in prov["config"]


def test_cli_official_geometry_is_recorded_and_verifies(tmp_path, tiny_clip_dir):
    from click.testing import CliRunner

    from clipprior import PriorCache
    from clipprior.cli.main import app
    from clipprior.data.synthetic import write_synthetic_pascal

    root = write_synthetic_pascal(tmp_path / "voc", per_class=2, size=(72, 100))
    out = tmp_path / "p.h5"
    args = ["precompute", "--dataset", "pascal5i", "--fold", "0", "--data-root", str(root), "--model",
            str(tiny_clip_dir), "--device", "cpu", "--episodes", "4", "--seed", "5", "--out", str(out),
            "--geometry", "official", "--geometry-size", "64"]
    res = CliRunner().invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    cache = PriorCache(out)
    assert cache.config.geometry == "official" and cache.config.geometry_size == 64
    assert cache.provenance["geometry"].startswith("official: VVP on the query and supports stretched to 64x64")
    ep = next(iter(cache))
    assert tuple(cache.vvp(ep.index).shape) == (2, 4, 4)  # the 64x64 square's patch grid
    assert tuple(cache.vtp(ep.query, ep.class_id).shape) == (5, 7)  # 72x100 up to multiples of 16
    ok = CliRunner().invoke(app, ["verify", str(out), "--sample", "2", "--data-root", str(root), "--device", "cpu"])
    assert ok.exit_code == 0, ok.output
