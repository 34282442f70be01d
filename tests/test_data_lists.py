"""The trainers' list files: the shipped lists parse with the documented counts, the 2048-pixel rule,
building lists from data, writing them back byte for byte, and broken list files."""

from __future__ import annotations

import ast
import filecmp
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from clipprior.data import MIN_PIXELS, build_fss_lists, counted_classes, read_fss_lists, write_fss_lists
from clipprior.data.layout import to_id
from clipprior.data.lists import find_list_files, read_data_list, read_sub_class_file_list
from clipprior.data.report import DataReport
from clipprior.errors import DataNotFoundError, DatasetError, InvalidInputError

LISTS = Path(__file__).resolve().parents[1].parent / "shared" / "lists"
PASCAL_PREFIX = "../data/VOCdevkit2012/VOC2012"
COCO_PREFIX = "../data/MSCOCO2014"


@pytest.fixture(scope="module")
def shared_lists() -> Path:
    assert (LISTS / "README.md").is_file(), f"the shared list files are missing at {LISTS}"
    return LISTS


# --- the shipped lists (/work/shared/lists/README.md) ---------------------------------------------------------

@pytest.mark.parametrize(
    ("fold", "images", "pairs"),
    [(0, 364, 365), (1, 445, 467), (2, 592, 734), (3, 336, 357)],
)
def test_pascal_val_counts(shared_lists, fold, images, pairs):
    lists = read_fss_lists(shared_lists / "pascal", "pascal5i", fold, "val")
    assert len(lists.items) == images
    assert lists.pair_count() == pairs
    assert sorted(lists.class_index) == [5 * fold + k for k in range(1, 6)]


def test_pascal_val_fold0_per_class(shared_lists):
    lists = read_fss_lists(shared_lists / "pascal", "pascal5i", 0, "val")
    assert [len(lists.class_index[c]) for c in range(1, 6)] == [81, 63, 89, 61, 71]
    assert lists.items[0] == ("JPEGImages/2007_000033.jpg", "SegmentationClassAug/2007_000033.png")
    # every support pair is a query of the data list, in data-list order
    position = {item: i for i, item in enumerate(lists.items)}
    for pairs in lists.class_index.values():
        indices = [position[p] for p in pairs]
        assert indices == sorted(indices)
    assert {p for pairs in lists.class_index.values() for p in pairs} == set(lists.items)


@pytest.mark.parametrize(("fold", "images"), [(0, 4208), (1, 3726), (2, 2752), (3, 4510)])
def test_pascal_train_counts(shared_lists, fold, images):
    lists = read_fss_lists(shared_lists / "pascal", "pascal5i", fold, "train")
    assert len(lists.items) == images
    novel = set(range(5 * fold + 1, 5 * fold + 6))
    assert sorted(lists.class_index) == [c for c in range(1, 21) if c not in novel]


@pytest.mark.parametrize(("fold", "images"), [(0, 26052), (1, 15305), (2, 13138), (3, 12640)])
def test_coco_val_counts(shared_lists, fold, images):
    lists = read_fss_lists(shared_lists / "coco", "coco20i", fold, "val")
    assert len(lists.items) == images
    assert lists.items[0][0].startswith("val2014/COCO_val2014_")
    assert lists.items[0][1].startswith("annotations/val2014/COCO_val2014_")
    if fold == 0:
        assert lists.class_index is None  # sub_class_file_list_0.txt did not survive
    else:
        assert sorted(lists.class_index) == list(range(fold + 1, 81, 4))  # interleaved split
        assert {p for pairs in lists.class_index.values() for p in pairs} <= set(lists.items)


def test_coco_train_fold0_data_list(shared_lists):
    lists = read_fss_lists(shared_lists / "coco", "coco20i", 0, "train")
    assert len(lists.items) == 21917 and lists.class_index is None
    assert lists.items[0][0].startswith("train2014/")


@pytest.mark.parametrize(
    ("fold_list", "base_list", "dataset"),
    [
        ("pascal/fss_list/val/data_list_0.txt", "pascal/val.txt", "pascal5i"),
        ("pascal/fss_list/train/data_list_0.txt", "pascal/voc_sbd_merge_noduplicate.txt", "pascal5i"),
        ("coco/fss_list/val/data_list_2.txt", "coco/val.txt", "coco20i"),
    ],
)
def test_fold_lists_keep_base_list_order(shared_lists, fold_list, base_list, dataset):
    fold_items = read_data_list(shared_lists / fold_list, dataset)
    base = iter(read_data_list(shared_lists / base_list, dataset))
    assert all(item in base for item in fold_items)  # an ordered subsequence


@pytest.mark.parametrize(
    ("short", "dataset", "split", "fold", "prefix"),
    [("pascal", "pascal5i", "val", 0, PASCAL_PREFIX), ("pascal", "pascal5i", "train", 2, PASCAL_PREFIX),
     ("pascal", "pascal5i", "val", 3, PASCAL_PREFIX), ("coco", "coco20i", "val", 1, COCO_PREFIX)],
)
def test_writing_reproduces_trainer_files_byte_for_byte(shared_lists, tmp_path, short, dataset, split, fold, prefix):
    lists = read_fss_lists(shared_lists / short, dataset, fold, split)
    data_path, sub_path = write_fss_lists(lists, tmp_path, prefix)
    source = shared_lists / short / "fss_list" / split
    assert filecmp.cmp(data_path, source / data_path.name, shallow=False)
    assert filecmp.cmp(sub_path, source / sub_path.name, shallow=False)


def test_checksum_ignores_prefix_and_detects_change(shared_lists, tmp_path):
    lists = read_fss_lists(shared_lists / "pascal", "pascal5i", 0)
    write_fss_lists(lists, tmp_path / "abs", "/somewhere/else/VOC2012")
    write_fss_lists(lists, tmp_path / "rel", "")
    for folder in ("abs", "rel"):
        assert read_fss_lists(tmp_path / folder, "pascal5i", 0).checksum() == lists.checksum()
    lists.class_index[1] = lists.class_index[1][:-1]
    assert lists.checksum() != read_fss_lists(tmp_path / "rel", "pascal5i", 0).checksum()


@pytest.mark.parametrize("form", ["dataset_dir", "fss_list", "split_dir", "lists_root"])
def test_find_list_files_accepts_every_folder_form(shared_lists, form):
    folder = {
        "dataset_dir": shared_lists / "pascal",
        "fss_list": shared_lists / "pascal" / "fss_list",
        "split_dir": shared_lists / "pascal" / "fss_list" / "val",
        "lists_root": shared_lists,
    }[form]
    data, sub = find_list_files(folder, "pascal5i", 1, "val")
    assert data == shared_lists / "pascal" / "fss_list" / "val" / "data_list_1.txt"
    assert sub is not None and sub.name == "sub_class_file_list_1.txt"


def test_find_list_files_missing(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"data_list_2\.txt"):
        find_list_files(tmp_path, "pascal5i", 2, "val")
    with pytest.raises(DataNotFoundError, match="does not exist"):
        find_list_files(tmp_path / "nope", "pascal5i", 0, "val")


def test_sub_class_list_of_other_fold_or_split_rejected(shared_lists, tmp_path):
    folder = tmp_path / "fss_list" / "val"
    folder.mkdir(parents=True)
    (folder / "data_list_1.txt").write_text("JPEGImages/a.jpg SegmentationClassAug/a.png\n")
    (folder / "sub_class_file_list_1.txt").write_bytes(
        (shared_lists / "pascal" / "fss_list" / "val" / "sub_class_file_list_0.txt").read_bytes())
    with pytest.raises(DatasetError, match="another fold"):
        read_fss_lists(tmp_path, "pascal5i", 1)
    with pytest.raises(DatasetError, match="another fold, split or COCO split"):
        read_fss_lists(shared_lists / "coco", "coco20i", 1, coco_split="contiguous")


# --- path remapping ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("path", "dataset", "kind", "expected"),
    [
        ("../data/VOCdevkit2012/VOC2012/JPEGImages/2007_000033.jpg", "pascal5i", "image", "JPEGImages/2007_000033.jpg"),
        ("/abs/VOC2012/SegmentationClassAug/x.png", "pascal5i", "label", "SegmentationClassAug/x.png"),
        ("JPEGImages/x.jpg", "pascal5i", "image", "JPEGImages/x.jpg"),
        ("C:\\data\\VOC2012\\JPEGImages\\x.jpg", "pascal5i", "image", "JPEGImages/x.jpg"),
        ("../data/MSCOCO2014/val2014/a.jpg", "coco20i", "image", "val2014/a.jpg"),
        ("../data/MSCOCO2014/annotations/val2014/a.png", "coco20i", "label", "annotations/val2014/a.png"),
        ("/mnt/annotations/MSCOCO2014/train2014/a.jpg", "coco20i", "image", "train2014/a.jpg"),
    ],
)
def test_to_id(path, dataset, kind, expected):
    assert to_id(path, dataset, kind) == expected


@pytest.mark.parametrize(
    ("path", "dataset", "kind"),
    [("../data/VOC2012/SegmentationClass/x.png", "pascal5i", "label"), ("x.jpg", "pascal5i", "image"),
     ("../data/MSCOCO2014/val2014/a.png", "coco20i", "label"), ("JPEGImages/", "pascal5i", "image")],
)
def test_to_id_rejects_paths_outside_layout(path, dataset, kind):
    with pytest.raises(DatasetError, match="is not inside"):
        to_id(path, dataset, kind)


# --- malformed list files ----------------------------------------------------------------------------------------

def test_data_list_bad_lines_raise_with_line_number(tmp_path):
    path = tmp_path / "data_list_0.txt"
    path.write_text("JPEGImages/a.jpg SegmentationClassAug/a.png\n\nJPEGImages/b.jpg\n"
                    "JPEGImages/c.jpg Elsewhere/c.png\nJPEGImages/d.jpg SegmentationClassAug/d.png\n")
    with pytest.raises(DatasetError, match=r"data_list_0\.txt:3: expected 'image label', found 1 field"):
        read_data_list(path, "pascal5i")
    report = DataReport()
    items = read_data_list(path, "pascal5i", on_error="skip", report=report)
    assert items == [("JPEGImages/a.jpg", "SegmentationClassAug/a.png"),
                     ("JPEGImages/d.jpg", "SegmentationClassAug/d.png")]
    assert [p.line for p in report] == [3, 4] and "Elsewhere/c.png" in str(report.problems[1])


def test_sub_class_list_is_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "sub_class_file_list_0.txt"
    path.write_text(f"__import__('os').system('touch {marker}')")
    with pytest.raises(DatasetError, match="not a Python-literal dict"):
        read_sub_class_file_list(path, "pascal5i")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("[1, 2, 3]", "dict with integer class keys"),
        ("{'1': []}", "dict with integer class keys"),
        ("{1: 'JPEGImages/a.jpg'}", "expected a list of pairs"),
        ("{1: [('a', 'b'), ", "not a Python-literal dict"),
        ("", "not a Python-literal dict"),
    ],
)
def test_sub_class_list_malformed(tmp_path, content, match):
    path = tmp_path / "s.txt"
    path.write_text(content)
    with pytest.raises(DatasetError, match=match):
        read_sub_class_file_list(path, "pascal5i")


def test_sub_class_list_bad_entries_skippable(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("{1: [('JPEGImages/a.jpg', 'SegmentationClassAug/a.png'), ('only one',), "
                    "('JPEGImages/b.jpg', 'Other/b.png')], 2: []}")
    with pytest.raises(DatasetError, match="not an \\(image, label\\) pair"):
        read_sub_class_file_list(path, "pascal5i")
    report = DataReport()
    index = read_sub_class_file_list(path, "pascal5i", on_error="skip", report=report)
    assert index == {1: [("JPEGImages/a.jpg", "SegmentationClassAug/a.png")], 2: []}
    assert len(report) == 2


def test_missing_list_file(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"nothere\.txt"):
        read_data_list(tmp_path / "nothere.txt", "pascal5i")


def test_write_rejects_whitespace_prefix(shared_lists, tmp_path):
    lists = read_fss_lists(shared_lists / "pascal", "pascal5i", 0)
    with pytest.raises(InvalidInputError, match="whitespace"):
        write_fss_lists(lists, tmp_path, "/my data/VOC2012")


# --- the rule ----------------------------------------------------------------------------------------------------

def _mask(regions: dict[int, int], size: int = 96) -> np.ndarray:
    """A size x size mask whose classes cover exactly the given pixel counts, in raster order."""
    flat = np.zeros(size * size, np.uint8)
    start = 0
    for value, count in regions.items():
        flat[start:start + count] = value
        start += count
    assert start <= flat.size
    return flat.reshape(size, size)


@pytest.mark.parametrize(("pixels", "counted"), [(MIN_PIXELS - 1, False), (MIN_PIXELS, True), (MIN_PIXELS + 1, True)])
@pytest.mark.parametrize("split", ["val", "train"])
def test_threshold_is_2048_inclusive(pixels, counted, split):
    assert MIN_PIXELS == 2048
    classes = [1, 2, 3, 4, 5] if split == "val" else list(range(6, 21))
    c = classes[0]
    assert counted_classes(_mask({c: pixels, 255: 500}), classes, split) == ([c] if counted else [])


def test_ignore_and_background_never_count_or_exclude():
    mask = _mask({255: 3000, 7: 2048})
    assert counted_classes(mask, list(range(6, 21)), "train") == [7]
    assert counted_classes(_mask({255: 4000}), [1, 2, 3, 4, 5], "val") == []


def test_train_drops_images_with_any_novel_pixel_val_keeps_base_classes():
    mask = _mask({7: 3000, 2: 1})  # class 2 (novel in fold 0) on a single pixel
    assert counted_classes(mask, list(range(6, 21)), "train") == []
    mask = _mask({2: 3000, 7: 3000})
    assert counted_classes(mask, [1, 2, 3, 4, 5], "val") == [2]
    assert counted_classes(_mask({7: 3000, 9: 100}), list(range(6, 21)), "train") == [7]


def _reference_rule(mask, classes, split, min_pixels):
    present = sorted(set(np.unique(mask).tolist()) - {0, 255})
    if split == "train" and any(c not in classes for c in present):
        return []
    return [c for c in present if c in classes and int((mask == c).sum()) >= min_pixels]


@settings(max_examples=60, deadline=None)
@given(
    mask=arrays(np.uint8, (6, 7), elements=st.sampled_from([0, 1, 2, 3, 6, 7, 255])),
    split=st.sampled_from(["val", "train"]),
    min_pixels=st.integers(1, 12),
)
def test_rule_matches_its_definition(mask, split, min_pixels):
    classes = [1, 2, 3, 4, 5] if split == "val" else list(range(6, 21))
    assert counted_classes(mask, classes, split, min_pixels) == _reference_rule(mask, classes, split, min_pixels)


# --- building from data ------------------------------------------------------------------------------------------

CRAFTED = {
    "a_at": {1: 2048},                # counted (exactly at the threshold)
    "b_under": {2: 2047},             # not counted
    "c_mixed": {1: 2048, 7: 1},       # val: class 1; train: dropped (class 1 is novel)
    "d_base": {7: 2048, 255: 100},    # val: nothing; train: class 7
    "e_empty": {255: 1000},           # nothing anywhere
    "f_both": {3: 2500, 4: 2100},     # val: classes 3 and 4
    "g_base_small": {8: 2047, 9: 3000},  # train: 9 only
}


@pytest.fixture
def crafted_voc(tmp_path) -> Path:
    root = tmp_path / "VOC2012"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClassAug").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for stem, regions in CRAFTED.items():
        Image.fromarray(np.zeros((96, 96, 3), np.uint8)).save(root / "JPEGImages" / f"{stem}.jpg")
        Image.fromarray(_mask(regions)).save(root / "SegmentationClassAug" / f"{stem}.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("".join(f"{s}\n" for s in CRAFTED))
    base = "".join(f"JPEGImages/{s}.jpg SegmentationClassAug/{s}.png\n" for s in CRAFTED)
    (tmp_path / "base.txt").write_text(base)
    return root


def _ids(*stems):
    return [(f"JPEGImages/{s}.jpg", f"SegmentationClassAug/{s}.png") for s in stems]


def test_build_val_lists_on_crafted_masks(crafted_voc):
    built = build_fss_lists("pascal5i", crafted_voc, "val", folds=[0, 1])
    fold0 = built[0]
    assert fold0.items == _ids("a_at", "c_mixed", "f_both")
    assert fold0.class_index == {1: _ids("a_at", "c_mixed"), 2: [], 3: _ids("f_both"), 4: _ids("f_both"), 5: []}
    assert built[1].items == _ids("d_base", "g_base_small")  # fold 1 tests classes 6..10
    assert built[1].class_index[7] == _ids("d_base") and built[1].class_index[8] == []


def test_build_train_lists_on_crafted_masks(crafted_voc):
    base_list = crafted_voc.parent / "base.txt"
    fold0 = build_fss_lists("pascal5i", crafted_voc, "train", folds=[0], base_list=base_list)[0]
    assert fold0.items == _ids("d_base", "g_base_small")
    assert fold0.class_index[7] == _ids("d_base")
    assert fold0.class_index[8] == [] and fold0.class_index[9] == _ids("g_base_small")
    assert set(fold0.class_index) == set(range(6, 21))


def test_build_reports_missing_mask(crafted_voc):
    (crafted_voc / "SegmentationClassAug" / "f_both.png").unlink()
    with pytest.raises(DataNotFoundError, match=r"f_both\.png"):
        build_fss_lists("pascal5i", crafted_voc, "val", folds=[0])
    report = DataReport()
    built = build_fss_lists("pascal5i", crafted_voc, "val", folds=[0], on_error="skip", report=report)
    assert built[0].items == _ids("a_at", "c_mixed") and len(report) == 1 and report.problems[0].missing


def test_build_without_val_txt_needs_base_list(crafted_voc):
    (crafted_voc / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(DataNotFoundError, match="base list"):
        build_fss_lists("pascal5i", crafted_voc, "val", folds=[0])


def test_built_lists_round_trip_through_files(crafted_voc, tmp_path):
    built = build_fss_lists("pascal5i", crafted_voc, "val", folds=[0])[0]
    data_path, sub_path = write_fss_lists(built, tmp_path / "lists", str(crafted_voc))
    first = data_path.read_text().splitlines()[0]
    assert first == f"{crafted_voc}/JPEGImages/a_at.jpg {crafted_voc}/SegmentationClassAug/a_at.png"
    parsed = ast.literal_eval(sub_path.read_text())
    assert sorted(parsed) == [1, 2, 3, 4, 5] and parsed[2] == []
    again = read_fss_lists(tmp_path / "lists", "pascal5i", 0)
    assert again.items == built.items and again.class_index == built.class_index
    assert again.checksum() == built.checksum()
