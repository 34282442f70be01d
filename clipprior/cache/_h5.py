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

from clipprior.cache import _format as fmt
from clipprior.cache._format import FORMAT_NAME, FORMAT_VERSION, RESERVED_ATTRS, MapKind, Table
from clipprior.data.episodes import Episode
from clipprior.errors import CacheCorruptError, CacheError, CacheWriteError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "RESERVED_ATTRS",
    "AtomicFile",
    "FileIndex",
    "GuardedFile",
    "MapPlan",
    "SourceSet",
    "TableIndex",
    "atomic_h5",
    "fsync_dir",
    "open_read",
    "pad_stack",
    "quiet_hdf5",
    "read_rows",
    "write_cache_file",
]

STR_DTYPE = h5py.string_dtype("utf-8")
MAP_DTYPE = np.dtype("float16")
#: gzip ships with every HDF5 build (lzf does not), so any HDF5 reader can open the file.
COMPRESSION: dict[str, Any] = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
#: HDF5's Fletcher-32 checksum on every chunk of every numeric dataset (one chunk per map entry):
#: any HDF5 reader checks it on every read, so a damaged entry is never returned silently.
CHECKSUM: dict[str, Any] = {"fletcher32": True}
#: Rows copied per block when consolidating; bounds memory to a few MiB whatever the entry count.
BLOCK_BYTES = 8 << 20
#: Source files kept open at once while consolidating (segments can number in the thousands).
MAX_OPEN_SOURCES = 64


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
    if code == errno.EFBIG:
        return (f"the file grew past the largest file allowed in {path.parent} (file system limit, or the "
                "process's `ulimit -f`); raise the limit or choose another location")
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


# The system calls of GuardedFile, by name, so that tests can make them fail as a full disk would.
_pwrite = os.pwrite
_ftruncate = os.ftruncate
_fsync = os.fsync


class GuardedFile:
    """A new file for h5py's ``fileobj`` driver that never lets HDF5 see a failed write.

    HDF5 cannot survive a failed write: the file can then not be closed, h5py prints error stacks,
    and the process crashes when HDF5 shuts down (a segfault at exit, seen with HDF5 2.0 / h5py
    3.16; a SIGBUS in the field). Another process can fill the disk at any moment, so no check
    beforehand can rule that out. Through this object HDF5's writes become ``pwrite`` calls that
    are checked here: the first failure (``ENOSPC``, ``EDQUOT``, ``EIO``, ``EFBIG``, ...) is kept in
    :attr:`error`, and from then on what HDF5 writes is held in memory (4 KiB pages, read back
    where HDF5 reads), so HDF5 carries on, closes the file cleanly, and the writer raises the
    kept error at its next :meth:`check` -- after the current block of maps -- and deletes the file.
    What is held in memory is bounded by one block of maps plus what HDF5 still has to flush from its
    chunk and metadata caches.

    Args:
        path: The file to create (truncated if it exists).

    Example:
        >>> import tempfile, h5py, pathlib
        >>> guard = GuardedFile(pathlib.Path(tempfile.mkdtemp()) / "x.h5")
        >>> with h5py.File(guard, "w") as handle:
        ...     handle["x"] = [1, 2, 3]
        >>> guard.check(); guard.close()
    """

    PAGE = 1 << 12

    def __init__(self, path: Path) -> None:
        self.name = str(path)
        self.error: OSError | None = None
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._pos = 0
        self._size = 0
        self._pages: dict[int, bytearray] = {}

    # What h5py's fileobj driver calls: seek, tell, readinto, write, truncate, flush.

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        size = len(view)
        if self.error is None:
            try:
                done = 0
                while done < size:
                    done += _pwrite(self._fd, view[done:], self._pos + done)
            except OSError as err:
                self.error = err
        if self.error is not None:
            self._hold(view, self._pos)
        self._pos += size
        self._size = max(self._size, self._pos)
        return size

    def _hold(self, view: memoryview, pos: int) -> None:
        """Keep bytes HDF5 wrote after a failure, page by page, over what the file holds."""
        page_size, end = self.PAGE, pos + len(view)
        for page in range(pos // page_size, (end - 1) // page_size + 1):
            start = page * page_size
            buffer = self._pages.get(page)
            if buffer is None:
                buffer = bytearray(os.pread(self._fd, page_size, start).ljust(page_size, b"\0"))
                self._pages[page] = buffer
            lo, hi = max(pos, start), min(end, start + page_size)
            buffer[lo - start:hi - start] = view[lo - pos:hi - pos]

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        size, pos = len(view), self._pos
        data = os.pread(self._fd, size, pos)
        view[:len(data)] = data
        view[len(data):] = bytes(size - len(data))
        if self._pages and size:
            page_size = self.PAGE
            for page in range(pos // page_size, (pos + size - 1) // page_size + 1):
                held = self._pages.get(page)
                if held is not None:
                    start = page * page_size
                    lo, hi = max(pos, start), min(pos + size, start + page_size)
                    view[lo - pos:hi - pos] = held[lo - start:hi - start]
        self._pos += size
        return size

    def read(self, size: int = -1) -> bytes:
        buffer = bytearray(max(0, self._size - self._pos) if size < 0 else size)
        self.readinto(buffer)
        return bytes(buffer)

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        if self.error is None:
            try:
                _ftruncate(self._fd, size)
            except OSError as err:
                self.error = err
        self._size = size
        return size

    def flush(self) -> None:
        """Nothing is buffered here (see :meth:`fsync`)."""

    # What the writer calls.

    def check(self) -> None:
        """Raise the first failed write (an :class:`OSError`), if any."""
        if self.error is not None:
            raise self.error

    def fsync(self) -> None:
        """Flush the file to the device (raises the :class:`OSError` of a failed write first)."""
        self.check()
        _fsync(self._fd)

    def close(self) -> None:
        """Close the file descriptor (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class AtomicFile(NamedTuple):
    """What :func:`atomic_h5` yields.

    Attributes:
        handle: The open, writable ``h5py.File``.
        check: Raises the :class:`OSError` of a write that failed so far (call it between blocks of
            work, to stop early when the disk is full).
    """

    handle: h5py.File
    check: Callable[[], None]


def _no_failure() -> None:
    return None


def quiet_hdf5() -> None:
    """Turn off HDF5's printing of its error stacks to stderr for the calling thread.

    h5py turns it off when imported; HDF5 builds that keep the setting per thread would still
    print pages of ``HDF5-DIAG`` lines for an error in another thread (a writer thread), beside the
    clean error clipprior raises. Errors are still raised as exceptions; only the printing is off.
    It is not turned back on afterwards: HDF5 2.0 keeps the setting for the whole process, so
    turning it on would undo h5py's own choice in every thread.
    """
    silence = getattr(getattr(h5py, "_errors", None), "silence_errors", None)
    if silence is not None:
        silence()


@contextlib.contextmanager
def atomic_h5(path: Path, *, what: str = "cache file", in_memory: bool = False,
              needed_bytes: int = 0) -> Iterator[AtomicFile]:
    """Create an HDF5 file that appears at ``path`` complete or not at all.

    The file is written as ``temp_path(path)`` (:func:`clipprior.cache._format.temp_path`), fsynced,
    renamed over ``path`` and the directory fsynced. On any error the temporary file is removed and
    the error is re-raised; a failed write (a full disk included) becomes a :class:`CacheWriteError`
    naming the file and the fix.

    HDF5 cannot survive a failed write (it cannot close the file, and the process crashes when HDF5
    shuts down), so HDF5 is never shown one: small files (``in_memory``, the segments) are built in
    memory and written with plain Python I/O; large files are written through a
    :class:`GuardedFile`, which keeps a failed write from HDF5 and reports it through
    :attr:`AtomicFile.check`; and ``needed_bytes`` of free space are required before starting, so
    a disk that is simply too small is refused before any work.

    Args:
        path: Final path of the file.
        what: Words for error messages ("segment", "cache file", ...).
        in_memory: Build the whole file in memory, then write its bytes.
        needed_bytes: Refuse to start unless this much space is free (large files).

    Yields:
        The :class:`AtomicFile`: the open, writable ``h5py.File`` and its failure check.

    Raises:
        CacheWriteError: if the file cannot be written (full disk, quota, permissions, I/O error).
    """
    tmp = fmt.temp_path(path)
    guard: GuardedFile | None = None
    quiet_hdf5()
    try:
        if not in_memory and needed_bytes:
            free = disk_free(path.parent)
            if free < needed_bytes:
                raise CacheWriteError(
                    f"could not write {what} {path}: about {needed_bytes / 2**20:,.1f} MiB are needed but "
                    f"{free / 2**20:,.1f} MiB are free on the device holding {path.parent}; free some space "
                    "and rerun", path=path, errno=errno.ENOSPC,
                )
        if in_memory:
            handle = h5py.File(f"clipprior-{uuid.uuid4().hex}.h5", "w", driver="core", backing_store=False)
            try:
                yield AtomicFile(handle, _no_failure)
                handle.flush()
                image = handle.id.get_file_image()
            finally:
                handle.close()
            _write_bytes(tmp, image)
        else:
            guard = GuardedFile(tmp)
            with h5py.File(guard, "w", track_order=False) as handle:
                yield AtomicFile(handle, guard.check)
            guard.fsync()  # raises a write that failed while HDF5 closed the file, first
            guard.close()
        os.replace(tmp, path)
    except BaseException as err:
        failed = guard.error if guard is not None else None
        if guard is not None:
            guard.close()
        with contextlib.suppress(OSError):
            tmp.unlink()
        if failed is not None and isinstance(err, Exception) and not isinstance(err, CacheError):
            err = failed  # the failed write is the cause of whatever followed it
        if isinstance(err, (OSError, RuntimeError)) and not isinstance(err, CacheError):
            raise CacheWriteError(f"could not write {what} {path}: {describe_os_error(err, path)}", path=path,
                                  errno=getattr(err, "errno", None)) from err
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
    name = handle.attrs.get(fmt.ATTR_FORMAT)
    if isinstance(name, bytes):
        name = name.decode()
    if name != FORMAT_NAME:
        handle.close()
        raise CacheError(f"{path} is an HDF5 file but not a clipprior prior cache (attribute format={name!r})")
    version = int(handle.attrs.get(fmt.ATTR_VERSION, -1))
    if version not in fmt.READABLE_VERSIONS:
        handle.close()
        raise CacheError(
            f"{path} uses cache format version {version}; this clipprior reads versions "
            f"{sorted(fmt.READABLE_VERSIONS)}; upgrade clipprior (or rerun precompute) to read it"
        )
    return handle


# ----------------------------------------------------------------------------------------- indices


def _strings(ds: h5py.Dataset) -> list[str]:
    return [str(s) for s in ds.asstr()[...].reshape(-1)] if ds.size else []


def damaged(path: Path | str, entry: str, err: BaseException) -> CacheCorruptError:
    """The error for an entry (or index dataset) of ``path`` that fails its checksum or cannot be decoded."""
    reason = str(err).strip() or type(err).__name__
    return CacheCorruptError(
        f"{path} is damaged: {entry} cannot be read ({reason}); run `clipprior verify {path}` to list every "
        "damaged entry, then recompute the file (or restore a copy)",
        path=path, entry=entry,
    )


def read_entry(dataset: h5py.Dataset, row: int, path: Path | str, entry: str) -> np.ndarray:
    """Row ``row`` of a map dataset.

    Raises:
        CacheCorruptError: naming ``path`` and ``entry`` if the row's chunk is damaged.
    """
    try:
        return dataset[row]
    except OSError as err:
        raise damaged(path, entry, err) from err


def read_rows(dataset: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` (sorted, unique, non-empty) of a dataset, stacked.

    Dense selections are read as one contiguous slab and then indexed (much faster than HDF5's
    point selection); sparse ones with a point selection.
    """
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    if hi - lo <= 2 * len(rows):
        return dataset[lo:hi][rows - lo]
    return dataset[rows]


@dataclass
class TableIndex:
    """The keys and grids of one entry table (see :class:`clipprior.cache._format.Table`).

    Attributes:
        keys: Row keys, in row order: ``(image_key, class_id)``, an episode index or an image key.
        grids: (M, 2) patch grid (h, w) per row.
        channels: ``{kind name: C}`` for the table's (C, h, w) kinds (0 when the file has none).
    """

    keys: list[Any]
    grids: np.ndarray
    channels: dict[str, int] = field(default_factory=dict)


def _read_keys(handle: h5py.File, table: Table, image_keys: Sequence[str]) -> list[Any]:
    columns = [handle[path][...].reshape(-1).tolist() for path, _ in table.key_columns]
    by_image = table.keyed_by in ("image_class", "image")
    if by_image and columns[0] and (min(columns[0]) < 0 or max(columns[0]) >= len(image_keys)):
        raise CacheError(f"{handle.filename}: {table.key_columns[0][0]} points outside {fmt.IMAGES_KEY}; "
                         "the file is damaged: recompute it (or restore a copy)")
    if table.keyed_by == "image_class":
        return [(image_keys[i], int(c)) for i, c in zip(*columns, strict=True)]
    if table.keyed_by == "image":
        return [image_keys[i] for i in columns[0]]
    return [int(e) for e in columns[0]]


def _encode_keys(table: Table, keys: Sequence[Any], image_row: Mapping[str, int]) -> list[np.ndarray]:
    if table.keyed_by == "image_class":
        values = [[image_row[k[0]] for k in keys], [k[1] for k in keys]]
    elif table.keyed_by == "image":
        values = [[image_row[k] for k in keys]]
    else:
        values = [list(keys)]
    return [np.asarray(v, dtype).reshape(-1) for v, (_, dtype) in zip(values, table.key_columns, strict=True)]


@dataclass
class FileIndex:
    """Everything of a cache-layout file except the maps themselves (small enough to hold in RAM).

    Attributes:
        path: The file.
        attrs: Root attributes (``provenance`` decoded to a dict).
        image_keys: Image keys, in file order.
        image_sizes: (N, 2) original (height, width) per image.
        tables: ``{group: TableIndex}`` for every table of :data:`clipprior.cache._format.TABLES`
            (a table the file lacks is empty).
        episodes: Episode table rows.
    """

    path: Path
    attrs: dict[str, Any]
    image_keys: list[str]
    image_sizes: np.ndarray
    tables: dict[str, TableIndex]
    episodes: list[Episode] = field(default_factory=list)

    @classmethod
    def read(cls, handle: h5py.File) -> FileIndex:
        """Read the index of an open cache-layout file.

        Raises:
            CacheCorruptError: if an index table fails its checksum or cannot be decoded.
            CacheError: if a table the format requires is absent.
        """
        try:
            return cls._read(handle)
        except OSError as err:
            raise damaged(handle.filename, "an index table (images, entry keys, grids or episodes)", err) from err
        except KeyError as err:
            raise CacheError(f"{handle.filename} lacks a table of the cache format ({err}); the file is damaged "
                             "or was not written by clipprior") from err

    @classmethod
    def _read(cls, handle: h5py.File) -> FileIndex:
        attrs: dict[str, Any] = {}
        for name, value in handle.attrs.items():
            attrs[name] = value.decode() if isinstance(value, bytes) else value
        attrs[fmt.ATTR_PROVENANCE] = json.loads(attrs.get(fmt.ATTR_PROVENANCE, "{}"))
        image_keys = _strings(handle[fmt.IMAGES_KEY])
        tables: dict[str, TableIndex] = {}
        for table in fmt.TABLES.values():
            if table.group not in handle:  # a table declared after this file was written
                tables[table.group] = TableIndex([], np.zeros((0, 2), np.int64))
                continue
            channels = {}
            for k in fmt.kinds_of(table.group):
                if k.channels:
                    maps = handle[k.name]
                    channels[k.name] = int(maps.shape[1]) if maps.ndim == 4 else 0
            tables[table.group] = TableIndex(_read_keys(handle, table, image_keys),
                                             handle[table.grid][...].reshape(-1, 2), channels)
        return cls(
            path=Path(handle.filename),
            attrs=attrs,
            image_keys=image_keys,
            image_sizes=handle[fmt.IMAGES_SIZE][...].reshape(-1, 2),
            tables=tables,
            episodes=read_episodes(handle),
        )

    @classmethod
    def load(cls, path: Path) -> FileIndex:
        """Open ``path``, read its index and close it."""
        with open_read(path, cache_bytes=0) as handle:
            return cls.read(handle)

    def image_items(self) -> Iterator[tuple[str, tuple[int, int]]]:
        """``(image_key, (height, width))`` of each image."""
        sizes = self.image_sizes.tolist()
        return ((k, (int(s[0]), int(s[1]))) for k, s in zip(self.image_keys, sizes, strict=True))


def read_episodes(handle: h5py.File) -> list[Episode]:
    """The episode table of an open cache-layout file, in file order, each episode numbered."""
    group = handle[fmt.EPISODES]
    c_index, c_query, c_label, c_class, c_support, c_support_label = fmt.EPISODE_COLUMNS
    indices = group[c_index][...].tolist()
    if not indices:
        return []
    queries = _strings(group[c_query])
    query_labels = _strings(group[c_label])
    classes = group[c_class][...].tolist()
    shot = int(group[c_support].shape[1])
    supports = _strings(group[c_support])
    support_labels = _strings(group[c_support_label])
    pairs = list(zip(supports, support_labels, strict=True))
    return [
        Episode(queries[row], query_labels[row], int(classes[row]), tuple(pairs[row * shot:(row + 1) * shot]),
                int(index))
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
    numeric = (dtype if dtype is not None else data.dtype) is not STR_DTYPE  # type: ignore[union-attr]
    if numeric and all(shape):
        kwargs.update(CHECKSUM)
        kwargs.setdefault("chunks", chunks if chunks is not None else True)
    return group.create_dataset(name, shape=shape, dtype=dtype if dtype is not None else data.dtype,  # type: ignore[union-attr]
                                data=data, **kwargs)


@dataclass
class MapPlan:
    """Where the rows of one table of the output come from.

    Attributes:
        sources: Per output row, the index of its source in the :class:`SourceSet`.
        rows: Per output row, the row inside that source.
        grids: (M, 2) patch grid of each output row.
        channels: ``{kind name: C}`` for the table's (C, h, w) kinds.
    """

    sources: np.ndarray
    rows: np.ndarray
    grids: np.ndarray
    channels: dict[str, int] = field(default_factory=dict)

    def max_hw(self) -> tuple[int, int]:
        """The padded (H, W) of the output datasets."""
        if not len(self.grids):
            return (0, 0)
        return int(self.grids[:, 0].max()), int(self.grids[:, 1].max())

    def lead(self, kind: MapKind) -> tuple[int, ...]:
        """Leading per-row dimensions of ``kind`` before (H, W): ``()`` or ``(C,)``."""
        return (self.channels.get(kind.name, 0),) if kind.channels else ()


class SourceSet:
    """Files whose map rows are copied into a new file, opened on demand and kept in a small LRU.

    Args:
        paths: Source files (cache layout), addressed by position.
        memory: Optional in-memory sources, addressed by ``len(paths) + i``: mappings from a map
            kind's name (e.g. ``vtp/cam``) to a list of per-row arrays.
        indices: The :class:`FileIndex` of each path, to name a damaged entry by its key.
    """

    def __init__(self, paths: Sequence[Path], memory: Sequence[Mapping[str, Sequence[np.ndarray]]] = (),
                 indices: Sequence[FileIndex] = ()) -> None:
        self.paths = list(paths)
        self.memory = list(memory)
        self.indices = list(indices)
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
        try:
            return read_rows(dataset, rows)
        except OSError:
            pass
        out = []
        for row in rows.tolist():  # find the damaged entry, to name it
            out.append(read_entry(dataset, row, self.paths[source], self._describe(source, name, row)))
        return out  # pragma: no cover - a block that fails as a whole but not row by row

    def _describe(self, source: int, name: str, row: int) -> str:
        table = fmt.kind(name).table
        if source < len(self.indices):
            keys = self.indices[source].tables[table].keys
            if row < len(keys):
                return f"{name} {keys[row]!r}"
        return f"{name} row {row}"

    def close(self) -> None:
        """Close every open source."""
        while self._open:
            _, handle = self._open.popitem()
            handle.close()

    def __enter__(self) -> SourceSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _copy_maps(group: h5py.Group, kinds: Sequence[MapKind], plan: MapPlan, sources: SourceSet,
               progress: Callable[[int], None] | None, check: Callable[[], None] = _no_failure) -> None:
    """Create the map datasets of ``kinds`` in ``group`` and fill them block by block from ``sources``.

    ``check`` is called after each block (it raises when a write has failed: see :class:`AtomicFile`).
    """
    total = len(plan.rows)
    hmax, wmax = plan.max_hw()
    shapes = [(total, *plan.lead(k), hmax, wmax) for k in kinds]
    datasets = [
        _create_dataset(group, k.name.split("/", 1)[1], shape=shape, dtype=k.dtype, chunks=(1, *shape[1:]),
                        compress=True)
        for k, shape in zip(kinds, shapes, strict=True)
    ]
    if not total:
        return
    row_bytes = max(1, sum(int(np.prod(s[1:])) * np.dtype(k.dtype).itemsize for k, s in zip(kinds, shapes,
                                                                                            strict=True)))
    block = max(1, BLOCK_BYTES * len(kinds) // row_bytes)
    for start in range(0, total, block):
        stop = min(total, start + block)
        src = plan.sources[start:stop]
        rows = plan.rows[start:stop]
        buffers = [np.zeros((stop - start, *s[1:]), k.dtype) for k, s in zip(kinds, shapes, strict=True)]
        for source in np.unique(src).tolist():
            where = np.flatnonzero(src == source)
            order = np.argsort(rows[where], kind="stable")
            where, wanted = where[order], rows[where][order]
            for buffer, k in zip(buffers, kinds, strict=True):
                arrays = sources.read(source, k.name, wanted)
                for out_row, arr in zip(where.tolist(), arrays, strict=True):
                    h, w = min(arr.shape[-2], hmax), min(arr.shape[-1], wmax)
                    buffer[out_row, ..., :h, :w] = arr[..., :h, :w]
        for dataset, buffer in zip(datasets, buffers, strict=True):
            dataset[start:stop] = buffer
        check()
        if progress is not None:
            progress(stop - start)


def _write_episodes(handle: h5py.File, episodes: Sequence[Episode]) -> None:
    group = handle.create_group(fmt.EPISODES)
    c_index, c_query, c_label, c_class, c_support, c_support_label = fmt.EPISODE_COLUMNS
    shot = episodes[0].shot if episodes else 0
    _create_dataset(group, c_index, np.asarray([e.index for e in episodes], np.int64))
    _create_dataset(group, c_query, np.asarray([e.query_image for e in episodes], dtype=object), dtype=STR_DTYPE)
    _create_dataset(group, c_label, np.asarray([e.query_label for e in episodes], dtype=object),
                    dtype=STR_DTYPE)
    _create_dataset(group, c_class, np.asarray([e.class_id for e in episodes], np.int32))
    supports = np.empty((len(episodes), shot), dtype=object)
    labels = np.empty((len(episodes), shot), dtype=object)
    for row, episode in enumerate(episodes):
        supports[row] = episode.support_images
        labels[row] = episode.support_labels
    _create_dataset(group, c_support, supports, dtype=STR_DTYPE)
    _create_dataset(group, c_support_label, labels, dtype=STR_DTYPE)


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
    tables: Mapping[str, tuple[Sequence[Any], MapPlan]],
    episodes: Sequence[Episode],
    sources: SourceSet,
    progress: Callable[[int], None] | None = None,
    check: Callable[[], None] = _no_failure,
) -> None:
    """Write a complete cache-layout file into an open, empty HDF5 file.

    Callers pass everything already sorted; this function writes in the order given, so equal
    inputs give equal datasets.

    Args:
        handle: Empty, writable file.
        attrs: Root attributes besides the provenance (format, run id, timestamps, shard).
        provenance: The provenance dict (stored as canonical JSON and one attribute per key).
        images: ``(key, (height, width))`` per image.
        tables: ``{group: (keys, plan)}`` for every table of
            :data:`clipprior.cache._format.TABLES`: the row keys (as in :class:`TableIndex`) and
            the sources of the rows of every map kind of the table.
        episodes: Episode table.
        sources: The files (and in-memory rows) the plans point into.
        progress: Called with the number of rows copied after each block.
        check: Called after each block; raises to stop when a write has failed (see :class:`AtomicFile`).
    """
    handle.attrs[fmt.ATTR_FORMAT] = FORMAT_NAME
    handle.attrs[fmt.ATTR_VERSION] = FORMAT_VERSION
    handle.attrs[fmt.ATTR_PROVENANCE] = json.dumps(dict(provenance), sort_keys=True)
    for name, value in provenance.items():
        if value is not None:
            handle.attrs[name] = _attr_value(value)
    for name, value in attrs.items():
        handle.attrs[name] = value

    image_path, size_path = fmt.IMAGES_KEY.split("/"), fmt.IMAGES_SIZE.split("/")
    group = handle.create_group(image_path[0])
    _create_dataset(group, image_path[1], np.asarray([k for k, _ in images], dtype=object), dtype=STR_DTYPE)
    _create_dataset(group, size_path[1], np.asarray([s for _, s in images], np.int32).reshape(-1, 2))
    image_row = {key: row for row, (key, _) in enumerate(images)}

    for table in fmt.TABLES.values():
        keys, plan = tables[table.group]
        if table.optional and not keys:
            continue
        group = handle.create_group(table.group)
        for (path, _), column in zip(table.key_columns, _encode_keys(table, keys, image_row), strict=True):
            _create_dataset(group, path.split("/", 1)[1], column)
        _create_dataset(group, table.grid.split("/", 1)[1], np.asarray(plan.grids, np.int32).reshape(-1, 2))
        _copy_maps(group, fmt.kinds_of(table.group), plan, sources, progress, check)

    _write_episodes(handle, episodes)
