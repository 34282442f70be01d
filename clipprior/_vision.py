"""A layer-by-layer driver of CLIP's vision tower.

transformers' ``CLIPVisionModel.forward`` resizes position embeddings bicubically; PI-CLIP resizes
them bilinearly. This driver uses the model's own modules (patch embedding, ``pre_layrnorm``, each
``CLIPEncoderLayer``, ``post_layernorm``) and only replaces the position-grid resize, so every
weight and every kernel is transformers'.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from clipprior.errors import InvalidInputError

__all__ = ["embed", "patch_grid", "position_embedding", "run_layer", "run_layer_rows", "vision_layers"]


def patch_grid(vision_config: object, height: int, width: int) -> tuple[int, int]:
    """The patch grid (gh, gw) of an image of ``height`` x ``width`` pixels.

    Raises:
        InvalidInputError: if the image is smaller than one patch.
    """
    patch = int(vision_config.patch_size)  # type: ignore[attr-defined]
    if height < patch or width < patch:
        raise InvalidInputError(
            f"image of {height}x{width} pixels is smaller than one {patch}x{patch} patch; "
            f"resize it to at least {patch}x{patch}"
        )
    return height // patch, width // patch


def position_embedding(vision_model: nn.Module, grid: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Position embeddings for a (gh, gw) patch grid: (1 + gh*gw, D).

    The pretrained square grid is resized with ``mode`` (align_corners=False) in float32; the
    class-token embedding is kept as is.
    """
    weight = vision_model.embeddings.position_embedding.weight
    cls_pos, patch_pos = weight[:1], weight[1:]
    side = round(patch_pos.shape[0] ** 0.5)
    if (side, side) == tuple(grid):
        return weight
    grid_pos = patch_pos.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(grid_pos, size=grid, mode=mode, align_corners=False)
    resized = resized.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(weight.dtype)
    return torch.cat([cls_pos, resized], dim=0)


def embed(vision_model: nn.Module, pixel_values: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Tokens entering the first encoder layer: (B, 3, H, W) -> (B, 1 + gh*gw, D)."""
    embeddings = vision_model.embeddings
    weight = embeddings.patch_embedding.weight
    grid = patch_grid(vision_model.config, pixel_values.shape[-2], pixel_values.shape[-1])
    patches = embeddings.patch_embedding(pixel_values.to(device=weight.device, dtype=weight.dtype))
    patches = patches.flatten(2).transpose(1, 2)
    cls = embeddings.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
    tokens = torch.cat([cls, patches], dim=1) + position_embedding(vision_model, grid, mode)
    return vision_model.pre_layrnorm(tokens)


def vision_layers(vision_model: nn.Module) -> nn.ModuleList:
    """The encoder layers of a ``CLIPVisionModel`` (or a ``CLIPModel.vision_model``)."""
    return vision_model.encoder.layers


@lru_cache(maxsize=8)
def _needs_causal_mask_arg(layer_type: type) -> bool:
    params = inspect.signature(layer_type.forward).parameters
    return "causal_attention_mask" in params


def run_layer(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Run one ``CLIPEncoderLayer`` without masks, across transformers 4.x and 5.x signatures."""
    legacy = _needs_causal_mask_arg(type(layer))
    out = layer(hidden, None, None) if legacy else layer(hidden, attention_mask=None)
    return out[0] if isinstance(out, tuple) else out


def run_layer_rows(layer: nn.Module, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """One ``CLIPEncoderLayer`` for some tokens only: (1, T, D) + (R,) token indices -> (1, R, D).

    Keys and values come from every token, as in the full layer; the queries, the attention
    output, the MLP and the residuals only for ``rows``. The layer's own modules do the work
    (``layer_norm1``, the attention's projections, ``layer_norm2``, ``mlp``) with sdpa attention
    at the layer's scale, so the rows equal those of :func:`run_layer` up to float rounding.
    """
    attn = layer.self_attn
    heads, head_dim = int(attn.num_heads), int(attn.head_dim)
    normed = layer.layer_norm1(hidden)
    picked = normed.index_select(1, rows)

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], heads, head_dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(attn.q_proj(picked)), split(attn.k_proj(normed)),
                                         split(attn.v_proj(normed)), scale=float(attn.scale))
    out = attn.out_proj(out.transpose(1, 2).reshape(picked.shape[0], picked.shape[1], -1))
    out = hidden.index_select(1, rows) + out
    return out + layer.mlp(layer.layer_norm2(out))
