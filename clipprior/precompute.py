"""Planning and running the CLIP passes of a prior cache.

VTP depends only on (image, class) and the query side of VVP only on the image, so the work is
planned around unique passes:

- every unique query image runs through CLIP once, in batches of images of the same size; that one
  pass gives the Grad-CAM of each of its classes (one backward for all pairs of the batch), the
  attention for PIR and the layer features for VVP;
- every unique (support image, class) runs its masked pass once; its features are kept in memory
  only while an episode still needs them (a reference count over the known schedule), so memory
  stays flat as the episode count grows;
- each episode's VVP is then a cheap cosine-max between features already computed.

Everything is at the image's own geometry: the query and supports are resized up to a multiple of
the patch size, as the official VTP path prepares the query, and the maps are stored on that
patch grid with the image size recorded (see ``docs/cache-format.md``).

Example:
    >>> stats = run_precompute(clip, dataset, episodes, writer, class_names=names)  # doctest: +SKIP
    >>> stats.query_passes  # doctest: +SKIP
    364
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from clipprior import __version__
from clipprior._memory import release_freed_memory
from clipprior.config import PriorConfig
from clipprior.errors import InvalidInputError
from clipprior.model import ClipBundle
from clipprior.preprocess import normalize, resize_to_patch_multiple
from clipprior.priors import (
    EpisodePriors,
    TextFeatures,
    _prepare_support,
    _vtp_pass,
    compute_priors,
    encode_text,
    layer_features,
    minmax_normalize,
    pir,
    support_features,
)

__all__ = [
    "PrecomputeStats",
    "QueryWork",
    "WorkPlan",
    "build_provenance",
    "episode_records",
    "plan_chunks",
    "plan_work",
    "recompute_episode",
    "run_precompute",
]

ProgressFn = Callable[[str, int], None]
_QueryFeatures = tuple[torch.Tensor, torch.Tensor, tuple[int, int]]  # (L, n, D) features, (L, n) norms, grid


class _Dataset(Protocol):
    """What the engine needs of a dataset (see :class:`clipprior.data.FSSDataset`).

    An ``image_size(path) -> (height, width)`` method, where present, lets the batches be planned
    from the image headers instead of decoding every image twice.
    """

    def load_image(self, path: str) -> np.ndarray: ...

    def load_label(self, path: str) -> np.ndarray: ...


def _resized_size(dataset: _Dataset, path: str, patch: int) -> tuple[int, int]:
    """The size an image is resized up to (a multiple of ``patch``), as the batches are planned on.

    Read from the image header where the dataset can (``image_size``), else from the decoded image.
    """
    header = getattr(dataset, "image_size", None)
    height, width = header(path) if header is not None else dataset.load_image(path).shape[:2]
    return patch * math.ceil(int(height) / patch), patch * math.ceil(int(width) / patch)


class _Writer(Protocol):
    """What the engine needs of a cache writer (see :class:`clipprior.cache.CacheWriter`)."""

    def has_vtp(self, image_key: str, class_id: int) -> bool: ...

    def has_vvp(self, episode_index: int) -> bool: ...

    def has_image(self, image_key: str) -> bool: ...

    def add_image(self, image_key: str, height: int, width: int) -> None: ...

    def add_vtp(self, image_key: str, class_id: int, cam: Any, refined: Any) -> None: ...

    def add_vvp(self, episode_index: int, vvp: Any) -> None: ...

    def commit(self) -> int: ...


@dataclass
class QueryWork:
    """What one unique query image needs.

    Attributes:
        image: Image id.
        label: Label id.
        classes: Classes whose VTP is needed.
        episodes: Indices of the episodes whose query this is.
    """

    image: str
    label: str
    classes: set[int] = field(default_factory=set)
    episodes: list[int] = field(default_factory=list)


@dataclass
class WorkPlan:
    """The unique passes behind a list of episodes (optionally one shard of them).

    Attributes:
        queries: Unique query images, in first-appearance order.
        support_uses: How many episodes of this plan use each (support image, label, class).
    """

    queries: list[QueryWork]
    support_uses: dict[tuple[str, str, int], int]

    @property
    def n_pairs(self) -> int:
        """Number of (image, class) VTP pairs."""
        return sum(len(q.classes) for q in self.queries)


@dataclass
class PrecomputeStats:
    """What a run did (passes are counted per image, not per batch).

    Attributes:
        query_passes: Query images run through CLIP.
        support_passes: Masked support passes run.
        vtp_written: VTP entries written.
        vvp_written: VVP entries written.
        skipped_vtp: VTP entries already in the cache (resume).
        skipped_vvp: VVP entries already in the cache (resume).
    """

    query_passes: int = 0
    support_passes: int = 0
    vtp_written: int = 0
    vvp_written: int = 0
    skipped_vtp: int = 0
    skipped_vvp: int = 0


def episode_records(episodes: Sequence[Any]) -> list[tuple[int, str, str, int, list[str], list[str]]]:
    """Episodes as rows of the cache's episode table: (index, query, query_label, class, supports, labels)."""
    return [
        (i, e.query_image, e.query_label, int(e.class_id), [s[0] for s in e.supports], [s[1] for s in e.supports])
        for i, e in enumerate(episodes)
    ]


def plan_work(episodes: Sequence[Any], shard: tuple[int, int] | None = None) -> WorkPlan:
    """Group episodes by unique query image; with ``shard=(i, n)`` keep every n-th query image from i.

    Args:
        episodes: Objects with ``query_image``, ``query_label``, ``class_id`` and ``supports``.
        shard: ``(index, count)``; the queries are dealt round-robin in first-appearance order, so
            the shards are disjoint, cover everything and have balanced sizes.

    Returns:
        The :class:`WorkPlan`.

    Raises:
        InvalidInputError: for an invalid shard.

    Example:
        >>> from types import SimpleNamespace as E
        >>> plan = plan_work([E(query_image="a", query_label="a.png", class_id=1, supports=())] * 2)
        >>> len(plan.queries), plan.queries[0].episodes
        (1, [0, 1])
    """
    if shard is not None:
        index, count = shard
        if not (count >= 1 and 0 <= index < count):
            raise InvalidInputError(f"shard {index}/{count} is not valid; use i/n with 0 <= i < n")
    by_image: dict[str, QueryWork] = {}
    for i, episode in enumerate(episodes):
        work = by_image.setdefault(episode.query_image, QueryWork(episode.query_image, episode.query_label))
        work.classes.add(int(episode.class_id))
        work.episodes.append(i)
    queries = list(by_image.values())
    if shard is not None:
        queries = queries[shard[0]::shard[1]]
    uses: dict[tuple[str, str, int], int] = defaultdict(int)
    for work in queries:
        for i in work.episodes:
            episode = episodes[i]
            for image, label in episode.supports:
                uses[(image, label, int(episode.class_id))] += 1
    return WorkPlan(queries=queries, support_uses=dict(uses))


def build_provenance(
    clip: ClipBundle, config: PriorConfig, *, dataset: str, fold: int, split: str, shot: int, seed: int,
    n_episodes: int, list_checksum: str, class_names: Sequence[str], extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The settings a cache depends on, stored in its attributes and compared on resume.

    Example:
        >>> prov = build_provenance(clip, PriorConfig(), dataset="pascal5i", fold=0, split="val",
        ...                         shot=1, seed=0, n_episodes=1000, list_checksum="...",
        ...                         class_names=names)  # doctest: +SKIP
    """
    names_digest = hashlib.sha256("\n".join(class_names).encode()).hexdigest()
    prov: dict[str, Any] = {
        "clipprior_version": __version__,
        "model": clip.source,
        "weights_sha256": clip.checksum,
        "config": config.to_json(),
        "text_classes": config.text_classes,
        "dataset": dataset,
        "fold": int(fold),
        "split": split,
        "shot": int(shot),
        "seed": int(seed),
        "episodes": int(n_episodes),
        "list_sha256": list_checksum,
        "prompt_names_sha256": names_digest,
        "geometry": "native: image resized up to a multiple of the patch size; maps on its patch grid",
    }
    prov.update(extra or {})
    return prov


@dataclass(frozen=True)
class _Cells:
    """A support's features on its foreground cells: what the cosine-max of VVP reads.

    Cells outside the mask carry zeroed features in :func:`~clipprior.priors.vvp_from_features`,
    whose cosine with any query patch is 0; keeping only the foreground cells and clamping the
    maximum at 0 when such cells exist gives the same maps with a fraction of the memory and work.

    Attributes:
        features: (L, f, D) float32 features of the f foreground cells.
        norms: (L, f) their L2 norms.
        has_background: Whether some cell of the grid lies outside the mask.
    """

    features: torch.Tensor
    norms: torch.Tensor
    has_background: bool

    @classmethod
    def from_grid(cls, features: torch.Tensor, mask: torch.Tensor) -> _Cells:
        """(L, m, D) features and (m,) bool mask of the support's grid -> its foreground cells."""
        mask = mask.bool()
        cells = features.float()[:, mask].contiguous()
        return cls(cells, cells.norm(dim=-1), bool((~mask).any()))


def _best_match(query: torch.Tensor, query_norms: torch.Tensor, cells: _Cells, eps: float) -> torch.Tensor:
    """Per query patch, the best cosine among a support's cells: (L, n, D), (L, n) -> (L, n)."""
    if cells.features.shape[1] == 0:
        return torch.zeros(query_norms.shape)
    sim = torch.bmm(query, cells.features.transpose(1, 2))
    sim.div_(query_norms[:, :, None] * cells.norms[:, None, :] + eps)
    best = sim.amax(dim=-1)
    return best.clamp_min(0.0) if cells.has_background else best


class _SupportStore:
    """Support features (foreground cells) kept while episodes still need them (reference counted)."""

    def __init__(self, uses: dict[tuple[str, str, int], int]) -> None:
        self.remaining = dict(uses)
        self.features: dict[tuple[str, str, int], _Cells] = {}

    def take(self, key: tuple[str, str, int]) -> _Cells:
        value = self.features[key]
        self.remaining[key] -= 1
        if self.remaining[key] <= 0:
            del self.features[key]
        return value


def _batches(items: Sequence[Any], size_of: Callable[[Any], tuple[int, int]], batch_size: int) -> Iterable[list[Any]]:
    """Consecutive groups of at most ``batch_size`` items of equal size, in a stable order."""
    groups: dict[tuple[int, int], list[Any]] = defaultdict(list)
    for item in items:
        groups[size_of(item)].append(item)
    for size in sorted(groups):
        group = groups[size]
        for start in range(0, len(group), batch_size):
            yield group[start:start + batch_size]


def _present_names(label: np.ndarray, target: int, class_names: Sequence[str]) -> list[str]:
    values = np.unique(label)
    return [class_names[int(v) - 1] for v in values if 1 <= int(v) <= len(class_names) and int(v) != target]


def plan_chunks(queries: Sequence[QueryWork], chunk_images: int, chunk_episodes: int) -> list[list[QueryWork]]:
    """Cut the planned query images, in order, into the chunks of a run.

    A chunk takes images until it holds ``chunk_images`` of them or their episodes reach
    ``chunk_episodes``; an image is never split, so one image with more episodes than that is a
    chunk on its own.

    Args:
        queries: :attr:`WorkPlan.queries`, in first-appearance order.
        chunk_images: Most images per chunk (>= 1).
        chunk_episodes: Episode count that closes a chunk (>= 1).

    Returns:
        The chunks; concatenated, they are ``queries``.

    Raises:
        InvalidInputError: if either limit is below 1.

    Example:
        >>> [len(c) for c in plan_chunks(plan_work(episodes).queries, 64, 256)]  # doctest: +SKIP
        [64, 64, 31]
    """
    if chunk_images < 1 or chunk_episodes < 1:
        raise InvalidInputError(f"chunk_images={chunk_images} and chunk_episodes={chunk_episodes} must be >= 1")
    chunks: list[list[QueryWork]] = []
    current: list[QueryWork] = []
    count = 0
    for work in queries:
        current.append(work)
        count += len(work.episodes)
        if len(current) >= chunk_images or count >= chunk_episodes:
            chunks.append(current)
            current, count = [], 0
    if current:
        chunks.append(current)
    return chunks


def run_precompute(
    clip: ClipBundle,
    dataset: _Dataset,
    episodes: Sequence[Any],
    writer: _Writer,
    *,
    class_names: Sequence[str],
    config: PriorConfig | None = None,
    batch_size: int = 8,
    shard: tuple[int, int] | None = None,
    chunk_images: int = 64,
    chunk_episodes: int = 256,
    progress: ProgressFn | None = None,
    text: TextFeatures | None = None,
) -> PrecomputeStats:
    """Compute and write every VTP (raw and refined) and VVP the episodes need.

    The plan fixes every batch: query images are cut into chunks in first-appearance order (see
    :func:`plan_chunks`), and within a chunk, images of equal (resized) size run in batches of
    ``batch_size``; each (support, class) belongs to the chunk of its first use and runs in that
    chunk's support batches. A rerun skips the chunks whose entries are all cached and recomputes
    the others batch by batch, exactly as an uninterrupted run would, writing only what is
    missing: a resumed cache is bit-for-bit the cache of an uninterrupted run.

    Args:
        clip: The loaded CLIP.
        dataset: Loads images and labels by id.
        episodes: The episodes (see :func:`clipprior.data.sample_episodes`).
        writer: Where the priors go (a :class:`clipprior.cache.CacheWriter`).
        class_names: Prompt name of class id c at index c - 1.
        config: Knobs; defaults to :class:`PriorConfig`.
        batch_size: Images per CLIP batch.
        shard: ``(index, count)`` to compute one shard of the query images.
        chunk_images: Most query images per chunk (bounds memory; the unit of resumption).
        chunk_episodes: A chunk is closed once its images hold this many episodes, so that its
            VVP work and buffers stay bounded when there are many episodes per image.
        progress: Called as ``progress(kind, n)`` with kind ``"query"``, ``"support"`` or ``"episode"``.
        text: Precomputed text features of ``class_names`` (encoded here when ``None``).

    Returns:
        :class:`PrecomputeStats`.

    Raises:
        InvalidInputError: for a batch size below 1 or a class id without a name.
        DatasetError: from the data layer, for broken images or masks.
    """
    config = config or PriorConfig()
    if min(batch_size, chunk_images, chunk_episodes) < 1:
        raise InvalidInputError(f"batch_size={batch_size}, chunk_images={chunk_images} and "
                                f"chunk_episodes={chunk_episodes} must all be >= 1")
    class_names = list(class_names)
    for episode in episodes:
        if not 1 <= int(episode.class_id) <= len(class_names):
            raise InvalidInputError(f"episode class {episode.class_id} has no prompt name (have {len(class_names)})")
    text = text or encode_text(clip, class_names, config)
    plan = plan_work(episodes, shard)
    chunks = plan_chunks(plan.queries, chunk_images, chunk_episodes)
    home_keys: list[list[tuple[str, str, int]]] = []
    seen: set[tuple[str, str, int]] = set()
    home: dict[tuple[str, str, int], int] = {}
    for c, chunk in enumerate(chunks):
        keys = []
        for i in (i for q in chunk for i in q.episodes):
            for image, label in episodes[i].supports:
                key = (image, label, int(episodes[i].class_id))
                if key not in seen:
                    seen.add(key)
                    home[key] = c
                    keys.append(key)
        home_keys.append(keys)
    todo = [episodes[i] for q in plan.queries for i in q.episodes if not writer.has_vvp(i)]
    store = _SupportStore(plan_work(todo).support_uses)
    stats = PrecomputeStats()
    report = progress or (lambda kind, n: None)
    for chunk in chunks:
        chunk_eps = [i for q in chunk for i in q.episodes]
        todo_eps = [i for i in chunk_eps if not writer.has_vvp(i)]
        needs_features = {episodes[i].query_image for i in todo_eps}
        missing_vtp = any(not writer.has_vtp(q.image, k) for q in chunk for k in q.classes)
        if todo_eps or missing_vtp:
            query_features = _run_queries(clip, dataset, chunk, needs_features, writer, text, class_names, config,
                                          batch_size, stats, report)
            needed = [(image, label, int(episodes[i].class_id)) for i in todo_eps
                      for image, label in episodes[i].supports]
            for h in sorted({home[k] for k in needed if k not in store.features}):
                _run_supports(clip, dataset, home_keys[h], store, config, batch_size, stats, report)
            for i in todo_eps:
                writer.add_vvp(i, _episode_vvp(episodes[i], query_features, store, config))
                stats.vvp_written += 1
            writer.commit()
            del query_features
            release_freed_memory()  # keep the resident set flat across chunks (see clipprior/_memory.py)
        else:
            report("query", len(chunk))
        skipped = len(chunk_eps) - len(todo_eps)
        stats.skipped_vvp += skipped
        report("episode", len(chunk_eps))
    return stats


def _episode_vvp(episode: Any, query_features: dict[str, _QueryFeatures], store: _SupportStore,
                 config: PriorConfig) -> np.ndarray:
    """(L*K, h, w) VVP of one episode, layer-major, from cached query and support features.

    The same maps as :func:`~clipprior.priors.vvp_from_features`, computed on the supports'
    foreground cells only (see :class:`_Cells`).
    """
    feats, norms, grid = query_features[episode.query_image]
    maps = []
    for image, label in episode.supports:
        cells = store.take((image, label, int(episode.class_id)))
        best = _best_match(feats, norms, cells, config.vvp_eps).reshape(-1, *grid)
        maps.append(minmax_normalize(best, config.vvp_eps) if config.vvp_normalize else best)
    stacked = torch.stack(maps, dim=1)  # (L, K, h, w): layer-major, shots inner
    return stacked.reshape(-1, *grid).numpy().astype(np.float32)


def _run_queries(
    clip: ClipBundle, dataset: _Dataset, chunk: list[QueryWork], needs_features: set[str], writer: _Writer,
    text: TextFeatures, class_names: Sequence[str], config: PriorConfig, batch_size: int, stats: PrecomputeStats,
    report: ProgressFn,
) -> dict[str, _QueryFeatures]:
    """Run the planned query batches of a chunk that hold missing work; write the missing VTP.

    Every batch runs whole, with every class of each of its images, so its numbers do not depend on
    what an interrupted run had already written. The batches are planned on the resized sizes and
    the images prepared batch by batch (holding a whole chunk's float pixels would cost ~190 MB at
    VOC sizes).

    Returns:
        The VVP features (L, n, D), their norms (L, n) and the grid of each image in ``needs_features``.
    """
    patch = clip.patch_size
    reuse = config.vvp_pixel_norm == "clip"
    sizes = {}
    for work in chunk:
        sizes[work.image] = _resized_size(dataset, work.image, patch)
    features: dict[str, _QueryFeatures] = {}
    for batch in _batches(chunk, lambda q: sizes[q.image], batch_size):
        missing = [(q, c) for q in batch for c in sorted(q.classes) if not writer.has_vtp(q.image, c)]
        if not missing and not any(q.image in needs_features for q in batch):
            report("query", len(batch))
            continue
        prepared = {}
        for work in batch:
            rgb = dataset.load_image(work.image)
            prepared[work.image] = (rgb, dataset.load_label(work.label),
                                    resize_to_patch_multiple(rgb, patch, config.vtp_resample))
        pixels = torch.stack([normalize(prepared[q.image][2], "clip") for q in batch]).to(clip.device, clip.dtype)
        pairs = [(b, c) for b, q in enumerate(batch) for c in sorted(q.classes)]
        sets = []
        for b, c in pairs:
            names = [class_names[c - 1]]
            if config.text_classes == "present":
                names += [n for n in _present_names(prepared[batch[b].image][1], c, class_names) if n not in names]
            sets.append(names)
        index = torch.tensor([b for b, _ in pairs], dtype=torch.long)
        out = _vtp_pass(clip, pixels, index, sets, text, config, True, reuse)
        stats.query_passes += len(batch)
        refined = pir(out.cam, out.attention, config=config).refined
        for p, (b, c) in enumerate(pairs):
            work = batch[b]
            if not writer.has_image(work.image):
                height, width = prepared[work.image][0].shape[:2]
                writer.add_image(work.image, height, width)
            if not writer.has_vtp(work.image, c):
                writer.add_vtp(work.image, c, out.cam[p].cpu().numpy(), refined[p].cpu().numpy())
                stats.vtp_written += 1
        grid = tuple(out.cam.shape[-2:])
        for b, work in enumerate(batch):
            if work.image not in needs_features:
                continue
            if out.features is not None:
                feats = out.features[b]
            else:
                qpix = normalize(prepared[work.image][2], config.vvp_pixel_norm)[None]
                feats = layer_features(clip, qpix, config.vvp_layers, config)[0]
            feats = feats.float().cpu()
            features[work.image] = (feats, feats.norm(dim=-1), grid)
        report("query", len(batch))
    return features


def _run_supports(
    clip: ClipBundle, dataset: _Dataset, keys: Sequence[tuple[str, str, int]], store: _SupportStore,
    config: PriorConfig, batch_size: int, stats: PrecomputeStats, report: ProgressFn,
) -> None:
    """Run the planned support batches of one chunk (its first-use keys) that a pending episode needs.

    Batches run whole, so a resumed run computes each support with the same batch partners as an
    uninterrupted one; features no pending episode needs are dropped at once. The batches are
    planned on the images' resized sizes and their pixels prepared batch by batch: holding every
    prepared support of a chunk would grow with the episodes (PASCAL 5-shot: 365 x 4 MB).
    """
    patch = clip.patch_size

    def prepare(key: tuple[str, str, int]) -> tuple[torch.Tensor, torch.Tensor]:
        image, label, class_id = key
        raw = dataset.load_label(label)
        fss = np.where(raw == class_id, 1, np.where(raw == 255, 255, 0)).astype(np.uint8)
        return _prepare_support(dataset.load_image(image), fss, patch, config)

    sizes = {}
    for key in keys:
        sizes[key] = _resized_size(dataset, key[0], patch)
    for batch in _batches(keys, sizes.__getitem__, batch_size):
        wanted = [k for k in batch if store.remaining.get(k, 0) > 0 and k not in store.features]
        if not wanted:
            continue
        prepared = [prepare(k) for k in batch]
        pixels = torch.stack([p[0] for p in prepared])
        labels = torch.stack([p[1] for p in prepared])
        del prepared
        feats, masks = support_features(clip, pixels, labels, config, foreground_only=True)
        for j, key in enumerate(batch):
            if key in wanted:
                store.features[key] = _Cells.from_grid(feats[j].cpu(), masks[j].cpu())
        stats.support_passes += len(batch)
        report("support", len(batch))


def recompute_episode(
    clip: ClipBundle, dataset: _Dataset, episode: Any, *, class_names: Sequence[str], config: PriorConfig,
) -> EpisodePriors:
    """The priors of one episode computed directly, as the engine computes them for the cache.

    Used by ``clipprior verify --sample`` to check cached entries against a fresh computation.

    Args:
        clip: The loaded CLIP.
        dataset: Loads images and labels by id.
        episode: Object with ``query_image``, ``query_label``, ``class_id``, ``supports``.
        class_names: Prompt name of class id c at index c - 1.
        config: The cache's config.

    Returns:
        :class:`~clipprior.priors.EpisodePriors` on the query's patch grid.
    """
    class_id = int(episode.class_id)
    query = dataset.load_image(episode.query_image)
    context: list[str] = []
    if config.text_classes == "present":
        context = _present_names(dataset.load_label(episode.query_label), class_id, class_names)
    supports, masks = [], []
    for image, label in episode.supports:
        supports.append(dataset.load_image(image))
        raw = dataset.load_label(label)
        masks.append(np.where(raw == class_id, 1, np.where(raw == 255, 255, 0)).astype(np.uint8))
    return compute_priors(clip, query, class_names[class_id - 1], supports, masks, context=context, config=config)
