"""The few real photos bundled with clipprior (public domain / CC0), with hand-drawn object masks.

They feed ``clipprior demo`` and make quick experiments possible without any dataset. Sources and
licences are in ``clipprior/assets/photos/SOURCES.md`` and on every :class:`Photo`.

Example:
    >>> from clipprior.photos import list_photos, load_photo
    >>> list_photos()
    ['astronaut', 'cameraman', 'chelsea', 'coffee']
    >>> cat = load_photo("chelsea")
    >>> cat.class_name, cat.image.shape, cat.mask.dtype
    ('cat', (279, 420, 3), dtype('bool'))
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np
from PIL import Image

from clipprior.errors import InvalidInputError

__all__ = ["Photo", "flip_crop", "list_photos", "load_photo"]

_PACKAGE_DIR = "assets/photos"


@dataclass(frozen=True)
class Photo:
    """A bundled photo and its object mask.

    Attributes:
        name: Short name (``"chelsea"``).
        class_name: The object class the mask outlines (``"cat"``).
        image: (H, W, 3) uint8 RGB pixels.
        mask: (H, W) bool object mask (hand-drawn, approximate).
        title: Human-readable description with the author.
        source: Where the original comes from.
        license: Its licence.
    """

    name: str
    class_name: str
    image: np.ndarray
    mask: np.ndarray
    title: str
    source: str
    license: str


@lru_cache(maxsize=1)
def _index() -> dict[str, dict[str, Any]]:
    text = resources.files("clipprior").joinpath(_PACKAGE_DIR, "photos.json").read_text(encoding="utf-8")
    return {entry["name"]: entry for entry in json.loads(text)}


def list_photos() -> list[str]:
    """Names of the bundled photos, sorted."""
    return sorted(_index())


def load_photo(name: str) -> Photo:
    """Load a bundled photo with its mask.

    Args:
        name: One of :func:`list_photos`.

    Returns:
        The :class:`Photo` (fresh arrays; modifying them changes nothing on disk).

    Raises:
        InvalidInputError: for an unknown name.

    Example:
        >>> load_photo("astronaut").class_name
        'person'
    """
    try:
        entry = _index()[name]
    except KeyError:
        raise InvalidInputError(f"no bundled photo {name!r}; choose one of {list_photos()}") from None
    folder = resources.files("clipprior").joinpath(_PACKAGE_DIR)
    with folder.joinpath(entry["image"]).open("rb") as f:
        image = np.asarray(Image.open(f).convert("RGB"))
    with folder.joinpath(entry["mask"]).open("rb") as f:
        mask = np.asarray(Image.open(f).convert("L")) > 0
    return Photo(
        name=name,
        class_name=entry["class_name"],
        image=image.copy(),
        mask=mask.copy(),
        title=entry["title"],
        source=entry["source"],
        license=entry["license"],
    )


def flip_crop(
    photo: Photo, box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0), *, mirror: bool = True
) -> Photo:
    """A second view of a photo: mirrored left-right and cropped, mask transformed alike.

    The demo uses it as the support image when only one photo of a class is bundled.

    Args:
        photo: The photo.
        box: Crop ``(left, top, right, bottom)`` as fractions of width and height (after mirroring).
        mirror: Mirror left-right first.

    Returns:
        A new :class:`Photo` named ``"<name> (mirrored, cropped)"``.

    Raises:
        InvalidInputError: if the box is empty or outside [0, 1].

    Example:
        >>> flip_crop(load_photo("coffee"), (0.1, 0.0, 0.9, 1.0)).image.shape
        (280, 336, 3)
    """
    left, top, right, bottom = box
    if not (0.0 <= left < right <= 1.0 and 0.0 <= top < bottom <= 1.0):
        raise InvalidInputError(f"crop box {box} must satisfy 0 <= left < right <= 1 and 0 <= top < bottom <= 1")
    image, mask = photo.image, photo.mask
    if mirror:
        image, mask = image[:, ::-1], mask[:, ::-1]
    h, w = mask.shape
    rows = slice(round(top * h), round(bottom * h))
    cols = slice(round(left * w), round(right * w))
    what = "mirrored, cropped" if mirror else "cropped"
    return Photo(
        name=f"{photo.name} ({what})",
        class_name=photo.class_name,
        image=np.ascontiguousarray(image[rows, cols]),
        mask=np.ascontiguousarray(mask[rows, cols]),
        title=f"{photo.title} ({what})",
        source=photo.source,
        license=photo.license,
    )
