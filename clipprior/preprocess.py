"""Image preparation for the priors: RGB conversion, resizing to the patch grid, normalisation.

Example:
    >>> import numpy as np
    >>> image = np.zeros((173, 251, 3), np.uint8)
    >>> preprocess_query(image, patch_size=16).shape
    torch.Size([3, 176, 256])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from clipprior._resize import resize_bilinear, resize_nearest
from clipprior.config import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, PriorConfig
from clipprior.data.images import pil_to_rgb
from clipprior.errors import InvalidInputError

__all__ = [
    "ImageLike",
    "check_finite",
    "normalize",
    "pixel_statistics",
    "preprocess_query",
    "preprocess_support",
    "resize_to_patch_multiple",
    "stretch",
    "stretch_label",
    "to_rgb_array",
    "vtp_image",
    "vvp_inputs",
]

ImageLike = Image.Image | np.ndarray | torch.Tensor
"""An image: a PIL image (any mode), an (H, W[, 1|3|4]) array, or a (3, H, W) / (H, W, 3) tensor."""

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """Any image (:data:`ImageLike`) as an (H, W, 3) uint8 RGB array: the one RGB converter.

    PIL images of every mode are converted by :func:`clipprior.data.images.pil_to_rgb`, the
    converter :func:`~clipprior.data.load_rgb` uses for files, with ``depth="peak"``: a 16-bit (or
    ``I``) image is scaled to its peak when it exceeds 8 bits, where a file keeps its high byte.
    Arrays may be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), uint8 (or float in [0, 1]); tensors
    the same, or channels-first (1 or 3, H, W).

    Raises:
        InvalidInputError: for other shapes or dtypes, non-finite float pixels, or a PIL mode that
            cannot be converted to RGB.

    Example:
        >>> to_rgb_array(Image.new("L", (4, 2))).shape
        (2, 4, 3)
    """
    if isinstance(image, Image.Image):
        return pil_to_rgb(image, depth="peak")
    if isinstance(image, torch.Tensor):
        tensor = image.detach().to("cpu")
        if tensor.ndim == 3 and tensor.shape[0] in (1, 3) and tensor.shape[-1] not in (1, 3, 4):
            tensor = tensor.permute(1, 2, 0)
        image = tensor.numpy()
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise InvalidInputError(
            f"image array of shape {array.shape} is not an image; pass (H, W), (H, W, 3) or (H, W, 4)"
        )
    array = array[..., :3]
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InvalidInputError("image array contains NaN or Inf; clean the pixels first")
        return np.ascontiguousarray((np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8))
    raise InvalidInputError(f"image array of dtype {array.dtype} is not supported; pass uint8 or float in [0, 1]")


def resize_to_patch_multiple(image: ImageLike, patch_size: int, resample: str = "bicubic") -> np.ndarray:
    """Resize an image up to (p*ceil(H/p), p*ceil(W/p)) pixels: (H, W, 3) -> (Hr, Wr, 3) uint8.

    Raises:
        InvalidInputError: if the image is not an image or is smaller than one patch (it would be
            blown up to a single-cell grid, on which no prior is meaningful).
    """
    rgb = to_rgb_array(image)
    height, width = rgb.shape[:2]
    if height == 0 or width == 0:
        raise InvalidInputError(f"image of {height}x{width} pixels is empty")
    if height < patch_size or width < patch_size:
        raise InvalidInputError(
            f"image of {height}x{width} pixels is smaller than one {patch_size}x{patch_size} patch; "
            f"resize it to at least {patch_size}x{patch_size}"
        )
    target = (patch_size * math.ceil(height / patch_size), patch_size * math.ceil(width / patch_size))
    if target == (height, width):
        return rgb
    try:
        filt = _RESAMPLE[resample]
    except KeyError:
        raise InvalidInputError(f"resample={resample!r} is not valid; choose one of {list(_RESAMPLE)}") from None
    return np.asarray(Image.fromarray(rgb).resize((target[1], target[0]), filt))


def pixel_statistics(norm: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Mean and std (on the [0, 1] scale) of ``"clip"`` or ``"imagenet"`` normalisation."""
    if norm == "clip":
        return CLIP_MEAN, CLIP_STD
    if norm == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    raise InvalidInputError(f"pixel normalisation {norm!r} is not valid; choose 'clip' or 'imagenet'")


def normalize(rgb: np.ndarray | torch.Tensor, norm: str = "clip") -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32, scaled to [0, 1] and normalised.

    Example:
        >>> normalize(np.zeros((2, 2, 3), np.uint8)).shape
        torch.Size([3, 2, 2])
    """
    mean, std = pixel_statistics(norm)
    tensor = torch.from_numpy(np.array(rgb, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)
    mean_t = torch.tensor(mean).view(3, 1, 1)
    std_t = torch.tensor(std).view(3, 1, 1)
    return (tensor - mean_t) / std_t


def preprocess_query(image: ImageLike, patch_size: int, resample: str = "bicubic", norm: str = "clip") -> torch.Tensor:
    """An image as the VTP pass sees it: (H, W, 3) -> (3, Hr, Wr) float32.

    Resized (PIL ``resample``) up to a multiple of the patch size, scaled to [0, 1], normalised with
    CLIP's statistics, exactly as the official PI-CLIP code prepares the query.

    Raises:
        InvalidInputError: if the image is not an image (see :func:`to_rgb_array`) or is smaller
            than one patch.

    Example:
        >>> preprocess_query(np.zeros((20, 40, 3), np.uint8), patch_size=16).shape
        torch.Size([3, 32, 48])
    """
    return normalize(resize_to_patch_multiple(image, patch_size, resample), norm)


def preprocess_support(image: ImageLike, label: np.ndarray, patch_size: int, resample: str = "bicubic",
                       norm: str = "clip") -> tuple[torch.Tensor, torch.Tensor]:
    """A support image and its label as the VVP pass sees them: (H, W, 3), (H, W) -> (3, Hr, Wr), (Hr, Wr).

    The image is prepared as :func:`preprocess_query` prepares a query (resized up to a multiple of
    the patch size, normalised with ``norm``); the label follows it with a nearest-neighbour resize
    (torch ``nearest``) when the size changes. One image at a time: supports of a batch may differ
    in size; stack the outputs of equal-sized ones for :func:`clipprior.priors.support_features`.

    Args:
        image: The support image (any PIL mode is converted to RGB).
        label: (H, W) integer labels of that image (1 = target, 0 = background, 255 = ignore).
        patch_size: The model's patch size (``clip.patch_size``).
        resample: PIL filter of the image resize.
        norm: ``"clip"`` or ``"imagenet"`` pixel statistics.

    Returns:
        (3, Hr, Wr) float32 pixels and (Hr, Wr) int64 labels.

    Raises:
        InvalidInputError: if the label's size differs from the image's, or the image is unusable.

    Example:
        >>> pixels, labels = preprocess_support(np.zeros((20, 40, 3), np.uint8), np.ones((20, 40)), 16)
        >>> tuple(pixels.shape), tuple(labels.shape)
        ((3, 32, 48), (32, 48))
    """
    rgb = to_rgb_array(image)
    label = np.asarray(label)
    if label.shape != rgb.shape[:2]:
        raise InvalidInputError(f"support mask of size {label.shape} does not match its image of size "
                                f"{rgb.shape[:2]}; pass the mask of that image")
    resized = resize_to_patch_multiple(rgb, patch_size, resample)
    lab = torch.from_numpy(label.astype(np.int64))
    if resized.shape[:2] != rgb.shape[:2]:
        lab = resize_nearest(lab, resized.shape[:2], exact=False)
    return normalize(resized, norm), lab


def check_finite(name: str, tensors: torch.Tensor | Sequence[torch.Tensor]) -> None:
    """Raise :class:`InvalidInputError` naming ``name`` if a tensor holds NaN or Inf."""
    items = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    for tensor in items:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise InvalidInputError(f"{name} contains NaN or Inf values; check the input pixels/normalisation")


# ----------------------------------------------------------------------------------------------
# Geometry: where the priors are computed (PriorConfig.geometry)


def stretch(image: ImageLike, size: int) -> torch.Tensor:
    """The FSS trainers' validation resize: (H, W, 3) RGB -> (3, size, size) float32 on the 0-255 scale.

    Bilinear with half-pixel centres and no antialiasing on the float image, as OpenCV's
    ``INTER_LINEAR`` resizes the trainers' float32 arrays (PFENet-family ``Resize``). The aspect ratio
    is not kept.

    Example:
        >>> stretch(np.zeros((20, 40, 3), np.uint8), 32).shape
        torch.Size([3, 32, 32])
    """
    rgb = to_rgb_array(image)
    tensor = torch.from_numpy(np.array(rgb, dtype=np.float32)).permute(2, 0, 1)
    if rgb.shape[:2] == (size, size):
        return tensor
    return resize_bilinear(tensor, (size, size))


def stretch_label(label: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """A label map stretched like :func:`stretch`, nearest neighbour: (H, W) -> (size, size) int64.

    The source pixel of output pixel i is floor(i * H / size), as OpenCV's ``INTER_NEAREST``.
    """
    lab = torch.from_numpy(np.array(label, dtype=np.int64)) if not isinstance(label, torch.Tensor) else label.long()
    if tuple(lab.shape) == (size, size):
        return lab
    return resize_nearest(lab, (size, size), exact=False)


def _normalize_float(pixels: torch.Tensor, norm: str) -> torch.Tensor:
    """(3, H, W) float on the 0-255 scale -> normalised, as the trainers' ``Normalize(mean*255, std*255)``."""
    mean, std = pixel_statistics(norm)
    return (pixels / 255.0 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def vtp_image(image: ImageLike, patch_size: int, config: PriorConfig) -> np.ndarray:
    """The RGB image the VTP pass sees, (H0, W0, 3) -> (Hr, Wr, 3) uint8, Hr = p * ceil(H0 / p).

    ``geometry="native"``: the image resized up to a multiple of the patch size
    (:func:`resize_to_patch_multiple`). ``geometry="official"``: the official validation path --
    the image stretched to ``geometry_size`` squared (:func:`stretch`), cast to uint8 by truncation,
    then resized (``config.vtp_resample``, PIL) to the same (Hr, Wr): the official code's VTP input
    when it knows the original size (PASCAL, from the VOC annotation).

    Raises:
        InvalidInputError: if the image is not an image or is smaller than one patch.

    Example:
        >>> from clipprior.config import PriorConfig
        >>> vtp_image(np.zeros((20, 40, 3), np.uint8), 16, PriorConfig(geometry="official")).shape
        (32, 48, 3)
    """
    if config.geometry == "native":
        return resize_to_patch_multiple(image, patch_size, config.vtp_resample)
    rgb = to_rgb_array(image)
    height, width = rgb.shape[:2]
    resize_to_patch_multiple(np.zeros((min(height, patch_size), min(width, patch_size), 3), np.uint8),
                             patch_size)  # the same "smaller than one patch" check as native
    square = stretch(rgb, config.geometry_size).permute(1, 2, 0).to(torch.uint8).numpy()
    target = (patch_size * math.ceil(height / patch_size), patch_size * math.ceil(width / patch_size))
    filt = _RESAMPLE.get(config.vtp_resample, Image.Resampling.BICUBIC)
    return np.asarray(Image.fromarray(square).resize((target[1], target[0]), filt))


def vvp_inputs(image: ImageLike, label: np.ndarray | None, patch_size: int, config: PriorConfig
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The pixels (and label) VVP sees for one image: (H0, W0, 3) -> (3, H, W) float32, (H, W) int64.

    ``geometry="native"``: resized up to a multiple of the patch size (labels nearest).
    ``geometry="official"``: stretched to ``geometry_size`` squared (:func:`stretch`,
    :func:`stretch_label`), the trainers' tensors. Either way normalised with
    ``config.vvp_pixel_norm``.

    Raises:
        InvalidInputError: if the label's size differs from the image's, or the image is unusable.

    Example:
        >>> from clipprior.config import PriorConfig
        >>> pix, lab = vvp_inputs(np.zeros((20, 40, 3), np.uint8), np.ones((20, 40)), 16,
        ...                       PriorConfig(geometry="official", geometry_size=64))
        >>> tuple(pix.shape), tuple(lab.shape)
        ((3, 64, 64), (64, 64))
    """
    rgb = to_rgb_array(image)
    if label is not None:
        label = np.asarray(label)
        if label.shape != rgb.shape[:2]:
            raise InvalidInputError(f"support mask of size {label.shape} does not match its image of size "
                                    f"{rgb.shape[:2]}; pass the mask of that image")
    if config.geometry == "official":
        size = config.geometry_size
        if size < patch_size:
            raise InvalidInputError(f"geometry_size={size} is smaller than one {patch_size}x{patch_size} patch")
        pixels = _normalize_float(stretch(rgb, size), config.vvp_pixel_norm)
        return pixels, None if label is None else stretch_label(label, size)
    resized = resize_to_patch_multiple(rgb, patch_size, config.vtp_resample)
    pixels = normalize(resized, config.vvp_pixel_norm)
    if label is None:
        return pixels, None
    lab = torch.from_numpy(label.astype(np.int64))
    if resized.shape[:2] != rgb.shape[:2]:
        lab = resize_nearest(lab, resized.shape[:2], exact=False)
    return pixels, lab
