"""Stage 1, plan: the unique passes behind the episodes, the chunks of a run and their batches.

Everything a run will compute is fixed here, before any pixel is read: which query images and
(support image, class) pairs run through CLIP, how they are cut into chunks (the unit of
resumption) and into batches. A resumed run plans exactly the same batches, which is what makes
it bit-for-bit equal to an uninterrupted one.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from clipprior.data.episodes import Episode
from clipprior.data.report import DataReport
from clipprior.errors import InvalidInputError

__all__ = [
    "ChunkSchedule",
    "PrecomputeStats",
    "QueryWork",
    "Schedule",
    "SupportKey",
    "WorkPlan",
    "episode_records",
    "plan_chunks",
    "plan_schedule",
    "plan_work",
    "resized_size",
    "size_batches",
    "support_homes",
]

SupportKey = tuple[str, str, int]  # (support image, support label, class id)


class Dataset(Protocol):
    """What the engine needs of a dataset (see :class:`clipprior.data.FSSDataset`).

    An ``image_size(path) -> (height, width)`` method, where present, lets the batches be planned
    from the image headers instead of decoding every image twice.
    """

    def load_image(self, path: str) -> np.ndarray: ...

    def load_label(self, path: str) -> np.ndarray: ...


class Writer(Protocol):
    """What the engine needs of a cache writer (see :class:`clipprior.cache.CacheWriter`)."""

    def has_vtp(self, image_key: str, class_id: int) -> bool: ...

    def has_vvp(self, episode_index: int) -> bool: ...

    def has_image(self, image_key: str) -> bool: ...

    def add_image(self, image_key: str, height: int, width: int) -> None: ...

    def add_vtp(self, image_key: str, class_id: int, cam: Any, refined: Any) -> None: ...

    def add_vvp(self, episode_index: int, vvp: Any) -> None: ...

    def set_episodes(self, episodes: Iterable[Any]) -> None: ...

    def commit(self) -> int: ...


@dataclass
class QueryWork:
    """What one unique query image needs.

    Attributes:
        image: Image id.
        label: Label id.
        classes: Classes whose VTP is needed.
        episodes: Indices of the episodes whose query this is.
    """

    image: str
    label: str
    classes: set[int] = field(default_factory=set)
    episodes: list[int] = field(default_factory=list)


@dataclass
class WorkPlan:
    """The unique passes behind a list of episodes (optionally one shard of them).

    Attributes:
        queries: Unique query images, in first-appearance order.
        support_uses: How many episodes of this plan use each (support image, label, class).
    """

    queries: list[QueryWork]
    support_uses: dict[SupportKey, int]

    @property
    def n_pairs(self) -> int:
        """Number of (image, class) VTP pairs."""
        return sum(len(q.classes) for q in self.queries)


@dataclass
class PrecomputeStats:
    """What a run did (passes are counted per image, not per batch).

    Attributes:
        query_passes: Query images run through CLIP.
        support_passes: Masked support passes run.
        vtp_written: VTP entries written.
        vvp_written: VVP entries written.
        skipped_vtp: VTP entries already in the cache (resume).
        skipped_vvp: VVP entries already in the cache (resume).
        features_written: Query and support feature entries written (``--store features``).
        dropped: Episodes dropped because a file they need is broken (``on_error="skip"``), ascending.
        problems: The broken files met, one problem each, naming the episodes they took down.
    """

    query_passes: int = 0
    support_passes: int = 0
    vtp_written: int = 0
    vvp_written: int = 0
    skipped_vtp: int = 0
    skipped_vvp: int = 0
    features_written: int = 0
    dropped: list[int] = field(default_factory=list)
    problems: DataReport = field(default_factory=DataReport)


def episode_records(episodes: Sequence[Any]) -> list[Episode]:
    """The episodes of the cache's episode table: numbered in order (``index`` = position).

    Args:
        episodes: :class:`~clipprior.data.Episode` s, or objects with its fields (``query_image``,
            ``query_label``, ``class_id``, ``supports`` as (image, label) pairs).

    Example:
        >>> from clipprior.data import Episode
        >>> episode_records([Episode("q.jpg", "q.png", 3, (("s.jpg", "s.png"),))])[0].index
        0
    """
    return [e.numbered(i) if isinstance(e, Episode) else
            Episode(e.query_image, e.query_label, int(e.class_id), tuple((str(a), str(b)) for a, b in e.supports), i)
            for i, e in enumerate(episodes)]


def plan_work(episodes: Sequence[Any], shard: tuple[int, int] | None = None) -> WorkPlan:
    """Group episodes by unique query image; with ``shard=(i, n)`` keep every n-th query image from i.

    Args:
        episodes: Objects with ``query_image``, ``query_label``, ``class_id`` and ``supports``.
        shard: ``(index, count)``; the queries are dealt round-robin in first-appearance order, so
            the shards are disjoint, cover everything and have balanced sizes.

    Returns:
        The :class:`WorkPlan`.

    Raises:
        InvalidInputError: for an invalid shard.

    Example:
        >>> from types import SimpleNamespace as E
        >>> plan = plan_work([E(query_image="a", query_label="a.png", class_id=1, supports=())] * 2)
        >>> len(plan.queries), plan.queries[0].episodes
        (1, [0, 1])
    """
    if shard is not None:
        index, count = shard
        if not (count >= 1 and 0 <= index < count):
            raise InvalidInputError(f"shard {index}/{count} is not valid; use i/n with 0 <= i < n")
    by_image: dict[str, QueryWork] = {}
    for i, episode in enumerate(episodes):
        work = by_image.setdefault(episode.query_image, QueryWork(episode.query_image, episode.query_label))
        work.classes.add(int(episode.class_id))
        work.episodes.append(i)
    queries = list(by_image.values())
    if shard is not None:
        queries = queries[shard[0]::shard[1]]
    uses: dict[SupportKey, int] = defaultdict(int)
    for work in queries:
        for i in work.episodes:
            episode = episodes[i]
            for image, label in episode.supports:
                uses[(image, label, int(episode.class_id))] += 1
    return WorkPlan(queries=queries, support_uses=dict(uses))


def plan_chunks(queries: Sequence[QueryWork], chunk_images: int, chunk_episodes: int) -> list[list[QueryWork]]:
    """Cut the planned query images, in order, into the chunks of a run.

    A chunk takes images until it holds ``chunk_images`` of them or their episodes reach
    ``chunk_episodes``; an image is never split, so one image with more episodes than that is a
    chunk on its own.

    Args:
        queries: :attr:`WorkPlan.queries`, in first-appearance order.
        chunk_images: Most images per chunk (>= 1).
        chunk_episodes: Episode count that closes a chunk (>= 1).

    Returns:
        The chunks; concatenated, they are ``queries``.

    Raises:
        InvalidInputError: if either limit is below 1.

    Example:
        >>> [len(c) for c in plan_chunks(plan_work(episodes).queries, 64, 256)]  # doctest: +SKIP
        [64, 64, 31]
    """
    if chunk_images < 1 or chunk_episodes < 1:
        raise InvalidInputError(f"chunk_images={chunk_images} and chunk_episodes={chunk_episodes} must be >= 1")
    chunks: list[list[QueryWork]] = []
    current: list[QueryWork] = []
    count = 0
    for work in queries:
        current.append(work)
        count += len(work.episodes)
        if len(current) >= chunk_images or count >= chunk_episodes:
            chunks.append(current)
            current, count = [], 0
    if current:
        chunks.append(current)
    return chunks


def support_homes(episodes: Sequence[Any], chunks: Sequence[Sequence[QueryWork]]
                  ) -> tuple[list[list[SupportKey]], dict[SupportKey, int]]:
    """Each (support, class) belongs to the chunk of its first use; its support batches run with that chunk's.

    Returns:
        Per chunk, the keys whose first use it holds (in first-use order), and each key's chunk.
    """
    home_keys: list[list[SupportKey]] = []
    home: dict[SupportKey, int] = {}
    for c, chunk in enumerate(chunks):
        keys = []
        for i in (i for q in chunk for i in q.episodes):
            for image, label in episodes[i].supports:
                key = (image, label, int(episodes[i].class_id))
                if key not in home:
                    home[key] = c
                    keys.append(key)
        home_keys.append(keys)
    return home_keys, home


def resized_size(dataset: Dataset, path: str, patch: int) -> tuple[int, int]:
    """The size an image is resized up to (a multiple of ``patch``), as the batches are planned on.

    Read from the image header where the dataset can (``image_size``), else from the decoded image.
    """
    header = getattr(dataset, "image_size", None)
    height, width = header(path) if header is not None else dataset.load_image(path).shape[:2]
    return patch * math.ceil(int(height) / patch), patch * math.ceil(int(width) / patch)


def size_batches(items: Sequence[Any], size_of: Callable[[Any], tuple[int, int]],
                 batch_size: int | Callable[[tuple[int, int]], int]) -> Iterable[list[Any]]:
    """Consecutive groups of at most ``batch_size`` items of equal size, in a stable order.

    ``batch_size`` is a number, or a function of the (resized) size giving the number for that size.
    """
    groups: dict[tuple[int, int], list[Any]] = defaultdict(list)
    for item in items:
        groups[size_of(item)].append(item)
    for size in sorted(groups):
        group = groups[size]
        step = max(1, int(batch_size(size) if callable(batch_size) else batch_size))
        for start in range(0, len(group), step):
            yield group[start:start + step]


BatchSize = Callable[[tuple[int, int]], int]  # resized (height, width) -> images per batch


@dataclass
class ChunkSchedule:
    """Everything one chunk of a run computes, fixed before the run starts.

    Attributes:
        index: The chunk's position in the run.
        episodes: Indices of all its episodes.
        todo: Indices of its episodes whose VVP is not cached yet.
        images: Number of query images in the chunk.
        query_batches: The planned query batches that hold missing work (each runs whole).
        skipped_images: Query images of the chunk in batches that need not run.
        needs_features: Query images whose VVP features a pending episode needs.
        support_batches: The planned support batches this chunk runs (those of the chunks whose
            supports a pending episode of this chunk needs first), each with its wanted keys.
    """

    index: int
    episodes: list[int]
    todo: list[int]
    images: int
    query_batches: list[list[QueryWork]] = field(default_factory=list)
    skipped_images: int = 0
    needs_features: set[str] = field(default_factory=set)
    support_batches: list[tuple[list[SupportKey], set[SupportKey]]] = field(default_factory=list)

    @property
    def runs(self) -> bool:
        """Whether the chunk has anything to compute."""
        return bool(self.query_batches or self.todo)


@dataclass
class Schedule:
    """The whole run: chunks in order, and the support uses the pending episodes make."""

    chunks: list[ChunkSchedule]
    support_uses: dict[SupportKey, int]


def plan_schedule(
    episodes: Sequence[Any], plan: WorkPlan, sizes: dict[str, tuple[int, int]], batch_size: BatchSize,
    writer: Writer, *, chunk_images: int, chunk_episodes: int, support_window: int = 1,
) -> Schedule:
    """Fix every batch of a run from the plan, the resized sizes and what the cache already holds.

    The query images are ordered by resized size (stably, so first appearance within a size), so
    that the chunks hold images of few sizes and the batches are full; each chunk's images run in
    batches of equal size; each (support, class) belongs to the chunk of its first use and runs in
    that chunk's support batches, at the first chunk with a pending episode that needs it. The
    batches depend only on the episodes, the sizes and ``batch_size``: a resumed run plans the same
    batches and recomputes the ones holding missing work whole, so it writes the same numbers.

    ``support_window`` W > 1 groups the supports first used in W consecutive chunks (chunks
    ``[wW, (w+1)W)``) into the support batches of the window's first chunk that needs one of them:
    on a mix of many image sizes (COCO) a chunk's own supports make small batches, a window fills
    them, at the price of holding their features until their last use (at most W chunks' worth of
    new supports more).

    Args:
        episodes: All episodes.
        plan: :func:`plan_work` of them (one shard, possibly).
        sizes: Resized (height, width) of every query and support image.
        batch_size: Images per batch for a resized size.
        writer: The cache (read only here: what is cached already).
        chunk_images: See :func:`plan_chunks`.
        chunk_episodes: See :func:`plan_chunks`.
        support_window: Chunks whose first-used supports run together (>= 1).

    Returns:
        The :class:`Schedule`.

    Raises:
        InvalidInputError: for a ``support_window`` below 1.

    Example:
        >>> schedule = plan_schedule(episodes, plan_work(episodes), sizes, lambda s: 8, writer,
        ...                          chunk_images=64, chunk_episodes=256)  # doctest: +SKIP
    """
    if isinstance(support_window, bool) or not isinstance(support_window, int) or support_window < 1:
        raise InvalidInputError(f"support_window={support_window!r} must be an integer >= 1")
    ordered = sorted(plan.queries, key=lambda q: sizes[q.image])
    chunks = plan_chunks(ordered, chunk_images, chunk_episodes)
    home_keys, home = support_homes(episodes, chunks)
    todo_all = [episodes[i] for q in plan.queries for i in q.episodes if not writer.has_vvp(i)]
    uses = plan_work(todo_all).support_uses
    windows_run: set[int] = set()
    out = []
    for c, chunk in enumerate(chunks):
        chunk_eps = [i for q in chunk for i in q.episodes]
        todo = [i for i in chunk_eps if not writer.has_vvp(i)]
        step = ChunkSchedule(c, chunk_eps, todo, len(chunk))
        step.needs_features = {episodes[i].query_image for i in todo}
        for batch in size_batches(chunk, lambda q: sizes[q.image], batch_size):
            missing = any(not writer.has_vtp(q.image, k) for q in batch for k in q.classes)
            if missing or any(q.image in step.needs_features for q in batch):
                step.query_batches.append(batch)
            else:
                step.skipped_images += len(batch)
        if not step.runs:
            step.skipped_images = len(chunk)
        needed = {(image, label, int(episodes[i].class_id)) for i in todo for image, label in episodes[i].supports}
        for w in sorted({home[k] // support_window for k in needed} - windows_run):
            windows_run.add(w)
            keys = [k for h in range(w * support_window, min((w + 1) * support_window, len(chunks)))
                    for k in home_keys[h]]
            for batch in size_batches(keys, lambda k: sizes[k[0]], batch_size):
                wanted = {k for k in batch if uses.get(k, 0) > 0}
                if wanted:
                    step.support_batches.append((batch, wanted))
        out.append(step)
    return Schedule(out, uses)
