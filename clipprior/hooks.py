"""Hooks on CLIP's vision layers: attention maps and Grad-CAM activations.

Both recorders are context managers. Hooks are registered on entry, inside ``try``/``finally``, and
removed on exit whatever happens; nothing global is touched, so a model leaves every call with the
same (empty) set of hooks it came in with.

- :class:`AttentionRecorder` reads the outputs of a layer's own ``q_proj`` and ``k_proj`` and
  computes ``softmax(Q K^T / sqrt(d))`` itself, in float32. It therefore works with every
  ``attn_implementation`` (``sdpa`` and flash kernels return no weights) and adds no projection:
  the model computes Q and K anyway, the recorder only re-does the small score product.
- :class:`ActivationRecorder` keeps a module's output and, through a tensor hook, the gradient that
  flows back into it (the Grad-CAM activation and its gradient).

Example:
    >>> layers = model.vision_model.encoder.layers  # doctest: +SKIP
    >>> with AttentionRecorder(layers[-8:], num_heads=12) as rec:  # doctest: +SKIP
    ...     model.vision_model(pixel_values)
    >>> rec.mean_attention().shape  # doctest: +SKIP
    torch.Size([1, 197, 197])
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["ActivationRecorder", "AttentionRecorder", "count_hooks"]


def count_hooks(module: nn.Module) -> int:
    """Number of forward / pre-forward / backward hooks on ``module`` and all its submodules.

    Example:
        >>> count_hooks(nn.Linear(2, 2))
        0
    """
    total = 0
    for sub in module.modules():
        # (The *_with_kwargs dicts only flag some of these hooks; counting them would count twice.)
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            hooks = getattr(sub, name, None)
            if hooks:
                total += len(hooks)
    return total


class _HookSet:
    """Registers hooks on enter and removes them all on exit."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def _register(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self) -> _HookSet:
        try:
            self._register()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._remove()

    def _remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()


class AttentionRecorder(_HookSet):
    """Head-averaged attention probabilities of some encoder layers, averaged over those layers.

    Args:
        layers: The ``CLIPEncoderLayer`` modules to record (each must have ``self_attn.q_proj`` and
            ``self_attn.k_proj``).
        num_heads: Attention heads per layer.

    Attributes:
        count: How many layer maps were accumulated (per batch row).
    """

    def __init__(self, layers: Sequence[nn.Module], num_heads: int) -> None:
        super().__init__()
        self.layers = list(layers)
        self.num_heads = num_heads
        self._queries: dict[int, torch.Tensor] = {}
        self._sum: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self.count = 0

    def __enter__(self) -> AttentionRecorder:
        super().__enter__()
        return self

    def _register(self) -> None:
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            self._handles.append(attn.q_proj.register_forward_hook(self._make_q_hook(index)))
            self._handles.append(attn.k_proj.register_forward_hook(self._make_k_hook(index)))

    def _make_q_hook(self, index: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            self._queries[index] = output.detach()

        return hook

    def _make_k_hook(self, index: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            query = self._queries.pop(index)
            self._accumulate(query, output.detach())

        return hook

    def _scratch(self, shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Two reusable (heads, T, T) float32 buffers: scores and probabilities of one image."""
        if self._buffers is None or self._buffers[0].shape != shape or self._buffers[0].device != device:
            self._buffers = (torch.empty(shape, device=device), torch.empty(shape, device=device))
        return self._buffers

    def _accumulate(self, query: torch.Tensor, key: torch.Tensor) -> None:
        # One image at a time into two reused buffers: a (B, heads, T, T) temporary would be
        # 28 MB per image at 768 patches, freshly allocated (and page-faulted) three times a layer.
        batch, tokens, width = query.shape
        heads = self.num_heads
        head_dim = width // heads
        with torch.no_grad():
            if self._sum is None:
                self._sum = torch.zeros(batch, tokens, tokens, device=query.device)
            elif self._sum.shape[0] != batch:
                raise RuntimeError(
                    f"AttentionRecorder saw batches of {self._sum.shape[0]} and {batch} rows; "
                    f"use take_rows() before a layer runs on a different batch"
                )
            q = (query.float() * head_dim**-0.5).view(batch, tokens, heads, head_dim).transpose(1, 2).contiguous()
            k_t = key.float().view(batch, tokens, heads, head_dim).permute(0, 2, 3, 1).contiguous()
            scores, probs = self._scratch((heads, tokens, tokens), query.device)
            for b in range(batch):
                torch.bmm(q[b], k_t[b], out=scores)
                torch.softmax(scores, dim=-1, out=probs)
                self._sum[b].add_(probs.sum(dim=0), alpha=1.0 / heads)
        self.count += 1

    def take_rows(self, index: torch.Tensor) -> None:
        """Re-index the accumulated maps by batch row (when later layers run on selected rows).

        Args:
            index: (P,) long tensor of rows of the batch seen so far.
        """
        if self._sum is not None:
            self._sum = self._sum.index_select(0, index.to(self._sum.device))

    def mean_attention(self) -> torch.Tensor:
        """The averaged attention, (B, T, T) float32, T = 1 + number of patches.

        Raises:
            RuntimeError: if no recorded layer ran.
        """
        if self._sum is None or self.count == 0:
            raise RuntimeError("no attention was recorded: the recorded layers did not run")
        return self._sum / self.count


class ActivationRecorder(_HookSet):
    """A module's output and the gradient flowing back into it (via a tensor hook).

    Args:
        module: The module whose output is recorded (e.g. the last layer's ``layer_norm1``).

    Attributes:
        activation: The last output seen, or ``None``.
        gradient: The gradient of that output after a backward pass, or ``None``.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.activation: torch.Tensor | None = None
        self.gradient: torch.Tensor | None = None

    def __enter__(self) -> ActivationRecorder:
        super().__enter__()
        return self

    def _register(self) -> None:
        self._handles.append(self.module.register_forward_hook(self._hook))

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        self.activation = output
        self.gradient = None
        if output.requires_grad:
            self._handles.append(output.register_hook(self._save_gradient))

    def _save_gradient(self, grad: torch.Tensor) -> None:
        self.gradient = grad.detach()
