"""One frozen dataclass that carries every knob of the prior computation, with named presets.

The ``official`` preset reproduces the official PI-CLIP code number for number; ``default`` is the
same computation with the label-free class set of the paper's Eq. 2; ``paper`` follows the paper's
equations where the code departs from them. The config is serialised into every cache file
(:meth:`PriorConfig.to_dict`), so a cache always says how its priors were made.

Example:
    >>> from clipprior.config import get_preset
    >>> cfg = get_preset("official")
    >>> cfg.pir_layers, cfg.pir_square
    (8, True)
    >>> cfg.replace(pir_layers=4).pir_layers
    4
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Literal

from clipprior.errors import ConfigError

__all__ = ["CLIP_MEAN", "CLIP_STD", "DEFAULT_MODEL", "IMAGENET_MEAN", "IMAGENET_STD", "PRESETS", "PriorConfig",
           "config_choices", "get_preset", "list_presets"]

DEFAULT_MODEL = "openai/clip-vit-base-patch16"
"""The CLIP the paper uses (ViT-B/16), as a HuggingFace hub id: every ``--model`` default."""

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

TextClasses = Literal["target", "present"]
PixelNorm = Literal["clip", "imagenet"]
Geometry = Literal["native", "official"]

_CHOICES: dict[str, tuple[Any, ...]] = {
    "text_classes": ("target", "present"),
    "vtp_resample": ("bicubic", "bilinear", "nearest"),
    "pos_interpolation": ("bilinear", "bicubic"),
    "vvp_pixel_norm": ("clip", "imagenet"),
    "vvp_mask_resize": ("nearest", "area"),
    "geometry": ("native", "official"),
}


def config_choices(name: str) -> tuple[Any, ...]:
    """The values a :class:`PriorConfig` field with a fixed set of choices accepts.

    Args:
        name: The field (``"text_classes"``, ``"geometry"``, ``"vtp_resample"``, ...).

    Returns:
        Its valid values, the default first.

    Raises:
        ConfigError: for a field without a fixed set of choices.

    Example:
        >>> config_choices("geometry")
        ('native', 'official')
    """
    if name not in _CHOICES:
        raise ConfigError(f"PriorConfig.{name} has no fixed set of choices; fields with one: {', '.join(_CHOICES)}")
    return _CHOICES[name]


_KINDS: dict[str, str] = {
    "logit_scale": "number or None", "cam_norm_passes": "int", "pir_layers": "int", "pir_sinkhorn_iters": "int",
    "cam_eps": "number", "pir_box_threshold": "number", "vvp_eps": "number", "pir_square": "bool",
    "vvp_normalize": "bool", "fg_template": "str", "bg_template": "str", "geometry_size": "int",
}


def _is_kind(value: Any, kind: str) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):  # bool is an int subclass; True is not a layer count
        return False
    if kind == "int":
        return isinstance(value, numbers.Integral)
    if kind == "str":
        return isinstance(value, str)
    return isinstance(value, numbers.Real) or (kind == "number or None" and value is None)


def _check_types(config: PriorConfig) -> None:
    """Raise ConfigError for a field of the wrong type (e.g. ``pir_square="false"`` from hand-edited JSON)."""
    for name, kind in _KINDS.items():
        value = getattr(config, name)
        if not _is_kind(value, kind):
            raise ConfigError(f"PriorConfig.{name}={value!r} has type {type(value).__name__}; expected {kind}")
        if kind == "int":  # numpy scalars would not survive to_json()
            object.__setattr__(config, name, int(value))
        elif kind.startswith("number") and value is not None:
            object.__setattr__(config, name, float(value))
    layers = config.vvp_layers
    if isinstance(layers, (str, bytes)) or not isinstance(layers, (list, tuple)) or not all(
        _is_kind(i, "int") for i in layers
    ):
        raise ConfigError(f"PriorConfig.vvp_layers={layers!r} must be a list of int layer indices, e.g. (-1, -2)")


@dataclass(frozen=True)
class PriorConfig:
    """Every knob of VTP, PIR and VVP.

    Attributes:
        fg_template: Prompt of the foreground text; ``{}`` is replaced by the class's prompt name.
        bg_template: Prompt of the background ("without") text.
        text_classes: Softmax class set of VTP: ``"target"`` (the target class alone, the paper's
            Eq. 2, needs no labels) or ``"present"`` (the target plus every class present in the
            query's ground truth, as the official code does; this uses labels at test time).
        logit_scale: Softmax temperature's inverse; ``None`` takes ``exp(model.logit_scale)``
            (100 for every released CLIP).
        vtp_resample: PIL filter used to resize the query to a multiple of the patch size.
        pos_interpolation: How the pretrained position grid is resized to the image's patch grid
            (the official code: bilinear, align_corners=False).
        cam_norm_passes: How many times the Grad-CAM is min-max normalised (the official
            pytorch-grad-cam path normalises twice: per layer and after aggregation).
        cam_eps: Epsilon of the min-max normalisation ``(x - min) / (eps + max)``.
        pir_layers: Number of last layers whose head-averaged attention PIR averages. Checked
            against the model when used: the default 8 is capped at the depth of a smaller model,
            any other value larger than the model's layer count is refused.
        pir_sinkhorn_iters: Sinkhorn iterations (column then row normalisation) on the attention.
        pir_square: Square R once more (``R = R @ R``), as the official code does beyond Eq. 10.
        pir_box_threshold: Fraction of the CAM's maximum (on the uint8 scale) above which a grid
            cell is foreground for the box mask.
        vvp_layers: Encoder layers (0-based, negative counts from the end) whose hidden states
            VVP compares; the official code uses the last two, last first.
        vvp_eps: Epsilon added to the product of norms in the cosine similarity.
        vvp_normalize: Min-max normalise each VVP map (the paper's Eq. 8; the code leaves it off).
        vvp_mask_resize: How the support mask is brought onto the patch grid.
        vvp_pixel_norm: Pixel normalisation used when clipprior prepares VVP inputs itself
            (``"clip"``: CLIP's statistics; ``"imagenet"``: the FSS trainers' tensors, as the
            official code feeds them).
        geometry: Where the priors are computed. ``"native"``: each image at its own size (resized
            up to a multiple of the patch size). ``"official"``: the FSS trainers' validation
            geometry, as the official model computes its priors inside its forward: VVP on the
            query and supports stretched to ``geometry_size`` x ``geometry_size`` (bilinear; labels
            nearest), VTP on the image stretched to that square, cast to uint8 and resized back
            (bicubic) up to a multiple of the patch size of its original size (see docs/priors.md).
        geometry_size: Side of the trainers' square input for ``geometry="official"`` (473 for
            PFENet, BAM, HDMNet and PI-CLIP).
    """

    fg_template: str = "a photo of {}."
    bg_template: str = "a photo without {}."
    text_classes: TextClasses = "target"
    logit_scale: float | None = None
    vtp_resample: str = "bicubic"
    pos_interpolation: str = "bilinear"
    cam_norm_passes: int = 2
    cam_eps: float = 1e-7
    pir_layers: int = 8
    pir_sinkhorn_iters: int = 1
    pir_square: bool = True
    pir_box_threshold: float = 0.4
    vvp_layers: tuple[int, ...] = field(default=(-1, -2))
    vvp_eps: float = 1e-7
    vvp_normalize: bool = False
    vvp_mask_resize: str = "nearest"
    vvp_pixel_norm: PixelNorm = "clip"
    geometry: Geometry = "native"
    geometry_size: int = 473

    def __post_init__(self) -> None:
        _check_types(self)
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise ConfigError(f"PriorConfig.{name}={value!r} is not valid; choose one of {list(choices)}")
        for name in ("fg_template", "bg_template"):
            template = getattr(self, name)
            if template.count("{}") != 1:
                raise ConfigError(
                    f"PriorConfig.{name}={template!r} must contain exactly one '{{}}' for the class name"
                )
        if self.cam_norm_passes < 0:
            raise ConfigError(f"PriorConfig.cam_norm_passes={self.cam_norm_passes} must be >= 0")
        if self.geometry_size < 1:
            raise ConfigError(f"PriorConfig.geometry_size={self.geometry_size} must be >= 1 (e.g. 473)")
        if self.pir_layers < 1:
            raise ConfigError(f"PriorConfig.pir_layers={self.pir_layers} must be >= 1")
        if self.pir_sinkhorn_iters < 0:
            raise ConfigError(f"PriorConfig.pir_sinkhorn_iters={self.pir_sinkhorn_iters} must be >= 0")
        if not 0.0 <= self.pir_box_threshold < 1.0:
            raise ConfigError(f"PriorConfig.pir_box_threshold={self.pir_box_threshold} must be in [0, 1)")
        if not self.vvp_layers:
            raise ConfigError("PriorConfig.vvp_layers is empty; name at least one layer, e.g. (-1, -2)")
        if self.logit_scale is not None and not 0 < self.logit_scale < math.inf:
            raise ConfigError(f"PriorConfig.logit_scale={self.logit_scale} must be positive and finite, or None")
        for name in ("cam_eps", "vvp_eps"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ConfigError(f"PriorConfig.{name}={getattr(self, name)} must be a finite number >= 0")
        object.__setattr__(self, "vvp_layers", tuple(int(i) for i in self.vvp_layers))

    @property
    def vvp_shares_query_pass(self) -> bool:
        """Whether VVP's query features come from the VTP pass (CLIP normalisation, native geometry).

        Example:
            >>> PriorConfig().vvp_shares_query_pass, PriorConfig(geometry="official").vvp_shares_query_pass
            (True, False)
        """
        return self.vvp_pixel_norm == "clip" and self.geometry == "native"

    def replace(self, **changes: Any) -> PriorConfig:
        """Return a copy with some fields changed (validated like a new config).

        Raises:
            ConfigError: if a field name is unknown or a value is invalid.

        Example:
            >>> PriorConfig().replace(pir_square=False).pir_square
            False
        """
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown PriorConfig field(s) {unknown}; valid: {sorted(self.to_dict())}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """All fields as JSON-serialisable values.

        Example:
            >>> PriorConfig().to_dict()["pir_layers"]
            8
        """
        out = dataclasses.asdict(self)
        out["vvp_layers"] = list(self.vvp_layers)
        return out

    def to_json(self) -> str:
        """The config as canonical JSON (sorted keys), as stored in cache files."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PriorConfig:
        """Build a config from :meth:`to_dict` output.

        Raises:
            ConfigError: if a key is unknown or a value is invalid.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown PriorConfig field(s) {unknown}; valid: {sorted(names)}")
        values = dict(data)
        if "vvp_layers" in values:
            values["vvp_layers"] = tuple(values["vvp_layers"])
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> PriorConfig:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    def diff(self, other: PriorConfig) -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ, as ``{name: (self_value, other_value)}``."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


PRESETS: dict[str, PriorConfig] = {
    # The official computation with the label-free softmax class set (paper Eq. 2).
    "default": PriorConfig(),
    # The official PI-CLIP code, number for number (context classes from the query's ground truth).
    "official": PriorConfig(text_classes="present", vvp_pixel_norm="imagenet"),
    # The paper's equations where the code departs: Eq. 10 without the extra squaring, Eq. 8's
    # min-max normalisation of VVP.
    "paper": PriorConfig(pir_square=False, vvp_normalize=True),
}


def list_presets() -> list[str]:
    """Names of the built-in presets.

    Example:
        >>> list_presets()
        ['default', 'official', 'paper']
    """
    return list(PRESETS)


def get_preset(name: str) -> PriorConfig:
    """Return a named preset.

    Args:
        name: One of :func:`list_presets`.

    Raises:
        ConfigError: if ``name`` is not a preset; the message lists the valid names.

    Example:
        >>> get_preset("paper").pir_square
        False
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {list_presets()}") from None
