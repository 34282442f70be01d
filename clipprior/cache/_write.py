"""The crash-safe streaming writer of prior caches, and the merge of shard files.

See :mod:`clipprior.cache` for the overview and ``docs/cache-format.md`` for the layout.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipprior.cache import _format as fmt
from clipprior.cache import _h5
from clipprior.cache._format import check_shard, parts_dir, segment_name, segment_number, shard_path
from clipprior.cache._h5 import FileIndex
from clipprior.cache._union import (
    SourceUnion,
    as_episode,
    check_int,
    check_key,
    mismatch_error,
    missing_entries,
    normalize_provenance,
    now_utc,
    provenance_diff,
    to_map,
)
from clipprior.data.episodes import Episode
from clipprior.errors import CacheError, CacheWriteError, InvalidInputError

try:  # POSIX advisory locks; released by the kernel when a process dies, even by SIGKILL.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["CacheWriter", "merge_caches", "shard_from_environment"]

_DEFAULT_BUFFER_BYTES = 64 << 20
_MANIFEST = fmt.MANIFEST_NAME
_LOCK = fmt.LOCK_NAME


# ------------------------------------------------------------------------------------------- paths


def shard_from_environment(environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """``(rank, world_size)`` when running under ``torchrun`` (or any launcher setting RANK/WORLD_SIZE).

    Args:
        environ: Environment to read (default: ``os.environ``).

    Returns:
        The shard of this process, or ``None`` for a single process (WORLD_SIZE unset or 1).

    Raises:
        InvalidInputError: if RANK/WORLD_SIZE are set but not valid integers.

    Example:
        >>> shard_from_environment({"RANK": "1", "WORLD_SIZE": "4"})
        (1, 4)
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return None
    try:
        world = int(env["WORLD_SIZE"])
        rank = int(env.get("RANK", "0"))
    except ValueError:
        raise InvalidInputError(
            f"RANK={env.get('RANK')!r} / WORLD_SIZE={env.get('WORLD_SIZE')!r} are not integers"
        ) from None
    return None if world == 1 else check_shard((rank, world))


# ------------------------------------------------------------------------------------------ writer


class CacheWriter:
    """Streams priors into a crash-safe, resumable cache file.

    Work is buffered in memory (bounded by ``max_buffer_bytes``) and committed as segment files in
    ``OUT.parts/``; each commit is atomic, so a process killed at any moment (SIGKILL included)
    loses at most the uncommitted entries. Creating a writer for a path with committed segments (or
    a finished file) resumes: :meth:`has_vtp` / :meth:`has_vvp` report what is done, and new
    entries are added to it. :meth:`finalize` writes ``OUT`` atomically and removes ``OUT.parts``.

    Args:
        path: Final cache file (``--out``); with ``shard`` the writer writes
            :func:`shard_path` of it instead (see :attr:`path`).
        provenance: JSON-serialisable settings the priors depend on (clipprior version, model id,
            weights sha256, ``PriorConfig.to_json()``, dataset, fold, split, ...). Resuming or
            appending with a different dict raises :class:`CacheMismatchError`.
        shard: ``(index, count)`` when this process computes one shard of a job split over
            ``count`` processes (see :func:`merge_caches`).
        max_buffer_bytes: Uncommitted map bytes after which the writer commits by itself.

    Raises:
        CacheMismatchError: if ``path`` (or its unfinished run) holds other settings; the message
            lists each ``name: cached=X requested=Y``.
        CacheError: if the output location is not writable, the file is not a cache, or another
            process is writing the same path.
        InvalidInputError: if ``provenance`` or ``shard`` is malformed.

    Example:
        >>> import numpy as np, tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "p.h5"
        >>> episodes = [(0, "q.jpg", "q.png", 3, ["s.jpg"], ["s.png"])]
        >>> with CacheWriter(out, {"fold": 0}) as w:
        ...     w.set_episodes(episodes)
        ...     w.add_image("q.jpg", 32, 32)
        ...     if not w.has_vtp("q.jpg", 3):
        ...         w.add_vtp("q.jpg", 3, np.zeros((2, 2)), np.zeros((2, 2)))
        ...     w.add_vvp(0, np.zeros((2, 2, 2)))
        ...     w.finalize().name
        'p.h5'
    """

    def __init__(self, path: str | os.PathLike[str], provenance: Mapping[str, Any], *,
                 shard: tuple[int, int] | None = None, max_buffer_bytes: int = _DEFAULT_BUFFER_BYTES) -> None:
        self.provenance = normalize_provenance(provenance)
        self.shard = None if shard is None else check_shard(shard)
        self.path = Path(path) if self.shard is None else shard_path(path, *self.shard)
        self.parts = parts_dir(self.path)
        self.max_buffer_bytes = int(max_buffer_bytes)
        self._lock_fd: int | None = None
        self._closed = False
        self._segments: list[Path] = []
        self._run_id = ""
        self._created = ""
        self._union = SourceUnion()
        self._base: FileIndex | None = None
        self._reset_buffer()
        self._open()

    # -- lifecycle ---------------------------------------------------------------------------------

    def _open(self) -> None:
        if self.path.is_dir():
            raise CacheError(f"{self.path} is a directory; give a file name for the cache, e.g. {self.path}/priors.h5")
        base = FileIndex.load(self.path) if self.path.exists() else None
        if base is not None:
            self._check_provenance(base.attrs[fmt.ATTR_PROVENANCE], self.path)
            if self.shard is None and fmt.ATTR_SHARD_INDEX in base.attrs:
                raise CacheError(f"{self.path} is a shard file; merge it with `clipprior merge` instead of appending")
            if self.shard is not None:
                self._check_shard_file(base)
        manifest = self._read_manifest()
        if manifest is not None and not any(self.parts.glob(fmt.SEGMENT_GLOB)):
            manifest = None  # a run that committed nothing: no work to protect, start afresh
        if manifest is not None:
            self._check_provenance(manifest.get(fmt.ATTR_PROVENANCE, {}), self.parts)
        try:
            try:
                self.parts.mkdir(parents=True, exist_ok=True)
                self._lock()
            except OSError as err:
                reason = _h5.describe_os_error(err, self.parts / _LOCK)
                raise CacheError(f"cannot write the cache at {self.path}: {reason}") from err
            self._recover(base, manifest)
        except BaseException:
            self._release()
            raise

    def _check_shard_file(self, base: FileIndex) -> None:
        """A finished file at a shard's path must be that shard (of this job), or it is never taken as done."""
        kind = base.attrs.get(fmt.ATTR_KIND)
        index, count = base.attrs.get(fmt.ATTR_SHARD_INDEX), base.attrs.get(fmt.ATTR_SHARD_COUNT)
        if kind != fmt.FILE_SHARD or index is None or (int(index), int(count)) != self.shard:
            found = f"shard {index}/{count}" if index is not None else f"a {kind or 'foreign'} file"
            raise CacheError(
                f"{self.path} should hold shard {self.shard[0]}/{self.shard[1]} but holds {found} (was it overwritten, "
                f"e.g. by `clipprior merge`?); move it away or delete it and rerun to compute this shard again"
            )

    def _read_manifest(self) -> dict[str, Any] | None:
        path = self.parts / _MANIFEST
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise CacheError(f"unreadable run manifest {path} ({err}); delete {self.parts} to start over") from err

    def _check_provenance(self, cached: Mapping[str, Any], where: Path) -> None:
        diff = provenance_diff(cached, self.provenance)
        if diff:
            raise mismatch_error(where, diff, "settings")

    def _lock(self) -> None:
        self._lock_fd = os.open(self.parts / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:  # pragma: no cover - Windows
            return
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheError(
                f"another process is writing {self.path} (lock {self.parts / _LOCK}); wait for it to finish or stop it"
            ) from None

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _recover(self, base: FileIndex | None, manifest: dict[str, Any] | None) -> None:
        """Remove debris of a killed run and load the state of the committed work."""
        for debris in [*self.parts.glob(fmt.TEMP_GLOB), fmt.temp_path(self.path)]:
            with contextlib.suppress(FileNotFoundError):
                debris.unlink()
        segments = sorted(self.parts.glob(fmt.SEGMENT_GLOB))
        run_id = fmt.ATTR_RUN_ID
        if manifest is not None and base is not None and base.attrs.get(run_id) == manifest.get(run_id):
            # Killed after the final file was renamed into place but before the parts were removed.
            self._remove_parts(segments, keep_lock=True)
            manifest, segments = None, []
        if manifest is None:
            if segments:
                raise CacheError(f"{self.parts} holds segments but no manifest; delete it to start over")
            manifest = {
                fmt.ATTR_FORMAT: fmt.FORMAT_NAME, fmt.ATTR_VERSION: fmt.FORMAT_VERSION,
                fmt.ATTR_RUN_ID: uuid.uuid4().hex, fmt.ATTR_CREATED: now_utc(), fmt.ATTR_PROVENANCE: self.provenance,
                fmt.MANIFEST_SHARD: list(self.shard) if self.shard else None,
            }
            self._write_json_atomic(self.parts / _MANIFEST, manifest)
        self._run_id = str(manifest[fmt.ATTR_RUN_ID])
        created = manifest[fmt.ATTR_CREATED]
        self._created = str(base.attrs.get(fmt.ATTR_CREATED, created) if base else created)
        indices = [base] if base is not None else []
        for segment in segments:
            index = FileIndex.load(segment)
            if index.attrs.get(fmt.ATTR_RUN_ID) != self._run_id:
                raise CacheError(f"segment {segment} belongs to another run; delete {self.parts} to start over")
            indices.append(index)
        self._union = SourceUnion(indices)
        self._segments = segments
        self._base = base

    def _write_json_atomic(self, path: Path, data: Mapping[str, Any]) -> None:
        tmp = fmt.temp_path(path)
        try:
            with open(tmp, "w") as fh:
                json.dump(data, fh, sort_keys=True, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as err:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise CacheError(f"could not write {path}: {_h5.describe_os_error(err, path)}") from err
        _h5.fsync_dir(path.parent)

    def _remove_parts(self, segments: Iterable[Path], *, keep_lock: bool = False) -> None:
        # The manifest goes after the segments: segments without a manifest are never left behind.
        for path in [*segments, self.parts / _MANIFEST, *([] if keep_lock else [self.parts / _LOCK])]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if not keep_lock:
            with contextlib.suppress(OSError):
                self.parts.rmdir()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if self._closed:
            return
        try:
            self.commit()
        except CacheError:
            if exc is None:
                raise  # nothing else to report: this is the error
        finally:
            self.close()

    def close(self) -> None:
        """Release the lock without finalizing; uncommitted entries are dropped (call :meth:`commit` first).

        Committed segments stay for the next run to resume; a run that committed nothing leaves
        nothing behind.
        """
        if not self._closed and self._lock_fd is not None and not self._segments:
            self._remove_parts(())
        self._closed = True
        self._release()

    # -- queries -----------------------------------------------------------------------------------

    def has_image(self, image_key: str) -> bool:
        """Whether the image's size is recorded."""
        return image_key in self._union.images or image_key in self._buf_images

    def has_vtp(self, image_key: str, class_id: int) -> bool:
        """Whether the VTP of ``(image_key, class_id)`` is cached (committed or buffered)."""
        key = (image_key, int(class_id))
        return key in self._union.vtp or key in self._buf[fmt.VTP.group]

    def has_vvp(self, episode_index: int) -> bool:
        """Whether the VVP of episode ``episode_index`` is cached (committed or buffered)."""
        return int(episode_index) in self._union.vvp or int(episode_index) in self._buf[fmt.VVP.group]

    def has_query_features(self, image_key: str) -> bool:
        """Whether the query features of ``image_key`` are cached (``--store features``)."""
        return image_key in self._union.tables[fmt.QFEAT.group] or image_key in self._buf[fmt.QFEAT.group]

    def has_support_features(self, image_key: str, class_id: int) -> bool:
        """Whether the support features of ``(image_key, class_id)`` are cached (``--store features``)."""
        key = (image_key, int(class_id))
        return key in self._union.tables[fmt.SFEAT.group] or key in self._buf[fmt.SFEAT.group]

    @property
    def episodes(self) -> list[Episode]:
        """The episode table as known so far, sorted by index."""
        return [self._union.episodes[i] for i in sorted(self._union.episodes)]

    @property
    def pending(self) -> int:
        """Entries (images, VTP, VVP) added since the last commit."""
        return len(self._buf_images) + sum(len(entries) for entries in self._buf.values())

    def _check_open(self) -> None:
        if self._closed:
            raise CacheError(f"the writer of {self.path} is closed (finalized or failed); create a new CacheWriter")

    # -- adding ------------------------------------------------------------------------------------

    def _reset_buffer(self) -> None:
        self._buf_images: dict[str, tuple[int, int]] = {}
        # Per table of the format, per key: one array per map kind of the table, in declared order.
        self._buf: dict[str, dict[Any, tuple[np.ndarray, ...]]] = {name: {} for name in fmt.TABLES}
        self._buf_episodes: list[Episode] = []
        self._buf_bytes = 0

    def add_image(self, image_key: str, height: int, width: int) -> None:
        """Record an image's original size (needed before its VTP; repeat calls must agree).

        Args:
            image_key: The dataset's key of the image (e.g. its path relative to the data root).
            height: Original height in pixels.
            width: Original width in pixels.

        Raises:
            InvalidInputError: on a bad key or size, or a size other than the one recorded.
        """
        self._check_open()
        key = check_key(image_key, "image_key")
        size = (check_int(height, "height", minimum=1), check_int(width, "width", minimum=1))
        known = self._union.images.get(key, self._buf_images.get(key))
        if known is not None:
            if known != size:
                raise InvalidInputError(f"image {key!r} was recorded with size {known}, now {size}")
            return
        self._buf_images[key] = size

    def add_vtp(self, image_key: str, class_id: int, cam: Any, refined: Any) -> None:
        """Add the VTP of one ``(image, class)``: raw Grad-CAM and PIR-refined map.

        Args:
            image_key: Key given to :meth:`add_image` before.
            class_id: The dataset's class id.
            cam: (h, w) raw Grad-CAM on the image's patch grid (numpy or torch), values in [0, 1].
            refined: (h, w) PIR-refined map on the same grid.

        Raises:
            InvalidInputError: unknown image, entry already cached (check :meth:`has_vtp` first),
                shapes that disagree, or non-finite values.
            CacheError: if an automatic commit fails (disk full, ...).
        """
        self._check_open()
        key = (check_key(image_key, "image_key"), check_int(class_id, "class_id"))
        if not self.has_image(key[0]):
            raise InvalidInputError(f"image {key[0]!r} has no recorded size; call add_image() before add_vtp()")
        if self.has_vtp(*key):
            raise InvalidInputError(f"VTP {key} is cached already; check has_vtp() before computing it")
        cam_arr = to_map(cam, 2, f"VTP cam of {key}")
        refined_arr = to_map(refined, 2, f"VTP refined of {key}")
        if cam_arr.shape != refined_arr.shape:
            raise InvalidInputError(f"VTP {key}: cam {cam_arr.shape} and refined {refined_arr.shape} differ in shape")
        self._add(fmt.VTP.group, key, (cam_arr, refined_arr))

    def add_vvp(self, episode_index: int, vvp: Any) -> None:
        """Add the VVP of one episode.

        Args:
            episode_index: An episode of the table given to :meth:`set_episodes`.
            vvp: (C, h, w) on the query's patch grid, C = 2K channels (every VVP of a cache has the
                same C).

        Raises:
            InvalidInputError: unknown episode, entry already cached, bad shape or values.
            CacheError: if an automatic commit fails.
        """
        self._check_open()
        index = check_int(episode_index, "episode_index", minimum=0)
        if index not in self._union.episodes:
            raise InvalidInputError(f"episode {index} is not in the episode table; call set_episodes() first")
        if self.has_vvp(index):
            raise InvalidInputError(f"VVP of episode {index} is cached already; check has_vvp() before computing it")
        arr = self._checked_channels(to_map(vvp, 3, f"VVP of episode {index}"), f"VVP of episode {index}",
                                     fmt.VVP_MAPS)
        self._add(fmt.VVP.group, index, (arr,))

    def _checked_channels(self, arr: np.ndarray, what: str, *kinds: fmt.MapKind) -> np.ndarray:
        """``arr`` if its channel count is the file's for the first of ``kinds`` that has one."""
        channels = next((c for c in (self._channels(k.name) for k in kinds) if c), 0)
        if channels and arr.shape[0] != channels:
            raise InvalidInputError(f"{what} has {arr.shape[0]} channels; the cache has {channels}")
        return arr

    def add_query_features(self, image_key: str, features: Any) -> None:
        """Add the VVP-layer features of one query image (``--store features``).

        Args:
            image_key: Key given to :meth:`add_image` before.
            features: (L * D, h, w) unit feature vectors on the image's VVP grid (see
                :func:`clipprior.cache._features.feature_map`); stored as float16.

        Raises:
            InvalidInputError: unknown image, entry already cached, bad shape or values, or a
                channel count other than the cache's.
            CacheError: if an automatic commit fails.
        """
        self._check_open()
        key = check_key(image_key, "image_key")
        if not self.has_image(key):
            raise InvalidInputError(f"image {key!r} has no recorded size; call add_image() before add_query_features()")
        if self.has_query_features(key):
            raise InvalidInputError(f"query features of {key!r} are cached already; check has_query_features()")
        what = f"query features of {key!r}"
        arr = self._checked_channels(to_map(features, 3, what), what, fmt.QFEAT_FEATURES, fmt.SFEAT_FEATURES)
        self._add(fmt.QFEAT.group, key, (arr,))

    def add_support_features(self, image_key: str, class_id: int, features: Any, mask: Any) -> None:
        """Add the masked features of one (support image, class) (``--store features``).

        Args:
            image_key: Key given to :meth:`add_image` before.
            class_id: The class whose mask selected the cells.
            features: (L * D, h, w) unit feature vectors, zero outside the mask (see
                :func:`clipprior.cache._features.feature_map`); stored as float16.
            mask: (h, w) the support's mask on its VVP grid (1 foreground, 0 elsewhere).

        Raises:
            InvalidInputError: unknown image, entry already cached, bad shapes or values.
            CacheError: if an automatic commit fails.
        """
        self._check_open()
        key = (check_key(image_key, "image_key"), check_int(class_id, "class_id"))
        if not self.has_image(key[0]):
            raise InvalidInputError(f"image {key[0]!r} has no recorded size; call add_image() first")
        if self.has_support_features(*key):
            raise InvalidInputError(f"support features of {key} are cached already; check has_support_features()")
        what = f"support features of {key}"
        arr = self._checked_channels(to_map(features, 3, what), what, fmt.SFEAT_FEATURES, fmt.QFEAT_FEATURES)
        grid = to_map(mask, 2, f"support mask of {key}")
        if arr.shape[1:] != grid.shape:
            raise InvalidInputError(f"{what}: grid {arr.shape[1:]} and mask {grid.shape} differ")
        self._add(fmt.SFEAT.group, key, (arr, grid))

    def set_episodes(self, episodes: Iterable[Any]) -> None:
        """Record the episode table (once per run; the same table again on resume is a no-op).

        Args:
            episodes: Numbered :class:`~clipprior.data.Episode` s (``episode.index`` set, as
                :func:`~clipprior.precompute.episode_records` numbers them), or rows of the table:
                6-tuples / mappings / objects with the fields
                ``(index, query, query_label, class_id, supports, support_labels)``.

        Raises:
            CacheMismatchError: if an episode differs from the cached one with the same index.
            InvalidInputError: on malformed rows or a shot that differs between episodes.
        """
        self._check_open()
        records = [as_episode(e) for e in episodes]
        added = [r for r in records if self._union.add_episode(r, self.path)]
        if added:
            self._buf_episodes.extend(added)
            self.commit()

    def _channels(self, kind: str) -> int:
        """C of a (C, h, w) kind so far: committed, else buffered, else 0."""
        if self._union.channels.get(kind):
            return self._union.channels[kind]
        position = fmt.kinds_of(fmt.kind(kind).table).index(fmt.kind(kind))
        return next((v[position].shape[0] for v in self._buf[fmt.kind(kind).table].values()), 0)

    def _add(self, table: str, key: Any, arrays: tuple[np.ndarray, ...]) -> None:
        """Buffer one entry of ``table``: one validated array per map kind of the table, in declared order."""
        self._buf[table][key] = arrays
        self._buf_bytes += sum(a.nbytes for a in arrays)
        if self._buf_bytes >= self.max_buffer_bytes:
            self.commit()

    # -- committing --------------------------------------------------------------------------------

    def commit(self) -> int:
        """Write the buffered entries as one atomic segment.

        Returns:
            The number of entries committed (0 when nothing was pending).

        Raises:
            CacheError: if the segment cannot be written (disk full, ...). Committed work is kept and
                the buffer too, so the call can be retried.
        """
        self._check_open()
        if not (self.pending or self._buf_episodes):
            return 0
        number = segment_number(self._segments[-1]) + 1 if self._segments else 0
        path = self.parts / segment_name(number)
        # The segment is the union of one in-memory source (source 0: no files) holding the buffer.
        segment = SourceUnion()
        memory: dict[str, list[np.ndarray]] = {k.name: [] for k in fmt.MAP_KINDS}
        # A segment's image table covers the images its rows are keyed by, whatever segment
        # recorded the image first.
        for name, entries in self._buf.items():
            keyed_by = fmt.TABLES[name].keyed_by
            if keyed_by in ("image_class", "image"):
                for key in entries:
                    image_key = key[0] if keyed_by == "image_class" else key
                    segment.images[image_key] = self._union.images.get(image_key) or self._buf_images[image_key]
        segment.images.update(self._buf_images)
        for name, entries in self._buf.items():
            kinds = fmt.kinds_of(name)
            for row, (key, arrays) in enumerate(entries.items()):
                for k, arr in zip(kinds, arrays, strict=True):
                    memory[k.name].append(arr)
                    if k.channels:
                        segment.channels[k.name] = arr.shape[0]
                segment.tables[name][key] = (0, row, (arrays[0].shape[-2], arrays[0].shape[-1]))
        for record in self._buf_episodes:
            segment.episodes[record.index] = record
        segment.write(path, provenance=self.provenance,
                      attrs={fmt.ATTR_KIND: fmt.FILE_SEGMENT, fmt.ATTR_RUN_ID: self._run_id},
                      memory=[memory], what="segment")
        self._union.append(FileIndex.load(path))
        self._segments.append(path)
        count = self.pending
        self._reset_buffer()
        return count

    def finalize(self, *, require_complete: bool | None = None,
                 progress: Callable[[int, int], None] | None = None) -> Path:
        """Commit, consolidate everything into :attr:`path` atomically, remove the parts and close.

        The final file lists images, VTP and VVP sorted by key, so it does not depend on the order
        of work or on interruptions: an interrupted and resumed run gives the same datasets as an
        uninterrupted one.

        Args:
            require_complete: Refuse to finalize while an episode lacks its query VTP or its VVP
                (default: on for a whole run, off for a shard).
            progress: Called as ``progress(done, total)`` entries while writing.

        Returns:
            The path of the finished file.

        Raises:
            CacheWriteError: if the file cannot be written (the disk filled up, by this run or by
                another process, a quota, an I/O error): the half-written file is removed, the
                committed segments stay, so rerunning the same command once there is room finishes
                the cache, equal to an uninterrupted run.
            CacheError: if entries are missing (``require_complete``).
        """
        self._check_open()
        self.commit()
        if require_complete is None:
            require_complete = self.shard is None
        if require_complete:
            missing = missing_entries(self._union)
            if missing:
                shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                raise CacheError(f"cannot finalize {self.path}: {len(missing)} expected entries are missing ({shown}); "
                                 "rerun the computation to add them")
        if self._segments or self._base is None:
            attrs: dict[str, Any] = {fmt.ATTR_KIND: fmt.FILE_SHARD if self.shard else fmt.FILE_CACHE,
                                     fmt.ATTR_RUN_ID: self._run_id, fmt.ATTR_CREATED: self._created,
                                     fmt.ATTR_FINALIZED: now_utc()}
            if self.shard:
                attrs.update({fmt.ATTR_SHARD_INDEX: self.shard[0], fmt.ATTR_SHARD_COUNT: self.shard[1]})
            done, total = 0, self._union.entry_count()

            def step(n: int) -> None:
                nonlocal done
                done += n
                if progress is not None:
                    progress(done, total)

            try:
                self._union.write(self.path, provenance=self.provenance, attrs=attrs, progress=step)
            except CacheWriteError as err:
                kept = (f"; nothing computed is lost: the {len(self._segments)} committed segment(s) stay in "
                        f"{self.parts}, and rerunning the same command writes {self.path.name} from them (another "
                        "--out, on a disk with room, computes everything again)" if self._segments else "")
                raise CacheWriteError(f"{err}{kept}", path=err.path, errno=err.errno) from err
        self._remove_parts(self._segments)
        self.close()
        return self.path


# ------------------------------------------------------------------------------------------ merge


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (same inode when both exist, else same resolved path)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def merge_caches(paths: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *, overwrite: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> Path:
    """Merge the shard files of one job into the cache a single run would have written.

    Args:
        paths: All shard files of the job (``OUT.shard-I-of-N.h5``), in any order.
        out: The merged cache file.
        overwrite: Replace ``out`` if it exists.
        progress: Called as ``progress(done, total)`` entries while writing.

    Returns:
        ``out`` as a :class:`~pathlib.Path`.

    Raises:
        CacheMismatchError: if the shards were written with different settings or episode tables.
        CacheError: if a shard is missing or repeated, an input is not a shard, an episode lacks
            an entry, or ``out`` exists (without ``overwrite``) or cannot be written.

    Example:
        >>> # after: torchrun --nproc-per-node 4 -m clipprior.cli.main precompute ... --out priors.h5
        >>> # merge_caches(sorted(Path().glob("priors.shard-*-of-4.h5")), "priors.h5")
    """
    if not paths:
        raise CacheError("no shard files given; pass every OUT.shard-I-of-N.h5 of the job")
    out = Path(out)
    for p in paths:
        if _same_file(out, Path(p)):
            raise CacheError(f"the output {out} is also an input ({p}); merging onto an input would destroy that "
                             "shard: write the merged cache to another path")
    if out.exists() and not overwrite:
        raise CacheError(f"{out} exists; remove it or pass overwrite=True (--overwrite)")
    indices = [FileIndex.load(Path(p)) for p in paths]
    shards: dict[int, FileIndex] = {}
    counts = set()
    for idx in indices:
        if fmt.ATTR_SHARD_INDEX not in idx.attrs:
            raise CacheError(f"{idx.path} is not a shard file (no shard_index attribute); merge takes shard files")
        index, count = int(idx.attrs[fmt.ATTR_SHARD_INDEX]), int(idx.attrs[fmt.ATTR_SHARD_COUNT])
        counts.add(count)
        if index in shards:
            raise CacheError(f"shard {index} is given twice: {shards[index].path} and {idx.path}")
        shards[index] = idx
    if len(counts) != 1:
        raise CacheError(f"the files come from jobs with different shard counts {sorted(counts)}")
    count = counts.pop()
    absent = [i for i in range(count) if i not in shards]
    if absent:
        names = ", ".join(str(shard_path(out, i, count)) for i in absent)
        raise CacheError(f"missing shard(s) {absent} of {count}: expected {names}")
    ordered = [shards[i] for i in range(count)]
    first = ordered[0]
    for idx in ordered[1:]:
        diff = provenance_diff(first.attrs[fmt.ATTR_PROVENANCE], idx.attrs[fmt.ATTR_PROVENANCE])
        if diff:
            raise mismatch_error(idx.path, diff, f"settings of {first.path}")
    union = SourceUnion(ordered)
    missing = missing_entries(union)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CacheError(f"the {count} shards do not cover every episode: {len(missing)} entries missing ({shown})")
    created = min(str(i.attrs.get(fmt.ATTR_CREATED, "")) for i in ordered)
    attrs = {fmt.ATTR_KIND: fmt.FILE_CACHE, fmt.ATTR_RUN_ID: uuid.uuid4().hex, fmt.ATTR_CREATED: created,
             fmt.ATTR_FINALIZED: now_utc()}
    done, total = 0, union.entry_count()

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    out.parent.mkdir(parents=True, exist_ok=True)
    union.write(out, provenance=first.attrs[fmt.ATTR_PROVENANCE], attrs=attrs, progress=step)
    return out

