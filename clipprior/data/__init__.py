"""The benchmarks' data: PASCAL-5i and COCO-20i as the PFENet-family trainers define them.

- :mod:`~clipprior.data.specs`: the dataset registry, one :class:`DatasetSpec` per benchmark
  (classes, prompt names, layout, fold rule, list-building rule, trainers' episode counts).
- :mod:`~clipprior.data.classes`: class names, PI-CLIP prompt names, fold definitions, by name.
- :mod:`~clipprior.data.layout`: the on-disk layouts and the remapping of list paths onto them.
- :mod:`~clipprior.data.images`: :func:`load_rgb` / :func:`load_label`, the one place files become arrays.
- :mod:`~clipprior.data.lists`: reading, building (the 2048-pixel rule) and writing the trainers' list files.
- :mod:`~clipprior.data.dataset`: :func:`open_dataset` -> :class:`FSSDataset`.
- :mod:`~clipprior.data.episodes`: the seeded episode sampler and the episode-list file format.
- :mod:`~clipprior.data.coco`: COCO instances JSON -> class-index PNG masks.
- :mod:`~clipprior.data.synthetic`: tiny benchmarks in the real layouts, for tests and demos.

Example:
    >>> from clipprior.data import fold_classes, PASCAL_CLASSES
    >>> [PASCAL_CLASSES[c - 1] for c in fold_classes("pascal5i", 0)]
    ['aeroplane', 'bicycle', 'bird', 'boat', 'bottle']
"""

from __future__ import annotations

from clipprior.data.classes import (
    COCO_CLASSES,
    COCO_PROMPT_NAMES,
    DATASETS,
    PASCAL_CLASSES,
    PASCAL_PROMPT_NAMES,
    class_names,
    dataset_name,
    fold_classes,
    num_classes,
    present_classes,
    present_names,
    prompt_names,
)
from clipprior.data.coco import CROWD_MODES, CocoMaskStats, OptionalDependencyError, coco_to_masks
from clipprior.data.dataset import FSSDataset, open_dataset
from clipprior.data.episodes import (
    TRAINER_EPISODES,
    Episode,
    EpisodeMeta,
    default_episodes,
    pool_episodes,
    read_episodes,
    sample_episodes,
    write_episodes,
)
from clipprior.data.images import DataRoot, fss_mask, load_label, load_pair, load_rgb, pil_to_rgb
from clipprior.data.lists import (
    MIN_PIXELS,
    FssLists,
    build_fss_lists,
    counted_classes,
    read_fss_lists,
    write_fss_lists,
)
from clipprior.data.report import DataReport, Problem
from clipprior.data.specs import (
    DatasetSpec,
    Layout,
    dataset_names,
    get_dataset,
    register_dataset,
    unregister_dataset,
)

__all__ = [
    "COCO_CLASSES",
    "COCO_PROMPT_NAMES",
    "CROWD_MODES",
    "DATASETS",
    "MIN_PIXELS",
    "PASCAL_CLASSES",
    "PASCAL_PROMPT_NAMES",
    "TRAINER_EPISODES",
    "CocoMaskStats",
    "DataReport",
    "DataRoot",
    "DatasetSpec",
    "Episode",
    "EpisodeMeta",
    "FSSDataset",
    "FssLists",
    "Layout",
    "OptionalDependencyError",
    "Problem",
    "build_fss_lists",
    "class_names",
    "coco_to_masks",
    "counted_classes",
    "dataset_name",
    "dataset_names",
    "default_episodes",
    "fold_classes",
    "fss_mask",
    "get_dataset",
    "load_label",
    "load_pair",
    "load_rgb",
    "num_classes",
    "open_dataset",
    "pil_to_rgb",
    "pool_episodes",
    "present_classes",
    "present_names",
    "prompt_names",
    "read_episodes",
    "read_fss_lists",
    "register_dataset",
    "sample_episodes",
    "unregister_dataset",
    "write_episodes",
    "write_fss_lists",
]
