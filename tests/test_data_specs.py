"""The dataset registry: built-in specs, lookup errors, and a toy third benchmark added without library changes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from clipprior.data import (
    DatasetSpec,
    EpisodeMeta,
    Layout,
    build_fss_lists,
    dataset_name,
    dataset_names,
    default_episodes,
    fold_classes,
    get_dataset,
    num_classes,
    open_dataset,
    prompt_names,
    read_fss_lists,
    register_dataset,
    sample_episodes,
    unregister_dataset,
    write_fss_lists,
)
from clipprior.data.specs import COCO_20I, PASCAL_5I, scan_label_folder
from clipprior.data.synthetic import write_synthetic
from clipprior.errors import InvalidInputError

TOY = DatasetSpec(
    name="toy3i",
    title="Toy-3i",
    aliases=("toy",),
    classes=tuple(f"thing{c}" for c in range(1, 9)),
    prompt_names=tuple(f"a thing number {c}" for c in range(1, 9)),
    layout=Layout(image_dirs={"val": ("images", "val"), "train": ("images", "train")},
                  label_dirs={"val": ("masks", "val"), "train": ("masks", "train")},
                  image_ext=".jpg", label_ext=".png", root_name="TOY"),
    fold_rule=lambda fold, _variant: list(range(4 * fold + 1, 4 * fold + 5)),
    scan=scan_label_folder,
    trainer_episodes={"pi-clip": 7},
    list_dir="toy",
    n_folds=2,
)


@pytest.fixture
def toy() -> Iterator[DatasetSpec]:
    register_dataset(TOY)
    try:
        yield TOY
    finally:
        unregister_dataset(TOY.name)


def test_builtin_specs_are_registered_in_order() -> None:
    assert dataset_names()[:2] == ("pascal5i", "coco20i")
    assert get_dataset("VOC") is PASCAL_5I
    assert get_dataset("coco-20i") is COCO_20I
    assert get_dataset(COCO_20I) is COCO_20I


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(InvalidInputError, match=r"unknown dataset 'lvis'.*pascal5i, coco20i"):
        get_dataset("lvis")


def test_name_clash_is_refused(toy: DatasetSpec) -> None:
    with pytest.raises(InvalidInputError, match="taken by 'toy3i'"):
        register_dataset(DatasetSpec(**{**TOY.__dict__, "name": "other", "aliases": ("toy",)}))
    assert register_dataset(TOY, replace=True) is TOY


def test_spec_checks_its_prompt_names() -> None:
    with pytest.raises(InvalidInputError, match="8 classes but 1 prompt names"):
        DatasetSpec(**{**TOY.__dict__, "prompt_names": ("x",)})


def test_toy_dataset_lookups(toy: DatasetSpec) -> None:
    assert "toy3i" in dataset_names()
    assert dataset_name("TOY") == "toy3i"
    assert num_classes("toy3i") == 8
    assert prompt_names("toy")[0] == "a thing number 1"
    assert fold_classes("toy3i", 1) == [5, 6, 7, 8]
    assert fold_classes("toy3i", 1, "train") == [1, 2, 3, 4]
    assert default_episodes("toy3i") == 7
    with pytest.raises(InvalidInputError, match=r"0\.\.1 for toy3i"):
        fold_classes("toy3i", 2)
    with pytest.raises(InvalidInputError, match="unknown trainer 'bam' for toy3i"):
        default_episodes("toy3i", "bam")


def test_toy_dataset_lists_and_episodes(toy: DatasetSpec, tmp_path: Path) -> None:
    images = {"val": {f"v{c}_{r}": [c] for c in range(1, 9) for r in range(3)},
              "train": {f"t{c}_{r}": [c] for c in range(1, 9) for r in range(2)}}
    root = write_synthetic(tmp_path / "TOY", "toy3i", images, size=(64, 64))
    assert (root / "images" / "val" / "v1_0.jpg").is_file()
    assert (root / "masks" / "train" / "t8_1.png").is_file()

    built = build_fss_lists("toy3i", root, "val", folds=(0, 1))
    assert built[0].classes == [1, 2, 3, 4]
    assert len(built[0].items) == 12 and len(built[1].items) == 12
    assert built[1].class_index is not None and built[1].class_index[5] == [
        ("images/val/v5_0.jpg", "masks/val/v5_0.png"), ("images/val/v5_1.jpg", "masks/val/v5_1.png"),
        ("images/val/v5_2.jpg", "masks/val/v5_2.png")]

    write_fss_lists(built[1], tmp_path / "lists" / "toy")
    read = read_fss_lists(tmp_path / "lists", "toy3i", 1)  # found through the spec's list folder name
    assert read.items == built[1].items and read.class_index == built[1].class_index

    ds = open_dataset("toy", root, fold=1)
    assert ds.name == "toy3i" and ds.classes == [5, 6, 7, 8]
    episodes = sample_episodes(ds, None, shot=2, seed=3)
    assert len(episodes) == 7  # the spec's trainer episode count
    for episode in episodes:
        assert episode.class_id in ds.classes
        assert all(s[0] != episode.query_image for s in episode.supports)
    meta = EpisodeMeta.for_dataset(ds, shot=2, seed=3)
    EpisodeMeta(**{**meta.to_dict(), "coco_split": "contiguous"}).check_dataset(ds)  # no fold variants: ignored
