"""A synthetic PASCAL-5i fold with the real structure: the official lists, VOC-like images and masks.

The fold's list files (``data_list_{fold}.txt``, ``sub_class_file_list_{fold}.txt``) are read with
:func:`clipprior.data.read_fss_lists`; every image they name is written as a JPEG of a VOC-like size
(both orientations) and a PNG mask whose fold classes are exactly the listed ones, each an
elliptical blob of at least 2048 pixels inside a 255 (ignore) outline, as VOC draws object
boundaries. A third of the images also show one class from outside the fold. Pixels are a smooth
random colour field with a tint per object, so that JPEG decoding and resizing cost what they cost
on photographs of that size.

Everything is seeded: the same lists and seed give the same files on any machine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from clipprior.data import MIN_PIXELS, num_classes, read_fss_lists
from clipprior.data.specs import get_dataset

__all__ = ["COCO_SIZES", "VOC_SIZES", "coco_size", "write_synthetic_fold", "write_synthetic_images"]

VOC_SIZES: tuple[tuple[tuple[int, int], float], ...] = (
    ((375, 500), 0.45),
    ((333, 500), 0.20),
    ((500, 375), 0.25),
    ((500, 333), 0.10),
)
"""(H, W) of the synthetic images and their frequencies: VOC's common sizes, both orientations."""

_OUTLINE = 3  # width in pixels of the 255 outline around each object


def _rng(seed: int, stem: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{stem}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _pick_size(rng: np.random.Generator) -> tuple[int, int]:
    weights = np.array([w for _, w in VOC_SIZES])
    return VOC_SIZES[int(rng.choice(len(VOC_SIZES), p=weights / weights.sum()))][0]


def _ellipse(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random filled ellipse covering 3% to 25% of the image (more on small images): (H, W) bool."""
    height, width = size
    low = max(0.03, 1.3 * MIN_PIXELS / (height * width))
    area = rng.uniform(low, max(0.25, low + 0.1)) * height * width
    aspect = rng.uniform(0.5, 2.0)
    ry = min(np.sqrt(area / np.pi / aspect), height / 2 - 2)
    rx = min(area / np.pi / ry, width / 2 - 2)
    cy = rng.uniform(ry + 1, height - ry - 1)
    cx = rng.uniform(rx + 1, width - rx - 1)
    yy, xx = np.ogrid[:height, :width]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _mask(classes: list[int], size: tuple[int, int], rng: np.random.Generator, tries: int = 50) -> np.ndarray:
    """A VOC-like mask showing ``classes`` (each >= MIN_PIXELS after overlaps), 255 outlines: (H, W) uint8."""
    for _ in range(tries):
        mask = np.zeros(size, np.uint8)
        outline = np.zeros(size, bool)
        for c in classes:
            blob = _ellipse(size, rng)
            ring = ndimage.binary_dilation(blob, iterations=_OUTLINE) & ~blob
            mask[blob] = c
            outline |= ring
            outline[blob] = False
        mask[outline & (mask == 0)] = 255
        counts = np.bincount(mask.ravel(), minlength=256)
        if all(counts[c] >= MIN_PIXELS for c in classes):
            return mask
    raise RuntimeError(f"could not place classes {classes} on a {size} image in {tries} tries")


def _pixels(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A smooth random colour field with a tint per label: (H, W) -> (H, W, 3) uint8."""
    height, width = mask.shape
    coarse = rng.uniform(40, 215, size=(max(2, height // 48), max(2, width // 48), 3)).astype(np.float32)
    field = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC),
                       dtype=np.float32)
    tints = rng.uniform(-60, 60, size=(256, 3)).astype(np.float32)
    tints[0] = 0.0
    field += tints[mask]
    field += rng.normal(0, 6, size=field.shape).astype(np.float32)
    return np.clip(field, 0, 255).astype(np.uint8)


def write_synthetic_fold(root: str | Path, list_root: str | Path, fold: int = 0, split: str = "val",
                         seed: int = 0, scale: float = 1.0) -> dict[str, int]:
    """Write synthetic images and masks for every pair a PASCAL-5i fold's lists name.

    Args:
        root: The ``VOC2012``-like data root to fill (``JPEGImages/``, ``SegmentationClassAug/``).
        list_root: The trainers' list folder (``lists/pascal``).
        fold: 0..3.
        split: ``"val"`` or ``"train"``.
        seed: Seed of sizes, shapes and pixels.
        scale: Factor on the VOC sizes (``--quick`` writes small images; 1.0 for measurements).

    Returns:
        Counts: ``images`` written and how many are ``portrait`` (taller than wide).

    Example:
        >>> write_synthetic_fold("/tmp/voc", "../shared/lists/pascal")  # doctest: +SKIP
        {'images': 364, 'portrait': 128}
    """
    root = Path(root)
    lists = read_fss_lists(list_root, "pascal5i", fold, split)
    listed: dict[tuple[str, str], list[int]] = {pair: [] for pair in lists.items}
    for c, pairs in (lists.class_index or {}).items():
        for pair in pairs:
            listed.setdefault(pair, []).append(c)
    others = [c for c in range(1, num_classes("pascal5i") + 1) if c not in lists.classes]
    layout = get_dataset("pascal5i").layout
    for dirs in (layout.image_dirs[split], layout.label_dirs[split]):
        root.joinpath(*dirs).mkdir(parents=True, exist_ok=True)
    portrait = 0
    for (image_id, label_id), classes in listed.items():
        rng = _rng(seed, image_id)
        height, width = _pick_size(rng)
        size = (round(height * scale), round(width * scale))
        portrait += size[0] > size[1]
        extra = [int(rng.choice(others))] if rng.uniform() < 1 / 3 else []
        mask = _mask(sorted(classes) + extra, size, rng)
        Image.fromarray(_pixels(mask, rng)).save(root / image_id, quality=90)
        Image.fromarray(mask).save(root / label_id)
    return {"images": len(listed), "portrait": portrait}


COCO_SIZES: tuple[tuple[tuple[int, int], float], ...] = (
    ((480, 640), 0.40),
    ((640, 480), 0.12),
    ((427, 640), 0.10),
    ((640, 427), 0.05),
    ((426, 640), 0.04),
    ((424, 640), 0.03),
    ((640, 640), 0.02),
    ((360, 640), 0.02),
    ((612, 612), 0.01),
)
"""(H, W) of COCO's most frequent image sizes and their approximate shares of train2014/val2014.

The remaining ~21% (:data:`COCO_OTHER_SHARE`) are drawn as COCO's long tail: a long side of 640
(most) or 500, the short side uniform in 240..640, landscape three times out of four.
"""

COCO_OTHER_SHARE = 0.21


def coco_size(rng: np.random.Generator) -> tuple[int, int]:
    """One image size drawn from COCO's mix of sizes (:data:`COCO_SIZES` and the long tail)."""
    if rng.uniform() < COCO_OTHER_SHARE:
        long = 640 if rng.uniform() < 0.85 else 500
        short = int(rng.integers(240, long + 1))
        return (short, long) if rng.uniform() < 0.75 else (long, short)
    weights = np.array([w for _, w in COCO_SIZES])
    return COCO_SIZES[int(rng.choice(len(COCO_SIZES), p=weights / weights.sum()))][0]


def write_synthetic_images(root: str | Path, pairs: dict[tuple[str, str], list[int]], others: list[int],
                           size_of: Callable[[np.random.Generator], tuple[int, int]], seed: int = 0,
                           scale: float = 1.0) -> dict[str, int]:
    """Write a synthetic JPEG and PNG mask for each (image, label) pair showing its listed classes.

    Returns:
        Counts: ``images`` written, how many are ``portrait``, and ``sizes`` (distinct sizes).
    """
    root = Path(root)
    portrait, sizes = 0, set()
    for (image_id, label_id), classes in pairs.items():
        rng = _rng(seed, image_id)
        height, width = size_of(rng)
        size = (round(height * scale), round(width * scale))
        portrait += size[0] > size[1]
        sizes.add(size)
        extra = [int(rng.choice(others))] if others and rng.uniform() < 1 / 3 else []
        mask = _mask(sorted(classes) + extra, size, rng)
        (root / image_id).parent.mkdir(parents=True, exist_ok=True)
        (root / label_id).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_pixels(mask, rng)).save(root / image_id, quality=90)
        Image.fromarray(mask).save(root / label_id)
    return {"images": len(pairs), "portrait": portrait, "sizes": len(sizes)}
