"""Few-shot episodes: the PFENet-family sampling protocol, seeded, and an episode-list file format.

Protocol (:func:`sample_episodes`), as the PFENet / BAM / HDMNet / PI-CLIP test loops run it with
an unshuffled loader:

1. Queries are the dataset's ``items`` in list order, cycling back to the first after the last,
   until ``n_episodes`` episodes are made.
2. The class is drawn uniformly from the fold's classes *present* in the query's mask (any pixel
   count; ascending order; values 0 and 255 excluded): ``present[rng.integers(len(present))]``.
3. ``shot`` supports are drawn from that class's support list (``class_index[class]``): an index
   ``rng.integers(len(pool))`` is drawn again while it was drawn before for this episode or names
   the query's own (image, label) pair. Supports are therefore distinct entries, never the query.

All draws come from one ``np.random.default_rng(seed)``, in the order above, episode after episode:
the same dataset lists, ``shot`` and ``seed`` give the same episodes on any machine. The
trainers draw with Python's ``random`` and so do not give the same episodes; what matches is the
protocol (and thus the distribution), and the file written by :func:`write_episodes` lets any
trainer iterate exactly the episodes whose priors were precomputed.

A query whose mask has no fold class, or whose drawn class has fewer than ``shot`` supports other
than the query, raises :class:`~clipprior.errors.DatasetError`; with the dataset opened with
``on_error="skip"`` it is skipped (reported once) and the next query is used.

File format (JSON lines, UTF-8): the first line is a header object::

    {"format": "clipprior-episodes", "version": 1, "dataset": "pascal5i", "fold": 0, "split": "val",
     "shot": 1, "seed": 321, "n_episodes": 1000, "coco_split": "interleaved", "protocol": "pfenet",
     "list_checksum": "<sha256>"}

then one object per episode, in order::

    {"query": ["JPEGImages/2007_000033.jpg", "SegmentationClassAug/2007_000033.png"], "class": 1,
     "supports": [["JPEGImages/2007_001288.jpg", "SegmentationClassAug/2007_001288.png"]]}

Paths are ids relative to the data root; ``class`` is the 1-based dataset class id.

Example:
    >>> from clipprior.data import open_dataset, sample_episodes, write_episodes, read_episodes, EpisodeMeta
    >>> ds = open_dataset("pascal5i", "VOC2012", fold=0, list_root="lists/pascal")  # doctest: +SKIP
    >>> episodes = sample_episodes(ds, 1000, shot=1, seed=321)  # doctest: +SKIP
    >>> write_episodes("fold0_1shot.jsonl", episodes, EpisodeMeta.for_dataset(ds, shot=1, seed=321))  # doctest: +SKIP
    >>> read_episodes("fold0_1shot.jsonl")[0] == episodes  # doctest: +SKIP
    True
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipprior.data.classes import COCO_SPLITS, SPLITS, dataset_name, fold_classes
from clipprior.data.dataset import FSSDataset
from clipprior.data.lists import Item
from clipprior.data.report import Problem, _Policy
from clipprior.data.specs import COCO_20I, PASCAL_5I, get_dataset
from clipprior.errors import ClipPriorError, DataNotFoundError, DatasetError, InvalidInputError

__all__ = [
    "EPISODE_FORMAT",
    "EPISODE_FORMAT_VERSION",
    "TRAINER_EPISODES",
    "Episode",
    "EpisodeMeta",
    "default_episodes",
    "pool_episodes",
    "read_episodes",
    "sample_episodes",
    "write_episodes",
]

EPISODE_FORMAT = "clipprior-episodes"
EPISODE_FORMAT_VERSION = 1
PROTOCOL = "pfenet"

TRAINER_EPISODES: dict[str, dict[str, int]] = {
    trainer: {spec.name: spec.trainer_episodes[trainer] for spec in (PASCAL_5I, COCO_20I)}
    for trainer in PASCAL_5I.trainer_episodes
}
"""Test episodes per run in each trainer's ``test.py`` (``test_num``), for the built-in benchmarks
(each :class:`~clipprior.data.specs.DatasetSpec` holds its own: ``trainer_episodes``)."""


def default_episodes(dataset: str, trainer: str = "pi-clip") -> int:
    """Number of test episodes ``trainer`` evaluates on ``dataset`` (PI-CLIP: 1000 PASCAL, 5000 COCO).

    Example:
        >>> default_episodes("pascal5i"), default_episodes("coco20i", "bam")
        (1000, 1000)
    """
    spec = get_dataset(dataset)
    key = trainer.lower()
    if key not in spec.trainer_episodes:
        raise InvalidInputError(f"unknown trainer {trainer!r} for {spec.name}; use one of "
                                f"{', '.join(spec.trainer_episodes)}")
    return spec.trainer_episodes[key]


@dataclass(frozen=True, slots=True)
class Episode:
    """One few-shot episode: a query, a class and K supports, each an (image, label) pair of ids.

    The one episode type of clipprior: the sampler draws it, the episode file and the cache's
    episode table store it, the engine computes it and :class:`~clipprior.cache.PriorCache` returns
    it. Ids are relative to the data root; every reader method that takes an image key also takes
    an (image, label) pair, so ``episode.query`` and ``episode.supports`` can be passed as they are.

    Attributes:
        query_image: Query image id.
        query_label: Query mask id.
        class_id: The episode's class, 1-based dataset id.
        supports: ``shot`` (image id, label id) pairs, in draw order.
        index: Position in its planned list (the episode file, the cache's episode table); ``None``
            for an episode drawn on its own. Not part of equality: the same episode under two
            numbers compares equal.

    Example:
        >>> ep = Episode("q.jpg", "q.png", 3, (("s.jpg", "s.png"),), index=4)
        >>> ep.query, ep.support_images, ep.shot
        (('q.jpg', 'q.png'), ('s.jpg',), 1)
        >>> ep == Episode("q.jpg", "q.png", 3, (("s.jpg", "s.png"),))
        True
    """

    query_image: str
    query_label: str
    class_id: int
    supports: tuple[Item, ...]
    index: int | None = dataclasses.field(default=None, compare=False)

    @property
    def shot(self) -> int:
        """Number of supports."""
        return len(self.supports)

    @property
    def query(self) -> Item:
        """(query image id, query label id)."""
        return self.query_image, self.query_label

    @property
    def support_images(self) -> tuple[str, ...]:
        """The supports' image ids, in shot order (the keys a cache looks supports up by)."""
        return tuple(image for image, _ in self.supports)

    @property
    def support_labels(self) -> tuple[str, ...]:
        """The supports' label ids, in shot order."""
        return tuple(label for _, label in self.supports)

    def numbered(self, index: int) -> Episode:
        """This episode with ``index`` set (its position in a planned list)."""
        return dataclasses.replace(self, index=int(index))


@dataclass(frozen=True)
class EpisodeMeta:
    """Header of an episode file: which episodes these are.

    Attributes:
        dataset: a registered benchmark (``"pascal5i"``, ``"coco20i"``, ...).
        fold: 0..3.
        split: ``"val"`` or ``"train"``.
        shot: Supports per episode.
        seed: Seed of the sampler.
        n_episodes: Number of episodes (set from the episodes when writing).
        coco_split: ``"interleaved"`` or ``"contiguous"``.
        list_checksum: :attr:`FSSDataset.list_checksum` of the lists sampled from.
        protocol: Sampling protocol name (``"pfenet"``).
    """

    dataset: str
    fold: int
    split: str
    shot: int
    seed: int
    n_episodes: int = 0
    coco_split: str = "interleaved"
    list_checksum: str = ""
    protocol: str = PROTOCOL

    @classmethod
    def for_dataset(cls, dataset: FSSDataset, shot: int, seed: int, n_episodes: int = 0) -> EpisodeMeta:
        """The header for episodes sampled from ``dataset`` with ``shot`` and ``seed``."""
        return cls(dataset.name, dataset.fold, dataset.split, shot, seed, n_episodes, dataset.coco_split,
                   dataset.list_checksum)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EpisodeMeta:
        """Build from a mapping, validating every field.

        Raises:
            InvalidInputError: Missing or invalid field.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InvalidInputError(f"unknown episode-meta field(s) {sorted(unknown)}; known: {sorted(known)}")
        missing = {"dataset", "fold", "split", "shot", "seed"} - set(data)
        if missing:
            raise InvalidInputError(f"episode meta lacks field(s) {sorted(missing)}")
        meta = cls(**dict(data))
        meta.validate()
        return meta

    def validate(self) -> None:
        """Check every field.

        Raises:
            InvalidInputError: A field has a wrong type or value.
        """
        dataset_name(self.dataset)
        for name in ("fold", "shot", "seed", "n_episodes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidInputError(f"episode meta field {name!r} must be an integer, got {value!r}")
        fold_classes(self.dataset, self.fold, self.split, self.coco_split)  # validates fold, split, coco_split
        if self.shot < 1:
            raise InvalidInputError(f"shot must be at least 1, got {self.shot}")
        if self.n_episodes < 0:
            raise InvalidInputError(f"n_episodes must be >= 0, got {self.n_episodes}")

    def check_dataset(self, dataset: FSSDataset) -> None:
        """Check that episodes with this header belong to ``dataset`` (benchmark, fold, split, lists).

        Raises:
            DatasetError: A field differs; the message lists every difference.
        """
        expected = EpisodeMeta.for_dataset(dataset, self.shot, self.seed, self.n_episodes)
        diffs = [f"{f}: file {getattr(self, f)!r} != dataset {getattr(expected, f)!r}"
                 for f in ("dataset", "fold", "split", "coco_split", "list_checksum")
                 if getattr(self, f) != getattr(expected, f)
                 and not (f == "coco_split" and not get_dataset(self.dataset).fold_splits)]
        if diffs:
            raise DatasetError("these episodes were not sampled from this dataset's lists: " + "; ".join(diffs))


def sample_episodes(dataset: FSSDataset, n_episodes: int | None = None, shot: int = 1, seed: int = 0) -> list[Episode]:
    """Sample episodes with the PFENet-family protocol (see the module docstring).

    Args:
        dataset: An opened dataset (its ``items`` are the queries, ``class_index`` the supports).
        n_episodes: Number of episodes; ``None`` takes :func:`default_episodes` (PI-CLIP's count).
        shot: Supports per episode (1 and 5 in the benchmarks).
        seed: Seed of ``np.random.default_rng``.

    Returns:
        ``n_episodes`` episodes.

    Raises:
        DatasetError: A query has no fold class, a class has too few supports besides the query
            (under ``on_error="raise"``), or no query at all gives an episode.
        InvalidInputError: Bad ``n_episodes``, ``shot`` or ``seed``.

    Example:
        >>> episodes = sample_episodes(ds, 1000, shot=5, seed=321)  # doctest: +SKIP
        >>> episodes[0].class_id in ds.classes, len(episodes[0].supports)  # doctest: +SKIP
        (True, 5)
    """
    if n_episodes is None:
        n_episodes = default_episodes(dataset.name)
    for name, value, low in (("n_episodes", n_episodes, 0), ("shot", shot, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise InvalidInputError(f"{name} must be an integer >= {low}, got {value!r}")
    if n_episodes == 0:
        return []
    items = dataset.items
    if not items:
        raise DatasetError(f"the {dataset.name} fold {dataset.fold} {dataset.split} list is empty "
                           f"({dataset.list_source})")
    rng = np.random.default_rng(int(seed))
    policy = _Policy(dataset.on_error, dataset.report)
    reported: set[int] = set()
    episodes: list[Episode] = []
    position = 0
    made_this_pass = 0
    while len(episodes) < n_episodes:
        index = position % len(items)
        if index == 0 and position > 0:
            if made_this_pass == 0:
                raise DatasetError(f"no query of {dataset.name} fold {dataset.fold} {dataset.split} gives a "
                                   f"{shot}-shot episode; {dataset.report.summary(max_lines=10)}")
            made_this_pass = 0
        position += 1
        image_id, label_id = items[index]
        problem = _draw(dataset, rng, image_id, label_id, shot, episodes)
        if problem is None:
            made_this_pass += 1
        elif index not in reported:
            reported.add(index)
            policy(problem)
    return episodes


def pool_episodes(dataset: FSSDataset, supports_per_query: int, seed: int = 0) -> list[Episode]:
    """One-shot episodes planning a pool of supports for every (query, class) a trainer can draw.

    A trainer of the PFENet family draws, for query ``i`` of its list, a class present in the
    query's mask and K supports of that class, afresh every epoch. A *pool cache* serves those
    episodes from a fixed pool: for every query of ``dataset.items`` and every fold class present in
    its mask, ``supports_per_query`` distinct supports are drawn with step 3 of the protocol
    (:func:`draw_supports`: never the query itself) -- all of the class's other supports when it
    has fewer -- and each (query, class, support) becomes a one-shot episode. A K-shot VVP is the
    stack of its supports' one-shot VVPs, so the cache serves any K supports of a pool
    (:meth:`clipprior.PriorCache.episode_priors`), which :class:`clipprior.EpisodeSampler` draws
    each epoch.

    The draws of query ``i`` come from ``np.random.default_rng((seed, i))``: a query's pool does not
    depend on the rest of the list (nor on a shard).

    Args:
        dataset: The training fold (its ``items`` are the queries, ``class_index`` the supports).
        supports_per_query: M, the most supports planned per (query, class).
        seed: Base seed.

    Returns:
        Episodes in list order, then class order, then draw order.

    Raises:
        InvalidInputError: for a bad ``supports_per_query`` or ``seed``.
        DatasetError: a query without a fold class, or a class without any support besides the query
            (under ``on_error="raise"``; reported and left out under ``"skip"``), or an empty list.

    Example:
        >>> episodes = pool_episodes(ds, supports_per_query=8, seed=0)  # doctest: +SKIP
        >>> {len(e.supports) for e in episodes}  # doctest: +SKIP
        {1}
    """
    for name, value, low in (("supports_per_query", supports_per_query, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise InvalidInputError(f"{name} must be an integer >= {low}, got {value!r}")
    if not dataset.items:
        raise DatasetError(f"the {dataset.name} fold {dataset.fold} {dataset.split} list is empty "
                           f"({dataset.list_source})")
    policy = _Policy(dataset.on_error, dataset.report)
    episodes: list[Episode] = []
    planned: set[tuple[str, int]] = set()
    for index, (image_id, label_id) in enumerate(dataset.items):
        rng = np.random.default_rng((int(seed), index))
        try:
            present = dataset.present_classes(label_id)
        except ClipPriorError as err:
            policy(Problem(str(dataset.path(label_id)), str(err), missing=isinstance(err, DataNotFoundError)))
            continue
        if not present:
            policy(Problem(str(dataset.path(label_id)), f"query mask has none of the fold's classes "
                           f"{dataset.classes}; the list does not match this fold and split"))
            continue
        query = (image_id, label_id)
        for class_id in present:
            if (image_id, int(class_id)) in planned:
                continue
            planned.add((image_id, int(class_id)))
            pool = dataset.class_index.get(class_id, [])
            available = sum(1 for pair in pool if pair != query)
            if available == 0:
                policy(Problem(str(dataset.path(image_id)), f"class {class_id} has no support besides this query "
                               "in its support list: a trainer drawing this class for it has no episode"))
                continue
            for k in draw_supports(rng, pool, query, min(int(supports_per_query), available)):
                episodes.append(Episode(image_id, label_id, int(class_id), (pool[k],), index=len(episodes)))
    return episodes


def _draw(dataset: FSSDataset, rng: np.random.Generator, image_id: str, label_id: str, shot: int,
          out: list[Episode]) -> Problem | None:
    """Draw one episode for this query into ``out``; return the problem instead when there is none."""
    try:
        present = dataset.present_classes(label_id)
    except ClipPriorError as err:
        return Problem(str(dataset.path(label_id)), str(err), missing=isinstance(err, DataNotFoundError))
    if not present:
        return Problem(str(dataset.path(label_id)), f"query mask has none of the fold's classes {dataset.classes}; "
                       "the list does not match this fold and split")
    class_id = present[int(rng.integers(len(present)))]
    pool = dataset.class_index.get(class_id, [])
    query = (image_id, label_id)
    available = sum(1 for pair in pool if pair != query)
    if available < shot:
        return Problem(str(dataset.path(image_id)),
                       f"class {class_id} has {available} support(s) besides this query in its support list, "
                       f"a {shot}-shot episode needs {shot}")
    chosen = draw_supports(rng, pool, query, shot)
    out.append(Episode(image_id, label_id, int(class_id), tuple(pool[k] for k in chosen), index=len(out)))
    return None


def draw_supports(rng: np.random.Generator, pool: Sequence[Any], query: Any, shot: int) -> list[int]:
    """Step 3 of the protocol: ``shot`` distinct indices into ``pool``, never an entry equal to ``query``.

    ``k = rng.integers(len(pool))`` is drawn again while ``k`` was drawn before or ``pool[k]`` is
    the query; the indices are returned in draw order. The caller checks that ``pool`` holds at
    least ``shot`` entries other than the query (otherwise this never ends).

    Example:
        >>> draw_supports(np.random.default_rng(0), ["a", "b", "c"], "b", 2)
        [2, 0]
    """
    chosen: list[int] = []
    while len(chosen) < shot:
        k = int(rng.integers(len(pool)))
        if pool[k] == query or k in chosen:
            continue
        chosen.append(k)
    return chosen


def _as_meta(meta: EpisodeMeta | Mapping[str, Any]) -> EpisodeMeta:
    if isinstance(meta, EpisodeMeta):
        meta.validate()
        return meta
    if isinstance(meta, Mapping):
        return EpisodeMeta.from_dict(meta)
    raise InvalidInputError(f"meta must be an EpisodeMeta or a mapping, got {type(meta).__name__}")


def _rel(path: str, root: Path | None) -> str:
    p = Path(path)
    if not p.is_absolute():
        return p.as_posix()
    if root is None:
        raise InvalidInputError(f"episode path {path} is absolute; pass root= to store it relative to the data root")
    try:
        return p.relative_to(root).as_posix()
    except ValueError as err:
        raise InvalidInputError(f"episode path {path} is not under root {root}") from err


def write_episodes(path: str | os.PathLike[str], episodes: Sequence[Episode], meta: EpisodeMeta | Mapping[str, Any],
                   root: str | os.PathLike[str] | None = None) -> Path:
    """Write episodes to a JSON-lines file (format in the module docstring), atomically.

    Args:
        path: Output file (``.jsonl`` by convention); parent folders are created.
        episodes: The episodes.
        meta: Header fields (:class:`EpisodeMeta` or a mapping of its fields); ``n_episodes`` is set
            from ``episodes``.
        root: Data root, needed only when episodes hold absolute paths.

    Returns:
        The written path.

    Raises:
        InvalidInputError: Invalid meta, an episode whose shot differs from ``meta.shot``, or an
            absolute path without ``root``.
    """
    header = dataclasses.replace(_as_meta(meta), n_episodes=len(episodes))
    root_path = Path(root).resolve() if root is not None else None
    lines = [json.dumps({"format": EPISODE_FORMAT, "version": EPISODE_FORMAT_VERSION, **header.to_dict()})]
    for i, ep in enumerate(episodes):
        if not isinstance(ep, Episode):
            raise InvalidInputError(f"episode {i} is a {type(ep).__name__}, expected Episode")
        if ep.shot != header.shot:
            raise InvalidInputError(f"episode {i} has {ep.shot} supports but meta says shot={header.shot}")
        record = {
            "query": [_rel(ep.query_image, root_path), _rel(ep.query_label, root_path)],
            "class": int(ep.class_id),
            "supports": [[_rel(img, root_path), _rel(lbl, root_path)] for img, lbl in ep.supports],
        }
        lines.append(json.dumps(record))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _pair(value: object, where: str) -> Item:
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) and v for v in value):
        return value[0], value[1]
    raise DatasetError(f"{where}: expected an [image, label] pair of non-empty strings, found {value!r}")


def read_episodes(path: str | os.PathLike[str]) -> tuple[list[Episode], EpisodeMeta]:
    """Read an episode file written by :func:`write_episodes`.

    Args:
        path: The ``.jsonl`` file.

    Returns:
        ``(episodes, meta)``; episode paths are ids relative to the data root.

    Raises:
        DataNotFoundError: The file does not exist.
        DatasetError: Not an episode file, a newer format version, a malformed line (named by
            number), a class outside the fold, a shot differing from the header, or fewer or more
            episodes than the header says.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"episode file {path} does not exist")
    with path.open(encoding="utf-8") as handle:
        lines = [(n, line) for n, line in enumerate(handle, start=1) if line.strip()]
    if not lines:
        raise DatasetError(f"episode file {path} is empty")
    try:
        header = json.loads(lines[0][1])
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}:{lines[0][0]}: header is not JSON ({err})") from err
    if not isinstance(header, dict) or header.get("format") != EPISODE_FORMAT:
        raise DatasetError(f"{path} is not a clipprior episode file (its first line must carry "
                           f'"format": "{EPISODE_FORMAT}")')
    version = header.get("version")
    if not isinstance(version, int) or version > EPISODE_FORMAT_VERSION:
        raise DatasetError(f"{path} has episode format version {version!r}; this clipprior reads up to "
                           f"{EPISODE_FORMAT_VERSION}: upgrade clipprior")
    fields = {k: v for k, v in header.items() if k not in ("format", "version")}
    try:
        meta = EpisodeMeta.from_dict(fields)
    except InvalidInputError as err:
        raise DatasetError(f"{path}:{lines[0][0]}: bad header: {err}") from err
    if meta.split not in SPLITS or meta.coco_split not in COCO_SPLITS:
        raise DatasetError(f"{path}: bad split {meta.split!r} / coco_split {meta.coco_split!r} in header")
    allowed = set(fold_classes(meta.dataset, meta.fold, meta.split, meta.coco_split))
    episodes: list[Episode] = []
    for number, line in lines[1:]:
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{where}: not JSON ({err})") from err
        if not isinstance(record, dict) or not {"query", "class", "supports"} <= set(record):
            raise DatasetError(f"{where}: an episode needs 'query', 'class' and 'supports'")
        query = _pair(record["query"], where)
        class_id = record["class"]
        if isinstance(class_id, bool) or not isinstance(class_id, int) or class_id not in allowed:
            raise DatasetError(f"{where}: class {class_id!r} is not a class of {meta.dataset} fold {meta.fold} "
                               f"{meta.split} ({sorted(allowed)})")
        supports = record["supports"]
        if not isinstance(supports, list) or len(supports) != meta.shot:
            raise DatasetError(f"{where}: expected {meta.shot} supports (header shot), "
                               f"found {len(supports) if isinstance(supports, list) else supports!r}")
        episodes.append(Episode(query[0], query[1], class_id, tuple(_pair(s, where) for s in supports),
                                index=len(episodes)))
    if len(episodes) != meta.n_episodes:
        raise DatasetError(f"{path} holds {len(episodes)} episodes but its header says {meta.n_episodes}; "
                           "the file is truncated or was edited")
    return episodes, meta
