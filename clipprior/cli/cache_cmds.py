"""``clipprior inspect``, ``clipprior verify`` and ``clipprior merge``: look at, check and join prior caches."""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from rich import box
from rich.table import Table
from rich.text import Text

from clipprior.cache import TABLES, PriorCache, check_cache, merge_caches, summarize_cache
from clipprior.cli._common import (
    clip_options,
    command,
    console,
    data_root_option,
    debug_option,
    err_console,
    handle_errors,
    progress_bar,
    seed_option,
)
from clipprior.data import Episode
from clipprior.errors import CacheError

__all__ = ["inspect_cmd", "merge_cmd", "verify_cmd"]

# ------------------------------------------------------------------------------------------ helpers


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover - unreachable


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _grid(value: dict[str, list[int]] | None) -> str:
    if value is None:
        return "-"
    lo, hi = value["min"], value["max"]
    return f"{lo[0]}x{lo[1]} .. {hi[0]}x{hi[1]}"


def _print_summary(summary: dict[str, Any], cache: PriorCache) -> None:
    shard = cache.shard
    console.print(f"[bold]{summary['path']}[/]  {_human_bytes(summary['file_bytes'])}, kind {cache.file_kind or '?'}"
                  + (f" {shard[0]}/{shard[1]}" if shard else ""), highlight=False, soft_wrap=True)

    table = Table(title="Provenance", title_justify="left", show_header=False)
    table.add_column("setting", style="cyan")
    table.add_column("value", overflow="fold")
    for name, value in summary["provenance"].items():
        if name == "config":
            continue
        table.add_row(name, _fmt(value))
    for name, value in cache.run.items():
        table.add_row(name, _fmt(value))
    console.print(table)

    config = summary["provenance"].get("config")
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except ValueError:
            config = {"config": config}
    if isinstance(config, dict):
        table = Table(title="Prior config", title_justify="left", show_header=False)
        table.add_column("field", style="cyan")
        table.add_column("value")
        for name, value in config.items():
            table.add_row(name, _fmt(value))
        console.print(table)

    counts, geometry = summary["counts"], summary["geometry"]
    table = Table(title="Contents", title_justify="left", show_header=False)
    table.add_column("what", style="cyan")
    table.add_column("value")
    table.add_row("images", f"{counts['images']:,} (original sizes {_grid(geometry['image_size'])})")
    for name, entries in TABLES.items():
        if entries.optional and not counts[name]:
            continue  # a table this file has no rows of (a maps cache has no feature tables)
        channels = f" x {counts[f'{name}_channels']} channels" if f"{name}_channels" in counts else ""
        table.add_row(f"{entries.title} entries",
                      f"{counts[name]:,}{channels} (grids {_grid(geometry[f'{name}_grid'])})")
    table.add_row("episodes", f"{counts['episodes']:,} ({counts['shot']}-shot)")
    classes = counts["classes"]
    table.add_row("classes", f"{len(classes)}: " + ", ".join(f"{c} ({n})" for c, n in classes.items()))
    console.print(table)

    table = Table(title="Datasets", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for column in ("dataset", "shape", "dtype", "chunks", "stored", "ratio"):
        table.add_column(column, justify="left" if column in ("dataset", "dtype") else "right", no_wrap=True)
    for name, info in summary["datasets"].items():
        raw, stored = info["raw_bytes"], info["stored_bytes"]
        table.add_row(name, "x".join(map(str, info["shape"])), "str" if info["dtype"] == "object" else info["dtype"],
                      "x".join(map(str, info["chunks"])) if info["chunks"] else "-", _human_bytes(stored),
                      f"{raw / stored:.1f}x" if raw and stored else "-")
    console.print(table)

    table = Table(title="Values (inside each entry's grid)", title_justify="left")
    for column in ("map", "entries", "min", "max", "mean", "std", "NaN/inf"):
        table.add_column(column, justify="left" if column == "map" else "right")
    for name, stats in summary["values"].items():
        table.add_row(name, f"{stats['entries']:,}", _fmt(stats["min"]), _fmt(stats["max"]), _fmt(stats["mean"]),
                      _fmt(stats["std"]), Text(str(stats["nonfinite"]), style="red" if stats["nonfinite"] else ""))
    console.print(table)


# -------------------------------------------------------------------------------------------- inspect


@command("inspect")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (machine-readable) instead of tables.")
@click.option("--max-entries", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
              help="Value statistics over at most N evenly spaced entries per map (0: all entries).")
@debug_option
@handle_errors
def inspect_cmd(file: Path, as_json: bool, max_entries: int, debug: bool) -> None:
    r"""Show a prior cache: provenance, counts, sizes and value statistics.

    FILE is a cache written by `clipprior precompute` (or `clipprior merge`), or one shard of a
    sharded run. Value statistics are taken inside each entry's own patch grid.

    \b
    Examples:
      clipprior inspect priors.h5
      clipprior inspect priors.h5 --max-entries 1000
      clipprior inspect priors.h5 --json > priors-summary.json
    """
    cache = PriorCache(file)
    click.get_current_context().call_on_close(cache.close)
    with progress_bar("reading maps", quiet=as_json) as update:
        summary = summarize_cache(cache, max_entries=max_entries or None, progress=update)
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
    else:
        _print_summary(summary, cache)


# --------------------------------------------------------------------------------------------- verify


def _recompute_sample(cache: PriorCache, episodes: Sequence[Episode], *, model: str | None,
                      data_root: Path | None, device: str, dtype: str, atol: float) -> list[str]:
    """``verify --sample``: :func:`clipprior.precompute.check_recomputed` with the command's options.

    Prints its notes and returns its problems, one line per mismatch.

    Raises:
        CacheError: without ``--data-root``.
    """
    if data_root is None:
        recorded = cache.provenance.get("data_root")
        hint = f" (the cache was computed from {recorded})" if recorded else ""
        raise CacheError(f"verify --sample needs --data-root: the dataset folder to recompute from{hint}")
    from clipprior.precompute import check_recomputed

    report = check_recomputed(cache, episodes, data_root=data_root, model=model, device=device, dtype=dtype,
                              atol=atol)
    for note in report.notes:
        console.print(f"[yellow]Note:[/] {note}", highlight=False)
    return report.problems


@command("verify")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--sample", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
              help="Also recompute N random episodes with the model and compare (0: structural check only).")
@seed_option(default=0, help="Seed of the random sample.")
@click.option("--atol", type=float, default=1e-2, show_default=True,
              help="Largest absolute difference accepted when recomputing (the cache stores float16).")
@data_root_option(help="Dataset root for recomputing (required with --sample).")
@clip_options(model_default=None, model_help="Model for recomputing (default: the cache's model).")
@debug_option
@handle_errors
def verify_cmd(file: Path, sample: int, seed: int, atol: float, model: str | None, data_root: Path | None,
               device: str, dtype: str, debug: bool) -> None:
    r"""Check a prior cache: every expected entry present and finite.

    For every episode the query's VTP (raw and refined) for the episode class and the episode's
    VVP must be in FILE, every map must be finite inside its grid, and the VVP must have
    len(vvp_layers) x K channels. With --sample N, N random episodes are also recomputed with the
    model and compared. Exits with status 1 if anything is wrong.

    \b
    Examples:
      clipprior verify priors.h5
      clipprior verify priors.h5 --sample 20 --data-root ~/data/VOC2012
    """
    cache = PriorCache(file)
    click.get_current_context().call_on_close(cache.close)
    with progress_bar("checking maps") as update:
        report = check_cache(cache, progress=update)
    problems = list(report.problems)
    for note in report.notes:
        console.print(f"[yellow]Note:[/] {note}", highlight=False, soft_wrap=True)
    if sample > 0:
        episodes = cache.episodes
        chosen = sorted(random.Random(seed).sample(episodes, min(sample, len(episodes))), key=lambda e: e.index)
        problems += _recompute_sample(cache, chosen, model=model, data_root=data_root, device=device, dtype=dtype,
                                      atol=atol)
    summary = (f"{report.episodes:,} episodes, {report.describe_entries()}"
               + (f", {sample} episodes recomputed" if sample > 0 else ""))
    if not problems:
        console.print(f"[bold green]OK[/] {file}: {summary} present and finite.", highlight=False, soft_wrap=True)
        return
    table = Table(title=f"{len(problems)} problem(s) in {file}", title_justify="left", show_header=False)
    table.add_column("problem", style="red", overflow="fold")
    for line in problems[:50]:
        table.add_row(line)
    if len(problems) > 50:
        table.add_row(f"... and {len(problems) - 50} more")
    console.print(table)
    err_console.print(f"[bold red]Error:[/] {file} failed verification ({summary} checked)", highlight=False,
                      soft_wrap=True)
    sys.exit(1)


# ---------------------------------------------------------------------------------------------- merge


@command("merge")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("shards", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@debug_option
@handle_errors
def merge_cmd(out: Path, shards: tuple[Path, ...], overwrite: bool, debug: bool) -> None:
    r"""Merge the shard files of a sharded precompute into one cache.

    SHARDS are all files OUT.shard-I-of-N.h5 of one job (written with --shard I/N, or one per
    rank under torchrun). They must share every setting and together cover every episode; the
    result equals the cache a single run would have written.

    \b
    Examples:
      clipprior merge priors.h5 priors.shard-*-of-4.h5
      clipprior merge priors.h5 priors.shard-0-of-2.h5 priors.shard-1-of-2.h5 --overwrite
    """
    with progress_bar("merging") as update:
        path = merge_caches(list(shards), out, overwrite=overwrite, progress=update)
    cache = PriorCache(path)
    click.get_current_context().call_on_close(cache.close)
    console.print(f"[bold green]Merged[/] {len(shards)} shards into {path}: {len(cache.images):,} images, "
                  f"{len(cache.vtp_keys()):,} VTP, {len(cache):,} episodes.", highlight=False, soft_wrap=True)
