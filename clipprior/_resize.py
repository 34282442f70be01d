"""Resizing and padding of (..., H, W) planes, in one place.

:func:`resize_bilinear` is behind ``priors.resize_maps``, ``cache.resize_prior``,
``viz.resize_map``, the trainers' stretch in :mod:`clipprior.preprocess` and the image and prior
side of :mod:`clipprior.transforms`; :func:`resize_nearest` resizes label maps in both (OpenCV's
floor rule in ``preprocess``, pixel centres in ``transforms``); :func:`pad` pads with a given
value (the trainers' mean for images, ``ignore_label`` for labels, ``prior_fill`` for priors).

Example:
    >>> resize_bilinear(torch.ones(2, 3, 4), (6, 8)).shape
    torch.Size([2, 6, 8])
    >>> resize_nearest(torch.tensor([[1.0, 2.0]]), (2, 4)).tolist()
    [[1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0]]
    >>> pad(torch.ones(1, 1, 2), 0, 1, 1, 0, fill=255.0).tolist()
    [[[255.0, 1.0, 1.0], [255.0, 255.0, 255.0]]]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["pad", "resize_bilinear", "resize_nearest"]


def resize_bilinear(x: torch.Tensor, size: tuple[int, int], *, align_corners: bool = False) -> torch.Tensor:
    """Bilinearly resize the last two dims: (..., h, w) -> (..., H, W), in float32.

    With ``align_corners=False`` pixels are areas with half-pixel centres (OpenCV's INTER_LINEAR);
    PI-CLIP's own code resizes its priors with ``True``. Each (h, w) plane is resized on its own.
    A map already of the target size is returned as it is (not copied, not cast).

    Args:
        x: (h, w), (C, h, w), (B, C, h, w) or any (..., h, w) tensor; size and rank are the
            callers' to check.
        size: Target (H, W).
        align_corners: Passed to :func:`torch.nn.functional.interpolate`.

    Returns:
        (..., H, W) float32 tensor (or ``x`` itself when already (..., H, W)).
    """
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    lead = tuple(x.shape[:-2])
    planes = x.float().reshape(1, -1, *x.shape[-2:]) if x.ndim < 4 else x.float().reshape(-1, *x.shape[-3:])
    out = F.interpolate(planes, size=size, mode="bilinear", align_corners=align_corners)
    return out.reshape(lead + size)


def resize_nearest(x: torch.Tensor, size: tuple[int, int], *, exact: bool = True) -> torch.Tensor:
    """Nearest-neighbour resize of the last two dims: (..., h, w) -> (..., H, W), for label maps.

    With ``exact`` (the default) each target pixel takes the source pixel whose area holds its
    centre (``nearest-exact``), so labels keep the geometry of bilinearly resized images and
    priors (:mod:`clipprior.transforms`). With ``exact=False`` target pixel ``i`` takes source
    pixel ``floor(i * h / H)``, as OpenCV's ``INTER_NEAREST`` resizes the FSS trainers' labels (a
    shift of up to half a source pixel towards the top-left; :mod:`clipprior.preprocess`).
    Integer maps go through float32 (ids below 2**24 survive exactly) and come back in their dtype.
    A map already of the target size is returned as it is.

    Args:
        x: (h, w), (C, h, w) or any (..., h, w) tensor.
        size: Target (H, W).
        exact: Pixel-centre rule (``True``) or OpenCV's floor rule (``False``).

    Returns:
        (..., H, W) tensor of ``x``'s dtype (or ``x`` itself when already (..., H, W)).
    """
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    lead = tuple(x.shape[:-2])
    planes = x.reshape(1, -1, *x.shape[-2:])
    if not planes.is_floating_point():
        planes = planes.float()
    out = F.interpolate(planes, size=size, mode="nearest-exact" if exact else "nearest")
    return out.reshape(lead + size).to(x.dtype)


def pad(x: torch.Tensor, top: int, bottom: int, left: int, right: int,
        fill: torch.Tensor | float | Sequence[float] = 0.0) -> torch.Tensor:
    """Pad the last two dims with a constant: (..., H, W) -> (..., top + H + bottom, left + W + right).

    Args:
        x: (H, W), (C, H, W) or any (..., H, W) tensor.
        top: Rows added above.
        bottom: Rows added below.
        left: Columns added on the left.
        right: Columns added on the right.
        fill: One value, or one per channel (C values for a (C, H, W) ``x``).

    Returns:
        A new tensor of ``x``'s dtype and device.
    """
    *lead, h, w = x.shape
    out = x.new_empty((*lead, h + top + bottom, w + left + right))
    value = torch.as_tensor(fill, dtype=x.dtype, device=x.device)
    out[...] = value.reshape(-1, 1, 1) if value.ndim else value
    out[..., top:top + h, left:left + w] = x
    return out
