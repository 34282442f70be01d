"""``--store features``: the per-image features that let a cache serve the VVP of *any* episode.

A trainer of the PFENet family draws a fresh support for every query in every epoch; a cache that
stores VVP per planned episode cannot serve those. This stage stores, for one fold's lists:

- per query image (every image of the query list): the VTP of every fold class present in its mask
  (the classes a trainer can draw for it) and the unit patch features of the VVP layers;
- per (support image, class) of every class's support list: the unit features of the support's
  foreground cells and its mask on the patch grid;

so that :meth:`clipprior.PriorCache.episode_priors` computes any episode's VVP with the engine's
cosine-max (:func:`clipprior.priors.vvp_from_cells`; see :mod:`clipprior.cache._features` for the
storage and its precision).

It runs the engine's stages: load workers decode and resize ahead of the device
(:class:`~clipprior.precompute.load.Loader`), the passes run on the model's device in batches of
equal size (``"auto"``: sized from the device, halved on an out-of-memory error), a writer thread
commits behind it. The batches are planned over the whole list, so a rerun recomputes whole the
batches that hold missing entries and writes only those: a resumed cache equals an uninterrupted one.

Example:
    >>> stats = store_features(clip, dataset, writer, class_names=names)  # doctest: +SKIP
    >>> stats.features_written  # doctest: +SKIP
    729
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from clipprior._memory import release_freed_memory
from clipprior._vision import patch_grid
from clipprior.cache._features import feature_map
from clipprior.config import PriorConfig
from clipprior.data.report import DataReport, Problem, check_on_error
from clipprior.errors import DataNotFoundError, DatasetError, InvalidInputError
from clipprior.model import ClipBundle
from clipprior.precompute.load import (
    Loader,
    LoadJob,
    QueryBatch,
    SupportBatch,
    _file,
    default_workers,
    query_job,
    support_job,
)
from clipprior.precompute.passes import BatchLimit, auto_batch_size, query_features, query_pass, support_pass
from clipprior.precompute.plan import PrecomputeStats, QueryWork, SupportKey, size_batches
from clipprior.precompute.post import refine
from clipprior.precompute.provenance import check_recorded_settings
from clipprior.precompute.write import HostTensor, WriteThread, to_host, write_vtp
from clipprior.priors import TextFeatures, encode_text

__all__ = ["FeatureDataset", "FeatureFaults", "feature_plan", "store_features"]

ProgressFn = Callable[[str, int], None]
_logger = logging.getLogger("clipprior.precompute")


class FeatureDataset(Protocol):
    """What the feature stage needs of a dataset (see :class:`clipprior.data.FSSDataset`)."""

    classes: list[int]
    items: list[tuple[str, str]]
    class_index: dict[int, list[tuple[str, str]]]

    def load_image(self, path: str) -> np.ndarray:
        """(H, W, 3) uint8 RGB."""

    def load_label(self, path: str) -> np.ndarray:
        """(H, W) uint8 class ids."""

    def present_classes(self, label: str) -> Sequence[int]:
        """The fold's classes present in a mask."""


def feature_plan(dataset: FeatureDataset) -> tuple[list[QueryWork], list[SupportKey]]:
    """The query images (with the fold classes present in each) and (support, class) keys of a fold.

    Args:
        dataset: The fold (its ``items`` are the queries, ``class_index`` the support lists).

    Returns:
        Query works in list order (first appearance) and support keys in class, then list order.

    Example:
        >>> queries, supports = feature_plan(dataset)  # doctest: +SKIP
        >>> sorted(queries[0].classes), supports[0]  # doctest: +SKIP
        ([1], ('JPEGImages/a.jpg', 'SegmentationClassAug/a.png', 1))
    """
    works: dict[str, QueryWork] = {}
    for image, label in dataset.items:
        work = works.setdefault(image, QueryWork(image, label))
        work.classes.update(int(c) for c in dataset.present_classes(label))
    queries = [w for w in works.values() if w.classes]
    supports = list(dict.fromkeys((image, label, int(c)) for c in dataset.classes
                                  for image, label in dataset.class_index.get(c, [])))
    return queries, supports


class FeatureFaults:
    """Broken files met by the feature stage: raise naming the file, or leave the entry out and report it.

    The sink :func:`~clipprior.precompute.load.query_job` and
    :func:`~clipprior.precompute.load.support_job` hand broken files to. A features cache has no
    episodes to drop: under ``"skip"`` a broken query image gets no VTP and no features, a broken
    (support, class) no support features; a trainer's sampler must then not draw them (the report
    names each file).

    Args:
        on_error: ``"raise"`` or ``"skip"``.
        dataset: The dataset, to name files by their full path.

    Attributes:
        report: One problem per broken file.
    """

    def __init__(self, on_error: str, dataset: Any = None) -> None:
        self.on_error = check_on_error(on_error)
        self.dataset = dataset
        self.report = DataReport()

    def query(self, work: QueryWork, err: DatasetError) -> None:
        """A query image (or its mask) is broken: it gets no VTP and no features."""
        self._fail(err, work.image, "as a query image", "it gets no VTP and no features")

    def support(self, key: SupportKey, err: DatasetError) -> None:
        """A support (or its mask) is broken for its class: no support features for the pair."""
        self._fail(err, key[0], f"as a support of class {key[2]}", "it gets no support features")

    def image(self, path: str, err: DatasetError) -> None:
        """An image whose size cannot be read (planning): it is left out wherever the lists use it."""
        self._fail(err, path, "as a query or support image", "it is left out")

    def _fail(self, err: DatasetError, item: str, role: str, consequence: str) -> None:
        """Raise ``err`` naming the file and its ``role``, or (skip) report it with the ``consequence``."""
        path = getattr(err, "path", None) or (_file(self.dataset, item) if self.dataset is not None else item)
        if self.on_error == "raise":
            raised = type(err)(f"{err} (needed {role}); fix or remove the file, or pass "
                               "on_error='skip' (--on-error skip) to leave it out and compute the rest")
            raised.path = path  # type: ignore[attr-defined]
            raise raised from err
        self.report.add(Problem(path, f"{err} -- needed {role}: {consequence}",
                                missing=isinstance(err, DataNotFoundError)))


def store_features(
    clip: ClipBundle,
    dataset: FeatureDataset,
    writer: Any,
    *,
    class_names: Sequence[str],
    config: PriorConfig | None = None,
    batch_size: int | str = "auto",
    shard: tuple[int, int] | None = None,
    chunk_images: int = 64,
    progress: ProgressFn | None = None,
    text: TextFeatures | None = None,
    workers: int | None = None,
    log: Callable[[str], None] | None = None,
    on_error: str = "raise",
    on_plan: Callable[[str, int], None] | None = None,
) -> PrecomputeStats:
    """Write the query VTP and features and the support features of every image of a fold.

    The batches are planned over the whole fold (chunks of the lists, images of equal size within
    a chunk) before any shard is taken, and a shard takes every ``count``-th batch: each image
    has the same batch partners in a sharded run as in a single one, so merged shards equal the
    single run bit for bit, as a resumed run equals an uninterrupted one.

    Args:
        clip: The loaded CLIP (its device and dtype are the run's).
        dataset: The fold.
        writer: A :class:`clipprior.cache.CacheWriter`.
        class_names: Prompt name of class id c at index c - 1.
        config: Knobs; defaults to :class:`PriorConfig`.
        batch_size: Images per CLIP batch, or ``"auto"`` (see
            :func:`~clipprior.precompute.run_precompute`).
        shard: ``(index, count)``: compute every ``count``-th planned batch from ``index``.
        chunk_images: Images per committed chunk (the unit of resumption).
        progress: Called as ``progress(kind, n)`` with kind ``"query"`` or ``"support"``.
        text: Precomputed text features of ``class_names``.
        workers: Load worker threads (default :func:`~clipprior.precompute.load.default_workers`).
        log: Called with a line for events worth telling (a halved batch).
        on_error: ``"raise"`` at the first broken image or mask, naming it; ``"skip"``: leave its
            entries out and list it in ``stats.problems`` (see :class:`FeatureFaults`).
        on_plan: Called as ``on_plan(kind, total)`` once the batches are planned: how many query
            images and (support, class) pairs this run (or shard) covers.

    Returns:
        :class:`~clipprior.precompute.PrecomputeStats` (``features_written`` counts feature entries).

    Raises:
        InvalidInputError: for a bad batch or chunk size or shard, a class without a prompt name, or a writer
            recording other settings (see :func:`~clipprior.precompute.provenance.check_recorded_settings`).
        DatasetError: for a broken image or mask under ``on_error="raise"``, naming the file.
    """
    config = config or PriorConfig()
    auto = batch_size == "auto"
    if not auto and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise InvalidInputError(f"batch_size={batch_size!r} must be a whole number >= 1 or 'auto'")
    if chunk_images < 1:
        raise InvalidInputError(f"chunk_images={chunk_images} must be >= 1")
    if shard is not None and not (shard[1] >= 1 and 0 <= shard[0] < shard[1]):
        raise InvalidInputError(f"shard {shard[0]}/{shard[1]} is not valid; use i/n with 0 <= i < n")
    class_names = list(class_names)
    check_recorded_settings(writer, clip, batch_size=batch_size, chunk_images=chunk_images)
    report = progress or (lambda kind, n: None)
    faults = FeatureFaults(on_error, dataset)
    patch = clip.patch_size
    queries, supports = feature_plan(dataset)
    for work in queries:
        if max(work.classes) > len(class_names):
            raise InvalidInputError(f"class {max(work.classes)} of {work.label} has no prompt name "
                                    f"(have {len(class_names)})")
    stats = PrecomputeStats()
    with Loader(default_workers() if workers is None else workers) as loader:
        sizes = _sizes(loader, dataset, [w.image for w in queries] + [k[0] for k in supports], faults)
        queries = [w for w in queries if w.image in sizes]
        supports = [k for k in supports if k[0] in sizes]
        fixed = None if auto else int(batch_size)
        per_size = (lambda size: auto_batch_size(clip, size)) if fixed is None else (lambda size: fixed)

        def resized(image: str) -> tuple[int, int]:
            h, w = sizes[image]
            return patch * math.ceil(h / patch), patch * math.ceil(w / patch)

        # Planned over the whole fold, then sharded by batch; a batch runs whole when it holds missing work.
        query_batches = _shard([(i, batch) for i, chunk in enumerate(_chunks(queries, chunk_images))
                                for batch in size_batches(chunk, lambda w: resized(w.image), per_size)], shard)
        support_batches = _shard([(i, batch) for i, chunk in enumerate(_chunks(supports, chunk_images))
                                  for batch in size_batches(chunk, lambda k: resized(k[0]), per_size)], shard)
        queries = [w for _, batch in query_batches for w in batch]
        supports = [k for _, batch in support_batches for k in batch]
        if on_plan is not None:
            on_plan("query", len(queries))
            on_plan("support", len(supports))
        missing_qf = {w.image for w in queries if not writer.has_query_features(w.image)}
        missing_q = missing_qf | {w.image for w in queries if any(not writer.has_vtp(w.image, c) for c in w.classes)}
        missing_s = {k for k in supports if not writer.has_support_features(k[0], k[2])}
        query_runs = [(i, b) for i, b in query_batches if any(w.image in missing_q for w in b)]
        support_runs = [(i, b) for i, b in support_batches if any(k in missing_s for k in b)]
        report("query", len(queries) - sum(len(b) for _, b in query_runs))
        report("support", len(supports) - sum(len(b) for _, b in support_runs))
        if query_runs and text is None:
            text = encode_text(clip, class_names, config)
        pin = clip.device.type == "cuda"

        def jobs() -> Iterator[LoadJob[Any, Any]]:
            for _, batch in query_runs:
                yield query_job(dataset, batch, patch, config, class_names, pin, faults)  # type: ignore[arg-type]
            for _, keys in support_runs:
                yield support_job(dataset, keys, patch, config, pin, faults)  # type: ignore[arg-type]

        stream = loader.stream(jobs())
        limit = BatchLimit(fixed, log or _logger.warning)
        with WriteThread() as out:

            def query_part(part: QueryBatch) -> None:
                result = query_pass(clip, part, text, config)  # type: ignore[arg-type]  # encoded above
                cam, ref = to_host(result.cam), to_host(refine(result.cam, result.attention, config))
                entries = []
                for b, work in enumerate(part.works):
                    if work.image in missing_qf:
                        feats, grid = query_features(clip, part, result, b, config)
                        entries.append((work.image, to_host(feature_map(feats, grid))))
                stats.query_passes += len(part)
                out.submit(functools.partial(write_vtp, writer, part.works, part.sizes, part.pairs, cam, ref, stats))
                out.submit(functools.partial(_write_query_features, writer, entries, stats))

            def support_part(part: SupportBatch) -> None:
                feats, masks = support_pass(clip, part, config)
                grid = patch_grid(clip.model.config.vision_config, int(part.pixels.shape[-2]),
                                  int(part.pixels.shape[-1]))
                entries = []
                for j, key in enumerate(part.keys):
                    if key in missing_s:
                        mask = masks[j].bool()
                        entries.append((key, sizes[key[0]], to_host(feature_map(feats[j] * mask[None, :, None], grid)),
                                        to_host(mask.reshape(grid).float())))
                stats.support_passes += len(part)
                out.submit(functools.partial(_write_support_features, writer, entries, stats))

            for runs, kind, fn in ((query_runs, "query", query_part), (support_runs, "support", support_part)):
                for n, (chunk, batch) in enumerate(runs):
                    loaded = next(stream)
                    if loaded is not None:  # None: every image of the batch was broken (and left out)
                        limit.run(loaded, fn)
                    report(kind, len(batch))
                    if n + 1 == len(runs) or runs[n + 1][0] != chunk:  # the chunk is done: commit it
                        out.submit(writer.commit)
                        release_freed_memory()
    stats.problems = faults.report
    return stats


def _shard(batches: list[tuple[int, list[Any]]], shard: tuple[int, int] | None) -> list[tuple[int, list[Any]]]:
    """Every ``count``-th planned batch from ``index`` (all of them without a shard)."""
    return batches if shard is None else batches[shard[0]::shard[1]]


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _sizes(loader: Loader, dataset: Any, images: Sequence[str], faults: FeatureFaults) -> dict[str, tuple[int, int]]:
    """Original (height, width) of each image, read from the headers by the workers; broken ones go to ``faults``."""

    def size(path: str) -> tuple[int, int] | DatasetError:
        try:
            header = getattr(dataset, "image_size", None)
            height, width = header(path) if header is not None else dataset.load_image(path).shape[:2]
            return int(height), int(width)
        except DatasetError as err:
            return err

    unique = list(dict.fromkeys(images))
    found: dict[str, tuple[int, int]] = {}
    for path, value in zip(unique, loader.map(size, unique), strict=True):
        if isinstance(value, DatasetError):
            faults.image(path, value)
        else:
            found[path] = value
    return found


def _write_query_features(writer: Any, entries: list[tuple[str, HostTensor]], stats: PrecomputeStats) -> None:
    for image, feats in entries:
        writer.add_query_features(image, feats.numpy())
        stats.features_written += 1


def _write_support_features(writer: Any, entries: list[tuple[SupportKey, tuple[int, int], HostTensor, HostTensor]],
                            stats: PrecomputeStats) -> None:
    for (image, _label, class_id), size, feats, mask in entries:
        if not writer.has_image(image):
            writer.add_image(image, *size)
        writer.add_support_features(image, class_id, feats.numpy(), mask.numpy())
        stats.features_written += 1
