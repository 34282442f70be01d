"""The seeded PFENet-family episode sampler and the episode-list file format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from clipprior.data import (
    Episode,
    EpisodeMeta,
    default_episodes,
    open_dataset,
    read_episodes,
    sample_episodes,
    write_episodes,
)
from clipprior.data.synthetic import write_synthetic, write_synthetic_pascal
from clipprior.errors import DataNotFoundError, DatasetError, InvalidInputError


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    return write_synthetic_pascal(tmp_path_factory.mktemp("pascal") / "VOC2012", per_class=4)


@pytest.fixture(scope="module")
def dataset(voc):
    return open_dataset("pascal5i", voc, 0)


def test_same_seed_same_episodes_other_seed_others(voc, dataset):
    first = sample_episodes(dataset, 60, shot=1, seed=7)
    again = sample_episodes(open_dataset("pascal5i", voc, 0), 60, shot=1, seed=7)  # a fresh dataset object too
    assert first == again
    other = sample_episodes(dataset, 60, shot=1, seed=8)
    assert other != first
    assert [e.query for e in other] == [e.query for e in first]  # the queries do not depend on the seed


def test_queries_follow_the_list_cycling(dataset):
    n = len(dataset.items)
    episodes = sample_episodes(dataset, 2 * n + 3, shot=1, seed=0)
    assert [e.query for e in episodes] == [dataset.items[i % n] for i in range(2 * n + 3)]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shot=st.sampled_from([1, 2, 3, 4]), n=st.integers(1, 40))
def test_protocol_laws(dataset, seed, shot, n):
    episodes = sample_episodes(dataset, n, shot=shot, seed=seed)
    assert len(episodes) == n
    for ep in episodes:
        assert ep.class_id in dataset.present_classes(ep.query_label)
        assert ep.shot == shot and len(set(ep.supports)) == shot
        assert ep.query not in ep.supports
        assert all(s in dataset.class_index[ep.class_id] for s in ep.supports)


def test_class_is_drawn_among_all_present_classes(tmp_path):
    """A query showing two fold classes gets either one, depending on the seed."""
    images = {"val": {"q": [1, 2], "a": [1], "b": [1], "c": [2], "d": [2]}}
    ds = open_dataset("pascal5i", write_synthetic(tmp_path / "VOC2012", "pascal5i", images), 0)
    assert ds.items[0] == ("JPEGImages/q.jpg", "SegmentationClassAug/q.png")
    seen = [sample_episodes(ds, 1, shot=1, seed=s)[0].class_id for s in range(40)]
    assert set(seen) == {1, 2} and 8 <= seen.count(1) <= 32


def test_tiny_class_present_but_not_counted_can_be_drawn(tmp_path):
    """As in the trainers, a query's class is drawn among present classes, not only counted ones."""
    images = {"val": {"q": [1], "s1": [1], "s2": [2], "s3": [2]}}
    root = write_synthetic(tmp_path / "VOC2012", "pascal5i", images)
    mask_path = root / "SegmentationClassAug" / "q.png"
    mask = np.asarray(Image.open(mask_path)).copy()
    mask[0, 0] = 2  # one pixel of class 2 in the query
    Image.fromarray(mask).save(mask_path)
    ds = open_dataset("pascal5i", root, 0)
    assert ds.present_classes("SegmentationClassAug/q.png") == (1, 2)
    drawn = {sample_episodes(ds, 1, 1, seed)[0].class_id for seed in range(20)}
    assert drawn == {1, 2}


def _single_support_set(tmp_path: Path) -> Path:
    # class 2 appears in one image only: that image can never be a 1-shot query for class 2
    images = {"val": {"a": [1], "b": [1], "lonely": [2], "c": [3], "d": [3]}}
    return write_synthetic(tmp_path / "VOC2012", "pascal5i", images)


def test_class_without_other_support_raises(tmp_path):
    ds = open_dataset("pascal5i", _single_support_set(tmp_path), 0)
    with pytest.raises(DatasetError, match=r"lonely\.jpg: class 2 has 0 support\(s\) besides this query"):
        sample_episodes(ds, 10, shot=1, seed=0)


def test_class_without_other_support_skipped_and_reported_once(tmp_path):
    ds = open_dataset("pascal5i", _single_support_set(tmp_path), 0, on_error="skip")
    episodes = sample_episodes(ds, 12, shot=1, seed=0)
    assert len(episodes) == 12 and all(e.query_image != "JPEGImages/lonely.jpg" for e in episodes)
    assert len(ds.report) == 1 and "class 2" in str(ds.report.problems[0])


def test_too_few_supports_for_five_shot(dataset):
    with pytest.raises(DatasetError, match="a 5-shot episode needs 5"):
        sample_episodes(dataset, 5, shot=5, seed=0)  # every class has 5 images, so 4 besides the query


def test_nothing_usable_raises_even_when_skipping(tmp_path):
    ds = open_dataset("pascal5i", _single_support_set(tmp_path), 0, on_error="skip")
    with pytest.raises(DatasetError, match=r"no query .* gives a 3-shot episode"):
        sample_episodes(ds, 5, shot=3, seed=0)


def test_query_without_fold_class(voc, dataset):
    ds = open_dataset("pascal5i", voc, 0)
    ds.items = [("JPEGImages/2007_010_0.jpg", "SegmentationClassAug/2007_010_0.png"), *ds.items]
    with pytest.raises(DatasetError, match=r"2007_010_0\.png: query mask has none of the fold's classes"):
        sample_episodes(ds, 3, shot=1, seed=0)


@pytest.mark.parametrize(("n", "shot", "seed"), [(-1, 1, 0), (5, 0, 0), (5, 1, -3), (5, True, 0), (2.5, 1, 0)])
def test_bad_sampler_arguments(dataset, n, shot, seed):
    with pytest.raises(InvalidInputError):
        sample_episodes(dataset, n, shot=shot, seed=seed)


def test_default_counts(dataset):
    assert default_episodes("pascal5i") == 1000 and default_episodes("coco20i") == 5000
    assert default_episodes("coco", "hdmnet") == 10000 and default_episodes("pascal", "pfenet") == 5000
    assert len(sample_episodes(dataset, shot=1, seed=0)) == 1000
    with pytest.raises(InvalidInputError, match="unknown trainer"):
        default_episodes("pascal5i", "nope")


# --- files -------------------------------------------------------------------------------------------------------

def test_episode_file_round_trip(tmp_path, dataset):
    episodes = sample_episodes(dataset, 25, shot=2, seed=3)
    meta = EpisodeMeta.for_dataset(dataset, shot=2, seed=3)
    path = write_episodes(tmp_path / "sub" / "ep.jsonl", episodes, meta)
    read, read_meta = read_episodes(path)
    assert read == episodes
    assert read_meta == EpisodeMeta("pascal5i", 0, "val", 2, 3, 25, "interleaved", dataset.list_checksum)
    read_meta.check_dataset(dataset)
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["format"] == "clipprior-episodes" and header["version"] == 1 and header["n_episodes"] == 25
    record = json.loads(lines[1])
    assert record == {"query": list(episodes[0].query), "class": episodes[0].class_id,
                      "supports": [list(s) for s in episodes[0].supports]}
    assert not record["query"][0].startswith("/")


def test_meta_from_mapping_and_absolute_paths(tmp_path, dataset):
    episodes = sample_episodes(dataset, 3, shot=1, seed=0)
    absolute = [Episode(str(dataset.path(e.query_image)), str(dataset.path(e.query_label)), e.class_id,
                        tuple((str(dataset.path(i)), str(dataset.path(lbl))) for i, lbl in e.supports))
                for e in episodes]
    meta = {"dataset": "pascal5i", "fold": 0, "split": "val", "shot": 1, "seed": 0}
    with pytest.raises(InvalidInputError, match="absolute"):
        write_episodes(tmp_path / "e.jsonl", absolute, meta)
    write_episodes(tmp_path / "e.jsonl", absolute, meta, root=dataset.root)
    assert read_episodes(tmp_path / "e.jsonl")[0] == episodes


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        ({"dataset": "pascal5i", "fold": 0, "split": "val", "shot": 2, "seed": 0}, "1 supports but meta says shot=2"),
        ({"dataset": "pascal5i", "fold": 0, "split": "val", "seed": 0}, "lacks field"),
        ({"dataset": "pascal5i", "fold": 9, "split": "val", "shot": 1, "seed": 0}, "fold"),
        ({"dataset": "pascal5i", "fold": 0, "split": "val", "shot": 1, "seed": 0, "colour": 1}, "unknown"),
    ],
)
def test_write_rejects_bad_meta(tmp_path, dataset, meta, match):
    episodes = sample_episodes(dataset, 2, shot=1, seed=0)
    with pytest.raises(InvalidInputError, match=match):
        write_episodes(tmp_path / "e.jsonl", episodes, meta)


def test_meta_check_dataset_detects_other_lists(dataset, voc):
    meta = EpisodeMeta.for_dataset(dataset, shot=1, seed=0)
    other = open_dataset("pascal5i", voc, 1)
    with pytest.raises(DatasetError, match="fold: file 0 != dataset 1"):
        meta.check_dataset(other)


@pytest.fixture
def good_file(tmp_path, dataset) -> Path:
    episodes = sample_episodes(dataset, 4, shot=1, seed=0)
    return write_episodes(tmp_path / "e.jsonl", episodes, EpisodeMeta.for_dataset(dataset, 1, 0))


def _edit(path: Path, line: int, new: str | None) -> None:
    lines = path.read_text().splitlines()
    if new is None:
        del lines[line]
    else:
        lines[line] = new
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("line", "new", "match"),
    [
        (0, '{"format": "other"}', "not a clipprior episode file"),
        (0, "not json", "header is not JSON"),
        (0, None, "not a clipprior episode file"),
        (2, "{oops", r"e\.jsonl:3: not JSON"),
        (2, '{"query": ["a", "b"], "class": 1}', r"e\.jsonl:3: an episode needs"),
        (2, '{"query": ["a", "b"], "class": 9, "supports": [["c", "d"]]}', r":3: class 9 is not a class"),
        (2, '{"query": ["a", "b"], "class": 1, "supports": [["c", "d"], ["e", "f"]]}', "expected 1 supports"),
        (2, '{"query": ["a"], "class": 1, "supports": [["c", "d"]]}', "pair of non-empty strings"),
        (4, None, "holds 3 episodes but its header says 4"),
    ],
)
def test_read_rejects_broken_files(good_file, line, new, match):
    _edit(good_file, line, new)
    with pytest.raises(DatasetError, match=match):
        read_episodes(good_file)


def test_read_rejects_newer_version_and_missing_file(good_file, tmp_path):
    header = json.loads(good_file.read_text().splitlines()[0])
    header["version"] = 99
    _edit(good_file, 0, json.dumps(header))
    with pytest.raises(DatasetError, match="upgrade clipprior"):
        read_episodes(good_file)
    with pytest.raises(DataNotFoundError):
        read_episodes(tmp_path / "none.jsonl")
