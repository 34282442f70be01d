"""``clipprior precompute``: compute a benchmark's priors once and cache them in HDF5."""

from __future__ import annotations

from pathlib import Path

import click

from clipprior.cache import STORE_CHOICES
from clipprior.cli._common import (
    ProgressDisplay,
    clip_options,
    coco_split_option,
    command,
    console,
    data_root_option,
    dataset_option,
    debug_option,
    fold_option,
    handle_errors,
    list_root_option,
    n_episodes_option,
    on_error_option,
    preset_option,
    seed_option,
    shot_option,
    split_option,
)
from clipprior.config import config_choices
from clipprior.errors import InvalidInputError

__all__ = ["parse_batch_size", "parse_shard", "precompute"]


#: The options that name :func:`clipprior.precompute.check_episode_sources`'s arguments.
_OPTIONS = {"supports_per_query": "--supports-per-query", "shot": "--shot", "store": "--store",
            "n_episodes": "--episodes", "episode_file": "--episode-file"}


def _option(name: str, value: object = None) -> str:
    """An argument of the library's checks as this command's option: ``--shot 5``."""
    return _OPTIONS[name] if value is None else f"{_OPTIONS[name]} {value}"


def parse_batch_size(text: str) -> int | str:
    """``"auto"`` stays ``"auto"``; ``"8"`` -> ``8``.

    Raises:
        InvalidInputError: for anything else, or a number below 1.

    Example:
        >>> parse_batch_size("auto"), parse_batch_size("8")
        ('auto', 8)
    """
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise InvalidInputError(f"--batch-size {text!r} is not a whole number or 'auto'") from None
    if value < 1:
        raise InvalidInputError(f"--batch-size {value}: need at least 1 (or 'auto')")
    return value


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` -> ``(i, n)``; ``None`` stays ``None``.

    Raises:
        InvalidInputError: if the text is not ``i/n`` with ``0 <= i < n``.

    Example:
        >>> parse_shard("1/4")
        (1, 4)
    """
    if text is None:
        return None
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise InvalidInputError(f"--shard {text!r} is not of the form i/n, e.g. 0/4") from None
    if not 0 <= index < count:
        raise InvalidInputError(f"--shard {text!r}: need 0 <= i < n")
    return index, count


def _default_out(dataset: str, fold: int, split: str, shot: int) -> Path:
    return Path(f"priors-{dataset}-fold{fold}-{split}-{shot}shot.h5")


@command("precompute")
@dataset_option()
@fold_option()
@data_root_option(required=True)
@split_option()
@shot_option()
@n_episodes_option()
@seed_option(help="Episode sampler seed.")
@clip_options()
@click.option("--batch-size", default="auto", show_default=True, metavar="N|auto",
              help="Images per CLIP batch; auto: per image size from the device's memory (halved if it runs out).")
@click.option("--workers", type=click.IntRange(0, None), default=None,
              help="Load worker threads (decode/resize ahead of the device; 0: none) [default: half the cores, 1-8].")
@click.option("--text-classes", type=click.Choice(config_choices("text_classes")), default=None,
              help="Softmax class set: target alone (no labels needed) or every class in the query's ground "
                   "truth (the official code; uses labels) [default: from the preset].")
@preset_option()
@click.option("--geometry", type=click.Choice(config_choices("geometry")), default=None,
              help="Where the priors are computed: each image at its own size (native), or the FSS trainers' "
                   "validation geometry, images stretched to --geometry-size squared, as the official model "
                   "computes its priors (official) [default: from the preset: native].")
@click.option("--geometry-size", type=click.IntRange(16, None), default=None,
              help="Side of the trainers' square input for --geometry official [default: 473].")
@list_root_option(help="Folder of the trainers' list files (data_list_{fold}.txt, ...); built from the masks if "
                       "omitted.")
@click.option("--base-list", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Without --list-root: the whole-dataset 'image label' list the fold lists are built from (the "
                   "trainers' lists/pascal/val.txt, voc_sbd_merge_noduplicate.txt, ...) [default: scan the data].")
@click.option("--episode-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Use exactly these episodes (clipprior episode-list file) instead of sampling.")
@coco_split_option()
@on_error_option()
@click.option("--store", type=click.Choice(STORE_CHOICES), default=STORE_CHOICES[0], show_default=True,
              help="maps: the priors of the planned episodes; features: also every query's and (support, class)'s "
                   "VVP features, so the cache serves any episode a trainer draws (docs/training-loop.md).")
@click.option("--supports-per-query", type=click.IntRange(1, None), default=None, metavar="M",
              help="Pool cache for training: for every (query, class) of the list, M supports drawn by the "
                   "trainers' protocol, each a one-shot VVP; any --shot K <= M of them make an episode the cache "
                   "serves (replaces --episodes).")
@click.option("--shard", default=None, metavar="I/N",
              help="Compute shard I of N (merge the shards with `clipprior merge`); set automatically under torchrun.")
@click.option("--chunk-images", type=click.IntRange(1, None), default=64, show_default=True,
              help="Query images per chunk: bounds memory; each chunk is committed to disk when done.")
@click.option("--chunk-episodes", type=click.IntRange(1, None), default=256, show_default=True,
              help="Close a chunk once its images hold this many episodes (bounds memory when images recur).")
@click.option("--support-window", type=click.IntRange(1, None), default=1, show_default=True, metavar="N",
              help="Run the supports first used in N consecutive chunks together: fuller support batches on a mix "
                   "of image sizes (COCO on a GPU), their features held a little longer.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output HDF5 file [default: priors-DATASET-foldF-SPLIT-KSHOT.h5].")
@debug_option
@handle_errors
def precompute(dataset: str, fold: int, data_root: Path, split: str, shot: int, n_episodes: int | None, seed: int,
               model: str, device: str, dtype: str, batch_size: str, workers: int | None, text_classes: str | None,
               preset: str, geometry: str | None, geometry_size: int | None,
               list_root: Path | None, base_list: Path | None, episode_file: Path | None, coco_split: str,
               on_error: str, store: str, supports_per_query: int | None, shard: str | None,
               chunk_images: int, chunk_episodes: int, support_window: int, out: Path | None, debug: bool) -> None:
    r"""Compute the VTP (raw and PIR-refined) and VVP priors of a benchmark fold and cache them.

    Each unique query image runs through CLIP once, each (support, class) masked pass once; the
    cache is written in atomic segments, so rerunning the same command after a crash resumes.
    For training with random episodes, --store features serves any episode and
    --supports-per-query M any K of M planned supports per query and class.

    \b
    Examples:
      clipprior precompute --dataset pascal5i --fold 0 --data-root ~/data/VOCdevkit2012/VOC2012
      clipprior precompute --dataset coco20i --fold 1 --data-root ~/data/MSCOCO2014 --shot 5 --dtype fp16
      clipprior precompute --dataset pascal5i --fold 0 --data-root DIR --shard 0/4 --out p.h5
      clipprior precompute --dataset pascal5i --fold 0 --split train --data-root DIR --store features
      clipprior precompute --dataset pascal5i --fold 0 --split train --data-root DIR --shot 5 --supports-per-query 8
      torchrun --nproc-per-node 8 -m clipprior.cli.main precompute --dataset coco20i --fold 0 --split train ...
    """
    from clipprior import get_preset, load_clip
    from clipprior._device import local_rank_device
    from clipprior.cache import shard_from_environment
    from clipprior.data import open_dataset
    from clipprior.precompute import check_episode_sources, fold_episodes, precompute_fold

    batch = parse_batch_size(batch_size)
    config = get_preset(preset)
    if text_classes is not None:
        config = config.replace(text_classes=text_classes)
    if geometry is not None:
        config = config.replace(geometry=geometry)
    if geometry_size is not None:
        config = config.replace(geometry_size=geometry_size)
    shard_spec = parse_shard(shard) or shard_from_environment()
    out = out or _default_out(dataset, fold, split, shot)

    console.print(f"[bold]clipprior precompute[/] {dataset} fold {fold} {split}, {shot}-shot -> {out}")
    if base_list is not None and list_root is not None:
        raise click.UsageError("--base-list builds the lists; it cannot be combined with --list-root")
    try:  # before the data is opened: a usage error
        check_episode_sources(supports_per_query, shot=shot, store=store, n_episodes=n_episodes,
                              episode_file=episode_file, spell=_option)
    except InvalidInputError as err:
        raise click.UsageError(str(err)) from None
    data = open_dataset(dataset, data_root, fold, split, list_root=list_root, coco_split=coco_split,
                        on_error=on_error, base_list=base_list)
    chosen = fold_episodes(data, shot=shot, seed=seed, n_episodes=n_episodes,
                           episode_file=episode_file, supports_per_query=supports_per_query)
    if data.report:
        console.print(f"[yellow]{data.report.summary()}[/]", highlight=False)
    clip = load_clip(model, device=local_rank_device(device), dtype=dtype)
    labels = {"query": "queries", "support": "supports", "episode": "episodes"}
    if store == "features":
        labels |= {"query_features": "query features", "support_features": "support features"}
    say = lambda line: console.print(f"[yellow]{line}[/]")  # noqa: E731
    with ProgressDisplay(list(labels.values()), console=console) as show:
        result = precompute_fold(
            clip, data, chosen, out, config=config, store=store, batch_size=batch, workers=workers, shard=shard_spec,
            chunk_images=chunk_images, chunk_episodes=chunk_episodes, support_window=support_window,
            on_error=on_error, on_plan=lambda kind, total: show.update(labels[kind], 0, total),
            progress=lambda kind, n: show.advance(labels[kind], n), log=say)
    path, stats, fstats = result.path, result.stats, result.feature_stats
    if stats.problems:
        console.print(f"[yellow]dropped {len(stats.dropped)} episode(s) that need a broken file[/] "
                      f"(--on-error skip):\n{stats.problems.summary()}", highlight=False, soft_wrap=True)
    if fstats is not None and fstats.problems:
        console.print(f"[yellow]left out the features of broken files[/] (--on-error skip):\n"
                      f"{fstats.problems.summary()}", highlight=False, soft_wrap=True)
    extra = ""
    if fstats is not None:
        extra = (f"; features: {fstats.vtp_written} VTP and {fstats.features_written} feature entries, "
                 f"{fstats.query_passes} query and {fstats.support_passes} support passes")
    console.print(
        f"[green]done[/] {path}: {stats.vtp_written} VTP and {stats.vvp_written} VVP written "
        f"({stats.skipped_vvp} episodes already cached); {stats.query_passes} query and "
        f"{stats.support_passes} support passes{extra}"
    )
