"""Metrics of clipprior.evaluate on synthetic priors whose scores are known exactly."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import clipprior.evaluate.metrics as ev
from clipprior.errors import InvalidInputError
from clipprior.evaluate import (
    ClipEsMeter,
    ConfusionMeter,
    PriorMeter,
    average_precision,
    binary_iou,
    clip_es_labels,
    mean_over_folds,
)


def rect(shape: tuple[int, int], r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    out[r0:r1, c0:c1] = True
    return out


def brute_ap(scores: np.ndarray, targets: np.ndarray) -> float:
    """AP by definition: mean over positives of the precision of ``score >= its score``."""
    s, y = scores.ravel(), targets.ravel().astype(bool)
    return float(np.mean([(y & (s >= v)).sum() / (s >= v).sum() for v in s[y]]))


def test_doctests_pass() -> None:
    result = doctest.testmod(ev, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 5 and result.failed == 0


# ------------------------------------------------------------------------------------- FSS protocol


def test_known_iou_single_episode() -> None:
    # target: rows 0..3 (40 px); prediction: rows 2..5 (40 px); I = 20, U = 60.
    label = np.where(rect((10, 10), 0, 4, 0, 10), 5, 0).astype(np.uint8)
    prior = rect((10, 10), 2, 6, 0, 10) * 0.8
    meter = PriorMeter()
    meter.update(prior, label, class_id=5)
    scores = meter.result()
    assert scores.miou_fixed == pytest.approx(20 / 60, abs=0)
    # background: truth rows 4..9 (60 px), predicted bg rows 0..1 and 6..9 (60 px): I = 40, U = 80.
    assert scores.fbiou_fixed == pytest.approx((20 / 60 + 40 / 80) / 2, abs=1e-15)
    assert scores.classes == (5,) and scores.episodes == 1


def test_intersection_and_union_accumulate_over_episodes_not_per_episode_mean() -> None:
    meter = PriorMeter(thresholds=(0.5,))
    shape = (10, 10)
    # episode 1: perfect (I = U = 10); episode 2: I = 10, U = 90.
    meter.update_binary(rect(shape, 0, 1, 0, 10) * 1.0, rect(shape, 0, 1, 0, 10), 3)
    meter.update_binary(rect(shape, 0, 9, 0, 10) * 1.0, rect(shape, 0, 1, 0, 10), 3)
    assert meter.result().miou_fixed == pytest.approx(20 / 100, abs=1e-15)  # not (1 + 1/9) / 2
    assert len(meter) == 2


def test_miou_is_mean_over_classes_and_fbiou_pools_all_episodes() -> None:
    shape = (8, 8)
    meter = PriorMeter(thresholds=(0.5,))
    label_a = np.where(rect(shape, 0, 4, 0, 8), 1, 0)  # class 1: top half (32 px)
    prior_a = rect(shape, 0, 4, 0, 4) * 1.0  # predicts 16 of them: IoU 0.5
    label_b = np.where(rect(shape, 0, 2, 0, 8), 2, 0)  # class 2: 16 px
    prior_b = rect(shape, 0, 2, 0, 8) * 1.0  # perfect: IoU 1
    meter.update(prior_a, label_a, 1)
    meter.update(prior_b, label_b, 2)
    s = meter.result()
    assert s.class_iou[:, 0].tolist() == [0.5, 1.0]
    assert s.miou_fixed == 0.75
    fg = (16 + 16) / (32 + 16)
    bg = (32 + 48) / (48 + 48)  # A: tn 32, union 48; B: tn 48, union 48
    assert s.fbiou_fixed == pytest.approx((fg + bg) / 2, abs=1e-15)


def test_ignore_index_is_left_out_and_other_classes_are_background() -> None:
    shape = (4, 4)
    label = np.zeros(shape, dtype=np.uint8)
    label[0] = 9  # target: 4 px
    label[1] = 255  # ignored: 4 px, predicted but must not count
    label[2] = 4  # another class: background for this episode
    prior = np.zeros(shape)
    prior[:2] = 1.0
    prior[2, :2] = 1.0  # two false positives on the other class
    meter = PriorMeter(thresholds=(0.5,))
    meter.update(prior, label, class_id=9)
    assert meter.result().miou_fixed == pytest.approx(4 / 6, abs=1e-15)
    no_ignore = PriorMeter(thresholds=(0.5,))
    no_ignore.update(prior, label, class_id=9, ignore_index=None)
    assert no_ignore.result().miou_fixed == pytest.approx(4 / 10, abs=1e-15)


def test_threshold_is_inclusive_and_best_threshold_is_found() -> None:
    # Target: left half. Prior: 0.7 on the target, 0.4 on a quarter of the background, 0.1 elsewhere.
    shape = (8, 8)
    target = rect(shape, 0, 8, 0, 4)
    prior = np.full(shape, 0.1)
    prior[target] = 0.7
    prior[0:4, 4:8] = 0.4
    meter = PriorMeter(thresholds=(0.1, 0.3, 0.4, 0.5, 0.7, 0.8))
    meter.update_binary(prior, target, 1)
    s = meter.result()
    iou = dict(zip(s.thresholds, s.class_iou[0], strict=True))
    assert iou[0.1] == 0.5  # everything predicted
    assert iou[0.4] == pytest.approx(32 / 48)  # prior >= 0.4 includes the 0.4 block
    assert iou[0.5] == 1.0 and iou[0.7] == 1.0  # 0.7 >= 0.7: inclusive
    assert iou[0.8] == 0.0
    assert s.best_threshold == 0.5 and s.miou_best == 1.0
    assert s.fixed_threshold == 0.5 and s.miou_fixed == 1.0


def test_fixed_threshold_is_added_to_the_grid() -> None:
    meter = PriorMeter(thresholds=(0.2, 0.8), fixed_threshold=0.35)
    assert meter.thresholds == (0.2, 0.35, 0.8)


def test_average_precision_known_values() -> None:
    # ranking: + - + -  -> AP = (1/1 + 2/3) / 2
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    targets = np.array([True, False, True, False])
    assert average_precision(scores, targets) == pytest.approx(5 / 6, abs=1e-15)
    meter = PriorMeter()
    meter.update_binary(scores.reshape(2, 2), targets.reshape(2, 2), 0)
    assert meter.result().class_ap[0] == pytest.approx(5 / 6, abs=1e-15)
    # ties form one step: all equal -> precision of the whole set
    assert average_precision(np.ones(4), targets) == 0.5
    assert math.isnan(average_precision(scores, np.zeros(4, bool)))


def test_perfect_and_inverted_priors() -> None:
    target = rect((16, 16), 4, 12, 4, 12)
    meter = PriorMeter()
    meter.update_binary(target * 1.0, target, 1)
    meter.update_binary((~target) * 1.0, target, 2)
    s = meter.result()
    assert s.class_ap[0] == 1.0
    assert s.class_ap[1] == pytest.approx(target.mean())  # worst ranking: precision = prevalence
    assert s.class_iou[0, s.thresholds.index(0.5)] == 1.0
    assert s.class_iou[1, s.thresholds.index(0.5)] == 0.0


quantised = st.integers(min_value=0, max_value=1000).map(lambda k: k / 1000)


@settings(max_examples=60, deadline=None)
@example(data=[(0.012, False), (0.013, True)], split=0)  # 0.013 fell in 0.012's bin with linspace edges
@given(
    data=st.lists(st.tuples(quantised, st.booleans()), min_size=1, max_size=60),
    split=st.integers(min_value=0, max_value=60),
)
def test_histogram_ap_equals_exact_ap_on_quantised_scores(data: list[tuple[float, bool]], split: int) -> None:
    scores = np.array([s for s, _ in data])
    targets = np.array([t for _, t in data])
    exact = average_precision(scores, targets)
    meter = PriorMeter()
    cut = min(split, len(data))  # two "episodes" of the same class
    for part in (slice(0, cut), slice(cut, None)):
        if scores[part].size:
            meter.update_binary(scores[part][None], targets[part][None], 7)
    ap = meter.result().class_ap[0]
    if targets.any():
        assert ap == pytest.approx(exact, abs=1e-12)
        assert exact == pytest.approx(brute_ap(scores, targets), abs=1e-12)
    else:
        assert math.isnan(ap) and math.isnan(exact)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), episodes=st.integers(1, 4))
def test_accumulated_iou_matches_brute_force_at_every_threshold(seed: int, episodes: int) -> None:
    rng = np.random.default_rng(seed)
    meter = PriorMeter()
    inter = np.zeros(len(meter.thresholds))
    union = np.zeros(len(meter.thresholds))
    for _ in range(episodes):
        prior = rng.random((6, 7)).astype(np.float32)
        label = rng.choice([0, 2, 3, 255], size=(6, 7))
        meter.update(torch.from_numpy(prior), label, class_id=3)
        valid = label != 255
        for i, t in enumerate(meter.thresholds):
            pred = (prior.astype(np.float64) >= t) & valid
            gt = (label == 3) & valid
            inter[i] += (pred & gt).sum()
            union[i] += (pred | gt).sum()
    s = meter.result()
    expected = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    np.testing.assert_allclose(s.class_iou[0], expected, rtol=0, atol=1e-15)


def test_binary_iou_single_episode() -> None:
    target = rect((4, 4), 0, 2, 0, 4)
    assert binary_iou(target * 0.9, target) == 1.0
    assert binary_iou(np.ones((4, 4)), target) == 0.5
    assert binary_iou(np.ones((4, 4)), target, valid=target) == 1.0
    assert math.isnan(binary_iou(np.zeros((4, 4)), np.zeros((4, 4), bool)))


def test_result_for_named_classes_and_merge() -> None:
    a, b = PriorMeter(), PriorMeter()
    t = rect((4, 4), 0, 2, 0, 4)
    a.update_binary(t * 1.0, t, 1)
    b.update_binary(np.ones((4, 4)), t, 2)
    a.merge(b)
    s = a.result(classes=[2, 1])
    assert s.classes == (1, 2)
    assert s.class_iou[:, s.thresholds.index(0.5)].tolist() == [1.0, 0.5]
    with pytest.raises(InvalidInputError, match=r"class\(es\) \[3\]"):
        a.result(classes=[1, 3])
    with pytest.raises(InvalidInputError, match="different thresholds"):
        a.merge(PriorMeter(thresholds=(0.5,)))


def test_to_dict_is_json_serialisable() -> None:
    import json

    meter = PriorMeter()
    meter.update_binary(np.ones((2, 2)), np.array([[1, 0], [0, 0]], bool), 4)
    d = meter.result().to_dict()
    text = json.dumps(d, allow_nan=False)
    assert '"per_class"' in text and d["per_class"]["4"]["episodes"] == 1
    assert d["miou_fixed"] == 0.25


def test_mean_over_folds_uses_one_common_best_threshold() -> None:
    folds = []
    for good in (0.3, 0.7):  # fold 1 best at 0.3, fold 2 best at 0.7
        target = rect((10, 10), 0, 5, 0, 10)
        prior = np.where(target, good + 0.05, good - 0.05)
        m = PriorMeter(thresholds=(0.3, 0.5, 0.7))
        m.update_binary(prior, target, 1)
        folds.append(m.result())
    assert [f.miou_best for f in folds] == [1.0, 1.0]
    mean = mean_over_folds(folds)
    assert mean["miou_best"] < 1.0  # no per-fold oracle
    assert mean["miou_fixed"] == pytest.approx(np.mean([f.miou_fixed for f in folds]))
    with pytest.raises(InvalidInputError):
        mean_over_folds([])


@pytest.mark.parametrize(
    ("prior", "label", "match"),
    [
        (np.zeros((3, 3)), np.zeros((4, 4)), "resize the prior"),
        (np.zeros((2, 3, 3)), np.zeros((3, 3)), "2-D"),
        (np.full((2, 2), np.nan), np.zeros((2, 2)), "NaN"),
    ],
)
def test_bad_inputs_raise_clear_errors(prior: np.ndarray, label: np.ndarray, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        PriorMeter().update(prior, label, 1)


def test_empty_meter_and_bad_arguments() -> None:
    with pytest.raises(InvalidInputError, match="no episode"):
        PriorMeter().result()
    with pytest.raises(InvalidInputError, match="ap_bins"):
        PriorMeter(ap_bins=0)


# ---------------------------------------------------------------------------------- CLIP-ES protocol


def test_clip_es_labels_background_power() -> None:
    cams = np.array([[[0.9, 0.45, 0.2]]])  # one class, three pixels
    # t=1: bg = 0.1, 0.55, 0.8 -> [cls, bg, bg]; t=2: bg = 0.01, 0.3025, 0.64 -> [cls, cls, bg]
    assert clip_es_labels(cams, [15], bg_power=1).tolist() == [[15, 0, 0]]
    assert clip_es_labels(cams, [15], bg_power=2).tolist() == [[15, 15, 0]]
    assert clip_es_labels(np.zeros((0, 1, 2)), []).tolist() == [[0, 0]]
    with pytest.raises(InvalidInputError, match="one id per CAM"):
        clip_es_labels(cams, [1, 2])


def test_confusion_meter_known_iou() -> None:
    m = ConfusionMeter(3)
    pred = np.array([[0, 0, 1, 1], [2, 2, 2, 0]])
    gt = np.array([[0, 1, 1, 1], [2, 2, 255, 255]])
    m.update(pred, gt)
    # class 0: I = 1, U = |gt 0| 1 + |pred 0| 2 - 1 = 2 ; class 1: I = 2, U = 3 ; class 2: I = 2, U = 2
    np.testing.assert_allclose(m.iou(), [0.5, 2 / 3, 1.0])
    assert m.miou() == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)
    with pytest.raises(InvalidInputError, match=r"outside 0\.\.2"):
        m.update(np.zeros((1, 1)), np.full((1, 1), 7))


def test_clip_es_meter_exact_miou_over_images() -> None:
    meter = ClipEsMeter(num_classes=21, bg_powers=(1, 2))
    label = np.zeros((4, 4), dtype=np.uint8)
    label[:2, :2] = 8  # cat
    label[2:, 2:] = 12  # dog
    label[0, 3] = 255
    cams = {8: np.where(label == 8, 0.9, 0.05), 12: np.where(label == 12, 0.6, 0.0)}
    cams[12][0, 2] = 0.4  # bg score there: t=1 -> 0.6 (bg wins), t=2 -> 0.36 (dog wins: 0.4)
    meter.update(cams, label)
    res = meter.result()
    assert res[1.0].miou == 1.0
    r2 = res[2.0]
    # t=2: background pixel (0,2) becomes dog. bg (7 px): I = 6, U = 7; dog: I = 4, U = 5; cat: 1.
    assert r2.class_iou[0] == pytest.approx(6 / 7)
    assert r2.class_iou[12] == pytest.approx(4 / 5)
    assert r2.miou == pytest.approx((6 / 7 + 4 / 5 + 1.0) / 3)  # only classes that occur count
    assert r2.images == 1
    d = r2.to_dict()
    assert d["per_class"]["12"] == pytest.approx(0.8)


def test_meters_take_their_class_count_from_the_dataset_registry() -> None:
    from clipprior.evaluate import label_classes

    assert label_classes() == 21 and label_classes("coco20i") == 81
    assert ConfusionMeter().num_classes == 21  # the default benchmark, PASCAL VOC with background
    assert ConfusionMeter(dataset="coco20i").num_classes == 81 and ConfusionMeter(5).num_classes == 5
    meter = ClipEsMeter(dataset="coco20i", bg_powers=(1,))
    meter.update({80: np.ones((1, 2))}, np.array([[80, 0]]))
    assert meter.result()[1.0].class_iou.shape == (81,)
