"""clipprior: the CLIP prior maps of PI-CLIP (VTP, VVP, PIR) for few-shot segmentation.

Example:
    >>> import clipprior
    >>> clipprior.get_preset("official").text_classes
    'present'
"""

from __future__ import annotations

from clipprior.config import PRESETS, PriorConfig, get_preset, list_presets
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
from clipprior.model import DEFAULT_MODEL, ClipBundle, load_clip
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

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "PRESETS",
    "CacheError",
    "CacheKeyError",
    "CacheMismatchError",
    "ClipBundle",
    "ClipPriorError",
    "ConfigError",
    "DataNotFoundError",
    "DatasetError",
    "EpisodePriors",
    "InvalidInputError",
    "ModelLoadError",
    "PIRResult",
    "PriorConfig",
    "TextFeatures",
    "VTPResult",
    "WeightsNotFoundError",
    "__version__",
    "box_mask",
    "compute_priors",
    "encode_text",
    "get_preset",
    "list_presets",
    "load_clip",
    "pir",
    "preprocess_query",
    "to_rgb_array",
    "vtp",
    "vvp",
]
