"""Stage 2, load: decode, convert and resize the images and masks of the planned batches.

A loaded batch holds host pixels ready to be moved to the model's device; nothing here touches
CLIP. :class:`Loader` runs the loads of the coming batches in a pool of worker threads (PIL
decodes and resizes without holding the GIL), a bounded number of batches ahead of the device,
and hands the batches back in plan order, so that a run is deterministic whatever the workers.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from clipprior.config import PriorConfig
from clipprior.errors import ClipPriorError, DatasetError
from clipprior.precompute.plan import Dataset, QueryWork, SupportKey
from clipprior.preprocess import normalize, resize_to_patch_multiple
from clipprior.priors import _prepare_support

__all__ = [
    "LoadJob",
    "Loader",
    "QueryBatch",
    "SupportBatch",
    "default_workers",
    "fss_mask",
    "present_names",
    "query_job",
    "support_job",
]

T = TypeVar("T")
U = TypeVar("U")


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

    def __len__(self) -> int:
        return len(self.works)

    def split(self, size: int) -> list[QueryBatch]:
        """The batch cut into consecutive batches of at most ``size`` images (pairs follow their image)."""
        if size >= len(self.works):
            return [self]
        parts = []
        for start in range(0, len(self.works), size):
            stop = min(start + size, len(self.works))
            chosen = [p for p, (b, _) in enumerate(self.pairs) if start <= b < stop]
            parts.append(QueryBatch(
                self.works[start:stop], self.pixels[start:stop], self.sizes[start:stop],
                [self.class_sets[p] for p in chosen], [(self.pairs[p][0] - start, self.pairs[p][1]) for p in chosen],
                None if self.resized is None else self.resized[start:stop]))
        return parts


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

    def __len__(self) -> int:
        return len(self.keys)

    def split(self, size: int) -> list[SupportBatch]:
        """The batch cut into consecutive batches of at most ``size`` supports."""
        return [SupportBatch(self.keys[s:s + size], self.pixels[s:s + size], self.labels[s:s + size])
                for s in range(0, len(self.keys), size)] if size < len(self.keys) else [self]


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


def load_support(dataset: Dataset, key: SupportKey, patch: int, config: PriorConfig
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One (support image, class): its prepared (3, H, W) pixels and (H, W) labels."""
    image, label, class_id = key
    fss = fss_mask(dataset.load_label(label), class_id)
    return _prepare_support(dataset.load_image(image), fss, patch, config)


def assemble_support_batch(batch: list[SupportKey], prepared: Sequence[tuple[torch.Tensor, torch.Tensor]]
                           ) -> SupportBatch:
    """Loaded supports of a batch -> its :class:`SupportBatch`."""
    return SupportBatch(batch, torch.stack([p[0] for p in prepared]), torch.stack([p[1] for p in prepared]))


def default_workers() -> int:
    """Load workers when none are asked for: half the cores this process may use, 1 to 8.

    The other half is left to the device's feeding thread and, on a CPU run, to torch's own threads.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(8, cores // 2))


@dataclass
class LoadJob(Generic[T, U]):
    """The loads of one batch: one call per item (run by the workers) and how to assemble them.

    Attributes:
        items: One zero-argument function per image of the batch.
        names: What each item loads (its image file), for errors.
        assemble: Builds the batch from the items' results, in order (run by the caller).
    """

    items: list[Callable[[], T]]
    names: list[str]
    assemble: Callable[[list[T]], U]


def _guarded(fn: Callable[[], T], name: str) -> T:
    """Run one load; an unexpected error becomes a :class:`DatasetError` naming the file."""
    try:
        return fn()
    except ClipPriorError:
        raise
    except Exception as exc:  # a worker never fails silently: the main thread gets the file
        raise DatasetError(f"loading {name} failed in a load worker: {type(exc).__name__}: {exc}; "
                           "check that the file is a readable image/mask") from exc


class Loader:
    """Runs the loads of the coming batches in worker threads, a bounded number of batches ahead.

    Batches come back in the order of the jobs whatever the workers, so a run is deterministic.
    An error in a worker is raised in the caller's thread when its batch is reached (the same
    exception: data errors name the file). :meth:`close` cancels what has not started and waits
    for the few loads that have (each one image), so no worker is left behind after an error or a
    Ctrl-C.

    Args:
        workers: Worker threads; 0 loads in the caller's thread when a batch is asked for.
        prefetch: Batches loaded ahead of the one the caller is using (>= 1).

    Example:
        >>> with Loader(workers=4) as loader:  # doctest: +SKIP
        ...     for batch in loader.stream(jobs):
        ...         run(batch)
    """

    def __init__(self, workers: int, prefetch: int = 2) -> None:
        self.workers = max(0, int(workers))
        self.prefetch = max(1, int(prefetch))
        self._pool = (ThreadPoolExecutor(self.workers, thread_name_prefix="clipprior-load")
                      if self.workers > 0 else None)

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Cancel the loads not started; wait for the running ones (one image each)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def map(self, fn: Callable[[str], T], names: Sequence[str]) -> list[T]:
        """``[fn(name) for name in names]``, run by the workers (errors name the file)."""
        if self._pool is None:
            return [_guarded(lambda n=name: fn(n), name) for name in names]
        futures = [self._pool.submit(_guarded, lambda n=name: fn(n), name) for name in names]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    def _submit(self, job: LoadJob[T, U]) -> tuple[list[Future[T]] | None, LoadJob[T, U]]:
        if self._pool is None:
            return None, job
        return [self._pool.submit(_guarded, fn, name) for fn, name in zip(job.items, job.names, strict=True)], job

    def stream(self, jobs: Iterable[LoadJob[T, U]]) -> Iterator[U]:
        """The assembled batches of ``jobs``, in order, each loaded ahead while earlier ones are used."""
        source = iter(jobs)
        pending: deque[tuple[list[Future[T]] | None, LoadJob[T, U]]] = deque()

        def fill() -> None:
            while len(pending) < self.prefetch + 1:
                job = next(source, None)
                if job is None:
                    return
                pending.append(self._submit(job))

        fill()
        while pending:
            futures, job = pending.popleft()
            if futures is None:
                results = [_guarded(fn, name) for fn, name in zip(job.items, job.names, strict=True)]
            else:
                try:
                    results = [f.result() for f in futures]
                except BaseException:
                    for later in (f for fs, _ in pending if fs is not None for f in fs):
                        later.cancel()
                    raise
            fill()
            yield job.assemble(results)


def query_job(dataset: Dataset, batch: list[QueryWork], patch: int, config: PriorConfig,
              class_names: Sequence[str], pin: bool = False) -> LoadJob[Any, QueryBatch]:
    """The :class:`LoadJob` of a planned query batch (``pin``: page-locked pixels for a CUDA copy)."""

    def one(work: QueryWork) -> Callable[[], tuple[tuple[int, int], np.ndarray | None, torch.Tensor, list[list[str]]]]:
        def run() -> tuple[tuple[int, int], np.ndarray | None, torch.Tensor, list[list[str]]]:
            rgb, label, resized = load_query_image(dataset, work, patch, config)
            pixels = normalize(resized, "clip")
            sets = []
            for c in sorted(work.classes):
                names = [class_names[c - 1]]
                if config.text_classes == "present":
                    names += [n for n in present_names(label, c, class_names) if n not in names]
                sets.append(names)
            keep = None if config.vvp_pixel_norm == "clip" else resized
            return (int(rgb.shape[0]), int(rgb.shape[1])), keep, pixels, sets
        return run

    def assemble(results: list[Any]) -> QueryBatch:
        pairs = [(b, c) for b, q in enumerate(batch) for c in sorted(q.classes)]
        sets = [names for r in results for names in r[3]]
        resized = None if config.vvp_pixel_norm == "clip" else [r[1] for r in results]
        first = results[0][2]
        pixels = torch.empty((len(results), *first.shape), dtype=first.dtype, pin_memory=pin)
        torch.stack([r[2] for r in results], out=pixels)
        return QueryBatch(batch, pixels, [r[0] for r in results], sets, pairs, resized)

    return LoadJob([one(w) for w in batch], [w.image for w in batch], assemble)


def support_job(dataset: Dataset, batch: list[SupportKey], patch: int, config: PriorConfig,
                pin: bool = False) -> LoadJob[Any, SupportBatch]:
    """The :class:`LoadJob` of a planned support batch."""

    def one(key: SupportKey) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        return lambda: load_support(dataset, key, patch, config)

    def assemble(results: list[tuple[torch.Tensor, torch.Tensor]]) -> SupportBatch:
        loaded = assemble_support_batch(batch, results)
        if pin:
            loaded.pixels, loaded.labels = loaded.pixels.pin_memory(), loaded.labels.pin_memory()
        return loaded

    return LoadJob([one(k) for k in batch], [k[0] for k in batch], assemble)
