"""What ``clipprior inspect`` and ``clipprior verify`` compute: a cache's summary and its structural check.

Both stream the maps block by block (bounded memory) and look only at each entry's own grid, never
at the zero padding around it.

Example:
    >>> report = CheckReport(problems=[], episodes=2, entries={"vtp": 2, "vvp": 2})
    >>> report.ok, report.vtp
    (True, 2)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np

from clipprior.cache import _format as fmt
from clipprior.cache import _h5
from clipprior.cache._format import MapKind
from clipprior.cache._h5 import FileIndex
from clipprior.cache._read import PriorCache
from clipprior.cache._union import coverage_gaps
from clipprior.errors import CacheError, ConfigError

__all__ = ["CheckReport", "check_cache", "summarize_cache"]

Progress = Callable[[int, int], None]


def _blocks(handle: h5py.File, kind: MapKind, grids: np.ndarray, rows: np.ndarray,
            on_damaged: Callable[[int, OSError], None]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(rows, values, mask)`` blocks of a map dataset: float32 values and the valid-grid mask.

    A block that cannot be read (a chunk failing its checksum or decompression) is read again row
    by row; each damaged row goes to ``on_damaged(row, error)`` and is left out of the block.

    Args:
        handle: Open cache.
        kind: The map kind to read.
        grids: (M, 2) grids of its table.
        rows: Sorted rows to read.
        on_damaged: Called for each row that cannot be read.

    Yields:
        rows (B,), values (B, [C,] H, W) float32, mask broadcastable to values (True inside each grid).
    """
    dataset = handle[kind.name]
    if not len(rows):
        return
    row_bytes = max(1, int(np.prod(dataset.shape[1:])) * dataset.dtype.itemsize)
    block = max(1, _h5.BLOCK_BYTES // row_bytes)
    hh = np.arange(dataset.shape[-2])
    ww = np.arange(dataset.shape[-1])
    for start in range(0, len(rows), block):
        chunk = rows[start:start + block]
        try:
            values = _h5.read_rows(dataset, chunk)
        except OSError:
            good, parts = [], []
            for row in chunk.tolist():
                try:
                    parts.append(dataset[row])
                except OSError as err:
                    on_damaged(row, err)
                    continue
                good.append(row)
            if not good:
                continue
            chunk = np.asarray(good, np.int64)
            values = np.stack(parts)
        g = grids[chunk]
        mask = (hh[None, :, None] < g[:, 0, None, None]) & (ww[None, None, :] < g[:, 1, None, None])
        if dataset.ndim == 4:
            mask = mask[:, None]
        yield chunk, values.astype(np.float32), mask


@dataclass
class _Moments:
    entries: int = 0
    count: int = 0
    nonfinite: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    low: float = float("inf")
    high: float = float("-inf")

    def add(self, values: np.ndarray, mask: np.ndarray) -> None:
        self.entries += len(values)
        mask = np.broadcast_to(mask, values.shape)
        selected = values[mask]
        finite = np.isfinite(selected)
        self.nonfinite += int((~finite).sum())
        selected = selected[finite].astype(np.float64)
        if selected.size:
            self.count += selected.size
            self.total += float(selected.sum())
            self.total_sq += float((selected * selected).sum())
            self.low = min(self.low, float(selected.min()))
            self.high = max(self.high, float(selected.max()))

    def as_dict(self) -> dict[str, Any]:
        mean = self.total / self.count if self.count else None
        var = max(0.0, self.total_sq / self.count - mean * mean) if mean is not None else None
        return {
            "entries": self.entries, "values": self.count, "nonfinite": self.nonfinite,
            "min": self.low if self.count else None, "max": self.high if self.count else None,
            "mean": mean, "std": var ** 0.5 if var is not None else None,
        }


def _range(array: np.ndarray) -> dict[str, list[int]] | None:
    array = array.reshape(-1, 2)
    if not len(array):
        return None
    return {"min": [int(v) for v in array.min(0)], "max": [int(v) for v in array.max(0)]}


def _dataset_info(dataset: h5py.Dataset) -> dict[str, Any]:
    return {
        "shape": list(dataset.shape), "dtype": str(dataset.dtype),
        "chunks": list(dataset.chunks) if dataset.chunks else None,
        "compression": dataset.compression,
        "stored_bytes": int(dataset.id.get_storage_size()),
        "raw_bytes": int(dataset.size * dataset.dtype.itemsize) if dataset.dtype.kind != "O" else None,
    }


def summarize_cache(path: str | os.PathLike[str] | PriorCache, *, max_entries: int | None = None,
                    progress: Progress | None = None) -> dict[str, Any]:
    """Provenance, counts, sizes and value statistics of a cache, as JSON-serialisable data.

    Args:
        path: A finished cache (or shard) file, or a :class:`PriorCache` of one.
        max_entries: Compute value statistics on at most this many evenly spaced entries per map
            (``None``: all of them).
        progress: Called as ``progress(done, total)`` entries while reading maps.

    Returns:
        A dict with keys ``path``, ``file_bytes``, ``attrs``, ``provenance``, ``counts``,
        ``geometry``, ``datasets`` and ``values`` (per map: entries, values, nonfinite, min, max,
        mean, std over each entry's own grid).

    Raises:
        CacheError: if the file is missing, unfinished or not a cache.

    Example:
        >>> summarize_cache("priors.h5")["counts"]["vtp"]  # doctest: +SKIP
        1460
    """
    cache = path if isinstance(path, PriorCache) else PriorCache(path)
    with _h5.open_read(cache.path) as handle:
        index = FileIndex.read(handle)
        return _summarize(cache, handle, index, max_entries, progress)


def _summarize(cache: PriorCache, handle: h5py.File, index: FileIndex, max_entries: int | None,
               progress: Progress | None) -> dict[str, Any]:
    classes: dict[str, int] = {}
    for _, cid in cache.vtp_keys():
        classes[str(cid)] = classes.get(str(cid), 0) + 1
    counts: dict[str, Any] = {"images": len(index.image_keys)}
    counts.update({name: len(table.keys) for name, table in index.tables.items()})
    counts.update({"episodes": len(cache.episodes), "shot": cache.shot})
    for name, table in index.tables.items():
        counts.update({f"{name}_channels": c for c in table.channels.values()})
    counts["classes"] = dict(sorted(classes.items(), key=lambda kv: int(kv[0])))
    geometry = {"image_size": _range(index.image_sizes)}
    geometry.update({f"{name}_grid": _range(table.grids) for name, table in index.tables.items()})
    summary: dict[str, Any] = {
        "path": str(cache.path),
        "file_bytes": cache.path.stat().st_size,
        "attrs": {k: (v.item() if isinstance(v, np.generic) else v) for k, v in sorted(cache.attrs.items())},
        "provenance": cache.provenance,
        "counts": counts,
        "geometry": geometry,
        "datasets": {},
        "values": {},
    }
    groups = [fmt.IMAGES_KEY.split("/")[0], *fmt.TABLES, fmt.EPISODES]
    for group in groups:
        for name, dataset in handle[group].items() if group in handle else ():
            summary["datasets"][f"{group}/{name}"] = _dataset_info(dataset)
    plans = {}
    for kind in _stored_kinds(handle):
        n = handle[kind.name].shape[0]
        if max_entries is not None and n > max_entries:
            plans[kind] = np.unique(np.linspace(0, n - 1, max_entries).round().astype(np.int64))
        else:
            plans[kind] = np.arange(n)
    done, total = 0, sum(len(rows) for rows in plans.values())
    for kind, rows in plans.items():
        moments = _Moments()
        keys = index.tables[kind.table].keys

        def fail(row: int, err: OSError, kind: MapKind = kind, keys: list[Any] = keys) -> None:
            raise _h5.damaged(cache.path, f"{kind.name} {keys[row]!r}", err) from err

        for chunk, values, mask in _blocks(handle, kind, index.tables[kind.table].grids, rows, fail):
            moments.add(values, mask)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
        summary["values"][kind.name] = moments.as_dict()
    return summary


def _stored_kinds(handle: h5py.File) -> list[MapKind]:
    """The declared map kinds this file holds (a file may predate a kind)."""
    return [k for k in fmt.MAP_KINDS if k.name in handle]


@dataclass
class CheckReport:
    """Outcome of :func:`check_cache`.

    Attributes:
        problems: One line per problem found (empty when the cache is sound).
        episodes: Episodes checked.
        entries: ``{table group: entries checked for finite values}`` per table of
            :data:`~clipprior.cache.TABLES`, in that order (an optional table the file has no rows
            of counts 0).
        notes: What was not checked, and why (e.g. coverage of a shard).
        damaged: Every entry that fails its checksum or cannot be decoded, as ``"KIND KEY"``.
    """

    problems: list[str] = field(default_factory=list)
    episodes: int = 0
    entries: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No problem found."""
        return not self.problems

    @property
    def vtp(self) -> int:
        """VTP entries checked (``entries["vtp"]``)."""
        return self.entries.get(fmt.VTP.group, 0)

    @property
    def vvp(self) -> int:
        """VVP entries checked (``entries["vvp"]``)."""
        return self.entries.get(fmt.VVP.group, 0)

    def describe_entries(self) -> str:
        """The entries checked, in words: each table the format requires, and each optional one with rows.

        Example:
            >>> CheckReport(entries={"vtp": 1460, "vvp": 1000, "qfeat": 0, "sfeat": 0}).describe_entries()
            '1,460 VTP and 1,000 VVP entries'
        """
        parts = [f"{self.entries.get(name, 0):,} {table.title}" for name, table in fmt.TABLES.items()
                 if not table.optional or self.entries.get(name)]
        words = parts[-1] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"
        return f"{words} entries"


def check_cache(path: str | os.PathLike[str] | PriorCache, *, progress: Progress | None = None) -> CheckReport:
    """Check that every entry the episode table needs is present, well-formed and finite.

    For each episode: the query image's size, the query's VTP for the episode class (raw and
    refined) and the episode's VVP must be cached (not for a shard, which holds only part of
    them: see ``notes``). Every map must hold only finite values inside
    its grid, grids must fit the datasets, and the VVP channel count must be
    ``len(config.vvp_layers) * K``.

    Args:
        path: A finished cache (or shard) file, or a :class:`PriorCache` of one.
        progress: Called as ``progress(done, total)`` entries while reading maps.

    Returns:
        A :class:`CheckReport`; ``report.ok`` is ``True`` for a sound cache.

    Raises:
        CacheError: if the file is missing, unfinished or not a cache.

    Example:
        >>> check_cache("priors.h5").ok  # doctest: +SKIP
        True
    """
    cache = path if isinstance(path, PriorCache) else PriorCache(path)
    with _h5.open_read(cache.path) as handle:
        return _check(cache, handle, FileIndex.read(handle), progress)


def _check(cache: PriorCache, handle: h5py.File, index: FileIndex, progress: Progress | None) -> CheckReport:
    report = CheckReport(episodes=len(cache.episodes))
    shard = cache.shard
    if shard is not None:
        report.notes.append(f"shard {shard[0]}/{shard[1]}: holds part of the episodes' entries; coverage is checked "
                            "by `clipprior merge` (or verify the merged file)")
    else:
        vtp = index.tables[fmt.VTP.group].keys
        vvp = index.tables[fmt.VVP.group].keys
        gaps = coverage_gaps(cache.episodes, set(index.image_keys), set(vtp), set(vvp))
        report.problems.extend(g.problem for g in gaps)
    vvp_table = index.tables[fmt.VVP.group]
    channels, shot = vvp_table.channels.get(fmt.VVP_MAPS.name, 0), cache.shot
    if vvp_table.keys and shot:
        try:
            layers = len(cache.config.vvp_layers)
        except (CacheError, ConfigError, ValueError):
            layers = None
        if layers is not None and channels != layers * shot:
            report.problems.append(f"VVP has {channels} channels; expected len(vvp_layers) x K = {layers} x {shot}")
        elif channels % shot:
            report.problems.append(f"VVP has {channels} channels, not a multiple of K = {shot}")
    kinds = _stored_kinds(handle)
    unchecked = [k.name for k in kinds if handle[k.name].size and not handle[k.name].fletcher32]
    if unchecked:
        report.notes.append(f"{', '.join(unchecked)} carry no per-entry checksums (written by an older clipprior): "
                            "damage is found where gzip's own check catches it; rewrite the file to add them")
    for name, table in index.tables.items():
        grids = table.grids
        for kind in (k for k in kinds if k.table == name):
            maps = handle[kind.name]
            if len(grids) and ((grids < 1).any() or (grids[:, 0] > maps.shape[-2]).any()
                               or (grids[:, 1] > maps.shape[-1]).any()):
                report.problems.append(f"{name}/grid has grids outside the map datasets' {maps.shape[-2:]}")
                break
    done, total = 0, sum(handle[k.name].shape[0] for k in kinds)
    for kind in kinds:
        keys = index.tables[kind.table].keys
        rows = np.arange(handle[kind.name].shape[0])
        bad: list[int] = []
        damaged: list[int] = []
        for chunk, values, mask in _blocks(handle, kind, index.tables[kind.table].grids, rows,
                                           lambda row, err, damaged=damaged: damaged.append(row)):
            finite = np.isfinite(values) | ~np.broadcast_to(mask, values.shape)
            per_row = finite.reshape(len(chunk), -1).all(1)
            bad.extend(chunk[~per_row].tolist())
            done += len(chunk)
            if progress is not None:
                progress(done, total)
        if damaged:
            done += len(damaged)
            report.damaged.extend(f"{kind.name} {keys[r]!r}" for r in damaged)
            report.problems.extend(f"{kind.name} {keys[r]!r}: damaged (fails its checksum or cannot be decoded)"
                                   for r in damaged)
        if bad:
            shown = ", ".join(repr(keys[r]) for r in bad[:5]) + (" ..." if len(bad) > 5 else "")
            report.problems.append(f"{kind.name}: {len(bad)} entries with NaN/inf values ({shown})")
    report.entries = {name: len(table.keys) for name, table in index.tables.items()}
    return report
