"""load_rgb / load_label: every image mode to RGB, masks as indices, broken files named in the error."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from clipprior.data import load_label, load_pair, load_rgb
from clipprior.errors import DataNotFoundError, DatasetError

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)


def _save(tmp_path, name, image, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def test_rgb_png_roundtrip(tmp_path):
    path = _save(tmp_path, "a.png", Image.fromarray(RGB))
    out = load_rgb(path)
    assert out.dtype == np.uint8 and out.shape == (12, 10, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, RGB)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "1", "I;16", "I"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    source = Image.fromarray(RGB)
    if mode == "P":
        image = source.quantize(colors=16)
    elif mode == "I;16":
        image = Image.fromarray((RGB[:, :, 0].astype(np.uint16) << 8) | 0x7F)
    elif mode == "I":
        image = Image.fromarray(RGB[:, :, 0].astype(np.int32))
    else:
        image = source.convert(mode)
    suffix = ".jpg" if mode == "CMYK" else (".tif" if mode == "I" else ".png")
    path = _save(tmp_path, f"img{suffix}", image)
    out = load_rgb(path)
    assert out.shape == (12, 10, 3) and out.dtype == np.uint8
    if mode in ("L", "I;16", "I"):
        expected = RGB[:, :, 0] if mode != "L" else np.asarray(source.convert("L"))
        for ch in range(3):
            np.testing.assert_array_equal(out[:, :, ch], expected)
    if mode == "P":
        np.testing.assert_array_equal(out, np.asarray(image.convert("RGB")))
    if mode == "RGBA":
        np.testing.assert_array_equal(out, RGB)
    if mode == "CMYK":  # JPEG-compressed, but the colours survive
        assert np.abs(out.astype(int) - RGB.astype(int)).mean() < 40


def test_palette_with_transparency(tmp_path):
    image = Image.fromarray(RGB).quantize(colors=8)
    image.info["transparency"] = 0
    path = _save(tmp_path, "t.png", image, transparency=0)
    assert load_rgb(path).shape == (12, 10, 3)


def test_missing_image_names_file(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"nope\.jpg"):
        load_rgb(tmp_path / "nope.jpg")


@pytest.mark.parametrize("kind", ["garbage", "truncated_jpeg", "truncated_png", "empty"])
def test_corrupt_images_raise_dataset_error_naming_file(tmp_path, kind):
    if kind == "garbage":
        path = tmp_path / "bad.jpg"
        path.write_bytes(b"this is not an image at all" * 10)
    elif kind == "empty":
        path = tmp_path / "empty.png"
        path.write_bytes(b"")
    else:
        fmt = "JPEG" if kind == "truncated_jpeg" else "PNG"
        path = tmp_path / f"cut.{fmt.lower()}"
        big = RNG.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        Image.fromarray(big).save(path, format=fmt)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=re.escape(path.name)) as info:
        load_rgb(path)
    assert not isinstance(info.value, DataNotFoundError)


@pytest.mark.parametrize("mode", ["L", "P"])
def test_label_indices_kept(tmp_path, mode):
    mask = RNG.integers(0, 21, size=(9, 7), dtype=np.uint8)
    mask[0, 0] = 255
    image = Image.fromarray(mask)
    if mode == "P":
        image = image.convert("P")
        image.putpalette([v for i in range(256) for v in (i * 7 % 256, i * 13 % 256, i * 29 % 256)])
    path = _save(tmp_path, "m.png", image)
    np.testing.assert_array_equal(load_label(path), mask)


def test_label_gray_rgb_accepted_colour_rejected(tmp_path):
    mask = RNG.integers(0, 21, size=(9, 7), dtype=np.uint8)
    gray3 = _save(tmp_path, "g.png", Image.fromarray(np.repeat(mask[:, :, None], 3, axis=2)))
    np.testing.assert_array_equal(load_label(gray3), mask)
    colour = _save(tmp_path, "c.png", Image.fromarray(RGB))
    with pytest.raises(DatasetError, match="colour image"):
        load_label(colour)


def test_label_16bit_out_of_range(tmp_path):
    path = _save(tmp_path, "w.png", Image.fromarray(np.full((4, 4), 300, np.uint16)))
    with pytest.raises(DatasetError, match=r"outside 0\.\.255"):
        load_label(path)
    ok = _save(tmp_path, "ok.png", Image.fromarray(np.full((4, 4), 7, np.uint16)))
    assert load_label(ok).dtype == np.uint8 and int(load_label(ok)[0, 0]) == 7


def test_load_pair_size_mismatch(tmp_path):
    image = _save(tmp_path, "i.png", Image.fromarray(RGB))
    label = _save(tmp_path, "l.png", Image.fromarray(np.zeros((12, 11), np.uint8)))
    with pytest.raises(DatasetError, match=r"l\.png is 12x11 \(HxW\) but image \S*i\.png is 12x10"):
        load_pair(image, label)
    good = _save(tmp_path, "g.png", Image.fromarray(np.zeros((12, 10), np.uint8)))
    img, lbl = load_pair(image, good)
    assert img.shape == (12, 10, 3) and lbl.shape == (12, 10)


# One converter: files (load_rgb) and images in memory (to_rgb_array) convert PIL modes alike.

#: Every PIL mode a file can hold, and a format that stores it.
FILE_MODES = {"1": "png", "L": "png", "P": "png", "RGB": "png", "RGBA": "png", "LA": "png", "CMYK": "tiff",
              "YCbCr": "tiff", "LAB": "tiff", "I": "tiff", "F": "tiff", "I;16": "png", "I;16B": "tiff",
              "RGBX": "tiff"}
#: And the modes only images in memory have.
MEMORY_MODES = ("PA", "RGBa", "La", "HSV", "I;16L", "I;16N")


def _mode_image(mode):
    source = Image.fromarray(RGB)
    if mode == "I":  # values beyond 8 bits, where the rules part
        return Image.fromarray(RGB[:, :, 0].astype(np.int32) * 3, mode)
    if mode == "F":  # beyond 8 bits and below 0: clipped either way
        return Image.fromarray(RGB[:, :, 0].astype(np.float32) * 3.3 - 100, mode)
    if mode.startswith("I;16"):
        order = ">" if mode == "I;16B" else "=" if mode == "I;16N" else "<"
        return Image.frombytes(mode, (10, 12), (RGB[:, :, 0].astype(np.uint16) * 200).astype(f"{order}u2").tobytes())
    if mode == "PA":
        return source.quantize(colors=16).convert("PA")
    if mode == "La":
        return Image.new("La", (10, 12))
    return source.convert(mode)


@pytest.mark.parametrize("mode", sorted(FILE_MODES))
def test_files_and_images_in_memory_convert_every_mode_alike(tmp_path, mode):
    from clipprior.data import pil_to_rgb
    from clipprior.preprocess import to_rgb_array

    path = tmp_path / f"img.{FILE_MODES[mode]}"
    _mode_image(mode).save(path)
    with Image.open(path) as image:
        image.load()
        in_memory = to_rgb_array(image)
        opened = image.mode
    from_file = load_rgb(path)
    assert from_file.shape == in_memory.shape == (12, 10, 3) and from_file.dtype == in_memory.dtype == np.uint8
    values = np.asarray(Image.open(path), dtype=np.float64)
    if opened.startswith("I;16") or (opened == "I" and values.max() > 255):
        # The one documented difference (pil_to_rgb's depth): deeper than 8 bits, a file keeps its
        # high byte (16-bit, as OpenCV) or is clipped (I); an image in memory is scaled to its peak.
        shifted = np.clip(values, 0, 255) if opened == "I" else values.astype(np.uint16) >> 8
        np.testing.assert_array_equal(from_file[..., 0], shifted.astype(np.uint8))
        np.testing.assert_array_equal(in_memory[..., 0], np.round(values * (255.0 / values.max())).astype(np.uint8))
        with Image.open(path) as image:
            np.testing.assert_array_equal(pil_to_rgb(image, depth="peak"), in_memory)
    else:
        np.testing.assert_array_equal(from_file, in_memory)


@pytest.mark.parametrize("mode", sorted(FILE_MODES) + list(MEMORY_MODES))
def test_both_depth_rules_agree_on_every_mode_within_eight_bits(mode):
    from clipprior.data import pil_to_rgb
    from clipprior.errors import InvalidInputError
    from clipprior.preprocess import to_rgb_array

    image = _mode_image(mode)
    if mode == "La":  # a mode PIL cannot convert: both entry points say so
        for convert in (pil_to_rgb, to_rgb_array):
            with pytest.raises(InvalidInputError, match="'La', which cannot be converted to RGB"):
                convert(image)
        return
    if mode.startswith("I;16") or mode == "I":
        return  # deeper than 8 bits: the documented difference, tested above
    np.testing.assert_array_equal(pil_to_rgb(image), to_rgb_array(image))
    np.testing.assert_array_equal(pil_to_rgb(image), pil_to_rgb(image, depth="peak"))


def test_converter_names_the_image_and_the_mode(tmp_path):
    from clipprior.data import pil_to_rgb
    from clipprior.errors import InvalidInputError
    from clipprior.preprocess import to_rgb_array

    odd = Image.new("La", (3, 2))
    with pytest.raises(InvalidInputError, match=r"image has mode 'La', which cannot be converted to RGB"):
        to_rgb_array(odd)
    with pytest.raises(InvalidInputError, match=r"depth='cv2' is not valid"):
        pil_to_rgb(odd, depth="cv2")
    sixteen = Image.fromarray(np.full((2, 3), 1000, np.uint16))
    assert int(pil_to_rgb(sixteen)[0, 0, 0]) == 3 and int(to_rgb_array(sixteen)[0, 0, 0]) == 255
