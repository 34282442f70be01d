"""Prior quality against ground truth.

- :mod:`~clipprior.evaluate.metrics`: the arithmetic of both protocols (FSS mIoU / FB-IoU / AP
  meters, the CLIP-ES confusion-matrix mIoU), pure numpy.
- :mod:`~clipprior.evaluate.episodes`: a cache's facts and its episodes with their ground truth,
  at the label's size.
- :mod:`~clipprior.evaluate.protocols`: the protocols run over data: :func:`evaluate_fold` over a
  cache's episodes, :func:`evaluate_clip_es` over a list of images with CAMs from a cache or CLIP
  (:func:`clip_es_images` chooses the benchmark, root and images, :func:`clip_es_cams` the CAMs,
  :class:`ClipEsResult` records the run).

Example:
    >>> import numpy as np
    >>> from clipprior.evaluate import PriorMeter
    >>> meter = PriorMeter(thresholds=(0.5,))
    >>> meter.update(np.full((2, 2), 0.9), np.full((2, 2), 3, np.uint8), class_id=3)
    >>> meter.result().miou_fixed
    1.0
"""

from __future__ import annotations

from clipprior.evaluate.episodes import (
    PRIOR_TITLES,
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
    DEFAULT_AP_BINS,
    DEFAULT_FIXED_THRESHOLD,
    DEFAULT_THRESHOLDS,
    PRIOR_KINDS,
    ClipEsMeter,
    ClipEsScores,
    ConfusionMeter,
    PriorMeter,
    PriorScores,
    average_precision,
    binary_iou,
    clip_es_labels,
    label_classes,
    mean_over_folds,
    vvp_map,
)
from clipprior.evaluate.protocols import (
    CachedCams,
    CamSource,
    ClipEsImages,
    ClipEsResult,
    EpisodeScorer,
    FoldResult,
    ModelCams,
    cache_image_pairs,
    clip_es_cams,
    clip_es_images,
    evaluate_clip_es,
    evaluate_fold,
    read_image_list,
)

__all__ = [
    "CLIP_ES_REFERENCE",
    "CLIP_ES_REFERENCE_NAMES",
    "DEFAULT_AP_BINS",
    "DEFAULT_FIXED_THRESHOLD",
    "DEFAULT_THRESHOLDS",
    "PRIOR_KINDS",
    "PRIOR_TITLES",
    "CacheFacts",
    "CachedCams",
    "CamSource",
    "ClipEsImages",
    "ClipEsMeter",
    "ClipEsResult",
    "ClipEsScores",
    "ConfusionMeter",
    "EpisodeData",
    "EpisodeScorer",
    "FoldResult",
    "ModelCams",
    "PriorMeter",
    "PriorScores",
    "average_precision",
    "binary_iou",
    "cache_facts",
    "cache_image_pairs",
    "cached_vtp",
    "clip_es_cams",
    "clip_es_images",
    "clip_es_labels",
    "evaluate_clip_es",
    "evaluate_fold",
    "label_classes",
    "load_episode",
    "mean_over_folds",
    "read_image_list",
    "resolve_data_root",
    "vvp_map",
]
