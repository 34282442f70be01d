"""COCO ``instances_{train,val}2014.json`` to the class-index PNG masks COCO-20i trainers read.

Each image of the JSON gets ``<out>/<file_name stem>.png``, a single-channel 8-bit PNG of the
image's size: 0 background, 1..80 the classes (the 80 categories ranked by COCO category id:
person=1 ... toothbrush=80). Annotations are painted in the JSON's order, a later one
overwriting an earlier one where they overlap. Crowd annotations (``iscrowd=1``) are painted with
their class by default (``crowd="label"``), or as 255 ignore (``"ignore"``), or left out
(``"drop"``). Images without any annotation get no mask (``keep_empty=False``), which is why the
trainers' ``lists/coco/val.txt`` has 40,137 lines for the 40,504 images of val2014.

Needs pycocotools (``pip install 'clipprior[coco]'``) to decode polygons and RLE; it is imported
only when a conversion runs.

Example:
    >>> from clipprior.data.coco import coco_to_masks
    >>> stats = coco_to_masks("annotations/instances_val2014.json", "MSCOCO2014/annotations/val2014")  # doctest: +SKIP
    >>> stats.written  # doctest: +SKIP
    40137
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clipprior.data.lists import ProgressFn
from clipprior.errors import ClipPriorError, DataNotFoundError, DatasetError, InvalidInputError

__all__ = ["CROWD_MODES", "CocoMaskStats", "OptionalDependencyError", "coco_category_map", "coco_to_masks"]

CROWD_MODES: tuple[str, ...] = ("label", "ignore", "drop")
"""What :func:`coco_to_masks` does with crowd regions (``crowd``), the default first."""


class OptionalDependencyError(ClipPriorError, ImportError):
    """An optional dependency (an ``extra`` of the clipprior package) is not installed."""


@dataclass(frozen=True)
class CocoMaskStats:
    """What :func:`coco_to_masks` did.

    Attributes:
        images: Images in the JSON.
        written: Masks written.
        empty: Images without annotations (no mask written unless ``keep_empty``).
        existing: Masks left as they were because they existed (``overwrite=False``).
        annotations: Annotations painted.
        out_dir: The output folder.
    """

    images: int
    written: int
    empty: int
    existing: int
    annotations: int
    out_dir: Path


def _mask_api() -> Any:
    try:
        from pycocotools import mask as mask_api
    except ImportError as err:
        raise OptionalDependencyError("converting COCO annotations needs pycocotools, which is not installed: "
                                      "pip install 'clipprior[coco]' (or pip install pycocotools)") from err
    return mask_api


def coco_category_map(categories: list[Mapping[str, Any]], strict: bool = True) -> dict[int, int]:
    """``{COCO category id: class id}``: categories ranked by id, from 1.

    Args:
        categories: The JSON's ``"categories"`` list.
        strict: Require the 80 COCO categories.

    Raises:
        DatasetError: Malformed categories, or not 80 of them with ``strict``.
    """
    try:
        ids = sorted(int(c["id"]) for c in categories)
    except (KeyError, TypeError, ValueError) as err:
        raise DatasetError(f"COCO categories must be objects with an integer 'id' ({err})") from err
    if len(set(ids)) != len(ids):
        raise DatasetError("COCO categories repeat an id")
    if strict and len(ids) != 80:
        raise DatasetError(f"the annotations have {len(ids)} categories; COCO-20i needs the 80 COCO categories "
                           "(instances_train2014.json / instances_val2014.json)")
    if len(ids) > 254:
        raise DatasetError(f"{len(ids)} categories do not fit 8-bit masks with 255 as ignore")
    return {cat_id: rank for rank, cat_id in enumerate(ids, start=1)}


def _decode(mask_api: Any, segmentation: Any, height: int, width: int) -> np.ndarray:
    if isinstance(segmentation, list):  # polygons
        polygons = [p for p in segmentation if isinstance(p, list) and len(p) >= 6]
        if not polygons:
            return np.zeros((height, width), np.uint8)
        rle = mask_api.merge(mask_api.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        rle = mask_api.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, bytes)):
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise ValueError(f"unknown segmentation of type {type(segmentation).__name__}")
    with warnings.catch_warnings():
        # pycocotools' Cython mask class predates NumPy 2's __array__(copy=...) protocol; the decoded
        # array is right, only the protocol warning is pycocotools' to fix.
        warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept a copy keyword",
                                category=DeprecationWarning)
        decoded = np.asarray(mask_api.decode(rle), dtype=np.uint8)
    if decoded.shape != (height, width):
        raise ValueError(f"segmentation decodes to {decoded.shape}, the image is {(height, width)}")
    return decoded


def coco_to_masks(annotations: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, crowd: str = "label",
                  keep_empty: bool = False, overwrite: bool = True, strict: bool = True,
                  progress: ProgressFn | None = None) -> CocoMaskStats:
    """Convert a COCO instances JSON into class-index PNG masks.

    Args:
        annotations: ``instances_train2014.json`` or ``instances_val2014.json``.
        out_dir: Folder for the masks (``MSCOCO2014/annotations/{train,val}2014``); created.
        crowd: ``"label"`` (paint crowd regions with their class), ``"ignore"`` (255) or ``"drop"``.
        keep_empty: Also write all-zero masks for images without annotations.
        overwrite: Replace masks that already exist (``False`` resumes an interrupted run).
        strict: Require the 80 COCO categories.
        progress: Called as ``progress(done, total)`` per image.

    Returns:
        Counts of what was done.

    Raises:
        OptionalDependencyError: pycocotools is not installed.
        DataNotFoundError: The JSON does not exist.
        DatasetError: The JSON is not COCO instances data, or an annotation cannot be decoded
            (the message names the annotation id and image file).
        InvalidInputError: Bad ``crowd``.
    """
    if crowd not in CROWD_MODES:
        raise InvalidInputError(f"crowd must be one of {', '.join(CROWD_MODES)}, got {crowd!r}")
    mask_api = _mask_api()
    annotations = Path(annotations)
    if not annotations.is_file():
        raise DataNotFoundError(f"COCO annotation file {annotations} does not exist")
    try:
        with annotations.open(encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{annotations} is not valid JSON ({err}); re-download it") from err
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations",
                                                                                      "categories")):
        raise DatasetError(f"{annotations} is not a COCO instances file (it needs 'images', 'annotations' and "
                           "'categories' lists)")
    category_map = coco_category_map(data["categories"], strict=strict)
    by_image: dict[int, list[Mapping[str, Any]]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann.get("image_id"), []).append(ann)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = empty = existing = painted = 0
    images = data["images"]
    for done, record in enumerate(images):
        if progress is not None:
            progress(done, len(images))
        try:
            image_id, file_name = record["id"], str(record["file_name"])
            height, width = int(record["height"]), int(record["width"])
        except (KeyError, TypeError, ValueError) as err:
            raise DatasetError(f"{annotations}: image record {record!r:.120} lacks id, file_name, height or "
                               "width") from err
        anns = by_image.get(image_id, [])
        if not anns:
            empty += 1
            if not keep_empty:
                continue
        target = out / (Path(file_name).stem + ".png")
        if target.exists() and not overwrite:
            existing += 1
            continue
        mask = np.zeros((height, width), np.uint8)
        for ann in anns:
            is_crowd = bool(ann.get("iscrowd", 0))
            if is_crowd and crowd == "drop":
                continue
            category = ann.get("category_id")
            if category not in category_map:
                raise DatasetError(f"{annotations}: annotation {ann.get('id')} of {file_name} has category "
                                   f"{category!r}, which is not among the file's categories")
            try:
                region = _decode(mask_api, ann.get("segmentation"), height, width)
            except (ValueError, TypeError, KeyError) as err:
                raise DatasetError(f"{annotations}: annotation {ann.get('id')} of {file_name} cannot be decoded "
                                   f"({err})") from err
            mask[region > 0] = 255 if (is_crowd and crowd == "ignore") else category_map[category]
            painted += 1
        tmp = target.with_name(target.name + ".tmp")
        Image.fromarray(mask).save(tmp, format="PNG")
        os.replace(tmp, target)
        written += 1
    if progress is not None:
        progress(len(images), len(images))
    return CocoMaskStats(len(images), written, empty, existing, painted, out)
