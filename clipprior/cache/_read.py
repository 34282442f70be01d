"""The read-only, DataLoader-safe prior cache reader and the helpers that map priors onto a geometry.

See :mod:`clipprior.cache` for the overview and ``docs/training-loop.md`` for a worked example.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import operator
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import torch

from clipprior._resize import resize_bilinear
from clipprior.cache import _format as fmt
from clipprior.cache import _h5
from clipprior.cache._format import parts_dir
from clipprior.cache._h5 import FileIndex
from clipprior.config import PriorConfig
from clipprior.data.episodes import Episode
from clipprior.errors import CacheError, CacheKeyError, InvalidInputError

__all__ = ["ImageRef", "PriorCache", "Size", "letterbox_prior", "resize_prior"]

#: ``None`` (patch grid), ``"original"`` (the image's original size) or ``(H, W)``.
Size = None | Literal["original"] | tuple[int, int]
#: An image as the reader takes it: its key, a trainer's path for it, or an ``(image, label)`` pair
#: as :class:`~clipprior.data.Episode` holds one (``episode.query``, each of ``episode.supports``).
ImageRef = str | os.PathLike[str] | tuple[str, str]


def _image_part(ref: ImageRef) -> str:
    """The image of an :data:`ImageRef`, as text (the label of a pair plays no part in a lookup)."""
    if isinstance(ref, tuple):
        if len(ref) != 2:
            raise InvalidInputError(f"expected an image key or an (image, label) pair, got {ref!r}")
        ref = ref[0]
    return os.fspath(ref)


# -------------------------------------------------------------------------------------- resizing


def _check_size(size: Any) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise InvalidInputError(f"size must be a pair (height, width), got {size!r}") from None
    if h < 1 or w < 1:
        raise InvalidInputError(f"size must be positive, got {size!r}")
    return h, w


def resize_prior(x: torch.Tensor, size: tuple[int, int], *, align_corners: bool = False) -> torch.Tensor:
    """Bilinearly resize a prior map, in float32.

    Use it to map a cached prior (patch grid of the whole image) onto a stretched geometry: the
    original image, the image stretched to 473x473, a 60x60 feature map.

    Args:
        x: (h, w), (C, h, w) or (B, C, h, w) prior.
        size: Target (H, W).
        align_corners: Passed to :func:`torch.nn.functional.interpolate`; ``False`` (the default)
            treats pixels as areas; PI-CLIP's own code resizes its priors with ``True``.

    Returns:
        (H, W), (C, H, W) or (B, C, H, W) float32 tensor.

    Raises:
        InvalidInputError: for a tensor of another rank or a bad size.

    Example:
        >>> resize_prior(torch.ones(3, 4), (6, 8)).shape
        torch.Size([6, 8])
    """
    size = _check_size(size)
    if not isinstance(x, torch.Tensor) or x.ndim not in (2, 3, 4):
        shape = getattr(x, "shape", x)
        raise InvalidInputError(f"prior must be a (h, w), (C, h, w) or (B, C, h, w) tensor, got {shape}")
    return resize_bilinear(x.float(), size, align_corners=align_corners)


def letterbox_prior(x: torch.Tensor, content_size: tuple[int, int], canvas_size: tuple[int, int], *,
                    offset: tuple[int, int] = (0, 0), fill: float = 0.0, align_corners: bool = False) -> torch.Tensor:
    """Map a prior onto a letterboxed geometry: resize it to the image's content box, then pad.

    A letterboxing transform scales the image, keeping its aspect ratio, to ``content_size`` and
    pastes it into a ``canvas_size`` canvas at ``offset`` (top-left by default, as the PFENet
    family's test-time resize does). The prior covers the whole image, so it goes to the same box.

    Args:
        x: (h, w), (C, h, w) or (B, C, h, w) prior.
        content_size: (h, w) of the resized image inside the canvas.
        canvas_size: (H, W) of the canvas.
        offset: (top, left) of the content box in the canvas.
        fill: Value of the padding.
        align_corners: See :func:`resize_prior`.

    Returns:
        (..., H, W) float32 tensor.

    Raises:
        InvalidInputError: if the content box does not fit in the canvas.

    Example:
        >>> letterbox_prior(torch.ones(2, 3), (20, 30), (30, 30)).sum().item()
        600.0
    """
    ch, cw = _check_size(content_size)
    hh, ww = _check_size(canvas_size)
    top, left = (int(v) for v in offset)
    if top < 0 or left < 0 or top + ch > hh or left + cw > ww:
        raise InvalidInputError(f"content box {content_size} at offset {offset} does not fit in canvas {canvas_size}")
    inner = resize_prior(x, (ch, cw), align_corners=align_corners)
    out = inner.new_full((*inner.shape[:-2], hh, ww), float(fill))
    out[..., top:top + ch, left:left + cw] = inner
    return out


# ------------------------------------------------------------------------------------------ reader


class _ReaderIndex:
    """Lookup tables of an open cache (built once per process)."""

    def __init__(self, idx: FileIndex) -> None:
        self.file = idx
        self.image_row = {k: r for r, k in enumerate(idx.image_keys)}
        #: ``{group: {key: row}}`` per entry table of the format.
        self.rows = {name: {key: row for row, key in enumerate(table.keys)} for name, table in idx.tables.items()}
        self.vtp_row = self.rows[fmt.VTP.group]
        self.vvp_row = self.rows[fmt.VVP.group]
        self.episodes = sorted(idx.episodes, key=lambda e: e.index)
        self.episode_by_index = {e.index: e for e in self.episodes}
        self.episode_by_key: dict[tuple[str, int, tuple[str, ...]], int] = {}
        for e in self.episodes:
            self.episode_by_key.setdefault((e.query_image, e.class_id, e.support_images), e.index)
        #: ``{(query, class_id): [support, ...]}`` of the one-shot episodes (a pool cache's pools).
        self.pools: dict[tuple[str, int], list[str]] = {}
        for e in self.episodes:
            if e.shot == 1:
                pool = self.pools.setdefault((e.query_image, e.class_id), [])
                if e.supports[0][0] not in pool:
                    pool.append(e.supports[0][0])
        # every key a caller may name: images with priors, and the supports of the episodes
        self.known_keys = set(self.image_row).union(*(e.support_images for e in self.episodes))


class PriorCache:
    """Read-only access to a finished prior cache, as torch tensors.

    The file is opened lazily, once per process: the object pickles as its path alone, so it can be
    handed to ``DataLoader`` workers (fork or spawn) and each worker opens its own read-only handle.

    Image keys are ids relative to the data root (``"JPEGImages/2007_000033.jpg"``). Every method
    that takes an image key also takes the trainer's own path for it: a path with a list file's
    prefix (``"../data/VOCdevkit2012/VOC2012/JPEGImages/2007_000033.jpg"``, COCO's
    ``".../train2014/COCO_train2014_....jpg"``) is mapped by the list reader's rule
    (:func:`clipprior.data.layout.to_id`, for the cache's dataset), and with ``data_root`` an
    absolute path under it is taken relative to it.

    Args:
        path: A cache written by :meth:`CacheWriter.finalize` or :func:`merge_caches`.
        data_root: The data root the trainer's absolute paths start with (``~`` is expanded).

    Raises:
        CacheError: if the file does not exist, is unfinished, or is not a clipprior cache.

    Example:
        >>> cache = PriorCache("priors.h5")  # doctest: +SKIP
        >>> for episode in cache:  # doctest: +SKIP
        ...     vtp = cache.vtp(episode.query_image, episode.class_id, size=(60, 60))  # (60, 60)
        ...     vvp = cache.vvp(episode.index, size=(60, 60))  # (2K, 60, 60)
    """

    def __init__(self, path: str | os.PathLike[str], *, data_root: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path).expanduser()
        self.data_root = None if data_root is None else Path(data_root).expanduser().absolute()
        if not self.path.is_file():
            if parts_dir(self.path).is_dir():
                raise CacheError(f"{self.path} is not finished: an interrupted run left {parts_dir(self.path)}; "
                                 "rerun the same precompute command to complete it")
            raise CacheError(f"no prior cache at {self.path}; create one with `clipprior precompute`")
        self._handle: h5py.File | None = None
        self._maps: dict[str, h5py.Dataset] = {}
        self._pid: int | None = None
        self._idx: _ReaderIndex | None = None
        self._keys: dict[str, str] = {}

    # -- process-local state -----------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "data_root": self.data_root}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self.data_root = state.get("data_root")
        self._handle, self._maps, self._pid, self._idx = None, {}, None, None
        self._keys = {}

    def _ensure_open(self) -> h5py.File:
        if self._handle is None or self._pid != os.getpid():
            # A handle inherited through fork() is never used: each process opens its own.
            self._handle = _h5.open_read(self.path)
            # Looking a dataset up by path costs more than reading one entry: do it once.
            self._maps = {k.name: self._handle[k.name] for k in fmt.MAP_KINDS if k.name in self._handle}
            self._pid = os.getpid()
        return self._handle

    @property
    def _file(self) -> h5py.File:
        return self._ensure_open()

    def _map(self, name: str) -> h5py.Dataset:
        self._ensure_open()
        return self._maps[name]

    def _entry(self, kind: fmt.MapKind, row: int, key: Any) -> np.ndarray:
        """Row ``row`` of map kind ``kind`` (the whole padded row: one chunk), named ``key`` in errors."""
        return _h5.read_entry(self._map(kind.name), row, self.path, f"{kind.name} {key!r}")

    @property
    def _index(self) -> _ReaderIndex:
        if self._idx is None:
            self._idx = _ReaderIndex(FileIndex.read(self._file))
        return self._idx

    def close(self) -> None:
        """Close this process's handle (it reopens on the next read)."""
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle, self._maps, self._pid = None, {}, None

    def __enter__(self) -> PriorCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        root = "" if self.data_root is None else f", data_root={str(self.data_root)!r}"
        return f"PriorCache({str(self.path)!r}{root})"

    # -- keys --------------------------------------------------------------------------------------

    def image_key(self, path: ImageRef) -> str:
        """The cache key of an image given as a key, a trainer's list path, an absolute path or an (image, label) pair.

        Tried in order: the key as given; with ``data_root``, an absolute path under it, relative
        to it; the list reader's rule for the cache's dataset (keep the path from the dataset's
        known image folder on, e.g. ``JPEGImages/``, ``train2014/``).

        Args:
            path: ``"JPEGImages/2007_000033.jpg"``, ``"../data/VOCdevkit2012/VOC2012/JPEGImages/2007_000033.jpg"``,
                ``"/data/VOC2012/JPEGImages/2007_000033.jpg"``, ... or an ``(image, label)`` pair
                (:attr:`Episode.query <clipprior.data.Episode.query>`), of which the image counts.

        Returns:
            The key, as in :attr:`images`.

        Raises:
            CacheKeyError: if no rule gives a key of this cache; the message says what was tried.

        Example:
            >>> PriorCache("p5i-train.h5", data_root="~/data/VOC2012").image_key(
            ...     "/home/me/data/VOC2012/JPEGImages/2007_000033.jpg")  # doctest: +SKIP
            'JPEGImages/2007_000033.jpg'
        """
        text = _image_part(path)
        key = self._keys.get(text)
        if key is None:
            key = self._resolve(text)
            self._keys[text] = key
        return key

    def _lenient_key(self, path: ImageRef) -> str:
        """The key of ``path`` if it maps onto one, else ``path`` as given (the lookup then fails on its own)."""
        try:
            return self.image_key(path)
        except CacheKeyError:
            return _image_part(path)

    def _resolve(self, text: str) -> str:
        rows = self._index.known_keys
        if text in rows:
            return text
        tried = []
        candidate = Path(text).expanduser()
        if self.data_root is not None and candidate.is_absolute():
            try:
                relative = candidate.relative_to(self.data_root).as_posix()
            except ValueError:
                tried.append(f"not under data_root {self.data_root}")
            else:
                if relative in rows:
                    return relative
                tried.append(f"relative to data_root: {relative!r}")
        dataset = self._index.file.attrs[fmt.ATTR_PROVENANCE].get("dataset")
        if dataset:
            from clipprior.data.layout import to_id  # light, but only needed for trainer paths
            from clipprior.errors import ClipPriorError

            try:
                mapped = to_id(text, str(dataset), "image")
            except ClipPriorError as err:
                tried.append(str(err))
            else:
                if mapped in rows:
                    return mapped
                tried.append(f"by the {dataset} list rule: {mapped!r}")
        elif self.data_root is None:
            tried.append("the cache names no dataset and no data_root was given")
        raise CacheKeyError(self._unknown_image(text, "; ".join(tried)))

    # -- metadata ----------------------------------------------------------------------------------

    @property
    def provenance(self) -> dict[str, Any]:
        """The settings the priors were computed with (a copy)."""
        return json.loads(json.dumps(self._index.file.attrs[fmt.ATTR_PROVENANCE]))

    @property
    def config(self) -> PriorConfig:
        """The :class:`PriorConfig` of the priors (from ``provenance["config"]``).

        Raises:
            CacheError: if the provenance has no config.
        """
        value = self._index.file.attrs[fmt.ATTR_PROVENANCE].get("config")
        if value is None:
            raise CacheError(f"{self.path} records no prior config in its provenance")
        return PriorConfig.from_dict(value) if isinstance(value, dict) else PriorConfig.from_json(value)

    @property
    def attrs(self) -> dict[str, Any]:
        """Root attributes besides the provenance (kind, run id, timestamps, shard)."""
        return {k: v for k, v in self._index.file.attrs.items()
                if k in fmt.RESERVED_ATTRS and k != fmt.ATTR_PROVENANCE}

    @property
    def file_kind(self) -> str | None:
        """What the file is: ``"cache"`` or ``"shard"`` (``None`` if it does not say)."""
        kind = self._index.file.attrs.get(fmt.ATTR_KIND)
        return None if kind is None else str(kind)

    @property
    def shard(self) -> tuple[int, int] | None:
        """``(index, count)`` of a shard file; ``None`` for a whole cache.

        Example:
            >>> PriorCache("priors.shard-1-of-4.h5").shard  # doctest: +SKIP
            (1, 4)
        """
        attrs = self._index.file.attrs
        if fmt.ATTR_SHARD_INDEX not in attrs:
            return None
        return int(attrs[fmt.ATTR_SHARD_INDEX]), int(attrs[fmt.ATTR_SHARD_COUNT])

    @property
    def run(self) -> dict[str, Any]:
        """What identifies the run that wrote the file: its creation and finalization times and run id.

        Returns:
            ``{attribute name: value}`` of those the file records (``created_utc``,
            ``finalized_utc``, ``run_id``), in that order.
        """
        attrs = self._index.file.attrs
        return {name: attrs[name] for name in fmt.RUN_ATTRS if name in attrs}

    @property
    def images(self) -> list[str]:
        """Image keys, sorted."""
        return list(self._index.file.image_keys)

    @property
    def episodes(self) -> list[Episode]:
        """The episode table, sorted by index: numbered :class:`~clipprior.data.Episode` s."""
        return list(self._index.episodes)

    @property
    def shot(self) -> int:
        """K, the supports per episode (0 without episodes)."""
        return self._index.episodes[0].shot if self._index.episodes else 0

    def vtp_keys(self) -> list[tuple[str, int]]:
        """``(image_key, class_id)`` of every cached VTP, sorted."""
        return list(self._index.vtp_row)

    def feature_keys(self) -> tuple[list[str], list[tuple[str, int]]]:
        """What a features cache can serve: its query images and its ``(support image, class_id)`` pairs.

        Example:
            >>> queries, supports = cache.feature_keys()  # doctest: +SKIP
            >>> len(queries), supports[0]  # doctest: +SKIP
            (4208, ('JPEGImages/2007_000032.jpg', 1))
        """
        return list(self._index.rows[fmt.QFEAT.group]), list(self._index.rows[fmt.SFEAT.group])

    def image_size(self, image_key: ImageRef) -> tuple[int, int]:
        """Original (height, width) of an image.

        Raises:
            CacheKeyError: if the image is not in the cache.
        """
        key = self.image_key(image_key)
        row = self._index.image_row.get(key)
        if row is None:
            raise CacheKeyError(self._unknown_image(key))
        h, w = self._index.file.image_sizes[row].tolist()
        return int(h), int(w)

    def has_vtp(self, image_key: ImageRef, class_id: int) -> bool:
        """Whether the VTP of ``(image_key, class_id)`` is cached (``image_key`` as in :meth:`image_key`)."""
        class_id = self._class_id(class_id)
        try:
            key = self.image_key(image_key)
        except CacheKeyError:
            return False
        return (key, class_id) in self._index.vtp_row

    def has_vvp(self, episode_index: int) -> bool:
        """Whether the VVP of an episode is cached."""
        return int(episode_index) in self._index.vvp_row

    def __len__(self) -> int:
        return len(self._index.episodes)

    def __iter__(self) -> Iterator[Episode]:
        return iter(list(self._index.episodes))

    def episode(self, index: int) -> Episode:
        """The episode with this index.

        Raises:
            CacheKeyError: if the cache has no such episode.
        """
        record = self._index.episode_by_index.get(int(index))
        if record is None:
            raise CacheKeyError(f"episode {index} is not in {self.path} ({self._episode_range()}); "
                                f"run `clipprior inspect {self.path}` to see what is cached")
        return record

    def find_episode(self, query: ImageRef, class_id: int, supports: Sequence[ImageRef]) -> int:
        """Index of the (first) episode with this query, class and supports (in shot order).

        Images are given as in :meth:`image_key` (keys, trainer paths or ``(image, label)`` pairs,
        so ``find_episode(*episode_of_a_sampler)``-style calls pass ``episode.query`` and
        ``episode.supports`` as they are).

        Raises:
            CacheKeyError: if no episode matches.
        """
        query, supports = self._lenient_key(query), [self._lenient_key(s) for s in supports]
        key = (query, self._class_id(class_id), tuple(supports))
        index = self._index.episode_by_key.get(key)
        if index is None:
            raise CacheKeyError(
                f"no episode with query {query!r}, class {class_id} and supports {list(supports)} in {self.path} "
                f"(supports go in shot order); run `clipprior inspect {self.path}` to see what is cached"
            )
        return index

    # -- maps --------------------------------------------------------------------------------------

    def vtp(self, image_key: ImageRef, class_id: int, *, refined: bool = True, size: Size = None,
            align_corners: bool = False) -> torch.Tensor:
        """The visual-text prior of one ``(image, class)``.

        Args:
            image_key: Key of the image (see :attr:`images`), the trainer's path for it or an
                (image, label) pair (see :meth:`image_key`).
            class_id: The dataset's class id (1-based, as in the masks).
            refined: The PIR-refined map (default) or the raw Grad-CAM.
            size: ``None`` for the patch grid (h, w); ``"original"`` for the image's original size;
                ``(H, W)`` for any other stretched geometry (bilinear).
            align_corners: Of the bilinear resize; PI-CLIP resizes its priors to the feature map with
                ``True``.

        Returns:
            (h, w) or (H, W) float32 tensor.

        Raises:
            CacheKeyError: if the entry is not cached (the message says how to list the contents).
        """
        return self._vtp(fmt.VTP_REFINED if refined else fmt.VTP_CAM, image_key, class_id, size, align_corners)

    def _vtp(self, kind: fmt.MapKind, image_key: ImageRef, class_id: int, size: Size,
             align_corners: bool) -> torch.Tensor:
        """:meth:`vtp` of one VTP map kind."""
        class_id = self._class_id(class_id)
        idx = self._index
        image_key = self.image_key(image_key)
        row = idx.vtp_row.get((image_key, class_id))
        if row is None:
            if image_key not in idx.image_row:
                raise CacheKeyError(self._unknown_image(image_key))
            classes = sorted(c for (k, c) in idx.vtp_row if k == image_key)
            raise CacheKeyError(f"no VTP for image {image_key!r}, class {class_id} in {self.path} (this image has "
                                f"classes {classes}); run `clipprior inspect {self.path}` to see what is cached")
        h, w = idx.file.tables[fmt.VTP.group].grids[row].tolist()
        # Reading the whole padded row (one chunk) and cropping is ~4x faster than a hyperslab.
        data = self._entry(kind, row, (image_key, class_id))[:h, :w]
        return self._sized(torch.from_numpy(data.astype(np.float32)), size, image_key, align_corners)

    def vvp(self, episode_index: int | None = None, *, query: ImageRef | None = None, class_id: int | None = None,
            supports: Sequence[ImageRef] | None = None, size: Size = None, align_corners: bool = False) -> torch.Tensor:
        """The visual-visual prior of one episode, by index or by ``(query, class_id, supports)``.

        Args:
            episode_index: The episode's index; or leave it ``None`` and give the three keys below.
            query: Query image (key, trainer path or (image, label) pair, as in :meth:`image_key`).
            class_id: Target class.
            supports: Support images in shot order, each as ``query``.
            size: As in :meth:`vtp` (``"original"``: the query's original size).
            align_corners: As in :meth:`vtp`.

        Returns:
            (C, h, w) or (C, H, W) float32 tensor, C = 2K.

        Raises:
            CacheKeyError: if the episode or its VVP is not cached.
            InvalidInputError: if neither an index nor all three keys are given.
        """
        if episode_index is None:
            if query is None or class_id is None or supports is None:
                raise InvalidInputError("give episode_index, or all of query, class_id and supports")
            episode_index = self.find_episode(query, class_id, supports)
        index = int(episode_index)
        row = self._index.vvp_row.get(index)
        if row is None:
            raise CacheKeyError(f"no VVP for episode {index} in {self.path} ({self._episode_range()}); "
                                f"run `clipprior inspect {self.path}` to see what is cached")
        h, w = self._index.file.tables[fmt.VVP.group].grids[row].tolist()
        data = self._entry(fmt.VVP_MAPS, row, index)[:, :h, :w]
        episode = self._index.episode_by_index.get(index)
        query_key = None if episode is None else episode.query_image
        return self._sized(torch.from_numpy(data.astype(np.float32)), size, query_key, align_corners)

    def prior(self, kind: fmt.MapKind, episode: Episode, *, size: Size = None,
              align_corners: bool = False) -> torch.Tensor:
        """One prior kind of a planned episode: a VTP kind of its query and class, or its VVP.

        Args:
            kind: One of :data:`clipprior.cache.PRIORS`.
            episode: One of :attr:`episodes` (its VVP is read by ``episode.index``).
            size: As in :meth:`vtp`.
            align_corners: As in :meth:`vtp`.

        Returns:
            What :meth:`vtp` (for ``VTP_CAM`` / ``VTP_REFINED``) or :meth:`vvp` (for ``VVP_MAPS``) returns.

        Raises:
            CacheKeyError: if the entry is not cached.
            InvalidInputError: for a kind that is not a prior.

        Example:
            >>> from clipprior.cache import PRIORS
            >>> maps = {k.prior: cache.prior(k, cache.episode(0)) for k in PRIORS}  # doctest: +SKIP
        """
        if kind in fmt.PRIORS and fmt.TABLES[kind.table].keyed_by == "image_class":
            return self._vtp(kind, episode.query_image, episode.class_id, size, align_corners)
        if kind == fmt.VVP_MAPS:
            return self.vvp(episode.index, size=size, align_corners=align_corners)
        raise InvalidInputError(f"{kind.name} is not a prior; use one of {[k.name for k in fmt.PRIORS]}")

    # -- store modes: features (any episode), pool (planned supports per query) -----------------------

    @property
    def store(self) -> str:
        """How this cache serves episodes: ``"maps"``, ``"features"`` or ``"pool"``.

        ``"maps"``: its planned episodes; ``"features"``: any episode, from stored features;
        ``"pool"``: any K of the supports it planned per query and class (``docs/training-loop.md``).
        """
        store = self._index.file.attrs[fmt.ATTR_PROVENANCE].get("store")
        if store in fmt.STORE_MODES:
            return str(store)
        return "features" if self.has_features else "maps"

    @property
    def has_features(self) -> bool:
        """Whether this cache stores VVP features (``--store features``): it serves any episode's VVP."""
        return bool(self._index.rows[fmt.QFEAT.group])

    @property
    def has_pool(self) -> bool:
        """Whether this is a support-pool cache (``--supports-per-query M``): see :meth:`support_pool`."""
        return self.store == "pool"

    def support_pool(self, query: ImageRef, class_id: int) -> list[str]:
        """The support image keys this cache holds a one-shot VVP for, with this query and class.

        A pool cache (``clipprior precompute --supports-per-query M``) plans M supports per (query,
        class) of the training list, drawn by the trainers' protocol; any K of them make an episode
        :meth:`episode_priors` serves (a K-shot VVP is the stack of its one-shot VVPs). Any cache
        answers with the supports of its one-shot episodes.

        Args:
            query: Query image, as in :meth:`image_key`.
            class_id: Target class.

        Returns:
            Support image keys, in planning order (empty when there are none).

        Example:
            >>> cache.support_pool("JPEGImages/2007_000033.jpg", 1)  # doctest: +SKIP
            ['JPEGImages/2008_001234.jpg', 'JPEGImages/2009_000012.jpg', ...]
        """
        return list(self._index.pools.get((self._lenient_key(query), self._class_id(class_id)), ()))

    def query_features(self, image_key: ImageRef, *, device: torch.device | str | None = None) -> torch.Tensor:
        """The stored VVP-layer features of a query image: (L * D, h, w) float32 unit vectors.

        Raises:
            CacheKeyError: if the cache has no features for this image.
        """
        image_key = self._lenient_key(image_key)
        row = self._index.rows[fmt.QFEAT.group].get(image_key)
        if row is None:
            raise CacheKeyError(self._no_features(f"query features of image {image_key!r}"))
        h, w = self._index.file.tables[fmt.QFEAT.group].grids[row].tolist()
        data = self._entry(fmt.QFEAT_FEATURES, row, image_key)[:, :h, :w]
        return torch.from_numpy(data).to(device or "cpu", torch.float32)

    def support_features(self, image_key: ImageRef, class_id: int, *, device: torch.device | str | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored masked features of a (support image, class): (L * D, h, w) and its (h, w) mask.

        Raises:
            CacheKeyError: if the cache has no features for this pair.
        """
        key = (self._lenient_key(image_key), self._class_id(class_id))
        row = self._index.rows[fmt.SFEAT.group].get(key)
        if row is None:
            raise CacheKeyError(self._no_features(f"support features of image {key[0]!r}, class {key[1]}"))
        h, w = self._index.file.tables[fmt.SFEAT.group].grids[row].tolist()
        feats = self._entry(fmt.SFEAT_FEATURES, row, key)[:, :h, :w]
        mask = self._entry(fmt.SFEAT_MASK, row, key)[:h, :w]
        target = device or "cpu"
        return torch.from_numpy(feats).to(target, torch.float32), torch.from_numpy(mask).to(target, torch.float32)

    def _parsed_config(self) -> PriorConfig:
        """:attr:`config`, parsed once per process (parsing costs about a millisecond per read)."""
        cached = self.__dict__.get("_config_cache")
        if cached is None:
            cached = self.__dict__["_config_cache"] = self.config
        return cached

    def _no_features(self, what: str) -> str:
        if not self.has_features:
            return (f"no {what} in {self.path}: this cache stores maps (store {self.store!r}), not features; "
                    "build one that serves any episode with `clipprior precompute ... --store features`")
        prov = self._index.file.attrs[fmt.ATTR_PROVENANCE]
        return (f"no {what} in {self.path}: the features cache covers the query list and the support lists "
                f"of {prov.get('dataset')} fold {prov.get('fold')} {prov.get('split')}; was the key given as "
                "written in those lists (see PriorCache.images), or was the file left out as broken?")

    def episode_priors(self, query: ImageRef, class_id: int, supports: Sequence[ImageRef], *,
                       size: Size = None, align_corners: bool = False,
                       device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """VTP and VVP of an episode, in the official channel order: vtp (1, h, w), vvp (2K, h, w).

        Served in every store mode:

        - ``features``: any supports, the VVP computed from the stored features with the engine's
          cosine-max on ``device`` (the CPU by default; pass the trainer's device to compute
          there); it equals the precomputed VVP up to the float16 storage of the features;
        - ``pool``: any K supports among :meth:`support_pool` (the stack of their one-shot VVPs);
        - ``maps``: the planned episodes (and any stack of planned one-shot episodes).

        Args:
            query: Query image, as in :meth:`image_key` (``episode.query`` as it is).
            class_id: Target class.
            supports: Support images in shot order, each as ``query`` (``episode.supports`` as they are).
            size: ``None``: each map on its own patch grid (the VTP and VVP grids differ in the
                official geometry); ``"original"``: the query's original size; ``(H, W)``: bilinear.
            align_corners: Passed to the bilinear resize (the official model's own resizes use True).
            device: Where to compute and return the maps.

        Returns:
            ``(vtp, vvp)``: (1, h, w) PIR-refined VTP and (2K, h, w) VVP, layer-major (every shot
            of the first VVP layer, then every shot of the next), float32.

        Raises:
            CacheKeyError: if the query's VTP, a feature entry or (without features) the episode is
                not cached; the message says what the cache holds and how to build one that serves
                the episode.

        Example:
            >>> vtp, vvp = cache.episode_priors(q, 3, [s1, s2], size=(60, 60))  # doctest: +SKIP
            >>> prior_channels(vtp, vvp).shape  # PI-CLIP's [VTP, VTP, VVP] prior channels  # doctest: +SKIP
            torch.Size([6, 60, 60])
        """
        keys = [_image_part(s) for s in supports]
        if not keys:
            raise InvalidInputError("an episode needs at least one support")
        vtp = self.vtp(query, class_id)[None].to(device or "cpu")
        if self.has_features:
            from clipprior.cache._features import vvp_from_stored

            qf = self.query_features(query, device=device)
            sf = [self.support_features(k, class_id, device=device) for k in keys]
            vvp = vvp_from_stored(qf, sf, self._parsed_config())
        else:
            vvp = self._planned_vvp(query, class_id, keys).to(device or "cpu")
        if size is not None:
            target = self.image_size(self.image_key(query)) if size == "original" else _check_size(size)
            vtp = resize_prior(vtp, target, align_corners=align_corners)
            vvp = resize_prior(vvp, target, align_corners=align_corners)
        return vtp, vvp

    def _planned_vvp(self, query: ImageRef, class_id: int, supports: Sequence[str]) -> torch.Tensor:
        """The planned episode's VVP, or the stack of its supports' planned one-shot VVPs (layer-major)."""
        try:
            return self.vvp(query=query, class_id=class_id, supports=supports)
        except CacheKeyError as err:
            if len(supports) == 1:  # the one-shot episode itself was just looked up
                raise self._not_served(err, query, class_id) from err
            try:
                single = [self.vvp(query=query, class_id=class_id, supports=[s]) for s in supports]
            except CacheKeyError:
                raise self._not_served(err, query, class_id) from err
        return torch.stack(single, dim=1).reshape(-1, *single[0].shape[-2:])  # (L, K, h, w): layer-major

    def _not_served(self, err: CacheKeyError, query: ImageRef, class_id: int) -> CacheKeyError:
        if self.has_pool:
            pool = self.support_pool(query, class_id)
            return CacheKeyError(f"{err.args[0]}. This pool cache holds {len(pool)} support(s) for this query and "
                                 f"class: {pool[:5]}{' ...' if len(pool) > 5 else ''}; draw the supports among "
                                 "PriorCache.support_pool(query, class_id) (clipprior.EpisodeSampler does), or build "
                                 "a cache that serves any episode with `clipprior precompute ... --store features`")
        return CacheKeyError(f"{err.args[0]}. This cache (store {self.store!r}) serves its planned episodes only; to "
                             "serve the episodes a trainer draws, build it with `clipprior precompute ... --store "
                             "features` (any episode) or `--supports-per-query M` (a pool per query and class)")

    def _sized(self, x: torch.Tensor, size: Size, image_key: str | None, align_corners: bool = False) -> torch.Tensor:
        if size is None:
            return x
        if isinstance(size, str):
            if size != "original":
                raise InvalidInputError(f"size={size!r}: use None, 'original' or (height, width)")
            if image_key is None:
                raise CacheError(f"{self.path}: this entry's image is unknown, so 'original' has no size")
            return resize_prior(x, self.image_size(image_key), align_corners=align_corners)
        return resize_prior(x, size, align_corners=align_corners)

    def _class_id(self, class_id: Any) -> int:
        """``class_id`` as an int, or an error that says how to get one from a class name."""
        if not isinstance(class_id, bool):
            with contextlib.suppress(TypeError):
                return operator.index(class_id)  # int, numpy integer, integer 0-d tensor
        dataset = self._index.file.attrs[fmt.ATTR_PROVENANCE].get("dataset", "DATASET")
        hint = ""
        if isinstance(class_id, str):
            hint = (f"; to look a class up by name: `clipprior.data.class_names({dataset!r}).index({class_id!r}) + 1` "
                    "(ids are 1-based, in the dataset's class order)")
        raise InvalidInputError(f"class_id must be the dataset's integer class id (e.g. 1..20 for PASCAL), "
                                f"got {class_id!r} ({type(class_id).__name__}){hint}")

    def _episode_range(self) -> str:
        episodes = self._index.episodes
        if not episodes:
            return "it has no episodes"
        return f"{len(episodes)} episodes, indices {episodes[0].index}..{episodes[-1].index}"

    def _unknown_image(self, image_key: str, tried: str = "") -> str:
        keys = self._index.file.image_keys
        base = os.path.basename(str(image_key))
        close = [k for k in keys if os.path.basename(k) == base][:3]
        if not close and len(keys) <= 20000:
            close = difflib.get_close_matches(str(image_key), keys, n=3)
        hint = f"; did you mean {close}?" if close else ""
        mapped = f" (tried: {tried})" if tried else ""
        return (f"image {image_key!r} is not in {self.path} ({len(keys)} images){mapped}{hint} "
                f"Run `clipprior inspect {self.path}` to see what is cached")
