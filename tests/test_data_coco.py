"""COCO instances JSON -> class-index PNG masks, on a generated tiny instances file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_api  # a test dependency ([test] extra)

from clipprior.data import COCO_CLASSES, OptionalDependencyError, coco_to_masks, open_dataset, sample_episodes
from clipprior.data.coco import coco_category_map
from clipprior.errors import DataNotFoundError, DatasetError, InvalidInputError

# The 80 COCO category ids: 1..90 without the ten that were never annotated.
COCO_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]
H, W = 60, 80


def _rle_uncompressed(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths in column-major order, starting with zeros."""
    flat = mask.flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"size": [mask.shape[0], mask.shape[1]], "counts": counts}


def _instances() -> dict:
    dog = np.zeros((H, W), np.uint8)
    dog[30:50, 40:70] = 1
    toothbrush = np.zeros((H, W), np.uint8)
    toothbrush[5:15, 5:25] = 1
    compressed = mask_api.encode(np.asfortranarray(toothbrush))
    compressed["counts"] = compressed["counts"].decode("ascii")
    return {
        "images": [
            {"id": 1, "file_name": "COCO_val2014_000000000001.jpg", "height": H, "width": W},
            {"id": 2, "file_name": "COCO_val2014_000000000002.jpg", "height": H, "width": W},
            {"id": 3, "file_name": "COCO_val2014_000000000003.jpg", "height": H, "width": W},
        ],
        "annotations": [
            # person (category 1 -> class 1): a 20x20 square polygon at rows 10..30, cols 10..30
            {"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0,
             "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]]},
            # dog (category 18 -> class 17), uncompressed RLE
            {"id": 11, "image_id": 1, "category_id": 18, "iscrowd": 1, "segmentation": _rle_uncompressed(dog)},
            # toothbrush (category 90 -> class 80), compressed RLE, then a later overlapping person
            {"id": 12, "image_id": 2, "category_id": 90, "iscrowd": 0, "segmentation": compressed},
            {"id": 13, "image_id": 2, "category_id": 1, "iscrowd": 0,
             "segmentation": [[20, 5, 25, 5, 25, 15, 20, 15]]},
        ],
        "categories": [{"id": i, "name": COCO_CLASSES[k], "supercategory": "x"} for k, i in enumerate(COCO_IDS)],
    }


@pytest.fixture
def instances(tmp_path) -> Path:
    path = tmp_path / "instances_val2014.json"
    path.write_text(json.dumps(_instances()))
    return path


def test_category_map_ranks_ids():
    mapping = coco_category_map([{"id": i} for i in reversed(COCO_IDS)])
    assert mapping[1] == 1 and mapping[18] == 17 and mapping[90] == 80 and len(mapping) == 80
    assert [COCO_CLASSES[mapping[i] - 1] for i in (1, 18, 90)] == ["person", "dog", "toothbrush"]


def test_convert(instances, tmp_path):
    out = tmp_path / "MSCOCO2014" / "annotations" / "val2014"
    stats = coco_to_masks(instances, out)
    assert (stats.images, stats.written, stats.empty, stats.annotations) == (3, 2, 1, 4)
    assert sorted(p.name for p in out.iterdir()) == ["COCO_val2014_000000000001.png", "COCO_val2014_000000000002.png"]
    assert Image.open(out / "COCO_val2014_000000000001.png").mode == "L"
    first = np.asarray(Image.open(out / "COCO_val2014_000000000001.png"))
    assert first.shape == (H, W) and first.dtype == np.uint8
    assert set(np.unique(first).tolist()) == {0, 1, 17}
    assert first[15:25, 15:25].min() == 1 and first[0, 0] == 0
    np.testing.assert_array_equal(first[30:50, 40:70], 17)  # crowd painted with its class by default
    assert int((first == 17).sum()) == 20 * 30
    second = np.asarray(Image.open(out / "COCO_val2014_000000000002.png"))
    assert second[7, 8] == 80 and second[10, 22] == 1  # the later annotation overwrites the earlier one
    assert int((second == 80).sum()) + int((second == 1).sum()) == 10 * 20


@pytest.mark.parametrize(("crowd", "value"), [("ignore", 255), ("drop", 0)])
def test_crowd_modes(instances, tmp_path, crowd, value):
    coco_to_masks(instances, tmp_path, crowd=crowd)
    first = np.asarray(Image.open(tmp_path / "COCO_val2014_000000000001.png"))
    np.testing.assert_array_equal(first[30:50, 40:70], value)


def test_keep_empty_and_no_overwrite(instances, tmp_path):
    stats = coco_to_masks(instances, tmp_path, keep_empty=True)
    assert stats.written == 3 and not np.asarray(Image.open(tmp_path / "COCO_val2014_000000000003.png")).any()
    again = coco_to_masks(instances, tmp_path, keep_empty=True, overwrite=False)
    assert (again.written, again.existing) == (0, 3)


def test_converted_masks_make_a_coco20i_dataset(instances, tmp_path):
    root = tmp_path / "MSCOCO2014"
    coco_to_masks(instances, root / "annotations" / "val2014")
    (root / "val2014").mkdir()
    for stem in ("COCO_val2014_000000000001", "COCO_val2014_000000000002"):
        Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(root / "val2014" / f"{stem}.jpg")
    ds = open_dataset("coco20i", root, 0, on_error="skip")  # fold 0 tests person (1), ..., 17 (dog)
    assert ds.classes[:5] == [1, 5, 9, 13, 17]
    # person covers 400 pixels (< 2048) so it never counts; the dog covers 600: nothing counts at this size
    assert ds.items == []
    assert not ds.verify()


def test_missing_pycocotools_is_explained(instances, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.mask", None)
    with pytest.raises(OptionalDependencyError, match=r"pip install 'clipprior\[coco\]'") as info:
        coco_to_masks(instances, tmp_path)
    assert isinstance(info.value, ImportError)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d["categories"].pop(), "79 categories"),
        (lambda d: d["annotations"][0].update(category_id=12), "annotation 10 .* has category 12"),
        (lambda d: d["annotations"][0].update(segmentation={"counts": 5}), "annotation 10 .* cannot be decoded"),
        (lambda d: d.pop("images"), "not a COCO instances file"),
        (lambda d: d["images"][0].pop("height"), "lacks id, file_name, height or width"),
    ],
)
def test_bad_annotations(tmp_path, edit, match):
    data = _instances()
    edit(data)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=match):
        coco_to_masks(path, tmp_path / "out")


def test_bad_files_and_arguments(tmp_path, instances):
    with pytest.raises(DataNotFoundError, match=r"nothere\.json"):
        coco_to_masks(tmp_path / "nothere.json", tmp_path / "out")
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(DatasetError, match="not valid JSON"):
        coco_to_masks(broken, tmp_path / "out")
    with pytest.raises(InvalidInputError, match="crowd"):
        coco_to_masks(instances, tmp_path / "out", crowd="maybe")


def test_large_enough_objects_give_episodes(tmp_path):
    """End to end: JSON -> masks -> lists -> episodes, with objects above the 2048-pixel threshold."""
    data = _instances()
    big = [[0, 0, 79, 0, 79, 59, 0, 59]]  # the whole 60x80 image
    data["annotations"] = [{"id": 100 + k, "image_id": k, "category_id": 1, "iscrowd": 0, "segmentation": big}
                           for k in (1, 2, 3)]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    root = tmp_path / "MSCOCO2014"
    coco_to_masks(path, root / "annotations" / "val2014")
    (root / "val2014").mkdir()
    for k in (1, 2, 3):
        Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(root / "val2014" / f"COCO_val2014_00000000000{k}.jpg")
    ds = open_dataset("coco20i", root, 0)
    assert len(ds.items) == 3 and len(ds.class_index[1]) == 3
    episodes = sample_episodes(ds, 6, shot=2, seed=1)
    assert all(e.class_id == 1 and e.query not in e.supports for e in episodes)
