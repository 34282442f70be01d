"""What ``clipprior inspect`` and ``clipprior verify`` compute: a cache's summary and its structural check.

Both stream the maps block by block (bounded memory) and look only at each entry's own grid, never
at the zero padding around it.

Example:
    >>> report = CheckReport(problems=[], episodes=2, vtp=2, vvp=2)
    >>> report.ok
    True
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np

from clipprior.cache import _h5
from clipprior.cache._read import PriorCache
from clipprior.errors import CacheError, ConfigError

__all__ = ["CheckReport", "check_cache", "summarize_cache"]

Progress = Callable[[int, int], None]

_MAPS = ("vtp/cam", "vtp/refined", "vvp/maps")


def _grid_key(name: str) -> str:
    return name.split("/")[0] + "/grid"


def _blocks(handle: h5py.File, name: str, rows: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(rows, values, mask)`` blocks of a map dataset: float32 values and the valid-grid mask.

    Args:
        handle: Open cache.
        name: Map dataset (``"vtp/cam"``, ``"vtp/refined"`` or ``"vvp/maps"``).
        rows: Sorted rows to read.

    Yields:
        rows (B,), values (B, [C,] H, W) float32, mask broadcastable to values (True inside each grid).
    """
    dataset = handle[name]
    grids = handle[_grid_key(name)][...].reshape(-1, 2)
    if not len(rows):
        return
    row_bytes = max(1, int(np.prod(dataset.shape[1:])) * dataset.dtype.itemsize)
    block = max(1, _h5.BLOCK_BYTES // row_bytes)
    hh = np.arange(dataset.shape[-2])
    ww = np.arange(dataset.shape[-1])
    for start in range(0, len(rows), block):
        chunk = rows[start:start + block]
        lo, hi = int(chunk[0]), int(chunk[-1]) + 1
        values = dataset[lo:hi][chunk - lo] if hi - lo <= 2 * len(chunk) else dataset[chunk]
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
    handle = cache._file
    index = cache._index.file
    classes: dict[str, int] = {}
    for cid in index.vtp_class.tolist():
        classes[str(cid)] = classes.get(str(cid), 0) + 1
    summary: dict[str, Any] = {
        "path": str(cache.path),
        "file_bytes": cache.path.stat().st_size,
        "attrs": {k: (v.item() if isinstance(v, np.generic) else v) for k, v in sorted(cache.attrs.items())},
        "provenance": cache.provenance,
        "counts": {
            "images": len(index.image_keys), "vtp": len(index.vtp_class), "vvp": len(index.vvp_episode),
            "episodes": len(cache.episodes), "shot": cache.shot, "vvp_channels": index.vvp_channels,
            "classes": dict(sorted(classes.items(), key=lambda kv: int(kv[0]))),
        },
        "geometry": {
            "image_size": _range(index.image_sizes), "vtp_grid": _range(index.vtp_grid),
            "vvp_grid": _range(index.vvp_grid),
        },
        "datasets": {},
        "values": {},
    }
    for group in ("images", "vtp", "vvp", "episodes"):
        for name, dataset in handle[group].items():
            summary["datasets"][f"{group}/{name}"] = _dataset_info(dataset)
    plans = {}
    for name in _MAPS:
        n = handle[name].shape[0]
        if max_entries is not None and n > max_entries:
            plans[name] = np.unique(np.linspace(0, n - 1, max_entries).round().astype(np.int64))
        else:
            plans[name] = np.arange(n)
    done, total = 0, sum(len(rows) for rows in plans.values())
    for name, rows in plans.items():
        moments = _Moments()
        for chunk, values, mask in _blocks(handle, name, rows):
            moments.add(values, mask)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
        summary["values"][name] = moments.as_dict()
    return summary


@dataclass
class CheckReport:
    """Outcome of :func:`check_cache`.

    Attributes:
        problems: One line per problem found (empty when the cache is sound).
        episodes: Episodes checked.
        vtp: VTP entries checked for finite values.
        vvp: VVP entries checked for finite values.
        notes: What was not checked, and why (e.g. coverage of a shard).
    """

    problems: list[str] = field(default_factory=list)
    episodes: int = 0
    vtp: int = 0
    vvp: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No problem found."""
        return not self.problems


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
    handle = cache._file
    index = cache._index
    report = CheckReport(episodes=len(cache.episodes))
    shard = cache.attrs.get("shard_index"), cache.attrs.get("shard_count")
    if shard[0] is not None:
        report.notes.append(f"shard {shard[0]}/{shard[1]}: holds part of the episodes' entries; coverage is checked "
                            "by `clipprior merge` (or verify the merged file)")
    for episode in cache.episodes if shard[0] is None else ():
        if episode.query not in index.image_row:
            report.problems.append(f"episode {episode.index}: no image size for query {episode.query!r}")
        if (episode.query, episode.class_id) not in index.vtp_row:
            report.problems.append(f"episode {episode.index}: VTP ({episode.query!r}, class {episode.class_id}) "
                                   "is missing")
        if episode.index not in index.vvp_row:
            report.problems.append(f"episode {episode.index}: VVP is missing")
    channels, shot = index.file.vvp_channels, cache.shot
    if len(index.file.vvp_episode) and shot:
        try:
            layers = len(cache.config.vvp_layers)
        except (CacheError, ConfigError, ValueError):
            layers = None
        if layers is not None and channels != layers * shot:
            report.problems.append(f"VVP has {channels} channels; expected len(vvp_layers) x K = {layers} x {shot}")
        elif channels % shot:
            report.problems.append(f"VVP has {channels} channels, not a multiple of K = {shot}")
    n_images = len(index.file.image_keys)
    if len(index.file.vtp_image) and (index.file.vtp_image.min() < 0 or index.file.vtp_image.max() >= n_images):
        report.problems.append("vtp/image points outside images/key")
    for name in ("vtp", "vvp"):
        grids = handle[f"{name}/grid"][...].reshape(-1, 2)
        maps = handle[f"{name}/cam" if name == "vtp" else "vvp/maps"]
        if len(grids) and ((grids < 1).any() or (grids[:, 0] > maps.shape[-2]).any()
                           or (grids[:, 1] > maps.shape[-1]).any()):
            report.problems.append(f"{name}/grid has grids outside the map datasets' {maps.shape[-2:]}")
    keys = {"vtp": list(index.vtp_row), "vvp": list(index.vvp_row)}  # in row order
    done, total = 0, sum(handle[name].shape[0] for name in _MAPS)
    for name in _MAPS:
        rows = np.arange(handle[name].shape[0])
        bad: list[int] = []
        for chunk, values, mask in _blocks(handle, name, rows):
            finite = np.isfinite(values) | ~np.broadcast_to(mask, values.shape)
            per_row = finite.reshape(len(chunk), -1).all(1)
            bad.extend(chunk[~per_row].tolist())
            done += len(chunk)
            if progress is not None:
                progress(done, total)
        if bad:
            group = name.split("/")[0]
            shown = ", ".join(repr(keys[group][r]) for r in bad[:5]) + (" ..." if len(bad) > 5 else "")
            report.problems.append(f"{name}: {len(bad)} entries with NaN/inf values ({shown})")
    report.vtp = handle["vtp/cam"].shape[0]
    report.vvp = handle["vvp/maps"].shape[0]
    return report
