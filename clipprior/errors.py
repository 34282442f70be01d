"""Exception types raised by clipprior.

Every exception derives from :class:`ClipPriorError` and from the built-in type a caller would
naturally catch (``ValueError``, ``FileNotFoundError``, ``KeyError``, ...), so
``except ValueError`` keeps working while ``except ClipPriorError`` catches everything of ours.
Messages name the offending value and say how to fix it.

Example:
    >>> from clipprior.errors import InvalidInputError
    >>> try:
    ...     raise InvalidInputError("empty class list; pass at least one class name")
    ... except ValueError as err:
    ...     print(err)
    empty class list; pass at least one class name
"""

from __future__ import annotations

__all__ = [
    "CacheCorruptError",
    "CacheError",
    "CacheKeyError",
    "CacheMismatchError",
    "CacheWriteError",
    "ClipPriorError",
    "ConfigError",
    "DataNotFoundError",
    "DatasetError",
    "InvalidInputError",
    "ModelLoadError",
    "WeightsNotFoundError",
]


class ClipPriorError(Exception):
    """Base class of every error raised by clipprior."""


class InvalidInputError(ClipPriorError, ValueError):
    """A tensor, image, mask or argument passed to a prior function is unusable."""


class ConfigError(ClipPriorError, ValueError):
    """A :class:`~clipprior.config.PriorConfig` field or preset name is invalid."""


class ModelLoadError(ClipPriorError, RuntimeError):
    """A CLIP model or tokenizer could not be loaded or converted."""


class WeightsNotFoundError(ModelLoadError, FileNotFoundError):
    """CLIP weights are neither on disk nor reachable on the hub (offline, missing file)."""


class DatasetError(ClipPriorError, ValueError):
    """A dataset file, list line, image or mask is broken or inconsistent."""


class DataNotFoundError(DatasetError, FileNotFoundError):
    """A dataset root, list file, image or mask does not exist."""


class CacheError(ClipPriorError, RuntimeError):
    """A prior cache file cannot be written or read."""


class CacheMismatchError(CacheError, ValueError):
    """An existing cache was written with settings other than the ones requested."""


class CacheWriteError(CacheError):
    """A cache file could not be written (full disk, quota, read-only location, device error).

    The file being written is removed (a half-written file is never taken as a cache) and the work
    committed before stays, so rerunning the same command once the cause is fixed finishes the job.

    Attributes:
        path: The file that could not be written.
        errno: The operating system's error number (e.g. ``errno.ENOSPC``), or ``None``.
    """

    def __init__(self, message: str, *, path: object = None, errno: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = errno


class CacheCorruptError(CacheError):
    """A cache file is damaged: a stored entry fails its checksum or cannot be decoded.

    Attributes:
        path: The file.
        entry: What is damaged, e.g. ``"vtp/refined ('a.jpg', 3)"`` (map kind and key), or the
            dataset of an index table.
    """

    def __init__(self, message: str, *, path: object = None, entry: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.entry = entry


class CacheKeyError(CacheError, KeyError):
    """A requested entry is not in the prior cache."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else ""
