"""Reading images and masks: the one place where files become arrays.

:func:`load_rgb` returns every image as (H, W, 3) uint8 RGB, whatever its mode: grayscale, CMYK
(a few COCO JPEGs are), palette, RGBA / LA (alpha dropped), 16-bit grayscale (high byte kept, as
OpenCV does); :func:`pil_to_rgb` is that conversion of PIL modes, which images in memory go
through too. :func:`load_label` returns a mask as (H, W) uint8 class indices: single-channel
(``L``) PNGs as they are; palette (``P``) PNGs by their indices (the class ids of VOC-style
masks; OpenCV's grayscale read would turn them into luminances); RGB masks only when their three
channels are equal. EXIF orientation is *not* applied: masks are stored in the images' stored
pixel order, and a size mismatch is reported rather than silently rotated away.

A missing file raises :class:`~clipprior.errors.DataNotFoundError`, an unreadable, corrupt or
truncated one :class:`~clipprior.errors.DatasetError`, both naming the file.

Example:
    >>> import numpy as np, tempfile, pathlib
    >>> from PIL import Image
    >>> from clipprior.data.images import load_rgb
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "gray.png"
    >>> Image.fromarray(np.full((4, 6), 7, np.uint8)).save(path)
    >>> load_rgb(path).shape, int(load_rgb(path)[0, 0, 2])
    ((4, 6, 3), 7)
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from clipprior.errors import DataNotFoundError, DatasetError, InvalidInputError

__all__ = [
    "SIXTEEN_BIT_MODES",
    "DataRoot",
    "Depth",
    "check_same_size",
    "fss_mask",
    "image_size",
    "load_label",
    "load_pair",
    "load_rgb",
    "pil_to_rgb",
]

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, zlib.error, UnidentifiedImageError, Image.DecompressionBombError)


def _open(path: str | os.PathLike[str], what: str) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"{what} {path} does not exist")
    try:
        image = Image.open(path)
        image.load()
    except _DECODE_ERRORS as err:
        raise DatasetError(f"{what} {path} is corrupt, truncated or not an image ({type(err).__name__}: {err}); "
                           "re-download or re-extract it") from err
    return image


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(height, width) of an image or mask from its header, without decoding the pixels.

    Raises:
        DataNotFoundError: The file does not exist.
        DatasetError: The file is not a readable image.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"file {path} does not exist")
    try:
        with Image.open(path) as image:
            width, height = image.size
    except _DECODE_ERRORS as err:
        raise DatasetError(f"{path} is not a readable image ({type(err).__name__}: {err})") from err
    return height, width


#: The 16-bit modes PIL opens integer images deeper than 8 bits in (a 16-bit grayscale PNG is ``I;16``).
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
#: How :func:`pil_to_rgb` brings integer images deeper than 8 bits to uint8 (see there).
Depth = Literal["shift", "peak"]


def pil_to_rgb(image: Image.Image, *, depth: Depth = "shift", name: str = "image") -> np.ndarray:
    """A PIL image of any mode as (H, W, 3) uint8 RGB: the one converter of PIL modes.

    :func:`load_rgb` (files) and :func:`clipprior.preprocess.to_rgb_array` (images in memory) both
    convert with it. Grayscale is replicated; palette images are looked up (through RGBA when the
    palette has transparency); RGBA / LA / PA drop their alpha without compositing; CMYK, YCbCr
    and the other colour modes go through PIL's conversion; float (``F``) pixels are clipped to
    [0, 255] and truncated, as PIL's own conversion does.

    Integer images deeper than 8 bits follow ``depth``:

    * ``"shift"`` (files, :func:`load_rgb`): 16-bit modes keep their high byte, as OpenCV's
      ``imread`` does (the reference PI-CLIP loaders decode with OpenCV): 1000 becomes 3;
      32-bit ``I`` pixels are clipped to [0, 255].
    * ``"peak"`` (in memory, :func:`~clipprior.preprocess.to_rgb_array`): 16-bit and ``I`` pixels
      are scaled so that the image's maximum becomes 255 when it exceeds 255, and kept when it
      does not: 1000 alone becomes 255.

    PIL's plain ``convert("RGB")`` clips 16-bit pixels to 255, which neither rule does.

    Args:
        image: The image (any mode).
        depth: ``"shift"`` or ``"peak"``, as above.
        name: What the image is called in errors (``"image JPEGImages/a.jpg"``).

    Returns:
        (H, W, 3) uint8 array, RGB channel order, C-contiguous.

    Raises:
        InvalidInputError: for a mode PIL cannot convert to RGB (``La``, ...), or an unknown ``depth``.

    Example:
        >>> sixteen = Image.fromarray(np.full((2, 3), 1000, np.uint16))
        >>> int(pil_to_rgb(sixteen)[0, 0, 0]), int(pil_to_rgb(sixteen, depth="peak")[0, 0, 0])
        (3, 255)
    """
    if depth not in ("shift", "peak"):
        raise InvalidInputError(f"depth={depth!r} is not valid; choose 'shift' (as OpenCV) or 'peak'")
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES or (mode == "I" and depth == "peak"):
        if depth == "shift":
            gray = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
        else:
            array = np.asarray(image, dtype=np.float64)
            peak = array.max() if array.size and array.max() > 255 else 255.0
            gray = (array * (255.0 / peak)).round().astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode in ("I", "F"):
        gray = np.clip(np.asarray(image, dtype=np.float64), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")  # palette transparency must go through RGBA; alpha is then dropped
    try:
        rgb = image if image.mode == "RGB" else image.convert("RGB")
    except (OSError, ValueError) as err:
        raise InvalidInputError(f"{name} has mode {mode!r}, which cannot be converted to RGB") from err
    array = np.asarray(rgb, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:
        raise InvalidInputError(f"{name} decoded to shape {array.shape}, expected (H, W, 3)")
    return np.ascontiguousarray(array)


def load_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """Load an image as RGB, converting its mode with :func:`pil_to_rgb` (16-bit: high byte, as OpenCV).

    Args:
        path: Image file (JPEG, PNG, ...).

    Returns:
        (H, W, 3) uint8 array, RGB channel order, C-contiguous.

    Raises:
        DataNotFoundError: The file does not exist.
        DatasetError: The file is corrupt, truncated or of an unusable mode.

    Example:
        >>> load_rgb("JPEGImages/2007_000033.jpg").shape  # doctest: +SKIP
        (366, 500, 3)
    """
    image = _open(path, "image")
    try:
        return pil_to_rgb(image, depth="shift", name=f"image {path}")
    except InvalidInputError as err:
        raise DatasetError(str(err)) from err


def load_label(path: str | os.PathLike[str]) -> np.ndarray:
    """Load a segmentation mask as class indices.

    Args:
        path: Mask file (PNG): 0 background, 1..N classes, 255 ignore.

    Returns:
        (H, W) uint8 array.

    Raises:
        DataNotFoundError: The file does not exist.
        DatasetError: The file is corrupt, truncated, has values above 255, or is a colour image.

    Example:
        >>> load_label("SegmentationClassAug/2007_000033.png").dtype  # doctest: +SKIP
        dtype('uint8')
    """
    image = _open(path, "mask")
    mode = image.mode
    if mode in ("L", "P"):
        return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
    if mode == "1":
        return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
    if mode == "LA":
        return np.ascontiguousarray(np.asarray(image)[:, :, 0].astype(np.uint8))
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 255):
            raise DatasetError(f"mask {path} holds values outside 0..255 (mode {mode}); "
                               "class masks must be 8-bit class indices")
        return np.ascontiguousarray(values.astype(np.uint8))
    if mode in ("RGB", "RGBA"):
        values = np.asarray(image)[:, :, :3]
        if np.array_equal(values[:, :, 0], values[:, :, 1]) and np.array_equal(values[:, :, 0], values[:, :, 2]):
            return np.ascontiguousarray(values[:, :, 0].astype(np.uint8))
        raise DatasetError(f"mask {path} is a colour image; expected a single-channel PNG of class indices "
                           "(0 background, 1..N classes, 255 ignore)")
    raise DatasetError(f"mask {path} has unsupported mode {mode!r}; expected a single-channel PNG of class indices")


def load_pair(image_path: str | os.PathLike[str], label_path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Load an image and its mask and check that they have the same size.

    Returns:
        ``(image (H, W, 3) uint8, label (H, W) uint8)``.

    Raises:
        DataNotFoundError: Either file does not exist.
        DatasetError: Either file is broken, or their sizes differ.
    """
    image = load_rgb(image_path)
    label = load_label(label_path)
    check_same_size(image, label, image_path, label_path)
    return image, label


def check_same_size(image: np.ndarray, label: np.ndarray, image_path: str | os.PathLike[str],
                    label_path: str | os.PathLike[str]) -> None:
    """Check that a mask has its image's size: (H, W, 3) and (H, W).

    Raises:
        DatasetError: naming both files and their sizes.

    Example:
        >>> check_same_size(np.zeros((4, 6, 3)), np.zeros((4, 6)), "a.jpg", "a.png")
    """
    if tuple(image.shape[:2]) != tuple(label.shape[:2]):
        raise DatasetError(f"mask {label_path} is {label.shape[0]}x{label.shape[1]} (HxW) but image {image_path} "
                           f"is {image.shape[0]}x{image.shape[1]}; they must have the same size: fix the mask or "
                           "the image/mask pairing in the list")


class DataRoot:
    """Images and labels by key under a data root, without lists: what the engine needs of a dataset.

    ``clipprior verify --sample`` recomputes cached episodes with it; the keys are the cache's
    (paths relative to the root; absolute paths are taken as they are).

    Args:
        root: The data root.

    Example:
        >>> DataRoot("/data/VOC2012").path("JPEGImages/a.jpg").as_posix()
        '/data/VOC2012/JPEGImages/a.jpg'
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()

    def __repr__(self) -> str:
        return f"DataRoot({str(self.root)!r})"

    def path(self, key: str | os.PathLike[str]) -> Path:
        """Absolute path of a key."""
        path = Path(key)
        return path if path.is_absolute() else self.root / path

    def load_image(self, key: str | os.PathLike[str]) -> np.ndarray:
        """(H, W, 3) uint8 RGB (see :func:`load_rgb`)."""
        return load_rgb(self.path(key))

    def load_label(self, key: str | os.PathLike[str]) -> np.ndarray:
        """(H, W) uint8 class ids (see :func:`load_label`)."""
        return load_label(self.path(key))

    def image_size(self, key: str | os.PathLike[str]) -> tuple[int, int]:
        """(height, width) from the image's header."""
        return image_size(self.path(key))


def fss_mask(label: np.ndarray, class_id: int) -> np.ndarray:
    """A label map -> the few-shot mask of ``class_id``: 1 on the class, 255 where ignored, 0 elsewhere.

    The binarisation of every support label (the episode's class is the foreground; the other
    classes are background; the ignore value stays).

    Example:
        >>> fss_mask(np.array([[3, 7], [255, 0]], np.uint8), 7).tolist()
        [[0, 1], [255, 0]]
    """
    return np.where(label == class_id, 1, np.where(label == 255, 255, 0)).astype(np.uint8)
