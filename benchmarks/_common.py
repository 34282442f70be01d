"""Helpers shared by the benchmark scripts: CLIPs with seeded random weights of the real architectures.

No checkpoint can be downloaded where the benchmarks run, and the cost of a pass does not depend on
the weights, so every benchmark builds its CLIP here. clipprior itself is imported only inside the
functions: ``bench_pipeline.py`` may point ``sys.path`` at another checkout (``CLIPPRIOR_ROOT``)
before its first clipprior import.

Example:
    >>> clip = random_clip("tiny", "cpu", "fp32")  # doctest: +SKIP
    >>> clip.patch_size
    16
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import CLIPConfig, CLIPModel

__all__ = ["DTYPES", "MODELS", "random_clip", "tiny_config", "vit_b16_config"]

#: ``--dtype`` names of the benchmarks.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def vit_b16_config() -> CLIPConfig:
    """The real ViT-B/16 CLIP architecture (OpenAI's weights have exactly these shapes)."""
    return CLIPConfig(
        text_config={"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8,
                     "max_position_embeddings": 77, "hidden_act": "quick_gelu"},
        vision_config={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                       "num_attention_heads": 12, "patch_size": 16, "image_size": 224, "hidden_act": "quick_gelu"},
        projection_dim=512,
    )


def tiny_config() -> CLIPConfig:
    """A CLIP small enough for CI (same patch size, so the same grids)."""
    return CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 1,
                     "max_position_embeddings": 77, "hidden_act": "quick_gelu"},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
                       "patch_size": 16, "image_size": 64, "hidden_act": "quick_gelu"},
        projection_dim=16,
    )


#: The architectures, by ``--model`` name.
MODELS: dict[str, Callable[[], CLIPConfig]] = {"vit-b16": vit_b16_config, "tiny": tiny_config}


def random_clip(kind: str, device: str, dtype: str, seed: int = 0) -> Any:
    """A CLIP of architecture ``kind`` with seeded random weights, sdpa attention, in eval mode.

    Returns:
        A :class:`clipprior.model.ClipBundle`.
    """
    from clipprior.model import ClipBundle, default_tokenizer

    torch.manual_seed(seed)
    model = CLIPModel._from_config(MODELS[kind](), attn_implementation="sdpa")
    model = model.to(device=device, dtype=DTYPES[dtype]).eval()
    return ClipBundle(model=model, tokenizer=default_tokenizer(), source=f"random {kind} (seed {seed})",
                      checksum=f"random-{kind}-{seed}")
