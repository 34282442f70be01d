"""Joint geometric transforms of the PFENet family: image, label(s) and prior maps move together.

The few-shot segmentation trainers of the PFENet family (PFENet, BAM, HDMNet, PI-CLIP) augment
every training episode with ``RandScale``, ``RandRotate``, ``RandomGaussianBlur``,
``RandomHorizontalFlip`` and a crop or a resize to 473x473, on (H, W, 3) float images and
(H, W) uint8 labels, with OpenCV. PI-CLIP computes its priors *after* that augmentation, on the
transformed query. A trainer that reads cached priors gets them on the untransformed image, so it
must move them through the same geometry: this module does that, without OpenCV, for any number of
prior channels (1-shot: 4, 5-shot: 12), in torch.

Every transform takes ``(image, label, prior=None, *, rng=None)`` and returns a :class:`Sample`
``(image, label, prior)``:

* ``image``: (H, W, C) numpy array (uint8 or float, as the trainers read it) -- bilinear,
  padded with ``padding`` (the trainers' ImageNet mean, ``PFENET_MEAN``), blurred by
  :class:`RandomGaussianBlur`; the output keeps the input's dtype.
* ``label``: (H, W) or (H, W, L) numpy array -- several label planes (the FSS label and BAM's
  ``label_b``) move together; nearest neighbour, padded with ``ignore_label`` (255).
* ``prior``: optional; a numpy array (H, W) or (H, W, C), or a torch tensor (H, W) or (C, H, W)
  as :class:`~clipprior.PriorCache` returns it; bilinear, padded with ``prior_fill`` (0), never
  blurred (PI-CLIP computes its priors on the unblurred image). The output has the input's kind
  and layout, float32.

Interpolation follows OpenCV's conventions, which the trainers use: pixel centres at half-integers
(``align_corners=False``), ``INTER_LINEAR`` without antialiasing, and rotations about ``(W / 2, H / 2)`` with a
positive angle turning the content counter-clockwise, like ``cv2.getRotationMatrix2D``.

Randomness comes only from the ``rng`` argument (a :class:`numpy.random.Generator` or an int
seed), so a sample is reproducible from its seed; :class:`Compose` passes one generator through
every transform in order. The draws follow the trainers' order (probability first, then the
parameter), not their values (they draw from Python's ``random``).

One deliberate difference: labels are resized by nearest neighbour on pixel centres (the source
pixel under each target pixel's centre), where OpenCV's ``INTER_NEAREST`` takes
``floor(x * scale)`` and so shifts the trainers' labels by up to half a source pixel against their
images. Here image, labels and priors share one geometry.

Example:
    >>> import numpy as np, torch
    >>> image = np.zeros((100, 120, 3), np.float32)
    >>> label = np.zeros((100, 120), np.uint8); label[20:60, 30:90] = 1
    >>> prior = torch.zeros(12, 100, 120)                        # 5-shot: [VTP, VTP, VVP x 10]
    >>> aug = train_transform("pfenet", size=64)
    >>> image, label, prior = aug(image, label, prior, rng=0)
    >>> image.shape, label.shape, tuple(prior.shape)
    ((64, 64, 3), (64, 64), (12, 64, 64))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import correlate1d

from clipprior._resize import pad, resize_bilinear, resize_nearest
from clipprior.errors import InvalidInputError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PFENET_MEAN",
    "PFENET_STD",
    "Compose",
    "Crop",
    "RandRotate",
    "RandScale",
    "RandomGaussianBlur",
    "RandomHorizontalFlip",
    "RandomVerticalFlip",
    "Resize",
    "Sample",
    "TestResize",
    "ToTensor",
    "train_transform",
    "val_transform",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PFENET_MEAN = tuple(255 * m for m in IMAGENET_MEAN)
"""The trainers' padding of images: ImageNet's mean on the 0..255 scale."""
PFENET_STD = tuple(255 * s for s in IMAGENET_STD)

Rng = np.random.Generator | int | None


class Sample(NamedTuple):
    """A transformed ``(image, label, prior)``; ``prior`` is ``None`` when none was given."""

    image: Any
    label: Any
    prior: Any


# ------------------------------------------------------------------------------------------ state


@dataclass
class _State:
    """The sample as float32 (C, H, W) tensors while transforms run, and how to give it back."""

    image: torch.Tensor  # (3, H, W)
    label: torch.Tensor  # (L, H, W)
    prior: torch.Tensor | None  # (C, H, W)
    image_dtype: np.dtype
    label_dtype: np.dtype
    label_2d: bool
    prior_kind: str  # "none", "numpy-hw", "numpy-hwc", "torch-hw", "torch-chw"
    tensors: bool = False
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[-2]), int(self.image.shape[-1])

    @classmethod
    def build(cls, image: Any, label: Any, prior: Any) -> _State:
        if not isinstance(image, np.ndarray) or image.ndim not in (2, 3):
            raise InvalidInputError(f"image must be an (H, W, C) or (H, W) numpy array, got "
                                    f"{type(image).__name__} {getattr(image, 'shape', '')}")
        if not isinstance(label, np.ndarray) or label.ndim not in (2, 3):
            raise InvalidInputError(f"label must be an (H, W) or (H, W, L) numpy array, got "
                                    f"{type(label).__name__} {getattr(label, 'shape', '')}")
        img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        img = img[None] if img.ndim == 2 else img.permute(2, 0, 1)
        lab = torch.from_numpy(np.ascontiguousarray(label, dtype=np.float32))
        lab = lab[None] if lab.ndim == 2 else lab.permute(2, 0, 1)
        pri, kind = _prior_in(prior)
        size = tuple(img.shape[-2:])
        for name, x in (("label", lab), ("prior", pri)):
            if x is not None and tuple(x.shape[-2:]) != size:
                raise InvalidInputError(f"{name} is {tuple(x.shape[-2:])} (H, W) but the image is {size}; "
                                        "read the prior at the image's size (size='original')")
        return cls(img.contiguous(), lab.contiguous(), pri, image.dtype, label.dtype, label.ndim == 2, kind)

    def output(self) -> Sample:
        if self.tensors:
            image = self.image
            if self.mean is not None:
                mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
                std = torch.tensor(self.std or (1.0,) * len(self.mean), dtype=torch.float32).view(-1, 1, 1)
                image = (image - mean) / std
            label = self.label.round().long()
            label = label[0] if self.label_2d else label
            prior = None if self.prior is None else (self.prior[0] if self.prior_kind in _FLAT else self.prior)
            return Sample(image.contiguous(), label.contiguous(), prior)
        image = self.image.permute(1, 2, 0).numpy()
        if self.image_dtype == np.uint8:
            image = np.clip(np.rint(image), 0, 255)
        image = np.ascontiguousarray(image.astype(self.image_dtype, copy=False))
        label = self.label.permute(1, 2, 0).numpy()
        label = np.ascontiguousarray((label[..., 0] if self.label_2d else label).astype(self.label_dtype))
        return Sample(image, label, _prior_out(self.prior, self.prior_kind))


_FLAT = ("numpy-hw", "torch-hw")  # prior kinds given without a channel axis


def _prior_in(prior: Any) -> tuple[torch.Tensor | None, str]:
    if prior is None:
        return None, "none"
    if isinstance(prior, torch.Tensor):
        if prior.ndim == 2:
            return prior.detach().float().cpu()[None].contiguous(), "torch-hw"
        if prior.ndim == 3:
            return prior.detach().float().cpu().contiguous(), "torch-chw"
    elif isinstance(prior, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(prior, dtype=np.float32))
        if x.ndim == 2:
            return x[None], "numpy-hw"
        if x.ndim == 3:
            return x.permute(2, 0, 1).contiguous(), "numpy-hwc"
    raise InvalidInputError(f"prior must be a numpy (H, W) / (H, W, C) array or a torch (H, W) / (C, H, W) tensor, "
                            f"got {type(prior).__name__} {getattr(prior, 'shape', '')}")


def _prior_out(prior: torch.Tensor | None, kind: str) -> Any:
    if prior is None:
        return None
    if kind == "torch-hw":
        return prior[0].contiguous()
    if kind == "torch-chw":
        return prior.contiguous()
    array = prior.permute(1, 2, 0).numpy()
    return np.ascontiguousarray(array[..., 0] if kind == "numpy-hw" else array)


def _as_rng(rng: Rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or (isinstance(rng, (int, np.integer)) and not isinstance(rng, bool)):
        return np.random.default_rng(rng)
    raise InvalidInputError(f"rng must be a numpy Generator, an int seed or None, got {rng!r}")


def _fill(value: float | Sequence[float], channels: int, what: str) -> torch.Tensor:
    values = [float(value)] * channels if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != channels:
        raise InvalidInputError(f"{what} has {len(values)} values but the image has {channels} channels")
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1)


# ----------------------------------------------------------------------------------- primitives


def _warp(x: torch.Tensor, grid: torch.Tensor, mode: str, fill: torch.Tensor | float) -> torch.Tensor:
    """Sample (C, H, W) at ``grid`` (1, h, w, 2), constant ``fill`` outside (per channel or scalar)."""
    fill_t = torch.as_tensor(fill, dtype=torch.float32)
    if fill_t.ndim == 0:
        fill_t = fill_t.view(1, 1, 1)
    shifted = x - fill_t
    out = F.grid_sample(shifted[None], grid, mode=mode, padding_mode="zeros", align_corners=False)[0]
    return out + fill_t


# OpenCV's fixed kernels for sizes up to 7 with sigma=0 (cv2.getGaussianKernel)
_SMALL_KERNELS = {
    1: (1.0,), 3: (0.25, 0.5, 0.25), 5: (0.0625, 0.25, 0.375, 0.25, 0.0625),
    7: (0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125),
}


def _gaussian_kernel(radius: int) -> np.ndarray:
    if radius in _SMALL_KERNELS:
        return np.array(_SMALL_KERNELS[radius])
    sigma = 0.3 * ((radius - 1) * 0.5 - 1) + 0.8  # OpenCV's sigma for sigma=0
    t = np.arange(radius, dtype=np.float64) - (radius - 1) / 2
    k = np.exp(-(t ** 2) / (2 * sigma ** 2))
    return k / k.sum()


def _blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur of (C, H, W), mirrored borders without repeating the edge (OpenCV's default)."""
    k = _gaussian_kernel(radius)
    y = correlate1d(x.numpy(), k, axis=-1, mode="mirror")
    y = correlate1d(y, k, axis=-2, mode="mirror")
    return torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))


class _Transform:
    """Base class: ``t(image, label, prior=None, *, rng=None) -> Sample``."""

    def __call__(self, image: Any, label: Any, prior: Any = None, *, rng: Rng = None) -> Sample:
        state = _State.build(image, label, prior)
        self._apply(state, _as_rng(rng))
        return state.output()

    def _apply(self, state: _State, rng: np.random.Generator) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class _Padded(_Transform):
    """A transform that exposes pixels outside the input: image, label and prior fills."""

    def __init__(self, padding: float | Sequence[float], ignore_label: int, prior_fill: float) -> None:
        self.padding = padding if isinstance(padding, (int, float)) else tuple(float(v) for v in padding)
        self.ignore_label = int(ignore_label)
        self.prior_fill = float(prior_fill)

    def _fills(self, state: _State) -> tuple[torch.Tensor, float, float]:
        return _fill(self.padding, state.image.shape[0], "padding"), float(self.ignore_label), self.prior_fill


def _pair(value: Sequence[float], name: str, *, positive: bool = False) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name} must be a pair (min, max), got {value!r}") from None
    if low > high or (positive and low <= 0):
        raise InvalidInputError(f"{name} must satisfy {'0 < ' if positive else ''}min <= max, got {value!r}")
    return low, high


def _size(value: int | Sequence[int], name: str = "size") -> tuple[int, int]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (int(value), int(value))
    try:
        h, w = (int(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name} must be an int or a pair (height, width), got {value!r}") from None
    if h < 1 or w < 1:
        raise InvalidInputError(f"{name} must be positive, got {value!r}")
    return h, w


def _check_p(p: float) -> float:
    if not 0.0 <= float(p) <= 1.0:
        raise InvalidInputError(f"probability p must be in [0, 1], got {p!r}")
    return float(p)


# ---------------------------------------------------------------------------------- transforms


class Compose(_Transform):
    """Run transforms in order with one generator; inputs are converted once, at both ends.

    Args:
        transforms: Transforms of this module.

    Example:
        >>> aug = Compose([RandScale((0.9, 1.1)), RandomHorizontalFlip(), Resize(473)])
        >>> image, label, prior = aug(image, label, prior, rng=rng)  # doctest: +SKIP
    """

    def __init__(self, transforms: Sequence[_Transform]) -> None:
        self.transforms = list(transforms)
        for t in self.transforms:
            if not isinstance(t, _Transform):
                raise InvalidInputError(f"Compose takes transforms of clipprior.transforms, got {t!r}")

    def _apply(self, state: _State, rng: np.random.Generator) -> None:
        for t in self.transforms:
            t._apply(state, rng)

    def __repr__(self) -> str:
        return "Compose([" + ", ".join(repr(t) for t in self.transforms) + "])"


class Resize(_Transform):
    """Stretch to ``size`` (height, width): PI-CLIP's training and validation resize to 473x473.

    Args:
        size: Int or (height, width).
    """

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _size(size)

    def _apply(self, state: _State, rng: np.random.Generator) -> None:
        state.image = resize_bilinear(state.image, self.size)
        state.label = resize_nearest(state.label, self.size)
        if state.prior is not None:
            state.prior = resize_bilinear(state.prior, self.size)


class RandScale(_Transform):
    """Rescale by a factor drawn uniformly in ``scale`` (the trainers: 0.9..1.1).

    With ``aspect_ratio=(a, b)`` a ratio r is drawn in [a, b] and the width is scaled by
    ``s * sqrt(r)``, the height by ``s / sqrt(r)``. The new size is ``round(W * fx), round(H * fy)``.

    Args:
        scale: (min, max), positive.
        aspect_ratio: Optional (min, max), positive.
    """

    def __init__(self, scale: Sequence[float], aspect_ratio: Sequence[float] | None = None) -> None:
        self.scale = _pair(scale, "scale", positive=True)
        self.aspect_ratio = None if aspect_ratio is None else _pair(aspect_ratio, "aspect_ratio", positive=True)

    def _apply(self, state: _State, rng: np.random.Generator) -> None:
        s = self.scale[0] + (self.scale[1] - self.scale[0]) * rng.random()
        r = 1.0
        if self.aspect_ratio is not None:
            r = math.sqrt(self.aspect_ratio[0] + (self.aspect_ratio[1] - self.aspect_ratio[0]) * rng.random())
        h, w = state.size
        size = (max(1, round(h * s / r)), max(1, round(w * s * r)))
        Resize(size)._apply(state, rng)


class RandRotate(_Padded):
    """With probability ``p``, rotate by an angle drawn uniformly in ``rotate`` degrees (the trainers: -10..10).

    The rotation turns about ``(W / 2, H / 2)``, counter-clockwise for positive angles, and keeps
    the size; what comes in from outside is ``padding`` in the image, ``ignore_label`` in the
    labels and ``prior_fill`` in the priors (the same for every prior channel).

    Args:
        rotate: (min, max) angle in degrees.
        padding: Image fill, one value or one per channel (the trainers: ``PFENET_MEAN``).
        ignore_label: Label fill (255).
        p: Probability of rotating (0.5).
        prior_fill: Prior fill (0).
    """

    def __init__(self, rotate: Sequence[float], padding: float | Sequence[float] = PFENET_MEAN,
                 ignore_label: int = 255, p: float = 0.5, prior_fill: float = 0.0) -> None:
        super().__init__(padding, ignore_label, prior_fill)
        self.rotate = _pair(rotate, "rotate")
        self.p = _check_p(p)

    def _apply(self, state: _State, rng: np.random.Generator) -> None:
        if rng.random() >= self.p:
            return
        angle = self.rotate[0] + (self.rotate[1] - self.rotate[0]) * rng.random()
        _rotate(state, angle, *self._fills(state))


def _rotation_grid(size: tuple[int, int], angle: float) -> torch.Tensor:
    """The ``grid_sample`` grid (1, H, W, 2) of ``cv2.getRotationMatrix2D((W / 2, H / 2), angle, 1)``.

    OpenCV's forward map sends a source pixel ``p`` (pixel centres at integers) to
    ``R (p - c) + c`` with ``R = [[cos, sin], [-sin, cos]]``; each output pixel samples the source at
    the inverse image, expressed in the half-pixel normalised coordinates of ``grid_sample``
    (``x_n = (2 x + 1) / W - 1``).
    """
    h, w = size
    a, b = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    cx, cy = w / 2, h / 2
    # source pixel = R^T (target pixel - c) + c, as a 3x3 affine in pixel coordinates
    inverse = np.array([[a, -b, cx - a * cx + b * cy], [b, a, cy - b * cx - a * cy], [0, 0, 1]])
    to_norm = np.array([[2 / w, 0, 1 / w - 1], [0, 2 / h, 1 / h - 1], [0, 0, 1]])
    theta = to_norm @ inverse @ np.linalg.inv(to_norm)
    theta_t = torch.tensor(theta[:2], dtype=torch.float32)[None]
    return F.affine_grid(theta_t, [1, 1, h, w], align_corners=False)


def _rotate(state: _State, angle: float, image_fill: torch.Tensor, label_fill: float, prior_fill: float) -> None:
    grid = _rotation_grid(state.size, angle)
    state.image = _warp(state.image, grid, "bilinear", image_fill)
    state.label = _warp(state.label, grid, "nearest", label_fill)
    if state.prior is not None:
        state.prior = _warp(state.prior, grid, "bilinear", prior_fill)


class RandomGaussianBlur(_Transform):
    """With probability ``p``, blur the image only (``cv2.GaussianBlur(image, (radius, radius), 0)``).

    Labels and priors are left alone: PI-CLIP computes its priors on the unblurred image. The
    kernel is OpenCV's for ``sigma=0``: its fixed tables up to 7 (equal to ``cv2.GaussianBlur``
    within float rounding), the sigma formula beyond (OpenCV rounds those kernels to 1/256).

    Args:
        radius: Odd kernel size (5).
        p: Probability (0.5).
    """

    def __init__(self, radius: int = 5, p: float = 0.5) -> None:
        if int(radius) < 1 or int(radius) % 2 == 0:
            raise InvalidInputError(f"radius must be a positive odd kernel size, got {radius!r}")
        self.radius = int(radius)
        self.p = _check_p(p)

    def _apply(self, state: _State, rng: np.random.Generator) -> None:
        if rng.random() < self.p:
            state.image = _blur(state.image, self.radius)


class _RandomFlip(_Transform):
    """With probability ``p``, mirror image, label and prior along :attr:`dim`."""

    dim: int  # -1: left-right, -2: top-bottom

    def __init__(self, p: float = 0.5) -> None:
        self.p = _check_p(p)

    def _apply(self, state: _State, rng: np.random.Generator) -> None:
        if rng.random() < self.p:
            state.image = state.image.flip(self.dim)
            state.label = state.label.flip(self.dim)
            if state.prior is not None:
                state.prior = state.prior.flip(self.dim)


class RandomHorizontalFlip(_RandomFlip):
    """With probability ``p`` (0.5), mirror left-right."""

    dim = -1


class RandomVerticalFlip(_RandomFlip):
    """With probability ``p`` (0.5), mirror top-bottom."""

    dim = -2


class Crop(_Padded):
    """PFENet's crop to ``size``: pad what is smaller (split evenly, the extra pixel at the bottom/right), then cut.

    ``crop_type="rand"`` draws the offset uniformly (training), ``"center"`` takes the centre
    (validation). As in the trainers, a random crop that keeps less than ``keep_foreground`` (0.85)
    of the foreground (label value 1 in the first label plane) is redrawn, at most ``retries``
    times; ``keep_foreground=None`` turns that off.

    Args:
        size: Int or (height, width).
        crop_type: ``"rand"`` or ``"center"``.
        padding: Image fill (``PFENET_MEAN``).
        ignore_label: Label fill (255).
        prior_fill: Prior fill (0).
        keep_foreground: Fraction of the foreground a random crop must keep, or ``None``.
        retries: Most redraws.
    """

    def __init__(self, size: int | Sequence[int], crop_type: str = "rand",
                 padding: float | Sequence[float] = PFENET_MEAN, ignore_label: int = 255,
                 prior_fill: float = 0.0, keep_foreground: float | None = 0.85,
                 retries: int = 30) -> None:
        super().__init__(padding, ignore_label, prior_fill)
        self.size = _size(size)
        if crop_type not in ("rand", "center"):
            raise InvalidInputError(f"crop_type must be 'rand' or 'center', got {crop_type!r}")
        self.crop_type = crop_type
        self.keep_foreground = keep_foreground
        self.retries = int(retries)

    def _apply(self, state: _State, rng: np.random.Generator) -> None:
        ch, cw = self.size
        h, w = state.size
        pad_h, pad_w = max(ch - h, 0), max(cw - w, 0)
        if pad_h or pad_w:
            image_fill, label_fill, prior_fill = self._fills(state)
            box = (pad_h // 2, pad_h - pad_h // 2, pad_w // 2, pad_w - pad_w // 2)
            state.image = pad(state.image, *box, image_fill)
            state.label = pad(state.label, *box, label_fill)
            if state.prior is not None:
                state.prior = pad(state.prior, *box, prior_fill)
            h, w = state.size
        if self.crop_type == "center":
            top, left = (h - ch) // 2, (w - cw) // 2
        else:
            foreground = state.label[0] == 1
            total = int(foreground.sum())
            for attempt in range(self.retries + 1):
                top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
                if self.keep_foreground is None or attempt == self.retries:
                    break
                if int(foreground[top:top + ch, left:left + cw].sum()) >= self.keep_foreground * total:
                    break
        state.image = state.image[:, top:top + ch, left:left + cw].contiguous()
        state.label = state.label[:, top:top + ch, left:left + cw].contiguous()
        if state.prior is not None:
            state.prior = state.prior[:, top:top + ch, left:left + cw].contiguous()


class TestResize(_Padded):
    """The trainers' test-time letterbox (``test_Resize``): fit in ``size`` x ``size``, top-left, padded.

    An image larger than ``size`` on its longer side is scaled so that side is ``size`` (the other
    ``int(side * ratio)``), then both sides are floored to a multiple of ``multiple`` (8); a smaller
    image keeps its size. The result is pasted at the top-left of a ``size`` x ``size`` canvas
    filled with ``padding`` (the trainers: 0, before normalisation), ``ignore_label`` and
    ``prior_fill``.

    Args:
        size: Canvas side (473).
        multiple: Sides are floored to a multiple of this (8).
        padding: Image fill (0).
        ignore_label: Label fill (255).
        prior_fill: Prior fill (0).
    """

    def __init__(self, size: int = 473, multiple: int = 8, padding: float | Sequence[float] = 0.0,
                 ignore_label: int = 255, prior_fill: float = 0.0) -> None:
        super().__init__(padding, ignore_label, prior_fill)
        self.size = _size(size)[0]
        self.multiple = int(multiple)
        if self.multiple < 1:
            raise InvalidInputError(f"multiple must be >= 1, got {multiple!r}")

    def content_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the image inside the canvas.

        Example:
            >>> TestResize(473).content_size(375, 500)
            (352, 472)
        """
        if max(height, width) <= self.size:
            return height, width
        if height >= width:
            new_h, new_w = self.size, int(width * (self.size / height))
        else:
            new_h, new_w = int(height * (self.size / width)), self.size
        m = self.multiple
        return max(m, new_h // m * m), max(m, new_w // m * m)

    def _apply(self, state: _State, rng: np.random.Generator) -> None:
        h, w = self.content_size(*state.size)
        Resize((h, w))._apply(state, rng)
        image_fill, label_fill, prior_fill = self._fills(state)
        box = (0, self.size - h, 0, self.size - w)
        state.image = pad(state.image, *box, image_fill)
        state.label = pad(state.label, *box, label_fill)
        if state.prior is not None:
            state.prior = pad(state.prior, *box, prior_fill)


TestResize.__test__ = False  # type: ignore[attr-defined]  # not a pytest class


class ToTensor(_Transform):
    """Return torch tensors, the trainers' ``ToTensor`` + ``Normalize``; put it last.

    The image becomes (C, H, W) float32, ``(x - mean) / std`` when ``mean`` is given (the trainers:
    ``PFENET_MEAN`` / ``PFENET_STD`` on 0..255 images); labels (H, W) or (L, H, W) int64; the prior
    (C, H, W) float32 (or (H, W) when it came without channels).

    Args:
        mean: Per-channel mean, or ``None`` for no normalisation.
        std: Per-channel std (ones when ``None``).
    """

    def __init__(self, mean: Sequence[float] | None = PFENET_MEAN, std: Sequence[float] | None = PFENET_STD) -> None:
        self.mean = None if mean is None else tuple(float(v) for v in mean)
        self.std = None if std is None else tuple(float(v) for v in std)

    def _apply(self, state: _State, rng: np.random.Generator) -> None:
        state.tensors, state.mean, state.std = True, self.mean, self.std


# ------------------------------------------------------------------------------------- presets

_TRAINERS = ("pi-clip", "pfenet")


def train_transform(trainer: str = "pi-clip", size: int = 473, *, scale: Sequence[float] = (0.9, 1.1),
                    rotate: Sequence[float] = (-10, 10), to_tensor: bool = False) -> Compose:
    """The training augmentation of a PFENet-family trainer.

    ``"pi-clip"``: RandScale, RandRotate (mean / 255 padding, p = 0.5), RandomGaussianBlur,
    RandomHorizontalFlip, Resize to ``size`` (PI-CLIP's ``train.py``). ``"pfenet"`` (PFENet, BAM,
    HDMNet): the same with a random :class:`Crop` of ``size`` instead of the resize.

    Args:
        trainer: ``"pi-clip"`` or ``"pfenet"``.
        size: Output side (473).
        scale: RandScale range (the configs: 0.9..1.1).
        rotate: RandRotate range in degrees (the configs: -10..10).
        to_tensor: Append :class:`ToTensor` (normalised tensors out).

    Raises:
        InvalidInputError: for an unknown trainer.

    Example:
        >>> train_transform("pfenet").transforms[-1].size
        (473, 473)
    """
    if trainer not in _TRAINERS:
        raise InvalidInputError(f"unknown trainer {trainer!r}; use one of {', '.join(_TRAINERS)}")
    last: _Transform = Resize(size) if trainer == "pi-clip" else Crop(size, "rand")
    steps: list[_Transform] = [RandScale(scale), RandRotate(rotate), RandomGaussianBlur(), RandomHorizontalFlip(), last]
    if to_tensor:
        steps.append(ToTensor())
    return Compose(steps)


def val_transform(trainer: str = "pi-clip", size: int = 473, *, to_tensor: bool = False) -> Compose:
    """The validation geometry: PI-CLIP stretches to ``size`` (``resized_val``), PFENet letterboxes.

    ``"pfenet"`` uses :class:`TestResize` (the trainers' ``test_Resize``).

    Example:
        >>> val_transform("pfenet").transforms
        [TestResize(padding=0.0, ignore_label=255, prior_fill=0.0, size=473, multiple=8)]
    """
    if trainer not in _TRAINERS:
        raise InvalidInputError(f"unknown trainer {trainer!r}; use one of {', '.join(_TRAINERS)}")
    steps: list[_Transform] = [Resize(size) if trainer == "pi-clip" else TestResize(size)]
    if to_tensor:
        steps.append(ToTensor())
    return Compose(steps)
