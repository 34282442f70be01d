"""The engine: plan -> load -> passes -> post -> write, as concurrent stages.

:func:`run_precompute` is the one public entry point; each stage lives in its own module
(:mod:`~clipprior.precompute.plan`, :mod:`~clipprior.precompute.load`,
:mod:`~clipprior.precompute.passes`, :mod:`~clipprior.precompute.post`,
:mod:`~clipprior.precompute.write`). The device thread (the caller's) runs the passes and the
post-processing; load workers run ahead of it and a writer thread behind it.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from clipprior._memory import release_freed_memory
from clipprior.cache import PRIORS, CheckReport, PriorCache
from clipprior.config import PriorConfig
from clipprior.data.classes import prompt_names
from clipprior.data.episodes import Episode
from clipprior.data.images import DataRoot, fss_mask
from clipprior.errors import DatasetError, InvalidInputError
from clipprior.model import ClipBundle, load_clip
from clipprior.precompute.load import (
    Loader,
    LoadFaults,
    LoadJob,
    QueryBatch,
    SupportBatch,
    _guarded,
    default_workers,
    query_job,
    support_job,
)
from clipprior.precompute.passes import BatchLimit, auto_batch_size, query_features, query_pass, support_pass
from clipprior.precompute.plan import (
    BatchSize,
    ChunkSchedule,
    Dataset,
    PrecomputeStats,
    Schedule,
    SupportKey,
    WorkPlan,
    Writer,
    episode_records,
    plan_schedule,
    plan_work,
    resized_size,
)
from clipprior.precompute.post import QueryFeatures, SupportStore, episode_vvp, refine
from clipprior.precompute.provenance import check_recorded_settings
from clipprior.precompute.write import WriteThread, to_host, write_vtp, write_vvp
from clipprior.priors import EpisodePriors, SupportCells, TextFeatures, compute_priors, encode_text

__all__ = ["ProgressFn", "recompute_episode", "run_precompute"]

ProgressFn = Callable[[str, int], None]
_logger = logging.getLogger("clipprior.precompute")


def run_precompute(
    clip: ClipBundle,
    dataset: Dataset,
    episodes: Sequence[Any],
    writer: Writer,
    *,
    class_names: Sequence[str],
    config: PriorConfig | None = None,
    batch_size: int | str = "auto",
    shard: tuple[int, int] | None = None,
    chunk_images: int = 64,
    chunk_episodes: int = 256,
    progress: ProgressFn | None = None,
    text: TextFeatures | None = None,
    workers: int | None = None,
    log: Callable[[str], None] | None = None,
    on_error: str = "raise",
    support_window: int = 1,
) -> PrecomputeStats:
    """Compute and write every VTP (raw and refined) and VVP the episodes need.

    The stages run concurrently: worker threads load (decode, resize) the coming batches while
    the model's device runs the current one, and a writer thread takes the finished priors off the
    device and into ``writer``. The plan fixes every batch before the run starts (see
    :func:`~clipprior.precompute.plan.plan_schedule`): query images ordered by resized size and cut
    into chunks, batches of equal size within a chunk, each (support, class) in the support batches
    of the chunk of its first use. A rerun skips what is cached and recomputes the planned batches
    that hold missing work whole, exactly as an uninterrupted run would, writing only what is
    missing: a resumed cache is bit-for-bit the cache of an uninterrupted run.

    Args:
        clip: The loaded CLIP (its device and dtype are the run's).
        dataset: Loads images and labels by id.
        episodes: The episodes (see :func:`clipprior.data.sample_episodes`).
        writer: Where the priors go (a :class:`clipprior.cache.CacheWriter`).
        class_names: Prompt name of class id c at index c - 1.
        config: Knobs; defaults to :class:`PriorConfig`.
        batch_size: Images per CLIP batch, or ``"auto"``: chosen per image size from the device
            (:func:`~clipprior.precompute.passes.auto_batch_size`); at ``"auto"``, a batch that
            runs out of device memory is halved (and the limit kept for the rest of the run).
        shard: ``(index, count)`` to compute one shard of the query images.
        chunk_images: Most query images per chunk (bounds memory; the unit of resumption).
        chunk_episodes: A chunk is closed once its images hold this many episodes, so that its
            VVP work and buffers stay bounded when there are many episodes per image.
        progress: Called as ``progress(kind, n)`` with kind ``"query"``, ``"support"`` or ``"episode"``.
        text: Precomputed text features of ``class_names`` (encoded here when ``None``).
        workers: Load worker threads (default :func:`~clipprior.precompute.load.default_workers`;
            0 loads in this thread).
        log: Called with a line for events worth telling (a halved batch); default: a warning on
            the ``clipprior.precompute`` logger.
        on_error: ``"raise"`` at the first broken image or mask, naming it, the episodes that need it
            and the fix; or ``"skip"``: every episode that needs a broken file is dropped (listed in
            ``stats.dropped``, the files in ``stats.problems``) and everything else computed. The
            engine registers each episode it completes in the writer's episode table, so dropped
            episodes stay out of it (do not register all episodes beforehand under ``"skip"``).
        support_window: Run the supports first used in this many consecutive chunks together
            (fuller support batches on a mix of image sizes; see
            :func:`~clipprior.precompute.plan.plan_schedule`).

    Returns:
        :class:`~clipprior.precompute.PrecomputeStats`.

    Raises:
        InvalidInputError: for a batch size below 1, a class id without a name, a batch out of
            device memory at a fixed batch size, or a writer whose provenance records another dtype,
            device, batch or chunk size (see :func:`~clipprior.precompute.provenance.build_provenance`).
        DatasetError: for a broken image or mask (``on_error="raise"``): unreadable, a mask of
            another size than its image, an image smaller than a patch, a support mask without its
            class; the message names the file, the episodes that need it and the fix.

    Example:
        >>> stats = run_precompute(clip, dataset, episodes, writer, class_names=names)  # doctest: +SKIP
        >>> stats.query_passes  # doctest: +SKIP
        364
    """
    config = config or PriorConfig()
    auto = batch_size == "auto"
    if not auto and not (isinstance(batch_size, int) and not isinstance(batch_size, bool)):
        raise InvalidInputError(f"batch_size={batch_size!r} must be a whole number or 'auto'")
    if min(1 if auto else int(batch_size), chunk_images, chunk_episodes) < 1:
        raise InvalidInputError(f"batch_size={batch_size}, chunk_images={chunk_images} and "
                                f"chunk_episodes={chunk_episodes} must all be >= 1")
    class_names = list(class_names)
    for episode in episodes:
        if not 1 <= int(episode.class_id) <= len(class_names):
            raise InvalidInputError(f"episode class {episode.class_id} has no prompt name (have {len(class_names)})")
    check_recorded_settings(writer, clip, batch_size=batch_size, chunk_images=chunk_images,
                            chunk_episodes=chunk_episodes, support_window=support_window)
    text = text or encode_text(clip, class_names, config)
    report = progress or (lambda kind, n: None)
    say = log or _logger.warning
    patch = clip.patch_size
    plan = plan_work(episodes, shard)
    faults = LoadFaults(on_error, episodes, dataset, only=[i for q in plan.queries for i in q.episodes])
    records = episode_records(episodes)
    stats = PrecomputeStats()
    with Loader(default_workers() if workers is None else workers) as loader:
        plan, sizes = _plan_sizes(loader, dataset, plan, patch, faults, report)
        cached = {i for q in plan.queries for i in q.episodes if writer.has_vvp(i)}  # read before the writes start
        fixed = None if auto else int(batch_size)
        per_size: BatchSize = (lambda size: auto_batch_size(clip, size)) if fixed is None else (lambda size: fixed)
        schedule = plan_schedule(episodes, plan, sizes, per_size, _Pending(writer, faults.dropped),
                                 chunk_images=chunk_images, chunk_episodes=chunk_episodes,
                                 support_window=support_window)
        store = SupportStore(schedule.support_uses)
        pin = clip.device.type == "cuda"
        stream = loader.stream(_load_jobs(schedule, dataset, patch, config, class_names, pin, faults))
        limit = BatchLimit(fixed, say)
        with WriteThread() as out:
            for step in schedule.chunks:
                if step.runs:
                    _run_chunk(clip, episodes, step, stream, store, limit, out, writer, text, config, stats, report,
                               faults, records)
                    release_freed_memory()  # keep the resident set flat across chunks (see clipprior/_memory.py)
                if step.skipped_images:
                    report("query", step.skipped_images)
                stats.skipped_vvp += len(cached.intersection(step.episodes))
                report("episode", len(step.episodes))
    stats.dropped = sorted(faults.dropped)
    stats.problems = faults.report
    return stats


_BROKEN_SIZE = (0, 0)  # planned size of a support image whose header cannot be read: never run (see _Pending)


def _plan_sizes(loader: Loader, dataset: Dataset, plan: WorkPlan, patch: int, faults: LoadFaults,
                report: ProgressFn) -> tuple[WorkPlan, dict[str, tuple[int, int]]]:
    """The resized size of every query and support image, read by the workers from the headers.

    An image whose size cannot be read goes to ``faults`` (raised under ``on_error="raise"``, in
    plan order): a broken query leaves the plan (its episodes are dropped and counted as done for
    the progress), a broken support's episodes are dropped, so none of its batches runs.
    """

    def size(path: str) -> tuple[int, int] | DatasetError:
        try:
            return _guarded(lambda: resized_size(dataset, path, patch), path)
        except DatasetError as err:
            return err

    images = list(dict.fromkeys([q.image for q in plan.queries] + [k[0] for k in plan.support_uses]))
    sizes = dict(zip(images, loader.map(size, images), strict=True))
    queries = []
    for work in plan.queries:
        found = sizes[work.image]
        if isinstance(found, DatasetError):
            faults.query(work, found)
            report("query", 1)
            report("episode", len(work.episodes))
        else:
            queries.append(work)
    for key in plan.support_uses:
        found = sizes[key[0]]
        if isinstance(found, DatasetError):
            faults.support(key, found)
    clean = {path: _BROKEN_SIZE if isinstance(found, DatasetError) else found for path, found in sizes.items()}
    return WorkPlan(queries=queries, support_uses=plan.support_uses), clean


class _Pending:
    """The writer as the schedule sees it: a dropped episode counts as done, so nothing is planned for it."""

    def __init__(self, writer: Writer, dropped: set[int]) -> None:
        self.writer = writer
        self.dropped = dropped

    def has_vvp(self, index: int) -> bool:
        return index in self.dropped or self.writer.has_vvp(index)

    def has_vtp(self, image: str, class_id: int) -> bool:
        return self.writer.has_vtp(image, class_id)


def _load_jobs(schedule: Schedule, dataset: Dataset, patch: int, config: PriorConfig, class_names: Sequence[str],
               pin: bool, faults: LoadFaults) -> Iterator[LoadJob[Any, Any]]:
    """The loads of every batch the run computes, in the order the device runs them."""
    for step in schedule.chunks:
        if not step.runs:
            continue
        for batch in step.query_batches:
            yield query_job(dataset, batch, patch, config, class_names, pin, faults)
        for keys, _ in step.support_batches:
            yield support_job(dataset, keys, patch, config, pin, faults)


def _run_chunk(
    clip: ClipBundle, episodes: Sequence[Any], step: ChunkSchedule, stream: Iterator[Any], store: SupportStore,
    limit: BatchLimit, out: WriteThread, writer: Writer, text: TextFeatures, config: PriorConfig,
    stats: PrecomputeStats, report: ProgressFn, faults: LoadFaults, records: list[Any],
) -> None:
    """One chunk on the device: its query batches, its support batches, its episodes' VVP, a commit.

    Every planned batch runs whole (with every class of each of its images), so its numbers do not
    depend on what an interrupted run had already written; the writes say what is missing. A
    broken file met while loading leaves its batch (see :func:`~clipprior.precompute.load.query_job`);
    the episodes it drops get no VVP, give back their support uses and stay out of the episode
    table: only the chunk's completed episodes are registered (``writer.set_episodes``).
    """
    features: dict[str, QueryFeatures] = {}

    def query_part(part: QueryBatch) -> None:
        result = query_pass(clip, part, text, config)
        refined = refine(result.cam, result.attention, config)
        kept = {}
        for b, work in enumerate(part.works):
            if work.image in step.needs_features:
                feats, grid = query_features(clip, part, result, b, config)
                feats = feats.float()
                kept[work.image] = (feats, feats.norm(dim=-1), grid)
        cam, ref = to_host(result.cam), to_host(refined)
        stats.query_passes += len(part)
        features.update(kept)
        out.submit(functools.partial(write_vtp, writer, part.works, part.sizes, part.pairs, cam, ref, stats))

    def support_part(part: SupportBatch, wanted: set[SupportKey]) -> None:
        feats, masks = support_pass(clip, part, config)
        cells = {key: SupportCells.from_grid(feats[j:j + 1], masks[j:j + 1])
                 for j, key in enumerate(part.keys) if key in wanted}
        stats.support_passes += len(part)
        store.features.update(cells)

    for batch in step.query_batches:
        loaded = next(stream)
        if loaded is not None:  # None: every image of the batch was broken (and dropped)
            limit.run(loaded, query_part)
        report("query", len(batch))
    for keys, wanted in step.support_batches:
        loaded = next(stream)
        if loaded is not None:
            limit.run(loaded, functools.partial(support_part, wanted=wanted))
        report("support", len(keys))
    done = [i for i in step.todo if i not in faults.dropped]
    for i in sorted(set(step.todo) - set(done)):
        _release(store, episodes[i])
    maps = [to_host(episode_vvp(episodes[i], features, store, config)) for i in done]
    out.submit(functools.partial(writer.set_episodes, [records[i] for i in done]))  # dropped ones stay out
    out.submit(functools.partial(write_vvp, writer, done, maps))
    out.submit(writer.commit)
    stats.vvp_written += len(done)


def _release(store: SupportStore, episode: Any) -> None:
    """A dropped episode gives back its uses of the support features (freed once nothing needs them)."""
    for image, label in episode.supports:
        key = (image, label, int(episode.class_id))
        if key in store.features:
            store.take(key)
        elif key in store.remaining:
            store.remaining[key] -= 1


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


def check_recomputed(cache: PriorCache, episodes: Sequence[Episode], *, data_root: str | os.PathLike[str],
                     model: str | os.PathLike[str] | None = None, device: str = "cpu", dtype: str = "fp32",
                     atol: float = 1e-2) -> CheckReport:
    """Recompute the priors of some of a cache's episodes with the model and compare them with the cache.

    What ``clipprior verify --sample`` does: each episode's prior kinds (:data:`clipprior.cache.PRIORS`:
    the query's VTP raw and refined, the episode's VVP) are recomputed with ``cache.config`` at the
    image's own geometry, as ``precompute`` computes them (:func:`recompute_episode`), and compared
    with the cached float16 maps within ``atol``.

    Args:
        cache: The cache under test.
        episodes: Its episodes to recompute (e.g. a random sample of ``cache.episodes``).
        data_root: The dataset folder to load the images and masks from (the cache records the
            folder it was computed from, ``cache.provenance["data_root"]``, but a check against the
            data is only as good as a data root the caller chose).
        model: The CLIP to recompute with (``None``: the model recorded in the cache).
        device: Device of the model.
        dtype: Its weight dtype (``"fp32"``, ``"fp16"``, ``"bf16"``).
        atol: Largest absolute difference accepted.

    Returns:
        A :class:`~clipprior.cache.CheckReport`: one problem per prior that differs or has another
        shape (empty when every recomputed prior matches), ``episodes`` recomputed, and a note when
        the recorded model's weights are not the ones the cache records.

    Raises:
        ModelLoadError: if the model cannot be loaded.
        DataNotFoundError: if an image or mask is missing under ``data_root``.

    Example:
        >>> report = check_recomputed(cache, cache.episodes[:5], data_root="~/data/VOC2012")  # doctest: +SKIP
        >>> report.ok  # doctest: +SKIP
        True
    """
    prov = cache.provenance
    report = CheckReport(episodes=len(episodes))
    clip = load_clip(model or prov["model"], device=device, dtype=dtype)
    if model is None and clip.checksum != prov.get("weights_sha256"):
        report.notes.append("the weights' checksum differs from the cache's")
    dataset = DataRoot(data_root)
    names = prompt_names(prov["dataset"])
    for record in episodes:
        fresh = recompute_episode(clip, dataset, record, class_names=names, config=cache.config)
        for kind in PRIORS:
            cached, computed = cache.prior(kind, record), fresh.of(kind)
            if computed is None or tuple(cached.shape) != tuple(computed.shape):
                report.problems.append(f"episode {record.index}: {kind.label} has shape {tuple(cached.shape)}, "
                                       f"recomputed {None if computed is None else tuple(computed.shape)}")
                continue
            error = float((cached.float() - computed.float().cpu()).abs().max())
            if not error <= atol:
                report.problems.append(f"episode {record.index}: {kind.label} differs from a fresh computation by "
                                       f"{error:.3g} (> --atol {atol:g})")
    return report
