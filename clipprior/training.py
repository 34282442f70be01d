"""Training with cached priors: the episodes a PFENet-family trainer draws, and the model's prior input.

* :class:`EpisodeSampler` yields, epoch after epoch, the episodes a PFENet / BAM / HDMNet / PI-CLIP
  trainer draws (a random class present in each query and random supports, fresh every epoch),
  restricted to what a prior cache can serve:

  - ``mode="free"``: the PFENet protocol itself (any support of the class); for a cache that
    computes any episode's VVP (``--store features``), or no cache at all.
  - ``mode="pool"``: the class as in the protocol, the supports drawn among those the cache planned
    for that (query, class) (``--supports-per-query M``); the cache must offer
    ``support_pool(query, class_id) -> [support image keys]``.
  - ``mode="planned"``: each epoch, for each query image of the cache, one of its planned
    episodes, drawn at random (a cache that stores one VVP per planned episode).

  With ``cache=`` and no ``mode``, the mode follows the cache's store (its ``store`` attribute or
  ``provenance["store"]``, or ``has_features`` / ``has_pool``): features -> ``"free"``, pool ->
  ``"pool"``, anything else -> ``"planned"``.

  Every draw comes from ``np.random.default_rng((seed, epoch, index))``: an episode depends only
  on the seed, the epoch and the query's index, never on the worker that draws it or the order
  of the loader, so ``DataLoader`` workers (fork or spawn) and a shuffled order give the same
  episodes as a single process.

* :func:`prior_channels` stacks the priors as PI-CLIP's ``query_merge`` takes them:
  ``[VTP, VTP, VVP x 2K] * 10``; :func:`reverse_shots` puts supports and VVP channels in PI-CLIP's
  stacking order; :func:`base_label` makes BAM's base-class label (``label_b``).

Example:
    >>> from clipprior.data import open_dataset
    >>> ds = open_dataset("pascal5i", "~/data/VOC2012", fold=0, split="train")  # doctest: +SKIP
    >>> sampler = EpisodeSampler(ds, shot=5, seed=321)  # doctest: +SKIP
    >>> sampler.set_epoch(3)  # doctest: +SKIP
    >>> episode = sampler[0]  # the first query's episode in epoch 3  # doctest: +SKIP
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from clipprior.data.episodes import Episode, draw_supports
from clipprior.data.lists import Item
from clipprior.errors import CacheKeyError, DatasetError, InvalidInputError

__all__ = ["MODES", "EpisodeSampler", "base_label", "prior_channels", "reverse_shots"]

MODES = ("free", "pool", "planned")
"""Sampling modes of :class:`EpisodeSampler`."""

PRIOR_SCALE = 10.0
"""PI-CLIP multiplies its prior channels by 10 before ``query_merge``."""


# ------------------------------------------------------------------------------------ prior input


def prior_channels(vtp: torch.Tensor, vvp: torch.Tensor, scale: float = PRIOR_SCALE) -> torch.Tensor:
    """PI-CLIP's prior input of the query branch: ``[VTP, VTP, VVP x 2K] * scale``.

    PI-CLIP's ``OneModel.forward`` concatenates, before ``query_merge``, the query features, the
    support prototype, ``img_cam * 10`` (the VTP repeated on 2 channels) and
    ``clip_similarity * 10``, whose 2K channels are the last CLIP layer's similarity for each
    support, then the second-to-last layer's (layer-major, the order :meth:`PriorCache.vvp`
    returns). The transformer then takes the unscaled ``img_cam`` and ``clip_similarity``. Channel
    counts: 4 for 1-shot, 12 for 5-shot (``query_merge`` widths 516 and 524).

    Args:
        vtp: (h, w), (1, h, w) or (B, 1, h, w) visual-text prior.
        vvp: (2K, h, w) or (B, 2K, h, w) visual-visual prior.
        scale: The factor (PI-CLIP: 10).

    Returns:
        (2 + 2K, h, w) or (B, 2 + 2K, h, w), float.

    Raises:
        InvalidInputError: for shapes that do not stack.

    Example:
        >>> prior_channels(torch.ones(1, 60, 60), torch.zeros(10, 60, 60)).shape
        torch.Size([12, 60, 60])
    """
    if not isinstance(vtp, torch.Tensor) or not isinstance(vvp, torch.Tensor):
        raise InvalidInputError("vtp and vvp must be torch tensors")
    if vtp.ndim == 2:
        vtp = vtp[None]
    if vvp.ndim != vtp.ndim or vvp.ndim not in (3, 4) or vtp.shape[-3] != 1:
        raise InvalidInputError(f"vtp {tuple(vtp.shape)} and vvp {tuple(vvp.shape)} must be (1, h, w) and (2K, h, w), "
                                "or (B, 1, h, w) and (B, 2K, h, w)")
    if vtp.shape[:-3] != vvp.shape[:-3] or vtp.shape[-2:] != vvp.shape[-2:] or vvp.shape[-3] % 2:
        raise InvalidInputError(f"vtp {tuple(vtp.shape)} and vvp {tuple(vvp.shape)} do not stack: same batch and "
                                "map size, and an even VVP channel count (2 per support) are needed")
    return torch.cat([vtp, vtp, vvp], dim=-3) * scale


def reverse_shots(vvp: torch.Tensor) -> torch.Tensor:
    """Reverse the shot order of VVP channels, keeping the layer-major layout.

    PI-CLIP's ``SemData`` stacks the supports in reverse draw order (``s_x = [s_K, ..., s_1]``)
    and its VVP channels follow that stacking. A cache stores them in the episode's (draw)
    order. To feed supports in PI-CLIP's order, reverse both: ``supports[::-1]`` and this.

    Args:
        vvp: (2K, h, w) or (B, 2K, h, w).

    Returns:
        The same shape, shots reversed within each layer block.

    Example:
        >>> reverse_shots(torch.arange(6.0).view(6, 1, 1)).flatten().tolist()
        [2.0, 1.0, 0.0, 5.0, 4.0, 3.0]
    """
    channels = vvp.shape[-3]
    if channels % 2:
        raise InvalidInputError(f"a VVP has 2 channels per support, got {channels}")
    k = channels // 2
    order = [*range(k - 1, -1, -1), *range(2 * k - 1, k - 1, -1)]
    return vvp[..., order, :, :]


def base_label(label: np.ndarray, base_classes: Sequence[int]) -> np.ndarray:
    """BAM's base-class label ``label_b``: base class c -> its 1-based rank in ``base_classes``, others 0, 255 kept.

    BAM, HDMNet and PI-CLIP read it from ``base_annotation/<dataset>/<split>/<fold>/``, written
    by BAM's ``get_mulway_base_data.py`` with this rule from each mask; it supervises the base
    learner (``aux_loss2``). ``base_classes`` are the fold's training classes
    (``fold_classes(dataset, fold, "train")``).

    Args:
        label: (H, W) class-id mask.
        base_classes: The fold's base classes, ascending.

    Returns:
        (H, W) uint8.

    Example:
        >>> base_label(np.array([[0, 6, 1, 255]], np.uint8), list(range(6, 21))).tolist()
        [[0, 1, 0, 255]]
    """
    lut = np.zeros(256, np.uint8)
    for rank, c in enumerate(base_classes, start=1):
        lut[int(c)] = rank
    lut[255] = 255
    return lut[np.asarray(label, np.uint8)]


# ---------------------------------------------------------------------------------------- sampler


class EpisodeSampler:
    """The episodes a PFENet-family trainer draws, one per query and epoch, that a prior cache can serve.

    Args:
        dataset: The training :class:`~clipprior.data.FSSDataset` (its data list gives the queries,
            its support lists the supports); optional in ``"planned"`` mode, where the cache's
            episodes give both.
        shot: Supports per episode (K).
        seed: Base seed; episode ``i`` of epoch ``e`` draws from ``default_rng((seed, e, i))``.
        cache: A :class:`~clipprior.PriorCache` the episodes must be served by.
        mode: ``"free"``, ``"pool"`` or ``"planned"`` (see the module docstring); by default
            ``"free"`` without a cache, else the cache's.

    Raises:
        InvalidInputError: for a bad shot, seed or mode, or a mode that needs what is missing.

    Example:
        >>> sampler = EpisodeSampler(ds, shot=1, seed=0, cache=PriorCache("train.h5"))  # doctest: +SKIP
        >>> for epoch in range(200):  # doctest: +SKIP
        ...     sampler.set_epoch(epoch)
        ...     episodes = list(sampler)  # len(sampler) episodes, fresh supports every epoch
    """

    def __init__(self, dataset: Any = None, shot: int = 1, seed: int = 0, *, cache: Any = None,
                 mode: str | None = None) -> None:
        for name, value, low in (("shot", shot, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise InvalidInputError(f"{name} must be an integer >= {low}, got {value!r}")
        self.shot, self.seed = int(shot), int(seed)
        self.dataset, self.cache = dataset, cache
        self.mode = mode if mode is not None else self._mode_of(cache)
        if self.mode not in MODES:
            raise InvalidInputError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        self.epoch = 0
        self._planned: list[list[Episode]] = []
        self._pairs: dict[int, dict[str, Item]] = {}
        if self.mode == "planned":
            if cache is None:
                raise InvalidInputError("mode='planned' draws among a cache's planned episodes: pass cache=")
            self._planned = self._group_planned(cache)
            self.queries: list[Item] = [group[0].query for group in self._planned]
        else:
            if dataset is None:
                raise InvalidInputError(f"mode={self.mode!r} draws from the trainer's lists: pass the training dataset")
            if self.mode == "pool" and (cache is None or not hasattr(cache, "support_pool")):
                raise InvalidInputError("mode='pool' needs a cache built with --supports-per-query M "
                                        "(a PriorCache offering support_pool())")
            self.queries = list(dataset.items)
            if not self.queries:
                raise DatasetError(f"the query list of {dataset!r} is empty")

    @staticmethod
    def _mode_of(cache: Any) -> str:
        """``"free"`` for a features cache, ``"pool"`` for a support-pool cache, else ``"planned"``."""
        if cache is None:
            return "free"
        store = getattr(cache, "store", None)
        if store is None:
            provenance = getattr(cache, "provenance", None)
            store = provenance.get("store") if isinstance(provenance, dict) else None
        if store == "features" or getattr(cache, "has_features", False):
            return "free"
        if store == "pool" or getattr(cache, "has_pool", False):
            return "pool"
        return "planned"

    def _group_planned(self, cache: Any) -> list[list[Episode]]:
        groups: dict[Item, list[Episode]] = defaultdict(list)
        for record in cache.episodes:
            if record.shot != self.shot:
                raise InvalidInputError(f"{cache!r} plans {record.shot}-shot episodes, not {self.shot}-shot; "
                                        f"build a {self.shot}-shot cache or pass shot={record.shot}")
            groups[record.query].append(record)
        if not groups:
            raise InvalidInputError(f"{cache!r} holds no episodes to draw from")
        order = list(groups)
        if self.dataset is not None:  # the trainer's query order where it has one
            rank = {item: i for i, item in enumerate(self.dataset.items)}
            order.sort(key=lambda item: rank.get(item, len(rank)))
        return [groups[item] for item in order]

    # -- epochs ------------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Draw the episodes of ``epoch`` from now on (call it before each epoch, as with ``DistributedSampler``)."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise InvalidInputError(f"epoch must be an integer >= 0, got {epoch!r}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, index: int) -> Episode:
        return self.episode(index)

    def __iter__(self) -> Iterator[Episode]:
        for i in range(len(self)):
            yield self.episode(i)

    def episode(self, index: int, epoch: int | None = None) -> Episode:
        """The episode of query ``index`` in ``epoch`` (default: the current epoch).

        Supports are in draw order (the order of the cache's VVP channels; see :func:`reverse_shots`).

        Raises:
            IndexError: for an index outside ``range(len(self))``.
            DatasetError: (free / pool) the query has no class of the fold, or its class has fewer
                than ``shot`` supports besides the query.
            CacheKeyError: (pool) the cache plans too few supports for the drawn (query, class);
                the message says what it holds and how to build a cache that serves the episode.
        """
        if not 0 <= int(index) < len(self):
            raise IndexError(f"episode index {index} is outside 0..{len(self) - 1}")
        rng = np.random.default_rng((self.seed, self.epoch if epoch is None else int(epoch), int(index)))
        if self.mode == "planned":
            group = self._planned[int(index)]
            return group[int(rng.integers(len(group)))]
        image_id, label_id = self.queries[int(index)]
        present = self.dataset.present_classes(label_id)
        if not present:
            raise DatasetError(f"query mask {label_id} has none of the fold's classes {self.dataset.classes}")
        class_id = int(present[int(rng.integers(len(present)))])
        pool = self._pool(image_id, class_id) if self.mode == "pool" else self.dataset.class_index.get(class_id, [])
        query = (image_id, label_id)
        available = sum(1 for pair in pool if pair != query)
        if available < self.shot:
            if self.mode == "pool":
                raise self._pool_miss(image_id, class_id, available)
            raise DatasetError(f"class {class_id} has {available} support(s) besides query {image_id} in its support "
                               f"list; a {self.shot}-shot episode needs {self.shot}")
        chosen = draw_supports(rng, pool, query, self.shot)
        return Episode(image_id, label_id, class_id, tuple(pool[k] for k in chosen))

    def epoch_episodes(self, epoch: int | None = None) -> list[Episode]:
        """Every episode of an epoch, in query order."""
        return [self.episode(i, epoch) for i in range(len(self))]

    # -- pool mode ---------------------------------------------------------------------------------

    def _pool(self, image_id: str, class_id: int) -> list[Item]:
        pairs = self._pairs.get(class_id)
        if pairs is None:
            pairs = {image: (image, label) for image, label in self.dataset.class_index.get(class_id, [])}
            self._pairs[class_id] = pairs
        try:
            keys = list(self.cache.support_pool(image_id, class_id))
        except KeyError:
            keys = []
        missing = [k for k in keys if k not in pairs]
        if missing:
            raise CacheKeyError(f"{self.cache!r} plans supports {missing[:3]} for query {image_id}, class {class_id} "
                                f"that are not in the dataset's support list of class {class_id}; the cache was built "
                                "from other lists (compare `clipprior inspect` with the dataset's list checksum)")
        return [pairs[k] for k in keys]

    def _pool_miss(self, image_id: str, class_id: int, available: int) -> CacheKeyError:
        return CacheKeyError(
            f"{self.cache!r} plans {available} support(s) for query {image_id}, class {class_id} (besides the query), "
            f"a {self.shot}-shot episode needs {self.shot}; build a cache that serves it: "
            f"`clipprior precompute ... --shot {self.shot} --supports-per-query M` with M >= {self.shot} "
            "covering every (query, class) of the training list, or `--store features` for any episode")
