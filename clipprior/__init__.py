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

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "CacheError",
    "CacheKeyError",
    "CacheMismatchError",
    "ClipPriorError",
    "ConfigError",
    "DataNotFoundError",
    "DatasetError",
    "InvalidInputError",
    "ModelLoadError",
    "PriorConfig",
    "WeightsNotFoundError",
    "__version__",
    "get_preset",
    "list_presets",
]
