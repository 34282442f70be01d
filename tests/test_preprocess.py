"""Image preparation: RGB conversion of every PIL mode, resizing to the patch grid, normalisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from clipprior.config import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from clipprior.errors import InvalidInputError
from clipprior.preprocess import (
    check_finite,
    normalize,
    pixel_statistics,
    preprocess_query,
    resize_to_patch_multiple,
    to_rgb_array,
)

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "PA", "RGBA", "CMYK", "YCbCr", "1", "I", "F", "RGB"])
def test_pil_modes_become_rgb_uint8(mode: str) -> None:
    image = Image.fromarray(RGB).convert(mode)
    out = to_rgb_array(image)
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.asarray(image.convert("RGB")))


def test_grayscale_is_replicated_and_alpha_dropped() -> None:
    gray = Image.fromarray(RGB).convert("L")
    out = to_rgb_array(gray)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], np.asarray(gray))
    rgba = np.concatenate([RGB, np.full((5, 7, 1), 7, np.uint8)], axis=-1)
    np.testing.assert_array_equal(to_rgb_array(Image.fromarray(rgba, "RGBA")), RGB)  # no compositing
    np.testing.assert_array_equal(to_rgb_array(rgba), RGB)


def test_palette_is_looked_up() -> None:
    image = Image.fromarray(RGB).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    palette = np.asarray(image.getpalette(), dtype=np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(to_rgb_array(image), palette[np.asarray(image)])


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I"])
def test_sixteen_bit_images_are_scaled_to_their_peak(mode: str) -> None:
    values = (np.arange(35, dtype=np.int32).reshape(5, 7) * 1000)  # 0 .. 34000
    if mode == "I":
        image = Image.fromarray(values, "I")
    else:  # built from raw bytes: PIL's convert() between 16-bit modes clips to 8 bits
        order = ">" if mode == "I;16B" else "<"
        image = Image.frombytes(mode, (7, 5), values.astype(f"{order}u2").tobytes())
    out = to_rgb_array(image)
    expected = np.round(values * (255.0 / 34000)).astype(np.uint8)
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out[..., 0], expected)
    assert out.max() == 255


def test_sixteen_bit_images_within_eight_bits_are_kept() -> None:
    values = np.arange(35, dtype=np.uint16).reshape(5, 7) * 7  # max 238
    out = to_rgb_array(Image.fromarray(values).convert("I;16"))
    np.testing.assert_array_equal(out[..., 1], values.astype(np.uint8))


@pytest.mark.parametrize(("array", "expected"), [
    (RGB[..., 0], np.repeat(RGB[..., :1], 3, axis=-1)),
    (RGB[..., :1], np.repeat(RGB[..., :1], 3, axis=-1)),
    (RGB, RGB),
    (RGB.astype(np.float32) / 255.0, RGB),
    (np.full((2, 2, 3), 2.0), np.full((2, 2, 3), 255, np.uint8)),  # floats are clipped to [0, 1]
])
def test_arrays(array: np.ndarray, expected: np.ndarray) -> None:
    out = to_rgb_array(array)
    assert out.dtype == np.uint8 and out.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize(("array", "pattern"), [
    (np.zeros((4, 4, 2), np.uint8), r"shape \(4, 4, 2\) is not an image"),
    (np.zeros((2, 4, 4, 3), np.uint8), r"shape \(2, 4, 4, 3\) is not an image"),
    (np.zeros(5, np.uint8), r"shape \(5, 3\) is not an image|is not an image"),
    (np.zeros((4, 4, 3), np.int64), r"dtype int64 is not supported; pass uint8 or float in \[0, 1\]"),
    (np.zeros((4, 4, 3), bool), r"dtype bool is not supported"),
    (np.full((4, 4, 3), np.nan), r"NaN or Inf"),
    (np.full((4, 4, 3), np.inf, np.float32), r"NaN or Inf"),
])
def test_bad_arrays(array: np.ndarray, pattern: str) -> None:
    with pytest.raises(InvalidInputError, match=pattern):
        to_rgb_array(array)


@settings(max_examples=60, deadline=None)
@given(st.integers(16, 120), st.integers(16, 120), st.sampled_from([14, 16, 32]))
def test_resize_to_patch_multiple_shape(height: int, width: int, patch: int) -> None:
    image = np.zeros((height, width, 3), np.uint8)
    if height < patch or width < patch:
        with pytest.raises(InvalidInputError, match=rf"smaller than one {patch}x{patch} patch"):
            resize_to_patch_multiple(image, patch)
        return
    out = resize_to_patch_multiple(image, patch)
    assert out.shape == (patch * math.ceil(height / patch), patch * math.ceil(width / patch), 3)
    assert height <= out.shape[0] < height + patch and width <= out.shape[1] < width + patch


def test_resize_keeps_exact_multiples_and_uses_the_filter() -> None:
    image = RNG.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    assert resize_to_patch_multiple(image, 16) is not None
    np.testing.assert_array_equal(resize_to_patch_multiple(image, 16), image)
    odd = image[:30, :40]
    for name, filt in (("bicubic", Image.Resampling.BICUBIC), ("nearest", Image.Resampling.NEAREST)):
        expected = np.asarray(Image.fromarray(odd).resize((48, 32), filt))
        np.testing.assert_array_equal(resize_to_patch_multiple(odd, 16, name), expected)
    with pytest.raises(InvalidInputError, match=r"resample='lanczos' is not valid; choose one of \['bicubic'"):
        resize_to_patch_multiple(odd, 16, "lanczos")
    with pytest.raises(InvalidInputError, match=r"0x40 pixels is empty"):
        resize_to_patch_multiple(image[:0, :40], 16)


@pytest.mark.parametrize(("norm", "mean", "std"), [("clip", CLIP_MEAN, CLIP_STD), ("imagenet", IMAGENET_MEAN,
                                                                                     IMAGENET_STD)])
def test_normalize(norm: str, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    assert pixel_statistics(norm) == (mean, std)
    out = normalize(RGB, norm)
    assert out.shape == (3, 5, 7) and out.dtype == torch.float32
    expected = (RGB.astype(np.float64) / 255.0 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), expected, atol=1e-5)
    source = RGB.copy()
    normalize(source, norm)
    np.testing.assert_array_equal(source, RGB)  # input untouched
    with pytest.raises(InvalidInputError, match=r"pixel normalisation 'none' is not valid; choose 'clip' or"):
        normalize(RGB, "none")


def test_preprocess_query_is_resize_then_clip_normalisation() -> None:
    image = Image.fromarray(RNG.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    out = preprocess_query(image.convert("P"), patch_size=16)
    assert out.shape == (3, 64, 80)
    expected = normalize(resize_to_patch_multiple(np.asarray(image.convert("P").convert("RGB")), 16), "clip")
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    with pytest.raises(InvalidInputError, match=r"10x70 pixels is smaller than one 16x16 patch"):
        preprocess_query(np.zeros((10, 70, 3), np.uint8), 16)


def test_check_finite_names_the_tensor() -> None:
    check_finite("ok", [torch.zeros(2), torch.arange(3)])  # integers are never non-finite
    with pytest.raises(InvalidInputError, match=r"supports contains NaN or Inf"):
        check_finite("supports", [torch.zeros(2), torch.tensor([1.0, float("-inf")])])
    with pytest.raises(InvalidInputError, match=r"query contains NaN"):
        check_finite("query", torch.tensor([float("nan")], dtype=torch.bfloat16))


@pytest.mark.parametrize("layout", ["chw", "hwc"])
def test_to_rgb_array_takes_tensors_in_either_layout(layout: str) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    tensor = torch.from_numpy(rgb.astype(np.float32) / 255)
    if layout == "chw":
        tensor = tensor.permute(2, 0, 1)
    np.testing.assert_array_equal(to_rgb_array(tensor), rgb)
    gray = torch.full((1, 4, 6), 0.5)
    assert to_rgb_array(gray).shape == (4, 6, 3) and int(to_rgb_array(gray)[0, 0, 0]) == 128
