"""Stage 2, load: decode, convert and resize the images and masks of one planned batch.

A loaded batch holds host pixels ready to be moved to the model's device; nothing here touches
CLIP. The engine runs these functions ahead of the device (see :mod:`clipprior.precompute.engine`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from clipprior.config import PriorConfig
from clipprior.data.images import check_same_size
from clipprior.data.report import DataReport, Problem, check_on_error
from clipprior.errors import DataNotFoundError, DatasetError
from clipprior.precompute.plan import Dataset, QueryWork, SupportKey
from clipprior.preprocess import normalize, vtp_image
from clipprior.priors import _prepare_support, present_names

__all__ = ["LoadFaults", "QueryBatch", "SupportBatch", "fss_mask", "load_checked", "load_query_batch",
           "load_support_batch", "present_names"]


@dataclass
class QueryBatch:
    """The host side of a batch of query images, ready for a query pass.

    Attributes:
        works: The planned images, in batch order.
        pixels: (B, 3, H, W) CLIP-normalised float32 pixels at the resized size.
        sizes: Original (height, width) of each image.
        class_sets: Per (image, class) pair, in :attr:`pairs` order, the class names of its softmax.
        pairs: (batch index, class id) of every VTP pair of the batch.
        vvp_images: The decoded uint8 images, kept when VVP needs a pass of its own (another pixel
            normalisation or the official geometry, see ``PriorConfig.vvp_shares_query_pass``), else ``None``.
    """

    works: list[QueryWork]
    pixels: torch.Tensor
    sizes: list[tuple[int, int]]
    class_sets: list[list[str]]
    pairs: list[tuple[int, int]]
    vvp_images: list[np.ndarray] | None


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


def fss_mask(raw: np.ndarray, class_id: int) -> np.ndarray:
    """A label map -> the few-shot mask of ``class_id``: 1 on the class, 255 where ignored, 0 elsewhere."""
    return np.where(raw == class_id, 1, np.where(raw == 255, 255, 0)).astype(np.uint8)


def load_query_image(dataset: Dataset, work: QueryWork, patch: int, config: PriorConfig
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One query, checked (:func:`load_checked`): (decoded rgb, label, rgb resized up to a multiple of ``patch``)."""
    rgb, label = load_checked(dataset, work.image, work.label, patch, "query")
    return rgb, label, vtp_image(rgb, patch, config)


def load_query_batch(dataset: Dataset, batch: Sequence[QueryWork], patch: int, config: PriorConfig,
                     class_names: Sequence[str], faults: LoadFaults | None = None) -> QueryBatch | None:
    """Decode and resize the images of a planned query batch; build its class sets.

    With ``faults``, a broken image or mask goes to :meth:`LoadFaults.query` and the batch runs
    without it (``None`` when nothing is left); without, its error is raised.

    Example:
        >>> loaded = load_query_batch(dataset, batch, clip.patch_size, config, names)  # doctest: +SKIP
        >>> loaded.pixels.shape  # doctest: +SKIP
        torch.Size([8, 3, 384, 512])
    """
    works, prepared = [], []
    for work in batch:
        try:
            prepared.append(load_query_image(dataset, work, patch, config))
        except DatasetError as err:
            if faults is None:
                raise
            faults.query(work, err)
            continue
        works.append(work)
    return assemble_query_batch(works, prepared, config, class_names) if works else None


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
    vvp_images = None if config.vvp_shares_query_pass else [p[0] for p in prepared]
    sizes = [(int(p[0].shape[0]), int(p[0].shape[1])) for p in prepared]
    return QueryBatch(batch, pixels, sizes, sets, pairs, vvp_images)


def load_support(dataset: Dataset, key: SupportKey, patch: int, config: PriorConfig
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One (support image, class): its prepared (3, H, W) pixels and (H, W) labels."""
    image, label, class_id = key
    rgb, raw = load_checked(dataset, image, label, patch, "support")
    fss = fss_mask(raw, class_id)
    if not (fss == 1).any():
        path = _file(dataset, label)
        raise _broken(DatasetError(
            f"support mask {path} has no pixel of class {class_id}, the class its image {_file(dataset, image)} "
            "is a support of: the support lists do not match the masks; rebuild them from the masks "
            "(`clipprior lists build`)"), path)
    return _prepare_support(rgb, fss, patch, config)


def load_support_batch(dataset: Dataset, batch: Sequence[SupportKey], patch: int, config: PriorConfig,
                       faults: LoadFaults | None = None) -> SupportBatch | None:
    """Decode, mask and resize the supports of a planned support batch.

    With ``faults``, a broken support goes to :meth:`LoadFaults.support` and the batch runs without
    it (``None`` when nothing is left); without, its error is raised.
    """
    keys, prepared = [], []
    for key in batch:
        try:
            prepared.append(load_support(dataset, key, patch, config))
        except DatasetError as err:
            if faults is None:
                raise
            faults.support(key, err)
            continue
        keys.append(key)
    return assemble_support_batch(keys, prepared) if keys else None


def assemble_support_batch(batch: list[SupportKey], prepared: Sequence[tuple[torch.Tensor, torch.Tensor]]
                           ) -> SupportBatch:
    """Loaded supports of a batch -> its :class:`SupportBatch`."""
    return SupportBatch(batch, torch.stack([p[0] for p in prepared]), torch.stack([p[1] for p in prepared]))


# ----------------------------------------------------------------------------------- broken files


def _file(dataset: Dataset, item: str) -> str:
    """The file behind an id, as messages name it (absolute where the dataset knows its root)."""
    path = getattr(dataset, "path", None)
    return str(path(item)) if callable(path) else str(item)


def _broken(err: DatasetError, path: str) -> DatasetError:
    """``err`` with the file it is about attached as ``err.path`` (for the skip report)."""
    err.path = path  # type: ignore[attr-defined]
    return err


def _read(loader: Any, dataset: Dataset, item: str) -> np.ndarray:
    try:
        return loader(item)
    except DatasetError as err:
        raise _broken(err, _file(dataset, item)) from None


def load_checked(dataset: Dataset, image: str, label: str, patch: int, role: str) -> tuple[np.ndarray, np.ndarray]:
    """An image and its mask, checked usable: (H, W, 3) uint8, (H, W) uint8.

    Checks what would otherwise fail later without naming a file: the mask has the image's size
    (a query mask of another size would be accepted here and blamed on the data root by
    ``evaluate``), and the image holds at least one patch of the model.

    Args:
        dataset: Loads images and labels by id.
        image: Image id.
        label: Its mask's id.
        patch: The model's patch size.
        role: ``"query"`` or ``"support"``, for messages.

    Raises:
        DatasetError: naming the file(s) and sizes (``err.path``: the file at fault).
        DataNotFoundError: if a file is missing.

    Example:
        >>> rgb, raw = load_checked(dataset, "JPEGImages/a.jpg", "Labels/a.png", 16, "query")  # doctest: +SKIP
    """
    rgb = _read(dataset.load_image, dataset, image)
    raw = _read(dataset.load_label, dataset, label)
    try:
        check_same_size(rgb, raw, _file(dataset, image), _file(dataset, label))
    except DatasetError as err:
        raise _broken(err, _file(dataset, label)) from None
    height, width = rgb.shape[:2]
    if height < patch or width < patch:
        path = _file(dataset, image)
        raise _broken(DatasetError(
            f"{role} image {path} is {height}x{width} pixels, smaller than one {patch}x{patch} patch of the model; "
            "no prior is meaningful on it: remove it from the lists"), path)
    return rgb, raw


def _indices(indices: Sequence[int]) -> str:
    shown = ", ".join(str(i) for i in indices[:10])
    return shown + (f" and {len(indices) - 10} more" if len(indices) > 10 else "")


class LoadFaults:
    """Broken files met while loading, and the episodes they take down.

    With ``on_error="raise"`` the first broken file raises a :class:`~clipprior.errors.DatasetError`
    that names it, the episodes that need it (and how) and the fix. With ``"skip"`` every episode
    that needs the file is dropped -- its VVP is not computed and it is left out of the cache's
    episode table -- and recorded in :attr:`report`; everything else is computed.

    Args:
        on_error: ``"raise"`` or ``"skip"``.
        episodes: The run's episodes (``query_image``, ``class_id``, ``supports``).
        dataset: The dataset, to name files by their full path.
        only: The indices of the episodes this run computes (default: all).

    Attributes:
        report: One problem per broken file, naming the dropped episodes.
        dropped: Indices of the dropped episodes.

    Example:
        >>> faults = LoadFaults("skip", episodes)  # doctest: +SKIP
        >>> faults.dropped  # doctest: +SKIP
        set()
    """

    def __init__(self, on_error: str, episodes: Sequence[Any], dataset: Dataset | None = None,
                 only: Sequence[int] | None = None) -> None:
        self.on_error = check_on_error(on_error)
        self.episodes = episodes
        self.only = range(len(episodes)) if only is None else sorted(only)
        self.dataset = dataset
        self.report = DataReport()
        self.dropped: set[int] = set()
        self._users: dict[SupportKey, list[int]] | None = None

    def query(self, work: QueryWork, err: DatasetError) -> None:
        """A query image (or its mask) is broken: every episode of that query goes."""
        self._fail(err, list(work.episodes), "the query of episode(s)", work.image)

    def support(self, key: SupportKey, err: DatasetError) -> None:
        """A support (or its mask) is broken for its class: every episode using it goes."""
        if self._users is None:
            self._users = {}
            for i in self.only:
                episode = self.episodes[i]
                for image, label in episode.supports:
                    self._users.setdefault((image, label, int(episode.class_id)), []).append(i)
        self._fail(err, self._users.get(key, []), f"a support of class {key[2]} in episode(s)", key[0])

    def _fail(self, err: DatasetError, indices: list[int], role: str, item: str) -> None:
        path = getattr(err, "path", None) or (_file(self.dataset, item) if self.dataset is not None else item)
        if self.on_error == "raise":
            raised = type(err)(f"{err} (needed as {role} {_indices(indices)}); fix or remove the file, or pass "
                               "on_error='skip' (--on-error skip) to drop the episodes that need it and compute "
                               "the rest")
            raise _broken(raised, path) from err
        fresh = sorted(set(indices) - self.dropped)
        self.dropped.update(indices)
        self.report.add(Problem(path, f"{err} -- needed as {role} {_indices(indices)}; "
                                      f"{len(fresh)} episode(s) dropped", missing=isinstance(err, DataNotFoundError)))
