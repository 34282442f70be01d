"""Pictures of priors: colormaps, heat-map and mask overlays, Fig. 4-style panels and an HTML index.

Everything is numpy + Pillow (no matplotlib). A prior is drawn as a heat map over its image
with a colour bar; a mask as a tinted region with a contour. Panels are grids of titled tiles,
one row per episode, laid out like PI-CLIP's Fig. 4 (query with its ground truth, supports with
their masks, VVP, VTP raw and VTP refined).

Example:
    >>> import numpy as np
    >>> image = np.full((64, 96, 3), 128, dtype=np.uint8)
    >>> prior = np.linspace(0, 1, 4 * 6).reshape(4, 6)          # a patch-grid map
    >>> panel = episode_panel(image, {"VTP": prior}, class_name="cat")
    >>> panel.mode, panel.height > 64
    ('RGB', True)
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from clipprior._resize import resize_bilinear
from clipprior.errors import InvalidInputError
from clipprior.preprocess import ImageLike, to_rgb_array

if TYPE_CHECKING:
    from clipprior.evaluate import EpisodeData

__all__ = [
    "COLORMAPS",
    "HtmlEntry",
    "Tile",
    "cached_episode_panel",
    "colorbar",
    "colorize",
    "colormap",
    "compose_panel",
    "episode_panel",
    "episode_row",
    "heatmap_overlay",
    "mask_contour",
    "mask_overlay",
    "resize_map",
    "write_html_index",
]

ArrayLike = np.ndarray | torch.Tensor

BACKGROUND = (255, 255, 255)
TEXT = (34, 34, 34)
MUTED = (110, 110, 110)
#: Colour of ground-truth / support masks (tint and contour).
MASK_COLOR = (0, 200, 255)

# Anchors (position, r, g, b) of the piecewise-linear colormaps; each becomes a 256-entry LUT.
_ANCHORS: dict[str, list[tuple[float, float, float, float]]] = {
    # A turbo-like rainbow: dark blue -> cyan -> green -> yellow -> red -> dark red.
    "turbo": [
        (0.00, 0.19, 0.07, 0.23), (0.10, 0.27, 0.36, 0.85), (0.20, 0.17, 0.62, 0.98), (0.30, 0.09, 0.84, 0.80),
        (0.40, 0.25, 0.97, 0.52), (0.50, 0.64, 0.99, 0.23), (0.60, 0.91, 0.86, 0.22), (0.70, 0.99, 0.65, 0.15),
        (0.80, 0.94, 0.37, 0.06), (0.90, 0.76, 0.16, 0.01), (1.00, 0.48, 0.02, 0.01),
    ],
    # Perceptually ordered dark-purple -> orange -> light-yellow ramp (magma-like).
    "magma": [
        (0.00, 0.00, 0.00, 0.02), (0.25, 0.32, 0.07, 0.50), (0.50, 0.72, 0.21, 0.47), (0.75, 0.99, 0.53, 0.38),
        (1.00, 0.99, 0.99, 0.75),
    ],
    "gray": [(0.0, 0.0, 0.0, 0.0), (1.0, 1.0, 1.0, 1.0)],
}


def _jet() -> np.ndarray:
    """The classic jet: each channel a clipped tent ``1.5 - |4x - c|`` (blue -> cyan -> yellow -> red)."""
    x = np.linspace(0.0, 1.0, 256)
    rgb = [np.clip(1.5 - np.abs(4.0 * x - c), 0.0, 1.0) for c in (3.0, 2.0, 1.0)]
    return np.round(np.stack(rgb, axis=1) * 255).astype(np.uint8)


def _from_anchors(anchors: list[tuple[float, float, float, float]]) -> np.ndarray:
    a = np.asarray(anchors, dtype=np.float64)
    x = np.linspace(0.0, 1.0, 256)
    rgb = [np.interp(x, a[:, 0], a[:, i]) for i in (1, 2, 3)]
    return np.round(np.stack(rgb, axis=1) * 255).astype(np.uint8)


#: Colormap name -> (256, 3) uint8 lookup table. ``jet`` is the look of PI-CLIP's Fig. 4.
COLORMAPS: dict[str, np.ndarray] = {"jet": _jet(), **{name: _from_anchors(a) for name, a in _ANCHORS.items()}}


def colormap(name: str) -> np.ndarray:
    """The (256, 3) uint8 lookup table of a colormap.

    Args:
        name: One of :data:`COLORMAPS` (``jet``, ``turbo``, ``magma``, ``gray``).

    Returns:
        A read-only (256, 3) uint8 array.

    Raises:
        InvalidInputError: for an unknown name.

    Example:
        >>> colormap("jet")[[0, 255]].tolist()
        [[0, 0, 128], [128, 0, 0]]
    """
    try:
        lut = COLORMAPS[name]
    except KeyError:
        raise InvalidInputError(f"unknown colormap {name!r}; choose one of {sorted(COLORMAPS)}") from None
    lut.setflags(write=False)
    return lut


def _as_map(values: ArrayLike, name: str = "map") -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float32).numpy()
    arr = np.asarray(values, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise InvalidInputError(f"{name} must be a 2-D (H, W) map, got shape {tuple(arr.shape)}")
    return arr


def resize_map(values: ArrayLike, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D map (align_corners=False, as the prior code resizes priors).

    Args:
        values: (h, w) map.
        size: Target (H, W).

    Returns:
        (H, W) float32 map.

    Example:
        >>> resize_map(np.eye(2), (4, 4)).shape
        (4, 4)
    """
    arr = _as_map(values)
    if arr.shape == tuple(size):
        return arr
    return resize_bilinear(torch.from_numpy(np.ascontiguousarray(arr)), size).numpy()


def colorize(values: ArrayLike, cmap: str = "jet", *, vmin: float = 0.0, vmax: float = 1.0) -> np.ndarray:
    """Map values to colours through a colormap LUT.

    Args:
        values: (H, W) map; ``vmin`` maps to the LUT's first colour and ``vmax`` to its last
            (values outside are clipped, NaN draws as the first colour).
        cmap: Colormap name.
        vmin: Value of the lowest colour.
        vmax: Value of the highest colour.

    Returns:
        (H, W, 3) uint8 colours.

    Raises:
        InvalidInputError: if ``vmax <= vmin`` or the map is not 2-D.

    Example:
        >>> colorize(np.array([[0.0, 1.0]]))[0].tolist()
        [[0, 0, 128], [128, 0, 0]]
    """
    if not vmax > vmin:
        raise InvalidInputError(f"vmax={vmax} must be greater than vmin={vmin}")
    arr = np.nan_to_num(_as_map(values), nan=vmin)
    index = np.clip((arr - vmin) / (vmax - vmin), 0.0, 1.0) * 255.0
    return colormap(cmap)[np.round(index).astype(np.intp)]


def heatmap_overlay(
    image: ImageLike, values: ArrayLike, *, alpha: float = 0.5, cmap: str = "jet", vmin: float = 0.0, vmax: float = 1.0
) -> np.ndarray:
    """Blend a colour-mapped prior over an image (the prior is resized to the image first).

    Args:
        image: The image (anything :func:`~clipprior.preprocess.to_rgb_array` takes), (H, W, 3).
        values: (h, w) prior map, any resolution.
        alpha: Weight of the heat-map colours (0: image only, 1: heat map only).
        cmap: Colormap name.
        vmin: Value of the lowest colour.
        vmax: Value of the highest colour.

    Returns:
        (H, W, 3) uint8 image.

    Raises:
        InvalidInputError: if ``alpha`` is outside [0, 1].

    Example:
        >>> heatmap_overlay(np.zeros((8, 8, 3), np.uint8), np.ones((2, 2)), alpha=1.0)[0, 0].tolist()
        [128, 0, 0]
    """
    if not 0.0 <= alpha <= 1.0:
        raise InvalidInputError(f"alpha={alpha} must be in [0, 1]")
    rgb = to_rgb_array(image)
    heat = colorize(resize_map(values, rgb.shape[:2]), cmap, vmin=vmin, vmax=vmax)
    out = (1.0 - alpha) * rgb.astype(np.float32) + alpha * heat.astype(np.float32)
    return np.clip(out.round(), 0, 255).astype(np.uint8)


def mask_contour(mask: ArrayLike, width: int = 2) -> np.ndarray:
    """The boundary band of a binary mask: mask pixels within ``width`` pixels of the outside.

    Args:
        mask: (H, W) binary mask (non-zero = inside).
        width: Band width in pixels (>= 1).

    Returns:
        (H, W) bool map of the contour pixels.

    Example:
        >>> m = np.zeros((5, 5), bool); m[1:4, 1:4] = True
        >>> int(mask_contour(m, 1).sum())           # the 3 x 3 square minus its centre
        8
    """
    m = _as_map(mask, "mask") > 0.5
    inner = ndimage.binary_erosion(m, iterations=max(1, int(width)), border_value=0)
    return m & ~inner


def mask_overlay(
    image: ImageLike,
    mask: ArrayLike,
    *,
    color: tuple[int, int, int] = MASK_COLOR,
    alpha: float = 0.3,
    contour_width: int = 2,
    ignore: ArrayLike | None = None,
) -> np.ndarray:
    """Tint a mask's region over an image and draw its contour.

    Args:
        image: The image, (H, W, 3).
        mask: (H, W) binary mask at the image's resolution (non-zero = inside).
        color: RGB of tint and contour.
        alpha: Tint strength inside the mask.
        contour_width: Contour width in pixels (0: no contour).
        ignore: Optional (H, W) binary map of ignored pixels (drawn hatched in grey).

    Returns:
        (H, W, 3) uint8 image.

    Raises:
        InvalidInputError: if the mask's size differs from the image's.

    Example:
        >>> img = np.zeros((4, 4, 3), np.uint8); m = np.zeros((4, 4), bool); m[:2] = True
        >>> mask_overlay(img, m, alpha=1.0, contour_width=0)[0, 0].tolist()
        [0, 200, 255]
    """
    rgb = to_rgb_array(image).astype(np.float32)
    m = _as_map(mask, "mask") > 0.5
    if m.shape != rgb.shape[:2]:
        raise InvalidInputError(f"mask has shape {m.shape} but the image is {rgb.shape[:2]}; resize it (nearest)")
    tint = np.asarray(color, dtype=np.float32)
    rgb[m] = (1.0 - alpha) * rgb[m] + alpha * tint
    if ignore is not None:
        ign = _as_map(ignore, "ignore") > 0.5
        yy, xx = np.mgrid[: ign.shape[0], : ign.shape[1]]
        hatch = ign & (((yy + xx) // 3) % 3 == 0)
        rgb[hatch] = 0.5 * rgb[hatch] + 0.5 * np.array([200, 200, 200], np.float32)
    if contour_width > 0:
        rgb[mask_contour(m, contour_width)] = tint
    return rgb.round().astype(np.uint8)


# ------------------------------------------------------------------------------------------- layout


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's default font at ``size`` px (the scalable one when FreeType is there)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return int(right - left), int(bottom - top)


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: Any, max_width: int) -> str:
    """Shorten ``text`` with an ellipsis until it fits ``max_width`` pixels."""
    if _text_size(draw, text, font)[0] <= max_width:
        return text
    while text and _text_size(draw, text + "…", font)[0] > max_width:
        text = text[:-1]
    return text + "…"


def colorbar(
    height: int,
    *,
    cmap: str = "jet",
    width: int = 14,
    ticks: Sequence[float] = (0.0, 0.5, 1.0),
    vmin: float = 0.0,
    vmax: float = 1.0,
    label: str | None = "prior",
    font_size: int = 12,
) -> Image.Image:
    """A vertical colour bar with tick labels (high values on top).

    Args:
        height: Height of the bar in pixels.
        cmap: Colormap name.
        width: Width of the colour strip in pixels.
        ticks: Values to label.
        vmin: Value at the bottom.
        vmax: Value at the top.
        label: Caption above the bar (``None``: no caption).
        font_size: Font size of ticks and caption.

    Returns:
        An RGB image of height ``height`` (plus margins for the caption and tick labels).

    Example:
        >>> colorbar(100).mode
        'RGB'
    """
    return _colorbar(height, cmap, width, ticks, vmin, vmax, label, font_size)[0]


def _colorbar(
    height: int, cmap: str, width: int, ticks: Sequence[float], vmin: float, vmax: float, label: str | None,
    font_size: int,
) -> tuple[Image.Image, int]:
    """:func:`colorbar` and the y offset of the top of its colour strip."""
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    tick_texts = [f"{t:g}" for t in ticks]
    tick_w = max((_text_size(probe, t, font)[0] for t in tick_texts), default=0)
    label_w, label_h = _text_size(probe, label, font) if label else (0, 0)
    pad_top = label_h + 8 if label else font_size // 2 + 2
    pad_bottom = font_size // 2 + 2
    total_w = max(width + 6 + tick_w + 4, label_w + 4)
    img = Image.new("RGB", (total_w, height + pad_top + pad_bottom), BACKGROUND)
    ramp = np.linspace(vmax, vmin, height, dtype=np.float32)[:, None].repeat(width, axis=1)
    img.paste(Image.fromarray(colorize(ramp, cmap, vmin=vmin, vmax=vmax)), (0, pad_top))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, pad_top, width - 1, pad_top + height - 1], outline=MUTED)
    for value, text in zip(ticks, tick_texts, strict=True):
        frac = (value - vmin) / (vmax - vmin)
        y = pad_top + round((1.0 - frac) * (height - 1))
        draw.line([(width, y), (width + 3, y)], fill=TEXT)
        draw.text((width + 6, y), text, fill=TEXT, font=font, anchor="lm")
    if label:
        draw.text((0, 2), label, fill=MUTED, font=font)
    return img, pad_top


@dataclass
class Tile:
    """One titled picture of a panel.

    Attributes:
        image: The picture, anything :func:`~clipprior.preprocess.to_rgb_array` takes.
        title: Bold-ish first line above the picture.
        subtitle: Optional second line (e.g. an IoU) in grey.
    """

    image: ImageLike
    title: str = ""
    subtitle: str | None = None


def _scaled(image: ImageLike, height: int) -> Image.Image:
    img = Image.fromarray(to_rgb_array(image))
    width = max(1, round(img.width * height / img.height))
    return img.resize((width, height), Image.BICUBIC) if img.size != (width, height) else img


def compose_panel(
    rows: Sequence[Sequence[Tile]],
    *,
    title: str | None = None,
    row_labels: Sequence[str] | None = None,
    caption: str | None = None,
    tile_height: int = 224,
    cmap: str | None = "jet",
    gap: int = 8,
    margin: int = 16,
) -> Image.Image:
    """Lay tiles out in rows, with titles, optional row labels, a colour bar per row and a caption.

    Args:
        rows: Tiles per row (rows may differ in length; they are left-aligned).
        title: Panel title at the top.
        row_labels: One short label per row, drawn vertically at its left.
        caption: Small grey text at the bottom (wrapped to the panel's width).
        tile_height: Height of every picture in pixels; widths keep the aspect ratio.
        cmap: Colormap of the heat maps, for the colour bars (``None``: no colour bar).
        gap: Space between tiles.
        margin: Outer margin.

    Returns:
        The panel as an RGB image.

    Raises:
        InvalidInputError: if there is no tile or ``row_labels`` has the wrong length.

    Example:
        >>> img = compose_panel([[Tile(np.zeros((10, 20, 3), np.uint8), "a")]], tile_height=50)
        >>> img.height > 50
        True
    """
    if not rows or not any(rows):
        raise InvalidInputError("nothing to draw: pass at least one row with one tile")
    if row_labels is not None and len(row_labels) != len(rows):
        raise InvalidInputError(f"{len(row_labels)} row labels for {len(rows)} rows")
    title_font, head_font, sub_font = _font(20), _font(15), _font(13)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    head_h = _text_size(probe, "Ag", head_font)[1] + 6
    sub_h = _text_size(probe, "Ag", sub_font)[1] + 4
    has_sub = any(t.subtitle for row in rows for t in row)
    text_h = head_h + (sub_h if has_sub else 0) + 4
    label_w = (_text_size(probe, "Ag", head_font)[1] + 12) if row_labels else 0

    scaled = [[_scaled(t.image, tile_height) for t in row] for row in rows]
    bar, bar_top = _colorbar(tile_height, cmap, 14, (0.0, 0.5, 1.0), 0.0, 1.0, "prior", 12) if cmap else (None, 0)
    bar_w = bar.width + gap * 2 if bar else 0
    row_w = [sum(im.width for im in row) + gap * max(0, len(row) - 1) for row in scaled]
    width = margin * 2 + label_w + max(row_w) + bar_w
    title_h = (_text_size(probe, title, title_font)[1] + 14) if title else 0
    caption_lines = _wrap(probe, caption, sub_font, width - 2 * margin) if caption else []
    caption_h = len(caption_lines) * sub_h + (8 if caption_lines else 0)
    row_h = text_h + tile_height
    height = margin * 2 + title_h + len(rows) * row_h + (len(rows) - 1) * gap * 2 + caption_h

    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = margin
    if title:
        draw.text((margin, y), title, fill=TEXT, font=title_font)
        y += title_h
    for r, (row, images) in enumerate(zip(rows, scaled, strict=True)):
        x = margin + label_w
        if row_labels:
            _draw_vertical_label(canvas, row_labels[r], head_font, (margin, y + text_h), tile_height)
        for tile, im in zip(row, images, strict=True):
            draw.text((x, y), _fit_text(draw, tile.title, head_font, im.width), fill=TEXT, font=head_font)
            if tile.subtitle:
                draw.text((x, y + head_h), _fit_text(draw, tile.subtitle, sub_font, im.width), fill=MUTED,
                          font=sub_font)
            canvas.paste(im, (x, y + text_h))
            x += im.width + gap
        if bar is not None:
            canvas.paste(bar, (x + gap, y + text_h - bar_top))
        y += row_h + gap * 2
    for line in caption_lines:
        draw.text((margin, y), line, fill=MUTED, font=sub_font)
        y += sub_h
    return canvas


def _draw_vertical_label(canvas: Image.Image, text: str, font: Any, origin: tuple[int, int], height: int) -> None:
    probe = ImageDraw.Draw(canvas)
    text = _fit_text(probe, text, font, height)
    w, h = _text_size(probe, text, font)
    strip = Image.new("RGB", (w + 4, h + 6), BACKGROUND)
    ImageDraw.Draw(strip).text((2, 0), text, fill=TEXT, font=font)
    strip = strip.rotate(90, expand=True)
    canvas.paste(strip, (origin[0], origin[1] + (height - strip.height) // 2))


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> list[str]:
    lines: list[str] = []
    for paragraph in text.splitlines():
        line = ""
        for word in paragraph.split():
            trial = f"{line} {word}".strip()
            if line and _text_size(draw, trial, font)[0] > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


# ------------------------------------------------------------------------------------------ episodes


def _iou_text(values: ArrayLike, target: np.ndarray, valid: np.ndarray | None, threshold: float) -> str:
    from clipprior.evaluate import binary_iou  # local import: evaluate does not need viz

    prior = resize_map(values, target.shape)
    iou = binary_iou(prior, target, threshold, valid=valid)
    return f"IoU@{threshold:g} = {100 * iou:.1f}" if math.isfinite(iou) else f"IoU@{threshold:g} = n/a"


def episode_row(
    query: ImageLike,
    priors: Mapping[str, ArrayLike | None],
    *,
    query_mask: ArrayLike | None = None,
    ignore_index: int | None = 255,
    class_id: int | None = None,
    supports: Sequence[ImageLike] = (),
    support_masks: Sequence[ArrayLike] = (),
    class_name: str | None = None,
    cmap: str = "jet",
    alpha: float = 0.5,
    threshold: float = 0.5,
) -> list[Tile]:
    """The tiles of one episode: query (+ ground truth), supports (+ masks), then one heat map per prior.

    Args:
        query: (H, W, 3) query image.
        priors: Title -> (h, w) prior map (patch grid or full size), drawn in order; ``None``
            values (e.g. VVP without supports) are skipped.
        query_mask: Optional (H, W) ground truth: a binary mask, or a label map when ``class_id``
            is given (``label == class_id`` is the target, ``ignore_index`` drawn hatched). With it,
            each prior tile says its IoU at ``threshold``.
        ignore_index: Ignored label value of ``query_mask`` (label maps only).
        class_id: Target class id in ``query_mask`` when it is a label map.
        supports: Support images.
        support_masks: One (H_s, W_s) binary mask per support.
        class_name: Target class, shown in the query tile's title.
        cmap: Colormap of the heat maps.
        alpha: Heat-map opacity.
        threshold: Threshold of the IoUs shown.

    Returns:
        The tiles, left to right.

    Raises:
        InvalidInputError: if masks and supports do not pair up or sizes differ.

    Example:
        >>> tiles = episode_row(np.zeros((32, 32, 3), np.uint8), {"VTP": np.ones((2, 2))})
        >>> [t.title for t in tiles]
        ['Query', 'VTP']
    """
    if support_masks and len(support_masks) != len(supports):
        raise InvalidInputError(f"{len(supports)} supports but {len(support_masks)} support masks")
    rgb = to_rgb_array(query)
    target = valid = ignore = None
    if query_mask is not None:
        gt = _as_map(query_mask, "query_mask")
        if gt.shape != rgb.shape[:2]:
            raise InvalidInputError(f"query mask has shape {gt.shape} but the query is {rgb.shape[:2]}")
        if class_id is not None:
            target = gt == class_id
            ignore = gt == ignore_index if ignore_index is not None else np.zeros(gt.shape, bool)
            valid = ~ignore
        else:
            target = gt > 0.5
    query_title = f"Query: {class_name}" if class_name else "Query"
    tiles = [
        Tile(
            mask_overlay(rgb, target, ignore=ignore) if target is not None else rgb,
            query_title,
            "ground truth" if target is not None else None,
        )
    ]
    for i, support in enumerate(supports):
        s_rgb = to_rgb_array(support)
        image = mask_overlay(s_rgb, support_masks[i]) if support_masks else s_rgb
        name = f"Support {i + 1}" if len(supports) > 1 else "Support"
        tiles.append(Tile(image, name, "mask" if support_masks else None))
    for name, values in priors.items():
        if values is None:
            continue
        subtitle = _iou_text(values, target, valid, threshold) if target is not None else None
        tiles.append(Tile(heatmap_overlay(rgb, values, alpha=alpha, cmap=cmap), name, subtitle))
    return tiles


def episode_panel(
    query: ImageLike,
    priors: Mapping[str, ArrayLike | None],
    *,
    title: str | None = None,
    caption: str | None = None,
    tile_height: int = 224,
    cmap: str = "jet",
    **row_kwargs: Any,
) -> Image.Image:
    """A one-row Fig. 4-style panel of one episode (see :func:`episode_row` for the arguments).

    Args:
        query: (H, W, 3) query image.
        priors: Title -> (h, w) prior map.
        title: Panel title.
        caption: Small text under the row.
        tile_height: Picture height in pixels.
        cmap: Colormap of heat maps and colour bar.
        **row_kwargs: Passed on to :func:`episode_row` (``query_mask``, ``supports``, ...).

    Returns:
        The panel as an RGB image.

    Example:
        >>> episode_panel(np.zeros((32, 48, 3), np.uint8), {"VTP": np.ones((2, 3))}, tile_height=64).mode
        'RGB'
    """
    row = episode_row(query, priors, cmap=cmap, **row_kwargs)
    return compose_panel([row], title=title, caption=caption, tile_height=tile_height, cmap=cmap)


def cached_episode_panel(
    data: EpisodeData,
    class_name: str,
    *,
    cmap: str = "jet",
    tile_height: int = 224,
    threshold: float = 0.5,
) -> Image.Image:
    """The Fig. 4-style panel of one cached episode, as ``clipprior show`` draws it.

    The query with its ground truth, the supports with their masks (the episode's class, binarised
    by :func:`clipprior.data.fss_mask`), then the priors in the paper's order
    (:data:`clipprior.cache.PANEL_ORDER`: VVP, VTP raw, VTP refined), each with its IoU at
    ``threshold``; titled with the episode's number and class, captioned with its file names.

    Args:
        data: The episode with its pictures (:func:`clipprior.evaluate.load_episode` with ``images=True``).
        class_name: The name of the episode's class.
        cmap: Colormap of the heat maps (:data:`COLORMAPS`).
        tile_height: Picture height in pixels.
        threshold: Threshold of the IoUs written on the prior tiles.

    Returns:
        The panel as an RGB image.

    Raises:
        InvalidInputError: if the episode was loaded without its pictures, or sizes differ.

    Example:
        >>> data = load_episode(cache, cache.episodes[0], root)  # doctest: +SKIP
        >>> cached_episode_panel(data, "cat", tile_height=96).save("episode.png")  # doctest: +SKIP
    """
    from clipprior.cache import PANEL_ORDER  # local imports: drawing photos needs neither h5py nor the cache
    from clipprior.data.images import fss_mask
    from clipprior.evaluate import PRIOR_TITLES

    record = data.record
    if data.query is None:
        raise InvalidInputError(f"episode {record.index} was loaded without its pictures; "
                                "load it with load_episode(..., images=True)")
    supports = [fss_mask(label, record.class_id) == 1 for label in data.support_labels]
    priors = {PRIOR_TITLES[str(k.prior)]: data.priors[str(k.prior)] for k in PANEL_ORDER}
    row = episode_row(
        data.query, priors, query_mask=data.label, class_id=record.class_id, supports=data.supports,
        support_masks=supports, class_name=class_name, cmap=cmap, threshold=threshold,
    )
    caption = f"query {record.query_image}; supports {', '.join(record.support_images) or '-'}"
    return compose_panel([row], title=f"episode {record.index}: {class_name} (class {record.class_id})",
                         caption=caption, tile_height=tile_height, cmap=cmap)


# ---------------------------------------------------------------------------------------------- HTML


@dataclass
class HtmlEntry:
    """One picture of the HTML index.

    Attributes:
        image: Path of the PNG, relative to the page's directory (or absolute).
        title: Card heading.
        group: Filter key (e.g. the class name).
        details: Label -> value pairs listed under the picture.
    """

    image: str | os.PathLike[str]
    title: str
    group: str = ""
    details: Mapping[str, str] = field(default_factory=dict)


_PAGE_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;color:#222}
header{background:#fff;border-bottom:1px solid #e3e5e8;padding:16px 24px;position:sticky;top:0;z-index:1}
h1{font-size:20px;margin:0 0 6px}
.meta{font-size:13px;color:#555}
.meta span{margin-right:16px}
.controls{margin-top:10px;font-size:13px}
.controls input{padding:4px 8px;border:1px solid #ccd;border-radius:4px;width:220px}
table.summary{border-collapse:collapse;margin:12px 24px 0;font-size:13px;background:#fff}
table.summary th,table.summary td{border:1px solid #e3e5e8;padding:4px 10px;text-align:right}
table.summary th:first-child,table.summary td:first-child{text-align:left}
main{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:16px;padding:16px 24px}
figure{margin:0;background:#fff;border:1px solid #e3e5e8;border-radius:6px;overflow:hidden}
figure img{display:block;width:100%;height:auto}
figcaption{padding:8px 12px;font-size:13px}
figcaption b{font-size:14px}
figcaption dl{display:flex;flex-wrap:wrap;gap:2px 14px;margin:4px 0 0}
figcaption dt{color:#777}
figcaption dd{margin:0 0 0 -10px}
.hidden{display:none}
"""

_PAGE_SCRIPT = """
const box = document.getElementById('filter');
const count = document.getElementById('count');
function applyFilter() {
  const q = box.value.trim().toLowerCase();
  let shown = 0;
  for (const fig of document.querySelectorAll('main figure')) {
    const hit = !q || fig.dataset.search.includes(q);
    fig.classList.toggle('hidden', !hit);
    shown += hit;
  }
  count.textContent = shown + ' shown';
}
box.addEventListener('input', applyFilter);
applyFilter();
"""


def write_html_index(
    directory: str | os.PathLike[str],
    entries: Iterable[HtmlEntry],
    *,
    title: str = "clipprior priors",
    meta: Mapping[str, str] | None = None,
    summary: Sequence[Sequence[str]] | None = None,
    filename: str = "index.html",
) -> Path:
    """Write a self-contained, browsable index page of many panels (no external resources).

    Args:
        directory: Directory of the page; image paths are made relative to it.
        entries: The pictures, in page order.
        title: Page title.
        meta: Label -> value facts shown under the title (dataset, fold, model...).
        summary: Optional table: the first row is the header, the others are rows.
        filename: Name of the page file.

    Returns:
        Path of the written page.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     write_html_index(d, [HtmlEntry("a.png", "episode 0", "cat")]).name
        'index.html'
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    esc = html.escape
    cards: list[str] = []
    for entry in entries:
        src = Path(entry.image)
        if src.is_absolute():
            try:
                src = src.relative_to(root.resolve())
            except ValueError:
                src = Path(os.path.relpath(src, root.resolve()))
        href = esc(src.as_posix(), quote=True)
        details = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in entry.details.items())
        search = esc(" ".join([entry.title, entry.group, *entry.details.values()]).lower(), quote=True)
        cards.append(
            f'<figure data-search="{search}"><a href="{href}"><img src="{href}" alt="{esc(entry.title, quote=True)}" '
            f'loading="lazy"></a><figcaption><b>{esc(entry.title)}</b>'
            f"{f'<dl>{details}</dl>' if details else ''}</figcaption></figure>"
        )
    meta_html = "".join(f"<span><b>{esc(k)}:</b> {esc(v)}</span>" for k, v in (meta or {}).items())
    table = ""
    if summary:
        head, *body = summary
        table = (
            '<table class="summary"><tr>' + "".join(f"<th>{esc(c)}</th>" for c in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in body)
            + "</table>"
        )
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>{_PAGE_STYLE}</style>
</head>
<body>
<header>
<h1>{esc(title)}</h1>
<div class="meta">{meta_html}<span>{len(cards)} panels</span></div>
<div class="controls"><input id="filter" type="search" placeholder="filter: class, episode, image..."> \
<span id="count"></span></div>
</header>
{table}
<main>
{chr(10).join(cards)}
</main>
<script>{_PAGE_SCRIPT}</script>
</body>
</html>
"""
    path = root / filename
    path.write_text(page, encoding="utf-8")
    return path
