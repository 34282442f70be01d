"""What makes two precompute runs the same computation: the provenance recorded in a cache.

A cache holds the priors of one computation. :func:`build_provenance` records everything its
numbers depend on, and the cache writer refuses a resume, an append or a merge whose provenance
differs (field by field), so a cache never mixes computations. See ``docs/reliability.md``.

Example:
    >>> prov = build_provenance(clip, PriorConfig(), dataset="pascal5i", fold=0, split="val",
    ...                         shot=1, seed=0, n_episodes=1000, list_checksum="...",
    ...                         class_names=names)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from clipprior import __version__
from clipprior._device import dtype_name
from clipprior.config import PriorConfig
from clipprior.errors import InvalidInputError
from clipprior.model import ClipBundle

__all__ = ["build_provenance", "check_recorded_settings", "computation_settings", "geometry_description"]


def geometry_description(config: PriorConfig) -> str:
    """The ``geometry`` provenance entry: where the cached maps were computed, in words.

    Example:
        >>> geometry_description(PriorConfig())
        'native: image resized up to a multiple of the patch size; maps on its patch grid'
    """
    if config.geometry == "official":
        size = config.geometry_size
        return (f"official: VVP on the query and supports stretched to {size}x{size} (the trainers' validation "
                f"tensors), maps on that square's patch grid; VTP on the image stretched to {size}x{size}, "
                f"cast to uint8 and resized back up to a multiple of the patch size, maps on its patch grid")
    return "native: image resized up to a multiple of the patch size; maps on its patch grid"


def build_provenance(
    clip: ClipBundle, config: PriorConfig, *, dataset: str, fold: int, split: str, shot: int, seed: int,
    n_episodes: int, list_checksum: str, class_names: Sequence[str], batch_size: int | str = 8, chunk_images: int = 64,
    chunk_episodes: int = 256, support_window: int = 1, extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The settings a cache depends on, stored in its attributes and compared on resume.

    Two runs are the same computation when these are equal: the weights (by their checksum; where
    they were loaded from, ``model``, is recorded but not compared), the prior config, the episodes
    (dataset, fold, split, shot, seed, count, list checksum), the prompt names, and what changes the
    numbers of the CLIP passes: the model's ``dtype``, the ``device`` type, and the batch and chunk
    sizes, which fix the batch partners of every image (batched passes differ by floating-point
    reassociation, up to ~5e-4 in fp32). A resume that differs in any of them is refused
    (:class:`~clipprior.errors.CacheMismatchError`, field by field), so a cache never mixes
    computations.

    Args:
        clip: The loaded CLIP (its checksum, dtype and device are recorded).
        config: The prior config.
        dataset: Benchmark name.
        fold: Fold.
        split: ``"val"`` or ``"train"``.
        shot: Supports per episode.
        seed: Episode sampler seed.
        n_episodes: Number of episodes.
        list_checksum: :attr:`clipprior.data.FSSDataset.list_checksum`.
        class_names: Prompt name of class id c at index c - 1.
        batch_size: Images per CLIP batch, as given to :func:`run_precompute`.
        chunk_images: Query images per chunk, as given to :func:`run_precompute`.
        chunk_episodes: Episodes that close a chunk, as given to :func:`run_precompute`.
        support_window: Chunks whose supports run together, as given to :func:`run_precompute`.
        extra: More settings to record (e.g. ``coco_split``).

    Returns:
        The provenance dict (JSON-serialisable).

    Example:
        >>> prov = build_provenance(clip, PriorConfig(), dataset="pascal5i", fold=0, split="val",
        ...                         shot=1, seed=0, n_episodes=1000, list_checksum="...",
        ...                         class_names=names)  # doctest: +SKIP
        >>> prov["dtype"], prov["device"], prov["batch_size"]  # doctest: +SKIP
        ('fp32', 'cpu', 8)
    """
    names_digest = hashlib.sha256("\n".join(class_names).encode()).hexdigest()
    prov: dict[str, Any] = {
        "clipprior_version": __version__,
        "model": clip.source,
        "weights_sha256": clip.checksum,
        "config": config.to_json(),
        "text_classes": config.text_classes,
        "dataset": dataset,
        "fold": int(fold),
        "split": split,
        "shot": int(shot),
        "seed": int(seed),
        "episodes": int(n_episodes),
        "list_sha256": list_checksum,
        "prompt_names_sha256": names_digest,
        "geometry": geometry_description(config),
    }
    prov.update(computation_settings(clip, batch_size=batch_size, chunk_images=chunk_images,
                                     chunk_episodes=chunk_episodes, support_window=support_window))
    prov.update(extra or {})
    return prov


#: Settings the provenance leaves out at their default value (caches written before they existed).
_AT_DEFAULT: dict[str, Any] = {"support_window": 1}
_UNRECORDED = object()


def computation_settings(clip: ClipBundle, *, batch_size: int | str, chunk_images: int,
                         chunk_episodes: int | None = None, support_window: int | None = None) -> dict[str, Any]:
    """The settings of a run that change the numbers of its CLIP passes (part of the provenance).

    Values use the command line's spelling (``--dtype fp32``, ``--device cpu``), so a refused
    resume shows what to pass. ``chunk_episodes`` and ``support_window`` are left out when ``None``
    (a stage without episodes, such as :func:`~clipprior.precompute.store_features`, does not depend
    on them); ``support_window`` is recorded only when it is not 1, so caches written before it
    existed keep resuming.

    Example:
        >>> computation_settings(clip, batch_size=8, chunk_images=64, chunk_episodes=256)  # doctest: +SKIP
        {'dtype': 'fp32', 'device': 'cpu', 'batch_size': 8, 'chunk_images': 64, 'chunk_episodes': 256}
    """
    settings: dict[str, Any] = {
        "dtype": dtype_name(clip.dtype),
        "device": clip.device.type,
        "batch_size": batch_size if batch_size == "auto" else int(batch_size),
        "chunk_images": int(chunk_images),
    }
    if chunk_episodes is not None:
        settings["chunk_episodes"] = int(chunk_episodes)
    if support_window is not None and int(support_window) != 1:
        settings["support_window"] = int(support_window)
    return settings


def check_recorded_settings(writer: Any, clip: ClipBundle, **sizes: int | str) -> None:
    """Refuse to write into a cache whose recorded computation is not the one about to run.

    The provenance is built before the run (:func:`build_provenance`); a caller that records one
    batch size and runs another would mix computations in one cache.

    Raises:
        InvalidInputError: naming each setting recorded in ``writer.provenance`` that differs.
    """
    recorded = getattr(writer, "provenance", None)
    if not isinstance(recorded, dict):
        return
    actual = computation_settings(clip, **sizes)
    if sizes.get("support_window") is not None:
        actual.setdefault("support_window", 1)  # left out of the provenance at its default

    built = "chunk_episodes" in recorded  # by build_provenance: a setting it left out is at its default

    def recorded_value(key: str) -> Any:
        if key in recorded:
            return recorded[key]
        return _AT_DEFAULT.get(key, _UNRECORDED) if built else _UNRECORDED

    wrong = [f"{k}: recorded={recorded_value(k)!r} running={v!r}" for k, v in actual.items()
             if recorded_value(k) is not _UNRECORDED and recorded_value(k) != v]
    if wrong:
        raise InvalidInputError(
            "the cache's provenance does not describe this run (" + "; ".join(wrong) + "); pass the same model, "
            "batch and chunk sizes to build_provenance() and run_precompute()"
        )
