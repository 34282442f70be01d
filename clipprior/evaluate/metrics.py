"""Prior quality against ground truth: FSS-style mIoU / FB-IoU / AP, and the CLIP-ES CAM protocol.

Two protocols live here, both pure numpy (torch tensors are accepted and copied to the CPU):

*Few-shot (FSS) protocol* -- :class:`PriorMeter`. A prior map ``p`` (values in [0, 1]) of an
episode is compared with the ground truth of the episode's target class: ``target = label == class_id``,
pixels labelled ``ignore_index`` (255) are left out, every other class counts as background. The
binary prediction at threshold ``t`` is ``p >= t``. As in the FSS papers, intersection and union
are accumulated per class over all the episodes of that class and only then divided; mIoU is the
mean of the per-class IoUs over the fold's classes, and FB-IoU is the mean of the foreground IoU
and the background IoU accumulated over all episodes of the fold. Average precision ranks every
non-ignored pixel of a class (over all its episodes) by its prior value; it needs no threshold.

The meter does not keep pixels: it keeps, per class, a histogram of the prior values of the
foreground and of the background pixels over a fixed set of bin edges that contains every
evaluation threshold plus a fine uniform grid on [0, 1] (``ap_bins`` cells). IoU at the
thresholds is exact; AP treats the values inside one fine cell as tied, which makes it exact for
priors quantised to that grid and otherwise accurate to the grid's resolution (1/1000 by default).

*CLIP-ES protocol* -- :class:`ClipEsMeter`. For every image, the CAMs of all its ground-truth
classes are stacked with a background score ``(1 - max_c cam_c) ** t``, the argmax gives a
21-class label map, and a confusion matrix over the whole list yields the per-class IoU and the
mIoU (CLIP-ES reports 58.6 with t=1 on raw CAMs and 70.8 after its attention refinement on VOC
train).

Example:
    >>> import numpy as np
    >>> meter = PriorMeter(thresholds=(0.5,))
    >>> label = np.zeros((4, 4), dtype=np.uint8); label[:2] = 7           # class 7 on the top half
    >>> prior = np.zeros((4, 4)); prior[:3] = 0.9                         # predicts three rows
    >>> meter.update(prior, label, class_id=7)
    >>> round(meter.result().miou_fixed, 4)                                # 8 / 12
    0.6667
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from clipprior.cache import PRIORS, VTP_CAM, VTP_REFINED
from clipprior.data.specs import DEFAULT_DATASET, get_dataset
from clipprior.errors import InvalidInputError

__all__ = [
    "CLIP_ES_REFERENCE",
    "CLIP_ES_REFERENCE_NAMES",
    "DEFAULT_AP_BINS",
    "DEFAULT_FIXED_THRESHOLD",
    "DEFAULT_THRESHOLDS",
    "PRIOR_KINDS",
    "ClipEsMeter",
    "ClipEsScores",
    "ConfusionMeter",
    "PriorMeter",
    "PriorScores",
    "average_precision",
    "binary_iou",
    "clip_es_labels",
    "label_classes",
    "mean_over_folds",
    "vvp_map",
]

#: Thresholds at which the FSS protocol evaluates binarised priors: 0.00, 0.05, ..., 1.00.
DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(21))
#: The threshold of the "fixed threshold" mIoU.
DEFAULT_FIXED_THRESHOLD: float = 0.5
#: Cells of the uniform grid on [0, 1] over which average precision ranks prior values.
DEFAULT_AP_BINS: int = 1000
#: The priors of an episode by the names their scores go by, in the order tables list them (the
#: prior map kinds :data:`clipprior.cache.PRIORS`): ``vtp_raw``, ``vtp_refined``, ``vvp``).
PRIOR_KINDS: tuple[str, ...] = tuple(str(k.prior) for k in PRIORS)
#: CLIP-ES's published CAM mIoU (%) on PASCAL VOC 2012 train, for comparison tables, by the prior
#: each is compared with (:data:`clipprior.cache.VTP_CAM` ``.prior``, ``"vtp_raw"``: its softmax
#: Grad-CAM; :data:`clipprior.cache.VTP_REFINED` ``.prior``, ``"vtp_refined"``: after its attention
#: refinement).
CLIP_ES_REFERENCE: dict[str, float] = {str(VTP_CAM.prior): 58.6, str(VTP_REFINED.prior): 70.8}
#: CLIP-ES's own names of those two numbers, by prior: the keys ``evaluate --json`` records them under.
CLIP_ES_REFERENCE_NAMES: dict[str, str] = {str(VTP_CAM.prior): "raw", str(VTP_REFINED.prior): "refined"}


def label_classes(dataset: str | None = None) -> int:
    """Classes of a benchmark's semantic label maps, background included (from the dataset registry).

    Args:
        dataset: A registered benchmark [default: :data:`clipprior.data.specs.DEFAULT_DATASET`].

    Returns:
        Its foreground classes plus one.

    Raises:
        InvalidInputError: for an unknown dataset.

    Example:
        >>> label_classes(), label_classes("coco20i")
        (21, 81)
    """
    return get_dataset(dataset or DEFAULT_DATASET).num_classes + 1


def _to_numpy(x: np.ndarray | torch.Tensor | Any, name: str) -> np.ndarray:
    """Any array-like (numpy, torch on any device, nested lists) as a numpy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu")
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return x.numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as err:
        raise InvalidInputError(f"{name} must be an array or tensor, got {type(x).__name__}") from err


def _check_map(prior: np.ndarray | torch.Tensor, name: str = "prior") -> np.ndarray:
    """A 2-D finite float64 map."""
    arr = _to_numpy(prior, name)
    if arr.ndim != 2:
        raise InvalidInputError(f"{name} must be a 2-D (H, W) map, got shape {tuple(arr.shape)}")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise InvalidInputError(f"{name} contains NaN or infinite values; check the prior computation")
    return arr


def _check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise InvalidInputError(
            f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}; resize the prior to the "
            "label's size first (EpisodePriors.resized(label.shape) or PriorCache.vtp(..., size='original'))"
        )


def _check_thresholds(thresholds: Iterable[float]) -> tuple[float, ...]:
    values = tuple(float(t) for t in thresholds)
    if not values:
        raise InvalidInputError("thresholds is empty; pass at least one threshold, e.g. (0.5,)")
    if any(not math.isfinite(t) for t in values):
        raise InvalidInputError(f"thresholds must be finite numbers, got {values}")
    return tuple(sorted(set(values)))


def vvp_map(vvp: np.ndarray | torch.Tensor, *, normalize: bool = True, eps: float = 1e-7) -> np.ndarray:
    """One map out of an episode's VVP stack: the mean over its channels, min-max normalised.

    A VVP holds one cosine-similarity map per (layer, shot); PI-CLIP feeds them all to its
    network. To look at VVP or to score it beside VTP, clipprior averages the channels and, by
    default, min-max normalises the result to [0, 1] (the paper's Eq. 8), so that a threshold
    means the same for all three priors.

    Args:
        vvp: (C, h, w) stack or an (h, w) map.
        normalize: Min-max normalise: ``(x - min) / (max - min + eps)``.
        eps: Added to the denominator.

    Returns:
        (h, w) float32 map.

    Raises:
        InvalidInputError: for other ranks or non-finite values.

    Example:
        >>> vvp_map(np.array([[[0.2, 0.4]], [[0.4, 0.6]]])).round(3).tolist()
        [[0.0, 1.0]]
    """
    arr = _to_numpy(vvp, "vvp").astype(np.float64)
    if arr.ndim == 3:
        arr = arr.mean(axis=0)
    arr = _check_map(arr, "vvp")
    if normalize:
        arr = (arr - arr.min()) / (arr.max() - arr.min() + eps)
    return arr.astype(np.float32)


def binary_iou(
    prior: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    threshold: float = DEFAULT_FIXED_THRESHOLD,
    *,
    valid: np.ndarray | torch.Tensor | None = None,
) -> float:
    """IoU of one binarised prior with one binary mask (a single episode; no accumulation).

    Args:
        prior: (H, W) prior map; the prediction is ``prior >= threshold``.
        target: (H, W) boolean ground truth of the target class.
        threshold: Binarisation threshold.
        valid: Optional (H, W) boolean map of the pixels that count (e.g. ``label != 255``).

    Returns:
        The IoU in [0, 1]; ``nan`` when both the prediction and the target are empty.

    Raises:
        InvalidInputError: on shape mismatches or non-finite priors.

    Example:
        >>> import numpy as np
        >>> binary_iou(np.array([[0.9, 0.1], [0.8, 0.7]]), np.array([[1, 0], [1, 0]], bool))
        0.6666666666666666
    """
    p = _check_map(prior)
    t = _to_numpy(target, "target").astype(bool)
    _check_same_shape(p, t, "prior", "target")
    pred = p >= threshold
    if valid is not None:
        v = _to_numpy(valid, "valid").astype(bool)
        _check_same_shape(p, v, "prior", "valid")
        pred, t = pred & v, t & v
    union = int(np.count_nonzero(pred | t))
    return float(np.count_nonzero(pred & t) / union) if union else float("nan")


def average_precision(scores: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor) -> float:
    """Exact average precision of a ranking (tied scores form one step), by sorting.

    ``AP = sum_k (R_k - R_{k-1}) P_k`` over the distinct score values in decreasing order, where
    ``P_k`` and ``R_k`` are precision and recall of ``score >= s_k`` -- the step-wise AP that
    scikit-learn's ``average_precision_score`` computes. :class:`PriorMeter` computes the same
    quantity from histograms; this function is the reference for small inputs.

    Args:
        scores: (N,) or any-shaped scores.
        targets: Boolean array of the same shape (True = positive).

    Returns:
        The AP in [0, 1]; ``nan`` when there is no positive.

    Raises:
        InvalidInputError: if the shapes differ.

    Example:
        >>> import numpy as np
        >>> average_precision(np.array([0.9, 0.8, 0.7, 0.1]), np.array([True, False, True, False]))
        0.8333333333333333
    """
    s = _to_numpy(scores, "scores").astype(np.float64).ravel()
    y = _to_numpy(targets, "targets").astype(bool).ravel()
    if s.shape != y.shape:
        raise InvalidInputError(f"scores has {s.size} values but targets has {y.size}")
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tp = np.cumsum(y)
    fp = np.cumsum(~y)
    last_of_group = np.r_[s[1:] != s[:-1], True]  # the last index of each run of tied scores
    tp, fp = tp[last_of_group], fp[last_of_group]
    recall_step = np.diff(np.r_[0, tp]) / n_pos
    return float(np.sum(recall_step * tp / (tp + fp)))


@dataclass(frozen=True)
class PriorScores:
    """Scores of one kind of prior over one fold (the result of :meth:`PriorMeter.result`).

    IoUs are fractions in [0, 1] (tables multiply by 100).

    Attributes:
        classes: (C,) class ids the means run over, ascending.
        thresholds: (T,) evaluation thresholds, ascending.
        fixed_threshold: The threshold of :attr:`miou_fixed`; one of :attr:`thresholds`.
        class_iou: (C, T) IoU of each class at each threshold (accumulated over its episodes).
        miou: (T,) mean of :attr:`class_iou` over the classes, per threshold.
        fbiou: (T,) FB-IoU per threshold.
        class_ap: (C,) average precision of each class.
        class_episodes: (C,) number of episodes seen per class.
        class_pixels: (C,) number of foreground (target) pixels seen per class.
    """

    classes: tuple[int, ...]
    thresholds: tuple[float, ...]
    fixed_threshold: float
    class_iou: np.ndarray
    miou: np.ndarray
    fbiou: np.ndarray
    class_ap: np.ndarray
    class_episodes: np.ndarray
    class_pixels: np.ndarray = field(repr=False)

    @property
    def _fixed_index(self) -> int:
        return self.thresholds.index(self.fixed_threshold)

    @property
    def best_index(self) -> int:
        """Index of the threshold with the highest mIoU (the lowest such threshold on ties)."""
        return int(np.nanargmax(self.miou)) if np.isfinite(self.miou).any() else 0

    @property
    def best_threshold(self) -> float:
        """The threshold with the highest mIoU (an oracle choice: it looks at the ground truth)."""
        return self.thresholds[self.best_index]

    @property
    def miou_fixed(self) -> float:
        """The mIoU at :attr:`fixed_threshold`."""
        return float(self.miou[self._fixed_index])

    @property
    def miou_best(self) -> float:
        """The mIoU at :attr:`best_threshold`."""
        return float(self.miou[self.best_index])

    @property
    def fbiou_fixed(self) -> float:
        """FB-IoU at :attr:`fixed_threshold`."""
        return float(self.fbiou[self._fixed_index])

    @property
    def fbiou_best(self) -> float:
        """FB-IoU at :attr:`best_threshold` (the mIoU-best threshold)."""
        return float(self.fbiou[self.best_index])

    @property
    def map(self) -> float:
        """Mean average precision over the classes (classes without foreground pixels left out)."""
        finite = self.class_ap[np.isfinite(self.class_ap)]
        return float(finite.mean()) if finite.size else float("nan")

    @property
    def episodes(self) -> int:
        """Total number of episodes."""
        return int(self.class_episodes.sum())

    def summary(self) -> dict[str, float]:
        """The headline numbers: mIoU / FB-IoU at the fixed and at the best threshold, and mAP.

        Example:
            >>> import numpy as np
            >>> m = PriorMeter(thresholds=(0.5,)); m.update(np.ones((2, 2)), np.ones((2, 2), int), 1)
            >>> m.result().summary()["miou_fixed"]
            1.0
        """
        return {
            "miou_fixed": self.miou_fixed,
            "miou_best": self.miou_best,
            "best_threshold": self.best_threshold,
            "fbiou_fixed": self.fbiou_fixed,
            "fbiou_best": self.fbiou_best,
            "map": self.map,
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-serialisable values (NaN becomes ``None``)."""

        def num(x: float) -> float | None:
            return None if not math.isfinite(x) else float(x)

        return {
            **{k: num(v) for k, v in self.summary().items()},
            "fixed_threshold": self.fixed_threshold,
            "episodes": self.episodes,
            "thresholds": list(self.thresholds),
            "miou": [num(v) for v in self.miou],
            "fbiou": [num(v) for v in self.fbiou],
            "per_class": {
                str(c): {
                    "iou_fixed": num(self.class_iou[i, self._fixed_index]),
                    "iou_best": num(self.class_iou[i, self.best_index]),
                    "ap": num(self.class_ap[i]),
                    "episodes": int(self.class_episodes[i]),
                    "fg_pixels": int(self.class_pixels[i]),
                    "iou": [num(v) for v in self.class_iou[i]],
                }
                for i, c in enumerate(self.classes)
            },
        }


class PriorMeter:
    """Accumulates one kind of prior over the episodes of a fold, the FSS way.

    Args:
        thresholds: Thresholds at which IoUs are reported (``prior >= t`` is foreground).
        fixed_threshold: The threshold of the headline "fixed" mIoU; added to ``thresholds`` if absent.
        ap_bins: Cells of the uniform grid on [0, 1] at which average precision ranks values.

    Raises:
        InvalidInputError: on empty / non-finite thresholds or ``ap_bins < 1``.

    Example:
        >>> import numpy as np
        >>> meter = PriorMeter()
        >>> label = np.array([[0, 3], [3, 255]])
        >>> meter.update(np.array([[0.2, 0.9], [0.6, 0.0]]), label, class_id=3)
        >>> scores = meter.result()
        >>> scores.miou_fixed, scores.map
        (1.0, 1.0)
    """

    def __init__(
        self,
        thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
        *,
        fixed_threshold: float = DEFAULT_FIXED_THRESHOLD,
        ap_bins: int = DEFAULT_AP_BINS,
    ) -> None:
        if int(ap_bins) < 1:
            raise InvalidInputError(f"ap_bins={ap_bins} must be >= 1")
        self.fixed_threshold = float(fixed_threshold)
        self.thresholds = _check_thresholds((*thresholds, self.fixed_threshold))
        self.ap_bins = int(ap_bins)
        grid = np.arange(self.ap_bins + 1) / self.ap_bins  # k / bins exactly (linspace rounds some edges up)
        # Bin j holds the values v with edges[j-1] <= v < edges[j] (bin 0: v < edges[0]; last: v >= edges[-1]).
        self._edges = np.unique(np.concatenate([grid, np.asarray(self.thresholds, dtype=np.float64)]))
        self._threshold_pos = np.searchsorted(self._edges, self.thresholds)  # index of each threshold in edges
        self._pos: dict[int, np.ndarray] = {}
        self._neg: dict[int, np.ndarray] = {}
        self._episodes: dict[int, int] = {}

    @property
    def classes(self) -> tuple[int, ...]:
        """Class ids seen so far, ascending."""
        return tuple(sorted(self._pos))

    def __len__(self) -> int:
        """Number of episodes accumulated."""
        return sum(self._episodes.values())

    def update(
        self,
        prior: np.ndarray | torch.Tensor,
        label: np.ndarray | torch.Tensor,
        class_id: int,
        *,
        ignore_index: int | None = 255,
    ) -> None:
        """Add one episode given its label map.

        Args:
            prior: (H, W) prior of the episode's query, at the label's resolution.
            label: (H, W) integer label map of the query; ``label == class_id`` is the target,
                ``ignore_index`` is left out, everything else is background.
            class_id: The episode's target class.
            ignore_index: Label value to ignore (``None``: ignore nothing).

        Raises:
            InvalidInputError: on shape mismatches or non-finite priors.
        """
        lab = _to_numpy(label, "label")
        if lab.ndim != 2:
            raise InvalidInputError(f"label must be a 2-D (H, W) map, got shape {tuple(lab.shape)}")
        valid = None if ignore_index is None else lab != ignore_index
        self.update_binary(prior, lab == class_id, class_id, valid=valid)

    def update_binary(
        self,
        prior: np.ndarray | torch.Tensor,
        target: np.ndarray | torch.Tensor,
        class_id: int,
        *,
        valid: np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """Add one episode given its binary target mask.

        Args:
            prior: (H, W) prior map.
            target: (H, W) boolean target mask.
            class_id: Class the episode counts for.
            valid: Optional (H, W) boolean mask of the pixels that count.

        Raises:
            InvalidInputError: on shape mismatches or non-finite priors.
        """
        p = _check_map(prior)
        t = _to_numpy(target, "target").astype(bool)
        _check_same_shape(p, t, "prior", "target")
        if valid is not None:
            v = _to_numpy(valid, "valid").astype(bool)
            _check_same_shape(p, v, "prior", "valid")
            p, t = p[v], t[v]
        else:
            p, t = p.ravel(), t.ravel()
        bins = np.searchsorted(self._edges, p, side="right")
        size = self._edges.size + 1
        cid = int(class_id)
        if cid not in self._pos:
            self._pos[cid] = np.zeros(size, dtype=np.int64)
            self._neg[cid] = np.zeros(size, dtype=np.int64)
            self._episodes[cid] = 0
        self._pos[cid] += np.bincount(bins[t], minlength=size)
        self._neg[cid] += np.bincount(bins[~t], minlength=size)
        self._episodes[cid] += 1

    def merge(self, other: PriorMeter) -> PriorMeter:
        """Add another meter's counts into this one (e.g. from parallel workers); returns ``self``.

        Raises:
            InvalidInputError: if the meters use different thresholds or bins.
        """
        if other.thresholds != self.thresholds or other.ap_bins != self.ap_bins:
            raise InvalidInputError("cannot merge PriorMeters with different thresholds or ap_bins")
        for cid in other._pos:
            if cid not in self._pos:
                self._pos[cid] = np.zeros_like(other._pos[cid])
                self._neg[cid] = np.zeros_like(other._neg[cid])
                self._episodes[cid] = 0
            self._pos[cid] += other._pos[cid]
            self._neg[cid] += other._neg[cid]
            self._episodes[cid] += other._episodes[cid]
        return self

    def result(self, classes: Sequence[int] | None = None) -> PriorScores:
        """Per-class and mean scores.

        Args:
            classes: Class ids to average over (the fold's classes); default: the classes seen.
                Every class named must have been seen.

        Returns:
            The :class:`PriorScores`.

        Raises:
            InvalidInputError: if nothing was accumulated or a named class has no episode.
        """
        if not self._pos:
            raise InvalidInputError("no episode was added to the meter; nothing to evaluate")
        cls = tuple(sorted(int(c) for c in classes)) if classes is not None else self.classes
        missing = [c for c in cls if c not in self._pos]
        if missing:
            raise InvalidInputError(f"class(es) {missing} have no episode; seen classes are {list(self.classes)}")
        pos = np.stack([self._pos[c] for c in cls])  # (C, K+1)
        neg = np.stack([self._neg[c] for c in cls])
        # tail[:, j] = count of pixels in bins >= j, i.e. with value >= edges[j-1].
        tail_pos = np.cumsum(pos[:, ::-1], axis=1)[:, ::-1]
        tail_neg = np.cumsum(neg[:, ::-1], axis=1)[:, ::-1]
        n_pos, n_neg = tail_pos[:, 0], tail_neg[:, 0]
        k = self._threshold_pos + 1  # prior >= edges[i]  <=>  bin >= i + 1
        tp, fp = tail_pos[:, k], tail_neg[:, k]  # (C, T)
        fn = n_pos[:, None] - tp
        tn = n_neg[:, None] - fp
        with np.errstate(invalid="ignore", divide="ignore"):
            class_iou = tp / (tp + fp + fn)
            fg = tp.sum(0) / (tp + fp + fn).sum(0)
            bg = tn.sum(0) / (tn + fn + fp).sum(0)
            # AP: walk the bins from the highest value down; a bin is one group of tied values.
            precision = tail_pos / (tail_pos + tail_neg)
            class_ap = np.where(n_pos > 0, np.nansum(pos * precision, axis=1) / n_pos, np.nan)
        miou = np.array([np.nanmean(col) if np.isfinite(col).any() else np.nan for col in class_iou.T])
        return PriorScores(
            classes=cls,
            thresholds=self.thresholds,
            fixed_threshold=self.fixed_threshold,
            class_iou=class_iou,
            miou=miou,
            fbiou=(fg + bg) / 2,
            class_ap=class_ap,
            class_episodes=np.array([self._episodes[c] for c in cls], dtype=np.int64),
            class_pixels=n_pos.astype(np.int64),
        )


def mean_over_folds(folds: Sequence[PriorScores]) -> dict[str, float]:
    """Mean of the fold-level headline numbers, the way FSS papers report "mean" over folds.

    The "best" entries use one threshold common to all folds (the one with the highest mean mIoU),
    so the mean does not pick a different oracle threshold per fold.

    Args:
        folds: Scores of the same prior kind on several folds, evaluated at the same thresholds.

    Returns:
        ``miou_fixed``, ``miou_best``, ``best_threshold``, ``fbiou_fixed``, ``fbiou_best`` and ``map``.

    Raises:
        InvalidInputError: if ``folds`` is empty or their thresholds differ.

    Example:
        >>> import numpy as np
        >>> m = PriorMeter(thresholds=(0.5,)); m.update(np.ones((2, 2)), np.ones((2, 2), int), 1)
        >>> mean_over_folds([m.result(), m.result()])["miou_fixed"]
        1.0
    """
    if not folds:
        raise InvalidInputError("no fold scores to average")
    thresholds = folds[0].thresholds
    if any(f.thresholds != thresholds or f.fixed_threshold != folds[0].fixed_threshold for f in folds):
        raise InvalidInputError("fold scores were computed at different thresholds; evaluate them alike")
    miou = np.mean([f.miou for f in folds], axis=0)
    fbiou = np.mean([f.fbiou for f in folds], axis=0)
    best = int(np.nanargmax(miou)) if np.isfinite(miou).any() else 0
    fixed = thresholds.index(folds[0].fixed_threshold)
    return {
        "miou_fixed": float(miou[fixed]),
        "miou_best": float(miou[best]),
        "best_threshold": thresholds[best],
        "fbiou_fixed": float(fbiou[fixed]),
        "fbiou_best": float(fbiou[best]),
        "map": float(np.mean([f.map for f in folds])),
    }


# --------------------------------------------------------------------------------------------- CLIP-ES


def clip_es_labels(
    cams: np.ndarray | torch.Tensor,
    class_ids: Sequence[int],
    *,
    bg_power: float = 1.0,
) -> np.ndarray:
    """Label map of the CLIP-ES protocol: argmax over ``[(1 - max cam) ** t, cam_1, ..., cam_K]``.

    Args:
        cams: (K, H, W) CAMs in [0, 1] of the image's ground-truth classes (K may be 0).
        class_ids: The K class ids (1..20 for VOC), in the order of ``cams``.
        bg_power: The exponent ``t`` of the background score.

    Returns:
        (H, W) int64 label map with values in ``{0} | set(class_ids)``. Ties go to the background,
        then to the earlier class.

    Raises:
        InvalidInputError: on shape mismatches or non-finite CAMs.

    Example:
        >>> import numpy as np
        >>> cams = np.array([[[0.9, 0.2]], [[0.1, 0.6]]])   # two classes on a 1 x 2 image
        >>> clip_es_labels(cams, [3, 8]).tolist()
        [[3, 8]]
    """
    c = _to_numpy(cams, "cams").astype(np.float64)
    if c.ndim != 3:
        raise InvalidInputError(f"cams must be a (K, H, W) stack, got shape {tuple(c.shape)}")
    ids = [int(i) for i in class_ids]
    if len(ids) != c.shape[0]:
        raise InvalidInputError(f"{c.shape[0]} CAMs but {len(ids)} class ids; pass one id per CAM")
    if not np.isfinite(c).all():
        raise InvalidInputError("cams contain NaN or infinite values")
    top = c.max(axis=0) if c.shape[0] else np.zeros(c.shape[1:])
    background = np.power(np.clip(1.0 - top, 0.0, None), bg_power)
    scores = np.concatenate([background[None], c], axis=0)
    lookup = np.asarray([0, *ids], dtype=np.int64)
    return lookup[np.argmax(scores, axis=0)]


class ConfusionMeter:
    """A confusion matrix of semantic label maps, accumulated over images.

    Args:
        num_classes: Number of classes (labels 0..num_classes-1) [default: :func:`label_classes`
            of ``dataset``: 21 for PASCAL VOC with background].
        dataset: The registered benchmark whose classes these are, when ``num_classes`` is not
            given [default: :data:`clipprior.data.specs.DEFAULT_DATASET`].
        ignore_index: Ground-truth value to leave out.

    Example:
        >>> import numpy as np
        >>> m = ConfusionMeter(3)
        >>> m.update(np.array([[0, 1], [2, 2]]), np.array([[0, 1], [1, 255]]))
        >>> m.iou().round(3).tolist()
        [1.0, 0.5, 0.0]
    """

    def __init__(self, num_classes: int | None = None, *, dataset: str | None = None,
                 ignore_index: int | None = 255) -> None:
        if num_classes is None:
            num_classes = label_classes(dataset)
        if int(num_classes) < 1:
            raise InvalidInputError(f"num_classes={num_classes} must be >= 1")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)  # rows: truth, cols: pred
        self.images = 0

    def update(self, pred: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor) -> None:
        """Add one image's prediction and ground truth, both (H, W) integer maps.

        Raises:
            InvalidInputError: on shape mismatches or labels outside ``0..num_classes-1``.
        """
        p = _to_numpy(pred, "pred").astype(np.int64)
        g = _to_numpy(label, "label").astype(np.int64)
        _check_same_shape(p, g, "prediction", "label")
        keep = g != self.ignore_index if self.ignore_index is not None else np.ones(g.shape, bool)
        p, g = p[keep], g[keep]
        for name, arr in (("label", g), ("prediction", p)):
            bad = (arr < 0) | (arr >= self.num_classes)
            if bad.any():
                raise InvalidInputError(
                    f"{name} value {int(arr[bad][0])} is outside 0..{self.num_classes - 1} "
                    f"(ignore_index={self.ignore_index}); is this the right dataset / num_classes?"
                )
        self.matrix += np.bincount(g * self.num_classes + p, minlength=self.num_classes**2).reshape(
            self.num_classes, self.num_classes
        )
        self.images += 1

    def iou(self) -> np.ndarray:
        """(num_classes,) IoU per class; ``nan`` for a class absent from both truth and prediction."""
        inter = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(0) + self.matrix.sum(1) - inter
        with np.errstate(invalid="ignore", divide="ignore"):
            return inter / union

    def miou(self) -> float:
        """Mean IoU over the classes that occur (in truth or prediction)."""
        iou = self.iou()
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


@dataclass(frozen=True)
class ClipEsScores:
    """CLIP-ES protocol scores for one background exponent.

    Attributes:
        bg_power: The exponent ``t`` of the background score ``(1 - max) ** t``.
        class_iou: (num_classes,) IoU per class, background first.
        miou: Mean of :attr:`class_iou`.
        images: Number of images evaluated.
    """

    bg_power: float
    class_iou: np.ndarray
    miou: float
    images: int

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """JSON-serialisable form; per-class IoUs keyed by name when ``class_names`` is given."""
        names = list(class_names) if class_names is not None else [str(i) for i in range(len(self.class_iou))]
        if len(names) != len(self.class_iou):
            raise InvalidInputError(f"{len(names)} class names for {len(self.class_iou)} classes")
        per_class = {n: None if not math.isfinite(v) else float(v) for n, v in zip(names, self.class_iou, strict=True)}
        return {
            "bg_power": self.bg_power,
            "miou": None if not math.isfinite(self.miou) else self.miou,
            "images": self.images,
            "per_class": per_class,
        }


class ClipEsMeter:
    """The CLIP-ES CAM protocol: per-image argmax over GT-class CAMs and a power background.

    Args:
        num_classes: Number of classes including the background [default: :func:`label_classes`
            of ``dataset``: 21 for PASCAL VOC].
        dataset: The registered benchmark whose classes these are, when ``num_classes`` is not
            given [default: :data:`clipprior.data.specs.DEFAULT_DATASET`].
        bg_powers: Background exponents ``t`` to evaluate side by side.
        ignore_index: Ground-truth value to leave out.

    Example:
        >>> import numpy as np
        >>> meter = ClipEsMeter(num_classes=3, bg_powers=(1,))
        >>> label = np.array([[0, 2, 2]])
        >>> meter.update({2: np.array([[0.1, 0.8, 0.7]])}, label)
        >>> meter.result()[1.0].miou
        1.0
    """

    def __init__(
        self, num_classes: int | None = None, *, dataset: str | None = None, bg_powers: Iterable[float] = (1.0, 2.0),
        ignore_index: int | None = 255,
    ) -> None:
        if num_classes is None:
            num_classes = label_classes(dataset)
        self.bg_powers = tuple(float(t) for t in bg_powers)
        if not self.bg_powers:
            raise InvalidInputError("bg_powers is empty; pass e.g. (1, 2)")
        self._meters = {t: ConfusionMeter(num_classes, ignore_index=ignore_index) for t in self.bg_powers}

    def update(self, cams: Mapping[int, np.ndarray | torch.Tensor], label: np.ndarray | torch.Tensor) -> None:
        """Add one image.

        Args:
            cams: Class id -> (H, W) CAM in [0, 1], for every ground-truth class of the image.
            label: (H, W) integer ground truth.

        Raises:
            InvalidInputError: on shape mismatches or bad labels.
        """
        lab = _to_numpy(label, "label")
        ids = sorted(int(c) for c in cams)
        maps = [_check_map(cams[c], f"CAM of class {c}") for c in ids]
        for c, m in zip(ids, maps, strict=True):
            _check_same_shape(m, lab, f"CAM of class {c}", "label")
        stack = np.stack(maps) if maps else np.zeros((0, *lab.shape))
        for t, meter in self._meters.items():
            meter.update(clip_es_labels(stack, ids, bg_power=t), lab)

    def result(self) -> dict[float, ClipEsScores]:
        """Scores per background exponent."""
        return {
            t: ClipEsScores(bg_power=t, class_iou=m.iou(), miou=m.miou(), images=m.images)
            for t, m in self._meters.items()
        }
