"""``clipprior evaluate``: prior quality against ground truth (FSS protocol, or the CLIP-ES CAM protocol)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from clipprior.cache import PRIORS, PriorCache
from clipprior.cli._common import (
    ProgressDisplay,
    clip_options,
    command,
    console,
    data_root_option,
    dataset_option,
    debug_option,
    err_console,
    handle_errors,
    preset_option,
    split_option,
    threshold_option,
    writing,
)
from clipprior.evaluate import (
    CLIP_ES_REFERENCE,
    PRIOR_KINDS,
    PRIOR_TITLES,
    ClipEsResult,
    ClipEsScores,
    FoldResult,
    cache_facts,
    clip_es_cams,
    clip_es_images,
    evaluate_clip_es,
    evaluate_fold,
    mean_over_folds,
    resolve_data_root,
)

__all__ = ["evaluate"]


# ----------------------------------------------------------------------------------------- tables


def _pct(x: float) -> str:
    return f"{100 * x:.1f}" if math.isfinite(x) else "n/a"


def _summary_table(title: str, fixed: float) -> Table:
    table = Table(title=title, title_justify="left",
                  caption="%; t* = the threshold of best mIoU (an oracle); FB = FB-IoU", caption_justify="left")
    for column in ("prior", f"mIoU@{fixed:g}", "mIoU@t*", "t*", f"FB@{fixed:g}", "FB@t*", "mAP"):
        table.add_column(column, justify="left" if column == "prior" else "right", no_wrap=True)
    return table


def _fold_table(result: FoldResult) -> Table:
    first = next(iter(result.scores.values()))
    fixed = first.fixed_threshold
    table = _summary_table(f"{result.facts.label()}: {first.episodes} episodes, {len(first.classes)} classes", fixed)
    for kind, s in result.scores.items():
        table.add_row(PRIOR_TITLES[kind], _pct(s.miou_fixed), _pct(s.miou_best), f"{s.best_threshold:g}",
                      _pct(s.fbiou_fixed), _pct(s.fbiou_best), _pct(s.map))
    return table


def _class_table(result: FoldResult) -> Table:
    kinds = list(result.scores)
    first = result.scores[kinds[0]]
    fixed = first.fixed_threshold
    table = Table(title=f"{result.facts.label()}: per class (IoU@{fixed:g} and AP, %; raw / refined VTP, VVP)",
                  title_justify="left")
    table.add_column("class", no_wrap=True)
    table.add_column("ep.", justify="right", no_wrap=True, min_width=3)
    short = {k.prior: k.abbrev for k in PRIORS}
    for kind in kinds:
        table.add_column(f"{short[kind]} IoU", justify="right", no_wrap=True)
        table.add_column(f"{short[kind]} AP", justify="right", no_wrap=True)
    fi = first.thresholds.index(fixed)
    for i, cid in enumerate(first.classes):
        cells = []
        for kind in kinds:
            s = result.scores[kind]
            j = s.classes.index(cid) if cid in s.classes else None
            cells += ["-", "-"] if j is None else [_pct(s.class_iou[j, fi]), _pct(s.class_ap[j])]
        table.add_row(f"{cid} {result.facts.class_name(cid)}", str(int(first.class_episodes[i])), *cells)
    return table


def _mean_table(results: Sequence[FoldResult]) -> tuple[Table, dict[str, dict[str, float]]]:
    fixed = next(iter(results[0].scores.values())).fixed_threshold
    table = _summary_table(f"mean over {len(results)} folds (t* common to all folds)", fixed)
    means: dict[str, dict[str, float]] = {}
    for kind in PRIOR_KINDS:
        folds = [r.scores[kind] for r in results if kind in r.scores]
        if len(folds) != len(results):
            continue
        m = mean_over_folds(folds)
        means[kind] = m
        table.add_row(PRIOR_TITLES[kind], _pct(m["miou_fixed"]), _pct(m["miou_best"]), f"{m['best_threshold']:g}",
                      _pct(m["fbiou_fixed"]), _pct(m["fbiou_best"]), _pct(m["map"]))
    return table, means


def _clip_es_table(results: dict[str, dict[float, ClipEsScores]], images: int, skipped: int) -> Table:
    powers = list(next(iter(results.values())))
    table = Table(title=f"CLIP-ES protocol: CAM mIoU (%) over {images - skipped} images"
                        + (f" ({skipped} skipped)" if skipped else ""), title_justify="left")
    table.add_column("prior")
    for t in powers:
        table.add_column(f"bg (1-max)^{t:g}", justify="right")
    table.add_column("CLIP-ES, VOC train", justify="right", style="dim")
    for kind, by_power in results.items():
        table.add_row(PRIOR_TITLES[kind], *[_pct(by_power[t].miou) for t in powers], f"{CLIP_ES_REFERENCE[kind]:.1f}")
    return table


# ---------------------------------------------------------------------------------------------- command


def _parse_thresholds(text: str) -> tuple[float, ...]:
    """``--thresholds``: ``START:STOP:STEP`` or ``0.3,0.5``, every value in [0, 1] (as ``--threshold``)."""
    usage = f"{text!r}: use 'START:STOP:STEP' (e.g. 0:1:0.05) or a list '0.3,0.5'"
    try:
        if ":" in text:
            lo, hi, step = (float(v) for v in text.split(":"))
            if not step > 0:
                raise click.BadParameter(f"{usage}; STEP must be positive", param_hint="'--thresholds'")
            n = round((hi - lo) / step)
            if n < 0 or n > 10000:
                raise ValueError
            grid = tuple(round(lo + i * step, 10) for i in range(n + 1))
        else:
            grid = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(usage, param_hint="'--thresholds'") from None
    bad = [t for t in grid if not 0.0 <= t <= 1.0]
    if not grid or bad:
        raise click.BadParameter(f"{text!r}: thresholds must lie in [0, 1] (found {bad[:3]})" if bad else usage,
                                 param_hint="'--thresholds'")
    return grid


@command("evaluate")
@click.argument("caches", metavar="[CACHE]...", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@data_root_option(help="Dataset folder with the ground-truth masks [default: the data_root of the cache's "
                       "provenance, if it records one].")
@click.option("--protocol", type=click.Choice(["fss", "clip-es"]), default="fss", show_default=True,
              help="fss: episodes' target class, per class and fold; clip-es: CAM mIoU over images, all GT classes.")
@threshold_option(help="[fss] The fixed threshold (prior >= t is foreground).")
@click.option("--thresholds", default="0:1:0.05", show_default=True, metavar="START:STOP:STEP|LIST",
              help="[fss] Thresholds searched for the best one.")
@click.option("--per-class/--no-per-class", default=True, show_default=True, help="[fss] Print per-class tables.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate only the first N episodes / images.")
@click.option("--list", "list_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="[clip-es] Images to score: VOC stems, image paths or 'image label' lines.")
@dataset_option(required=False, help="[clip-es] Benchmark (default: the cache's; else the first one).")
@split_option(default="train", help="[clip-es] Split folders that list stems refer to.")
@click.option("--bg-power", "bg_powers", type=float, multiple=True, default=(1.0, 2.0), show_default=True,
              help="[clip-es] Background exponent t of (1 - max CAM)^t; repeat for several.")
@clip_options(model_default=None, model_help="[clip-es] Compute the CAMs with this CLIP instead of reading a cache.")
@preset_option(default="official", help="[clip-es --model] Prior config preset.")
@click.option("--skip-missing", is_flag=True, help="[clip-es] Skip images whose CAMs are not all cached.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write every number to this JSON file.")
@debug_option
@handle_errors
def evaluate(caches: tuple[Path, ...], data_root: Path | None, protocol: str, threshold: float, thresholds: str,
             per_class: bool, limit: int | None, list_file: Path | None, dataset: str | None, split: str,
             bg_powers: tuple[float, ...], model: str | None, preset: str, skip_missing: bool, json_path: Path | None,
             device: str, dtype: str, debug: bool) -> None:
    r"""Score priors against ground truth: mIoU, FB-IoU and AP per class and fold, or the CLIP-ES protocol.

    FSS protocol (default), one CACHE per fold: for each episode, the query's prior is compared
    with its target class (255 ignored, other classes background); intersection and union are
    accumulated per class over the episodes and averaged over the fold's classes. Reported for VTP
    raw, VTP refined and VVP (mean of its maps, min-max normalised): mIoU at --threshold and at the
    best threshold, FB-IoU, and threshold-free average precision. Several caches add a mean row.

    CLIP-ES protocol: every image of --list (or of the cache) with the CAMs of all its ground-truth
    classes and a background (1 - max)^t; argmax, confusion matrix, mIoU over 21 classes. CLIP-ES
    reports 58.6 (raw) and 70.8 (refined) on VOC train; CAMs come from CACHE or from --model.

    \b
    Examples:
      clipprior evaluate fold0.h5 --data-root ~/data/VOC2012
      clipprior evaluate fold0.h5 fold1.h5 fold2.h5 fold3.h5 --data-root ~/data/VOC2012 --json scores.json
      clipprior evaluate --protocol clip-es --model ~/weights/ViT-B-16.pt --data-root ~/data/VOC2012 --list train.txt
    """
    if protocol == "fss":
        if not caches:
            raise click.UsageError("the fss protocol needs at least one CACHE (one per fold)")
        grid = _parse_thresholds(thresholds)
        results: list[FoldResult] = []
        for path in caches:
            cache = PriorCache(path)
            click.get_current_context().call_on_close(cache.close)
            root = resolve_data_root(data_root, cache_facts(cache))
            total = min(len(cache), limit) if limit else len(cache)
            with ProgressDisplay([f"{path.name} episodes"], console=console, transient=True) as show:
                result = evaluate_fold(cache, root, thresholds=grid, fixed_threshold=threshold, limit=limit,
                                       on_episode=lambda n, show=show, total=total: show(n, total))
            results.append(result)
            console.print(_fold_table(result))
            if per_class:
                console.print(_class_table(result))
            if result.missing_classes:
                err_console.print(f"[yellow]Note:[/] fold classes {result.missing_classes} have no episode in "
                                  f"{path}; the means run over the other classes")
        payload: dict[str, Any] = {"protocol": "fss", "folds": [r.to_dict() for r in results]}
        if len(results) > 1:
            table, means = _mean_table(results)
            console.print(table)
            payload["mean"] = means
    else:
        payload = _run_clip_es(caches, data_root, list_file, dataset, split, bg_powers, model, preset, skip_missing,
                               limit, device, dtype)
    if json_path is not None:
        with writing(json_path, "--json"):
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        console.print(f"Wrote [bold]{json_path}[/]")


def _run_clip_es(caches: tuple[Path, ...], data_root: Path | None, list_file: Path | None, dataset: str | None,
                 split: str, bg_powers: tuple[float, ...], model: str | None, preset: str, skip_missing: bool,
                 limit: int | None, device: str, dtype: str) -> dict[str, Any]:
    if len(caches) > 1:
        raise click.UsageError("the clip-es protocol takes at most one CACHE")
    if not caches and model is None:
        raise click.UsageError("the clip-es protocol needs a CACHE or --model to compute the CAMs with")
    if not caches and list_file is None and data_root is not None:  # without --data-root, that error comes first
        raise click.UsageError("pass --list with the images to score (e.g. VOC's ImageSets/Segmentation/train.txt)")
    cache = PriorCache(caches[0]) if caches else None
    if cache is not None:
        click.get_current_context().call_on_close(cache.close)
    images = clip_es_images(cache, data_root=data_root, list_file=list_file, dataset=dataset, split=split,
                            limit=limit)
    bundle, config = None, None
    if model is not None:
        from clipprior.config import get_preset
        from clipprior.model import load_clip

        with console.status(f"Loading CLIP from {model} ..."):
            bundle = load_clip(str(model), device=device, dtype=dtype)
        config = get_preset(preset)
    cams, source = clip_es_cams(images.dataset, cache=cache, clip=bundle, config=config)
    pairs = images.pairs
    with ProgressDisplay(["clip-es images"], console=console, transient=True) as show:
        scores, skipped = evaluate_clip_es(pairs, images.root, cams, n_classes=images.n_classes, bg_powers=bg_powers,
                                           skip_missing=skip_missing, on_image=lambda n: show(n, len(pairs)))
    console.print(_clip_es_table(scores, len(pairs), skipped))
    console.print(f"[dim]CAMs from {source}. CLIP-ES reports 58.6 (its softmax Grad-CAM) and 70.8 (after its "
                  "attention refinement) with ViT-B/16 on the 1464 VOC 2012 train images.[/]")
    return ClipEsResult(images, source, scores, skipped).to_dict()
