"""``clipprior demo``: VTP, PIR and VVP on the bundled photos, as one Fig. 4-style PNG panel."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
from PIL import Image
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from clipprior.cli._common import (
    command,
    console,
    debug_option,
    device_option,
    dtype_option,
    handle_errors,
    model_option,
    preset_option,
)
from clipprior.config import PriorConfig, get_preset
from clipprior.errors import WeightsNotFoundError
from clipprior.evaluate import binary_iou, vvp_map
from clipprior.photos import Photo, flip_crop, load_photo
from clipprior.viz import COLORMAPS, Tile, compose_panel, episode_row, resize_map

__all__ = ["DEMO_EPISODES", "DemoEpisode", "demo", "demo_panel"]


@dataclass(frozen=True)
class DemoEpisode:
    """One row of the demo: a query photo and its support.

    Attributes:
        query: Name of the bundled query photo.
        support: Name of another bundled photo of the same class, or ``None`` to use the query
            itself mirrored and cropped to ``crop`` (said so in the panel's caption).
        crop: Crop box (fractions) of the mirrored query when ``support`` is ``None``.
    """

    query: str
    support: str | None = None
    crop: tuple[float, float, float, float] = (0.1, 0.05, 0.9, 1.0)

    def load(self) -> tuple[Photo, Photo]:
        """The query photo and the support photo (both with masks)."""
        query = load_photo(self.query)
        support = load_photo(self.support) if self.support else flip_crop(query, self.crop)
        return query, support


#: The demo's rows: a person with a different person as support; a cat and a cup whose supports are
#: the query mirrored and cropped (only one photo of each is bundled).
DEMO_EPISODES: tuple[DemoEpisode, ...] = (
    DemoEpisode("astronaut", "cameraman"),
    DemoEpisode("chelsea", None, (0.12, 0.0, 0.92, 1.0)),
    DemoEpisode("coffee", None, (0.08, 0.05, 0.92, 1.0)),
)


def demo_panel(
    bundle: Any,
    episodes: Sequence[DemoEpisode] = DEMO_EPISODES,
    *,
    config: PriorConfig | None = None,
    cmap: str = "jet",
    tile_height: int = 224,
    threshold: float = 0.5,
    on_episode: Callable[[int], None] | None = None,
) -> tuple[Image.Image, list[dict[str, Any]]]:
    """Compute VTP raw, VTP refined (PIR) and VVP for each demo episode and draw them in one panel.

    Args:
        bundle: A loaded CLIP (:class:`clipprior.model.ClipBundle`).
        episodes: The rows to draw.
        config: Prior knobs (default: :class:`~clipprior.config.PriorConfig`).
        cmap: Heat-map colormap.
        tile_height: Picture height in pixels.
        threshold: Threshold of the IoUs against the hand-drawn query masks.
        on_episode: Called with the row number after each row is computed (progress).

    Returns:
        The panel and, per row, a dict with the class, the photos and the IoU of each prior.

    Example:
        >>> from clipprior.model import load_clip
        >>> panel, rows = demo_panel(load_clip("openai/clip-vit-base-patch16"))  # doctest: +SKIP
        >>> panel.save("demo.png")  # doctest: +SKIP
    """
    from clipprior.priors import compute_priors  # the model code loads only when the demo runs

    rows: list[list[Tile]] = []
    results: list[dict[str, Any]] = []
    notes: list[str] = []
    for i, episode in enumerate(episodes):
        query, support = episode.load()
        # The photo's mask labels its one class: with text_classes="present" nothing else joins the softmax.
        priors = compute_priors(
            bundle, query.image, query.class_name, [support.image], [support.mask.astype(np.uint8)], config=config,
            query_label=query.mask.astype(np.uint8), class_names=[query.class_name],
        )
        maps = {
            "VVP": None if priors.vvp is None else vvp_map(priors.vvp),
            "VTP raw": priors.cam.float().cpu().numpy(),
            "VTP refined": priors.refined.float().cpu().numpy(),
        }
        rows.append(
            episode_row(
                query.image, maps, query_mask=query.mask, supports=[support.image], support_masks=[support.mask],
                class_name=query.class_name, cmap=cmap, threshold=threshold,
            )
        )
        ious = {
            name: binary_iou(resize_map(m, query.mask.shape), query.mask, threshold)
            for name, m in maps.items()
            if m is not None
        }
        results.append({"class": query.class_name, "query": query.name, "support": support.name, "iou": ious})
        if episode.support is None:
            notes.append(f"Row {i + 1}: the support is the query mirrored and cropped (one {query.class_name} photo "
                         "is bundled)")
        if on_episode is not None:
            on_episode(i)
    photos = sorted({e.query for e in episodes} | {e.support for e in episodes if e.support})
    credits = "; ".join(f"{p.title}, {p.license.split(' (')[0]}" for p in map(load_photo, photos))
    caption = (
        f"Model: {getattr(bundle, 'source', '?')}. VVP: mean of its layer x shot maps, min-max normalised. "
        f"IoU at {threshold:g} against hand-drawn, approximate masks. {'. '.join(notes)}.\n"
        f"Photos (scikit-image sample data, see clipprior/assets/photos/SOURCES.md): {credits}."
    )
    panel = compose_panel(
        rows,
        title="clipprior demo: query, support, VVP, VTP and PIR-refined VTP",
        row_labels=[r["class"] for r in results],
        caption=caption,
        tile_height=tile_height,
        cmap=cmap,
    )
    return panel, results


@command("demo")
@model_option()
@device_option()
@dtype_option()
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default="clipprior-demo.png",
              show_default=True, help="Where to write the PNG panel.")
@preset_option()
@click.option("--cmap", type=click.Choice(sorted(COLORMAPS)), default="jet", show_default=True,
              help="Heat-map colormap.")
@click.option("--tile-height", type=click.IntRange(64, 1024), default=224, show_default=True,
              help="Height of each picture in the panel, in pixels.")
@debug_option
@handle_errors
def demo(model: str, device: str, dtype: str, out: Path, preset: str, cmap: str, tile_height: int,
         debug: bool) -> None:
    r"""Run VTP, PIR and VVP on bundled photos and write a Fig. 4-style panel.

    Three episodes on public-domain / CC0 photos shipped with clipprior (a person, a cat, a cup),
    each with a hand-drawn support mask; the panel shows query (with its mask), support, VVP, raw
    VTP and PIR-refined VTP as heat maps, and the terminal shows their IoU against the query masks.

    \b
    Examples:
      clipprior demo
      clipprior demo --model ~/weights/ViT-B-16.pt --out demo.png
      clipprior demo --model ./clip-vit-base-patch16 --device cpu --cmap turbo
    """
    from clipprior.model import load_clip

    config = get_preset(preset)
    with console.status(f"Loading CLIP from {model} ..."):
        try:
            bundle = load_clip(model, device=device, dtype=dtype)
        except WeightsNotFoundError as err:
            raise WeightsNotFoundError(
                f"{err} The demo needs CLIP weights once: on a machine with internet, `clipprior demo` downloads "
                f"them to the HuggingFace cache by itself; offline, run `clipprior demo --model PATH` with a "
                f"directory saved by CLIPModel.save_pretrained or an OpenAI checkpoint (ViT-B-16.pt)."
            ) from err
    progress = Progress(TextColumn("[bold]demo[/]"), BarColumn(), TextColumn("{task.completed}/{task.total} episodes"),
                        TimeElapsedColumn(), console=console, transient=True)
    with progress:
        task = progress.add_task("demo", total=len(DEMO_EPISODES))
        panel, results = demo_panel(bundle, config=config, cmap=cmap, tile_height=tile_height,
                                    on_episode=lambda _: progress.advance(task))
    out.parent.mkdir(parents=True, exist_ok=True)
    panel.save(out)
    table = Table(title=f"IoU (%) at 0.5 against the hand-drawn query masks ({bundle.source})")
    for column in ("class", "query", "support", "VVP", "VTP raw", "VTP refined"):
        table.add_column(column, justify="right" if column.startswith("V") else "left")
    for row in results:
        cells = [f"{100 * row['iou'][k]:.1f}" if k in row["iou"] else "-" for k in ("VVP", "VTP raw", "VTP refined")]
        table.add_row(row["class"], row["query"], row["support"], *cells)
    console.print(table)
    console.print(f"Wrote [bold]{out}[/] ({panel.width} x {panel.height} px)")
