"""Cached episodes with their ground truth, at the label's size (what ``show`` and ``evaluate`` read).

A cache's facts (dataset, fold, model, data root), and per episode the priors next to the query's
label and pictures.

Example:
    >>> from clipprior.cache import PriorCache  # doctest: +SKIP
    >>> cache = PriorCache("priors.h5")  # doctest: +SKIP
    >>> facts = cache_facts(cache)  # doctest: +SKIP
    >>> data = load_episode(cache, cache.episodes[0], resolve_data_root(None, facts))  # doctest: +SKIP
    >>> data.priors["vtp_refined"].shape == data.label.shape  # doctest: +SKIP
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipprior.cache import PRIORS, VTP_CAM, VTP_REFINED, VVP_MAPS, MapKind, PriorCache, Size, kinds_of
from clipprior.data import Episode, class_names, dataset_name, fold_classes, load_label, load_rgb
from clipprior.data.images import check_same_size, image_size
from clipprior.errors import ClipPriorError, DataNotFoundError, DatasetError, InvalidInputError
from clipprior.evaluate.metrics import vvp_map
from clipprior.viz import resize_map

__all__ = [
    "PRIOR_TITLES", "CacheFacts", "EpisodeData", "cache_facts", "cached_vtp", "load_episode", "resolve_data_root",
]

#: Display names of the priors, in table order (the labels declared in :data:`clipprior.cache.PRIORS`).
PRIOR_TITLES: dict[str, str] = {str(k.prior): k.label for k in PRIORS}


@dataclass(frozen=True)
class CacheFacts:
    """What a cache's provenance says about its episodes (``None`` where it says nothing).

    Attributes:
        path: The cache file.
        dataset: Canonical benchmark name (``"pascal5i"``, ``"coco20i"``) or ``None``.
        fold: Fold number.
        split: ``"val"`` or ``"train"``.
        model: The CLIP the priors came from.
        data_root: Data root recorded in the provenance, if any.
        coco_split: COCO fold layout.
    """

    path: Path
    dataset: str | None
    fold: int | None
    split: str | None
    model: str | None
    data_root: str | None
    coco_split: str

    def class_name(self, class_id: int) -> str:
        """Readable name of a class id (``"class 7"`` when the dataset is unknown)."""
        if self.dataset is not None:
            names = class_names(self.dataset)
            if 1 <= class_id <= len(names):
                return names[class_id - 1]
        return f"class {class_id}"

    def fold_classes(self) -> list[int] | None:
        """The fold's classes for the split, or ``None`` when the cache does not say."""
        if self.dataset is None or self.fold is None:
            return None
        return fold_classes(self.dataset, self.fold, self.split or "val", self.coco_split)

    def label(self) -> str:
        """Short description, e.g. ``"pascal5i fold 0 (val)"``."""
        if self.dataset is None:
            return self.path.name
        fold = f" fold {self.fold}" if self.fold is not None else ""
        return f"{self.dataset}{fold} ({self.split or 'val'})"


def cache_facts(cache: PriorCache) -> CacheFacts:
    """Read dataset, fold, split, model and data root from a cache's provenance.

    Raises:
        InvalidInputError: if the provenance names a dataset clipprior does not know.
    """
    prov: dict[str, Any] = cache.provenance
    dataset = prov.get("dataset")
    fold = prov.get("fold")
    return CacheFacts(
        path=cache.path,
        dataset=dataset_name(dataset) if dataset else None,
        fold=int(fold) if fold is not None else None,
        split=prov.get("split"),
        model=prov.get("model"),
        data_root=prov.get("data_root"),
        coco_split=prov.get("coco_split", "interleaved"),
    )


def resolve_data_root(option: Path | None, facts: CacheFacts) -> Path:
    """The data root: ``--data-root``, else the one the cache records.

    Raises:
        DataNotFoundError: if neither exists.
    """
    if option is not None:
        root = Path(option).expanduser()
    elif facts.data_root:
        root = Path(facts.data_root).expanduser()
    else:
        raise DataNotFoundError(
            f"{facts.path} does not record where its images are; pass --data-root (the VOC2012 / MSCOCO2014 "
            "folder the cache was computed from)"
        )
    if not root.is_dir():
        raise DataNotFoundError(f"data root {root} is not a directory; pass --data-root with the dataset folder")
    return root


@dataclass
class EpisodeData:
    """One cached episode with its pictures and ground truth, ready to draw or score.

    Attributes:
        record: The cache's episode record.
        query: (H, W, 3) query image, or ``None`` when not loaded.
        label: (H, W) query label map.
        supports: Support images.
        support_labels: Support label maps.
        priors: ``vtp_raw`` / ``vtp_refined`` / ``vvp`` -> (H, W) map at the label's size (``vvp``:
            ``None`` when not cached).
    """

    record: Episode
    query: np.ndarray | None
    label: np.ndarray
    supports: list[np.ndarray]
    support_labels: list[np.ndarray]
    priors: dict[str, np.ndarray | None]


def load_episode(cache: PriorCache, record: Episode, root: Path, *, images: bool = True) -> EpisodeData:
    """Ground truth (and pictures) from the data root, priors from the cache, all at the label's size.

    VTP maps come at the image's original size from :meth:`PriorCache.vtp`; VVP is reduced to one
    map with :func:`clipprior.evaluate.vvp_map` on its patch grid and then resized the same way.

    Args:
        cache: The cache.
        record: One of its episodes.
        root: The data root.
        images: Also load the query and support images (``show`` needs them, ``evaluate`` does not).

    Returns:
        The :class:`EpisodeData`.

    Raises:
        DataNotFoundError: if a file is missing under ``root``.
        DatasetError: if the query mask (or, with ``images``, a support mask) has another size than
            its image: the message names both files and sizes (an old cache may hold a query whose
            mask does not match its image; precompute refuses those now).
        InvalidInputError: if an image or the query mask has another size than the cache records
            for the query (wrong data root).
    """
    label_path = root / record.query_label
    label = load_label(label_path)
    cached = tuple(cache.image_size(record.query_image))
    if tuple(label.shape) != cached:
        _label_size_error(cache, record, root, tuple(label.shape), cached)
    priors = {str(kind.prior): _prior(cache, kind, record, label.shape) for kind in PRIORS}
    query: np.ndarray | None = None
    supports: list[np.ndarray] = []
    support_labels: list[np.ndarray] = []
    if images:
        query = load_rgb(root / record.query_image)
        if tuple(query.shape[:2]) != cached:
            raise _wrong_root(cache, record, root / record.query_image, tuple(query.shape[:2]), cached)
        supports = [load_rgb(root / key) for key in record.support_images]
        support_labels = [load_label(root / key) for key in record.support_labels]
        for image, mask, (image_key, label_key) in zip(supports, support_labels, record.supports, strict=True):
            check_same_size(image, mask, root / image_key, root / label_key)
    return EpisodeData(record, query, label, supports, support_labels, priors)


def _wrong_root(cache: PriorCache, record: Episode, path: Path, found: tuple[int, ...],
                cached: tuple[int, ...]) -> InvalidInputError:
    return InvalidInputError(
        f"{path} is {found[0]}x{found[1]} but {cache.path} recorded {cached[0]}x{cached[1]} for {record.query_image}; "
        "is --data-root the folder the cache was computed from?"
    )


def _label_size_error(cache: PriorCache, record: Episode, root: Path, label: tuple[int, ...],
                      cached: tuple[int, ...]) -> None:
    """Raise the error for a query mask whose size is not the one the cache recorded for its image.

    When the image under ``root`` has the recorded size, the data root is right and the mask does
    not match its image (a cache computed before precompute refused such queries); otherwise the
    files are not the ones the cache was computed from.
    """
    label_path, image_path = root / record.query_label, root / record.query_image
    try:
        image = image_size(image_path)
    except ClipPriorError:
        image = None
    if image == cached:
        raise DatasetError(
            f"query mask {label_path} of episode {record.index} is {label[0]}x{label[1]} (HxW) but its image "
            f"{image_path} is {image[0]}x{image[1]} (the size {cache.path} recorded for it): the mask does not "
            "match its image; replace it with the image's mask at the image's size (re-export it from the "
            "annotations) and rerun (the cached priors do not depend on the query mask)"
        )
    raise _wrong_root(cache, record, label_path, label, cached)


def cached_vtp(cache: PriorCache, kind: MapKind, image: str, class_id: int, size: Size) -> torch.Tensor:
    """One VTP kind (``vtp/cam`` or ``vtp/refined``) of ``(image, class_id)`` from a cache, at ``size``.

    :meth:`PriorCache.vtp` with the kind named by its declaration.

    Example:
        >>> from clipprior.cache import VTP_CAM
        >>> cached_vtp(cache, VTP_CAM, "JPEGImages/a.jpg", 15, "original").shape  # doctest: +SKIP
        torch.Size([375, 500])

    Raises:
        CacheKeyError: if the entry is not cached.
        InvalidInputError: for a kind that is not one of the VTP table's.
    """
    if kind not in kinds_of(VTP_CAM.table):
        raise InvalidInputError(f"{kind.name} is not a VTP map kind ({[k.name for k in kinds_of(VTP_CAM.table)]})")
    return cache.vtp(image, class_id, refined=kind == VTP_REFINED, size=size)


def _prior(cache: PriorCache, kind: MapKind, record: Episode, shape: tuple[int, ...]) -> np.ndarray | None:
    """One prior kind of an episode at the label's size.

    VTP comes at the image's original size; VVP is reduced with :func:`vvp_map` and resized
    (``None`` when the episode has no VVP).
    """
    if kind == VVP_MAPS:  # (2K, h, w): reduced to one map, then resized
        return resize_map(vvp_map(cache.vvp(record.index)), shape) if cache.has_vvp(record.index) else None
    return cache.prior(kind, record, size="original").numpy()
