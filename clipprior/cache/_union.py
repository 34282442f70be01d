"""Provenance comparison, input validation and the union of cache sources (consolidation and merge).

Example:
    >>> provenance_diff({"fold": 0}, {"fold": 1})
    {'fold': (0, 1)}
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from clipprior.cache import _format as fmt
from clipprior.cache import _h5
from clipprior.cache._h5 import FileIndex, MapPlan, SourceSet
from clipprior.data.episodes import Episode
from clipprior.errors import CacheError, CacheMismatchError, InvalidInputError

__all__ = [
    "DESCRIPTIVE_KEYS",
    "Gap",
    "SourceUnion",
    "as_episode",
    "check_int",
    "check_key",
    "coverage_gaps",
    "episode_row",
    "mismatch_error",
    "missing_entries",
    "normalize_provenance",
    "now_utc",
    "provenance_diff",
    "to_map",
]

_MISSING = "<missing>"

#: Provenance keys that say where the inputs were found, not what was computed: recorded, never
#: compared. The same weights given as ``./clip``, ``clip/`` or a copy are one computation (they
#: are identified by ``weights_sha256``), and a dataset moved elsewhere is the same data (its lists
#: are identified by ``list_sha256``).
DESCRIPTIVE_KEYS = frozenset({"model", "data_root"})


# -------------------------------------------------------------------------------------- provenance


def normalize_provenance(provenance: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(provenance, Mapping):
        raise InvalidInputError(f"provenance must be a dict, got {type(provenance).__name__}")
    bad = [k for k in provenance if not isinstance(k, str) or not k or k in fmt.RESERVED_ATTRS]
    if bad:
        raise InvalidInputError(
            f"provenance keys {bad!r} are not allowed (empty, not a string, or reserved: {sorted(fmt.RESERVED_ATTRS)})"
        )
    try:
        return json.loads(json.dumps(dict(provenance), sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise InvalidInputError(f"provenance must be JSON-serialisable (str, int, float, bool, list, dict): {err}") \
            from None


def _expand(value: Any) -> Any:
    """A dict, or a string holding a JSON object (such as ``PriorConfig.to_json()``), as a dict."""
    if isinstance(value, str) and value.startswith("{"):
        with contextlib.suppress(ValueError):
            parsed = json.loads(value)
            if isinstance(parsed, dict):
                return parsed
    return value


def provenance_diff(cached: Mapping[str, Any], requested: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Settings that differ between two provenance dicts, as ``{name: (cached, requested)}``.

    Nested settings (the prior config, stored as JSON) are compared field by field and reported as
    ``"config.field"``. A setting present on one side only shows ``"<missing>"`` on the other.
    The :data:`DESCRIPTIVE_KEYS` (where the weights and data were found) are not compared.

    Example:
        >>> provenance_diff({"fold": 0, "config": '{"pir_layers": 8}'}, {"fold": 1, "config": '{"pir_layers": 4}'})
        {'config.pir_layers': (8, 4), 'fold': (0, 1)}
    """
    return _diff(cached, requested, DESCRIPTIVE_KEYS)


def _diff(cached: Mapping[str, Any], requested: Mapping[str, Any], skip: frozenset[str]) -> dict[str, tuple[Any, Any]]:
    out: dict[str, tuple[Any, Any]] = {}
    for name in sorted((set(cached) | set(requested)) - skip):
        a, b = _expand(cached.get(name, _MISSING)), _expand(requested.get(name, _MISSING))
        if isinstance(a, dict) and isinstance(b, dict):
            out.update({f"{name}.{k}": v for k, v in _diff(a, b, frozenset()).items()})
        elif a != b:
            out[name] = (a, b)
    return out


def mismatch_error(path: Path, diff: Mapping[str, tuple[Any, Any]], what: str) -> CacheMismatchError:
    lines = "\n".join(f"  {name}: cached={a!r} requested={b!r}" for name, (a, b) in diff.items())
    err = CacheMismatchError(
        f"{path} was written with other settings than the requested {what}; rerun with the cached settings, "
        f"or choose another output (or delete it) to start over. Differences:\n{lines}"
    )
    err.differences = dict(diff)  # type: ignore[attr-defined]
    return err


# -------------------------------------------------------------------------------------- validation


def check_key(key: Any, what: str) -> str:
    if not isinstance(key, str) or not key or "\x00" in key:
        raise InvalidInputError(f"{what} must be a non-empty string without NUL characters, got {key!r}")
    return key


def check_int(value: Any, what: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidInputError(f"{what} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise InvalidInputError(f"{what} must be >= {minimum}, got {value}")
    return int(value)


def to_map(x: Any, ndim: int, what: str) -> np.ndarray:
    """A prior as a C-contiguous float16 array of ``ndim`` dims, every value finite in float16."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    try:
        arr = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise InvalidInputError(f"{what} is not a numeric array: {err}") from None
    if arr.ndim != ndim or min(arr.shape, default=0) < 1:
        raise InvalidInputError(f"{what} must have {ndim} non-empty dims, got shape {tuple(arr.shape)}")
    with np.errstate(over="ignore"):  # out-of-range values become inf and are refused just below
        out = np.ascontiguousarray(arr.astype(_h5.MAP_DTYPE))
    if not np.isfinite(out).all():
        raise InvalidInputError(f"{what} has NaN/inf values (or values beyond float16's range ±65504)")
    return out


def episode_row(episode: Episode) -> tuple[Any, ...]:
    """``episode`` as a row of the episode table: the values of :data:`~clipprior.cache._format.EPISODE_FIELDS`."""
    return (episode.index, episode.query_image, episode.query_label, episode.class_id, episode.support_images,
            episode.support_labels)


def as_episode(obj: Any) -> Episode:
    """Coerce a numbered :class:`~clipprior.data.Episode`, or a row of the episode table, into a checked Episode.

    A row is a 6-sequence, a mapping or an object with the fields :data:`~clipprior.cache._format.EPISODE_FIELDS`
    (``index, query, query_label, class_id, supports, support_labels``: image keys and label keys
    in two columns, as stored).

    Raises:
        InvalidInputError: an unnumbered episode (use ``episode.numbered(i)``), a malformed row, an
            empty key or no supports.
    """
    names = fmt.EPISODE_FIELDS
    if isinstance(obj, Episode):
        if obj.index is None:
            raise InvalidInputError(f"episode {obj!r} has no index; number it with episode.numbered(i) "
                                    "(its position in the planned list)")
        values = list(episode_row(obj))
    elif isinstance(obj, Mapping):
        values = [obj.get(n) for n in names]
    elif isinstance(obj, Sequence) and not isinstance(obj, str) and len(obj) == len(names):
        values = list(obj)
    elif all(hasattr(obj, n) for n in names):
        values = [getattr(obj, n) for n in names]
    else:
        raise InvalidInputError(f"cannot read an episode from {obj!r}; give a numbered clipprior.data.Episode "
                                f"or a row with fields {names}")
    index = check_int(values[0], "episode index", minimum=0)
    query = check_key(values[1], f"episode {index} query")
    query_label = check_key(values[2], f"episode {index} query_label")
    class_id = check_int(values[3], f"episode {index} class_id")
    if isinstance(values[4], str) or isinstance(values[5], str):
        raise InvalidInputError(f"episode {index}: supports and support_labels must be sequences of keys")
    supports = tuple(check_key(s, f"episode {index} support") for s in values[4])
    labels = tuple(check_key(s, f"episode {index} support label") for s in values[5])
    if not supports or len(supports) != len(labels):
        raise InvalidInputError(
            f"episode {index}: needs K >= 1 supports and as many support labels, got {len(supports)} and {len(labels)}"
        )
    return Episode(query, query_label, class_id, tuple(zip(supports, labels, strict=True)), index)


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------- consolidation


class Gap(NamedTuple):
    """An entry an episode needs that a cache lacks.

    Its two wordings, :attr:`entry` (``finalize`` and ``merge``) and :attr:`problem` (``verify``),
    are the one home of the coverage messages.

    Attributes:
        episode: The episode's index.
        what: ``"image"`` (the query's size), ``"vtp"`` (the query's VTP for the episode class) or ``"vvp"``.
        record: The episode.
    """

    episode: int
    what: str
    record: Episode

    @property
    def entry(self) -> str:
        """The missing entry, as ``finalize`` and ``merge`` list it (``"VVP of episode 3"``)."""
        e = self.record
        return {
            "image": f"image size of {e.query_image!r}",
            "vtp": f"VTP ({e.query_image!r}, class {e.class_id})",
            "vvp": f"VVP of episode {e.index}",
        }[self.what]

    @property
    def problem(self) -> str:
        """The gap as ``verify`` reports it, episode first (``"episode 3: VVP is missing"``)."""
        e = self.record
        return {
            "image": f"episode {e.index}: no image size for query {e.query_image!r}",
            "vtp": f"episode {e.index}: VTP ({e.query_image!r}, class {e.class_id}) is missing",
            "vvp": f"episode {e.index}: VVP is missing",
        }[self.what]


def coverage_gaps(episodes: Iterable[Episode], images: Container[str], vtp: Container[tuple[str, int]],
                  vvp: Container[int]) -> list[Gap]:
    """What each episode needs (query image size, query VTP for its class, its VVP) and is not there.

    The one coverage rule of a cache: ``finalize``, ``merge`` and ``verify`` all apply it.
    """
    gaps: list[Gap] = []
    for episode in episodes:
        if episode.query_image not in images:
            gaps.append(Gap(episode.index, "image", episode))
        if (episode.query_image, episode.class_id) not in vtp:
            gaps.append(Gap(episode.index, "vtp", episode))
        if episode.index not in vvp:
            gaps.append(Gap(episode.index, "vvp", episode))
    return gaps


def missing_entries(index: SourceUnion) -> list[str]:
    """What the episode table needs but the union lacks (query VTP, VVP, query image size), de-duplicated."""
    gaps = coverage_gaps(index.episodes.values(), index.images, index.vtp, index.vvp)
    return list(dict.fromkeys(g.entry for g in gaps))


Entry = tuple[int, int, tuple[int, int]]


class SourceUnion:
    """The de-duplicated union of cache-layout sources (indices only, no maps), and its sorted writing.

    Finalizing a run (the finished file plus the segments), merging shards and writing a segment
    from memory are all "write the union of these sources".

    Attributes:
        indices: The source files, in priority order (an entry is taken from the first source
            holding it).
        images: ``{image_key: (height, width)}``.
        tables: ``{group: {key: (source, row, (h, w))}}`` per table of
            :data:`clipprior.cache._format.TABLES`; ``source`` indexes ``indices``, then the
            in-memory sources given to :meth:`write`.
        channels: ``{kind name: C}`` of the (C, h, w) map kinds (0 while there are none).
        episodes: ``{episode_index: Episode}``.
    """

    def __init__(self, indices: Sequence[FileIndex] = ()) -> None:
        self.indices: list[FileIndex] = []
        self.images: dict[str, tuple[int, int]] = {}
        self.tables: dict[str, dict[Any, Entry]] = {name: {} for name in fmt.TABLES}
        self.channels: dict[str, int] = {k.name: 0 for k in fmt.MAP_KINDS if k.channels}
        self.episodes: dict[int, Episode] = {}
        for idx in indices:
            self.append(idx)

    @property
    def vtp(self) -> dict[tuple[str, int], Entry]:
        """``{(image_key, class_id): (source, row, (h, w))}``."""
        return self.tables[fmt.VTP.group]

    @property
    def vvp(self) -> dict[int, Entry]:
        """``{episode_index: (source, row, (h, w))}``."""
        return self.tables[fmt.VVP.group]

    def set_channels(self, kind: str, channels: int, where: Path | str) -> None:
        """Record C of a (C, h, w) kind.

        Raises:
            CacheError: if it disagrees with an earlier source.
        """
        known = self.channels.get(kind, 0)
        if known and channels != known:
            title = fmt.kind(kind).title
            raise CacheError(f"{title} has {known} channels in one part and {channels} in {where}")
        self.channels[kind] = channels

    def append(self, idx: FileIndex) -> None:
        """Add a source after the others (its entries lose to theirs).

        Raises:
            CacheError: if an image size or a channel count disagrees with earlier sources.
            CacheMismatchError: if an episode disagrees with an earlier source.
        """
        source = len(self.indices)
        self.indices.append(idx)
        for key, size in idx.image_items():
            known = self.images.setdefault(key, size)
            if known != size:
                raise CacheError(f"image {key!r} has size {known} in one part and {size} in {idx.path}")
        for name, table in idx.tables.items():
            entries = self.tables[name]
            if table.keys:
                for kind, channels in table.channels.items():
                    self.set_channels(kind, channels, idx.path)
            for row, (key, grid) in enumerate(zip(table.keys, table.grids.tolist(), strict=True)):
                entries.setdefault(key, (source, row, (int(grid[0]), int(grid[1]))))
        for record in idx.episodes:
            self.add_episode(record, idx.path)
    def add_episode(self, record: Episode, where: Path) -> bool:
        """Add one numbered episode; ``False`` if it was known already, :class:`CacheMismatchError` on a conflict."""
        known = self.episodes.get(record.index)
        if known is None:
            if self.episodes:
                shot = next(iter(self.episodes.values())).shot
                if record.shot != shot:
                    raise CacheMismatchError(
                        f"episode {record.index} has {record.shot} supports but the cached episodes have "
                        f"{shot} ({where}); every episode of a cache has the same shot"
                    )
            self.episodes[record.index] = record
            return True
        if known != record:
            diff = {f"episode {record.index}.{f}": (a, b)
                    for f, a, b in zip(fmt.EPISODE_FIELDS, episode_row(known), episode_row(record), strict=True)
                    if a != b}
            raise mismatch_error(where, diff, "episode table")
        return False

    def write(self, out: Path, *, provenance: Mapping[str, Any], attrs: Mapping[str, Any],
              memory: Sequence[Mapping[str, Sequence[np.ndarray]]] = (),
              progress: Callable[[int], None] | None = None, what: str = "cache file") -> None:
        """Write the union, sorted by key, atomically to ``out``.

        With ``memory`` sources (a segment: bounded by the writer's buffer) the file is built in
        memory; otherwise its size is estimated from the source files and that much free space is
        required before writing (see :func:`clipprior.cache._h5.atomic_h5`).
        """
        needed = int(1.1 * sum(i.path.stat().st_size for i in self.indices)) + (1 << 20)
        images = sorted(self.images.items())
        tables: dict[str, tuple[list[Any], MapPlan]] = {}
        for name, entries in self.tables.items():
            keys = sorted(entries)
            rows = [entries[k] for k in keys]
            tables[name] = (keys, MapPlan(
                sources=np.asarray([e[0] for e in rows], np.int64),
                rows=np.asarray([e[1] for e in rows], np.int64),
                grids=np.asarray([e[2] for e in rows], np.int64).reshape(-1, 2),
                channels={k.name: self.channels[k.name] for k in fmt.kinds_of(name) if k.channels},
            ))
        with SourceSet([i.path for i in self.indices], memory, self.indices) as sources, \
                _h5.atomic_h5(out, what=what, in_memory=bool(memory), needed_bytes=needed) as target:
            _h5.write_cache_file(
                target.handle, attrs=attrs, provenance=provenance, images=images, tables=tables,
                episodes=[self.episodes[i] for i in sorted(self.episodes)], sources=sources, progress=progress,
                check=target.check,
            )

    def entry_count(self) -> int:
        """Entries of every table (the unit of progress bars)."""
        return sum(len(entries) for entries in self.tables.values())
