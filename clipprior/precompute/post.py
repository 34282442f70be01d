"""Stage 4, post-processing: PIR on the query passes' Grad-CAM, VVP between features already computed.

VVP is a cosine-max between a query's layer features and each support's features on its
foreground cells; support features are kept only while a scheduled episode still needs them.
"""

from __future__ import annotations

from typing import Any

import torch

from clipprior.config import PriorConfig
from clipprior.precompute.plan import SupportKey
from clipprior.priors import SupportCells, pir, vvp_from_cells

__all__ = ["QueryFeatures", "SupportStore", "episode_vvp", "refine"]

QueryFeatures = tuple[torch.Tensor, torch.Tensor, tuple[int, int]]  # (L, n, D) features, (L, n) norms, grid


def refine(cam: torch.Tensor, attention: torch.Tensor, config: PriorConfig) -> torch.Tensor:
    """PIR of a batch of Grad-CAMs: (P, h, w), (P, n, n) -> refined (P, h, w)."""
    return pir(cam, attention, config=config).refined


class SupportStore:
    """Support features (foreground cells) kept while episodes still need them (reference counted)."""

    def __init__(self, uses: dict[SupportKey, int]) -> None:
        self.remaining = dict(uses)
        self.features: dict[SupportKey, SupportCells] = {}

    def take(self, key: SupportKey) -> SupportCells:
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
    foreground cells only (see :class:`~clipprior.priors.SupportCells`).
    """
    feats, norms, grid = query_features[episode.query_image]
    cells = SupportCells.cat([store.take((image, label, int(episode.class_id))) for image, label in episode.supports])
    return vvp_from_cells(feats, norms, cells, grid, eps=config.vvp_eps, normalize_maps=config.vvp_normalize)
