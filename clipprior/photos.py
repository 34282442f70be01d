"""The few real photos bundled with clipprior (public domain / CC0), with hand-drawn object masks.

They feed ``clipprior demo`` (:func:`demo_panel`, over :data:`DEMO_EPISODES`) and make quick
experiments possible without any dataset. Sources and
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from clipprior.data.images import pil_to_rgb
from clipprior.errors import InvalidInputError

if TYPE_CHECKING:
    from clipprior.config import PriorConfig

__all__ = ["DEMO_EPISODES", "DemoEpisode", "Photo", "demo_panel", "flip_crop", "list_photos", "load_photo"]

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
        image = pil_to_rgb(Image.open(f), name=f"bundled photo {entry['image']}")
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


# ------------------------------------------------------------------------------------------ the demo


@dataclass(frozen=True)
class DemoEpisode:
    """One row of the demo: a query photo and its support.

    Attributes:
        query: Name of the bundled query photo.
        support: Name of another bundled photo of the same class, or ``None`` to use the query
            itself mirrored and cropped to ``crop`` (said so in the panel's caption).
        crop: Crop box (fractions) of the mirrored query when ``support`` is ``None``.
    """

    query: str
    support: str | None = None
    crop: tuple[float, float, float, float] = (0.1, 0.05, 0.9, 1.0)

    def load(self) -> tuple[Photo, Photo]:
        """The query photo and the support photo (both with masks)."""
        query = load_photo(self.query)
        support = load_photo(self.support) if self.support else flip_crop(query, self.crop)
        return query, support


#: The demo's rows: a person with a different person as support; a cat and a cup whose supports are
#: the query mirrored and cropped (only one photo of each is bundled).
DEMO_EPISODES: tuple[DemoEpisode, ...] = (
    DemoEpisode("astronaut", "cameraman"),
    DemoEpisode("chelsea", None, (0.12, 0.0, 0.92, 1.0)),
    DemoEpisode("coffee", None, (0.08, 0.05, 0.92, 1.0)),
)


def demo_panel(
    bundle: Any,
    episodes: Sequence[DemoEpisode] = DEMO_EPISODES,
    *,
    config: PriorConfig | None = None,
    cmap: str = "jet",
    tile_height: int = 224,
    threshold: float = 0.5,
    on_episode: Callable[[int], None] | None = None,
) -> tuple[Image.Image, list[dict[str, Any]]]:
    """Compute VTP raw, VTP refined (PIR) and VVP for each demo episode and draw them in one panel.

    Args:
        bundle: A loaded CLIP (:class:`clipprior.model.ClipBundle`).
        episodes: The rows to draw.
        config: Prior knobs (default: :class:`~clipprior.config.PriorConfig`).
        cmap: Heat-map colormap.
        tile_height: Picture height in pixels.
        threshold: Threshold of the IoUs against the hand-drawn query masks.
        on_episode: Called with the row number after each row is computed (progress).

    Returns:
        The panel and, per row, a dict with the class, the photos and the IoU of each prior.

    Example:
        >>> from clipprior.model import load_clip
        >>> panel, rows = demo_panel(load_clip("openai/clip-vit-base-patch16"))  # doctest: +SKIP
        >>> panel.save("demo.png")  # doctest: +SKIP
    """
    from clipprior.cache import PANEL_ORDER, VTP_CAM, VTP_REFINED, VVP_MAPS  # loaded only when it runs
    from clipprior.evaluate import binary_iou, vvp_map
    from clipprior.priors import compute_priors
    from clipprior.viz import compose_panel, episode_row, resize_map

    rows: list[list[Any]] = []
    results: list[dict[str, Any]] = []
    notes: list[str] = []
    for i, episode in enumerate(episodes):
        query, support = episode.load()
        # The photo's mask labels its one class: with text_classes="present" nothing else joins the softmax.
        priors = compute_priors(
            bundle, query.image, query.class_name, [support.image], [support.mask.astype(np.uint8)], config=config,
            query_label=query.mask.astype(np.uint8), class_names=[query.class_name],
        )
        computed = {
            VVP_MAPS: None if priors.vvp is None else vvp_map(priors.vvp),
            VTP_CAM: priors.cam.float().cpu().numpy(),
            VTP_REFINED: priors.refined.float().cpu().numpy(),
        }
        maps = {kind.label: computed[kind] for kind in PANEL_ORDER}  # titled and ordered as `show` draws them
        rows.append(
            episode_row(
                query.image, maps, query_mask=query.mask, supports=[support.image], support_masks=[support.mask],
                class_name=query.class_name, cmap=cmap, threshold=threshold,
            )
        )
        ious = {
            name: binary_iou(resize_map(m, query.mask.shape), query.mask, threshold)
            for name, m in maps.items()
            if m is not None
        }
        results.append({"class": query.class_name, "query": query.name, "support": support.name, "iou": ious})
        if episode.support is None:
            notes.append(f"Row {i + 1}: the support is the query mirrored and cropped (one {query.class_name} photo "
                         "is bundled)")
        if on_episode is not None:
            on_episode(i)
    photos = sorted({e.query for e in episodes} | {e.support for e in episodes if e.support})
    credits = "; ".join(f"{p.title}, {p.license.split(' (')[0]}" for p in map(load_photo, photos))
    caption = (
        f"Model: {getattr(bundle, 'source', '?')}. VVP: mean of its layer x shot maps, min-max normalised. "
        f"IoU at {threshold:g} against hand-drawn, approximate masks. {'. '.join(notes)}.\n"
        f"Photos (scikit-image sample data, see clipprior/assets/photos/SOURCES.md): {credits}."
    )
    panel = compose_panel(
        rows,
        title="clipprior demo: query, support, VVP, VTP and PIR-refined VTP",
        row_labels=[r["class"] for r in results],
        caption=caption,
        tile_height=tile_height,
        cmap=cmap,
    )
    return panel, results
