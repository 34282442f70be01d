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
from clipprior.data.images import check_same_size, fss_mask
from clipprior.data.report import DataReport, Problem, check_on_error
from clipprior.errors import ClipPriorError, DataNotFoundError, DatasetError
from clipprior.precompute.plan import Dataset, QueryWork, SupportKey
from clipprior.preprocess import normalize, vtp_image, vvp_inputs
from clipprior.priors import present_names, softmax_classes

__all__ = [
    "LoadFaults",
    "LoadJob",
    "Loader",
    "QueryBatch",
    "SupportBatch",
    "default_workers",
    "fss_mask",
    "load_checked",
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
        vvp_images: The decoded uint8 images, kept when VVP needs a pass of its own (another pixel
            normalisation or the official geometry, see ``PriorConfig.vvp_shares_query_pass``), else ``None``.
    """

    works: list[QueryWork]
    pixels: torch.Tensor
    sizes: list[tuple[int, int]]
    class_sets: list[list[str]]
    pairs: list[tuple[int, int]]
    vvp_images: list[np.ndarray] | None


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
                None if self.vvp_images is None else self.vvp_images[start:stop]))
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


def load_query_image(dataset: Dataset, work: QueryWork, patch: int, config: PriorConfig
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One query, checked (:func:`load_checked`): (decoded rgb, label, rgb resized up to a multiple of ``patch``)."""
    rgb, label = load_checked(dataset, work.image, work.label, patch, "query")
    return rgb, label, vtp_image(rgb, patch, config)


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
    pixels, labels = vvp_inputs(rgb, fss, patch, config)
    return pixels, torch.as_tensor(labels)


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


def _captured(fn: Callable[[], T], name: str) -> T | DatasetError:
    """Run one item's load in a worker; a broken file comes back as its error, handled by the caller."""
    try:
        return _guarded(fn, name)
    except DatasetError as err:
        return err


def _sort_out(batch: list[Any], results: list[Any], fault: Callable[[Any, DatasetError], None] | None
              ) -> tuple[list[Any], list[Any]]:
    """The items of a batch that loaded and their results; each broken one goes to ``fault`` (or raises)."""
    kept, good = [], []
    for item, result in zip(batch, results, strict=True):
        if isinstance(result, DatasetError):
            if fault is None:
                raise result
            fault(item, result)
            continue
        kept.append(item)
        good.append(result)
    return kept, good


def query_job(dataset: Dataset, batch: list[QueryWork], patch: int, config: PriorConfig,
              class_names: Sequence[str], pin: bool = False, faults: LoadFaults | None = None,
              ) -> LoadJob[Any, QueryBatch | None]:
    """The :class:`LoadJob` of a planned query batch (``pin``: page-locked pixels for a CUDA copy).

    A broken image or mask does not fail its worker: in the caller's thread (``assemble``) it goes
    to :meth:`LoadFaults.query` (which raises under ``on_error="raise"``) and the batch runs
    without it; ``None`` when nothing is left. Without ``faults`` its error is raised.
    """

    def one(work: QueryWork) -> Callable[[], Any]:
        def run() -> tuple[tuple[int, int], np.ndarray | None, torch.Tensor, list[list[str]]]:
            rgb, label, resized = load_query_image(dataset, work, patch, config)
            pixels = normalize(resized, "clip")
            sets = [softmax_classes(class_names[c - 1], config, query_label=label, class_names=class_names, class_id=c)
                    for c in sorted(work.classes)]
            keep = None if config.vvp_shares_query_pass else rgb
            return (int(rgb.shape[0]), int(rgb.shape[1])), keep, pixels, sets
        return lambda: _captured(run, work.image)

    def assemble(loaded: list[Any]) -> QueryBatch | None:
        works, results = _sort_out(batch, loaded, None if faults is None else faults.query)
        if not works:
            return None
        pairs = [(b, c) for b, q in enumerate(works) for c in sorted(q.classes)]
        sets = [names for r in results for names in r[3]]
        vvp_images = None if config.vvp_shares_query_pass else [r[1] for r in results]
        first = results[0][2]
        pixels = torch.empty((len(results), *first.shape), dtype=first.dtype, pin_memory=pin)
        torch.stack([r[2] for r in results], out=pixels)
        return QueryBatch(works, pixels, [r[0] for r in results], sets, pairs, vvp_images)

    return LoadJob([one(w) for w in batch], [w.image for w in batch], assemble)


def support_job(dataset: Dataset, batch: list[SupportKey], patch: int, config: PriorConfig,
                pin: bool = False, faults: LoadFaults | None = None) -> LoadJob[Any, SupportBatch | None]:
    """The :class:`LoadJob` of a planned support batch (broken supports: as :func:`query_job`'s queries)."""

    def one(key: SupportKey) -> Callable[[], Any]:
        return lambda: _captured(lambda: load_support(dataset, key, patch, config), key[0])

    def assemble(loaded: list[Any]) -> SupportBatch | None:
        keys, results = _sort_out(batch, loaded, None if faults is None else faults.support)
        if not keys:
            return None
        out = assemble_support_batch(keys, results)
        if pin:
            out.pixels, out.labels = out.pixels.pin_memory(), out.labels.pin_memory()
        return out

    return LoadJob([one(k) for k in batch], [k[0] for k in batch], assemble)


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
