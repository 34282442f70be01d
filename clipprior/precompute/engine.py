"""The engine: plan -> load -> passes -> post -> write, chunk by chunk.

:func:`run_precompute` is the one public entry point; each stage lives in its own module
(:mod:`~clipprior.precompute.plan`, :mod:`~clipprior.precompute.load`,
:mod:`~clipprior.precompute.passes`, :mod:`~clipprior.precompute.post`,
:mod:`~clipprior.precompute.write`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from clipprior._memory import release_freed_memory
from clipprior.config import PriorConfig
from clipprior.errors import DatasetError, InvalidInputError
from clipprior.model import ClipBundle
from clipprior.precompute.load import LoadFaults, fss_mask, load_query_batch, load_support_batch
from clipprior.precompute.passes import query_features, query_pass, support_pass
from clipprior.precompute.plan import (
    Dataset,
    PrecomputeStats,
    QueryWork,
    SupportKey,
    Writer,
    episode_records,
    plan_chunks,
    plan_work,
    resized_size,
    size_batches,
    support_homes,
)
from clipprior.precompute.post import QueryFeatures, SupportStore, episode_vvp, refine
from clipprior.precompute.provenance import check_recorded_settings
from clipprior.precompute.write import write_vtp
from clipprior.priors import EpisodePriors, SupportCells, TextFeatures, compute_priors, encode_text

__all__ = ["ProgressFn", "recompute_episode", "run_precompute"]

ProgressFn = Callable[[str, int], None]


def run_precompute(
    clip: ClipBundle,
    dataset: Dataset,
    episodes: Sequence[Any],
    writer: Writer,
    *,
    class_names: Sequence[str],
    config: PriorConfig | None = None,
    batch_size: int = 8,
    shard: tuple[int, int] | None = None,
    chunk_images: int = 64,
    chunk_episodes: int = 256,
    progress: ProgressFn | None = None,
    text: TextFeatures | None = None,
    on_error: str = "raise",
) -> PrecomputeStats:
    """Compute and write every VTP (raw and refined) and VVP the episodes need.

    The plan fixes every batch: query images are cut into chunks in first-appearance order (see
    :func:`~clipprior.precompute.plan_chunks`), and within a chunk, images of equal (resized) size
    run in batches of ``batch_size``; each (support, class) belongs to the chunk of its first use
    and runs in that chunk's support batches. A rerun skips the chunks whose entries are all cached
    and recomputes the others batch by batch, exactly as an uninterrupted run would, writing only
    what is missing: a resumed cache is bit-for-bit the cache of an uninterrupted run.

    Args:
        clip: The loaded CLIP.
        dataset: Loads images and labels by id.
        episodes: The episodes (see :func:`clipprior.data.sample_episodes`).
        writer: Where the priors go (a :class:`clipprior.cache.CacheWriter`).
        class_names: Prompt name of class id c at index c - 1.
        config: Knobs; defaults to :class:`PriorConfig`.
        batch_size: Images per CLIP batch.
        shard: ``(index, count)`` to compute one shard of the query images.
        chunk_images: Most query images per chunk (bounds memory; the unit of resumption).
        chunk_episodes: A chunk is closed once its images hold this many episodes, so that its
            VVP work and buffers stay bounded when there are many episodes per image.
        progress: Called as ``progress(kind, n)`` with kind ``"query"``, ``"support"`` or ``"episode"``.
        text: Precomputed text features of ``class_names`` (encoded here when ``None``).
        on_error: ``"raise"`` at the first broken image or mask, naming it, the episodes that need it
            and the fix; or ``"skip"``: every episode that needs a broken file is dropped (listed in
            ``stats.dropped``, the files in ``stats.problems``) and everything else computed. The
            engine registers each episode it completes in the writer's episode table, so dropped
            episodes stay out of it (do not register all episodes beforehand under ``"skip"``).

    Returns:
        :class:`~clipprior.precompute.PrecomputeStats`.

    Raises:
        InvalidInputError: for a batch size below 1, a class id without a name, or a writer whose
            provenance records another dtype, device, batch or chunk size (see
            :func:`~clipprior.precompute.provenance.build_provenance`).
        DatasetError: for a broken image or mask (``on_error="raise"``): unreadable, a mask of
            another size than its image, an image smaller than a patch, a support mask without its
            class; the message names the file, the episodes that need it and the fix.

    Example:
        >>> stats = run_precompute(clip, dataset, episodes, writer, class_names=names)  # doctest: +SKIP
        >>> stats.query_passes  # doctest: +SKIP
        364
    """
    config = config or PriorConfig()
    if min(batch_size, chunk_images, chunk_episodes) < 1:
        raise InvalidInputError(f"batch_size={batch_size}, chunk_images={chunk_images} and "
                                f"chunk_episodes={chunk_episodes} must all be >= 1")
    class_names = list(class_names)
    for episode in episodes:
        if not 1 <= int(episode.class_id) <= len(class_names):
            raise InvalidInputError(f"episode class {episode.class_id} has no prompt name (have {len(class_names)})")
    check_recorded_settings(writer, clip, batch_size=batch_size, chunk_images=chunk_images,
                            chunk_episodes=chunk_episodes)
    text = text or encode_text(clip, class_names, config)
    plan = plan_work(episodes, shard)
    faults = LoadFaults(on_error, episodes, dataset, only=[i for q in plan.queries for i in q.episodes])
    records = episode_records(episodes)
    chunks = plan_chunks(plan.queries, chunk_images, chunk_episodes)
    home_keys, home = support_homes(episodes, chunks)
    todo = [episodes[i] for q in plan.queries for i in q.episodes if not writer.has_vvp(i)]
    store = SupportStore(plan_work(todo).support_uses)
    stats = PrecomputeStats()
    report = progress or (lambda kind, n: None)
    for chunk in chunks:
        chunk_eps = [i for q in chunk for i in q.episodes]
        todo_eps = [i for i in chunk_eps if not writer.has_vvp(i)]
        needs_features = {episodes[i].query_image for i in todo_eps}
        missing_vtp = any(not writer.has_vtp(q.image, k) for q in chunk for k in q.classes)
        if todo_eps or missing_vtp:
            features = _run_queries(clip, dataset, chunk, needs_features, writer, text, class_names, config,
                                    batch_size, stats, report, faults)
            needed = [(image, label, int(episodes[i].class_id)) for i in todo_eps if i not in faults.dropped
                      for image, label in episodes[i].supports]
            for h in sorted({home[k] for k in needed if k not in store.features}):
                _run_supports(clip, dataset, home_keys[h], store, config, batch_size, stats, report, faults)
            done = [i for i in todo_eps if i not in faults.dropped]
            for i in sorted(set(todo_eps) - set(done)):
                _release(store, episodes[i])
            writer.set_episodes([records[i] for i in done])  # dropped episodes stay out of the table
            for i in done:
                vvp = episode_vvp(episodes[i], features, store, config)
                writer.add_vvp(i, vvp.cpu().numpy().astype(np.float32))
                stats.vvp_written += 1
            writer.commit()
            del features
            release_freed_memory()  # keep the resident set flat across chunks (see clipprior/_memory.py)
        else:
            report("query", len(chunk))
        stats.skipped_vvp += len(chunk_eps) - len(todo_eps)
        report("episode", len(chunk_eps))
    stats.dropped = sorted(faults.dropped)
    stats.problems = faults.report
    return stats


def _release(store: SupportStore, episode: Any) -> None:
    """A dropped episode gives back its uses of the support features (freed once nothing needs them)."""
    for image, label in episode.supports:
        key = (image, label, int(episode.class_id))
        if key in store.features:
            store.take(key)
        elif key in store.remaining:
            store.remaining[key] -= 1


def _run_queries(
    clip: ClipBundle, dataset: Dataset, chunk: list[QueryWork], needs_features: set[str], writer: Writer,
    text: TextFeatures, class_names: Sequence[str], config: PriorConfig, batch_size: int, stats: PrecomputeStats,
    report: ProgressFn, faults: LoadFaults,
) -> dict[str, QueryFeatures]:
    """Run the planned query batches of a chunk that hold missing work; write the missing VTP.

    Every batch runs whole, with every class of each of its images, so its numbers do not depend on
    what an interrupted run had already written. The batches are planned on the resized sizes and
    the images prepared batch by batch (holding a whole chunk's float pixels would cost ~190 MB at
    VOC sizes).

    Returns:
        The VVP features (L, n, D), their norms (L, n) and the grid of each image in ``needs_features``.
    """
    patch = clip.patch_size
    sizes: dict[str, tuple[int, int]] = {}
    for work in chunk:
        try:
            sizes[work.image] = resized_size(dataset, work.image, patch)
        except DatasetError as err:
            faults.query(work, err)
            report("query", 1)
    chunk = [work for work in chunk if work.image in sizes]
    features: dict[str, QueryFeatures] = {}
    for batch in size_batches(chunk, lambda q: sizes[q.image], batch_size):
        missing = [(q, c) for q in batch for c in sorted(q.classes) if not writer.has_vtp(q.image, c)]
        if not missing and not any(q.image in needs_features for q in batch):
            report("query", len(batch))
            continue
        loaded = load_query_batch(dataset, batch, patch, config, class_names, faults)
        if loaded is None:
            report("query", len(batch))
            continue
        out = query_pass(clip, loaded, text, config)
        stats.query_passes += len(loaded.works)
        refined = refine(out.cam, out.attention, config)
        write_vtp(writer, loaded.works, loaded.sizes, loaded.pairs, out.cam, refined, stats)
        for b, work in enumerate(loaded.works):
            if work.image in needs_features:
                feats, grid = query_features(clip, loaded, out, b, config)
                feats = feats.float().cpu()
                features[work.image] = (feats, feats.norm(dim=-1), grid)
        report("query", len(batch))
    return features


def _run_supports(
    clip: ClipBundle, dataset: Dataset, keys: Sequence[SupportKey], store: SupportStore,
    config: PriorConfig, batch_size: int, stats: PrecomputeStats, report: ProgressFn, faults: LoadFaults,
) -> None:
    """Run the planned support batches of one chunk (its first-use keys) that a pending episode needs.

    Batches run whole, so a resumed run computes each support with the same batch partners as an
    uninterrupted one; features no pending episode needs are dropped at once. The batches are
    planned on the images' resized sizes and their pixels prepared batch by batch: holding every
    prepared support of a chunk would grow with the episodes (PASCAL 5-shot: 365 x 4 MB).
    """
    patch = clip.patch_size
    sizes: dict[SupportKey, tuple[int, int]] = {}
    for key in keys:
        try:
            sizes[key] = resized_size(dataset, key[0], patch)
        except DatasetError as err:
            faults.support(key, err)
    keys = [key for key in keys if key in sizes]
    for batch in size_batches(keys, sizes.__getitem__, batch_size):
        wanted = [k for k in batch if store.remaining.get(k, 0) > 0 and k not in store.features]
        if not wanted:
            continue
        loaded = load_support_batch(dataset, batch, patch, config, faults)
        if loaded is None:
            continue
        feats, masks = support_pass(clip, loaded, config)
        for j, key in enumerate(loaded.keys):
            if key in wanted:
                store.features[key] = SupportCells.from_grid(feats[j:j + 1].cpu(), masks[j:j + 1].cpu())
        stats.support_passes += len(loaded.keys)
        del loaded
        report("support", len(batch))


def recompute_episode(
    clip: ClipBundle, dataset: Dataset, episode: Any, *, class_names: Sequence[str], config: PriorConfig,
) -> EpisodePriors:
    """The priors of one episode computed directly, as the engine computes them for the cache.

    Used by ``clipprior verify --sample`` to check cached entries against a fresh computation.

    Args:
        clip: The loaded CLIP.
        dataset: Loads images and labels by id.
        episode: Object with ``query_image``, ``query_label``, ``class_id``, ``supports``.
        class_names: Prompt name of class id c at index c - 1.
        config: The cache's config.

    Returns:
        :class:`~clipprior.priors.EpisodePriors` on the query's patch grid.
    """
    class_id = int(episode.class_id)
    query = dataset.load_image(episode.query_image)
    query_label = dataset.load_label(episode.query_label) if config.text_classes == "present" else None
    supports, masks = [], []
    for image, label in episode.supports:
        supports.append(dataset.load_image(image))
        masks.append(fss_mask(dataset.load_label(label), class_id))
    return compute_priors(clip, query, class_names[class_id - 1], supports, masks, config=config,
                          query_label=query_label, class_names=class_names)
