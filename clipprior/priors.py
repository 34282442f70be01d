"""The PI-CLIP priors: VTP (softmax Grad-CAM), PIR (attention refinement) and VVP.

All functions take batched tensors and return batched tensors; the patch grid always comes from
the model config and the input size. The Grad-CAM and PIR arithmetic runs in float32 whatever the
model dtype.

Example:
    >>> from clipprior import load_clip, vtp, pir
    >>> from clipprior.preprocess import preprocess_query
    >>> clip = load_clip("ViT-B-16.pt", device="cpu")  # doctest: +SKIP
    >>> pixels = preprocess_query(image, clip.patch_size)[None]  # doctest: +SKIP
    >>> out = vtp(clip, pixels, ["cat"], return_attention=True)  # doctest: +SKIP
    >>> refined = pir(out.cam, out.attention).refined  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from clipprior._resize import resize_bilinear, resize_nearest
from clipprior._vision import embed, patch_grid, run_layer, run_layer_rows, vision_layers
from clipprior.cache import VTP_CAM, VTP_REFINED, VVP_MAPS, MapKind
from clipprior.config import PriorConfig
from clipprior.data.classes import present_names
from clipprior.errors import ConfigError, InvalidInputError
from clipprior.hooks import ActivationRecorder, AttentionRecorder
from clipprior.model import ClipBundle
from clipprior.preprocess import (
    ImageLike,
    check_finite,
    normalize,
    to_rgb_array,
    vtp_image,
    vvp_inputs,
)

__all__ = [
    "EpisodePriors",
    "PIRResult",
    "SupportCells",
    "TextFeatures",
    "VTPResult",
    "best_cosine_match",
    "box_mask",
    "check_config_layers",
    "compute_priors",
    "connected_components",
    "encode_text",
    "layer_features",
    "minmax_normalize",
    "pir",
    "present_names",
    "sinkhorn",
    "softmax_classes",
    "support_features",
    "vtp",
    "vtp_pass",
    "vvp",
    "vvp_from_cells",
    "vvp_from_features",
]


# ----------------------------------------------------------------------------------------------
# Text


@dataclass(frozen=True)
class TextFeatures:
    """L2-normalised text embeddings of the foreground and background prompts of some classes.

    Attributes:
        names: The class prompt names, in row order.
        fg: (C, E) float32 embeddings of ``config.fg_template`` prompts.
        bg: (C, E) float32 embeddings of ``config.bg_template`` prompts.
    """

    names: tuple[str, ...]
    fg: torch.Tensor
    bg: torch.Tensor

    def index(self, name: str) -> int:
        """Row of ``name``.

        Raises:
            InvalidInputError: if the class was not encoded.
        """
        try:
            return self.names.index(name)
        except ValueError:
            raise InvalidInputError(
                f"class {name!r} is not among the encoded text classes {list(self.names)[:10]}...; "
                f"encode it with encode_text()"
            ) from None


@contextmanager
def _eager_text_attention(model: torch.nn.Module) -> Iterator[None]:
    """Run the text tower with eager attention for the duration of the block.

    VTP with few classes is ill-conditioned: a 1e-6 change in the text features moves the CAM by
    ~5e-4. The fused sdpa kernel differs from the reference's explicit softmax(QK^T)V in the 7th
    digit, so the text features (computed once per class set) use the eager path.
    """
    config = model.config.text_config
    previous = getattr(config, "_attn_implementation", None)
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = previous


def _as_text_output(out: object) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # type: ignore[attr-defined]


def encode_text(clip: ClipBundle, names: Sequence[str], config: PriorConfig | None = None,
                batch_size: int = 256) -> TextFeatures:
    """Encode "a photo of {c}." / "a photo without {c}." for each class name.

    Args:
        clip: The loaded CLIP.
        names: Class prompt names (e.g. ``"person with clothes,people,human"``).
        config: Prompt templates; defaults to :class:`PriorConfig`.
        batch_size: Prompts per text-encoder batch.

    Returns:
        :class:`TextFeatures` with (C, E) float32 rows, L2-normalised.

    Raises:
        InvalidInputError: if ``names`` is empty or holds an empty name.

    Example:
        >>> text = encode_text(clip, ["cat", "dog"])  # doctest: +SKIP
        >>> text.fg.shape  # doctest: +SKIP
        torch.Size([2, 512])
    """
    config = config or PriorConfig()
    names = tuple(str(n) for n in names)
    if not names:
        raise InvalidInputError("empty class list; pass at least one class name")
    if any(not n.strip() for n in names):
        raise InvalidInputError(f"class names must be non-empty strings, got {list(names)}")
    model = clip.model
    max_len = int(model.config.text_config.max_position_embeddings)
    outs = []
    for template in (config.fg_template, config.bg_template):
        prompts = [template.format(n) for n in names]
        rows = []
        for start in range(0, len(prompts), batch_size):
            tokens = clip.tokenizer(prompts[start:start + batch_size], padding="max_length", truncation=True,
                                    max_length=max_len, return_tensors="pt")
            with torch.no_grad(), _eager_text_attention(model):
                feats = _as_text_output(model.get_text_features(input_ids=tokens["input_ids"].to(clip.device)))
            rows.append(feats.float())
        feats = torch.cat(rows)
        outs.append(feats / feats.norm(dim=-1, keepdim=True))
    return TextFeatures(names=names, fg=outs[0], bg=outs[1])


# ----------------------------------------------------------------------------------------------
# Small math


def minmax_normalize(x: torch.Tensor, eps: float = 1e-7, passes: int = 1) -> torch.Tensor:
    """``(x - min) / (eps + max)`` per map, ``passes`` times: (P, h, w) -> (P, h, w).

    Example:
        >>> minmax_normalize(torch.tensor([[[1.0, 3.0]]]))
        tensor([[[0.0000, 1.0000]]])
    """
    flat = x.reshape(x.shape[0], -1)
    for _ in range(passes):
        flat = flat - flat.min(dim=1, keepdim=True).values
        flat = flat / (eps + flat.max(dim=1, keepdim=True).values)
    return flat.reshape(x.shape)


def sinkhorn(attention: torch.Tensor, iterations: int = 1) -> torch.Tensor:
    """Alternate column and row normalisation: (P, n, n) -> (P, n, n).

    Each iteration divides by the column sums, then by the row sums (so rows sum to one).

    Example:
        >>> sinkhorn(torch.ones(1, 2, 2)).sum(-1)
        tensor([[1., 1.]])
    """
    d = attention
    for _ in range(iterations):
        d = d / d.sum(dim=-2, keepdim=True)
        d = d / d.sum(dim=-1, keepdim=True)
    return d


def connected_components(mask: torch.Tensor) -> torch.Tensor:
    """8-connected components of binary maps, on their device: (P, h, w) bool -> (P, h, w) long.

    Background cells get 0; every cell of a component gets 1 + the largest row-major index of the
    component's cells, so labels are unique within a map (not consecutive). Computed by label
    propagation over the whole batch: each foreground cell starts with its own index; each round it
    takes the maximum over its 3 x 3 neighbourhood (restricted to the foreground), then over its
    horizontal and its vertical run of foreground cells (long straight stretches converge in one
    step), then jumps to the label of the cell its label names (pointer jumping), until nothing
    changes. The result is the partition ``scipy.ndimage.label`` gives with a 3 x 3 structuring
    element (tested on random and adversarial masks).

    Raises:
        InvalidInputError: if ``mask`` is not (P, h, w).

    Example:
        >>> m = torch.tensor([[[1, 0, 0], [0, 1, 0], [0, 0, 0]], [[1, 0, 1], [0, 0, 0], [1, 1, 0]]]).bool()
        >>> connected_components(m).tolist()
        [[[5, 0, 0], [0, 5, 0], [0, 0, 0]], [[1, 0, 3], [0, 0, 0], [8, 8, 0]]]
    """
    if mask.ndim != 3:
        raise InvalidInputError(f"mask must be (P, h, w), got {tuple(mask.shape)}")
    fg = mask.bool()
    count, height, width = fg.shape
    cells = height * width
    index = torch.arange(1, cells + 1, device=fg.device).reshape(1, height, width)
    labels = torch.where(fg, index, 0)
    cols_fg = fg.transpose(1, 2).contiguous()
    while True:
        new = torch.where(fg, _max_3x3(labels), 0)
        new = _run_max(new, fg)
        new = _run_max(new.transpose(1, 2), cols_fg).transpose(1, 2).reshape(count, cells)
        # Pointer jumping: label l names cell l - 1 of the same component; take its label.
        for _ in range(2):
            new = torch.maximum(new, new.gather(1, (new - 1).clamp_min(0)) * (new > 0))
        new = new.reshape(count, height, width)
        if torch.equal(new, labels):
            return labels
        labels = new


def _max_3x3(labels: torch.Tensor) -> torch.Tensor:
    """Maximum over each cell's 3 x 3 neighbourhood (zero beyond the edges): (P, h, w) -> (P, h, w)."""
    padded = F.pad(labels, (1, 1, 1, 1))
    rows = torch.maximum(torch.maximum(padded[:, :, :-2], padded[:, :, 1:-1]), padded[:, :, 2:])
    return torch.maximum(torch.maximum(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:])


def _run_max(labels: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """Every foreground cell takes the maximum of its run of foreground cells along the last axis.

    (P, h, w) long labels (0 on the background) and bool foreground -> (P, h, w) long. Runs are
    numbered along each row; ``run * (max + 1) + label`` keys, increasing from run to run, turn
    the per-run maximum into two cumulative maxima (forward, then backward).
    """
    starts = fg & ~F.pad(fg[..., :-1], (1, 0), value=False)
    run = starts.long().cumsum(-1)
    span = int(labels.shape[-2] * labels.shape[-1]) + 1  # labels are <= h*w of the (untransposed) map
    forward = torch.cummax(run * span + labels, dim=-1).values
    runs = int(labels.shape[-1]) + 1
    backward = torch.cummax(((runs - run) * span + forward % span).flip(-1), dim=-1).values.flip(-1)
    return torch.where(fg, backward % span, 0)


def _box_foreground(cam: torch.Tensor, threshold: float) -> torch.Tensor:
    """The official foreground of the box mask: ``uint8(255 cam) > int(threshold * max)``, (P, h, w) bool.

    ``cam * 255`` is computed in float32 and truncated to an integer as numpy's ``astype(uint8)``
    does (values are clamped to [0, 255] first, where the cast is defined); the integer threshold
    comes from a table of ``int(threshold * u)`` for the 256 possible maxima, computed in Python
    double precision exactly as the official code does.
    """
    u8 = (cam.float() * 255).clamp_(0, 255).to(torch.uint8).long()
    table = torch.tensor([int(threshold * u) for u in range(256)], device=cam.device)
    limit = table[u8.flatten(1).amax(dim=1)] if u8.numel() else u8.new_zeros(cam.shape[0])
    return u8 > limit[:, None, None]


def _component_boxes(labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Bounding boxes of labelled components, clipped as the official code clips them.

    Returns ``present``, ``first``, ``x0``, ``y0``, ``x1``, ``y1``: (P, h*w + 1) tensors indexed by
    label (slot 0, the background, is never present); ``first`` is the row-major index of a
    component's first cell (``scipy.ndimage.find_objects`` order).
    """
    count, height, width = labels.shape
    cells = height * width
    flat = labels.reshape(count, cells)
    pos = torch.arange(cells, device=labels.device)
    ys, xs = (pos // width).expand(count, cells), (pos % width).expand(count, cells)

    def reduce(values: torch.Tensor, how: str, fill: int) -> torch.Tensor:
        start = torch.full((count, cells + 1), fill, dtype=torch.long, device=labels.device)
        return start.scatter_reduce(1, flat, values, how)

    y_min, y_max = reduce(ys, "amin", height), reduce(ys, "amax", -1)
    x_min, x_max = reduce(xs, "amin", width), reduce(xs, "amax", -1)
    first = reduce(pos.expand(count, cells), "amin", cells)
    present = y_max >= 0
    present[:, 0] = False
    y1 = torch.minimum(y_max + 1, torch.tensor(height - 1, device=labels.device))
    x1 = torch.minimum(x_max + 1, torch.tensor(width - 1, device=labels.device))
    return present, first, x_min, y_min, x1, y1


def box_mask(cam: torch.Tensor, threshold: float = 0.4, *, return_boxes: bool = False
             ) -> torch.Tensor | tuple[torch.Tensor, list[list[tuple[int, int, int, int]]]]:
    """The box mask B of PIR: (P, h, w) CAM in [0, 1] -> (P, h, w) bool, on the CAM's device.

    A cell is foreground when ``uint8(255 cam) > int(threshold * max)``; every 8-connected
    foreground region contributes its bounding box, end-exclusive and clipped to ``w - 1`` /
    ``h - 1`` as in the official code (so the last row and column never enter B).

    Where it runs: on an accelerator (CUDA, ...) the whole batch stays on the device
    (:func:`connected_components` by label propagation, then every box painted at once with a 2-D
    difference array): no per-map loop, no host copy. On the CPU the CAM already is in host memory
    and SciPy's sequential labelling is 30x or more faster than tensor label propagation (measured,
    see benchmarks/NOTES.md), so the maps are labelled there one by one. The two paths give identical
    masks (tested on random and adversarial maps).

    Args:
        cam: Normalised CAMs.
        threshold: Fraction of the maximum.
        return_boxes: Also return the boxes ``[x0, y0, x1, y1]`` of each map (on the host), in the
            order of their first cell (row-major).

    Raises:
        InvalidInputError: if ``cam`` is not (P, h, w).

    Example:
        >>> cam = torch.zeros(1, 4, 4); cam[0, 1, 1] = 1.0
        >>> box_mask(cam).int()[0, 1]
        tensor([0, 1, 0, 0], dtype=torch.int32)
    """
    if cam.ndim != 3:
        raise InvalidInputError(f"cam must be (P, h, w), got {tuple(cam.shape)}")
    if cam.device.type == "cpu":
        return _box_mask_host(cam, threshold, return_boxes)
    return _box_mask_device(cam, threshold, return_boxes)


def _box_mask_host(cam: torch.Tensor, threshold: float, return_boxes: bool
                   ) -> torch.Tensor | tuple[torch.Tensor, list[list[tuple[int, int, int, int]]]]:
    """:func:`box_mask` with numpy and SciPy's labelling, map by map (the fast path for CPU tensors).

    The same foreground as :func:`_box_foreground`, in numpy: small torch operations on the CPU
    cost more in thread synchronisation than they compute.
    """
    u8 = np.clip(cam.detach().float().numpy() * 255, 0, 255).astype(np.uint8)
    height, width = u8.shape[1:]
    masks = np.zeros(u8.shape, dtype=bool)
    all_boxes = []
    for i, cells in enumerate(u8):
        grid = cells > int(threshold * int(cells.max()))
        labels, _ = ndimage.label(grid, structure=np.ones((3, 3), dtype=bool))
        boxes = []
        for sl in ndimage.find_objects(labels):
            if sl is None:
                continue
            y0, x0 = sl[0].start, sl[1].start
            boxes.append((x0, y0, min(sl[1].stop, width - 1), min(sl[0].stop, height - 1)))
            masks[i, y0:boxes[-1][3], x0:boxes[-1][2]] = True
        all_boxes.append(boxes)
    out = torch.from_numpy(masks)
    return (out, all_boxes) if return_boxes else out


def _box_mask_device(cam: torch.Tensor, threshold: float, return_boxes: bool
                     ) -> torch.Tensor | tuple[torch.Tensor, list[list[tuple[int, int, int, int]]]]:
    """:func:`box_mask` over the whole batch with tensor operations on the CAM's device."""
    count, height, width = cam.shape
    labels = connected_components(_box_foreground(cam.detach(), threshold))
    present, first, x0, y0, x1, y1 = _component_boxes(labels)
    # Paint every box [y0, y1) x [x0, x1) at once: +1/-1 at its corners, then 2-D prefix sums.
    # (Empty boxes, clipped away at the last row or column, cancel out.)
    side = (height + 1) * (width + 1)
    base = torch.arange(count, device=cam.device)[:, None] * side
    weight = present.long()
    diff = torch.zeros(count * side, dtype=torch.long, device=cam.device)
    for ys, xs, sign in ((y0, x0, 1), (y0, x1, -1), (y1, x0, -1), (y1, x1, 1)):
        where = base + ys.clamp(0, height) * (width + 1) + xs.clamp(0, width)
        diff.index_add_(0, where.reshape(-1), (sign * weight).reshape(-1))
    covered = diff.reshape(count, height + 1, width + 1).cumsum(1).cumsum(2)[:, :height, :width]
    out = covered > 0
    if not return_boxes:
        return out
    host = [t.cpu() for t in (present, first, x0, y0, x1, y1)]
    all_boxes = []
    for p in range(count):
        slots = torch.nonzero(host[0][p]).flatten()
        slots = slots[torch.argsort(host[1][p][slots])]
        all_boxes.append([(int(host[2][p][s]), int(host[3][p][s]), int(host[4][p][s]), int(host[5][p][s]))
                          for s in slots])
    return out, all_boxes


# ----------------------------------------------------------------------------------------------
# Vision passes


_DEFAULT_PIR_LAYERS = PriorConfig().pir_layers


def check_config_layers(config: PriorConfig, num_layers: int, *, pir: bool = True, vvp: bool = True) -> None:
    """Check the layer fields of ``config`` against a vision tower of ``num_layers`` layers.

    A :class:`PriorConfig` does not know the model it will meet; the prior functions call this
    when they use it. The default ``pir_layers`` (8, the official window of ViT-B/16's 12 layers)
    is capped at the depth of a smaller model (every layer is averaged); a value set to anything
    else must fit the model.

    Args:
        config: The knobs.
        num_layers: The model's vision layer count (``clip.num_layers``).
        pir: Check ``pir_layers`` (1..num_layers).
        vvp: Check ``vvp_layers`` (each in [-num_layers, num_layers)).

    Raises:
        ConfigError: naming the field, its value and the model's layer count.

    Example:
        >>> check_config_layers(PriorConfig(pir_layers=99), 12)
        Traceback (most recent call last):
        ...
        clipprior.errors.ConfigError: PriorConfig.pir_layers=99 exceeds the model's 12 vision layers; use 1..12
    """
    if pir and config.pir_layers > num_layers and config.pir_layers != _DEFAULT_PIR_LAYERS:
        raise ConfigError(f"PriorConfig.pir_layers={config.pir_layers} exceeds the model's {num_layers} vision "
                          f"layers; use 1..{num_layers}")
    if vvp:
        bad = [i for i in config.vvp_layers if not -num_layers <= i < num_layers]
        if bad:
            raise ConfigError(f"PriorConfig.vvp_layers={config.vvp_layers} names layer(s) {bad} that a model of "
                              f"{num_layers} vision layers does not have; use indices in "
                              f"[{-num_layers}, {num_layers - 1}], e.g. (-1, -2)")


def _layer_index(index: int, num_layers: int) -> int:
    resolved = index + num_layers if index < 0 else index
    if not 0 <= resolved < num_layers:
        raise InvalidInputError(f"layer {index} does not exist in a {num_layers}-layer vision tower")
    return resolved


def _prepare_pixels(clip: ClipBundle, pixel_values: torch.Tensor, name: str = "pixel_values") -> torch.Tensor:
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
        raise InvalidInputError(f"{name} must be a (B, 3, H, W) tensor, got {shape}")
    if pixel_values.shape[0] == 0:
        raise InvalidInputError(f"{name} is an empty batch")
    check_finite(name, pixel_values)
    patch_grid(clip.model.config.vision_config, pixel_values.shape[-2], pixel_values.shape[-1])
    if pixel_values.is_inference():
        pixel_values = pixel_values.clone()
    return pixel_values.to(device=clip.device, dtype=clip.dtype)


def layer_features(clip: ClipBundle, pixel_values: torch.Tensor, layers: Sequence[int],
                   config: PriorConfig | None = None, *, cells: torch.Tensor | None = None) -> torch.Tensor:
    """Patch-token hidden states after some encoder layers: (B, 3, H, W) -> (B, L, h*w, D).

    Args:
        clip: The loaded CLIP.
        pixel_values: Normalised pixels.
        layers: Layer indices (0-based, negative from the end), in output order.
        config: Position-grid interpolation mode.
        cells: (B, h*w) bool, the patch cells whose features are needed from the deepest requested
            layer. That layer then computes its queries, attention output and MLP for those cells only
            (keys and values still from every token) and returns zeros elsewhere; shallower requested
            layers are complete. ``None``: every cell.

    Raises:
        InvalidInputError: on a bad tensor, a layer that does not exist or ``cells`` of the wrong shape.
    """
    config = config or PriorConfig()
    vm = clip.model.vision_model
    blocks = vision_layers(vm)
    wanted = [_layer_index(i, len(blocks)) for i in layers]
    deepest = max(wanted)
    with torch.inference_mode(False), torch.no_grad():
        hidden = embed(vm, _prepare_pixels(clip, pixel_values), config.pos_interpolation)
        if cells is not None and tuple(cells.shape) != (hidden.shape[0], hidden.shape[1] - 1):
            raise InvalidInputError(f"cells must be (B, h*w) = {(hidden.shape[0], hidden.shape[1] - 1)}, "
                                    f"got {tuple(cells.shape)}")
        kept: dict[int, torch.Tensor] = {}
        for index in range(deepest if cells is not None else deepest + 1):
            hidden = run_layer(blocks[index], hidden)
            if index in wanted:
                kept[index] = hidden[:, 1:]
        if cells is not None:
            last = torch.zeros_like(hidden[:, 1:])
            for b, row_mask in enumerate(cells.to(hidden.device).bool()):
                rows = torch.nonzero(row_mask).flatten()
                if rows.numel():
                    last[b, rows] = run_layer_rows(blocks[deepest], hidden[b:b + 1], rows + 1)[0]
            kept[deepest] = last
    return torch.stack([kept[i] for i in wanted], dim=1)


@dataclass
class VTPResult:
    """Output of :func:`vtp` for P (image, class) pairs of B images.

    Attributes:
        cam: (P, h, w) float32, normalised softmax Grad-CAM on the patch grid.
        image_index: (P,) long, the image of each pair.
        scores: (P,) float32, the softmax probability of each pair's target prompt.
        attention: (P, h*w, h*w) float32 head- and layer-averaged patch-to-patch attention of the
            last ``config.pir_layers`` layers (with ``return_attention``), else ``None``.
        features: (B, L, h*w, D) hidden states after ``config.vvp_layers`` (with
            ``return_features``), else ``None``.
    """

    cam: torch.Tensor
    image_index: torch.Tensor
    scores: torch.Tensor
    attention: torch.Tensor | None = None
    features: torch.Tensor | None = None


def _class_sets(targets: Sequence[str], context: Sequence[Sequence[str]] | None) -> list[list[str]]:
    if context is not None and len(context) != len(targets):
        raise InvalidInputError(f"context has {len(context)} entries for {len(targets)} target classes; "
                                f"pass one list of context classes per pair")
    sets = []
    for i, target in enumerate(targets):
        names = [target]
        for name in (context[i] if context is not None else ()):
            if name not in names:
                names.append(name)
        sets.append(names)
    return sets


def vtp(
    clip: ClipBundle,
    pixel_values: torch.Tensor,
    classes: Sequence[str],
    *,
    image_index: Sequence[int] | torch.Tensor | None = None,
    context: Sequence[Sequence[str]] | None = None,
    text: TextFeatures | None = None,
    config: PriorConfig | None = None,
    return_attention: bool = False,
    return_features: bool = False,
) -> VTPResult:
    """Visual-text prior: softmax Grad-CAM of "a photo of {c}." against "a photo without {c}.".

    One pass runs all layers but the last without gradients on the B images; the last layer runs
    with gradients on the P (image, class) pairs, and a single backward of the summed target
    scores gives every pair its own Grad-CAM (the pairs' scores are independent).

    Args:
        clip: The loaded CLIP.
        pixel_values: (B, 3, H, W) normalised images (see :func:`clipprior.preprocess.preprocess_query`).
        classes: P target class prompt names.
        image_index: (P,) image of each pair; ``None`` means pair i is image i (P == B).
        context: Per pair, extra class names whose prompts join the softmax (the official code
            passes every class present in the query's ground truth). ``None``: target alone.
        text: Precomputed text features holding every name used; encoded on the fly if ``None``.
        config: Knobs; defaults to :class:`PriorConfig`.
        return_attention: Also return the PIR attention (P, n, n).
        return_features: Also return the VVP layer features (B, L, n, D).

    Returns:
        A :class:`VTPResult`; ``cam`` is (P, h, w) with (h, w) = (H, W) // patch.

    Raises:
        InvalidInputError: for an empty class list, a bad image index, NaN/Inf pixels or an image
            smaller than one patch.

    Example:
        >>> out = vtp(clip, pixels, ["cat", "dog"], image_index=[0, 0])  # doctest: +SKIP
        >>> out.cam.shape  # doctest: +SKIP
        torch.Size([2, 14, 14])
    """
    config = config or PriorConfig()
    classes = [str(c) for c in classes]
    if not classes:
        raise InvalidInputError("empty class list; pass at least one target class per image")
    pixels = _prepare_pixels(clip, pixel_values)
    batch = pixels.shape[0]
    if image_index is None:
        if len(classes) != batch:
            raise InvalidInputError(f"{len(classes)} classes for {batch} images; pass image_index to pair them")
        index = torch.arange(batch)
    else:
        index = torch.as_tensor(image_index, dtype=torch.long).reshape(-1).cpu()
        if index.numel() != len(classes) or (index.numel() and (index.min() < 0 or index.max() >= batch)):
            raise InvalidInputError(f"image_index {index.tolist()} must hold {len(classes)} indices in [0, {batch})")
    sets = _class_sets(classes, context)
    if text is None:
        text = encode_text(clip, sorted({n for s in sets for n in s}), config)
    return vtp_pass(clip, pixels, index, sets, text, config, return_attention=return_attention,
                    return_features=return_features)


def _text_matrix(sets: list[list[str]], text: TextFeatures, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, 2*Cmax, E) prompts [fg(set); bg(set)] per pair, and a (P, 2*Cmax) validity mask."""
    width = max(len(s) for s in sets)
    emb = text.fg.shape[1]
    matrix = torch.zeros(len(sets), 2 * width, emb, device=device)
    valid = torch.zeros(len(sets), 2 * width, dtype=torch.bool, device=device)
    for p, names in enumerate(sets):
        rows = torch.tensor([text.index(n) for n in names], device=text.fg.device)
        matrix[p, : len(names)] = text.fg[rows].to(device)
        matrix[p, width: width + len(names)] = text.bg[rows].to(device)
        valid[p, : len(names)] = True
        valid[p, width: width + len(names)] = True
    return matrix, valid


def vtp_pass(
    clip: ClipBundle,
    pixels: torch.Tensor,
    image_index: torch.Tensor,
    class_sets: Sequence[Sequence[str]],
    text: TextFeatures,
    config: PriorConfig | None = None,
    *,
    return_attention: bool = False,
    return_features: bool = False,
) -> VTPResult:
    """The query pass behind :func:`vtp`, for callers that prepare their own batches (the engine).

    Layers 1..L-1 run once without gradients on the B images; the last layer runs with gradients
    on the P (image, class set) pairs; one backward of the summed target scores gives every pair
    its Grad-CAM. Unlike :func:`vtp`, nothing is re-validated or encoded here: the pixels are used
    on the model's device and dtype as given (moved there if needed, not checked for NaN/Inf), and
    ``text`` must hold every name of ``class_sets``.

    Args:
        clip: The loaded CLIP.
        pixels: (B, 3, H, W) normalised images (see :func:`clipprior.preprocess.preprocess_query`).
        image_index: (P,) long, the image of each pair (on any device).
        class_sets: P lists of prompt names: the pair's target first, then its context classes
            (whose prompts join the softmax).
        text: Text features holding every name of ``class_sets`` (see :func:`encode_text`).
        config: Knobs; defaults to :class:`PriorConfig`.
        return_attention: Also record the PIR attention (P, n, n).
        return_features: Also return the hidden states after ``config.vvp_layers`` (B, L', n, D).

    Returns:
        A :class:`VTPResult`: ``cam`` (P, h, w) and ``scores`` (P,) float32 on the model's device,
        ``image_index`` as given, ``attention`` (P, n, n) float32, ``features`` (B, L', n, D) in
        the model's dtype.

    Raises:
        InvalidInputError: if ``image_index`` and ``class_sets`` disagree in length, a pair has no
            class, or a layer of ``config`` does not exist in the model.
        ConfigError: if ``config.pir_layers`` exceeds the model's layer count.

    Example:
        >>> out = vtp_pass(clip, pixels, torch.tensor([0, 0]), [["cat"], ["dog", "cat"]], text,
        ...                return_attention=True)  # doctest: +SKIP
        >>> out.cam.shape, out.attention.shape  # doctest: +SKIP
        (torch.Size([2, 14, 14]), torch.Size([2, 196, 196]))
    """
    config = config or PriorConfig()
    index = torch.as_tensor(image_index, dtype=torch.long).reshape(-1)
    sets = [list(names) for names in class_sets]
    if index.numel() != len(sets) or not sets or any(not names for names in sets):
        raise InvalidInputError(f"image_index has {index.numel()} entries for {len(sets)} class sets; pass one "
                                f"non-empty class set per pair")
    want_attention, want_features = return_attention, return_features
    pixels = pixels.to(device=clip.device, dtype=clip.dtype)
    model = clip.model
    vm = model.vision_model
    blocks = vision_layers(vm)
    n_layers = len(blocks)
    grid = patch_grid(vm.config, pixels.shape[-2], pixels.shape[-1])
    check_config_layers(config, n_layers, pir=want_attention, vvp=want_features)
    feature_ids = [_layer_index(i, n_layers) for i in config.vvp_layers] if want_features else []
    attn_start = max(0, n_layers - config.pir_layers)
    num_heads = int(vm.config.num_attention_heads)
    device = pixels.device
    index_dev = index.to(device)
    kept: dict[int, torch.Tensor] = {}
    scale = float(config.logit_scale) if config.logit_scale is not None else float(model.logit_scale.detach().exp())
    recorder = AttentionRecorder(blocks[attn_start:] if want_attention else [], num_heads)
    with torch.inference_mode(False), recorder:
        # Built here, not in a caller's inference mode: autograd saves it for the backward.
        text_matrix, valid = _text_matrix(sets, text, device)
        with torch.no_grad():
            hidden = embed(vm, pixels, config.pos_interpolation)
            for i in range(n_layers - 1):
                hidden = run_layer(blocks[i], hidden)
                if i in feature_ids:
                    kept[i] = hidden[:, 1:]
        recorder.take_rows(index_dev)
        last_in = hidden.index_select(0, index_dev).detach().requires_grad_(True)
        with torch.enable_grad(), ActivationRecorder(blocks[-1].layer_norm1) as act:
            out = run_layer(blocks[-1], last_in)
            tokens = vm.post_layernorm(out)
            image_emb = model.visual_projection(tokens[:, 1:].mean(dim=1)).float()
            image_emb = image_emb / image_emb.norm(dim=-1, keepdim=True)
            logits = scale * torch.einsum("pe,pce->pc", image_emb, text_matrix)
            probs = torch.softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)
            scores = probs[:, 0]
            torch.autograd.backward(scores.sum(), inputs=[act.activation])
            activation = act.activation.detach().float()[:, 1:]
            gradient = act.gradient
        if gradient is None:
            raise RuntimeError("Grad-CAM gradient was not captured; the last layer's layer_norm1 did not run")
        gradient = gradient.float()[:, 1:]
        weights = gradient.mean(dim=1, keepdim=True)
        cam = torch.relu((activation * weights).sum(dim=-1)).reshape(-1, *grid)
        cam = minmax_normalize(cam, config.cam_eps, config.cam_norm_passes)
        attention = recorder.mean_attention()[:, 1:, 1:] if want_attention else None
    features = None
    if want_features:
        # Outside the attention recorder: images without pairs re-run the last layer on another batch.
        last = n_layers - 1
        if last in feature_ids:
            with torch.inference_mode(False):
                kept[last] = _last_layer_per_image(blocks[-1], hidden, out.detach(), index_dev)[:, 1:]
        features = torch.stack([kept[i] for i in feature_ids], dim=1)
    return VTPResult(cam=cam, image_index=index, scores=scores.detach(), attention=attention, features=features)


def _last_layer_per_image(layer: torch.nn.Module, hidden: torch.Tensor, pair_out: torch.Tensor,
                          index: torch.Tensor) -> torch.Tensor:
    """Last-layer output per image, reusing the pair rows and running the layer for images without pairs."""
    batch = hidden.shape[0]
    result = torch.empty_like(hidden)
    first = torch.full((batch,), -1, dtype=torch.long, device=hidden.device)
    for p in range(index.numel() - 1, -1, -1):
        first[index[p]] = p
    seen = first >= 0
    if seen.any():
        result[seen] = pair_out[first[seen]]
    if (~seen).any():
        with torch.no_grad():
            result[~seen] = run_layer(layer, hidden[~seen])
    return result


# ----------------------------------------------------------------------------------------------
# PIR


@dataclass
class PIRResult:
    """Output of :func:`pir`.

    Attributes:
        refined: (P, H, W) final prior (normalised, resized to ``output_size``) or (P, h, w).
        refined_grid: (P, h, w) ``R @ cam`` before the final normalisation.
        box_mask: (P, h, w) bool box mask B.
    """

    refined: torch.Tensor
    refined_grid: torch.Tensor
    box_mask: torch.Tensor


def pir(
    cam: torch.Tensor,
    attention: torch.Tensor,
    *,
    config: PriorConfig | None = None,
    output_size: tuple[int, int] | None = None,
    mask: torch.Tensor | None = None,
) -> PIRResult:
    """Prior information refinement: (P, h, w) CAM + (P, n, n) attention -> refined prior.

    D = Sinkhorn(attention); R = max(D, D D^T) (then R @ R when ``config.pir_square``);
    columns outside the box mask B are zeroed; refined = R @ cam, min-max normalised and resized.

    Args:
        cam: Normalised CAMs from :func:`vtp`.
        attention: Patch-to-patch attention from :func:`vtp` (``return_attention=True``).
        config: Knobs; defaults to :class:`PriorConfig`.
        output_size: (H, W) of the final prior (bilinear, half-pixel centres); ``None`` keeps the grid.
        mask: A precomputed box mask (P, h, w); computed from ``cam`` when ``None``.

    Returns:
        A :class:`PIRResult`.

    Raises:
        InvalidInputError: if the shapes disagree, a tensor holds NaN/Inf or ``output_size`` is
            not two positive integers.

    Example:
        >>> res = pir(out.cam, out.attention, output_size=(375, 500))  # doctest: +SKIP
    """
    config = config or PriorConfig()
    if cam.ndim != 3:
        raise InvalidInputError(f"cam must be (P, h, w), got {tuple(cam.shape)}")
    n = cam.shape[1] * cam.shape[2]
    if attention.shape != (cam.shape[0], n, n):
        raise InvalidInputError(
            f"attention must be (P, h*w, h*w) = {(cam.shape[0], n, n)}, got {tuple(attention.shape)}"
        )
    if output_size is not None:
        _check_size(output_size)
    check_finite("cam", cam)
    check_finite("attention", attention)
    cam32 = cam.float()
    d = sinkhorn(attention.float(), config.pir_sinkhorn_iters)
    r = torch.maximum(d, d @ d.transpose(-1, -2))
    b = box_mask(cam32, config.pir_box_threshold) if mask is None else mask.to(cam.device).bool()
    # Zeroing R's columns outside B and multiplying by the CAM is R @ (B * cam); with the squaring,
    # (R R) @ v = R @ (R @ v): two matrix-vector products instead of an n^3 product (as row sums,
    # which do not depend on the batch size the way bmm's blocking does).
    refined_grid = (r * (cam32.reshape(-1, 1, n) * b.reshape(-1, 1, n).to(r.dtype))).sum(dim=-1)
    if config.pir_square:
        refined_grid = (r * refined_grid[:, None, :]).sum(dim=-1)
    refined_grid = refined_grid.reshape(cam.shape)
    refined = minmax_normalize(refined_grid, config.cam_eps)
    if output_size is not None:
        refined = resize_maps(refined, output_size)
    return PIRResult(refined=refined, refined_grid=refined_grid, box_mask=b)


def _check_size(size: object, name: str = "output_size") -> tuple[int, int]:
    """``size`` as (H, W) positive ints, else InvalidInputError naming it."""
    try:
        height, width = (int(v) for v in size)  # type: ignore[attr-defined]
        valid = (height, width) == tuple(size) and height > 0 and width > 0  # type: ignore[arg-type]
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise InvalidInputError(f"{name}={size!r} is not a size; pass (height, width), two positive integers")
    return height, width


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with half-pixel centres (OpenCV INTER_LINEAR): (P, h, w) -> (P, H, W).

    Raises:
        InvalidInputError: if ``size`` is not two positive integers.
    """
    return resize_bilinear(maps, _check_size(size, "size"))


# ----------------------------------------------------------------------------------------------
# VVP


@dataclass(frozen=True)
class SupportCells:
    """Supports' features on their foreground cells: what the cosine-max of VVP reads.

    Cells outside a support's mask carry zero vectors in the official computation, whose cosine
    with any query patch is 0: keeping only the foreground cells, and clamping the maximum at 0
    where the support has a background cell, gives the same maps for a fraction of the memory and
    work. N supports with different foreground counts are padded to the largest count ``f``.

    Attributes:
        features: (N, L, f, D) float32 features of the foreground cells (zeros in the padding).
        norms: (N, L, f) float32 their L2 norms.
        valid: (N, f) bool, which of the f slots hold a foreground cell.
        has_background: (N,) bool, whether some cell of the support's grid lies outside its mask.

    Example:
        >>> cells = SupportCells.from_grid(torch.randn(2, 1, 4, 3), torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0]]))
        >>> tuple(cells.features.shape), cells.valid.tolist()
        ((2, 1, 2, 3), [[True, True], [True, False]])
    """

    features: torch.Tensor
    norms: torch.Tensor
    valid: torch.Tensor
    has_background: torch.Tensor

    @classmethod
    def from_grid(cls, features: torch.Tensor, mask: torch.Tensor) -> SupportCells:
        """Keep the foreground cells: (N, L, m, D) features + (N, m) mask of each support's grid.

        Runs on the features' device; the order of the cells is kept (row-major on the grid).

        Raises:
            InvalidInputError: if the shapes disagree.
        """
        if features.ndim != 4 or mask.shape != (features.shape[0], features.shape[2]):
            raise InvalidInputError(f"features must be (N, L, m, D) and mask (N, m); got {tuple(features.shape)} "
                                    f"and {tuple(mask.shape)}")
        mask = mask.to(features.device).bool()
        counts = mask.sum(dim=1)
        width = int(counts.max()) if mask.numel() else 0
        # Slot of each foreground cell: its rank among the support's foreground cells.
        slot = torch.where(mask, mask.long().cumsum(dim=1) - 1, width)
        n, layers, _, dim = features.shape
        cells = features.new_zeros((n, layers, width + 1, dim), dtype=torch.float32)
        cells.scatter_(2, slot[:, None, :, None].expand(n, layers, -1, dim), features.float())
        cells = cells[:, :, :width].contiguous()
        valid = torch.arange(width, device=mask.device)[None, :] < counts[:, None]
        return cls(cells, cells.norm(dim=-1), valid, (~mask).any(dim=1))

    @classmethod
    def cat(cls, parts: Sequence[SupportCells]) -> SupportCells:
        """Concatenate along N, padding every part to the largest foreground count.

        Raises:
            InvalidInputError: for an empty sequence.
        """
        if not parts:
            raise InvalidInputError("no SupportCells to concatenate")
        width = max(int(p.features.shape[2]) for p in parts)

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            extra = width - t.shape[dim]
            if not extra:
                return t
            shape = list(t.shape)
            shape[dim] = extra
            return torch.cat([t, t.new_zeros(shape)], dim=dim)

        return cls(
            torch.cat([pad(p.features, 2) for p in parts]),
            torch.cat([pad(p.norms, 2) for p in parts]),
            torch.cat([pad(p.valid, 1) for p in parts]),
            torch.cat([p.has_background for p in parts]),
        )

    def to(self, device: torch.device | str) -> SupportCells:
        """The same cells on ``device``."""
        return SupportCells(*(t.to(device) for t in (self.features, self.norms, self.valid, self.has_background)))


def best_cosine_match(query: torch.Tensor, query_norms: torch.Tensor, cells: SupportCells, eps: float = 1e-7
                      ) -> torch.Tensor:
    """Per query patch, the best cosine among a support's foreground cells: the VVP map.

    ``P(j) = max_i q_j . s_i / (|q_j| |s_i| + eps)`` over the foreground cells i, clamped at 0 where
    the support has a background cell (whose zero vector gives cosine 0, as in the official code).
    A support without foreground cells gives 0. This is the one implementation of VVP's
    cosine-max: :func:`vvp`, :func:`vvp_from_features` and the precompute engine call it. Runs on
    the device of its inputs, batched over the N (query, support) pairs.

    Args:
        query: (N, L, n, D) query patch features (any float dtype; computed in float32), one row per
            (query, support) pair: expand a query over its K shots with ``expand`` (no copy).
        query_norms: (N, L, n) their L2 norms.
        cells: The N supports' foreground cells (see :meth:`SupportCells.from_grid`).
        eps: Added to the product of norms.

    Returns:
        (N, L, n) float32.

    Raises:
        InvalidInputError: if the shapes disagree.

    Example:
        >>> q = torch.randn(1, 2, 6, 4)
        >>> cells = SupportCells.from_grid(torch.randn(1, 2, 5, 4), torch.tensor([[1, 1, 0, 0, 0]]))
        >>> best_cosine_match(q, q.norm(dim=-1), cells).shape
        torch.Size([1, 2, 6])
    """
    n, layers, _, dim = query.shape
    shape = cells.features.shape
    if shape[:2] != (n, layers) or shape[-1] != dim or query_norms.shape != query.shape[:3]:
        raise InvalidInputError(f"query {tuple(query.shape)} / norms {tuple(query_norms.shape)} do not match the "
                                f"support cells {tuple(cells.features.shape)}; expected (N, L, n, D) and (N, L, f, D)")
    if cells.features.shape[2] == 0:
        return torch.zeros(query_norms.shape, device=query.device)
    sim = torch.matmul(query.float(), cells.features.transpose(-1, -2))
    sim.div_(query_norms.float()[..., None] * cells.norms[:, :, None, :] + eps)
    sim.masked_fill_(~cells.valid[:, None, None, :], float("-inf"))
    best = sim.amax(dim=-1)
    # -inf (no foreground cell) and negative maxima become 0 where a background cell exists.
    return torch.where(cells.has_background[:, None, None], best.clamp_min(0.0), best)


def vvp_from_cells(query: torch.Tensor, query_norms: torch.Tensor, cells: SupportCells, grid: tuple[int, int], *,
                   eps: float = 1e-7, normalize_maps: bool = True) -> torch.Tensor:
    """VVP of one query against its K supports' foreground cells: (L, n, D), (L, n), K cells -> (L*K, h, w).

    The episode form of :func:`vvp_from_features`, for features already reduced to their cells
    (the precompute engine's support store, a features cache): the query is expanded over the K
    shots without a copy and matched by :func:`best_cosine_match`.

    Args:
        query: (L, n, D) query patch features of the VVP layers.
        query_norms: (L, n) their L2 norms.
        cells: The K supports' foreground cells (:meth:`SupportCells.cat` of each shot, in shot order).
        grid: (h, w) of the query, h * w == n.
        eps: Added to the product of norms.
        normalize_maps: Min-max normalise each map (the paper's Eq. 8).

    Returns:
        (L*K, h, w) float32: layer-major, shots inner.

    Raises:
        InvalidInputError: if the shapes disagree.

    Example:
        >>> q = torch.randn(2, 6, 4)
        >>> cells = SupportCells.from_grid(torch.randn(3, 2, 5, 4), torch.ones(3, 5))
        >>> vvp_from_cells(q, q.norm(dim=-1), cells, (2, 3)).shape
        torch.Size([6, 2, 3])
    """
    if query.ndim != 3 or query_norms.shape != query.shape[:2] or query.shape[1] != grid[0] * grid[1]:
        raise InvalidInputError(f"query must be (L, n, D) with n = h * w of grid {tuple(grid)} and norms (L, n); got "
                                f"{tuple(query.shape)} and {tuple(query_norms.shape)}")
    shots = int(cells.features.shape[0])
    expanded = query[None].expand(shots, *query.shape), query_norms[None].expand(shots, *query_norms.shape)
    best = best_cosine_match(*expanded, cells, eps).reshape(-1, *grid)  # (K*L, h, w)
    if normalize_maps:
        best = minmax_normalize(best, eps)
    return best.reshape(shots, -1, *grid).transpose(0, 1).reshape(-1, *grid)  # (L, K, h, w) -> layer-major


def vvp_from_features(
    query_features: torch.Tensor,
    support_features: torch.Tensor,
    support_mask: torch.Tensor,
    grid: tuple[int, int],
    *,
    eps: float = 1e-7,
    normalize_maps: bool = False,
) -> torch.Tensor:
    """Best cosine match of each query patch among the masked support patches.

    Args:
        query_features: (B, L, n, D) query patch features.
        support_features: (B, K, L, m, D) support patch features.
        support_mask: (B, K, m) support foreground on the support's patch grid.
        grid: (h, w) of the query, h * w == n.
        eps: Added to the product of norms.
        normalize_maps: Min-max normalise each map (the paper's Eq. 8).

    Returns:
        (B, L*K, h, w) float32: layer-major, shots inner (layer 0 shots 1..K, layer 1 shots 1..K, ...).

    Raises:
        InvalidInputError: if the shapes disagree.
    """
    if query_features.ndim != 4 or support_features.ndim != 5 or support_features.shape[0] != query_features.shape[0]:
        raise InvalidInputError(f"query_features must be (B, L, n, D) and support_features (B, K, L, m, D); got "
                                f"{tuple(query_features.shape)} and {tuple(support_features.shape)}")
    batch, shots = support_features.shape[:2]
    cells = SupportCells.from_grid(support_features.flatten(0, 1), support_mask.reshape(batch * shots, -1))
    q = query_features.float()
    qn = q.norm(dim=-1)
    expand = (batch, shots, *q.shape[1:])
    best = best_cosine_match(q[:, None].expand(expand).flatten(0, 1), qn[:, None].expand(expand[:-1]).flatten(0, 1),
                             cells, eps)  # (B*K, L, n)
    maps = best.reshape(batch, shots, q.shape[1], -1).transpose(1, 2).reshape(batch, -1, *grid)
    if normalize_maps:
        maps = minmax_normalize(maps.reshape(-1, *grid), eps).reshape(maps.shape)
    return maps


def _grid_mask(labels: torch.Tensor, grid: tuple[int, int], mode: str) -> torch.Tensor:
    """(N, H, W) labels -> (N, h*w) bool foreground (label == 1) on the patch grid."""
    fg = (labels == 1).float()[:, None]
    if mode == "nearest":
        small = resize_nearest(fg, grid, exact=False)
    else:
        small = (F.adaptive_avg_pool2d(fg, grid) >= 0.5).float()
    return small[:, 0].reshape(labels.shape[0], -1) > 0


def _check_support_labels(labels: torch.Tensor, images: torch.Tensor) -> None:
    if tuple(labels.shape[-2:]) != tuple(images.shape[-2:]):
        raise InvalidInputError(
            f"support mask of size {tuple(labels.shape[-2:])} does not match its image of size "
            f"{tuple(images.shape[-2:])}; resize the mask with nearest-neighbour interpolation"
        )
    empty = ~(labels == 1).flatten(start_dim=-2).any(dim=-1)
    if empty.any():
        where = [tuple(int(v) for v in idx) for idx in torch.nonzero(empty).tolist()]
        raise InvalidInputError(
            f"support mask(s) at {where} have no foreground pixel (label == 1); a support needs its object"
        )


def support_features(clip: ClipBundle, pixel_values: torch.Tensor, labels: torch.Tensor,
                     config: PriorConfig | None = None, *, foreground_only: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked support features: (N, 3, H, W) + (N, H, W) labels -> (N, L, h*w, D), (N, h*w) mask.

    The pixels are multiplied by ``labels == 1`` before CLIP sees them; the features of cells
    outside the (nearest-resized) mask are later ignored by :func:`vvp_from_features`.

    Args:
        clip: The loaded CLIP.
        pixel_values: Normalised support pixels.
        labels: Support labels (1 = target).
        config: Knobs; defaults to :class:`PriorConfig`.
        foreground_only: Compute the deepest VVP layer on the mask's cells only (its other cells
            are zeros; see ``cells`` of :func:`layer_features`): the same VVP for less work.

    Raises:
        InvalidInputError: for an empty mask, a size mismatch or NaN/Inf pixels.
    """
    config = config or PriorConfig()
    check_config_layers(config, clip.num_layers, pir=False)
    pixels = _prepare_pixels(clip, pixel_values, "supports")
    labels = torch.as_tensor(labels, device=pixels.device)
    _check_support_labels(labels, pixels)
    masked = pixels * (labels == 1)[:, None].to(pixels.dtype)
    grid = patch_grid(clip.model.config.vision_config, pixels.shape[-2], pixels.shape[-1])
    mask = _grid_mask(labels, grid, config.vvp_mask_resize)
    feats = layer_features(clip, masked, config.vvp_layers, config, cells=mask if foreground_only else None)
    return feats, mask


def vvp(
    clip: ClipBundle,
    query: torch.Tensor,
    supports: torch.Tensor,
    support_labels: torch.Tensor,
    *,
    config: PriorConfig | None = None,
) -> torch.Tensor:
    """Visual-visual prior: (B, 3, H, W), (B, K, 3, Hs, Ws), (B, K, Hs, Ws) -> (B, L*K, h, w).

    Per query patch, the best cosine similarity among the support's foreground patches, from the
    hidden states of ``config.vvp_layers`` (the last two layers, last first, by default).

    Args:
        clip: The loaded CLIP.
        query: Normalised query pixels.
        supports: Normalised support pixels, K shots per query.
        support_labels: Support labels (1 = target, 0 = background, 255 = ignore).
        config: Knobs; defaults to :class:`PriorConfig`.

    Returns:
        (B, L*K, h, w) float32, channels layer-major (L layers x K shots); values in [0, 1] for
        the ReLU-free cosines clipped at 0 by the masked zeros.

    Raises:
        InvalidInputError: for mismatched shapes, an empty support mask or NaN/Inf pixels.

    Example:
        >>> vvp(clip, x, s_x, s_y).shape  # doctest: +SKIP
        torch.Size([1, 2, 29, 29])
    """
    config = config or PriorConfig()
    if supports.ndim != 5 or support_labels.ndim != 4:
        raise InvalidInputError(
            f"supports must be (B, K, 3, H, W) and support_labels (B, K, H, W); got {tuple(supports.shape)} "
            f"and {tuple(support_labels.shape)}"
        )
    batch, shots = supports.shape[:2]
    if query.shape[0] != batch or tuple(support_labels.shape[:2]) != (batch, shots):
        raise InvalidInputError(
            f"batch/shot sizes disagree: query {tuple(query.shape)}, supports {tuple(supports.shape)}, "
            f"support_labels {tuple(support_labels.shape)}"
        )
    check_config_layers(config, clip.num_layers, pir=False)
    qf = layer_features(clip, query, config.vvp_layers, config)
    sf, smask = support_features(clip, supports.flatten(0, 1), support_labels.flatten(0, 1), config)
    grid = patch_grid(clip.model.config.vision_config, query.shape[-2], query.shape[-1])
    return vvp_from_features(
        qf, sf.reshape(batch, shots, *sf.shape[1:]), smask.reshape(batch, shots, -1), grid,
        eps=config.vvp_eps, normalize_maps=config.vvp_normalize,
    )


# ----------------------------------------------------------------------------------------------
# One episode, from images


@dataclass
class EpisodePriors:
    """The priors of one query for one class, on the query's patch grid.

    Attributes:
        cam: (h, w) raw VTP (normalised softmax Grad-CAM).
        refined: (h, w) PIR-refined VTP (normalised).
        vvp: (C, h, w) VVP (C = layers x shots) or ``None`` without supports.
        image_size: (H, W) of the query image.
    """

    cam: torch.Tensor
    refined: torch.Tensor
    vvp: torch.Tensor | None
    image_size: tuple[int, int]

    def of(self, kind: MapKind) -> torch.Tensor | None:
        """The map of one prior kind of the cache format (an element of :data:`clipprior.cache.PRIORS`).

        Args:
            kind: ``VTP_CAM`` (:attr:`cam`), ``VTP_REFINED`` (:attr:`refined`) or ``VVP_MAPS`` (:attr:`vvp`).

        Returns:
            That map, as computed (``None`` for the VVP without supports).

        Raises:
            InvalidInputError: for a kind that is not a prior.

        Example:
            >>> from clipprior.cache import PRIORS
            >>> {k.name: p.of(k).shape for k in PRIORS}  # doctest: +SKIP
            {'vtp/cam': torch.Size([30, 30]), 'vtp/refined': torch.Size([30, 30]), 'vvp/maps': ...}
        """
        maps = {VTP_CAM: self.cam, VTP_REFINED: self.refined, VVP_MAPS: self.vvp}
        if kind not in maps:
            raise InvalidInputError(f"{kind.name} is not a prior; EpisodePriors holds {[k.name for k in maps]}")
        return maps[kind]

    def resized(self, size: tuple[int, int] | None = None) -> EpisodePriors:
        """The priors resized bilinearly to ``size`` (default: the image size)."""
        size = tuple(size or self.image_size)
        return replace(
            self,
            cam=resize_maps(self.cam[None], size)[0],
            refined=resize_maps(self.refined[None], size)[0],
            vvp=None if self.vvp is None else resize_maps(self.vvp, size),
        )


def softmax_classes(class_name: str, config: PriorConfig | None = None, *, context: Sequence[str] = (),
                    query_label: object = None, class_names: Sequence[str] | None = None,
                    class_id: int | None = None, size: tuple[int, int] | None = None) -> list[str]:
    """The prompt names of one VTP softmax: the target first, then its context classes, each once.

    With ``config.text_classes == "target"`` the context is ``context`` as given (none: the target
    alone); with ``"present"`` (the official preset) it is every other class present in the query's
    ground truth, in class-id order (:func:`present_names`). :func:`compute_priors` and the
    precompute engine both take their class sets from here.

    Args:
        class_name: The target's prompt name.
        config: Knobs (``text_classes``); defaults to :class:`PriorConfig`.
        context: ``"target"``: extra classes for the softmax. Must be empty with ``"present"``.
        query_label: ``"present"``: the query's (H, W) class ids.
        class_names: ``"present"``: prompt name of class id c at index c - 1.
        class_id: ``"present"``: the target's id in ``query_label`` (default: the position of
            ``class_name`` in ``class_names``, plus one).
        size: ``"present"``: the query image's (H, W), which ``query_label`` must match (not checked
            when ``None``).

    Returns:
        The class set, target first (what :func:`vtp_pass` takes per pair).

    Raises:
        InvalidInputError: with ``"present"``: no ``query_label`` or ``class_names``, a ``context``
            besides, a label of another size than ``size``, or a target not among ``class_names``.

    Example:
        >>> softmax_classes("cat", context=["dog", "cat"])
        ['cat', 'dog']
        >>> from clipprior.config import get_preset
        >>> label = np.array([[0, 8], [15, 8]], np.uint8)  # class ids
        >>> names = [f"class{c}" for c in range(1, 21)]
        >>> softmax_classes("class8", get_preset("official"), query_label=label, class_names=names)
        ['class8', 'class15']
    """
    config = config or PriorConfig()
    if config.text_classes == "present":
        if query_label is None or class_names is None:
            raise InvalidInputError(
                "config.text_classes='present' (the official preset) puts the classes present in the query's "
                "ground truth into the softmax: pass query_label= (the query's (H, W) class ids) and class_names= "
                "(prompt name of class id c at index c - 1), or use a config with text_classes='target'")
        if context:
            raise InvalidInputError(f"context={list(context)} and text_classes='present' both set the softmax "
                                    f"classes; pass query_label= alone (or text_classes='target' with context=)")
        label = np.asarray(query_label)
        if size is not None and label.shape != tuple(size):
            raise InvalidInputError(f"query_label of size {label.shape} does not match the query image of size "
                                    f"{tuple(size)}; pass the label map of that image")
        names = list(class_names)
        if class_id is None:
            if class_name not in names:
                raise InvalidInputError(f"class {class_name!r} is not among class_names {names[:10]}...; pass the "
                                        f"prompt names the label's class ids refer to")
            class_id = names.index(class_name) + 1
        context = present_names(label, class_id, names)
    return _class_sets([class_name], [list(context)])[0]


def _prepare_support(image: ImageLike, label: np.ndarray, patch: int, config: PriorConfig
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """A support's VVP pixels and label in ``config.geometry`` (see :func:`~clipprior.preprocess.vvp_inputs`)."""
    pixels, lab = vvp_inputs(image, np.asarray(label), patch, config)
    return pixels, torch.as_tensor(lab)


def compute_priors(
    clip: ClipBundle,
    query: ImageLike,
    class_name: str,
    supports: Sequence[ImageLike] = (),
    support_masks: Sequence[np.ndarray] = (),
    *,
    context: Sequence[str] = (),
    config: PriorConfig | None = None,
    query_label: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
) -> EpisodePriors:
    """VTP, PIR and VVP of one episode, from images, in ``config.geometry``.

    Native geometry: the query is resized up to a multiple of the patch size (as the official VTP
    path does); its VTP pass also yields the VVP query features when ``config.vvp_pixel_norm ==
    "clip"``. Each support is prepared the same way, masked by its label and compared on its own
    grid. Official geometry: VTP on :func:`~clipprior.preprocess.vtp_image`, VVP on the query and
    supports stretched to ``config.geometry_size`` squared (the trainers' tensors), so the VVP grid
    is that square's patch grid.

    Args:
        clip: The loaded CLIP.
        query: (H, W, 3) RGB image (any PIL mode is converted).
        class_name: The target class's prompt name.
        supports: K support images of the class (may be empty: no VVP).
        support_masks: K (Hs, Ws) labels (1 = target).
        context: Extra class names for the softmax (see :func:`vtp`), with ``text_classes="target"``.
        config: Knobs; defaults to :class:`PriorConfig`. Every field is honoured; with
            ``text_classes="present"`` (the ``official`` preset) the softmax classes come from
            ``query_label``, which must then be given.
        query_label: (H, W) class ids of the query (its ground truth), for ``text_classes="present"``:
            the classes present in it join the softmax (see :func:`present_names`). Not read otherwise.
        class_names: Prompt name of class id c at index c - 1 (with ``query_label``); ``class_name``
            must be among them.

    Returns:
        :class:`EpisodePriors` on the query's patch grid; ``.resized()`` maps it to the image.

    Raises:
        InvalidInputError: for mismatched supports and masks, empty masks, unusable images, or
            ``text_classes="present"`` without ``query_label`` and ``class_names`` (or with ``context``).

    Example:
        >>> pri = compute_priors(clip, image, "cat", [support], [mask])  # doctest: +SKIP
        >>> official = compute_priors(clip, image, "cat", [support], [mask], config=get_preset("official"),
        ...                           query_label=label, class_names=PASCAL_CLASSES)  # doctest: +SKIP
        >>> pri.resized().refined.shape  # doctest: +SKIP
        torch.Size([375, 500])
    """
    config = config or PriorConfig()
    if len(supports) != len(support_masks):
        raise InvalidInputError(f"{len(supports)} support images but {len(support_masks)} support masks")
    patch = clip.patch_size
    rgb = to_rgb_array(query)
    names = softmax_classes(class_name, config, context=context, query_label=query_label, class_names=class_names,
                            size=rgb.shape[:2])
    pixels = normalize(vtp_image(rgb, patch, config), "clip")[None]
    reuse = config.vvp_shares_query_pass
    out = vtp(clip, pixels, [class_name], context=[names[1:]], config=config, return_attention=True,
              return_features=bool(supports) and reuse)
    refined = pir(out.cam, out.attention, config=config).refined
    maps = None
    if supports:
        query_feats = out.features
        grid = tuple(out.cam.shape[-2:])
        if query_feats is None:
            qpix = vvp_inputs(rgb, None, patch, config)[0]
            query_feats = layer_features(clip, qpix[None], config.vvp_layers, config)
            grid = patch_grid(clip.model.config.vision_config, qpix.shape[-2], qpix.shape[-1])
        feats, masks = [], []
        for image, label in zip(supports, support_masks, strict=True):
            spix, slab = _prepare_support(image, label, patch, config)
            f, m = support_features(clip, spix[None], slab[None], config)
            feats.append(f)
            masks.append(m)
        # Supports may differ in size: concatenate their cells (max over cells is per shot).
        maps = torch.cat([
            vvp_from_features(query_feats, f[:, None], m[:, None], grid,
                              eps=config.vvp_eps, normalize_maps=config.vvp_normalize)
            for f, m in zip(feats, masks, strict=True)
        ], dim=1)
        layers = len(config.vvp_layers)
        maps = maps.reshape(1, len(supports), layers, *maps.shape[-2:]).transpose(1, 2).reshape(
            1, layers * len(supports), *maps.shape[-2:])
    return EpisodePriors(
        cam=out.cam[0], refined=refined[0], vvp=None if maps is None else maps[0], image_size=rgb.shape[:2]
    )
