"""clipprior: the CLIP prior maps of PI-CLIP (VTP, VVP, PIR) for few-shot segmentation.

Example:
    >>> import clipprior
    >>> clipprior.get_preset("official").text_classes
    'present'
"""

from __future__ import annotations

from clipprior.cache import CacheWriter, EpisodeRecord, PriorCache, letterbox_prior, merge_caches, resize_prior
from clipprior.config import PRESETS, PriorConfig, get_preset, list_presets
from clipprior.data import (
    COCO_CLASSES,
    PASCAL_CLASSES,
    Episode,
    EpisodeMeta,
    FSSDataset,
    fold_classes,
    open_dataset,
    prompt_names,
    read_episodes,
    sample_episodes,
    write_episodes,
)
from clipprior.errors import (
    CacheError,
    CacheKeyError,
    CacheMismatchError,
    ClipPriorError,
    ConfigError,
    DataNotFoundError,
    DatasetError,
    InvalidInputError,
    ModelLoadError,
    WeightsNotFoundError,
)
from clipprior.evaluate import ClipEsMeter, PriorMeter, PriorScores, average_precision, binary_iou, vvp_map
from clipprior.model import DEFAULT_MODEL, ClipBundle, load_clip
from clipprior.photos import list_photos, load_photo
from clipprior.preprocess import preprocess_query, to_rgb_array
from clipprior.priors import (
    EpisodePriors,
    PIRResult,
    TextFeatures,
    VTPResult,
    box_mask,
    compute_priors,
    encode_text,
    pir,
    vtp,
    vvp,
)
from clipprior.viz import episode_panel, write_html_index

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "PRESETS",
    "CacheError",
    "CacheKeyError",
    "CacheMismatchError",
    "ClipBundle",
    "ClipEsMeter",
    "ClipPriorError",
    "ConfigError",
    "DataNotFoundError",
    "DatasetError",
    "EpisodePriors",
    "InvalidInputError",
    "ModelLoadError",
    "PIRResult",
    "PriorConfig",
    "PriorMeter",
    "PriorScores",
    "TextFeatures",
    "VTPResult",
    "WeightsNotFoundError",
    "__version__",
    "average_precision",
    "binary_iou",
    "box_mask",
    "compute_priors",
    "encode_text",
    "episode_panel",
    "get_preset",
    "list_photos",
    "list_presets",
    "load_clip",
    "load_photo",
    "pir",
    "preprocess_query",
    "to_rgb_array",
    "vtp",
    "vvp",
    "vvp_map",
    "write_html_index",
]

__all__ += [
    "CacheWriter",
    "EpisodeRecord",
    "PriorCache",
    "letterbox_prior",
    "merge_caches",
    "resize_prior",
]

__all__ += [
    "COCO_CLASSES",
    "PASCAL_CLASSES",
    "Episode",
    "EpisodeMeta",
    "FSSDataset",
    "fold_classes",
    "open_dataset",
    "prompt_names",
    "read_episodes",
    "sample_episodes",
    "write_episodes",
]
