"""Stored VVP features (``--store features``): how they are packed into maps and turned back into VVP.

A features cache keeps, per query image, the patch features of the VVP layers and, per (support
image, class), the masked features of the support's foreground cells, so that a reader computes the
VVP of *any* episode -- planned or not -- with the same cosine-max as the engine.

Storage: each cell's feature vector is L2-normalised (per layer) and stored as float16, as a
``(L * D, h, w)`` map on the image's VVP patch grid (channel ``l * D + d``: layer ``l`` of
``config.vvp_layers``, component ``d``). Support features are zero outside the support's mask (the
zeros compress to nearly nothing); the mask itself is a second ``(h, w)`` map. Cosines of unit
float16 vectors carry an error of about ``2 * sqrt(D) * 2**-11`` at worst and ~1e-4 in practice;
see ``docs/cache-format.md`` for the measured figure.

Example:
    >>> import torch
    >>> feats = torch.randn(2, 6, 4)  # (L, n, D) on a 2x3 grid
    >>> stored = feature_map(feats, (2, 3))
    >>> tuple(stored.shape), tuple(unpack_features(stored, 2).shape)
    ((8, 2, 3), (2, 6, 4))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from clipprior.config import PriorConfig
from clipprior.errors import InvalidInputError

__all__ = ["feature_map", "unpack_features", "vvp_from_stored"]


def feature_map(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """VVP-layer features as a stored map: (L, n, D) -> (L * D, h, w) float32 unit vectors.

    Each cell's vector is L2-normalised per layer (zero vectors, the cells outside a support's
    mask, stay zero); channel ``l * D + d`` is layer ``l``, component ``d``. Runs on the features'
    device; the writer stores the map as float16.

    Raises:
        InvalidInputError: if ``n != h * w``.
    """
    f = features.detach().float()
    norms = f.norm(dim=-1, keepdim=True)
    unit = torch.where(norms > 0, f / norms.clamp_min(1e-30), torch.zeros_like(f))
    layers, n, dim = unit.shape
    if n != grid[0] * grid[1]:
        raise InvalidInputError(f"features have {n} cells but the grid {tuple(grid)} has {grid[0] * grid[1]}")
    return unit.permute(0, 2, 1).reshape(layers * dim, *grid)


def unpack_features(stored: torch.Tensor, layers: int) -> torch.Tensor:
    """A stored feature map back to features: (L * D, h, w) -> (L, h * w, D) float32."""
    channels, h, w = stored.shape
    if channels % layers:
        raise InvalidInputError(f"a stored feature map of {channels} channels cannot hold {layers} layers")
    return stored.float().reshape(layers, channels // layers, h * w).transpose(1, 2)


def vvp_from_stored(query: torch.Tensor, supports: Sequence[tuple[torch.Tensor, torch.Tensor]],
                    config: PriorConfig) -> torch.Tensor:
    """VVP of one episode from stored features: query (L*D, h, w), K x (support (L*D, hs, ws), mask) -> (L*K, h, w).

    The cosine-max of the engine (:func:`clipprior.priors.vvp_from_cells`) on the supports'
    foreground cells, so a stored-features VVP equals the precomputed one up to the float16
    storage of the features. Runs on the device of ``query``.

    Raises:
        InvalidInputError: if the shapes disagree or there are no supports.
    """
    from clipprior.priors import SupportCells, vvp_from_cells

    if not supports:
        raise InvalidInputError("an episode needs at least one support to compute VVP")
    layers = len(config.vvp_layers)
    grid = (int(query.shape[-2]), int(query.shape[-1]))
    q = unpack_features(query, layers)
    cells = SupportCells.cat([SupportCells.from_grid(unpack_features(feats.to(q.device), layers)[None],
                                                     mask.to(q.device).reshape(1, -1) > 0.5)
                              for feats, mask in supports])
    return vvp_from_cells(q, q.norm(dim=-1), cells, grid, eps=config.vvp_eps, normalize_maps=config.vvp_normalize)
