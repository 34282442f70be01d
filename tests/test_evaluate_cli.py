"""``clipprior evaluate``: synthetic caches whose scores are known exactly, both protocols."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from clipprior.cache import CacheWriter
from clipprior.cli.main import app
from clipprior.data import load_label
from clipprior.data.synthetic import write_synthetic
from clipprior.evaluate import read_image_list
from tests._synthetic_priors import expected_scores, make_synthetic_cache


@pytest.fixture(scope="module")
def folds(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path]:
    tmp = tmp_path_factory.mktemp("evaluate")
    paths = [make_synthetic_cache(tmp, fold=f, n_episodes=12)[0] for f in (0, 1)]
    return paths, tmp / "VOC2012"


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["evaluate", *map(str, args)])
    return result.exit_code, result.output


@pytest.mark.parametrize("threshold", [0.5, 0.2, 0.8])
def test_fss_scores_equal_the_known_ious(folds: tuple[list[Path], Path], tmp_path: Path, threshold: float) -> None:
    (cache, _), root = folds
    out = tmp_path / "scores.json"
    code, output = run(cache, "--data-root", root, "--threshold", threshold, "--json", out)
    assert code == 0, output
    fold = json.loads(out.read_text())["folds"][0]
    expected = expected_scores(cache, root, threshold)
    assert fold["dataset"] == "pascal5i" and fold["fold"] == 0 and fold["missing_classes"] == []
    for kind in ("vtp_raw", "vtp_refined", "vvp"):
        got = fold["priors"][kind]
        assert got["miou_fixed"] == pytest.approx(expected[kind]["miou"], abs=1e-12), kind
        assert got["fbiou_fixed"] == pytest.approx(expected[kind]["fbiou"], abs=1e-12), kind
        assert sorted(int(c) for c in got["per_class"]) == expected[kind]["classes"] == [1, 2, 3, 4, 5]
    # By construction: raw VTP covers half of each target at 0.75 and the rest at 0.25.
    raw = fold["priors"]["vtp_raw"]
    assert raw["miou_fixed"] == {0.5: 0.5, 0.2: 1.0, 0.8: 0.0}[threshold]
    assert raw["map"] == 1.0 and raw["miou_best"] == 1.0 and raw["best_threshold"] == 0.05
    assert fold["priors"]["vtp_refined"]["miou_fixed"] == 1.0
    assert "mIoU@" in output and "aeroplane" in output


def test_fss_several_folds_add_a_mean(folds: tuple[list[Path], Path], tmp_path: Path) -> None:
    caches, root = folds
    out = tmp_path / "scores.json"
    code, output = run(*caches, "--data-root", root, "--json", out, "--no-per-class")
    assert code == 0, output
    data = json.loads(out.read_text())
    assert [f["fold"] for f in data["folds"]] == [0, 1]
    assert sorted(int(c) for c in data["folds"][1]["priors"]["vvp"]["per_class"]) == [6, 7, 8, 9, 10]
    for kind in ("vtp_raw", "vtp_refined", "vvp"):
        per_fold = [f["priors"][kind]["miou_fixed"] for f in data["folds"]]
        assert data["mean"][kind]["miou_fixed"] == pytest.approx(np.mean(per_fold), abs=1e-12)
    assert "mean over 2 folds" in output and "per class" not in output


def test_fss_limit_and_errors(folds: tuple[list[Path], Path], tmp_path: Path) -> None:
    (cache, _), root = folds
    out = tmp_path / "s.json"
    code, _ = run(cache, "--data-root", root, "--limit", 3, "--json", out)
    assert code == 0
    assert json.loads(out.read_text())["folds"][0]["priors"]["vtp_raw"]["episodes"] == 3
    code, output = run(cache)
    assert code == 1 and "--data-root" in output
    code, output = run("--data-root", root)
    assert code == 2 and "at least one CACHE" in output
    wrong = tmp_path / "wrong"
    write_synthetic(wrong, "pascal5i", {"val": {"2007_001_0": [1]}}, size=(80, 80))
    code, output = run(cache, "--data-root", wrong)
    assert code == 1 and ("is --data-root the folder" in output or "does not exist" in output)


# ------------------------------------------------------------------------------------------- CLIP-ES


@pytest.fixture(scope="module")
def clip_es_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, int]]:
    """One train image with class 3 (and 12): CAMs exact on the targets, plus a 0.45 blob on the background."""
    tmp = tmp_path_factory.mktemp("clipes")
    root = write_synthetic(tmp / "VOC2012", "pascal5i", {"train": {"2008_000001": [3, 12]}}, size=(64, 96))
    image, label_id = "JPEGImages/2008_000001.jpg", "SegmentationClassAug/2008_000001.png"
    label = load_label(root / label_id)
    blob = np.zeros(label.shape, bool)
    blob[:8, :10] = True  # inside the background band (rows 0..15 are background)
    assert (label[blob] == 0).all()
    out = tmp / "clipes.h5"
    with CacheWriter(out, {"dataset": "pascal5i", "fold": 0, "split": "train"}) as writer:
        writer.add_image(image, *label.shape)
        for c in (3, 12):
            exact = np.where(label == c, 0.8, 0.0)
            with_blob = np.where(blob, 0.45, exact)
            writer.add_vtp(image, c, with_blob if c == 3 else exact, exact)  # raw: blob; refined: exact
        path = writer.finalize()
    sizes = {"bg": int((label == 0).sum()), "c3": int((label == 3).sum()), "blob": int(blob.sum())}
    return path, root, sizes


def test_clip_es_protocol_known_miou(clip_es_cache: tuple[Path, Path, dict[str, int]], tmp_path: Path) -> None:
    cache, root, n = clip_es_cache
    out = tmp_path / "clipes.json"
    code, output = run("--protocol", "clip-es", cache, "--data-root", root, "--json", out)
    assert code == 0, output
    data = json.loads(out.read_text())
    assert data["images"] == 1 and data["skipped"] == 0
    raw, refined = data["priors"]["vtp_raw"], data["priors"]["vtp_refined"]
    # t = 1: the blob's background score 1 - 0.45 = 0.55 beats 0.45: everything right.
    assert raw["1"]["miou"] == 1.0 and refined["1"]["miou"] == 1.0 and refined["2"]["miou"] == 1.0
    # t = 2: 0.55^2 = 0.3025 < 0.45: the blob turns into class 3.
    bg_iou = (n["bg"] - n["blob"]) / n["bg"]
    c3_iou = n["c3"] / (n["c3"] + n["blob"])
    assert raw["2"]["per_class"]["background"] == pytest.approx(bg_iou, abs=1e-12)
    assert raw["2"]["per_class"]["bird"] == pytest.approx(c3_iou, abs=1e-12)
    assert raw["2"]["miou"] == pytest.approx((bg_iou + c3_iou + 1.0) / 3, abs=1e-12)
    assert "58.6" in output and "70.8" in output


def test_clip_es_names_a_mask_of_another_size(clip_es_cache: tuple[Path, Path, dict[str, int]],
                                              tmp_path: Path) -> None:
    cache, root, _ = clip_es_cache
    root = Path(shutil.copytree(root, tmp_path / "VOC2012"))
    mask = root / "SegmentationClassAug/2008_000001.png"
    Image.fromarray(load_label(mask)[:40, :50]).save(mask)
    code, output = run("--protocol", "clip-es", cache, "--data-root", root)
    text = " ".join(output.split())
    assert code == 1 and "Traceback" not in output
    assert f"mask {mask} is 40x50 (HxW) but image {root / 'JPEGImages/2008_000001.jpg'} is 64x96" in text


def test_clip_es_missing_cams_fail_or_are_skipped(folds: tuple[list[Path], Path], tmp_path: Path) -> None:
    (cache, _), root = folds
    code, output = run("--protocol", "clip-es", cache, "--data-root", root)
    assert code == 1 and "--skip-missing" in output  # images showing a class of another fold
    out = tmp_path / "s.json"
    code, output = run("--protocol", "clip-es", cache, "--data-root", root, "--skip-missing", "--json", out)
    assert code == 0, output
    data = json.loads(out.read_text())
    assert 0 < data["skipped"] < data["images"]


def test_clip_es_with_a_model_and_a_list(tiny_clip_dir: Path, folds: tuple[list[Path], Path], tmp_path: Path) -> None:
    _, root = folds
    listing = tmp_path / "train.txt"
    listing.write_text("2008_001_0\n2008_001_1\n\nJPEGImages/2008_002_0.jpg\n")
    out = tmp_path / "s.json"
    code, output = run("--protocol", "clip-es", "--model", tiny_clip_dir, "--device", "cpu", "--data-root", root,
                       "--list", listing, "--json", out)
    assert code == 0, output
    data = json.loads(out.read_text())
    assert data["images"] == 3 and data["source"] == str(tiny_clip_dir)
    for kind in ("vtp_raw", "vtp_refined"):
        for t in ("1", "2"):
            assert 0.0 <= data["priors"][kind][t]["miou"] <= 1.0


def test_clip_es_usage_errors(folds: tuple[list[Path], Path]) -> None:
    caches, root = folds
    assert run("--protocol", "clip-es", "--data-root", root)[0] == 2
    assert run("--protocol", "clip-es", *caches, "--data-root", root)[0] == 2


def test_read_image_list_formats(tmp_path: Path) -> None:
    listing = tmp_path / "l.txt"
    listing.write_text(
        "2007_000032\n"
        "JPEGImages/2007_000033.jpg\n"
        "/data/VOC2012/JPEGImages/2007_000039.jpg /data/VOC2012/SegmentationClassAug/2007_000039.png\n"
    )
    assert read_image_list(listing, "pascal5i", "train") == [
        ("JPEGImages/2007_000032.jpg", "SegmentationClassAug/2007_000032.png"),
        ("JPEGImages/2007_000033.jpg", "SegmentationClassAug/2007_000033.png"),
        ("JPEGImages/2007_000039.jpg", "SegmentationClassAug/2007_000039.png"),
    ]
