"""The prior-cache file format, declared once: names, versions, file rules and the map kinds.

Every HDF5 path, root attribute name, file-name rule and map kind of a cache is spelled here and
nowhere else; the writer (``_h5``, ``_write``, ``_union``), the reader (``_read``) and the report
(``_report``) import them. ``docs/cache-format.md`` is the prose version of this module.

A cache holds *entry tables* (:data:`TABLES`) and *map kinds* (:data:`MAP_KINDS`):

* an entry table is an HDF5 group whose rows are keyed entries: its key columns (e.g.
  ``vtp/image`` + ``vtp/class_id``), and ``GROUP/grid``, the patch grid ``(h, w)`` of each row;
  the key a user passes is described by :attr:`Table.keyed_by` (``"image_class"``: an
  ``(image_key, class_id)``, ``"episode"``: an episode index, ``"image"``: an image key);
* a map kind is one stacked, zero-padded float dataset of a table (``vtp/cam``, ``vtp/refined``,
  ``vvp/maps``), one row per entry of its table, with a declared shape rule (``(h, w)`` maps or
  ``(C, h, w)`` maps), dtype and title. Every map kind of a table is written for every entry.
  A kind that is a *prior* also declares the name its scores go by (:attr:`MapKind.prior`,
  ``"vtp_raw"``), its short title in score tables and panels and its column abbreviation.

Writing, consolidating, merging, ``inspect`` (statistics per kind) and ``verify`` (finite values,
checksums, grids per kind) iterate :data:`MAP_KINDS`; ``evaluate`` and ``show`` iterate the prior
kinds (:data:`PRIORS`, drawn in :data:`PANEL_ORDER`); adding a kind is:

1. declare it here: ``MapKind("feat/query", table="feat", channels=True, title="query features")``,
   and its table in :data:`TABLES` if it is keyed by something no table holds yet
   (``Table("feat", keyed_by="image", title="per-image features")``);
2. give the writer a way to add it (a ``CacheWriter.add_*`` method filling the buffer of its
   table) and the reader a way to read it (a ``PriorCache`` method reading ``self._map(kind)``);
3. document it in ``docs/cache-format.md`` and test it (a write/read round trip).

Adding datasets that an older reader can ignore keeps :data:`FORMAT_VERSION`; renaming or
reshaping one bumps it, and :data:`READABLE_VERSIONS` keeps listing every version the reader
still opens (tests/fixtures holds a cache of each).

Example:
    >>> [k.name for k in kinds_of("vtp")]
    ['vtp/cam', 'vtp/refined']
    >>> [(k.prior, k.label) for k in PRIORS]
    [('vtp_raw', 'VTP raw'), ('vtp_refined', 'VTP refined'), ('vvp', 'VVP')]
    >>> parts_dir("out/priors.h5").as_posix()
    'out/priors.h5.parts'
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from clipprior.errors import InvalidInputError

__all__ = [
    "ATTR_CREATED",
    "ATTR_FINALIZED",
    "ATTR_FORMAT",
    "ATTR_KIND",
    "ATTR_PROVENANCE",
    "ATTR_RUN_ID",
    "ATTR_SHARD_COUNT",
    "ATTR_SHARD_INDEX",
    "ATTR_VERSION",
    "EPISODES",
    "EPISODE_COLUMNS",
    "FILE_CACHE",
    "FILE_SEGMENT",
    "FILE_SHARD",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "IMAGES_KEY",
    "IMAGES_SIZE",
    "LOCK_NAME",
    "MANIFEST_NAME",
    "MANIFEST_SHARD",
    "MAP_KINDS",
    "PANEL_ORDER",
    "PRIORS",
    "QFEAT",
    "QFEAT_FEATURES",
    "READABLE_VERSIONS",
    "RESERVED_ATTRS",
    "RUN_ATTRS",
    "SEGMENT_GLOB",
    "SFEAT",
    "SFEAT_FEATURES",
    "SFEAT_MASK",
    "STORE_MODES",
    "TABLES",
    "TEMP_GLOB",
    "VTP",
    "VTP_CAM",
    "VTP_REFINED",
    "VVP",
    "VVP_MAPS",
    "MapKind",
    "Table",
    "check_shard",
    "kind",
    "kinds_of",
    "parts_dir",
    "segment_name",
    "segment_number",
    "shard_path",
    "temp_path",
]

# ------------------------------------------------------------------------------------------ version

FORMAT_NAME = "clipprior-prior-cache"
#: The version this clipprior writes.
FORMAT_VERSION = 1
#: Every version this clipprior reads (a fixture of each is in tests/fixtures/).
READABLE_VERSIONS = frozenset({1})

# ---------------------------------------------------------------------------------- root attributes

ATTR_FORMAT = "format"
ATTR_VERSION = "format_version"
ATTR_KIND = "kind"
ATTR_PROVENANCE = "provenance"
ATTR_RUN_ID = "run_id"
ATTR_CREATED = "created_utc"
ATTR_FINALIZED = "finalized_utc"
ATTR_SHARD_INDEX = "shard_index"
ATTR_SHARD_COUNT = "shard_count"

#: Root attributes written by clipprior itself; provenance keys may not use these names.
RESERVED_ATTRS = frozenset({
    ATTR_FORMAT, ATTR_VERSION, ATTR_KIND, ATTR_PROVENANCE, ATTR_RUN_ID, ATTR_CREATED, ATTR_FINALIZED,
    ATTR_SHARD_INDEX, ATTR_SHARD_COUNT,
})

#: The root attributes that identify the run that wrote a file, in the order reports list them.
RUN_ATTRS = (ATTR_CREATED, ATTR_FINALIZED, ATTR_RUN_ID)

#: Values of the ``kind`` attribute.
FILE_CACHE, FILE_SHARD, FILE_SEGMENT = "cache", "shard", "segment"

# ------------------------------------------------------------------------------------------ tables

IMAGES_KEY = "images/key"
IMAGES_SIZE = "images/size"

#: The episode table: group and column names.
EPISODES = "episodes"
EPISODE_COLUMNS = ("index", "query", "query_label", "class_id", "support", "support_label")
#: An episode as a row of that table (what ``CacheWriter.set_episodes`` takes besides a numbered
#: :class:`~clipprior.data.Episode`): supports and their labels as two sequences of keys.
EPISODE_FIELDS = ("index", "query", "query_label", "class_id", "supports", "support_labels")

KeyedBy = Literal["image_class", "episode", "image"]

#: The key columns stored for each kind of key: name and dtype.
KEY_COLUMNS: Mapping[str, tuple[tuple[str, Any], ...]] = {
    "image_class": (("image", np.int32), ("class_id", np.int32)),  # image = row in images/key
    "episode": (("episode", np.int64),),
    "image": (("image", np.int32),),
}


@dataclass(frozen=True)
class Table:
    """One entry table: an HDF5 group of keyed rows, each with its patch grid.

    Attributes:
        group: HDF5 group name (``"vtp"``).
        keyed_by: What identifies a row: ``"image_class"`` (an ``(image_key, class_id)``),
            ``"episode"`` (an episode index) or ``"image"`` (an image key).
        title: Words for reports ("VTP").
        optional: Written only when it has rows (a table added to the format later, which files
            without it keep lacking: a ``maps`` cache has no feature tables).
    """

    group: str
    keyed_by: KeyedBy
    title: str
    optional: bool = False

    @property
    def grid(self) -> str:
        """Dataset of the (M, 2) patch grids."""
        return f"{self.group}/grid"

    @property
    def key_columns(self) -> tuple[tuple[str, Any], ...]:
        """``(dataset path, dtype)`` of each key column."""
        return tuple((f"{self.group}/{name}", dtype) for name, dtype in KEY_COLUMNS[self.keyed_by])


@dataclass(frozen=True)
class MapKind:
    """One kind of stored map.

    Attributes:
        name: Its dataset path (``"vtp/refined"``), also its name in reports.
        table: The :class:`Table` (group) whose rows it has.
        channels: Shape rule: ``False`` for (h, w) maps stored as (M, H, W); ``True`` for
            (C, h, w) maps stored as (M, C, H, W) with one C for the whole file.
        title: Words for reports ("VTP refined").
        dtype: Stored dtype.
        prior: For a prior, the name its scores and maps go by in ``evaluate`` and ``show``
            (``"vtp_raw"``: keys of the JSON scores and of ``EpisodeData.priors``); ``None`` for
            other stored maps.
        label: For a prior, its short title in score tables, panels and the HTML index ("VTP raw").
        abbrev: For a prior, its abbreviation in per-class table columns ("raw").
    """

    name: str
    table: str
    channels: bool
    title: str
    dtype: Any = np.float16
    prior: str | None = None
    label: str = ""
    abbrev: str = ""

    @property
    def ndim(self) -> int:
        """Dimensions of one entry (2 or 3)."""
        return 3 if self.channels else 2


#: The VTP table: one row per (image, class).
VTP = Table("vtp", "image_class", "VTP")
#: The VVP table: one row per episode.
VVP = Table("vvp", "episode", "VVP")
#: ``--store features``: the VVP-layer features of each query image, one row per image.
QFEAT = Table("qfeat", "image", "query features", optional=True)
#: ``--store features``: the masked features of each (support image, class), one row per pair.
SFEAT = Table("sfeat", "image_class", "support features", optional=True)
#: Every entry table, by group name.
TABLES: Mapping[str, Table] = {t.group: t for t in (VTP, VVP, QFEAT, SFEAT)}

VTP_CAM = MapKind("vtp/cam", VTP.group, channels=False, title="VTP raw Grad-CAM",
                  prior="vtp_raw", label="VTP raw", abbrev="raw")
VTP_REFINED = MapKind("vtp/refined", VTP.group, channels=False, title="VTP PIR-refined",
                      prior="vtp_refined", label="VTP refined", abbrev="ref.")
VVP_MAPS = MapKind("vvp/maps", VVP.group, channels=True, title="VVP", prior="vvp", label="VVP", abbrev="VVP")
#: L2-normalised float16 features of the VVP layers on the query's VVP grid, channel l * D + d.
QFEAT_FEATURES = MapKind("qfeat/features", QFEAT.group, channels=True, title="query features (unit, per layer)")
#: The same for a support, zero outside its mask (the zeros compress to almost nothing).
SFEAT_FEATURES = MapKind("sfeat/features", SFEAT.group, channels=True, title="support features (unit, masked)")
#: The support's mask on its VVP grid (1 foreground, 0 elsewhere).
SFEAT_MASK = MapKind("sfeat/mask", SFEAT.group, channels=False, title="support mask on the grid")
#: Every map kind, in file order.
MAP_KINDS: tuple[MapKind, ...] = (VTP_CAM, VTP_REFINED, VVP_MAPS, QFEAT_FEATURES, SFEAT_FEATURES, SFEAT_MASK)
#: The map kinds that are priors (:attr:`MapKind.prior` set), in file order: the order of score tables.
PRIORS: tuple[MapKind, ...] = tuple(k for k in MAP_KINDS if k.prior)
#: The order ``show`` draws the priors in (the paper's Fig. 4: VVP, then VTP raw and refined).
PANEL_ORDER: tuple[MapKind, ...] = (VVP_MAPS, VTP_CAM, VTP_REFINED)
#: How a cache serves episodes (``provenance["store"]``; absent means ``"maps"``): its planned
#: episodes' maps, the features that serve any episode, or a pool of planned supports per query and class.
STORE_MODES: tuple[str, ...] = ("maps", "features", "pool")
#: The store mode of a pool cache: what a run planning supports per query (not a ``--store``) makes.
POOL_STORE = "pool"
#: The store modes a run asks for (``clipprior precompute --store``), the default first.
STORE_CHOICES: tuple[str, ...] = tuple(mode for mode in STORE_MODES if mode != POOL_STORE)


def kinds_of(table: str) -> tuple[MapKind, ...]:
    """The map kinds of one table, in file order."""
    return tuple(k for k in MAP_KINDS if k.table == table)


def kind(name: str) -> MapKind:
    """The map kind called ``name`` (``"vtp/cam"``).

    Raises:
        InvalidInputError: for an unknown name.
    """
    for k in MAP_KINDS:
        if k.name == name:
            return k
    raise InvalidInputError(f"unknown map kind {name!r}; known: {[k.name for k in MAP_KINDS]}")


# ------------------------------------------------------------------------------------------- files

#: The run manifest in :func:`parts_dir`: a JSON object whose keys are the root attributes the run's
#: files get (:data:`ATTR_FORMAT`, :data:`ATTR_VERSION`, :data:`ATTR_RUN_ID`, :data:`ATTR_CREATED`,
#: :data:`ATTR_PROVENANCE`) and :data:`MANIFEST_SHARD`.
MANIFEST_NAME = "manifest.json"
#: The manifest's shard: ``[index, count]``, or null for an unsharded run.
MANIFEST_SHARD = "shard"
LOCK_NAME = ".lock"
#: Glob of the committed segments in :func:`parts_dir` (see :func:`segment_name`).
SEGMENT_GLOB = "seg-*.h5"
#: Glob of the files being written in a directory (see :func:`temp_path`): debris once their writer died.
TEMP_GLOB = "*.tmp"


def temp_path(path: str | os.PathLike[str]) -> Path:
    """The name a file (cache, segment, manifest) is written under before it is renamed to ``path``.

    Example:
        >>> temp_path("out/priors.h5").as_posix()
        'out/priors.h5.tmp'
    """
    p = Path(path)
    return p.with_name(p.name + ".tmp")


def parts_dir(path: str | os.PathLike[str]) -> Path:
    """The directory holding the committed segments of an unfinished run writing ``path``.

    Example:
        >>> parts_dir("priors.h5").name
        'priors.h5.parts'
    """
    p = Path(path)
    return p.with_name(p.name + ".parts")


def segment_name(number: int) -> str:
    """File name of the ``number``-th committed segment in :func:`parts_dir`.

    Example:
        >>> segment_name(3)
        'seg-000003.h5'
    """
    return f"seg-{number:06d}.h5"


def segment_number(path: str | os.PathLike[str]) -> int:
    """The number of a segment file named by :func:`segment_name`.

    Example:
        >>> segment_number("p.h5.parts/seg-000003.h5")
        3
    """
    return int(Path(path).stem.split("-")[1])


def check_shard(shard: Sequence[int] | None) -> tuple[int, int]:
    """Validate ``(index, count)`` of a shard.

    Raises:
        InvalidInputError: if it is not a pair of ints with ``0 <= index < count``.
    """
    try:
        index, count = (int(v) for v in shard)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise InvalidInputError(f"shard={shard!r} must be a pair (index, count), e.g. (0, 4)") from None
    if count < 1 or not 0 <= index < count:
        raise InvalidInputError(f"shard {index}/{count} is out of range; use 0 <= index < count")
    return index, count


def shard_path(path: str | os.PathLike[str], index: int, count: int) -> Path:
    """The file shard ``index`` of ``count`` writes for the final path ``path``.

    Example:
        >>> shard_path("out/priors.h5", 2, 4).as_posix()
        'out/priors.shard-2-of-4.h5'
    """
    index, count = check_shard((index, count))
    p = Path(path)
    return p.with_name(f"{p.stem}.shard-{index}-of-{count}{p.suffix or '.h5'}")
