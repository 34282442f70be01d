"""``clipprior show``: Fig. 4-style PNG panels of cached episodes, and an HTML index of them."""

from __future__ import annotations

import math
from pathlib import Path

import click

from clipprior.cache import PANEL_ORDER, PriorCache
from clipprior.cli._common import (
    ProgressDisplay,
    cmap_option,
    command,
    console,
    data_root_option,
    debug_option,
    handle_errors,
    threshold_option,
    tile_height_option,
    writing,
)
from clipprior.errors import InvalidInputError
from clipprior.evaluate import PRIOR_TITLES, EpisodeScorer, cache_facts, load_episode, resolve_data_root
from clipprior.viz import HtmlEntry, cached_episode_panel, write_html_index

__all__ = ["parse_episode_spec", "show"]

_PANEL_ORDER = tuple(str(k.prior) for k in PANEL_ORDER)  # Fig. 4: VVP, then VTP raw and refined


def parse_episode_spec(spec: str, available: list[int]) -> list[int]:
    """Episode indices from ``"0,5,10-20"``, ``"all"`` or ``":8"`` (the first eight).

    Args:
        spec: Comma-separated indices and inclusive ranges, ``all``, or ``:N``.
        available: Indices present in the cache, ascending.

    Returns:
        The selected indices, in the order given, without duplicates.

    Raises:
        InvalidInputError: on a malformed spec or indices the cache does not have.

    Example:
        >>> parse_episode_spec("3,0-1,3", [0, 1, 2, 3])
        [3, 0, 1]
    """
    text = spec.strip().lower()
    if text == "all":
        return list(available)
    if text.startswith(":"):
        try:
            return list(available[: int(text[1:])])
        except ValueError:
            raise InvalidInputError(f"--episodes {spec!r}: ':N' needs an integer N") from None
    chosen: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = part.split("-", 1)
                chosen.extend(range(int(lo), int(hi) + 1))
            elif part:
                chosen.append(int(part))
        except ValueError:
            raise InvalidInputError(
                f"--episodes {spec!r}: use indices and ranges such as '0,5,10-20', ':8' or 'all'"
            ) from None
    have = set(available)
    missing = [i for i in chosen if i not in have]
    if missing:
        span = f"{available[0]}..{available[-1]}" if available else "none"
        raise InvalidInputError(f"episode(s) {missing[:10]} are not in the cache (it has {len(available)}: {span})")
    return list(dict.fromkeys(chosen))


@command("show")
@click.argument("cache_path", metavar="CACHE", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--episodes", "episodes_spec", default=":8", show_default=True, metavar="SPEC",
              help="Episodes to draw: indices and ranges ('0,5,10-20'), ':N' for the first N, or 'all'.")
@data_root_option(help="Dataset folder the cache was computed from (images and masks).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the PNG panels [default: clipprior-show, or HTML_DIR/episodes with --html].")
@click.option("--html", "html_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write a browsable index page of the panels to this folder.")
@cmap_option()
@tile_height_option()
@threshold_option(help="Threshold of the IoUs written on the panels.")
@debug_option
@handle_errors
def show(cache_path: Path, episodes_spec: str, data_root: Path | None, out_dir: Path | None, html_dir: Path | None,
         cmap: str, tile_height: int, threshold: float, debug: bool) -> None:
    r"""Draw cached episodes: query with ground truth, supports with masks, VVP, VTP raw and refined.

    One PNG per episode; each prior is a heat-map overlay with a colour bar and its IoU against the
    query's ground truth. With --html, the PNGs go to HTML_DIR/episodes and HTML_DIR/index.html
    lists them (filterable by class) with the mean scores of the episodes shown.

    \b
    Examples:
      clipprior show priors.h5 --data-root ~/data/VOC2012 --episodes 0,5,10-20
      clipprior show priors.h5 --data-root ~/data/VOC2012 --episodes :100 --html report/
    """
    cache = PriorCache(cache_path)
    click.get_current_context().call_on_close(cache.close)
    facts = cache_facts(cache)
    root = resolve_data_root(data_root, facts)
    records = {e.index: e for e in cache.episodes}
    chosen = parse_episode_spec(episodes_spec, sorted(records))
    if not chosen:
        raise click.UsageError("no episode selected; the cache is empty or --episodes selects nothing")
    if out_dir is None:
        out_dir = html_dir / "episodes" if html_dir is not None else Path("clipprior-show")
    out_option = "--out" if html_dir is None or out_dir != html_dir / "episodes" else "--html"
    with writing(out_dir, out_option):
        out_dir.mkdir(parents=True, exist_ok=True)
    scorer = EpisodeScorer(threshold, kinds=_PANEL_ORDER)
    entries: list[HtmlEntry] = []
    with ProgressDisplay(["show episodes"], console=console, transient=True) as progress:
        progress(0, len(chosen))
        for index in chosen:
            data = load_episode(cache, records[index], root)
            name = facts.class_name(data.record.class_id)
            path = out_dir / f"episode_{index:05d}.png"
            with writing(path, out_option):
                cached_episode_panel(data, name, cmap=cmap, tile_height=tile_height, threshold=threshold).save(path)
            details = {"query": data.record.query_image.rsplit("/", 1)[-1]}
            for kind, iou in scorer.update(data).items():
                details[PRIOR_TITLES[kind]] = f"{100 * iou:.1f}" if math.isfinite(iou) else "n/a"
            entries.append(HtmlEntry(path.resolve(), f"episode {index}: {name}", name, details))
            progress.advance("show episodes")
    console.print(f"Wrote {len(chosen)} panel(s) to [bold]{out_dir}[/]")
    if html_dir is not None:
        summary = [["prior", f"mIoU@{threshold:g} (%)", f"FB-IoU@{threshold:g} (%)", "mAP (%)", "episodes"]]
        for kind, s in scorer.results().items():
            summary.append([PRIOR_TITLES[kind], f"{100 * s.miou_fixed:.1f}", f"{100 * s.fbiou_fixed:.1f}",
                            f"{100 * s.map:.1f}", str(s.episodes)])
        meta = {"cache": str(cache_path), "data": facts.label(), "model": facts.model or "?",
                "scores": f"over the {len(chosen)} episodes shown, IoU@{threshold:g} per panel"}
        with writing(html_dir, "--html"):
            page = write_html_index(html_dir, entries, title=f"clipprior priors: {facts.label()}", meta=meta,
                                    summary=summary)
        console.print(f"Wrote [bold]{page}[/]")
