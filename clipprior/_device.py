"""Device and dtype resolution, in one place."""

from __future__ import annotations

import torch

from clipprior.errors import InvalidInputError

__all__ = ["model_device_dtype", "resolve_device", "resolve_dtype"]

_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
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
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InvalidInputError(f"device {device!r} is not valid; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"device {device!r} asked for, but CUDA is not available; use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Turn ``"fp32"``/``"fp16"``/``"bf16"`` (or a torch dtype) into a :class:`torch.dtype`.

    Raises:
        InvalidInputError: if the name is not one of the supported floating dtypes.

    Example:
        >>> resolve_dtype("bf16")
        torch.bfloat16
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and dtype not in set(_DTYPES.values()):
            raise InvalidInputError(f"dtype {dtype} is not supported; use float32, float16 or bfloat16")
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise InvalidInputError(f"dtype {dtype!r} is not valid; choose one of ['fp32', 'fp16', 'bf16']") from None


def model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and floating dtype of a model's parameters (what inputs are moved to)."""
    param = next(model.parameters())
    return param.device, param.dtype
