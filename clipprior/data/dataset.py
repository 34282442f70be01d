"""A few-shot segmentation benchmark opened for one fold and split: :class:`FSSDataset`.

:func:`open_dataset` reads the trainers' list files when given (``list_root``), or builds the same
lists from the masks by the PFENet / BAM rule, checks that every listed file exists, and returns an
:class:`FSSDataset` whose ``items`` (the query list) and ``class_index`` (the support pools) hold
ids relative to ``root``.

Example:
    >>> from clipprior.data import open_dataset
    >>> ds = open_dataset("pascal5i", "~/data/VOC2012", fold=0, list_root="PI-CLIP/lists/pascal")  # doctest: +SKIP
    >>> len(ds.items), ds.classes, ds.items[0][0]  # doctest: +SKIP
    (364, [1, 2, 3, 4, 5], 'JPEGImages/2007_000033.jpg')
    >>> ds.load_image(ds.items[0][0]).shape  # doctest: +SKIP
    (366, 500, 3)
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from clipprior.data.classes import _check_coco_split, _check_fold, _check_split, dataset_name, num_classes
from clipprior.data.images import DataRoot, load_label, load_pair, load_rgb
from clipprior.data.layout import check_root
from clipprior.data.lists import (
    MIN_PIXELS,
    FssLists,
    Item,
    ProgressFn,
    _counted_from_counts,
    build_fss_lists,
    class_pixel_counts,
    read_fss_lists,
)
from clipprior.data.report import DataReport, Problem, _Policy, check_on_error
from clipprior.errors import ClipPriorError, DataNotFoundError

__all__ = ["FSSDataset", "open_dataset"]


class FSSDataset(DataRoot):
    """One fold and split of PASCAL-5i or COCO-20i.

    Ids are POSIX paths relative to :attr:`root` (``"JPEGImages/2007_000033.jpg"``); every method
    that takes a path also accepts an absolute path. ``path``, ``load_image``, ``load_label`` and
    ``image_size`` come from :class:`~clipprior.data.images.DataRoot`.

    Attributes:
        name: a registered benchmark (``"pascal5i"``, ``"coco20i"``, ...).
        root: Absolute data root.
        fold: 0..3.
        split: ``"val"`` (novel classes) or ``"train"`` (base classes).
        coco_split: ``"interleaved"`` or ``"contiguous"`` (meaningful for COCO only).
        classes: The fold's classes for the split, 1-based ids, ascending.
        items: The query list: (image id, label id) pairs in list order.
        class_index: ``{class: [(image id, label id), ...]}``, the support pool of every class.
        report: Problems skipped under ``on_error="skip"`` (empty under ``"raise"``).
        on_error: ``"raise"`` or ``"skip"``.
        list_source: Where the lists came from, in words.
    """

    def __init__(self, lists: FssLists, root: Path, coco_split: str, on_error: str, report: DataReport) -> None:
        self.name = lists.dataset
        self.root = root
        self.fold = lists.fold
        self.split = lists.split
        self.coco_split = coco_split
        self.classes = list(lists.classes)
        self.items: list[Item] = list(lists.items)
        self.class_index: dict[int, list[Item]] = {c: list((lists.class_index or {}).get(c, [])) for c in self.classes}
        self.on_error = on_error
        self.report = report
        self.list_source = lists.source
        self._present: dict[str, tuple[int, ...]] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return (f"FSSDataset({self.name!r}, fold={self.fold}, split={self.split!r}, items={len(self.items)}, "
                f"pairs={sum(len(v) for v in self.class_index.values())}, root={str(self.root)!r})")

    @property
    def lists(self) -> FssLists:
        """The dataset's current lists (after skipped entries were removed)."""
        return FssLists(self.name, self.fold, self.split, self.classes, self.items, self.class_index,
                        source=self.list_source)

    @property
    def list_checksum(self) -> str:
        """sha256 of the lists' content as ids (see :meth:`FssLists.checksum`), for cache provenance."""
        return self.lists.checksum()

    def relative(self, path: str | os.PathLike[str]) -> str:
        """Id (POSIX path relative to :attr:`root`) of a path under the root; ids are returned unchanged."""
        path = Path(path)
        if not path.is_absolute():
            return path.as_posix()
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError as err:
            raise DataNotFoundError(f"{path} is not under the data root {self.root}") from err

    def load_pair(self, image: str | os.PathLike[str], label: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
        """Load an image and its mask, checking that their sizes agree: ((H, W, 3), (H, W)) uint8."""
        return load_pair(self.path(image), self.path(label))

    def present_classes(self, label: str | os.PathLike[str]) -> tuple[int, ...]:
        """Classes of :attr:`classes` present in a mask, any pixel count, ascending (cached).

        This is the candidate set from which the PFENet-family trainers draw an episode's class.
        """
        key = self.relative(label) if Path(label).is_absolute() else Path(label).as_posix()
        if key not in self._present:
            values = np.unique(self.load_label(label))
            wanted = set(self.classes)
            self._present[key] = tuple(int(v) for v in values if int(v) in wanted)
        return self._present[key]

    def pairs(self) -> list[Item]:
        """Every distinct (image id, label id) pair referenced by ``items`` or ``class_index``, first-seen order."""
        seen: dict[Item, None] = dict.fromkeys(self.items)
        for c in self.classes:
            seen.update(dict.fromkeys(self.class_index[c]))
        return list(seen)

    def drop(self, bad: Iterable[str]) -> None:
        """Remove every pair whose image id or label id is in ``bad`` from ``items`` and ``class_index``."""
        bad = set(bad)
        if not bad:
            return
        self.items = [p for p in self.items if p[0] not in bad and p[1] not in bad]
        self.class_index = {c: [p for p in pairs if p[0] not in bad and p[1] not in bad]
                            for c, pairs in self.class_index.items()}

    def verify(self, progress: ProgressFn | None = None) -> DataReport:
        """Decode every listed image and mask and check them.

        Checks: each file decodes (not corrupt or truncated), mask and image have the same size,
        mask values are 0, 255 or a class id of the benchmark. Under ``on_error="skip"`` the broken
        pairs are removed from ``items`` and ``class_index``; under ``"raise"`` the first problem raises.

        Args:
            progress: Called as ``progress(done, total)``.

        Returns:
            The problems found by this call (also appended to :attr:`report`).

        Raises:
            DatasetError: The first problem (``on_error="raise"``).
        """
        found = DataReport()
        policy = _Policy(self.on_error, found)
        n_max = num_classes(self.name)
        bad: set[str] = set()
        pairs = self.pairs()
        for done, (image_id, label_id) in enumerate(pairs):
            if progress is not None:
                progress(done, len(pairs))
            arrays = []
            for item_id, loader in ((image_id, load_rgb), (label_id, load_label)):
                try:
                    arrays.append(loader(self.path(item_id)))
                except ClipPriorError as err:
                    policy(Problem(str(self.path(item_id)), str(err), missing=isinstance(err, DataNotFoundError)))
                    bad.add(item_id)
            if len(arrays) < 2:
                continue
            image, label = arrays
            label_path = str(self.path(label_id))
            if image.shape[:2] != label.shape:
                policy(Problem(label_path, f"mask is {label.shape[0]}x{label.shape[1]} (HxW) but image "
                               f"{self.path(image_id)} is {image.shape[0]}x{image.shape[1]}"))
                bad.add(label_id)
                continue
            wrong = [int(v) for v in np.unique(label) if v != 255 and v > n_max]
            if wrong:
                policy(Problem(label_path, f"mask holds values {wrong[:10]} outside 0..{n_max} and 255"))
                bad.add(label_id)
        if progress is not None:
            progress(len(pairs), len(pairs))
        self.drop(bad)
        self.report.extend(found)
        return found


def _check_files(lists: FssLists, root: Path, policy: _Policy) -> set[str]:
    """Ids of missing files (each reported once, against the list file that names it)."""
    missing: set[str] = set()
    checked: set[str] = set()
    data_file = lists.sources[0] if lists.sources else "data list"
    sub_file = lists.sources[1] if len(lists.sources) > 1 else data_file
    groups = [(data_file, lists.items)] + [(sub_file, v) for v in (lists.class_index or {}).values()]
    for source, pairs in groups:
        for pair in pairs:
            for kind, item_id in zip(("image", "mask"), pair, strict=True):
                if item_id in checked:
                    continue
                checked.add(item_id)
                if not (root / item_id).is_file():
                    missing.add(item_id)
                    policy(Problem(source, f"{kind} {item_id} listed there does not exist under {root}", missing=True))
    return missing


def _derive_index(lists: FssLists, root: Path, policy: _Policy,
                  progress: ProgressFn | None) -> tuple[dict[int, list[Item]], set[str]]:
    """Support lists from the masks of the data list, by the building rule."""
    index: dict[int, list[Item]] = {c: [] for c in lists.classes}
    bad: set[str] = set()
    for done, (image_id, label_id) in enumerate(lists.items):
        if progress is not None:
            progress(done, len(lists.items))
        try:
            counts = class_pixel_counts(load_label(root / label_id))
        except ClipPriorError as err:
            policy(Problem(str(root / label_id), str(err), missing=isinstance(err, DataNotFoundError)))
            bad.add(label_id)
            continue
        for c in _counted_from_counts(counts, lists.classes, lists.split, MIN_PIXELS):
            index[c].append((image_id, label_id))
    return index, bad


def open_dataset(name: str, root: str | os.PathLike[str], fold: int, split: str = "val",
                 list_root: str | os.PathLike[str] | None = None, coco_split: str = "interleaved",
                 on_error: str = "raise", *, base_list: str | os.PathLike[str] | None = None,
                 verify: bool = False, progress: ProgressFn | None = None) -> FSSDataset:
    """Open one fold and split of a benchmark.

    Args:
        name: a registered benchmark (``"pascal5i"``, ``"coco20i"``, ...).
        root: Data root: the ``VOC2012`` folder (``JPEGImages/``, ``SegmentationClassAug/``) or the
            ``MSCOCO2014`` folder (``train2014/``, ``val2014/``, ``annotations/{train,val}2014/``).
        fold: 0..3.
        split: ``"val"`` (novel classes: the evaluation episodes) or ``"train"`` (base classes).
        list_root: The trainers' list folder (``lists/pascal``, its ``fss_list``, or a folder with
            ``pascal/`` and ``coco/``); paths inside are remapped onto ``root``. ``None`` builds the
            lists from the masks (see :func:`~clipprior.data.lists.build_fss_lists`; slow on COCO:
            build them once with ``clipprior lists build``). When ``data_list_{fold}.txt`` exists
            but ``sub_class_file_list_{fold}.txt`` does not, the support pools are derived from the
            masks of the data list by the same rule.
        coco_split: ``"interleaved"`` (fold f tests 4k+f+1) or ``"contiguous"`` (20f+1..20f+20).
        on_error: ``"raise"`` at the first broken entry, or ``"skip"`` broken entries and record
            them in :attr:`FSSDataset.report`.
        base_list: Without ``list_root``: the whole-dataset list to filter (see
            :func:`~clipprior.data.lists.base_items`).
        verify: Also decode every image and mask now (:meth:`FSSDataset.verify`).
        progress: Called as ``progress(done, total)`` while masks are read or verified.

    Returns:
        The dataset.

    Raises:
        DataNotFoundError: Missing root, list file, image or mask.
        DatasetError: Malformed list, unreadable file, size mismatch (with ``verify``).
        InvalidInputError: Bad ``name``, ``fold``, ``split``, ``coco_split`` or ``on_error``.
    """
    dataset = dataset_name(name)
    _check_fold(fold, dataset)
    _check_split(split)
    _check_coco_split(coco_split)
    check_on_error(on_error)
    base_root = check_root(root, dataset, (split,))
    report = DataReport()
    policy = _Policy(on_error, report)
    if list_root is not None:
        lists = read_fss_lists(list_root, dataset, fold, split, coco_split, on_error=on_error, report=report)
        bad = _check_files(lists, base_root, policy)
        if lists.class_index is None:
            lists.items = [p for p in lists.items if p[0] not in bad and p[1] not in bad]
            lists.class_index, derived_bad = _derive_index(lists, base_root, policy, progress)
            bad |= derived_bad
            lists.source += "; support lists derived from the masks (no sub_class_file_list)"
    else:
        lists = build_fss_lists(dataset, base_root, split, [fold], coco_split, base_list=base_list,
                                on_error=on_error, report=report, progress=progress)[fold]
        bad = set()
    ds = FSSDataset(lists, base_root, coco_split, on_error, report)
    ds.drop(bad)
    if verify:
        ds.verify(progress=progress)
    return ds
