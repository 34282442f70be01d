"""open_dataset / FSSDataset on synthetic benchmarks in the real layouts, and every kind of broken input."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipprior.data import (
    FSSDataset,
    build_fss_lists,
    counted_classes,
    open_dataset,
    read_fss_lists,
    write_fss_lists,
)
from clipprior.data.synthetic import write_synthetic, write_synthetic_coco, write_synthetic_pascal
from clipprior.errors import DataNotFoundError, DatasetError, InvalidInputError

LISTS = Path(__file__).resolve().parents[1].parent / "shared" / "lists"


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    return write_synthetic_pascal(tmp_path_factory.mktemp("pascal") / "VOC2012")


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    return write_synthetic_coco(tmp_path_factory.mktemp("coco") / "MSCOCO2014")


@pytest.fixture
def voc_copy(tmp_path) -> Path:
    """A small private PASCAL that tests may break: 3 val images per class."""
    return write_synthetic_pascal(tmp_path / "VOC2012")


def _lists_for(root: Path, out: Path, dataset: str = "pascal5i", fold: int = 0, split: str = "val") -> Path:
    write_fss_lists(build_fss_lists(dataset, root, split, [fold])[fold], out, str(root))
    return out


# --- opening -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fold", [0, 1, 2, 3])
def test_open_pascal_built_from_data(voc, fold):
    ds = open_dataset("pascal5i", voc, fold)
    assert isinstance(ds, FSSDataset) and ds.classes == list(range(5 * fold + 1, 5 * fold + 6))
    # 3 images per class, and the second image of class c - 9 (mod 20) also shows c
    assert all(len(ds.class_index[c]) == 4 for c in ds.classes)
    for image_id, label_id in ds.items:
        assert image_id.startswith("JPEGImages/") and (voc / image_id).is_file()
        assert counted_classes(ds.load_label(label_id), ds.classes, "val")
    assert not ds.report and len(ds) == len(ds.items)


def test_open_train_split_excludes_novel_images(voc):
    ds = open_dataset("pascal5i", voc, 0, "train")
    assert ds.classes == list(range(6, 21))
    for _, label_id in ds.items:
        present = set(np.unique(ds.load_label(label_id)).tolist()) - {0, 255}
        assert present <= set(ds.classes)


def test_open_with_list_files_equals_built(voc, tmp_path):
    lists = _lists_for(voc, tmp_path / "lists")
    from_files = open_dataset("pascal5i", voc, 0, list_root=lists)
    built = open_dataset("pascal5i", voc, 0)
    assert from_files.items == built.items and from_files.class_index == built.class_index
    assert from_files.list_checksum == built.list_checksum
    assert re.fullmatch(r"[0-9a-f]{64}", built.list_checksum)


@pytest.mark.parametrize("coco_split", ["interleaved", "contiguous"])
def test_open_coco(coco, coco_split):
    ds = open_dataset("coco20i", coco, 1, coco_split=coco_split)
    expected = list(range(2, 81, 4)) if coco_split == "interleaved" else list(range(21, 41))
    assert ds.classes == expected
    assert all(len(ds.class_index[c]) >= 2 for c in ds.classes)
    assert ds.items[0][0].startswith("val2014/") and ds.items[0][1].startswith("annotations/val2014/")
    image = ds.load_image(ds.items[0][0])
    assert image.shape == (64, 96, 3) and image.dtype == np.uint8


def test_coco_train_split_uses_train2014(coco):
    ds = open_dataset("coco", coco, 0, "train")
    assert all(i.startswith("train2014/") and lbl.startswith("annotations/train2014/") for i, lbl in ds.items)


def test_missing_sub_class_list_is_derived_from_masks(coco, tmp_path):
    lists = _lists_for(coco, tmp_path / "lists", "coco20i", 2)
    reference = open_dataset("coco20i", coco, 2, list_root=lists)
    (lists / "fss_list" / "val" / "sub_class_file_list_2.txt").unlink()
    derived = open_dataset("coco20i", coco, 2, list_root=lists)
    assert derived.class_index == reference.class_index
    assert "derived from the masks" in derived.list_source


def test_shared_pascal_lists_remapped_onto_root(tmp_path):
    """The trainers' own list files open against a data root holding their files (empty stand-ins here)."""
    root = tmp_path / "VOC2012"
    lists = read_fss_lists(LISTS / "pascal", "pascal5i", 0)
    for pair in lists.items:
        for item_id in pair:
            (root / item_id).parent.mkdir(parents=True, exist_ok=True)
            (root / item_id).touch()
    ds = open_dataset("pascal5i", root, 0, list_root=LISTS / "pascal")
    assert len(ds.items) == 364 and sum(len(v) for v in ds.class_index.values()) == 365
    assert ds.path(ds.items[0][0]) == root.resolve() / "JPEGImages" / "2007_000033.jpg"
    assert ds.relative(ds.path(ds.items[0][1])) == "SegmentationClassAug/2007_000033.png"
    assert ds.list_checksum == lists.checksum()


def test_load_accepts_ids_and_absolute_paths(voc):
    ds = open_dataset("pascal5i", voc, 0)
    image_id, label_id = ds.items[0]
    np.testing.assert_array_equal(ds.load_image(image_id), ds.load_image(ds.path(image_id)))
    image, label = ds.load_pair(image_id, label_id)
    assert image.shape[:2] == label.shape and label.dtype == np.uint8


# --- bad input ---------------------------------------------------------------------------------------------------

def test_missing_root(tmp_path):
    with pytest.raises(DataNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        open_dataset("pascal5i", tmp_path / "nowhere", 0)


def test_root_one_level_too_high_gets_a_hint(voc):
    with pytest.raises(DataNotFoundError, match=r"no JPEGImages/ folder .*did you mean --data-root .*VOC2012"):
        open_dataset("pascal5i", voc.parent, 0)


def test_coco_root_without_masks(tmp_path):
    (tmp_path / "MSCOCO2014" / "val2014").mkdir(parents=True)
    with pytest.raises(DataNotFoundError, match="annotations/val2014"):
        open_dataset("coco20i", tmp_path / "MSCOCO2014", 0)


@pytest.mark.parametrize("kind", ["image", "mask"])
def test_list_line_with_missing_file(voc_copy, tmp_path, kind):
    lists = _lists_for(voc_copy, tmp_path / "lists")
    ds = open_dataset("pascal5i", voc_copy, 0, list_root=lists)
    victim = ds.items[1][0 if kind == "image" else 1]
    (voc_copy / victim).unlink()
    with pytest.raises(DataNotFoundError, match=rf"data_list_0\.txt: {kind} {re.escape(victim)} listed there"):
        open_dataset("pascal5i", voc_copy, 0, list_root=lists)
    skipped = open_dataset("pascal5i", voc_copy, 0, list_root=lists, on_error="skip")
    assert len(skipped.items) == len(ds.items) - 1 and all(victim not in pair for pair in skipped.items)
    assert all(victim not in pair for pairs in skipped.class_index.values() for pair in pairs)
    assert len(skipped.report) == 1 and victim in str(skipped.report.problems[0])
    assert "1 problem skipped" in skipped.report.summary()


def _break(root: Path, item_id: str, how: str) -> None:
    path = root / item_id
    if how == "size":
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(path)
    elif how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif how == "garbage":
        path.write_bytes(b"\x00garbage" * 20)
    elif how == "values":
        Image.fromarray(np.full(np.asarray(Image.open(path)).shape, 37, np.uint8)).save(path)


@pytest.mark.parametrize(
    ("how", "which", "match"),
    [
        ("size", 1, r"mask is 10x10 \(HxW\) but image"),
        ("truncated", 0, "corrupt, truncated or not an image"),
        ("garbage", 0, "corrupt, truncated or not an image"),
        ("garbage", 1, "corrupt, truncated or not an image"),
        ("values", 1, r"values \[37\] outside 0\.\.20 and 255"),
    ],
)
def test_verify_catches_broken_files(voc_copy, tmp_path, how, which, match):
    lists = _lists_for(voc_copy, tmp_path / "lists")
    pair = open_dataset("pascal5i", voc_copy, 0, list_root=lists).items[2]
    _break(voc_copy, pair[which], how)
    opened = open_dataset("pascal5i", voc_copy, 0, list_root=lists)  # opening only checks that files exist
    with pytest.raises(DatasetError, match=match) as info:
        opened.verify()
    assert not isinstance(info.value, DataNotFoundError)
    with pytest.raises(DatasetError, match=re.escape(Path(pair[which]).name)):
        open_dataset("pascal5i", voc_copy, 0, list_root=lists, verify=True)
    skipped = open_dataset("pascal5i", voc_copy, 0, list_root=lists, on_error="skip", verify=True)
    assert len(skipped.report) == 1 and pair not in skipped.items
    assert all(pair not in pairs for pairs in skipped.class_index.values())
    assert Path(skipped.report.problems[0].path).name == Path(pair[which]).name


def test_broken_mask_while_building_names_file(voc_copy):
    _break(voc_copy, "SegmentationClassAug/2007_003_0.png", "garbage")
    with pytest.raises(DatasetError, match=r"2007_003_0\.png is corrupt"):
        open_dataset("pascal5i", voc_copy, 0)
    ds = open_dataset("pascal5i", voc_copy, 0, on_error="skip")
    assert len(ds.report) == 1 and ("JPEGImages/2007_003_0.jpg", "SegmentationClassAug/2007_003_0.png") not in ds.items


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA"])
def test_odd_image_modes_load_as_rgb(voc_copy, mode):
    ds = open_dataset("pascal5i", voc_copy, 0)
    image_id, label_id = ds.items[0]
    rgb = Image.open(voc_copy / image_id).convert("RGB")
    converted = rgb.quantize(16) if mode == "P" else rgb.convert(mode)
    target = voc_copy / image_id
    converted.save(target, format="PNG" if mode in ("P", "RGBA") else "JPEG")
    image, label = ds.load_pair(image_id, label_id)
    assert image.shape == (*label.shape, 3) and image.dtype == np.uint8
    assert not ds.verify()


def test_bad_arguments(voc):
    with pytest.raises(InvalidInputError, match="on_error"):
        open_dataset("pascal5i", voc, 0, on_error="ignore")
    with pytest.raises(InvalidInputError, match="fold"):
        open_dataset("pascal5i", voc, 5)
    with pytest.raises(InvalidInputError, match="unknown dataset"):
        open_dataset("ade20k", voc, 0)


def test_synthetic_rejects_impossible_images(tmp_path):
    with pytest.raises(InvalidInputError, match="too small"):
        write_synthetic(tmp_path, "pascal5i", {"val": {"x": [1, 2, 3]}}, size=(32, 32))
