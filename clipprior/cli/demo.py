"""``clipprior demo``: VTP, PIR and VVP on the bundled photos, as one Fig. 4-style PNG panel."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from clipprior.cache import PANEL_ORDER
from clipprior.cli._common import (
    ProgressDisplay,
    clip_options,
    cmap_option,
    command,
    console,
    debug_option,
    handle_errors,
    preset_option,
    tile_height_option,
    writing,
)
from clipprior.config import get_preset
from clipprior.errors import WeightsNotFoundError
from clipprior.photos import DEMO_EPISODES, demo_panel

__all__ = ["demo"]


@command("demo")
@clip_options()
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default="clipprior-demo.png",
              show_default=True, help="Where to write the PNG panel.")
@preset_option()
@cmap_option()
@tile_height_option(help="Height of each picture in the panel, in pixels.")
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
    with ProgressDisplay(["demo episodes"], console=console, transient=True) as progress:
        progress(0, len(DEMO_EPISODES))
        panel, results = demo_panel(bundle, config=config, cmap=cmap, tile_height=tile_height,
                                    on_episode=lambda i: progress(i + 1, len(DEMO_EPISODES)))
    with writing(out, "--out"):
        out.parent.mkdir(parents=True, exist_ok=True)
        panel.save(out)
    table = Table(title=f"IoU (%) at 0.5 against the hand-drawn query masks ({bundle.source})")
    priors = [kind.label for kind in PANEL_ORDER]
    for column in ("class", "query", "support", *priors):
        table.add_column(column, justify="right" if column in priors else "left")
    for row in results:
        cells = [f"{100 * row['iou'][k]:.1f}" if k in row["iou"] else "-" for k in priors]
        table.add_row(row["class"], row["query"], row["support"], *cells)
    console.print(table)
    console.print(f"Wrote [bold]{out}[/] ({panel.width} x {panel.height} px)")
