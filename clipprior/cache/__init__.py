"""The HDF5 prior cache: a crash-safe streaming writer, a DataLoader-safe reader, and shard merging.

Priors are computed once (``clipprior precompute``), written with :class:`CacheWriter` and read back
by any trainer with :class:`PriorCache`, which needs neither CLIP nor clipprior's model code. The
file layout is specified in ``docs/cache-format.md``; in short:

* VTP per ``(image, class)`` -- the raw Grad-CAM and the PIR-refined map -- and VVP per episode,
  on the CLIP patch grid of the image's own geometry, float16, gzip-compressed, one chunk per
  entry, with each image's original size recorded, so a reader maps a prior onto any geometry
  (:func:`resize_prior`, :func:`letterbox_prior`).
* While a run is in progress, finished work is committed as small segment files in
  ``OUT.parts/``, each written under a temporary name, fsynced and atomically renamed;
  :meth:`CacheWriter.finalize` consolidates them, sorted by key, into ``OUT`` (atomically again).
  ``OUT`` is complete or absent, a killed run resumes, and the result does not depend on where
  the run was interrupted.
* ``shard=(i, n)`` splits a job over processes or machines; :func:`merge_caches` joins the shard
  files into the file a single run would have written.

The implementation lives in private modules: ``_format`` declares the file format once (every
dataset path, attribute, file-name rule and map kind; read it before adding a kind), ``_h5`` the
low-level HDF5 code, ``_write`` / ``_union`` the writer and merge, ``_read`` the reader,
``_report`` inspect and verify. This module is the public surface.

Example:
    >>> import numpy as np, tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "priors.h5"
    >>> with CacheWriter(out, {"dataset": "demo"}) as writer:
    ...     writer.add_image("a.jpg", 48, 64)
    ...     writer.add_vtp("a.jpg", 1, np.full((3, 4), 0.5), np.full((3, 4), 0.25))
    ...     path = writer.finalize()
    >>> cache = PriorCache(path)
    >>> cache.vtp("a.jpg", 1).shape, cache.vtp("a.jpg", 1, size="original").shape
    (torch.Size([3, 4]), torch.Size([48, 64]))
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

from clipprior.cache._format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MAP_KINDS,
    PANEL_ORDER,
    POOL_STORE,
    PRIORS,
    STORE_CHOICES,
    STORE_MODES,
    TABLES,
    VTP_CAM,
    VTP_REFINED,
    VVP_MAPS,
    MapKind,
    Table,
    kinds_of,
    parts_dir,
    shard_path,
)
from clipprior.cache._format import kind as map_kind

if TYPE_CHECKING:
    from clipprior.cache._read import ImageRef, PriorCache, Size, letterbox_prior, resize_prior
    from clipprior.cache._report import CheckReport, check_cache, summarize_cache
    from clipprior.cache._union import provenance_diff
    from clipprior.cache._write import CacheWriter, merge_caches, shard_from_environment

# The format's declarations (numpy only) load with the package; the reader, writer and reports
# (torch, h5py) on first use of one of their names (PEP 562), so a command that only needs the
# declared kinds (its options, its help) starts without torch.
_LAZY: dict[str, str] = {
    "ImageRef": "clipprior.cache._read",
    "PriorCache": "clipprior.cache._read",
    "Size": "clipprior.cache._read",
    "letterbox_prior": "clipprior.cache._read",
    "resize_prior": "clipprior.cache._read",
    "CheckReport": "clipprior.cache._report",
    "check_cache": "clipprior.cache._report",
    "summarize_cache": "clipprior.cache._report",
    "provenance_diff": "clipprior.cache._union",
    "CacheWriter": "clipprior.cache._write",
    "merge_caches": "clipprior.cache._write",
    "shard_from_environment": "clipprior.cache._write",
}

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAP_KINDS",
    "PANEL_ORDER",
    "POOL_STORE",
    "PRIORS",
    "STORE_CHOICES",
    "STORE_MODES",
    "TABLES",
    "VTP_CAM",
    "VTP_REFINED",
    "VVP_MAPS",
    "CacheWriter",
    "CheckReport",
    "ImageRef",
    "MapKind",
    "PriorCache",
    "Size",
    "Table",
    "check_cache",
    "kinds_of",
    "letterbox_prior",
    "map_kind",
    "merge_caches",
    "parts_dir",
    "provenance_diff",
    "resize_prior",
    "shard_from_environment",
    "shard_path",
    "summarize_cache",
]


def _episode_record(index: int, query: str, query_label: str, class_id: int, supports: Any,
                    support_labels: Any) -> Any:
    """The deprecated ``EpisodeRecord(...)`` row constructor: that episode as a numbered ``Episode``."""
    from clipprior.cache._union import as_episode

    return as_episode((index, query, query_label, class_id, supports, support_labels))


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value
    if name == "EpisodeRecord":
        warnings.warn("clipprior.cache.EpisodeRecord is deprecated: the cache's episodes are clipprior.Episode, "
                      "numbered (episode.index); build one as Episode(query_image, query_label, class_id, "
                      "((image, label), ...), index=i)", DeprecationWarning, stacklevel=2)
        return _episode_record
    raise AttributeError(f"module 'clipprior.cache' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
