"""Stage 5, write: finished priors off the device and into the cache writer.

The writer commits a chunk's entries in one atomic segment (see :class:`clipprior.cache.CacheWriter`);
the engine commits after each chunk, so a killed run resumes at the first unfinished chunk.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from clipprior.precompute.plan import PrecomputeStats, QueryWork, Writer

__all__ = ["write_vtp"]


def write_vtp(writer: Writer, works: Sequence[QueryWork], sizes: Sequence[tuple[int, int]],
              pairs: Sequence[tuple[int, int]], cam: torch.Tensor, refined: torch.Tensor,
              stats: PrecomputeStats) -> None:
    """Write the images and the missing VTP pairs of a query batch: cam, refined (P, h, w)."""
    for p, (b, c) in enumerate(pairs):
        work = works[b]
        if not writer.has_image(work.image):
            writer.add_image(work.image, *sizes[b])
        if not writer.has_vtp(work.image, c):
            writer.add_vtp(work.image, c, cam[p].cpu().numpy(), refined[p].cpu().numpy())
            stats.vtp_written += 1
