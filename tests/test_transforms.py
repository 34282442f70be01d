"""clipprior.transforms: image, labels and any number of prior channels move together."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clipprior.errors import InvalidInputError
from clipprior.transforms import (
    PFENET_MEAN,
    Compose,
    Crop,
    RandomGaussianBlur,
    RandomHorizontalFlip,
    RandomVerticalFlip,
    RandRotate,
    RandScale,
    Resize,
    TestResize,
    ToTensor,
    train_transform,
    val_transform,
)

H, W = 120, 160


@pytest.fixture(autouse=True)
def one_thread() -> None:
    """Small tensors on a shared CPU: one thread is ~6x faster than several fighting (as in DataLoader workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ellipse_mask(rng: np.random.Generator, size: tuple[int, int] = (H, W)) -> np.ndarray:
    """(H, W) uint8: 1 inside a random ellipse (radii 20..40 px), 0 outside, a 255 band on the left."""
    h, w = size
    cy, cx = rng.uniform(0.35 * h, 0.65 * h), rng.uniform(0.35 * w, 0.65 * w)
    ry, rx = rng.uniform(20, 40), rng.uniform(20, 40)
    ys, xs = np.mgrid[0:h, 0:w]
    mask = (((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1).astype(np.uint8)
    mask[:, :3] = 255
    return mask


def image_of(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (rng.uniform(0, 255, (*mask.shape, 3)) * 0.2 + 150.0 * (mask == 1)[..., None]).astype(np.float32)


def iou(prior_channel: np.ndarray, label: np.ndarray) -> float:
    valid = label != 255
    pred, gt = (prior_channel > 0.5) & valid, (label == 1) & valid
    union = (pred | gt).sum()
    return float((pred & gt).sum() / union) if union else 1.0


def channels_like(mask: np.ndarray, c: int) -> np.ndarray:
    """(H, W, c) prior whose every channel equals the mask's foreground."""
    fg = (mask == 1).astype(np.float32)
    return np.repeat(fg[..., None], c, axis=2)


PIPELINES = {
    "pi-clip": lambda: train_transform("pi-clip", size=97),
    "pfenet": lambda: train_transform("pfenet", size=97),
    "strong": lambda: Compose([RandScale((0.5, 2.0), aspect_ratio=(0.7, 1.4)), RandRotate((-45, 45), p=1.0),
                               RandomGaussianBlur(p=1.0), RandomHorizontalFlip(), RandomVerticalFlip(),
                               Crop((90, 110), "rand")]),
    "val-pfenet": lambda: val_transform("pfenet", size=130),
    "val-pi-clip": lambda: val_transform("pi-clip", size=80),
}


@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
@pytest.mark.parametrize("channels", [1, 3, 12])
def test_prior_equal_to_mask_stays_aligned(pipeline: str, channels: int) -> None:
    aug = PIPELINES[pipeline]()
    for seed in range(12):
        rng = np.random.default_rng(1000 + seed)
        mask = ellipse_mask(rng)
        image, label, prior = aug(image_of(mask, rng), mask, channels_like(mask, channels), rng=seed)
        assert prior.shape == (*label.shape, channels) and image.shape[:2] == label.shape
        assert set(np.unique(label).tolist()) <= {0, 1, 255}
        for k in range(channels):
            assert iou(prior[..., k], label) >= 0.95, (pipeline, seed, k)
        # every channel moved the same way (no per-channel border or interpolation surprise)
        assert np.array_equal(prior, np.repeat(prior[..., :1], channels, axis=2))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), angle=st.floats(-30, 30), scale=st.floats(0.6, 1.6), flip=st.booleans())
def test_alignment_over_random_geometry(seed: int, angle: float, scale: float, flip: bool) -> None:
    rng = np.random.default_rng(seed)
    mask = ellipse_mask(rng)
    aug = Compose([RandScale((scale, scale)), RandRotate((angle, angle), p=1.0),
                   RandomHorizontalFlip(p=float(flip)), Crop(96, "rand")])
    _, label, prior = aug(image_of(mask, rng), mask, torch.from_numpy(channels_like(mask, 4)).permute(2, 0, 1), rng=rng)
    assert tuple(prior.shape) == (4, 96, 96) and label.shape == (96, 96)
    if (label == 1).sum() >= 600:  # a crop may keep a sliver of the object, where IoU measures its edge only
        assert iou(prior[0].numpy(), label) >= 0.95


def test_channels_are_transformed_independently() -> None:
    """A 12-channel prior gives, channel by channel, what each channel gives alone (same draws)."""
    rng = np.random.default_rng(3)
    mask = ellipse_mask(rng)
    image = image_of(mask, rng)
    prior = rng.random((H, W, 12)).astype(np.float32)
    aug = PIPELINES["strong"]()
    _, _, together = aug(image, mask, prior, rng=42)
    for k in (0, 3, 4, 11):
        _, _, alone = aug(image, mask, prior[..., k], rng=42)
        np.testing.assert_allclose(together[..., k], alone, atol=1e-6)


def test_padding_values_after_rotation() -> None:
    image = np.full((H, W, 3), 7.0, np.float32)
    label = np.ones((H, W), np.uint8)
    prior = np.full((H, W, 12), 0.75, np.float32)
    out = RandRotate((45, 45), p=1.0)(image, label, prior)
    corner = (slice(0, 5), slice(0, 5))
    np.testing.assert_allclose(out.image[corner], np.broadcast_to(PFENET_MEAN, (5, 5, 3)), atol=1e-3)
    assert (out.label[corner] == 255).all()
    assert (out.prior[corner] == 0).all()
    centre = (slice(H // 2 - 5, H // 2 + 5), slice(W // 2 - 5, W // 2 + 5))
    np.testing.assert_allclose(out.image[centre], 7.0, atol=1e-3)
    assert (out.label[centre] == 1).all() and np.allclose(out.prior[centre], 0.75)
    # the border value is the same in every channel, for any channel count (cv2's repeats every 4)
    assert np.array_equal(out.prior, np.repeat(out.prior[..., :1], 12, axis=2))


def test_padding_values_of_crop_and_test_resize() -> None:
    image = np.full((40, 50, 3), 7.0, np.float32)
    label = np.ones((40, 50), np.uint8)
    prior = np.full((40, 50, 3), 0.5, np.float32)
    out = Crop((60, 70), "center", padding=(1.0, 2.0, 3.0), ignore_label=254, prior_fill=-1.0)(image, label, prior)
    assert out.image.shape == (60, 70, 3)
    assert (out.image[:10] == [1.0, 2.0, 3.0]).all() and (out.image[50:] == [1.0, 2.0, 3.0]).all()
    assert (out.image[10:50, 10:60] == 7.0).all() and (out.label[10:50, 10:60] == 1).all()
    assert (out.label[:10] == 254).all() and (out.prior[:, :10] == -1.0).all()
    assert (out.prior[10:50, 10:60] == 0.5).all()

    big = np.full((300, 600, 3), 9.0, np.float32)
    out = TestResize(100)(big, np.ones((300, 600), np.uint8), torch.full((2, 300, 600), 0.5))
    h, w = TestResize(100).content_size(300, 600)
    assert (h, w) == (48, 96) and out.image.shape == (100, 100, 3) and tuple(out.prior.shape) == (2, 100, 100)
    assert (out.image[:h, :w] == 9.0).all() and (out.image[h:] == 0).all() and (out.image[:, w:] == 0).all()
    assert (out.label[:h, :w] == 1).all() and (out.label[h:] == 255).all() and (out.label[:, w:] == 255).all()
    assert (out.prior[:, :h, :w] == 0.5).all() and (out.prior[:, h:] == 0).all() and (out.prior[:, :, w:] == 0).all()
    small = TestResize(100)(np.zeros((30, 40, 3), np.float32), np.zeros((30, 40), np.uint8))
    assert small.image.shape == (100, 100, 3) and (small.label[30:] == 255).all() and small.prior is None


def test_rotation_direction_and_centre_follow_opencv() -> None:
    """A positive angle turns the content counter-clockwise about (W / 2, H / 2), as cv2.getRotationMatrix2D."""
    label = np.zeros((H, W), np.uint8)
    label[H // 2 - 2:H // 2 + 2, W // 2 + 30:W // 2 + 34] = 1  # right of the centre
    out = RandRotate((90, 90), p=1.0)(np.zeros((H, W, 3), np.float32), label)
    ys, xs = np.nonzero(out.label == 1)
    assert abs(xs.mean() - W / 2) < 3 and abs(ys.mean() - (H / 2 - 31.5)) < 3  # now above the centre


@pytest.mark.parametrize("kind", ["numpy-hw", "numpy-hwc", "torch-hw", "torch-chw"])
def test_prior_kind_and_layout_are_kept(kind: str) -> None:
    rng = np.random.default_rng(0)
    mask = ellipse_mask(rng)
    base = channels_like(mask, 5)
    prior = {"numpy-hw": base[..., 0], "numpy-hwc": base, "torch-hw": torch.from_numpy(base[..., 0]),
             "torch-chw": torch.from_numpy(base).permute(2, 0, 1)}[kind]
    out = Compose([Resize((50, 70)), RandomHorizontalFlip(p=1.0)])(image_of(mask, rng).astype(np.uint8), mask, prior)
    assert out.image.dtype == np.uint8 and out.image.shape == (50, 70, 3)
    assert out.label.dtype == np.uint8 and out.label.shape == (50, 70)
    expected = {"numpy-hw": (50, 70), "numpy-hwc": (50, 70, 5), "torch-hw": (50, 70), "torch-chw": (5, 50, 70)}[kind]
    assert type(out.prior) is type(prior) and tuple(out.prior.shape) == expected and out.prior.dtype in (np.float32,
                                                                                                      torch.float32)


def test_several_label_planes_and_to_tensor() -> None:
    rng = np.random.default_rng(1)
    mask = ellipse_mask(rng)
    label_b = np.where(mask == 1, 7, 0).astype(np.uint8)  # BAM's base-class label moves with the FSS label
    labels = np.stack([mask, label_b], axis=2)
    aug = train_transform("pi-clip", size=64, to_tensor=True)
    image, label, prior = aug(image_of(mask, rng), labels, torch.from_numpy(channels_like(mask, 4)).permute(2, 0, 1),
                              rng=5)
    assert image.dtype == torch.float32 and tuple(image.shape) == (3, 64, 64)
    assert label.dtype == torch.int64 and tuple(label.shape) == (2, 64, 64)
    assert tuple(prior.shape) == (4, 64, 64)
    assert torch.equal(label[1] == 7, label[0] == 1)  # the two planes stayed aligned pixel for pixel
    # normalisation: a pixel equal to the mean maps to 0
    flat = ToTensor()(np.broadcast_to(np.array(PFENET_MEAN, np.float32), (4, 4, 3)).copy(), np.zeros((4, 4), np.uint8),
                      np.ones((4, 4, 2), np.float32))
    assert torch.allclose(flat.image, torch.zeros(3, 4, 4), atol=1e-6) and tuple(flat.prior.shape) == (2, 4, 4)
    flat_prior = ToTensor()(np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), np.uint8), np.ones((4, 4), np.float32))
    assert tuple(flat_prior.prior.shape) == (4, 4)


def test_rand_scale_size_and_resize() -> None:
    image, label = np.zeros((100, 60, 3), np.float32), np.zeros((100, 60), np.uint8)
    out = RandScale((1.5, 1.5))(image, label, np.zeros((100, 60, 12), np.float32))
    assert out.image.shape == (150, 90, 3) and out.label.shape == (150, 90) and out.prior.shape == (150, 90, 12)
    out = Resize((33, 47))(image, label)
    assert out.image.shape == (33, 47, 3) and out.prior is None


def test_blur_touches_the_image_only() -> None:
    rng = np.random.default_rng(2)
    mask = ellipse_mask(rng)
    image = image_of(mask, rng)
    prior = channels_like(mask, 3)
    out = RandomGaussianBlur(p=1.0)(image, mask, prior)
    assert np.array_equal(out.label, mask) and np.array_equal(out.prior, prior)
    assert not np.allclose(out.image, image) and abs(out.image.mean() - image.mean()) < 0.5
    flat = RandomGaussianBlur(p=1.0)(np.full((9, 9, 3), 4.0, np.float32), np.zeros((9, 9), np.uint8))
    np.testing.assert_allclose(flat.image, 4.0, atol=1e-5)  # mirrored borders keep a flat image flat


def test_rand_crop_keeps_the_foreground_when_it_can() -> None:
    label = np.zeros((100, 100), np.uint8)
    label[15:40, 15:40] = 1  # an object near a corner: one random crop in five keeps it
    image = np.zeros((100, 100, 3), np.float32)
    kept = [(Crop(60, "rand")(image, label, rng=seed).label == 1).sum() for seed in range(20)]
    assert min(kept) >= 0.85 * (label == 1).sum()
    loose = Crop(60, "rand", keep_foreground=None)
    unchecked = [(loose(image, label, rng=seed).label == 1).sum() for seed in range(20)]
    assert min(unchecked) < 0.85 * (label == 1).sum()


def test_seeded_draws_are_reproducible() -> None:
    rng = np.random.default_rng(4)
    mask = ellipse_mask(rng)
    image, prior = image_of(mask, rng), channels_like(mask, 2)
    aug = train_transform("pfenet", size=80)
    a = aug(image, mask, prior, rng=np.random.default_rng(11))
    b = aug(image, mask, prior, rng=11)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    outs = {aug(image, mask, prior, rng=s).label.tobytes() for s in range(8)}
    assert len(outs) > 1


def test_errors() -> None:
    image, label = np.zeros((10, 12, 3), np.float32), np.zeros((10, 12), np.uint8)
    with pytest.raises(InvalidInputError, match="size='original'"):
        Resize(8)(image, label, np.zeros((10, 11, 2), np.float32))
    with pytest.raises(InvalidInputError, match="label"):
        Resize(8)(image, label.tolist())
    with pytest.raises(InvalidInputError, match="crop_type"):
        Crop(8, "middle")
    with pytest.raises(InvalidInputError, match="scale"):
        RandScale((0, 1))
    with pytest.raises(InvalidInputError, match="odd"):
        RandomGaussianBlur(4)
    with pytest.raises(InvalidInputError, match="trainer"):
        train_transform("hsnet")
    with pytest.raises(InvalidInputError, match="channels"):
        RandRotate((5, 5), padding=(1.0, 2.0), p=1.0)(image, label)
    with pytest.raises(InvalidInputError, match="rng"):
        Resize(8)(image, label, rng="seed")
