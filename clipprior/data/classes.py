"""Class ids, class names, prompt names and fold definitions of PASCAL-5i and COCO-20i.

Class ids are 1-based everywhere, as in the masks: PASCAL 1..20 (the VOC classes in alphabetical
order), COCO 1..80 (the 80 categories in ascending COCO category-id order, person=1 ... toothbrush=80).
``PASCAL_CLASSES[c - 1]`` is the name of class ``c``.

Folds follow the PFENet-family trainers (PFENet, BAM, HDMNet, PI-CLIP): fold ``f`` of PASCAL-5i
tests classes ``5f+1 .. 5f+5``; fold ``f`` of COCO-20i tests ``4k+f+1`` (k = 0..19) in the
``"interleaved"`` split (the trainers' ``use_split_coco: True``, default of every config) or
``20f+1 .. 20f+20`` in the ``"contiguous"`` split. The training (base) classes of a fold are all
the others, ascending.

Example:
    >>> from clipprior.data.classes import fold_classes, prompt_names
    >>> fold_classes("pascal5i", 1)
    [6, 7, 8, 9, 10]
    >>> fold_classes("coco20i", 2)[:3]
    [3, 7, 11]
    >>> prompt_names("pascal5i")[2]
    'bird avian'
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from clipprior.data.specs import (
    COCO_CLASSES,
    COCO_PROMPT_NAMES,
    FOLD_SPLITS,
    PASCAL_CLASSES,
    PASCAL_PROMPT_NAMES,
    DatasetSpec,
    dataset_names,
    get_dataset,
)
from clipprior.errors import InvalidInputError

__all__ = [
    "COCO_CLASSES",
    "COCO_PROMPT_NAMES",
    "COCO_SPLITS",
    "DATASETS",
    "NUM_FOLDS",
    "PASCAL_CLASSES",
    "PASCAL_PROMPT_NAMES",
    "SPLITS",
    "CocoSplit",
    "NameOverrides",
    "Split",
    "class_names",
    "dataset_name",
    "fold_classes",
    "num_classes",
    "present_classes",
    "present_names",
    "prompt_names",
]

Split = Literal["val", "train"]
CocoSplit = Literal["interleaved", "contiguous"]
NameOverrides = Mapping[int | str, str] | Sequence[str] | str | Path

SPLITS: tuple[str, ...] = ("val", "train")
COCO_SPLITS: tuple[str, ...] = FOLD_SPLITS
NUM_FOLDS = 4
"""Folds of the built-in benchmarks (a registered spec may have others: :attr:`DatasetSpec.n_folds`)."""

DATASETS: tuple[str, ...] = dataset_names()
"""The built-in benchmarks (the registry, :func:`~clipprior.data.specs.dataset_names`, may hold more)."""


def dataset_name(name: str) -> str:
    """Canonical benchmark name of ``name`` (aliases accepted, case-insensitive).

    Args:
        name: A registered benchmark's name or alias (``"pascal5i"``, ``"coco"``, ``"pascal-5i"``, ...).

    Returns:
        The canonical name, e.g. ``"pascal5i"``.

    Raises:
        InvalidInputError: Unknown benchmark name (the message lists the valid ones).

    Example:
        >>> dataset_name("COCO")
        'coco20i'
    """
    return get_dataset(name).name


def num_classes(dataset: str) -> int:
    """Number of foreground classes: 20 for PASCAL-5i, 80 for COCO-20i.

    Example:
        >>> num_classes("coco20i")
        80
    """
    return get_dataset(dataset).num_classes


def class_names(dataset: str) -> list[str]:
    """Canonical class names of ``dataset``; index 0 is class 1.

    Example:
        >>> class_names("pascal5i")[:2]
        ['aeroplane', 'bicycle']
    """
    return list(get_dataset(dataset).classes)


def _check_fold(fold: int, dataset: str | DatasetSpec | None = None) -> int:
    if dataset is not None:
        return get_dataset(dataset).check_fold(fold)
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < NUM_FOLDS:
        raise InvalidInputError(f"fold must be an integer in 0..{NUM_FOLDS - 1}, got {fold!r}")
    return fold


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise InvalidInputError(f"split must be 'val' (novel classes) or 'train' (base classes), got {split!r}")
    return split


def _check_coco_split(coco_split: str) -> str:
    if coco_split not in COCO_SPLITS:
        raise InvalidInputError(f"coco_split must be 'interleaved' or 'contiguous', got {coco_split!r}")
    return coco_split


def fold_classes(dataset: str, fold: int, split: str = "val", coco_split: str = "interleaved") -> list[int]:
    """Class ids (1-based, ascending) of one fold: novel classes for ``"val"``, base classes for ``"train"``.

    Args:
        dataset: a registered benchmark (``"pascal5i"``, ``"coco20i"``, ...).
        fold: 0..3.
        split: ``"val"`` (the fold's test classes) or ``"train"`` (every other class).
        coco_split: COCO only: ``"interleaved"`` (fold f tests 4k+f+1, the trainers' default) or
            ``"contiguous"`` (fold f tests 20f+1..20f+20). Ignored for PASCAL.

    Returns:
        The sorted class ids.

    Raises:
        InvalidInputError: Unknown dataset, fold outside 0..3, or bad split names.

    Example:
        >>> fold_classes("pascal5i", 0, "train")[:3]
        [6, 7, 8]
        >>> fold_classes("coco20i", 1, coco_split="contiguous")[:3]
        [21, 22, 23]
    """
    spec = get_dataset(dataset)
    spec.check_fold(fold)
    _check_split(split)
    _check_coco_split(coco_split)
    novel = spec.novel_classes(fold, coco_split)
    n = spec.num_classes
    if split == "val":
        return novel
    novel_set = set(novel)
    return [c for c in range(1, n + 1) if c not in novel_set]


def _read_override_file(path: Path) -> Mapping[int | str, str] | Sequence[str]:
    if not path.is_file():
        raise InvalidInputError(f"class-name file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise InvalidInputError(f"class-name file {path} is not valid JSON: {err}") from err
        if isinstance(data, list):
            return [str(v) for v in data]
        if isinstance(data, dict):
            return {k: str(v) for k, v in data.items()}
        raise InvalidInputError(f"class-name file {path} must hold a JSON list of names or an object "
                                "{class id or name: prompt name}")
    return [line.strip() for line in text.splitlines() if line.strip()]


def prompt_names(dataset: str, overrides: NameOverrides | None = None) -> list[str]:
    """Prompt names of the official PI-CLIP code, optionally overridden; index 0 is class 1.

    Args:
        dataset: a registered benchmark (``"pascal5i"``, ``"coco20i"``, ...).
        overrides: Replacements, any of: a mapping ``{class id (int or digit string) or canonical
            name or official prompt name: new name}``; a full sequence of names (one per class);
            or a path to a ``.json`` file (list or object as above) or a text file (one name a line,
            all classes).

    Returns:
        One prompt name per class, in class-id order.

    Raises:
        InvalidInputError: Unknown key, wrong number of names, empty name, unreadable file.

    Example:
        >>> prompt_names("pascal5i", {"bird": "small bird", 9: "chair"})[2:4]
        ['small bird', 'boat']
    """
    spec = get_dataset(dataset)
    name = spec.name
    names = list(spec.prompt_names)
    if overrides is None:
        return names
    if isinstance(overrides, (str, Path)):
        overrides = _read_override_file(Path(overrides))
    if isinstance(overrides, Mapping):
        lookup: dict[str, int] = {}
        for i, (canon, prompt) in enumerate(zip(spec.classes, spec.prompt_names, strict=True)):
            lookup.setdefault(canon, i)
            lookup.setdefault(prompt, i)
        for key, value in overrides.items():
            if isinstance(key, int) and not isinstance(key, bool):
                index = key - 1
            elif isinstance(key, str) and key.strip().isdigit():
                index = int(key) - 1
            elif isinstance(key, str) and key in lookup:
                index = lookup[key]
            else:
                raise InvalidInputError(f"class-name override key {key!r} is neither a class id 1..{len(names)} "
                                        f"nor a {name} class name")
            if not 0 <= index < len(names):
                raise InvalidInputError(f"class-name override key {key!r} is outside 1..{len(names)}")
            if not str(value).strip():
                raise InvalidInputError(f"class-name override for {key!r} is empty")
            names[index] = str(value)
        return names
    values = [str(v) for v in overrides]
    if len(values) != len(names):
        raise InvalidInputError(f"{name} has {len(names)} classes but {len(values)} names were given; "
                                "give one name per class or a mapping of the ones to change")
    if any(not v.strip() for v in values):
        raise InvalidInputError("class-name overrides contain an empty name")
    return values


def present_classes(label: Any, num_classes: int) -> list[int]:
    """Class ids ``1..num_classes`` present in a label map (any pixel count), ascending.

    0 (background), 255 (ignore) and any other value outside the range are left out.

    Example:
        >>> present_classes(np.array([[0, 3], [255, 1]], np.uint8), 20)
        [1, 3]
    """
    if not isinstance(label, np.ndarray) and hasattr(label, "unique"):  # a torch tensor, on any device
        values = label.unique().tolist()
    else:
        values = np.unique(np.asarray(label)).tolist()
    return [int(v) for v in values if 1 <= int(v) <= num_classes]


def present_names(label: Any, target: int, class_names: Sequence[str]) -> list[str]:
    """Prompt names of the classes other than ``target`` present in a label map, by class id.

    The official "present" softmax context (``PriorConfig.text_classes == "present"``): every
    class of the query's ground truth joins the target's softmax.

    Args:
        label: (H, W) label map (numpy array or torch tensor).
        target: The episode's class (left out).
        class_names: Prompt name of class id c at index c - 1.

    Example:
        >>> present_names(np.array([[0, 3], [15, 1]], np.uint8), 3, prompt_names("pascal5i"))
        ['aeroplane', 'person with clothes,people,human']
    """
    return [class_names[c - 1] for c in present_classes(label, len(class_names)) if c != target]
