"""The on-disk layout of a prior cache and the low-level HDF5 code behind :mod:`clipprior.cache`.

Every file clipprior writes -- a committed segment of a running job, a shard, a final cache -- has
the same layout (see ``docs/cache-format.md``), so one reader (:class:`FileIndex`) and one writer
(:func:`write_cache_file`) serve them all: consolidating segments into the final file and merging
shards are the same operation, a sorted, de-duplicated union of sources.

Files are only ever created under a temporary name, flushed, fsynced and atomically renamed
(:func:`atomic_h5`), so a path that exists is a complete file.

Example:
    >>> import numpy as np
    >>> pad_stack([np.ones((2, 3)), np.ones((1, 1))], (2, 3)).shape
    (2, 2, 3)
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np

from clipprior.errors import CacheError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "RESERVED_ATTRS",
    "EpisodeRecord",
    "FileIndex",
    "MapPlan",
    "SourceSet",
    "atomic_h5",
    "fsync_dir",
    "open_read",
    "pad_stack",
    "write_cache_file",
]

FORMAT_NAME = "clipprior-prior-cache"
FORMAT_VERSION = 1

#: Root attributes written by clipprior itself; provenance keys may not use these names.
RESERVED_ATTRS = frozenset({
    "format", "format_version", "kind", "provenance", "run_id", "created_utc", "finalized_utc", "shard_index",
    "shard_count",
})

STR_DTYPE = h5py.string_dtype("utf-8")
MAP_DTYPE = np.dtype("float16")
#: gzip ships with every HDF5 build (lzf does not), so any HDF5 reader can open the file.
COMPRESSION: dict[str, Any] = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
#: Rows copied per block when consolidating; bounds memory to a few MiB whatever the entry count.
BLOCK_BYTES = 8 << 20
#: Source files kept open at once while consolidating (segments can number in the thousands).
MAX_OPEN_SOURCES = 64


class EpisodeRecord(NamedTuple):
    """One row of the episode table.

    Attributes:
        index: Episode number (the position in the planned episode list).
        query: Image key of the query.
        query_label: Label (mask) key of the query.
        class_id: Target class of the episode (the dataset's class id).
        supports: Image keys of the K support images, in shot order.
        support_labels: Label keys of the K support masks, in the same order.
    """

    index: int
    query: str
    query_label: str
    class_id: int
    supports: tuple[str, ...]
    support_labels: tuple[str, ...]


# --------------------------------------------------------------------------------------------- I/O


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename inside it) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def describe_os_error(err: BaseException, path: Path) -> str:
    """A one-line reason for a failed write, with the fix for the common causes."""
    code = getattr(err, "errno", None)
    if code == errno.ENOSPC:
        return f"no space left on the device holding {path.parent}; free some space and rerun"
    if code == errno.EDQUOT:
        return f"disk quota exceeded on {path.parent}; free some space"
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied writing in {path.parent}; choose a writable location"
    if code == errno.EROFS:
        return f"{path.parent} is on a read-only file system; choose a writable location"
    return f"{type(err).__name__}: {err}"


def disk_free(directory: Path) -> int:
    """Bytes available to this user on the file system holding ``directory``."""
    return shutil.disk_usage(directory).free


def _write_bytes(path: Path, data: bytes) -> None:
    """Write, flush and fsync ``data`` to a new file (plain Python I/O: a full disk is a clean OSError)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_h5(path: Path, *, what: str = "cache file", in_memory: bool = False,
              needed_bytes: int = 0) -> Iterator[h5py.File]:
    """Create an HDF5 file that appears at ``path`` complete or not at all.

    The file is written as ``path + ".tmp"``, fsynced, renamed over ``path`` and the directory
    fsynced. On any error the temporary file is removed and the error is re-raised as a
    :class:`CacheError` naming the file and the fix (a full disk included).

    HDF5 cannot survive running out of disk space: a write that fails leaves it unable to close the
    file, and closing it crashes the process (a segfault, seen with HDF5 2.0 / h5py 3.16). So the
    library is never allowed to hit a full disk: small files (``in_memory``, the segments) are
    built in memory and written with plain Python I/O; large files check ``needed_bytes`` of free
    space first.

    Args:
        path: Final path of the file.
        what: Words for error messages ("segment", "cache file", ...).
        in_memory: Build the whole file in memory, then write its bytes.
        needed_bytes: Refuse to start unless this much space is free (large files).

    Yields:
        The open, writable ``h5py.File``.

    Raises:
        CacheError: if the file cannot be written.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        if not in_memory and needed_bytes:
            free = disk_free(path.parent)
            if free < needed_bytes:
                raise CacheError(
                    f"could not write {what} {path}: about {needed_bytes / 2**20:,.1f} MiB are needed but "
                    f"{free / 2**20:,.1f} MiB are free on the device holding {path.parent}; free some space and rerun"
                )
        if in_memory:
            handle = h5py.File(f"clipprior-{uuid.uuid4().hex}.h5", "w", driver="core", backing_store=False)
            try:
                yield handle
                handle.flush()
                image = handle.id.get_file_image()
            finally:
                handle.close()
            _write_bytes(tmp, image)
        else:
            with h5py.File(tmp, "w", track_order=False) as handle:
                yield handle
            _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, (OSError, RuntimeError)) and not isinstance(err, CacheError):
            raise CacheError(f"could not write {what} {path}: {describe_os_error(err, path)}") from err
        raise
    fsync_dir(path.parent)


def open_read(path: Path, *, cache_bytes: int = 1 << 20) -> h5py.File:
    """Open a cache-layout file read-only.

    HDF5's default file locking is kept: HDF5 refuses to open one file twice in a process with
    different locking flags, so a user's plain ``h5py.File(path)`` must keep working beside us.

    Raises:
        CacheError: if the file is missing, not HDF5, or not a clipprior cache of a known version.
    """
    try:
        handle = h5py.File(path, "r", rdcc_nbytes=cache_bytes)
    except FileNotFoundError as err:
        raise CacheError(f"no prior cache at {path}") from err
    except OSError as err:
        raise CacheError(f"{path} is not a readable HDF5 file ({err}); is it a clipprior prior cache?") from err
    fmt = handle.attrs.get("format")
    if isinstance(fmt, bytes):
        fmt = fmt.decode()
    if fmt != FORMAT_NAME:
        handle.close()
        raise CacheError(f"{path} is an HDF5 file but not a clipprior prior cache (attribute format={fmt!r})")
    version = int(handle.attrs.get("format_version", -1))
    if version != FORMAT_VERSION:
        handle.close()
        raise CacheError(
            f"{path} uses cache format version {version}; this clipprior reads version {FORMAT_VERSION}"
        )
    return handle


# ----------------------------------------------------------------------------------------- indices


def _strings(ds: h5py.Dataset) -> list[str]:
    return [str(s) for s in ds.asstr()[...].reshape(-1)] if ds.size else []


@dataclass
class FileIndex:
    """Everything of a cache-layout file except the maps themselves (small enough to hold in RAM).

    Attributes:
        path: The file.
        attrs: Root attributes (``provenance`` decoded to a dict).
        image_keys: Image keys, in file order.
        image_sizes: (N, 2) original (height, width) per image.
        vtp_image: (M,) row in ``image_keys`` of each VTP entry.
        vtp_class: (M,) class id of each VTP entry.
        vtp_grid: (M, 2) patch grid (h, w) of each VTP entry.
        vvp_episode: (E,) episode index of each VVP entry.
        vvp_grid: (E, 2) patch grid (h, w) of each VVP entry.
        vvp_channels: Channels C of the VVP maps (0 when the file has none).
        episodes: Episode table rows.
    """

    path: Path
    attrs: dict[str, Any]
    image_keys: list[str]
    image_sizes: np.ndarray
    vtp_image: np.ndarray
    vtp_class: np.ndarray
    vtp_grid: np.ndarray
    vvp_episode: np.ndarray
    vvp_grid: np.ndarray
    vvp_channels: int
    episodes: list[EpisodeRecord] = field(default_factory=list)

    @classmethod
    def read(cls, handle: h5py.File) -> FileIndex:
        """Read the index of an open cache-layout file."""
        attrs: dict[str, Any] = {}
        for name, value in handle.attrs.items():
            attrs[name] = value.decode() if isinstance(value, bytes) else value
        attrs["provenance"] = json.loads(attrs.get("provenance", "{}"))
        vvp_maps = handle["vvp/maps"]
        return cls(
            path=Path(handle.filename),
            attrs=attrs,
            image_keys=_strings(handle["images/key"]),
            image_sizes=handle["images/size"][...].reshape(-1, 2),
            vtp_image=handle["vtp/image"][...],
            vtp_class=handle["vtp/class_id"][...],
            vtp_grid=handle["vtp/grid"][...].reshape(-1, 2),
            vvp_episode=handle["vvp/episode"][...],
            vvp_grid=handle["vvp/grid"][...].reshape(-1, 2),
            vvp_channels=int(vvp_maps.shape[1]) if vvp_maps.ndim == 4 else 0,
            episodes=read_episodes(handle),
        )

    @classmethod
    def load(cls, path: Path) -> FileIndex:
        """Open ``path``, read its index and close it."""
        with open_read(path, cache_bytes=0) as handle:
            return cls.read(handle)

    def vtp_keys(self) -> Iterator[tuple[str, int]]:
        """``(image_key, class_id)`` of each VTP row, in row order."""
        keys = self.image_keys
        return ((keys[i], int(c)) for i, c in zip(self.vtp_image.tolist(), self.vtp_class.tolist(), strict=True))

    def image_items(self) -> Iterator[tuple[str, tuple[int, int]]]:
        """``(image_key, (height, width))`` of each image."""
        sizes = self.image_sizes.tolist()
        return ((k, (int(s[0]), int(s[1]))) for k, s in zip(self.image_keys, sizes, strict=True))


def read_episodes(handle: h5py.File) -> list[EpisodeRecord]:
    """The episode table of an open cache-layout file, in file order."""
    group = handle["episodes"]
    indices = group["index"][...].tolist()
    if not indices:
        return []
    queries = _strings(group["query"])
    query_labels = _strings(group["query_label"])
    classes = group["class_id"][...].tolist()
    shot = int(group["support"].shape[1])
    supports = _strings(group["support"])
    support_labels = _strings(group["support_label"])
    return [
        EpisodeRecord(
            int(index), queries[row], query_labels[row], int(classes[row]),
            tuple(supports[row * shot:(row + 1) * shot]), tuple(support_labels[row * shot:(row + 1) * shot]),
        )
        for row, index in enumerate(indices)
    ]


# ------------------------------------------------------------------------------------------ writing


def pad_stack(arrays: Sequence[np.ndarray], hw: tuple[int, int]) -> np.ndarray:
    """Stack arrays of shape (..., h_i, w_i) into (N, ..., H, W), zero padded at the bottom/right.

    Example:
        >>> pad_stack([np.ones((1, 2))], (2, 2))[0].tolist()
        [[1.0, 1.0], [0.0, 0.0]]
    """
    if not arrays:
        return np.zeros((0, *hw), MAP_DTYPE)
    lead = arrays[0].shape[:-2]
    out = np.zeros((len(arrays), *lead, *hw), MAP_DTYPE)
    for i, arr in enumerate(arrays):
        out[i, ..., : arr.shape[-2], : arr.shape[-1]] = arr
    return out


def _create_dataset(group: h5py.Group, name: str, data: np.ndarray | None = None, *,
                    shape: tuple[int, ...] | None = None, dtype: Any = None, chunks: tuple[int, ...] | None = None,
                    compress: bool = False) -> h5py.Dataset:
    """Every dataset of a cache goes through here (one place to change settings, or to fail in tests)."""
    kwargs: dict[str, Any] = {"track_times": False}
    if shape is None:
        assert data is not None  # internal invariant, not user input
        shape = data.shape
    if compress and chunks is not None and all(shape):
        kwargs.update(COMPRESSION, chunks=chunks)
    return group.create_dataset(name, shape=shape, dtype=dtype if dtype is not None else data.dtype,  # type: ignore[union-attr]
                                data=data, **kwargs)


@dataclass
class MapPlan:
    """Where the rows of one map dataset of the output come from.

    Attributes:
        sources: Per output row, the index of its source in the :class:`SourceSet`.
        rows: Per output row, the row inside that source.
        grids: (M, 2) patch grid of each output row.
        lead: Leading per-row dimensions before (H, W): ``()`` for VTP, ``(C,)`` for VVP.
    """

    sources: np.ndarray
    rows: np.ndarray
    grids: np.ndarray
    lead: tuple[int, ...] = ()

    def max_hw(self) -> tuple[int, int]:
        """The padded (H, W) of the output dataset."""
        if not len(self.grids):
            return (0, 0)
        return int(self.grids[:, 0].max()), int(self.grids[:, 1].max())


class SourceSet:
    """Files whose map rows are copied into a new file, opened on demand and kept in a small LRU.

    Args:
        paths: Source files (cache layout), addressed by position.
        memory: Optional in-memory sources, addressed by ``len(paths) + i``: mappings from a dataset
            name (``"vtp/cam"``, ...) to a list of per-row arrays.
    """

    def __init__(self, paths: Sequence[Path], memory: Sequence[Mapping[str, Sequence[np.ndarray]]] = ()) -> None:
        self.paths = list(paths)
        self.memory = list(memory)
        self._open: OrderedDict[int, h5py.File] = OrderedDict()

    def _handle(self, source: int) -> h5py.File:
        handle = self._open.pop(source, None)
        if handle is None:
            handle = open_read(self.paths[source], cache_bytes=0)
            if len(self._open) >= MAX_OPEN_SOURCES:
                _, oldest = self._open.popitem(last=False)
                oldest.close()
        self._open[source] = handle
        return handle

    def read(self, source: int, name: str, rows: np.ndarray) -> Sequence[np.ndarray]:
        """Rows ``rows`` (sorted, unique) of dataset ``name`` of one source, as per-row arrays."""
        if source >= len(self.paths):
            data = self.memory[source - len(self.paths)][name]
            return [data[r] for r in rows.tolist()]
        dataset = self._handle(source)[name]
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        if hi - lo <= 2 * len(rows):  # dense: one contiguous read beats a point selection
            block = dataset[lo:hi]
            return block[rows - lo]
        return dataset[rows]

    def close(self) -> None:
        """Close every open source."""
        while self._open:
            _, handle = self._open.popitem()
            handle.close()

    def __enter__(self) -> SourceSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _copy_maps(group: h5py.Group, names: Sequence[str], plan: MapPlan, sources: SourceSet,
               progress: Callable[[int], None] | None) -> None:
    """Create the map datasets ``names`` of ``group`` and fill them block by block from ``sources``."""
    total = len(plan.rows)
    hmax, wmax = plan.max_hw()
    shape = (total, *plan.lead, hmax, wmax)
    datasets = [
        _create_dataset(group, name, shape=shape, dtype=MAP_DTYPE, chunks=(1, *plan.lead, hmax, wmax), compress=True)
        for name in names
    ]
    if not total:
        return
    row_bytes = max(1, int(np.prod(shape[1:])) * MAP_DTYPE.itemsize)
    block = max(1, BLOCK_BYTES // row_bytes)
    for start in range(0, total, block):
        stop = min(total, start + block)
        src = plan.sources[start:stop]
        rows = plan.rows[start:stop]
        buffers = [np.zeros((stop - start, *shape[1:]), MAP_DTYPE) for _ in names]
        for source in np.unique(src).tolist():
            where = np.flatnonzero(src == source)
            order = np.argsort(rows[where], kind="stable")
            where, wanted = where[order], rows[where][order]
            for buffer, name in zip(buffers, names, strict=True):
                arrays = sources.read(source, f"{group.name.strip('/')}/{name}", wanted)
                for out_row, arr in zip(where.tolist(), arrays, strict=True):
                    h, w = min(arr.shape[-2], hmax), min(arr.shape[-1], wmax)
                    buffer[out_row, ..., :h, :w] = arr[..., :h, :w]
        for dataset, buffer in zip(datasets, buffers, strict=True):
            dataset[start:stop] = buffer
        if progress is not None:
            progress(stop - start)


def _write_episodes(handle: h5py.File, episodes: Sequence[EpisodeRecord]) -> None:
    group = handle.create_group("episodes")
    shot = len(episodes[0].supports) if episodes else 0
    _create_dataset(group, "index", np.asarray([e.index for e in episodes], np.int64))
    _create_dataset(group, "query", np.asarray([e.query for e in episodes], dtype=object), dtype=STR_DTYPE)
    _create_dataset(group, "query_label", np.asarray([e.query_label for e in episodes], dtype=object),
                    dtype=STR_DTYPE)
    _create_dataset(group, "class_id", np.asarray([e.class_id for e in episodes], np.int32))
    supports = np.empty((len(episodes), shot), dtype=object)
    labels = np.empty((len(episodes), shot), dtype=object)
    for row, episode in enumerate(episodes):
        supports[row] = episode.supports
        labels[row] = episode.support_labels
    _create_dataset(group, "support", supports, dtype=STR_DTYPE)
    _create_dataset(group, "support_label", labels, dtype=STR_DTYPE)


def _attr_value(value: Any) -> Any:
    """A provenance value as an HDF5 attribute (scalars natively, anything else as JSON text)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, sort_keys=True)


def write_cache_file(
    handle: h5py.File,
    *,
    attrs: Mapping[str, Any],
    provenance: Mapping[str, Any],
    images: Sequence[tuple[str, tuple[int, int]]],
    vtp_keys: Sequence[tuple[int, int]],
    vtp_plan: MapPlan,
    vvp_episodes: Sequence[int],
    vvp_plan: MapPlan,
    episodes: Sequence[EpisodeRecord],
    sources: SourceSet,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write a complete cache-layout file into an open, empty HDF5 file.

    Callers pass everything already sorted; this function writes in the order given, so equal
    inputs give equal datasets.

    Args:
        handle: Empty, writable file.
        attrs: Root attributes besides the provenance (format, run id, timestamps, shard).
        provenance: The provenance dict (stored as canonical JSON and one attribute per key).
        images: ``(key, (height, width))`` per image.
        vtp_keys: ``(image_row, class_id)`` per VTP row.
        vtp_plan: Sources of the VTP rows (``cam`` and ``refined``).
        vvp_episodes: Episode index per VVP row.
        vvp_plan: Sources of the VVP rows (``maps``).
        episodes: Episode table.
        sources: The files (and in-memory rows) the plans point into.
        progress: Called with the number of rows copied after each block.
    """
    handle.attrs["format"] = FORMAT_NAME
    handle.attrs["format_version"] = FORMAT_VERSION
    handle.attrs["provenance"] = json.dumps(dict(provenance), sort_keys=True)
    for name, value in provenance.items():
        if value is not None:
            handle.attrs[name] = _attr_value(value)
    for name, value in attrs.items():
        handle.attrs[name] = value

    group = handle.create_group("images")
    _create_dataset(group, "key", np.asarray([k for k, _ in images], dtype=object), dtype=STR_DTYPE)
    _create_dataset(group, "size", np.asarray([s for _, s in images], np.int32).reshape(-1, 2))

    group = handle.create_group("vtp")
    keys = np.asarray(vtp_keys, np.int64).reshape(-1, 2)
    _create_dataset(group, "image", keys[:, 0].astype(np.int32))
    _create_dataset(group, "class_id", keys[:, 1].astype(np.int32))
    _create_dataset(group, "grid", np.asarray(vtp_plan.grids, np.int32).reshape(-1, 2))
    _copy_maps(group, ("cam", "refined"), vtp_plan, sources, progress)

    group = handle.create_group("vvp")
    _create_dataset(group, "episode", np.asarray(vvp_episodes, np.int64))
    _create_dataset(group, "grid", np.asarray(vvp_plan.grids, np.int32).reshape(-1, 2))
    _copy_maps(group, ("maps",), vvp_plan, sources, progress)

    _write_episodes(handle, episodes)
