"""The PFENet / BAM few-shot list files: reading them, building them from the data, writing them.

A fold's lists are two files per split, in ``<lists>/fss_list/{train,val}/``:

- ``data_list_{fold}.txt``: one ``"image label"`` pair per line, the images of the split that
  contain at least one counted class of the fold (the query list, in order);
- ``sub_class_file_list_{fold}.txt``: one Python-literal dict ``{class: [(image, label), ...]}``,
  for every class of the fold the pairs in which it is counted (the support pool). It is parsed
  with :func:`ast.literal_eval`, never ``eval``.

The rule that builds them (PFENet's ``make_dataset``, with BAM's ``filter_intersection`` for
training lists): take the classes present in a mask (its values other than 0 and 255). For a
*training* list, an image whose present classes are not all base classes is dropped whole, however
few pixels the other class has. Otherwise a class of the fold *counts* in the image when it covers
at least ``2 * 32 * 32 = 2048`` pixels; the image enters the data list when at least one class
counts, and the support list of every counted class. Images keep the order of the base list they
were read from.

Example:
    >>> import numpy as np
    >>> from clipprior.data.lists import counted_classes
    >>> mask = np.zeros((64, 64), np.uint8); mask[:32, :] = 1; mask[32:, :5] = 7; mask[40, 40] = 255
    >>> counted_classes(mask, [1, 2, 3, 4, 5], "val")   # class 1: 2048 pixels; class 7 is not in the fold
    [1]
    >>> counted_classes(mask, list(range(6, 21)), "train")  # class 1 is present, so the image is dropped
    []
"""

from __future__ import annotations

import ast
import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clipprior.data.classes import dataset_name, fold_classes
from clipprior.data.images import load_label
from clipprior.data.layout import to_id
from clipprior.data.report import DataReport, Problem, _Policy
from clipprior.data.specs import get_dataset
from clipprior.errors import ClipPriorError, DataNotFoundError, DatasetError, InvalidInputError

__all__ = [
    "MIN_PIXELS",
    "FssLists",
    "Item",
    "ProgressFn",
    "base_items",
    "build_fss_lists",
    "class_pixel_counts",
    "counted_classes",
    "find_list_files",
    "read_data_list",
    "read_fss_lists",
    "read_sub_class_file_list",
    "write_fss_lists",
]

MIN_PIXELS = 2 * 32 * 32
"""A class counts in an image when it covers at least this many pixels (PFENet / BAM)."""

Item = tuple[str, str]
"""An (image id, label id) pair; ids are POSIX paths relative to the data root."""

ProgressFn = Callable[[int, int], None]
"""Progress callback: ``progress(done, total)``."""

def class_pixel_counts(label: np.ndarray) -> dict[int, int]:
    """Pixel count of every value present in a mask, 0 and 255 included.

    Args:
        label: (H, W) uint8 mask.

    Returns:
        ``{value: pixels}`` for the values present, ascending.
    """
    counts = np.bincount(np.asarray(label, dtype=np.uint8).ravel(), minlength=256)
    return {int(v): int(counts[v]) for v in np.flatnonzero(counts)}


def _counted_from_counts(counts: dict[int, int], classes: Sequence[int], split: str, min_pixels: int) -> list[int]:
    present = [c for c in counts if c not in (0, 255)]
    wanted = set(classes)
    if split == "train" and not set(present) <= wanted:
        return []  # BAM's filter_intersection: a training image may show base classes only
    return [c for c in present if c in wanted and counts[c] >= min_pixels]


def counted_classes(label: np.ndarray, classes: Sequence[int], split: str, min_pixels: int = MIN_PIXELS) -> list[int]:
    """Classes of ``classes`` that count in a mask under the PFENet / BAM rule.

    Args:
        label: (H, W) uint8 mask (0 background, 255 ignore).
        classes: The fold's classes for ``split`` (novel for ``"val"``, base for ``"train"``).
        split: ``"val"`` or ``"train"``; for ``"train"`` a mask with any present class outside
            ``classes`` counts nothing.
        min_pixels: Pixel threshold (``>=``), 2048 in every trainer.

    Returns:
        The counted classes, ascending; empty when the image belongs to no list.
    """
    if split not in ("val", "train"):
        raise InvalidInputError(f"split must be 'val' or 'train', got {split!r}")
    return _counted_from_counts(class_pixel_counts(label), classes, split, min_pixels)


@dataclass
class FssLists:
    """One fold's lists for one split, as ids relative to the data root.

    Attributes:
        dataset: a registered benchmark (``"pascal5i"``, ``"coco20i"``, ...).
        fold: 0..3.
        split: ``"val"`` or ``"train"``.
        classes: The fold's classes for the split (novel for val, base for train).
        items: The data list: (image id, label id) pairs in list order.
        class_index: ``{class: pairs}`` for every class of ``classes``; ``None`` when the
            sub-class file was not available (see :func:`read_fss_lists`).
        source: Where the lists came from, in words.
        sources: The list files read (data list first), empty for built lists.
    """

    dataset: str
    fold: int
    split: str
    classes: list[int]
    items: list[Item]
    class_index: dict[int, list[Item]] | None
    source: str = ""
    sources: list[str] = field(default_factory=list)

    def checksum(self) -> str:
        r"""sha256 (hex) of the lists' content as ids, independent of prefixes and file formatting.

        The hashed text is every data-list pair as ``"image label\n"``, then for each class in
        ascending order ``"#class\n"`` followed by its pairs in the same form.
        """
        digest = hashlib.sha256()
        for image, label in self.items:
            digest.update(f"{image} {label}\n".encode())
        for c in sorted(self.class_index or {}):
            digest.update(f"#{c}\n".encode())
            for image, label in (self.class_index or {})[c]:
                digest.update(f"{image} {label}\n".encode())
        return digest.hexdigest()

    def pair_count(self) -> int:
        """Number of (image, class) pairs: the summed length of the support lists."""
        return sum(len(v) for v in (self.class_index or {}).values())


def _policy(on_error: str, report: DataReport | None) -> _Policy:
    return _Policy(on_error, report)


def read_data_list(path: str | os.PathLike[str], dataset: str, *, on_error: str = "raise",
                   report: DataReport | None = None) -> list[Item]:
    """Read a ``data_list`` file (or a whole-dataset list such as ``val.txt``) as ids.

    Args:
        path: File with one ``"image label"`` pair per line; blank lines are ignored.
        dataset: a registered benchmark (``"pascal5i"``, ``"coco20i"``, ...) (decides how paths are remapped).
        on_error: ``"raise"`` on the first malformed line, or ``"skip"`` it and record it in ``report``.
        report: Where skipped lines are recorded.

    Returns:
        The (image id, label id) pairs in file order.

    Raises:
        DataNotFoundError: The file does not exist.
        DatasetError: A line does not hold two paths in the dataset's layout (``on_error="raise"``).
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"list file {path} does not exist")
    policy = _policy(on_error, report)
    items: list[Item] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                policy(Problem(str(path), f"expected 'image label', found {len(fields)} field(s): {line.strip()!r}",
                               line=number))
                continue
            try:
                items.append((to_id(fields[0], dataset, "image"), to_id(fields[1], dataset, "label")))
            except DatasetError as err:
                policy(Problem(str(path), str(err), line=number))
    return items


def _check_pair(entry: object) -> Item | None:
    if isinstance(entry, (tuple, list)) and len(entry) == 2 and all(isinstance(p, str) for p in entry):
        return entry[0], entry[1]
    return None


def read_sub_class_file_list(path: str | os.PathLike[str], dataset: str, classes: Sequence[int] | None = None, *,
                             on_error: str = "raise", report: DataReport | None = None) -> dict[int, list[Item]]:
    """Read a ``sub_class_file_list`` file (a Python-literal dict) as ids, safely.

    Args:
        path: The file: ``{class: [(image, label), ...], ...}``.
        dataset: a registered benchmark (``"pascal5i"``, ``"coco20i"``, ...).
        classes: When given, the file's keys must be exactly these classes (catches a list of
            another fold, split or COCO split).
        on_error: ``"raise"`` or ``"skip"`` for malformed or unmappable entries.
        report: Where skipped entries are recorded.

    Returns:
        ``{class: [(image id, label id), ...]}``, keys ascending.

    Raises:
        DataNotFoundError: The file does not exist.
        DatasetError: The file is not a literal dict of class -> pairs, or holds other classes.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"list file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        data = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as err:
        raise DatasetError(f"{path} is not a Python-literal dict {{class: [(image, label), ...]}} "
                           f"({type(err).__name__}: {err}); rebuild it with 'clipprior lists build'") from err
    if not isinstance(data, dict) or not all(isinstance(k, int) and not isinstance(k, bool) for k in data):
        raise DatasetError(f"{path} must hold a dict with integer class keys, found {type(data).__name__}")
    if classes is not None and set(data) != set(classes):
        raise DatasetError(f"{path} holds classes {sorted(data)} but this fold and split has {sorted(classes)}; "
                           "is it the list of another fold, split or COCO split?")
    policy = _policy(on_error, report)
    result: dict[int, list[Item]] = {}
    for c in sorted(data):
        entries = data[c]
        if not isinstance(entries, (list, tuple)):
            raise DatasetError(f"{path}: class {c} maps to {type(entries).__name__}, expected a list of pairs")
        pairs: list[Item] = []
        for entry in entries:
            pair = _check_pair(entry)
            if pair is None:
                policy(Problem(str(path), f"class {c}: entry {entry!r} is not an (image, label) pair of strings"))
                continue
            try:
                pairs.append((to_id(pair[0], dataset, "image"), to_id(pair[1], dataset, "label")))
            except DatasetError as err:
                policy(Problem(str(path), f"class {c}: {err}"))
        result[c] = pairs
    return result


def find_list_files(list_root: str | os.PathLike[str], dataset: str, fold: int, split: str) -> tuple[Path, Path | None]:
    """Locate a fold's list files under ``list_root``.

    ``list_root`` may be the trainers' ``lists/<dataset>`` folder (holding ``fss_list/``), the
    ``fss_list`` folder, the split folder itself, or a folder holding ``pascal/`` and ``coco/``.

    Returns:
        ``(data_list path, sub_class_file_list path or None when that file is absent)``.

    Raises:
        DataNotFoundError: No ``data_list_{fold}.txt`` in any of those places.
    """
    spec = get_dataset(dataset)
    name = spec.name
    root = Path(list_root).expanduser()
    if not root.is_dir():
        raise DataNotFoundError(f"list folder {root} does not exist")
    candidates = [root / "fss_list" / split, root / split, root, root / spec.list_dir / "fss_list" / split]
    for folder in candidates:
        data_list = folder / f"data_list_{fold}.txt"
        if data_list.is_file():
            sub = folder / f"sub_class_file_list_{fold}.txt"
            return data_list, (sub if sub.is_file() else None)
    tried = ", ".join(str(c) for c in candidates)
    raise DataNotFoundError(f"no data_list_{fold}.txt for {name} {split} under {root} (looked in {tried}); "
                            "pass the trainers' lists/<dataset> folder, or build lists with 'clipprior lists build'")


def read_fss_lists(list_root: str | os.PathLike[str], dataset: str, fold: int, split: str = "val",
                   coco_split: str = "interleaved", *, on_error: str = "raise",
                   report: DataReport | None = None) -> FssLists:
    """Read one fold's list files, without touching the data.

    Args:
        list_root: See :func:`find_list_files`.
        dataset: a registered benchmark (``"pascal5i"``, ``"coco20i"``, ...).
        fold: 0..3.
        split: ``"val"`` or ``"train"``.
        coco_split: ``"interleaved"`` or ``"contiguous"`` (COCO only).
        on_error: ``"raise"`` or ``"skip"`` malformed lines.
        report: Where skipped lines are recorded.

    Returns:
        The lists; ``class_index`` is ``None`` when ``sub_class_file_list_{fold}.txt`` is absent
        (:func:`~clipprior.data.dataset.open_dataset` then derives it from the masks).

    Example:
        >>> lists = read_fss_lists("PI-CLIP/lists/pascal", "pascal5i", 0)  # doctest: +SKIP
        >>> len(lists.items), lists.pair_count()  # doctest: +SKIP
        (364, 365)
    """
    name = dataset_name(dataset)
    classes = fold_classes(name, fold, split, coco_split)
    data_path, sub_path = find_list_files(list_root, name, fold, split)
    items = read_data_list(data_path, name, on_error=on_error, report=report)
    index = None
    sources = [str(data_path)]
    if sub_path is not None:
        index = read_sub_class_file_list(sub_path, name, classes, on_error=on_error, report=report)
        sources.append(str(sub_path))
    return FssLists(name, fold, split, classes, items, index, source=f"list files in {data_path.parent}",
                    sources=sources)


def base_items(dataset: str, root: str | os.PathLike[str], split: str, base_list: str | os.PathLike[str] | None = None,
               *, on_error: str = "raise", report: DataReport | None = None) -> list[Item]:
    """The whole-dataset list the fold lists are built from.

    Args:
        dataset: a registered benchmark (``"pascal5i"``, ``"coco20i"``, ...).
        root: Data root.
        split: ``"val"`` or ``"train"``.
        base_list: An ``"image label"`` list (e.g. the trainers' ``lists/pascal/val.txt``,
            ``voc_sbd_merge_noduplicate.txt``, ``lists/coco/val.txt``). Without it the data is
            scanned by the dataset's :attr:`~clipprior.data.specs.DatasetSpec.scan` rule: PASCAL
            val = ``ImageSets/Segmentation/val.txt``, PASCAL train = every ``SegmentationClassAug``
            mask not in val (sorted), COCO = every mask under
            ``annotations/{split}2014`` (sorted). The scan gives the same images in the same rule
            but not the trainers' order or exact image set: for lists identical to the trainers',
            pass their base list.
        on_error: ``"raise"`` or ``"skip"`` malformed lines.
        report: Where skipped lines are recorded.

    Returns:
        (image id, label id) pairs.
    """
    spec = get_dataset(dataset)
    if base_list is not None:
        return read_data_list(base_list, spec.name, on_error=on_error, report=report)
    return spec.scan(spec, Path(root), split)


def build_fss_lists(dataset: str, root: str | os.PathLike[str], split: str, folds: Iterable[int] = (0, 1, 2, 3),
                    coco_split: str = "interleaved", *, base_list: str | os.PathLike[str] | None = None,
                    min_pixels: int = MIN_PIXELS, on_error: str = "raise", report: DataReport | None = None,
                    progress: ProgressFn | None = None) -> dict[int, FssLists]:
    """Build fold lists from the masks by the PFENet / BAM rule (every mask is read once for all folds).

    Args:
        dataset: a registered benchmark (``"pascal5i"``, ``"coco20i"``, ...).
        root: Data root (see :mod:`clipprior.data.layout`).
        split: ``"val"`` or ``"train"``.
        folds: Folds to build.
        coco_split: ``"interleaved"`` or ``"contiguous"`` (COCO only).
        base_list: Whole-dataset list to filter; see :func:`base_items`.
        min_pixels: The rule's threshold (2048).
        on_error: ``"raise"`` at the first missing or unreadable file, or ``"skip"`` and record it.
        report: Where skipped problems are recorded.
        progress: Called as ``progress(done, total)`` while masks are read.

    Returns:
        ``{fold: FssLists}`` with ``class_index`` filled.

    Raises:
        DataNotFoundError: Missing root, base list, image or mask (``on_error="raise"``).
        DatasetError: Unreadable mask (``on_error="raise"``).

    Example:
        >>> lists = build_fss_lists("pascal5i", "VOC2012", "val", base_list="lists/pascal/val.txt")  # doctest: +SKIP
        >>> len(lists[0].items)  # doctest: +SKIP
        364
    """
    name = dataset_name(dataset)
    root = Path(root)
    folds = list(folds)
    per_fold = {f: fold_classes(name, f, split, coco_split) for f in folds}
    policy = _policy(on_error, report)
    base = base_items(name, root, split, base_list, on_error=on_error, report=policy.report)
    counts_per_item: list[tuple[Item, dict[int, int]]] = []
    for done, (image_id, label_id) in enumerate(base, start=1):
        if progress is not None:
            progress(done - 1, len(base))
        image_path, label_path = root / image_id, root / label_id
        if not image_path.is_file():
            policy(Problem(str(image_path), f"image of base-list entry {image_id} does not exist", missing=True))
            continue
        try:
            counts = class_pixel_counts(load_label(label_path))
        except ClipPriorError as err:
            policy(Problem(str(label_path), str(err), missing=isinstance(err, DataNotFoundError)))
            continue
        counts_per_item.append(((image_id, label_id), counts))
    if progress is not None:
        progress(len(base), len(base))
    source = f"built from {base_list}" if base_list is not None else f"built from the masks under {root}"
    result: dict[int, FssLists] = {}
    for f, classes in per_fold.items():
        items: list[Item] = []
        index: dict[int, list[Item]] = {c: [] for c in classes}
        for item, counts in counts_per_item:
            counted = _counted_from_counts(counts, classes, split, min_pixels)
            if counted:
                items.append(item)
                for c in counted:
                    index[c].append(item)
        result[f] = FssLists(name, f, split, classes, items, index, source=source)
    return result


def write_fss_lists(lists: FssLists, out_root: str | os.PathLike[str], path_prefix: str = "") -> tuple[Path, Path]:
    """Write lists in the trainers' format: ``<out_root>/fss_list/<split>/{data_list,sub_class_file_list}_<fold>.txt``.

    Args:
        lists: Lists with ``class_index`` filled.
        out_root: Folder to write into (the trainers' ``lists/<dataset>``).
        path_prefix: Prepended to every id with ``/``: ``""`` writes ids relative to the data
            root, an absolute data root writes paths usable from anywhere, and
            ``"../data/VOCdevkit2012/VOC2012"`` reproduces the trainers' own files.

    Returns:
        The two paths written.

    Raises:
        InvalidInputError: ``class_index`` is missing, or the prefix holds whitespace (the
            trainers split lines on spaces).
    """
    if lists.class_index is None:
        raise InvalidInputError("these lists have no class index; build or read them with their sub-class list")
    if any(ch.isspace() for ch in path_prefix):
        raise InvalidInputError(f"path prefix {path_prefix!r} contains whitespace; the trainers split list lines "
                                "on spaces, so use a path without spaces")
    prefix = path_prefix.rstrip("/\\")

    def full(item_id: str) -> str:
        return f"{prefix}/{item_id}" if prefix else item_id

    folder = Path(out_root) / "fss_list" / lists.split
    folder.mkdir(parents=True, exist_ok=True)
    data_path = folder / f"data_list_{lists.fold}.txt"
    sub_path = folder / f"sub_class_file_list_{lists.fold}.txt"
    data_path.write_text("".join(f"{full(i)} {full(lbl)}\n" for i, lbl in lists.items), encoding="utf-8")
    index = {c: [(full(i), full(lbl)) for i, lbl in lists.class_index.get(c, [])] for c in lists.classes}
    sub_path.write_text(repr(index), encoding="utf-8")
    return data_path, sub_path
