"""Stage 3, passes: the CLIP passes of a loaded batch, on the model's device.

A query pass gives the Grad-CAM of every (image, class) pair of the batch (one backward), the
attention PIR refines it with and the layer features of VVP; a support pass gives the masked
features of each (support image, class) on its foreground cells.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from clipprior._vision import patch_grid
from clipprior.config import PriorConfig
from clipprior.errors import InvalidInputError
from clipprior.model import ClipBundle
from clipprior.precompute.load import QueryBatch, SupportBatch
from clipprior.preprocess import vvp_inputs
from clipprior.priors import TextFeatures, VTPResult, layer_features, support_features, vtp_pass

__all__ = [
    "BatchLimit",
    "auto_batch_size",
    "is_out_of_memory",
    "query_bytes_per_image",
    "query_features",
    "query_pass",
    "support_pass",
]


def query_pass(clip: ClipBundle, batch: QueryBatch, text: TextFeatures, config: PriorConfig) -> VTPResult:
    """One query pass over a loaded batch: (B, 3, H, W) pixels -> VTP of its P pairs, (P, h, w).

    The result carries the PIR attention of each pair and, when VVP uses CLIP's own normalisation,
    the VVP layer features of each image (L, n, D) from the same pass.
    """
    pixels = batch.pixels.to(clip.device, clip.dtype, non_blocking=True)  # page-locked on CUDA: no wait
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


def _tokens(clip: ClipBundle, size: tuple[int, int]) -> int:
    patch = clip.patch_size
    return (size[0] // patch) * (size[1] // patch) + 1


# Host CPUs: a batch beyond ~1k tokens leaves the caches and is slower per image (ViT-B/16 at
# 384x512, 768 tokens: 1.11 s/image at batch 1, 1.24 s at batch 8; benchmarks/NOTES.md section D).
CPU_TOKENS_PER_BATCH = 1024
# CUDA: the share of the device's total memory a query batch may plan on, and the most images.
CUDA_MEMORY_SHARE = 0.4
MAX_AUTO_BATCH = 256


def query_bytes_per_image(clip: ClipBundle, size: tuple[int, int]) -> int:
    """Estimated peak device bytes one image adds to a query pass at resized ``size``.

    The attention PIR keeps (one T x T map per image, float32) and the layer's transient scores
    (heads x T x T), plus the activations of the last layer run with gradients and the kept VVP
    features (a few dozen T x D tensors). Deliberately generous: an out-of-memory error at
    ``--batch-size auto`` halves the batch anyway.
    """
    vision = clip.model.vision_model.config
    tokens = _tokens(clip, size)
    heads, width = int(vision.num_attention_heads), int(vision.hidden_size)
    element = torch.finfo(clip.dtype).bits // 8
    return 4 * tokens * tokens * (heads + 4) + tokens * width * (4 * 16 + element * 48)


def auto_batch_size(clip: ClipBundle, size: tuple[int, int]) -> int:
    """Images per batch at ``--batch-size auto`` for images resized to ``size``.

    On a CUDA device, from the device's *total* memory (not the free memory, which changes from
    run to run: the batches, and so the numbers, must not) and :func:`query_bytes_per_image`; on
    a CPU, as many images as fit in :data:`CPU_TOKENS_PER_BATCH` tokens (at least one).

    Example:
        >>> auto_batch_size(clip, (384, 512))  # doctest: +SKIP
        1
    """
    if clip.device.type == "cuda":
        total = torch.cuda.get_device_properties(clip.device).total_memory
        fit = int(CUDA_MEMORY_SHARE * total // query_bytes_per_image(clip, size))
    else:
        fit = CPU_TOKENS_PER_BATCH // _tokens(clip, size)
    return max(1, min(MAX_AUTO_BATCH, fit))


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an error is the device running out of memory."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


class BatchLimit:
    """The most images a pass may take; at ``--batch-size auto``, halved when the device runs out of memory.

    Args:
        fixed: The fixed batch size (an out-of-memory error is then the user's to fix), or ``None``
            for ``"auto"``.
        say: Called with the line that tells a halving.

    A planned batch larger than the limit runs as consecutive parts; nothing of a part that failed
    was kept or written, so no finished work is lost and no entry is written twice.
    """

    def __init__(self, fixed: int | None, say: Callable[[str], None]) -> None:
        self.fixed = fixed
        self.size: int | None = None
        self.say = say

    def run(self, batch: Any, fn: Callable[[Any], None]) -> None:
        """``fn`` on ``batch`` (a :class:`QueryBatch` or :class:`SupportBatch`), in parts of at most the limit."""
        for part in batch.split(self.size) if self.size else [batch]:
            self._run_part(part, fn)

    def _run_part(self, part: Any, fn: Callable[[Any], None]) -> None:
        try:
            fn(part)
            return
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            if self.fixed is not None:
                raise InvalidInputError(f"the device ran out of memory on a batch of {len(part)} images at "
                                        f"--batch-size {self.fixed}; use a smaller --batch-size or --batch-size auto"
                                        ) from exc
            if len(part) == 1:
                raise InvalidInputError("the device ran out of memory on a single image; free device memory, "
                                        "or use a lower precision (--dtype) or a smaller model") from exc
        half = max(1, len(part) // 2)  # out of the except block: the error's frames (and tensors) are gone
        self.size = half if self.size is None else min(self.size, half)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.say(f"out of device memory on a batch of {len(part)} images: halved to {half} "
                 "for the rest of the run (finished work is kept)")
        for sub in part.split(half):
            self._run_part(sub, fn)
