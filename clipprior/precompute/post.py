"""Stage 4, post-processing: PIR on the query passes' Grad-CAM, VVP between features already computed.

VVP is a cosine-max between a query's layer features and each support's features on its
foreground cells; support features are kept only while a scheduled episode still needs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from clipprior.config import PriorConfig
from clipprior.precompute.plan import SupportKey
from clipprior.priors import minmax_normalize, pir

__all__ = ["Cells", "QueryFeatures", "SupportStore", "best_match", "episode_vvp", "refine"]

QueryFeatures = tuple[torch.Tensor, torch.Tensor, tuple[int, int]]  # (L, n, D) features, (L, n) norms, grid


def refine(cam: torch.Tensor, attention: torch.Tensor, config: PriorConfig) -> torch.Tensor:
    """PIR of a batch of Grad-CAMs: (P, h, w), (P, n, n) -> refined (P, h, w)."""
    return pir(cam, attention, config=config).refined


@dataclass(frozen=True)
class Cells:
    """A support's features on its foreground cells: what the cosine-max of VVP reads.

    Cells outside the mask carry zeroed features in :func:`~clipprior.priors.vvp_from_features`,
    whose cosine with any query patch is 0; keeping only the foreground cells and clamping the
    maximum at 0 when such cells exist gives the same maps with a fraction of the memory and work.

    Attributes:
        features: (L, f, D) float32 features of the f foreground cells.
        norms: (L, f) their L2 norms.
        has_background: Whether some cell of the grid lies outside the mask.
    """

    features: torch.Tensor
    norms: torch.Tensor
    has_background: bool

    @classmethod
    def from_grid(cls, features: torch.Tensor, mask: torch.Tensor) -> Cells:
        """(L, m, D) features and (m,) bool mask of the support's grid -> its foreground cells."""
        mask = mask.bool()
        cells = features.float()[:, mask].contiguous()
        return cls(cells, cells.norm(dim=-1), bool((~mask).any()))


def best_match(query: torch.Tensor, query_norms: torch.Tensor, cells: Cells, eps: float) -> torch.Tensor:
    """Per query patch, the best cosine among a support's cells: (L, n, D), (L, n) -> (L, n)."""
    if cells.features.shape[1] == 0:
        return torch.zeros(query_norms.shape, device=query_norms.device)
    sim = torch.bmm(query, cells.features.transpose(1, 2))
    sim.div_(query_norms[:, :, None] * cells.norms[:, None, :] + eps)
    best = sim.amax(dim=-1)
    return best.clamp_min(0.0) if cells.has_background else best


class SupportStore:
    """Support features (foreground cells) kept while episodes still need them (reference counted)."""

    def __init__(self, uses: dict[SupportKey, int]) -> None:
        self.remaining = dict(uses)
        self.features: dict[SupportKey, Cells] = {}

    def take(self, key: SupportKey) -> Cells:
        """The features of ``key`` for one more episode; dropped after its last scheduled use."""
        value = self.features[key]
        self.remaining[key] -= 1
        if self.remaining[key] <= 0:
            del self.features[key]
        return value


def episode_vvp(episode: Any, query_features: dict[str, QueryFeatures], store: SupportStore,
                config: PriorConfig) -> torch.Tensor:
    """(L*K, h, w) VVP of one episode, layer-major, from cached query and support features.

    The same maps as :func:`~clipprior.priors.vvp_from_features`, computed on the supports'
    foreground cells only (see :class:`Cells`).
    """
    feats, norms, grid = query_features[episode.query_image]
    maps = []
    for image, label in episode.supports:
        cells = store.take((image, label, int(episode.class_id)))
        best = best_match(feats, norms, cells, config.vvp_eps).reshape(-1, *grid)
        maps.append(minmax_normalize(best, config.vvp_eps) if config.vvp_normalize else best)
    stacked = torch.stack(maps, dim=1)  # (L, K, h, w): layer-major, shots inner
    return stacked.reshape(-1, *grid)
