"""Where the benchmarks' files live under a data root, and how list paths are mapped onto it.

PASCAL-5i (root = the ``VOC2012`` folder)::

    JPEGImages/2007_000033.jpg
    SegmentationClassAug/2007_000033.png      # 0 background, 1..20 classes, 255 ignore
    ImageSets/Segmentation/val.txt            # only needed to build lists without a base list

COCO-20i (root = the ``MSCOCO2014`` folder)::

    train2014/COCO_train2014_000000000009.jpg
    val2014/COCO_val2014_000000000042.jpg
    annotations/train2014/COCO_train2014_000000000009.png   # 0 background, 1..80, 255 ignore
    annotations/val2014/COCO_val2014_000000000042.png

Inside clipprior, an image or mask is named by its *id*: its POSIX path relative to the data root
(``"JPEGImages/2007_000033.jpg"``). Trainers' list files carry their own prefixes
(``../data/VOCdevkit2012/VOC2012/JPEGImages/...``); :func:`to_id` keeps the part from the known
folder on (the longest of ``JPEGImages``, ``SegmentationClassAug``, ``train2014``, ``val2014``,
``annotations/train2014``, ``annotations/val2014`` that precedes the file name).

Example:
    >>> from clipprior.data.layout import to_id
    >>> to_id("../data/MSCOCO2014/annotations/val2014/COCO_val2014_000000000042.png", "coco20i", "label")
    'annotations/val2014/COCO_val2014_000000000042.png'
"""

from __future__ import annotations

import os
from pathlib import Path

from clipprior.data.specs import Layout, get_dataset
from clipprior.errors import DataNotFoundError, DatasetError

__all__ = ["Layout", "check_root", "to_id"]


def to_id(path: str, dataset: str, kind: str) -> str:
    r"""Map a path from a list file onto an id relative to the data root.

    Args:
        path: The path as written in the list (any prefix, ``/`` or ``\`` separators).
        dataset: a registered benchmark (``"pascal5i"``, ``"coco20i"``, ...).
        kind: ``"image"`` or ``"label"``.

    Returns:
        The id, e.g. ``"SegmentationClassAug/2007_000033.png"``.

    Raises:
        DatasetError: No known folder of that kind precedes the file name.
    """
    spec = get_dataset(dataset)
    layout = spec.layout
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
    best: tuple[str, ...] | None = None
    for prefix in layout.prefixes(kind):
        n = len(prefix)
        if len(parts) > n and tuple(parts[-n - 1:-1]) == prefix and (best is None or n > len(best)):
            best = prefix
    if best is None:
        folders = " or ".join("/".join(p) + "/" for p in sorted(layout.prefixes(kind)))
        raise DatasetError(f"{kind} path {path!r} is not inside {folders} (the {spec.name} layout)")
    return "/".join((*best, parts[-1]))


def check_root(root: str | os.PathLike[str], dataset: str, splits: tuple[str, ...] = ("val",)) -> Path:
    """Check that ``root`` exists and holds the benchmark's folders for ``splits``.

    Returns:
        ``root`` as an absolute :class:`~pathlib.Path`.

    Raises:
        DataNotFoundError: The root or one of its expected folders is missing; the message says
            what was expected and, when it can tell, which folder should have been passed.
    """
    spec = get_dataset(dataset)
    name, layout = spec.name, spec.layout
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataNotFoundError(f"{name} data root {root} does not exist or is not a folder; "
                                f"pass the {layout.root_name} folder")
    root = root.resolve()
    for split in splits:
        for dirs in (layout.image_dirs[split], layout.label_dirs[split]):
            folder = root.joinpath(*dirs)
            if folder.is_dir():
                continue
            hint = ""
            for candidate in sorted(root.glob(f"*/{dirs[0]}")) + sorted(root.glob(f"*/*/{dirs[0]}")):
                if candidate.parent.joinpath(*dirs).is_dir():
                    hint = f"; did you mean --data-root {candidate.parent}?"
                    break
            raise DataNotFoundError(f"{name} data root {root} has no {'/'.join(dirs)}/ folder (expected "
                                    f"{layout.root_name}/{'/'.join(dirs)}/){hint}")
    return root
