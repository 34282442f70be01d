"""clipprior: the CLIP prior maps of PI-CLIP (VTP, VVP, PIR) for few-shot segmentation.

The public API is re-exported here. Only the light modules (config, errors) load on
``import clipprior``; the others (torch, transformers, h5py) load on first use of one of their
names, so a training loop that only reads cached priors never imports transformers.

Example:
    >>> import clipprior
    >>> clipprior.get_preset("official").text_classes
    'present'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from clipprior.config import PRESETS, PriorConfig, get_preset, list_presets
from clipprior.errors import (
    CacheCorruptError,
    CacheError,
    CacheKeyError,
    CacheMismatchError,
    CacheWriteError,
    ClipPriorError,
    ConfigError,
    DataNotFoundError,
    DatasetError,
    InvalidInputError,
    ModelLoadError,
    WeightsNotFoundError,
)

if TYPE_CHECKING:
    from clipprior.cache import (
        CacheWriter,
        PriorCache,
        letterbox_prior,
        merge_caches,
        resize_prior,
    )
    from clipprior.data import (
        COCO_CLASSES,
        PASCAL_CLASSES,
        DatasetSpec,
        Episode,
        EpisodeMeta,
        FSSDataset,
        dataset_names,
        fold_classes,
        get_dataset,
        open_dataset,
        pool_episodes,
        prompt_names,
        read_episodes,
        register_dataset,
        sample_episodes,
        write_episodes,
    )
    from clipprior.evaluate import (
        ClipEsMeter,
        FoldResult,
        PriorMeter,
        PriorScores,
        average_precision,
        binary_iou,
        evaluate_clip_es,
        evaluate_fold,
        vvp_map,
    )
    from clipprior.model import (
        DEFAULT_MODEL,
        ClipBundle,
        load_clip,
    )
    from clipprior.photos import (
        demo_panel,
        list_photos,
        load_photo,
    )
    from clipprior.precompute import (
        fold_episodes,
        precompute_fold,
    )
    from clipprior.preprocess import (
        preprocess_query,
        preprocess_support,
        to_rgb_array,
    )
    from clipprior.priors import (
        EpisodePriors,
        PIRResult,
        SupportCells,
        TextFeatures,
        VTPResult,
        best_cosine_match,
        box_mask,
        compute_priors,
        encode_text,
        pir,
        vtp,
        vtp_pass,
        vvp,
    )
    from clipprior.training import (
        EpisodeSampler,
        prior_channels,
    )
    from clipprior.viz import (
        episode_panel,
        write_html_index,
    )

__version__ = "0.1.0"

# name -> module that defines it, imported on first access (PEP 562)
_LAZY: dict[str, str] = {
    "COCO_CLASSES": "clipprior.data",
    "CacheWriter": "clipprior.cache",
    "ClipBundle": "clipprior.model",
    "ClipEsMeter": "clipprior.evaluate",
    "DEFAULT_MODEL": "clipprior.model",
    "DatasetSpec": "clipprior.data",
    "Episode": "clipprior.data",
    "EpisodeMeta": "clipprior.data",
    "EpisodePriors": "clipprior.priors",
    "EpisodeRecord": "clipprior.cache",  # deprecated: the cache returns Episode; not in __all__
    "EpisodeSampler": "clipprior.training",
    "FSSDataset": "clipprior.data",
    "FoldResult": "clipprior.evaluate",
    "PASCAL_CLASSES": "clipprior.data",
    "PIRResult": "clipprior.priors",
    "PriorCache": "clipprior.cache",
    "PriorMeter": "clipprior.evaluate",
    "PriorScores": "clipprior.evaluate",
    "SupportCells": "clipprior.priors",
    "TextFeatures": "clipprior.priors",
    "VTPResult": "clipprior.priors",
    "average_precision": "clipprior.evaluate",
    "best_cosine_match": "clipprior.priors",
    "binary_iou": "clipprior.evaluate",
    "box_mask": "clipprior.priors",
    "compute_priors": "clipprior.priors",
    "encode_text": "clipprior.priors",
    "evaluate_clip_es": "clipprior.evaluate",
    "evaluate_fold": "clipprior.evaluate",
    "episode_panel": "clipprior.viz",
    "dataset_names": "clipprior.data",
    "demo_panel": "clipprior.photos",
    "fold_classes": "clipprior.data",
    "fold_episodes": "clipprior.precompute",
    "get_dataset": "clipprior.data",
    "letterbox_prior": "clipprior.cache",
    "list_photos": "clipprior.photos",
    "load_clip": "clipprior.model",
    "load_photo": "clipprior.photos",
    "merge_caches": "clipprior.cache",
    "open_dataset": "clipprior.data",
    "pir": "clipprior.priors",
    "preprocess_query": "clipprior.preprocess",
    "preprocess_support": "clipprior.preprocess",
    "pool_episodes": "clipprior.data",
    "precompute_fold": "clipprior.precompute",
    "prior_channels": "clipprior.training",
    "prompt_names": "clipprior.data",
    "read_episodes": "clipprior.data",
    "register_dataset": "clipprior.data",
    "resize_prior": "clipprior.cache",
    "sample_episodes": "clipprior.data",
    "to_rgb_array": "clipprior.preprocess",
    "vtp": "clipprior.priors",
    "vtp_pass": "clipprior.priors",
    "vvp": "clipprior.priors",
    "vvp_map": "clipprior.evaluate",
    "write_episodes": "clipprior.data",
    "write_html_index": "clipprior.viz",
}

__all__ = [
    "COCO_CLASSES",
    "DEFAULT_MODEL",
    "PASCAL_CLASSES",
    "PRESETS",
    "CacheCorruptError",
    "CacheError",
    "CacheKeyError",
    "CacheMismatchError",
    "CacheWriteError",
    "CacheWriter",
    "ClipBundle",
    "ClipEsMeter",
    "ClipPriorError",
    "ConfigError",
    "DataNotFoundError",
    "DatasetError",
    "DatasetSpec",
    "Episode",
    "EpisodeMeta",
    "EpisodePriors",
    "EpisodeSampler",
    "FSSDataset",
    "FoldResult",
    "InvalidInputError",
    "ModelLoadError",
    "PIRResult",
    "PriorCache",
    "PriorConfig",
    "PriorMeter",
    "PriorScores",
    "SupportCells",
    "TextFeatures",
    "VTPResult",
    "WeightsNotFoundError",
    "__version__",
    "average_precision",
    "best_cosine_match",
    "binary_iou",
    "box_mask",
    "compute_priors",
    "dataset_names",
    "demo_panel",
    "encode_text",
    "episode_panel",
    "evaluate_clip_es",
    "evaluate_fold",
    "fold_classes",
    "fold_episodes",
    "get_dataset",
    "get_preset",
    "letterbox_prior",
    "list_photos",
    "list_presets",
    "load_clip",
    "load_photo",
    "merge_caches",
    "open_dataset",
    "pir",
    "pool_episodes",
    "precompute_fold",
    "preprocess_query",
    "preprocess_support",
    "prior_channels",
    "prompt_names",
    "read_episodes",
    "register_dataset",
    "resize_prior",
    "sample_episodes",
    "to_rgb_array",
    "vtp",
    "vtp_pass",
    "vvp",
    "vvp_map",
    "write_episodes",
    "write_html_index",
]



def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'clipprior' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
