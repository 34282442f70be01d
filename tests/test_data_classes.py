"""Class names, prompt names and fold definitions of PASCAL-5i and COCO-20i."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from clipprior.data import (
    COCO_CLASSES,
    COCO_PROMPT_NAMES,
    PASCAL_CLASSES,
    PASCAL_PROMPT_NAMES,
    class_names,
    dataset_name,
    fold_classes,
    num_classes,
    prompt_names,
)
from clipprior.errors import InvalidInputError

TEXT_NPZ = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "parity" / "text.npz"


def test_canonical_names():
    assert len(PASCAL_CLASSES) == 20 and len(COCO_CLASSES) == 80
    assert list(PASCAL_CLASSES) == sorted(PASCAL_CLASSES)  # VOC ids are alphabetical
    assert PASCAL_CLASSES[0] == "aeroplane" and PASCAL_CLASSES[14] == "person" and PASCAL_CLASSES[19] == "tvmonitor"
    assert COCO_CLASSES[0] == "person" and COCO_CLASSES[79] == "toothbrush" and COCO_CLASSES[61] == "toilet"
    assert len(set(COCO_CLASSES)) == 80
    assert class_names("coco") == list(COCO_CLASSES)


def test_coco_prompt_names_match_official_text_npz():
    assert TEXT_NPZ.is_file(), f"reference file {TEXT_NPZ} is missing"
    official = [str(n) for n in np.load(TEXT_NPZ)["class_names"]]
    assert list(COCO_PROMPT_NAMES) == official
    assert prompt_names("coco20i") == official


def test_pascal_prompt_names():
    names = prompt_names("pascal5i")
    changed = {PASCAL_CLASSES[i]: n for i, n in enumerate(names) if n != PASCAL_CLASSES[i]}
    assert changed == {"bird": "bird avian", "chair": "chair seat", "person": "person with clothes,people,human",
                       "tvmonitor": "tvmonitor screen"}
    assert tuple(names) == PASCAL_PROMPT_NAMES


@pytest.mark.parametrize(
    ("overrides", "index", "expected"),
    [
        ({3: "small bird"}, 2, "small bird"),
        ({"3": "small bird"}, 2, "small bird"),
        ({"bird": "small bird"}, 2, "small bird"),
        ({"bird avian": "small bird"}, 2, "small bird"),
        ({"person": "human"}, 14, "human"),
    ],
)
def test_prompt_name_overrides_mapping(overrides, index, expected):
    names = prompt_names("pascal5i", overrides)
    assert names[index] == expected
    untouched = [i for i in range(20) if i != index]
    assert [names[i] for i in untouched] == [PASCAL_PROMPT_NAMES[i] for i in untouched]


def test_prompt_name_overrides_files(tmp_path):
    full = [f"thing {i}" for i in range(20)]
    (tmp_path / "names.txt").write_text("\n".join(full) + "\n")
    (tmp_path / "names.json").write_text(json.dumps({"cat": "kitty"}))
    (tmp_path / "list.json").write_text(json.dumps(full))
    assert prompt_names("pascal", tmp_path / "names.txt") == full
    assert prompt_names("pascal", str(tmp_path / "list.json")) == full
    assert prompt_names("pascal", tmp_path / "names.json")[7] == "kitty"


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"zebra": "x"}, "neither a class id"),
        ({21: "x"}, "outside 1..20"),
        ({0: "x"}, "outside 1..20"),
        ({"cat": "  "}, "empty"),
        (["a", "b"], "20 classes but 2 names"),
        (Path("/nonexistent/names.txt"), "does not exist"),
    ],
)
def test_prompt_name_overrides_rejected(overrides, match):
    with pytest.raises(InvalidInputError, match=match):
        prompt_names("pascal5i", overrides)


def test_fold_definitions_match_trainers():
    assert fold_classes("pascal5i", 0) == [1, 2, 3, 4, 5]
    assert fold_classes("pascal5i", 3) == [16, 17, 18, 19, 20]
    assert fold_classes("pascal5i", 2, "train") == list(range(1, 11)) + list(range(16, 21))
    assert fold_classes("coco20i", 0) == list(range(1, 78, 4))
    assert fold_classes("coco20i", 3) == list(range(4, 81, 4))
    assert fold_classes("coco20i", 1, coco_split="contiguous") == list(range(21, 41))
    assert fold_classes("coco20i", 0, "train", "contiguous") == list(range(21, 81))


@given(dataset=st.sampled_from(["pascal5i", "coco20i"]), coco_split=st.sampled_from(["interleaved", "contiguous"]))
def test_folds_partition_the_classes(dataset, coco_split):
    n = num_classes(dataset)
    novel = [fold_classes(dataset, f, "val", coco_split) for f in range(4)]
    assert sorted(c for fold in novel for c in fold) == list(range(1, n + 1))
    for f in range(4):
        base = fold_classes(dataset, f, "train", coco_split)
        assert sorted(base + novel[f]) == list(range(1, n + 1))
        assert base == sorted(base) and len(novel[f]) == n // 4


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("pascal5i", 4), "fold"),
        (("pascal5i", -1), "fold"),
        (("pascal5i", True), "fold"),
        (("pascal5i", 0, "test"), "split"),
        (("coco20i", 0, "val", "random"), "coco_split"),
        (("ade20k", 0), "unknown dataset"),
    ],
)
def test_fold_classes_rejects_bad_arguments(args, match):
    with pytest.raises(InvalidInputError, match=match):
        fold_classes(*args)


def test_dataset_aliases():
    assert dataset_name("PASCAL") == "pascal5i" and dataset_name("coco-20i") == "coco20i"


def test_present_classes_names_and_support_masks_one_home() -> None:
    import doctest

    import clipprior.data.classes
    import clipprior.data.images
    import clipprior.data.specs
    from clipprior.data import fss_mask, present_classes, present_names, prompt_names

    label = np.array([[0, 3, 3], [15, 255, 21], [3, 0, 1]], np.uint8)
    assert present_classes(label, 20) == [1, 3, 15]  # 0, 255 and 21 (outside 1..20) left out
    names = prompt_names("pascal5i")
    assert present_names(label, 3, names) == [names[0], names[14]]
    assert fss_mask(label, 3).tolist() == [[0, 1, 1], [0, 255, 0], [1, 0, 0]]
    for module in (clipprior.data.classes, clipprior.data.images, clipprior.data.specs):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__
