"""The two evaluation protocols run over data: FSS over a cache's episodes, CLIP-ES over images.

The FSS protocol scores a cache's episodes; the CLIP-ES protocol scores a list of images with CAMs
read from a cache or computed with CLIP.

The arithmetic (meters, IoU, AP) lives in :mod:`clipprior.evaluate.metrics`; this module feeds
it from caches (:mod:`clipprior.evaluate.episodes`) and data roots.

Example:
    >>> from clipprior.cache import PriorCache  # doctest: +SKIP
    >>> result = evaluate_fold(PriorCache("fold0.h5"), Path("~/data/VOC2012").expanduser())  # doctest: +SKIP
    >>> round(result.scores["vtp_refined"].miou_fixed, 3)  # doctest: +SKIP
    0.562
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipprior.cache import VTP_CAM, VTP_REFINED, PriorCache, kinds_of
from clipprior.config import PriorConfig
from clipprior.data import class_names, load_label, load_rgb, present_classes, present_names, prompt_names
from clipprior.data.classes import dataset_name
from clipprior.data.images import image_size
from clipprior.data.layout import to_id
from clipprior.data.specs import DEFAULT_DATASET, get_dataset
from clipprior.errors import CacheKeyError, DataNotFoundError, DatasetError, InvalidInputError
from clipprior.evaluate.episodes import (
    CacheFacts,
    EpisodeData,
    cache_facts,
    cached_vtp,
    load_episode,
    resolve_data_root,
)
from clipprior.evaluate.metrics import (
    CLIP_ES_REFERENCE,
    CLIP_ES_REFERENCE_NAMES,
    DEFAULT_THRESHOLDS,
    PRIOR_KINDS,
    ClipEsMeter,
    ClipEsScores,
    PriorMeter,
    PriorScores,
    binary_iou,
    label_classes,
)

__all__ = [
    "CAM_KINDS",
    "CachedCams",
    "CamSource",
    "ClipEsImages",
    "ClipEsResult",
    "EpisodeScorer",
    "FoldResult",
    "ModelCams",
    "cache_image_pairs",
    "clip_es_cams",
    "clip_es_images",
    "evaluate_clip_es",
    "evaluate_fold",
    "read_image_list",
]

ProgressFn = Callable[[int], None]
"""Progress callback: called with the number of items done."""

#: The priors the CLIP-ES protocol scores: the kinds of the VTP table (one map per image and class),
#: by their score names (``vtp_raw``, ``vtp_refined``).
CAM_KINDS: tuple[str, ...] = tuple(str(k.prior) for k in kinds_of(VTP_CAM.table) if k.prior)

CamSource = Callable[[str, Path, np.ndarray, list[int]], dict[str, dict[int, Any]]]
"""``source(image id, root, label, classes) -> {"vtp_raw": {class: (H, W)}, "vtp_refined": {...}}``."""


# --------------------------------------------------------------------------------------- FSS protocol


@dataclass
class FoldResult:
    """The scores of one cache (one fold).

    Attributes:
        facts: What the cache says about itself.
        scores: Prior kind -> :class:`PriorScores` (kinds without any cached map are absent).
        missing_classes: Fold classes without any episode in the cache (left out of the means).
    """

    facts: CacheFacts
    scores: dict[str, PriorScores]
    missing_classes: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, per-class entries named."""
        out: dict[str, Any] = {
            "cache": str(self.facts.path), "dataset": self.facts.dataset, "fold": self.facts.fold,
            "split": self.facts.split, "model": self.facts.model, "missing_classes": self.missing_classes,
            "priors": {},
        }
        for kind, scores in self.scores.items():
            d = scores.to_dict()
            for cid, entry in d["per_class"].items():
                entry["name"] = self.facts.class_name(int(cid))
            out["priors"][kind] = d
        return out


def evaluate_fold(
    cache: PriorCache,
    root: Path,
    *,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    fixed_threshold: float = 0.5,
    limit: int | None = None,
    on_episode: ProgressFn | None = None,
) -> FoldResult:
    """Score the cached VTP raw, VTP refined and VVP of every episode of a cache, the FSS way.

    Ground truth: the query's label map from ``root``; ``label == class_id`` is the target, 255 is
    ignored, other classes are background. Priors are compared at the label's (original) size.

    Args:
        cache: The prior cache of one fold.
        root: The data root the cache was computed from.
        thresholds: Thresholds of the IoUs.
        fixed_threshold: The headline threshold.
        limit: Score only the first ``limit`` episodes (a quick look).
        on_episode: Called with the number of episodes done.

    Returns:
        The :class:`FoldResult`; means run over the fold's classes that have episodes.

    Raises:
        InvalidInputError: if the cache has no episode or its images do not match the data root.
    """
    facts = cache_facts(cache)
    records = cache.episodes[:limit] if limit else cache.episodes
    if not records:
        raise InvalidInputError(f"{cache.path} has no episodes to evaluate")
    meters = {k: PriorMeter(thresholds, fixed_threshold=fixed_threshold) for k in PRIOR_KINDS}
    for done, record in enumerate(records, 1):
        data = load_episode(cache, record, root, images=False)
        for kind, prior in data.priors.items():
            if prior is not None:
                meters[kind].update(prior, data.label, record.class_id)
        if on_episode is not None:
            on_episode(done)
    fold = facts.fold_classes()
    seen = set(meters[PRIOR_KINDS[0]].classes)
    missing = sorted(set(fold) - seen) if fold is not None else []
    classes = sorted(set(fold) & seen) if fold is not None else sorted(seen)
    if fold is not None and not classes:
        raise InvalidInputError(f"no episode of {cache.path} has a class of {facts.label()} ({fold})")
    scores = {k: m.result(classes=[c for c in classes if c in m.classes]) for k, m in meters.items() if len(m)}
    return FoldResult(facts, scores, missing)


class EpisodeScorer:
    """Scores episodes one at a time at one threshold: each one's IoU, and the FSS scores of them all.

    What ``clipprior show`` writes on its panels and in its HTML summary: per episode and prior,
    the IoU of ``prior >= threshold`` with the target class (255 ignored, other classes
    background); over the episodes scored, each prior's :class:`PriorScores` (mIoU, FB-IoU, AP)
    as :func:`evaluate_fold` accumulates them.

    Args:
        threshold: The binarisation threshold of the IoUs.
        kinds: The priors scored, in the order results list them [default: :data:`PRIOR_KINDS`].

    Raises:
        InvalidInputError: for a prior kind that is not one of :data:`PRIOR_KINDS`.

    Example:
        >>> scorer = EpisodeScorer(0.5)  # doctest: +SKIP
        >>> scorer.update(load_episode(cache, cache.episodes[0], root, images=False))  # doctest: +SKIP
        {'vtp_raw': 0.41, 'vtp_refined': 0.57, 'vvp': 0.33}
        >>> scorer.results()["vtp_refined"].miou_fixed  # doctest: +SKIP
        0.57
    """

    def __init__(self, threshold: float, kinds: Sequence[str] = PRIOR_KINDS) -> None:
        unknown = [k for k in kinds if k not in PRIOR_KINDS]
        if unknown:
            raise InvalidInputError(f"unknown prior kind(s) {unknown}; use some of {', '.join(PRIOR_KINDS)}")
        self.threshold = float(threshold)
        self.kinds = tuple(kinds)
        self._meters = {k: PriorMeter(thresholds=(threshold,), fixed_threshold=threshold) for k in self.kinds}

    def update(self, data: EpisodeData) -> dict[str, float]:
        """Add one episode; its IoU per prior at the threshold (``nan``: empty prediction and target).

        Priors the episode lacks (``None``) are left out of the result and of the running scores.
        """
        class_id = data.record.class_id
        target, valid = data.label == class_id, data.label != 255
        ious: dict[str, float] = {}
        for kind in self.kinds:
            prior = data.priors.get(kind)
            if prior is None:
                continue
            self._meters[kind].update(prior, data.label, class_id)
            ious[kind] = binary_iou(prior, target, self.threshold, valid=valid)
        return ious

    def results(self) -> dict[str, PriorScores]:
        """The scores over the episodes added, per prior with at least one episode, in :attr:`kinds` order."""
        return {k: m.result() for k, m in self._meters.items() if len(m)}


# ----------------------------------------------------------------------------------- CLIP-ES protocol


def read_image_list(path: Path, dataset: str, split: str) -> list[tuple[str, str]]:
    """(image id, label id) pairs from a list file.

    Each non-empty line is a VOC-style stem (``2007_000032``), an image path, or an ``image label``
    pair as in the FSS trainers' lists; paths are mapped onto the dataset layout.

    Args:
        path: The list file.
        dataset: A registered benchmark (``"pascal5i"``, ``"coco20i"``, ...).
        split: Split whose folders stems refer to.

    Returns:
        The pairs, in file order.

    Raises:
        DataNotFoundError: if the file does not exist.
        DatasetError: for a path outside the dataset's layout.
    """
    if not path.is_file():
        raise DataNotFoundError(f"image list {path} does not exist")
    layout = get_dataset(dataset).layout
    pairs: list[tuple[str, str]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) >= 2:
            pairs.append((to_id(parts[0], dataset, "image"), to_id(parts[1], dataset, "label")))
        elif "/" in parts[0] or "." in parts[0]:
            image = to_id(parts[0], dataset, "image")
            stem = Path(image).stem
            pairs.append((image, layout.label_id(split, stem)))
        else:
            pairs.append((layout.image_id(split, parts[0]), layout.label_id(split, parts[0])))
    return pairs


class CachedCams:
    """CAMs of every ground-truth class of an image, from a prior cache (a :data:`CamSource`).

    Example:
        >>> cams = CachedCams(PriorCache("priors.h5"))  # doctest: +SKIP
        >>> cams("JPEGImages/a.jpg", root, label, [1, 15])["vtp_refined"][15].shape  # doctest: +SKIP
        torch.Size([375, 500])
    """

    def __init__(self, cache: PriorCache) -> None:
        self.cache = cache

    def __call__(self, image: str, root: Path, label: np.ndarray, classes: list[int]) -> dict[str, dict[int, Any]]:
        """The cached raw and refined VTP of ``classes`` for ``image``, at the label's size.

        Raises:
            CacheKeyError: if one of them is not cached.
        """
        kinds = [k for k in kinds_of(VTP_CAM.table) if k.prior in CAM_KINDS]
        return {str(k.prior): {c: cached_vtp(self.cache, k, image, c, tuple(label.shape)) for c in classes}
                for k in kinds}


class ModelCams:
    """CAMs of every ground-truth class of an image, computed with CLIP (a :data:`CamSource`).

    One VTP pass per image (:func:`clipprior.priors.vtp` over every ground-truth class, each with
    the image's other classes in its softmax), PIR on its attention, both resized to the label.

    Example:
        >>> clip = load_clip("openai/clip-vit-base-patch16")  # doctest: +SKIP
        >>> cams = ModelCams(clip, "pascal5i", get_preset("official"))  # doctest: +SKIP
        >>> cams("JPEGImages/a.jpg", root, label, [1, 15])["vtp_raw"][1].shape  # doctest: +SKIP
        torch.Size([375, 500])
    """

    def __init__(self, bundle: Any, dataset: str, config: PriorConfig) -> None:
        self.bundle, self.config = bundle, config
        self.names = prompt_names(dataset)

    def __call__(self, image: str, root: Path, label: np.ndarray, classes: list[int]) -> dict[str, dict[int, Any]]:
        """The raw and refined VTP of ``classes`` for ``image``, at the label's size."""
        from clipprior.preprocess import preprocess_query
        from clipprior.priors import pir, resize_maps, vtp

        if not classes:
            return {kind: {} for kind in CAM_KINDS}
        pixels = preprocess_query(load_rgb(root / image), self.bundle.patch_size, self.config.vtp_resample, "clip")
        names = [self.names[c - 1] for c in classes]
        context = [present_names(label, c, self.names) for c in classes]  # every GT class joins the softmax
        out = vtp(self.bundle, pixels[None], names, image_index=[0] * len(names), context=context,
                  config=self.config, return_attention=True)
        refined = pir(out.cam, out.attention, config=self.config).refined
        size = tuple(label.shape)
        raw_full, refined_full = resize_maps(out.cam, size), resize_maps(refined, size)
        maps = {VTP_CAM.prior: raw_full, VTP_REFINED.prior: refined_full}
        return {kind: {c: maps[kind][i] for i, c in enumerate(classes)} for kind in CAM_KINDS}


def cache_image_pairs(cache: PriorCache, dataset: str, split: str) -> list[tuple[str, str]]:
    """(image id, label id) of every image with a cached VTP, sorted by image id.

    Labels come from the cache's episodes; an image no episode names gets the layout's label of
    its stem in ``split``.
    """
    labels = dict(e.query for e in cache.episodes)
    for e in cache.episodes:
        labels.update(e.supports)
    layout = get_dataset(dataset).layout
    keys = sorted({k for k, _ in cache.vtp_keys()})
    return [(k, labels.get(k) or layout.label_id(split, Path(k).stem)) for k in keys]


def evaluate_clip_es(
    pairs: Sequence[tuple[str, str]],
    root: Path,
    cams: CamSource,
    *,
    n_classes: int,
    bg_powers: Sequence[float] = (1.0, 2.0),
    skip_missing: bool = False,
    on_image: ProgressFn | None = None,
) -> tuple[dict[str, dict[float, ClipEsScores]], int]:
    """The CLIP-ES protocol over a list of images, for raw and refined VTP.

    Args:
        pairs: (image id, label id) pairs relative to ``root``.
        root: Data root.
        cams: Gives, for an image, its label and its ground-truth classes, ``{"vtp_raw": {c: (H, W)},
            "vtp_refined": {...}}``.
        n_classes: Classes including the background (21 for VOC).
        bg_powers: Exponents ``t`` of the background ``(1 - max) ** t``.
        skip_missing: Skip images with a missing cached CAM instead of failing.
        on_image: Called with the number of images done.

    Returns:
        ``{kind: {t: scores}}`` and the number of skipped images.

    Raises:
        CacheKeyError: for a missing cached CAM (unless ``skip_missing``).
        DataNotFoundError: for a missing image or mask.
        DatasetError: for a mask of another size than its image (naming both files).
    """
    meters = {kind: ClipEsMeter(n_classes, bg_powers=bg_powers) for kind in CAM_KINDS}
    skipped = 0
    for done, (image, label_id) in enumerate(pairs, 1):
        label = load_label(root / label_id)
        height, width = image_size(root / image)  # from the header: the pixels are not needed here
        if tuple(label.shape) != (height, width):
            raise DatasetError(f"mask {root / label_id} is {label.shape[0]}x{label.shape[1]} (HxW) but image "
                               f"{root / image} is {height}x{width}; they must have the same size: fix the mask "
                               "(re-export it at its image's size) and rerun")
        classes = present_classes(label, n_classes - 1)
        try:
            maps = cams(image, root, label, classes)
        except CacheKeyError as err:
            if not skip_missing:
                raise CacheKeyError(
                    f"{err}. The CLIP-ES protocol needs the VTP of every ground-truth class of every image: "
                    "precompute them, compute them here with --model, or pass --skip-missing"
                ) from err
            skipped += 1
        else:
            for kind, meter in meters.items():
                meter.update(maps[kind], label)
        if on_image is not None:
            on_image(done)
    return {kind: m.result() for kind, m in meters.items()}, skipped


@dataclass(frozen=True)
class ClipEsImages:
    """What the CLIP-ES protocol scores: a benchmark's images with their masks, under a data root.

    Attributes:
        dataset: Canonical benchmark name (its classes are the protocol's).
        root: The data root the ids are relative to.
        pairs: (image id, label id) pairs, in scoring order.
    """

    dataset: str
    root: Path
    pairs: list[tuple[str, str]]

    @property
    def n_classes(self) -> int:
        """Classes of the label maps, background included (21 for PASCAL VOC), from the dataset registry."""
        return label_classes(self.dataset)

    @property
    def class_names(self) -> list[str]:
        """Name of label value v at index v: ``"background"``, then the benchmark's classes."""
        return ["background", *class_names(self.dataset)]


def clip_es_images(cache: PriorCache | None = None, *, data_root: str | Path | None = None,
                   list_file: str | Path | None = None, dataset: str | None = None, split: str = "train",
                   limit: int | None = None) -> ClipEsImages:
    """Choose the benchmark, the data root and the images the CLIP-ES protocol scores.

    The benchmark is ``dataset``, else the cache's, else
    :data:`~clipprior.data.specs.DEFAULT_DATASET`; the data root is ``data_root``, else the one
    the cache records (:func:`~clipprior.evaluate.resolve_data_root`); the images are those of
    ``list_file`` (:func:`read_image_list`), else every image with a cached VTP
    (:func:`cache_image_pairs`).

    Args:
        cache: The prior cache whose CAMs are scored, if any.
        data_root: The dataset folder with the ground-truth masks.
        list_file: Images to score: VOC stems, image paths or ``image label`` lines.
        dataset: A registered benchmark, by name or alias.
        split: The split whose folders stems (and cached images no episode names) refer to.
        limit: Score only the first ``limit`` images.

    Returns:
        :class:`ClipEsImages`.

    Raises:
        DataNotFoundError: no data root given or recorded, or a missing list file.
        InvalidInputError: neither ``list_file`` nor ``cache`` (nothing says which images), or an
            unknown ``dataset``.
        DatasetError: no image to score.

    Example:
        >>> images = clip_es_images(PriorCache("train.h5"), data_root="~/data/VOC2012")  # doctest: +SKIP
        >>> images.dataset, images.n_classes  # doctest: +SKIP
        ('pascal5i', 21)
    """
    facts = cache_facts(cache) if cache is not None else None
    name = dataset_name(dataset or (facts.dataset if facts and facts.dataset else DEFAULT_DATASET))
    if data_root is None and (facts is None or not facts.data_root):
        raise DataNotFoundError("pass --data-root: the dataset folder with the ground-truth masks")
    if facts is not None:
        root = resolve_data_root(None if data_root is None else Path(data_root), facts)
    else:
        root = Path(str(data_root)).expanduser()  # given: checked above
    if list_file is not None:
        pairs = read_image_list(Path(list_file), name, split)
    elif cache is not None:
        pairs = cache_image_pairs(cache, name, split)
    else:
        raise InvalidInputError("no images to score: pass a list file (--list, e.g. VOC's "
                                "ImageSets/Segmentation/train.txt) or a cache")
    if limit:
        pairs = pairs[:limit]
    if not pairs:
        raise DatasetError("no image to score: the list or cache is empty")
    return ClipEsImages(name, root, pairs)


def clip_es_cams(dataset: str, *, cache: PriorCache | None = None, clip: Any = None,
                 config: PriorConfig | None = None) -> tuple[CamSource, str]:
    """The CAM source of the CLIP-ES protocol: computed with ``clip`` when given, else read from ``cache``.

    Args:
        dataset: The benchmark (its prompt names, for :class:`ModelCams`).
        cache: A prior cache with the VTP of the images (:class:`CachedCams`).
        clip: A loaded :class:`~clipprior.ClipBundle` (:class:`ModelCams`).
        config: The prior config of :class:`ModelCams` [default: :class:`~clipprior.PriorConfig`].

    Returns:
        The source and where its CAMs come from, in words (the cache's path or the model's source).

    Raises:
        InvalidInputError: neither ``clip`` nor ``cache``.

    Example:
        >>> cams, source = clip_es_cams("pascal5i", cache=PriorCache("train.h5"))  # doctest: +SKIP
        >>> source  # doctest: +SKIP
        'train.h5'
    """
    if clip is not None:
        return ModelCams(clip, dataset, config or PriorConfig()), str(clip.source)
    if cache is not None:
        return CachedCams(cache), str(cache.path)
    raise InvalidInputError("the CLIP-ES protocol needs CAMs: pass a cache or a loaded CLIP to compute them with")


@dataclass
class ClipEsResult:
    """The CLIP-ES protocol's scores of one run, with what they were computed from.

    Attributes:
        images: The scored images (:func:`clip_es_images`).
        source: Where the CAMs came from, in words.
        scores: ``{prior: {t: scores}}`` (:func:`evaluate_clip_es`).
        skipped: Images skipped for a missing cached CAM.
    """

    images: ClipEsImages
    source: str
    scores: dict[str, dict[float, ClipEsScores]]
    skipped: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (``clipprior evaluate --protocol clip-es --json``), per-class IoUs named.

        The published CLIP-ES numbers are recorded under CLIP-ES's own names
        (:data:`~clipprior.evaluate.CLIP_ES_REFERENCE_NAMES`).
        """
        names = self.images.class_names
        reference = {CLIP_ES_REFERENCE_NAMES[k]: v for k, v in CLIP_ES_REFERENCE.items()}
        return {
            "protocol": "clip-es", "source": self.source, "dataset": self.images.dataset,
            "images": len(self.images.pairs), "skipped": self.skipped,
            "reference": {"clip_es_voc_train": reference},
            "priors": {k: {f"{t:g}": s.to_dict(names) for t, s in by_t.items()} for k, by_t in self.scores.items()},
        }
