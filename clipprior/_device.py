"""Device and dtype resolution, in one place (torch loads only when a name is resolved)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from clipprior.errors import InvalidInputError

if TYPE_CHECKING:
    import torch

__all__ = ["DEVICE_NAMES", "DTYPE_NAMES", "dtype_name", "local_rank_device", "resolve_device", "resolve_dtype"]

DTYPE_NAMES: tuple[str, ...] = ("fp32", "fp16", "bf16")
"""The model dtypes, by their short names (the CLI's ``--dtype`` choices)."""

DEVICE_NAMES: tuple[str, ...] = ("auto", "cpu", "cuda", "cuda:N")
"""The device names :func:`resolve_device` understands (``cuda:N`` for any index N)."""

# accepted spellings -> torch attribute
_DTYPE_ALIASES: dict[str, str] = {
    "fp32": "float32",
    "float32": "float32",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``... into a :class:`torch.device`.

    ``"auto"`` (or ``None``) picks CUDA when available, else the CPU.

    Raises:
        InvalidInputError: if the device string is not understood or CUDA is asked for but absent.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InvalidInputError(f"device {device!r} is not valid; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"device {device!r} asked for, but CUDA is not available; use --device cpu")
    return dev


def local_rank_device(device: str) -> str:
    """Under torchrun (``LOCAL_RANK`` set), ``"auto"`` means this rank's GPU; any other name is kept.

    Example:
        >>> local_rank_device("cpu")
        'cpu'
    """
    local = os.environ.get("LOCAL_RANK")
    if device == "auto" and local is not None:
        import torch

        if torch.cuda.is_available():
            return f"cuda:{int(local)}"
    return device


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Turn ``"fp32"``/``"fp16"``/``"bf16"`` (or a torch dtype) into a :class:`torch.dtype`.

    Raises:
        InvalidInputError: if the name is not one of the supported floating dtypes.

    Example:
        >>> resolve_dtype("bf16")
        torch.bfloat16
    """
    import torch

    supported = {getattr(torch, name) for name in _DTYPE_ALIASES.values()}
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and dtype not in supported:
            raise InvalidInputError(f"dtype {dtype} is not supported; use float32, float16 or bfloat16")
        return dtype
    try:
        return getattr(torch, _DTYPE_ALIASES[str(dtype).lower()])
    except KeyError:
        raise InvalidInputError(f"dtype {dtype!r} is not valid; choose one of {list(DTYPE_NAMES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a supported dtype, as ``--dtype`` spells it (one of :data:`DTYPE_NAMES`).

    Raises:
        InvalidInputError: if the dtype is not one of the supported floating dtypes.

    Example:
        >>> import torch
        >>> dtype_name(torch.bfloat16)
        'bf16'
    """
    names = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
    name = str(dtype).removeprefix("torch.")
    if name not in names:
        raise InvalidInputError(f"dtype {dtype} is not supported; use float32, float16 or bfloat16")
    return names[name]
