"""One fold's cache end to end: choose the episodes, record the provenance, run the stages, finalize.

What ``clipprior precompute`` does, as two library calls (the command only parses its options,
loads CLIP and prints):

1. :func:`fold_episodes`: the episodes of a run: read from an episode file, a pool of supports
   per query and class (``supports_per_query``), or sampled with the trainers' protocol;
2. :func:`precompute_fold`: the provenance (with the data root the cache was computed from, so
   that ``clipprior evaluate`` and ``show`` find the images again), the
   :class:`~clipprior.cache.CacheWriter`'s lifecycle, the feature stage
   (:func:`~clipprior.precompute.store_features`, ``store="features"``) and the engine
   (:func:`~clipprior.precompute.run_precompute`).

Example:
    >>> dataset = open_dataset("pascal5i", "~/data/VOC2012", 0)  # doctest: +SKIP
    >>> chosen = fold_episodes(dataset, n_episodes=1000, seed=321)  # doctest: +SKIP
    >>> result = precompute_fold(clip, dataset, chosen, "priors.h5")  # doctest: +SKIP
    >>> result.stats.vvp_written  # doctest: +SKIP
    1000
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipprior.cache import POOL_STORE, STORE_CHOICES, CacheWriter
from clipprior.config import PriorConfig
from clipprior.data import (
    Episode,
    FSSDataset,
    default_episodes,
    pool_episodes,
    prompt_names,
    read_episodes,
    sample_episodes,
)
from clipprior.errors import InvalidInputError
from clipprior.model import ClipBundle
from clipprior.precompute.engine import run_precompute
from clipprior.precompute.features import store_features
from clipprior.precompute.plan import PrecomputeStats, episode_records, plan_work
from clipprior.precompute.provenance import build_provenance

__all__ = [
    "PLAN_KINDS",
    "STORE_CHOICES",
    "FoldEpisodes",
    "FoldPrecompute",
    "check_episode_sources",
    "fold_episodes",
    "precompute_fold",
]

PLAN_KINDS: tuple[str, ...] = ("query", "support", "episode", "query_features", "support_features")
"""The ``kind`` of :func:`precompute_fold`'s ``on_plan`` and ``progress`` callbacks, in the order they start."""


@dataclass(frozen=True)
class FoldEpisodes:
    """The episodes a fold's cache is computed for, and what they fix in its provenance.

    Attributes:
        episodes: The episodes, in cache order.
        shot: Supports per episode (1 for a pool: its entries are one-shot).
        seed: The sampler seed (an episode file's recorded seed).
        supports_per_query: The pool size M of a pool cache; ``None`` otherwise.
    """

    episodes: list[Episode]
    shot: int
    seed: int
    supports_per_query: int | None = None

    @property
    def pool(self) -> bool:
        """Whether these are a pool of one-shot supports per query and class (``supports_per_query``)."""
        return self.supports_per_query is not None


@dataclass(frozen=True)
class FoldPrecompute:
    """What :func:`precompute_fold` did.

    Attributes:
        path: The finalized cache file.
        stats: The engine's counts (:func:`~clipprior.precompute.run_precompute`).
        feature_stats: The feature stage's counts (``store="features"``); ``None`` otherwise.
        provenance: What the cache records about the computation.
    """

    path: Path
    stats: PrecomputeStats
    feature_stats: PrecomputeStats | None
    provenance: dict[str, Any]


def _argument(name: str, value: object = None) -> str:
    """How the library names an argument in messages: ``n_episodes``, ``shot=3``."""
    return name if value is None else f"{name}={value!r}"


def check_episode_sources(supports_per_query: int | None, *, shot: int = 1, store: str = "maps",
                          n_episodes: int | None = None, episode_file: object = None,
                          spell: Callable[..., str] = _argument) -> None:
    """Refuse what a support pool cannot be combined with.

    The one check of :func:`fold_episodes`, :func:`precompute_fold` and ``clipprior precompute``
    (which runs it before opening the data, as a usage error).

    Args:
        supports_per_query: The pool size M (``None``: no pool, nothing to check).
        shot: Supports per episode the pool must serve (at most M).
        store: The requested store (a pool is a maps store of its own).
        n_episodes: A requested episode count (a pool plans its own episodes).
        episode_file: A requested episode file (likewise).
        spell: ``spell(name)`` / ``spell(name, value)``: how the caller names an argument in the
            message (the CLI names its options: ``--shot 5``).

    Raises:
        InvalidInputError: for a pool with another store, an episode count or file, or ``shot > M``.

    Example:
        >>> check_episode_sources(2, shot=3)
        Traceback (most recent call last):
        ...
        clipprior.errors.InvalidInputError: shot=3 needs at least 3 supports per query: use supports_per_query=3 or more
    """
    if supports_per_query is None:
        return
    for given, name in ((store != "maps", spell("store", store)), (n_episodes is not None, spell("n_episodes")),
                        (episode_file is not None, spell("episode_file"))):
        if given:
            raise InvalidInputError(f"{spell('supports_per_query')} plans its own episodes (a pool per query and "
                                    f"class); it cannot be combined with {name}")
    if shot > supports_per_query:
        raise InvalidInputError(f"{spell('shot', shot)} needs at least {shot} supports per query: "
                                f"use {spell('supports_per_query', shot)} or more")


def fold_episodes(dataset: FSSDataset, *, shot: int = 1, seed: int = 0, n_episodes: int | None = None,
                  episode_file: str | os.PathLike[str] | None = None,
                  supports_per_query: int | None = None) -> FoldEpisodes:
    """The episodes of a fold's cache: from an episode file, a support pool, or sampled.

    Args:
        dataset: The fold (:func:`clipprior.data.open_dataset`).
        shot: Supports per episode (an episode file's own shot wins).
        seed: Sampler seed (an episode file's recorded seed wins).
        n_episodes: How many episodes to sample [default: the dataset's PI-CLIP count,
            :func:`clipprior.data.default_episodes`]; ignored with ``episode_file``.
        episode_file: Use exactly these episodes (:func:`clipprior.data.write_episodes`); they
            must have been sampled from ``dataset``'s lists.
        supports_per_query: A pool cache for training: ``supports_per_query`` one-shot supports for
            every (query, class) of the lists (:func:`clipprior.data.pool_episodes`); any ``shot``
            of them make an episode the cache serves.

    Returns:
        :class:`FoldEpisodes`.

    Raises:
        InvalidInputError: ``supports_per_query`` with ``n_episodes`` or ``episode_file`` (a pool
            plans its own episodes), or fewer ``supports_per_query`` than ``shot``.
        DatasetError: the episode file was not sampled from this dataset's lists.

    Example:
        >>> chosen = fold_episodes(dataset, n_episodes=8, shot=1, seed=321)  # doctest: +SKIP
        >>> len(chosen.episodes), chosen.pool  # doctest: +SKIP
        (8, False)
    """
    check_episode_sources(supports_per_query, shot=shot, n_episodes=n_episodes, episode_file=episode_file)
    if episode_file is not None:
        episodes, meta = read_episodes(episode_file)
        meta.check_dataset(dataset)
        return FoldEpisodes(episodes, episodes[0].shot if episodes else shot, int(meta.seed))
    if supports_per_query is not None:
        # one-shot entries: any K <= M of a pool make an episode
        return FoldEpisodes(pool_episodes(dataset, supports_per_query, seed=seed), 1, seed, supports_per_query)
    count = n_episodes or default_episodes(dataset.name)
    return FoldEpisodes(sample_episodes(dataset, count, shot=shot, seed=seed), shot, seed)


def precompute_fold(
    clip: ClipBundle,
    dataset: FSSDataset,
    chosen: FoldEpisodes,
    out: str | os.PathLike[str],
    *,
    config: PriorConfig | None = None,
    store: str = "maps",
    class_names: Sequence[str] | None = None,
    batch_size: int | str = "auto",
    workers: int | None = None,
    shard: tuple[int, int] | None = None,
    chunk_images: int = 64,
    chunk_episodes: int = 256,
    support_window: int = 1,
    on_error: str = "raise",
    on_plan: Callable[[str, int], None] | None = None,
    progress: Callable[[str, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> FoldPrecompute:
    """Compute a fold's priors into a cache file: provenance, writer, feature stage, engine, finalize.

    The provenance (:func:`~clipprior.precompute.build_provenance`) records the episodes, the
    computation and the dataset's ``coco_split`` and ``data_root`` (the resolved
    :attr:`~clipprior.data.FSSDataset.root`: ``clipprior evaluate`` and ``show`` read the images
    from there when no data root is given); ``store`` and ``supports_per_query`` when not plain
    maps. Rerunning the same call on an existing file resumes it (a different computation is
    refused, see :class:`~clipprior.cache.CacheWriter`). Under ``on_error="raise"`` the episode
    table is registered up front; under ``"skip"`` the engine registers what it completes, so
    dropped episodes stay out of it.

    Args:
        clip: The loaded CLIP (its device and dtype are the run's).
        dataset: The fold (:func:`clipprior.data.open_dataset`).
        chosen: The episodes (:func:`fold_episodes`).
        out: The cache file (created, or resumed).
        config: Knobs; defaults to :class:`~clipprior.PriorConfig`.
        store: ``"maps"`` (the planned episodes' priors) or ``"features"`` (also every query's and
            (support, class)'s VVP features, so the cache serves any episode); a pool's is always
            ``"pool"``.
        class_names: Prompt name of class id c at index c - 1 [default: the dataset's,
            :func:`clipprior.data.prompt_names`].
        batch_size: Images per CLIP batch, or ``"auto"`` (see :func:`~clipprior.precompute.run_precompute`).
        workers: Load worker threads [default: :func:`~clipprior.precompute.load.default_workers`].
        shard: ``(index, count)``: compute one shard (merge the shards with
            :func:`clipprior.cache.merge_caches`).
        chunk_images: Query images per chunk (bounds memory; the unit of resumption).
        chunk_episodes: A chunk is closed once its images hold this many episodes.
        support_window: Chunks whose supports run together.
        on_error: ``"raise"`` at the first broken file, or ``"skip"``: drop what needs it and report
            it in the returned stats' ``problems``.
        on_plan: Called as ``on_plan(kind, total)`` once a stage knows its work, ``kind`` one of
            :data:`PLAN_KINDS` (``"query_features"`` and ``"support_features"`` only with
            ``store="features"``, whose stage runs first).
        progress: Called as ``progress(kind, n)`` as work completes, same kinds.
        log: Called with a line for events worth telling (a halved batch).

    Returns:
        :class:`FoldPrecompute`: the path, the engine's and the feature stage's counts, the provenance.

    Raises:
        InvalidInputError: an unknown ``store``, ``store="features"`` for a pool, or a setting the
            engine refuses (see :func:`~clipprior.precompute.run_precompute`).
        CacheMismatchError: ``out`` holds another computation.
        DatasetError: a broken image or mask under ``on_error="raise"``.

    Example:
        >>> chosen = fold_episodes(dataset, n_episodes=24, seed=0)  # doctest: +SKIP
        >>> result = precompute_fold(clip, dataset, chosen, "p.h5", batch_size=4)  # doctest: +SKIP
        >>> result.provenance["data_root"] == str(dataset.root)  # doctest: +SKIP
        True
    """
    if store not in STORE_CHOICES:
        raise InvalidInputError(f"store={store!r} is not one of {', '.join(STORE_CHOICES)}")
    check_episode_sources(chosen.supports_per_query, store=store)
    config = config or PriorConfig()
    recorded_store = POOL_STORE if chosen.pool else store
    names = list(class_names) if class_names is not None else prompt_names(dataset.name)
    episodes = chosen.episodes
    plan_total = on_plan or (lambda kind, total: None)
    report = progress or (lambda kind, n: None)
    extra: dict[str, Any] = {"coco_split": dataset.coco_split, "data_root": str(Path(dataset.root).resolve())}
    if recorded_store != "maps":
        extra["store"] = recorded_store
    if chosen.supports_per_query is not None:
        extra["supports_per_query"] = chosen.supports_per_query
    provenance = build_provenance(
        clip, config, dataset=dataset.name, fold=dataset.fold, split=dataset.split,
        shot=chosen.shot, seed=chosen.seed, n_episodes=len(episodes), list_checksum=dataset.list_checksum,
        class_names=names, batch_size=batch_size, chunk_images=chunk_images, chunk_episodes=chunk_episodes,
        support_window=support_window, extra=extra,
    )
    feature_stats = None
    with CacheWriter(out, provenance, shard=shard) as writer:
        if on_error == "raise":  # under skip the engine registers what it computes: dropped episodes stay out
            writer.set_episodes(episode_records(episodes))
        plan = plan_work(episodes, shard)
        plan_total("query", len(plan.queries))
        plan_total("support", len(plan.support_uses))
        plan_total("episode", sum(len(q.episodes) for q in plan.queries))
        if store == "features":  # first: the VTP of every query of the lists comes from the same batches
            feature_stats = store_features(
                clip, dataset, writer, class_names=names, config=config, batch_size=batch_size, workers=workers,
                shard=shard, chunk_images=chunk_images, on_error=on_error, log=log,
                on_plan=lambda kind, total: plan_total(f"{kind}_features", total),
                progress=lambda kind, n: report(f"{kind}_features", n))
        stats = run_precompute(clip, dataset, episodes, writer, class_names=names, config=config,
                               batch_size=batch_size, workers=workers, shard=shard, chunk_images=chunk_images,
                               chunk_episodes=chunk_episodes, on_error=on_error, support_window=support_window,
                               progress=report, log=log)
        path = writer.finalize()
    return FoldPrecompute(path, stats, feature_stats, provenance)
