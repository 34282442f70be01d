"""PIR's box mask on the device: the batched labelling equals SciPy's, the masks equal the official ones.

The oracle is the official computation written out with numpy and SciPy (``uint8(255 cam)``, the
integer threshold, ``ndimage.label`` with a 3 x 3 structure, ``find_objects``, clipped boxes).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from clipprior import InvalidInputError
from clipprior.priors import _box_mask_device, _box_mask_host, box_mask, connected_components

EIGHT = np.ones((3, 3), dtype=bool)


def oracle_boxes(cam: np.ndarray, threshold: float) -> list[tuple[int, int, int, int]]:
    """The official boxes [x0, y0, x1, y1] of one (h, w) float32 CAM."""
    gh, gw = cam.shape
    u8 = (cam * 255).astype(np.uint8)
    fg = u8 > int(threshold * int(u8.max()))
    labels, _ = ndimage.label(fg, structure=EIGHT)
    boxes = []
    for sl in ndimage.find_objects(labels):
        if sl is None:
            continue
        y, x = sl[0].start, sl[1].start
        h, w = sl[0].stop - y, sl[1].stop - x
        boxes.append((x, y, min(x + w, gw - 1), min(y + h, gh - 1)))
    return boxes


def oracle_mask(cam: np.ndarray, threshold: float) -> np.ndarray:
    mask = np.zeros(cam.shape, dtype=bool)
    for x0, y0, x1, y1 in oracle_boxes(cam, threshold):
        mask[y0:y1, x0:x1] = True
    return mask


def assert_same_partition(mask: np.ndarray, labels: np.ndarray) -> None:
    """``labels`` (ours) and SciPy's labelling split the foreground into the same components."""
    ref, _ = ndimage.label(mask, structure=EIGHT)
    assert not labels[~mask].any(), "background cells must be labelled 0"
    assert (labels[mask] > 0).all(), "foreground cells must be labelled > 0"
    pairs = set(zip(ref[mask].tolist(), labels[mask].tolist(), strict=True))
    assert len({a for a, _ in pairs}) == len(pairs) == len({b for _, b in pairs}), "not the same partition"


# ----------------------------------------------------------------------------------------------
# Adversarial masks


def spiral(h: int, w: int) -> np.ndarray:
    """A one-cell-wide square spiral with one-cell gaps (a single component of maximal length)."""
    m = np.zeros((h, w), dtype=bool)
    top, left, bottom, right = 0, 0, h - 1, w - 1
    while top <= bottom and left <= right:
        m[top, left:right + 1] = True
        m[top:bottom + 1, right] = True
        if bottom > top:
            m[bottom, left:right + 1] = True
        if right > left:
            m[top + 2:bottom + 1, left] = True
        top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2
        if top <= bottom and left <= right:
            m[top - 1, left - 1] = False  # keep rings apart except through the corner
            m[top, left - 1] = True
    return m


def snake(h: int, w: int) -> np.ndarray:
    """Boustrophedon: full rows joined alternately at the right and left ends (one long path)."""
    m = np.zeros((h, w), dtype=bool)
    m[::2] = True
    for r in range(1, h, 2):
        m[r, w - 1 if (r // 2) % 2 == 0 else 0] = True
    return m


def diagonal_staircase(h: int, w: int) -> np.ndarray:
    """Cells touching only at corners: connected under 8- but not 4-connectivity."""
    m = np.zeros((h, w), dtype=bool)
    for i in range(min(h, w)):
        m[i, i] = True
    for i in range(0, min(h, w) - 2, 2):
        if i + 2 < w:
            m[i, i + 2] = True
    return m


def vertical_zigzag(h: int, w: int) -> np.ndarray:
    """Columns joined only diagonally, alternately at the bottom and the top: one long zigzag path."""
    m = np.zeros((h, w), dtype=bool)
    if h < 3:
        return m
    m[1:h - 1, ::2] = True
    for i, c in enumerate(range(1, w - 1, 2)):
        m[h - 1 if i % 2 == 0 else 0, c] = True
    return m


def checkerboard(h: int, w: int) -> np.ndarray:
    return (np.add.outer(np.arange(h), np.arange(w)) % 2 == 0)


def comb(h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[0] = True
    m[:, ::2] = True
    return m


def frame(h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[0] = m[-1] = True
    m[:, 0] = m[:, -1] = True
    return m


def dots(h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[::2, ::2] = True
    return m


ADVERSARIAL = {
    "empty": lambda h, w: np.zeros((h, w), dtype=bool),
    "full": lambda h, w: np.ones((h, w), dtype=bool),
    "single_first": lambda h, w: np.eye(1, h * w, 0, dtype=bool).reshape(h, w),
    "single_last": lambda h, w: np.eye(1, h * w, h * w - 1, dtype=bool).reshape(h, w),
    "spiral": spiral,
    "snake": snake,
    "snake_transposed": lambda h, w: snake(w, h).T.copy(),
    "diagonal_staircase": diagonal_staircase,
    "anti_diagonal": lambda h, w: np.fliplr(diagonal_staircase(h, w)).copy(),
    "vertical_zigzag": vertical_zigzag,
    "checkerboard": checkerboard,
    "checkerboard_odd": lambda h, w: ~checkerboard(h, w),
    "comb": comb,
    "frame": frame,
    "isolated_dots": dots,
    "last_row_only": lambda h, w: np.vstack([np.zeros((h - 1, w), bool), np.ones((1, w), bool)]),
    "last_col_only": lambda h, w: np.hstack([np.zeros((h, w - 1), bool), np.ones((h, 1), bool)]),
}
SIZES = [(1, 1), (1, 9), (9, 1), (2, 2), (5, 7), (30, 30), (29, 41), (64, 64)]


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_masks_label_like_scipy(name):
    masks = [ADVERSARIAL[name](h, w) for h, w in SIZES]
    for mask in masks:
        labels = connected_components(torch.from_numpy(mask)[None])[0].numpy()
        assert_same_partition(mask, labels)


def test_long_paths_are_one_component():
    for mask in (spiral(30, 30), snake(30, 30), snake(64, 64), vertical_zigzag(30, 30)):
        labels = connected_components(torch.from_numpy(mask)[None])[0].numpy()
        assert len(np.unique(labels[mask])) == ndimage.label(mask, structure=EIGHT)[1] == 1


def test_a_batch_of_different_masks_is_labelled_independently():
    h, w = 30, 30
    batch = np.stack([ADVERSARIAL[name](h, w) for name in sorted(ADVERSARIAL)])
    labels = connected_components(torch.from_numpy(batch)).numpy()
    for mask, lab in zip(batch, labels, strict=True):
        assert_same_partition(mask, lab)


def test_labels_are_the_largest_cell_index_plus_one():
    m = torch.tensor([[[1, 0, 0], [0, 1, 0], [0, 0, 0]], [[1, 0, 1], [0, 0, 0], [1, 1, 0]]]).bool()
    assert connected_components(m).tolist() == [[[5, 0, 0], [0, 5, 0], [0, 0, 0]], [[1, 0, 3], [0, 0, 0], [8, 8, 0]]]


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 3), st.integers(1, 33), st.integers(1, 33), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_random_masks_label_like_scipy(count, h, w, density, seed):
    mask = np.random.default_rng(seed).random((count, h, w)) < density
    labels = connected_components(torch.from_numpy(mask)).numpy()
    for i in range(count):
        assert_same_partition(mask[i], labels[i])


def test_connected_components_rejects_a_bad_rank():
    with pytest.raises(InvalidInputError, match=r"\(P, h, w\)"):
        connected_components(torch.ones(3, 3, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------
# The box mask: device path, host path, official oracle

_cams = arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 32), st.integers(1, 32)),
               elements=st.floats(0, 1, width=32))


def _smooth_cams(seed: int, count: int, h: int, w: int, power: float) -> np.ndarray:
    """Blobby CAMs like real ones: upsampled random fields, normalised, sharpened by ``power``."""
    rng = np.random.default_rng(seed)
    small = torch.from_numpy(rng.random((count, 1, max(2, h // 5), max(2, w // 5))).astype(np.float32))
    cam = torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    cam = cam - cam.amin(dim=(1, 2), keepdim=True)
    cam = cam / (1e-7 + cam.amax(dim=(1, 2), keepdim=True))
    return (cam**power).numpy()


def _check_paths(cam: np.ndarray, threshold: float) -> None:
    tensor = torch.from_numpy(cam)
    expected = [oracle_boxes(c, threshold) for c in cam]
    for path in (_box_mask_device, _box_mask_host):
        mask, boxes = path(tensor, threshold, True)
        assert boxes == expected, path.__name__  # same boxes, same (first-cell) order
        for i, c in enumerate(cam):
            np.testing.assert_array_equal(mask[i].numpy(), oracle_mask(c, threshold), err_msg=path.__name__)
        assert torch.equal(path(tensor, threshold, False), mask)


@settings(max_examples=120, deadline=None)
@given(_cams, st.floats(0, 0.95))
def test_box_mask_paths_equal_the_official_boxes_on_random_cams(cam, threshold):
    _check_paths(cam, threshold)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 4), st.integers(2, 40), st.integers(2, 40),
       st.sampled_from([0.5, 1.0, 3.0]), st.sampled_from([0.0, 0.2, 0.4, 0.7]))
def test_box_mask_paths_equal_the_official_boxes_on_blobby_cams(seed, count, h, w, power, threshold):
    _check_paths(_smooth_cams(seed, count, h, w, power), threshold)


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_box_mask_paths_on_adversarial_foregrounds(name):
    cams = np.stack([ADVERSARIAL[name](30, 30)]).astype(np.float32)  # 1 on the mask, 0 elsewhere
    _check_paths(cams, 0.4)
    _check_paths(cams * 0.5 + 0.25, 0.4)  # the same foreground, another maximum


def test_box_mask_thresholds_on_the_uint8_scale():
    # 0.4 * 255 = 102 exactly: 102/255 is not foreground, 103/255 is; the cast truncates 102.99.
    cam = torch.tensor([[[1.0, 0.0, 102 / 255, 0.0, 103 / 255, 0.0, 0.0]] * 3])
    for path in (_box_mask_device, _box_mask_host):
        _, boxes = path(cam, 0.4, True)
        assert boxes[0] == oracle_boxes(cam[0].numpy(), 0.4)
        assert [b[0] for b in boxes[0]] == [0, 4]


def test_box_mask_dispatches_by_device_and_keeps_it():
    cam = torch.from_numpy(_smooth_cams(0, 3, 12, 16, 1.0))
    out = box_mask(cam)
    assert out.device == cam.device and out.dtype == torch.bool
    assert torch.equal(out, _box_mask_device(cam, 0.4, False))
    with pytest.raises(InvalidInputError, match=r"\(P, h, w\)"):
        box_mask(cam[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_box_mask_on_cuda_equals_the_host_path():
    cam = torch.from_numpy(_smooth_cams(1, 64, 30, 30, 1.0))
    assert torch.equal(box_mask(cam.cuda()).cpu(), box_mask(cam))
