"""``clipprior lists build|check|episodes`` and ``clipprior coco-to-masks`` through Click's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from clipprior.cli.main import app
from clipprior.data import COCO_CLASSES, build_fss_lists, read_episodes, read_fss_lists
from clipprior.data.synthetic import write_synthetic_pascal


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    return write_synthetic_pascal(tmp_path_factory.mktemp("pascal") / "VOC2012")


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def _ok(result) -> None:
    assert result.exit_code == 0, result.output


def test_lists_build_writes_every_fold_and_split(runner, voc, tmp_path):
    out = tmp_path / "lists"
    result = runner.invoke(app, ["lists", "build", "--dataset", "pascal5i", "--data-root", str(voc), "--out", str(out)])
    _ok(result)
    for split in ("val", "train"):
        for fold in range(4):
            assert (out / "fss_list" / split / f"data_list_{fold}.txt").is_file()
            assert (out / "fss_list" / split / f"sub_class_file_list_{fold}.txt").is_file()
    first = (out / "fss_list" / "val" / "data_list_0.txt").read_text().splitlines()[0]
    assert first.startswith(str(voc.resolve()) + "/JPEGImages/")  # default prefix: the absolute data root
    expected = build_fss_lists("pascal5i", voc, "train", [2])[2]
    assert read_fss_lists(out, "pascal5i", 2, "train").checksum() == expected.checksum()


def test_lists_build_prefix_and_selection(runner, voc, tmp_path):
    out = tmp_path / "lists"
    args = ["lists", "build", "--dataset", "pascal5i", "--data-root", str(voc), "--out", str(out),
            "--folds", "1,3", "--split", "val", "--path-prefix", "../data/VOCdevkit2012/VOC2012"]
    _ok(runner.invoke(app, args))
    assert sorted(p.name for p in (out / "fss_list" / "val").iterdir()) == [
        "data_list_1.txt", "data_list_3.txt", "sub_class_file_list_1.txt", "sub_class_file_list_3.txt"]
    assert not (out / "fss_list" / "train").exists()
    line = (out / "fss_list" / "val" / "data_list_1.txt").read_text().splitlines()[0]
    assert line.startswith("../data/VOCdevkit2012/VOC2012/JPEGImages/")


def test_lists_build_with_base_list(runner, voc, tmp_path):
    stems = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[:6]
    base = tmp_path / "val.txt"
    base.write_text("".join(f"JPEGImages/{s}.jpg SegmentationClassAug/{s}.png\n" for s in stems))
    out = tmp_path / "lists"
    args = ["lists", "build", "--dataset", "pascal5i", "--data-root", str(voc), "--out", str(out), "--split", "val",
            "--folds", "0", "--val-base-list", str(base), "--path-prefix", ""]
    _ok(runner.invoke(app, args))
    assert (out / "fss_list" / "val" / "data_list_0.txt").read_text().splitlines() == [
        f"JPEGImages/{s}.jpg SegmentationClassAug/{s}.png" for s in stems]


def test_lists_check_passes_then_fails_on_broken_image(runner, voc, tmp_path):
    root = write_synthetic_pascal(tmp_path / "VOC2012", per_class=2)
    out = tmp_path / "lists"
    _ok(runner.invoke(app, ["lists", "build", "--dataset", "pascal5i", "--data-root", str(root), "--out", str(out),
                            "--split", "val"]))
    check = ["lists", "check", "--dataset", "pascal5i", "--data-root", str(root), "--list-root", str(out)]
    result = runner.invoke(app, check)
    _ok(result)
    assert "readable" in result.output
    victim = root / "JPEGImages" / "2007_002_0.jpg"
    victim.write_bytes(victim.read_bytes()[:200])
    result = runner.invoke(app, check)
    assert result.exit_code == 1
    assert "check failed" in result.output and "2007_002_0.jpg" in result.output
    assert "Traceback" not in result.output
    _ok(runner.invoke(app, [*check, "--no-decode"]))  # the file exists, and that is all --no-decode checks


def test_lists_episodes(runner, voc, tmp_path):
    out = tmp_path / "ep.jsonl"
    args = ["lists", "episodes", "--dataset", "pascal5i", "--data-root", str(voc), "--fold", "2", "--shot", "2",
            "--episodes", "40", "--seed", "5", "--out", str(out)]
    _ok(runner.invoke(app, args))
    episodes, meta = read_episodes(out)
    assert len(episodes) == 40 and (meta.fold, meta.shot, meta.seed) == (2, 2, 5)
    assert all(e.class_id in range(11, 16) for e in episodes)
    again = tmp_path / "again.jsonl"
    _ok(runner.invoke(app, [*args[:-1], str(again)]))
    assert again.read_text() == out.read_text()


def test_missing_data_root_is_one_clean_line(runner, tmp_path):
    result = runner.invoke(app, ["lists", "episodes", "--dataset", "pascal5i", "--data-root", str(tmp_path / "none"),
                                 "--fold", "0"])
    assert result.exit_code == 1
    assert "Error:" in result.output and "does not exist" in result.output and "Traceback" not in result.output


def test_bad_folds_option(runner, voc, tmp_path):
    result = runner.invoke(app, ["lists", "build", "--dataset", "pascal5i", "--data-root", str(voc),
                                 "--out", str(tmp_path), "--folds", "0,7"])
    assert result.exit_code == 1 and "folds are 0, 1, 2 and 3" in result.output


@pytest.mark.parametrize("command", [["lists"], ["lists", "build"], ["lists", "check"], ["lists", "episodes"],
                                     ["coco-to-masks"]])
def test_help_has_examples(runner, command):
    result = runner.invoke(app, [*command, "--help"])
    _ok(result)
    assert "Examples:\n" in result.output and "\\b" not in result.output  # examples kept line by line
    assert any(line.startswith("    clipprior ") for line in result.output.splitlines())


def test_coco_to_masks(runner, tmp_path):
    ids = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]
    data = {
        "images": [{"id": 7, "file_name": "COCO_val2014_000000000007.jpg", "height": 40, "width": 50}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "iscrowd": 0,
                         "segmentation": [[0, 0, 20, 0, 20, 20, 0, 20]]}],
        "categories": [{"id": i, "name": n} for i, n in zip(ids, COCO_CLASSES, strict=True)],
    }
    annotations = tmp_path / "instances_val2014.json"
    annotations.write_text(json.dumps(data))
    out = tmp_path / "MSCOCO2014" / "annotations" / "val2014"
    result = runner.invoke(app, ["coco-to-masks", "--annotations", str(annotations), "--out", str(out)])
    _ok(result)
    assert "wrote 1 masks" in result.output
    mask = np.asarray(Image.open(out / "COCO_val2014_000000000007.png"))
    assert mask.shape == (40, 50) and set(np.unique(mask).tolist()) == {0, 3}


def test_coco_to_masks_missing_file(runner, tmp_path):
    result = runner.invoke(app, ["coco-to-masks", "--annotations", str(tmp_path / "x.json"), "--out", str(tmp_path)])
    assert result.exit_code == 1 and "x.json does not exist" in result.output and "Traceback" not in result.output
