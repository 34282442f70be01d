"""Stage 2, load: decode, convert and resize the images and masks of one planned batch.

A loaded batch holds host pixels ready to be moved to the model's device; nothing here touches
CLIP. The engine runs these functions ahead of the device (see :mod:`clipprior.precompute.engine`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from clipprior.config import PriorConfig
from clipprior.precompute.plan import Dataset, QueryWork, SupportKey
from clipprior.preprocess import normalize, resize_to_patch_multiple
from clipprior.priors import _prepare_support

__all__ = ["QueryBatch", "SupportBatch", "fss_mask", "load_query_batch", "load_support_batch", "present_names"]


@dataclass
class QueryBatch:
    """The host side of a batch of query images, ready for a query pass.

    Attributes:
        works: The planned images, in batch order.
        pixels: (B, 3, H, W) CLIP-normalised float32 pixels at the resized size.
        sizes: Original (height, width) of each image.
        class_sets: Per (image, class) pair, in :attr:`pairs` order, the class names of its softmax.
        pairs: (batch index, class id) of every VTP pair of the batch.
        resized: The resized uint8 images (kept when VVP needs its own normalisation), else ``None``.
    """

    works: list[QueryWork]
    pixels: torch.Tensor
    sizes: list[tuple[int, int]]
    class_sets: list[list[str]]
    pairs: list[tuple[int, int]]
    resized: list[np.ndarray] | None


@dataclass
class SupportBatch:
    """The host side of a batch of (support image, class) masked passes.

    Attributes:
        keys: The planned keys, in batch order.
        pixels: (B, 3, H, W) float pixels.
        labels: (B, H, W) long labels (1 foreground, 0 background, 255 ignore).
    """

    keys: list[SupportKey]
    pixels: torch.Tensor
    labels: torch.Tensor


def present_names(label: np.ndarray, target: int, class_names: Sequence[str]) -> list[str]:
    """Names of the classes other than ``target`` present in a label map."""
    values = np.unique(label)
    return [class_names[int(v) - 1] for v in values if 1 <= int(v) <= len(class_names) and int(v) != target]


def fss_mask(raw: np.ndarray, class_id: int) -> np.ndarray:
    """A label map -> the few-shot mask of ``class_id``: 1 on the class, 255 where ignored, 0 elsewhere."""
    return np.where(raw == class_id, 1, np.where(raw == 255, 255, 0)).astype(np.uint8)


def load_query_image(dataset: Dataset, work: QueryWork, patch: int, config: PriorConfig
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One query: (decoded rgb, label, rgb resized up to a multiple of ``patch``)."""
    rgb = dataset.load_image(work.image)
    return rgb, dataset.load_label(work.label), resize_to_patch_multiple(rgb, patch, config.vtp_resample)


def load_query_batch(dataset: Dataset, batch: Sequence[QueryWork], patch: int, config: PriorConfig,
                     class_names: Sequence[str]) -> QueryBatch:
    """Decode and resize the images of a planned query batch; build its class sets.

    Example:
        >>> loaded = load_query_batch(dataset, batch, clip.patch_size, config, names)  # doctest: +SKIP
        >>> loaded.pixels.shape  # doctest: +SKIP
        torch.Size([8, 3, 384, 512])
    """
    prepared = [load_query_image(dataset, work, patch, config) for work in batch]
    return assemble_query_batch(list(batch), prepared, config, class_names)


def assemble_query_batch(batch: list[QueryWork], prepared: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                         config: PriorConfig, class_names: Sequence[str]) -> QueryBatch:
    """Loaded images of a query batch -> its :class:`QueryBatch`."""
    pixels = torch.stack([normalize(p[2], "clip") for p in prepared])
    pairs = [(b, c) for b, q in enumerate(batch) for c in sorted(q.classes)]
    sets = []
    for b, c in pairs:
        names = [class_names[c - 1]]
        if config.text_classes == "present":
            names += [n for n in present_names(prepared[b][1], c, class_names) if n not in names]
        sets.append(names)
    resized = None if config.vvp_pixel_norm == "clip" else [p[2] for p in prepared]
    sizes = [(int(p[0].shape[0]), int(p[0].shape[1])) for p in prepared]
    return QueryBatch(batch, pixels, sizes, sets, pairs, resized)


def load_support(dataset: Dataset, key: SupportKey, patch: int, config: PriorConfig
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One (support image, class): its prepared (3, H, W) pixels and (H, W) labels."""
    image, label, class_id = key
    fss = fss_mask(dataset.load_label(label), class_id)
    return _prepare_support(dataset.load_image(image), fss, patch, config)


def load_support_batch(dataset: Dataset, batch: Sequence[SupportKey], patch: int, config: PriorConfig
                       ) -> SupportBatch:
    """Decode, mask and resize the supports of a planned support batch."""
    prepared = [load_support(dataset, key, patch, config) for key in batch]
    return assemble_support_batch(list(batch), prepared)


def assemble_support_batch(batch: list[SupportKey], prepared: Sequence[tuple[torch.Tensor, torch.Tensor]]
                           ) -> SupportBatch:
    """Loaded supports of a batch -> its :class:`SupportBatch`."""
    return SupportBatch(batch, torch.stack([p[0] for p in prepared]), torch.stack([p[1] for p in prepared]))
