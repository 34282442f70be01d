"""Stage 3, passes: the CLIP passes of a loaded batch, on the model's device.

A query pass gives the Grad-CAM of every (image, class) pair of the batch (one backward), the
attention PIR refines it with and the layer features of VVP; a support pass gives the masked
features of each (support image, class) on its foreground cells.
"""

from __future__ import annotations

import torch

from clipprior._vision import patch_grid
from clipprior.config import PriorConfig
from clipprior.model import ClipBundle
from clipprior.precompute.load import QueryBatch, SupportBatch
from clipprior.preprocess import vvp_inputs
from clipprior.priors import TextFeatures, VTPResult, layer_features, support_features, vtp_pass

__all__ = ["query_features", "query_pass", "support_pass"]


def query_pass(clip: ClipBundle, batch: QueryBatch, text: TextFeatures, config: PriorConfig) -> VTPResult:
    """One query pass over a loaded batch: (B, 3, H, W) pixels -> VTP of its P pairs, (P, h, w).

    The result carries the PIR attention of each pair and, when VVP uses CLIP's own normalisation,
    the VVP layer features of each image (L, n, D) from the same pass.
    """
    pixels = batch.pixels.to(clip.device, clip.dtype)
    index = torch.tensor([b for b, _ in batch.pairs], dtype=torch.long)
    return vtp_pass(clip, pixels, index, batch.class_sets, text, config, return_attention=True,
                    return_features=config.vvp_shares_query_pass)


def query_features(clip: ClipBundle, batch: QueryBatch, out: VTPResult, b: int, config: PriorConfig
                   ) -> tuple[torch.Tensor, tuple[int, int]]:
    """(L, n, D) VVP features of image ``b`` of the batch and their (h, w) grid.

    From the query pass, or from a pass of their own when VVP normalises pixels differently (the
    ``official`` preset) or runs in the official geometry (the image stretched to a square).
    """
    if out.features is not None:
        return out.features[b], (int(out.cam.shape[-2]), int(out.cam.shape[-1]))
    if batch.vvp_images is None:
        raise RuntimeError("the query batch kept no VVP images although VVP needs a pass of its own")
    qpix = vvp_inputs(batch.vvp_images[b], None, clip.patch_size, config)[0][None]
    grid = patch_grid(clip.model.config.vision_config, qpix.shape[-2], qpix.shape[-1])
    return layer_features(clip, qpix, config.vvp_layers, config)[0], grid


def support_pass(clip: ClipBundle, batch: SupportBatch, config: PriorConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked support pass: (B, 3, H, W), (B, H, W) -> features (B, L, m, D) and grid masks (B, m)."""
    return support_features(clip, batch.pixels, batch.labels, config, foreground_only=True)
