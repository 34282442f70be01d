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
from typing import Literal

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
    "prompt_names",
]

Split = Literal["val", "train"]
CocoSplit = Literal["interleaved", "contiguous"]
NameOverrides = Mapping[int | str, str] | Sequence[str] | str | Path

DATASETS: tuple[str, ...] = ("pascal5i", "coco20i")
SPLITS: tuple[str, ...] = ("val", "train")
COCO_SPLITS: tuple[str, ...] = ("interleaved", "contiguous")
NUM_FOLDS = 4

_ALIASES = {"pascal5i": "pascal5i", "pascal": "pascal5i", "pascal-5i": "pascal5i", "voc": "pascal5i",
            "coco20i": "coco20i", "coco": "coco20i", "coco-20i": "coco20i"}

PASCAL_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)

# The prompt names of the official PI-CLIP code: the VOC names with four of them made more specific.
PASCAL_PROMPT_NAMES: tuple[str, ...] = tuple(
    {
        "bird": "bird avian",
        "chair": "chair seat",
        "person": "person with clothes,people,human",
        "tvmonitor": "tvmonitor screen",
    }.get(name, name)
    for name in PASCAL_CLASSES
)

# The prompt names of the official PI-CLIP code for COCO, spelling included ("sknowboard").
COCO_PROMPT_NAMES: tuple[str, ...] = (
    "person with clothes,people,human", "bicycle", "car", "motorbike", "aeroplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird avian", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack,bag", "umbrella,parasol",
    "handbag,purse", "necktie", "suitcase", "frisbee", "skis", "sknowboard", "sports ball", "kite",
    "baseball bat", "glove", "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork",
    "knife", "dessertspoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog",
    "pizza", "donut", "cake", "chair seat", "sofa", "pottedplant", "bed", "diningtable", "toilet",
    "tvmonitor screen", "laptop", "mouse", "remote control", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hairdrier,blowdrier",
    "toothbrush",
)

_CANONICAL = {"pascal5i": PASCAL_CLASSES, "coco20i": COCO_CLASSES}
_PROMPTS = {"pascal5i": PASCAL_PROMPT_NAMES, "coco20i": COCO_PROMPT_NAMES}


def dataset_name(name: str) -> str:
    """Canonical benchmark name of ``name`` (``"pascal5i"`` or ``"coco20i"``; aliases accepted).

    Args:
        name: ``"pascal5i"``, ``"coco20i"`` or an alias (``"pascal"``, ``"coco"``, ``"pascal-5i"``, ...).

    Returns:
        ``"pascal5i"`` or ``"coco20i"``.

    Raises:
        InvalidInputError: Unknown benchmark name.

    Example:
        >>> dataset_name("COCO")
        'coco20i'
    """
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise InvalidInputError(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)}")
    return _ALIASES[key]


def num_classes(dataset: str) -> int:
    """Number of foreground classes: 20 for PASCAL-5i, 80 for COCO-20i.

    Example:
        >>> num_classes("coco20i")
        80
    """
    return len(_CANONICAL[dataset_name(dataset)])


def class_names(dataset: str) -> list[str]:
    """Canonical class names of ``dataset``; index 0 is class 1.

    Example:
        >>> class_names("pascal5i")[:2]
        ['aeroplane', 'bicycle']
    """
    return list(_CANONICAL[dataset_name(dataset)])


def _check_fold(fold: int) -> int:
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
        dataset: ``"pascal5i"`` or ``"coco20i"``.
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
    name = dataset_name(dataset)
    _check_fold(fold)
    _check_split(split)
    _check_coco_split(coco_split)
    n = num_classes(name)
    if name == "pascal5i":
        novel = list(range(5 * fold + 1, 5 * fold + 6))
    elif coco_split == "interleaved":
        novel = list(range(fold + 1, n + 1, 4))
    else:
        novel = list(range(20 * fold + 1, 20 * fold + 21))
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
        dataset: ``"pascal5i"`` or ``"coco20i"``.
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
    name = dataset_name(dataset)
    names = list(_PROMPTS[name])
    if overrides is None:
        return names
    if isinstance(overrides, (str, Path)):
        overrides = _read_override_file(Path(overrides))
    if isinstance(overrides, Mapping):
        lookup: dict[str, int] = {}
        for i, (canon, prompt) in enumerate(zip(_CANONICAL[name], _PROMPTS[name], strict=True)):
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
