"""The dataset registry: one frozen :class:`DatasetSpec` per benchmark, looked up by name.

Everything that differs between benchmarks lives in its spec: the class names and the prompt
names, the on-disk :class:`Layout`, the fold rule, the rule that lists a split's images when no
base list is given, the trainers' episode counts and the name of the trainers' list folder. The
rest of clipprior asks the registry (:func:`get_dataset`) and never compares a dataset name.

Adding a benchmark is one new spec passed to :func:`register_dataset` (plus its tests); the CLI's
``--dataset`` choices come from :func:`dataset_names`.

Example:
    >>> from clipprior.data.specs import get_dataset
    >>> spec = get_dataset("voc")
    >>> spec.name, spec.num_classes, spec.novel_classes(1)
    ('pascal5i', 20, [6, 7, 8, 9, 10])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from clipprior.errors import DataNotFoundError, InvalidInputError

__all__ = [
    "COCO_20I",
    "COCO_CLASSES",
    "COCO_PROMPT_NAMES",
    "DEFAULT_DATASET",
    "FOLD_SPLITS",
    "PASCAL_5I",
    "PASCAL_CLASSES",
    "PASCAL_PROMPT_NAMES",
    "DatasetSpec",
    "Layout",
    "all_datasets",
    "dataset_names",
    "get_dataset",
    "register_dataset",
    "scan_label_folder",
    "unregister_dataset",
]

Item = tuple[str, str]
"""An (image id, label id) pair; ids are POSIX paths relative to the data root."""

FOLD_SPLITS: tuple[str, ...] = ("interleaved", "contiguous")
"""Values of the ``coco_split`` argument (a fold rule variant; datasets without variants ignore it)."""


@dataclass(frozen=True)
class Layout:
    """Folders of one benchmark, relative to its data root.

    Attributes:
        image_dirs: Per split, the folder (as path components) holding the images.
        label_dirs: Per split, the folder holding the masks.
        image_ext: Extension of the images (``".jpg"``).
        label_ext: Extension of the masks (``".png"``).
        root_name: The usual name of the root folder, for messages.
        stem_lists: Per split, an optional text file (as path components) listing the split's
            image stems, one a line (PASCAL's ``ImageSets/Segmentation/val.txt``).
    """

    image_dirs: Mapping[str, tuple[str, ...]]
    label_dirs: Mapping[str, tuple[str, ...]]
    image_ext: str
    label_ext: str
    root_name: str
    stem_lists: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def image_id(self, split: str, stem: str) -> str:
        """Id of the image named ``stem`` (no extension) in ``split``."""
        return "/".join((*self.image_dirs[split], stem + self.image_ext))

    def label_id(self, split: str, stem: str) -> str:
        """Id of the mask named ``stem`` (no extension) in ``split``."""
        return "/".join((*self.label_dirs[split], stem + self.label_ext))

    def prefixes(self, kind: str) -> set[tuple[str, ...]]:
        """Every folder (as components) an image (``kind="image"``) or mask (``"label"``) may live in."""
        dirs = self.image_dirs if kind == "image" else self.label_dirs
        return set(dirs.values())


FoldRule = Callable[[int, str], list[int]]
"""``rule(fold, coco_split) -> novel class ids`` (1-based, ascending)."""

ScanRule = Callable[["DatasetSpec", Path, str], list[Item]]
"""``scan(spec, root, split) -> (image id, label id) pairs``: a split's images when no base list is given."""


@dataclass(frozen=True)
class DatasetSpec:
    """Everything clipprior knows about one few-shot benchmark.

    Attributes:
        name: Canonical name (``"pascal5i"``), the key of the registry.
        title: Display name (``"PASCAL-5i"``).
        aliases: Other accepted spellings (lower case).
        classes: Class names; index 0 is class id 1.
        prompt_names: The official prompt name of every class, same order.
        layout: Where images and masks live under the data root.
        fold_rule: The novel (test) classes of a fold; base classes are all the others.
        scan: Lists a split's images from the data when no base list is given.
        trainer_episodes: Test episodes per run of each trainer (``"pi-clip"`` is the default).
        list_dir: Name of the trainers' list folder (``lists/<list_dir>``).
        n_folds: Number of folds.
        fold_splits: The ``coco_split`` variants that change this dataset's folds; empty when
            ``coco_split`` is ignored (two runs differing only there are the same computation).
        root_help: What the data root is, for help texts.
    """

    name: str
    title: str
    aliases: tuple[str, ...]
    classes: tuple[str, ...]
    prompt_names: tuple[str, ...]
    layout: Layout
    fold_rule: FoldRule
    scan: ScanRule
    trainer_episodes: Mapping[str, int]
    list_dir: str
    n_folds: int = 4
    fold_splits: tuple[str, ...] = ()
    root_help: str = ""

    def __post_init__(self) -> None:
        if len(self.prompt_names) != len(self.classes):
            raise InvalidInputError(f"dataset spec {self.name!r}: {len(self.classes)} classes but "
                                    f"{len(self.prompt_names)} prompt names")
        if self.n_folds < 1:
            raise InvalidInputError(f"dataset spec {self.name!r}: n_folds must be >= 1")

    @property
    def num_classes(self) -> int:
        """Number of foreground classes."""
        return len(self.classes)

    def check_fold(self, fold: int) -> int:
        """``fold`` if it is one of this dataset's folds.

        Raises:
            InvalidInputError: Not an integer in ``0..n_folds - 1``.
        """
        if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < self.n_folds:
            raise InvalidInputError(f"fold must be an integer in 0..{self.n_folds - 1} for {self.name}, got {fold!r}")
        return fold

    def novel_classes(self, fold: int, coco_split: str = "interleaved") -> list[int]:
        """The test classes of ``fold`` (1-based, ascending)."""
        return sorted(self.fold_rule(self.check_fold(fold), coco_split))


# ------------------------------------------------------------------------------------------ scan rules


def scan_label_folder(spec: DatasetSpec, root: Path, split: str) -> list[Item]:
    """Every mask of the split's label folder, sorted by name, with its image.

    Raises:
        DataNotFoundError: The label folder does not exist.
    """
    layout = spec.layout
    label_dir = root.joinpath(*layout.label_dirs[split])
    if not label_dir.is_dir():
        raise DataNotFoundError(f"{spec.title} mask folder {label_dir} does not exist")
    stems = sorted(p.stem for p in label_dir.glob("*" + layout.label_ext))
    return [(layout.image_id(split, s), layout.label_id(split, s)) for s in stems]


def _scan_coco(spec: DatasetSpec, root: Path, split: str) -> list[Item]:
    label_dir = root.joinpath(*spec.layout.label_dirs[split])
    if not label_dir.is_dir():
        raise DataNotFoundError(f"COCO mask folder {label_dir} does not exist; create it with "
                                f"'clipprior coco-to-masks --annotations instances_{split}2014.json --out {label_dir}'")
    return scan_label_folder(spec, root, split)


def _scan_pascal(spec: DatasetSpec, root: Path, split: str) -> list[Item]:
    """val: the stems of ``ImageSets/Segmentation/val.txt``; train: every other mask, sorted."""
    layout = spec.layout
    val_file = root.joinpath(*layout.stem_lists["val"])
    if not val_file.is_file():
        raise DataNotFoundError(
            f"{val_file} does not exist: without a base list, it tells PASCAL's val images apart; pass a base "
            "list instead (precompute --base-list, or build the lists once with 'clipprior lists build "
            "--val-base-list/--train-base-list': the trainers' lists/pascal/val.txt for val, "
            "voc_sbd_merge_noduplicate.txt for train)")
    val_stems = [line.split()[0] for line in val_file.read_text(encoding="utf-8").splitlines() if line.split()]
    if split == "val":
        stems = val_stems
    else:
        excluded = set(val_stems)
        label_dir = root.joinpath(*layout.label_dirs["train"])
        stems = sorted(p.stem for p in label_dir.glob("*" + layout.label_ext) if p.stem not in excluded)
    return [(layout.image_id(split, s), layout.label_id(split, s)) for s in stems]


# ------------------------------------------------------------------------------------------ fold rules


def _pascal_folds(fold: int, coco_split: str) -> list[int]:
    return list(range(5 * fold + 1, 5 * fold + 6))


def _coco_folds(fold: int, coco_split: str) -> list[int]:
    if coco_split == "interleaved":
        return list(range(fold + 1, 81, 4))
    return list(range(20 * fold + 1, 20 * fold + 21))


# ------------------------------------------------------------------------------------- built-in specs

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

PASCAL_5I = DatasetSpec(
    name="pascal5i",
    title="PASCAL-5i",
    aliases=("pascal", "pascal-5i", "voc"),
    classes=PASCAL_CLASSES,
    prompt_names=PASCAL_PROMPT_NAMES,
    layout=Layout(
        image_dirs={"val": ("JPEGImages",), "train": ("JPEGImages",)},
        label_dirs={"val": ("SegmentationClassAug",), "train": ("SegmentationClassAug",)},
        image_ext=".jpg", label_ext=".png", root_name="VOC2012",
        stem_lists={"val": ("ImageSets", "Segmentation", "val.txt"),
                    "train": ("ImageSets", "Segmentation", "train.txt")},
    ),
    fold_rule=_pascal_folds,
    scan=_scan_pascal,
    trainer_episodes={"pfenet": 5000, "bam": 1000, "hdmnet": 1000, "pi-clip": 1000},
    list_dir="pascal",
    root_help="VOC2012 folder (JPEGImages/, SegmentationClassAug/)",
)
"""PASCAL-5i: fold ``f`` tests classes ``5f+1 .. 5f+5``."""

COCO_20I = DatasetSpec(
    name="coco20i",
    title="COCO-20i",
    aliases=("coco", "coco-20i"),
    classes=COCO_CLASSES,
    prompt_names=COCO_PROMPT_NAMES,
    layout=Layout(
        image_dirs={"val": ("val2014",), "train": ("train2014",)},
        label_dirs={"val": ("annotations", "val2014"), "train": ("annotations", "train2014")},
        image_ext=".jpg", label_ext=".png", root_name="MSCOCO2014",
    ),
    fold_rule=_coco_folds,
    scan=_scan_coco,
    trainer_episodes={"pfenet": 20000, "bam": 1000, "hdmnet": 10000, "pi-clip": 5000},
    list_dir="coco",
    fold_splits=FOLD_SPLITS,
    root_help="MSCOCO2014 folder (train2014/, val2014/, annotations/{train,val}2014/)",
)
"""COCO-20i: fold ``f`` tests ``4k+f+1`` (interleaved, the trainers' default) or ``20f+1 .. 20f+20``."""

DEFAULT_DATASET = PASCAL_5I.name
"""The benchmark assumed when nothing names one (the CLIP-ES protocol without a cache)."""

_REGISTRY: dict[str, DatasetSpec] = {}


# ---------------------------------------------------------------------------------------------- registry


def register_dataset(spec: DatasetSpec, *, replace: bool = False) -> DatasetSpec:
    """Add a benchmark to the registry.

    Args:
        spec: The benchmark.
        replace: Replace a registered spec of the same name.

    Returns:
        ``spec``.

    Raises:
        InvalidInputError: The name or an alias is taken by another spec (without ``replace``).

    Example:
        >>> from clipprior.data.specs import PASCAL_5I, register_dataset
        >>> register_dataset(PASCAL_5I, replace=True).name
        'pascal5i'
    """
    keys = {spec.name.lower(), *(a.lower() for a in spec.aliases)}
    for other in _REGISTRY.values():
        if other.name == spec.name and replace:
            continue
        clash = keys & {other.name, *other.aliases}
        if clash:
            raise InvalidInputError(f"dataset name(s) {sorted(clash)} of {spec.name!r} are taken by {other.name!r}")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_dataset(name: str) -> None:
    """Remove a benchmark from the registry (tests register toy datasets and remove them again).

    Raises:
        InvalidInputError: Unknown name.
    """
    _REGISTRY.pop(get_dataset(name).name)


def get_dataset(name: str | DatasetSpec) -> DatasetSpec:
    """The spec of a benchmark, by canonical name or alias (case-insensitive).

    Raises:
        InvalidInputError: Unknown name; the message lists the valid names.

    Example:
        >>> get_dataset("COCO").name
        'coco20i'
    """
    if isinstance(name, DatasetSpec):
        return name
    key = str(name).strip().lower()
    for spec in _REGISTRY.values():
        if key == spec.name or key in spec.aliases:
            return spec
    raise InvalidInputError(f"unknown dataset {name!r}; use one of {', '.join(dataset_names())}")


def dataset_names() -> tuple[str, ...]:
    """Canonical names of the registered benchmarks, in registration order.

    Example:
        >>> dataset_names()[:2]
        ('pascal5i', 'coco20i')
    """
    return tuple(_REGISTRY)


def all_datasets() -> tuple[DatasetSpec, ...]:
    """Every registered spec, in registration order."""
    return tuple(_REGISTRY.values())


register_dataset(PASCAL_5I)
register_dataset(COCO_20I)
