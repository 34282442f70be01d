"""The one bilinear resize of prior maps, behind ``priors.resize_maps``, ``cache.resize_prior`` and ``viz.resize_map``.

Example:
    >>> resize_bilinear(torch.ones(2, 3, 4), (6, 8)).shape
    torch.Size([2, 6, 8])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["resize_bilinear"]


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
