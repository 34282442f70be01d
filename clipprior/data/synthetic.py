"""Tiny synthetic benchmarks written in the real on-disk layouts, for tests and demos.

Each image is a few vertical stripes, one per class, under a background band, with 2-pixel
ignore (255) lines between stripes; every class covers at least 2048 pixels so that it counts
under the PFENet / BAM rule. Images are noisy colour fields (JPEG), masks single-channel PNGs.

Example:
    >>> import tempfile
    >>> from clipprior.data.synthetic import write_synthetic_pascal
    >>> from clipprior.data import open_dataset
    >>> root = write_synthetic_pascal(tempfile.mkdtemp())
    >>> ds = open_dataset("pascal5i", root, fold=0)
    >>> ds.classes, len(ds.items) > 0
    ([1, 2, 3, 4, 5], True)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from clipprior.data.lists import MIN_PIXELS
from clipprior.data.specs import get_dataset
from clipprior.errors import InvalidInputError

__all__ = ["stripe_mask", "write_synthetic", "write_synthetic_coco", "write_synthetic_pascal"]

_BAND = 16  # background rows at the top of every mask


def stripe_mask(classes: Sequence[int], size: tuple[int, int]) -> np.ndarray:
    """The synthetic mask of an image showing ``classes``: (H, W) uint8.

    Raises:
        InvalidInputError: A stripe would cover fewer than 2048 pixels.
    """
    height, width = size
    mask = np.zeros((height, width), np.uint8)
    if not classes:
        return mask
    bounds = np.linspace(0, width, len(classes) + 1).astype(int)
    for c, x0, x1 in zip(classes, bounds[:-1], bounds[1:], strict=True):
        mask[_BAND:, x0:x1] = c
        mask[_BAND:, max(x1 - 2, x0):x1] = 255
    for c in classes:
        if int((mask == c).sum()) < MIN_PIXELS:
            raise InvalidInputError(f"image size {size} is too small for {len(classes)} classes of at least "
                                    f"{MIN_PIXELS} pixels each")
    return mask


def _image(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    palette = (np.arange(256)[:, None] * np.array([53, 97, 151])[None, :]) % 256
    base = palette[mask].astype(np.int16)
    noise = rng.integers(-20, 21, size=base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def write_synthetic(root: str | os.PathLike[str], dataset: str, images: Mapping[str, Mapping[str, Sequence[int]]],
                    size: tuple[int, int] = (96, 128), seed: int = 0) -> Path:
    """Write images and masks in a benchmark's layout.

    Args:
        root: Data root to create (``VOC2012``-like or ``MSCOCO2014``-like).
        dataset: A registered benchmark (``"pascal5i"``, ``"coco20i"``, ...).
        images: ``{split: {stem: classes}}``; e.g. ``{"val": {"2007_000033": [1, 15]}}``.
        size: (H, W) of every image.
        seed: Seed of the image noise.

    Returns:
        ``root`` as a Path. Splits with a stem list in the layout (PASCAL's
        ``ImageSets/Segmentation/{val,train}.txt``) get it written.
    """
    spec = get_dataset(dataset)
    layout = spec.layout
    root = Path(root)
    rng = np.random.default_rng(seed)
    n = spec.num_classes
    for split, entries in images.items():
        for stem, classes in entries.items():
            if any(not 1 <= c <= n for c in classes):
                raise InvalidInputError(f"classes {list(classes)} of {stem} are outside 1..{n}")
            mask = stripe_mask(list(classes), size)
            image_path = root / layout.image_id(split, stem)
            label_path = root / layout.label_id(split, stem)
            image_path.parent.mkdir(parents=True, exist_ok=True)
            label_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_image(mask, rng)).save(image_path, quality=90)
            Image.fromarray(mask).save(label_path)
        if split in layout.stem_lists:
            stem_list = root.joinpath(*layout.stem_lists[split])
            stem_list.parent.mkdir(parents=True, exist_ok=True)
            stem_list.write_text("".join(f"{s}\n" for s in entries), encoding="utf-8")
    for split in layout.image_dirs:  # the layout's folders exist even for a split without images
        (root.joinpath(*layout.image_dirs[split])).mkdir(parents=True, exist_ok=True)
        (root.joinpath(*layout.label_dirs[split])).mkdir(parents=True, exist_ok=True)
    return root


def _spec(n_classes: int, per_class: int, prefix: str, mix: int) -> dict[str, list[int]]:
    """Per class ``per_class`` images; the second image of each class also shows class ``c + mix``."""
    spec: dict[str, list[int]] = {}
    for c in range(1, n_classes + 1):
        for r in range(per_class):
            other = (c - 1 + mix) % n_classes + 1
            spec[f"{prefix}_{c:03d}_{r}"] = [c, other] if r == 1 else [c]
    return spec


def write_synthetic_pascal(root: str | os.PathLike[str], per_class: int = 3, size: tuple[int, int] = (96, 128),
                           seed: int = 0) -> Path:
    """A synthetic PASCAL-5i: ``per_class`` val and train images per class (the second also shows class c+9).

    Returns:
        The ``VOC2012``-like root.
    """
    images = {"val": _spec(20, per_class, "2007", 9), "train": _spec(20, per_class, "2008", 9)}
    return write_synthetic(root, "pascal5i", images, size=size, seed=seed)


def write_synthetic_coco(root: str | os.PathLike[str], per_class: int = 2, size: tuple[int, int] = (64, 96),
                         seed: int = 0) -> Path:
    """A synthetic COCO-20i: ``per_class`` val and train images per class (the second also shows class c+41).

    Returns:
        The ``MSCOCO2014``-like root.
    """
    val = {f"COCO_val2014_{k}": v for k, v in _spec(80, per_class, "000000", 41).items()}
    train = {f"COCO_train2014_{k}": v for k, v in _spec(80, per_class, "000001", 41).items()}
    return write_synthetic(root, "coco20i", {"val": val, "train": train}, size=size, seed=seed)
