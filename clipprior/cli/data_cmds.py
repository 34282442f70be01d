"""``clipprior lists build|check|episodes`` and ``clipprior coco-to-masks``: the benchmarks' data on disk."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from clipprior.cli._common import (
    command,
    console,
    dataset_options,
    debug_option,
    fold_option,
    folds_option,
    group,
    handle_errors,
    list_root_option,
    n_episodes_option,
    on_error_option,
    parse_folds,
    progress_bar,
    seed_option,
    shot_option,
    split_option,
)
from clipprior.data.coco import CROWD_MODES

__all__ = ["coco_to_masks", "lists"]


@group("lists")
def lists() -> None:
    r"""Few-shot list files (data_list / sub_class_file_list) and episode files.

    \b
    Examples:
      clipprior lists build --dataset pascal5i --data-root ~/data/VOC2012 --out lists/pascal
      clipprior lists check --dataset pascal5i --data-root ~/data/VOC2012 --list-root lists/pascal --folds 0
      clipprior lists episodes --dataset pascal5i --data-root ~/data/VOC2012 --fold 0 --shot 1 --out ep.jsonl
    """


@lists.command("build")
@dataset_options()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder to write (the trainers' lists/<dataset>); files go to OUT/fss_list/{val,train}/.")
@folds_option(help="Comma-separated folds to build.")
@split_option(multiple=True, default=("val", "train"), help="Split(s) to build; repeat the option for both.")
@click.option("--val-base-list", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Whole-dataset val list to filter (the trainers' lists/pascal/val.txt, lists/coco/val.txt) "
                   "[default: scan the data].")
@click.option("--train-base-list", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Whole-dataset train list (lists/pascal/voc_sbd_merge_noduplicate.txt, lists/coco/train.txt) "
                   "[default: scan the data].")
@click.option("--path-prefix", default=None, metavar="PREFIX",
              help="Written before every image and mask id [default: the data root's absolute path]; "
                   "'' writes root-relative ids, ../data/VOCdevkit2012/VOC2012 the trainers' own form.")
@on_error_option(help="Stop at a missing or unreadable file, or skip it and report.")
@debug_option
@handle_errors
def build_cmd(dataset: str, data_root: Path, coco_split: str, out: Path, folds: str | None, splits: tuple[str, ...],
              val_base_list: Path | None, train_base_list: Path | None, path_prefix: str | None, on_error: str,
              debug: bool) -> None:
    r"""Build PFENet/BAM-format list files from the masks, by the trainers' rule.

    A class counts in an image when it covers at least 2*32*32 = 2048 pixels; training lists keep
    only images whose classes are all base classes. Every mask is read once for all folds. For
    lists identical to the trainers', pass their whole-dataset lists as base lists.

    \b
    Examples:
      clipprior lists build --dataset pascal5i --data-root ~/data/VOC2012 --out lists/pascal
      clipprior lists build --dataset pascal5i --data-root ~/data/VOC2012 --out lists/pascal \
          --val-base-list PI-CLIP/lists/pascal/val.txt \
          --train-base-list PI-CLIP/lists/pascal/voc_sbd_merge_noduplicate.txt
      clipprior lists build --dataset coco20i --data-root ~/data/MSCOCO2014 --out lists/coco --split val --folds 0
    """
    from clipprior.data import build_fss_lists, write_fss_lists
    from clipprior.data.layout import check_root
    from clipprior.data.report import DataReport

    fold_list = parse_folds(folds, dataset)
    root = check_root(data_root, dataset, tuple(dict.fromkeys(splits)))
    prefix = str(root) if path_prefix is None else path_prefix
    report = DataReport()
    table = Table(title=f"{dataset} lists -> {out}")
    for column in ("split", "fold", "images", "(image, class) pairs", "classes"):
        table.add_column(column)
    for split in dict.fromkeys(splits):
        base = val_base_list if split == "val" else train_base_list
        with progress_bar(f"{split} masks") as progress:
            built = build_fss_lists(dataset, root, split, fold_list, coco_split, base_list=base, on_error=on_error,
                                    report=report, progress=progress)
        for fold, fss in built.items():
            write_fss_lists(fss, out, prefix)
            empty = [c for c in fss.classes if not fss.class_index[c]]
            note = f"{len(fss.classes)}" + (f" ([yellow]empty: {empty}[/])" if empty else "")
            table.add_row(split, str(fold), str(len(fss.items)), str(fss.pair_count()), note)
    console.print(table)
    if report:
        console.print(f"[yellow]{report.summary()}[/]", highlight=False)
    console.print(f"[green]wrote[/] {out / 'fss_list'}")


@lists.command("check")
@dataset_options()
@list_root_option(help="The list folder to check [default: build the lists from the masks and check the data].")
@folds_option(help="Comma-separated folds to check.")
@split_option(multiple=True, default=("val",), help="Split(s) to check; repeat the option for both.")
@click.option("--decode/--no-decode", default=True, show_default=True,
              help="Decode every image and mask (corrupt files, size mismatches, bad mask values), "
                   "or only check that files exist.")
@debug_option
@handle_errors
def check_cmd(dataset: str, data_root: Path, coco_split: str, list_root: Path | None, folds: str | None,
              splits: tuple[str, ...], decode: bool, debug: bool) -> None:
    r"""Check list files against the data: every file exists, decodes, and masks match images.

    Reports every problem (it never stops at the first) and exits with status 1 if there is any.

    \b
    Examples:
      clipprior lists check --dataset pascal5i --data-root ~/data/VOC2012 --list-root PI-CLIP/lists/pascal
      clipprior lists check --dataset coco20i --data-root ~/data/MSCOCO2014 --list-root lists/coco --folds 1 \
          --no-decode
    """
    from clipprior.data import open_dataset

    problems = 0
    table = Table(title=f"{dataset} lists" + (f" in {list_root}" if list_root else " built from the masks"))
    for column in ("split", "fold", "images", "pairs per class", "list sha256", "problems"):
        table.add_column(column)
    reports = []
    for split in dict.fromkeys(splits):
        for fold in parse_folds(folds, dataset):
            with progress_bar(f"{split} fold {fold}") as progress:
                ds = open_dataset(dataset, data_root, fold, split, list_root=list_root, coco_split=coco_split,
                                  on_error="skip", verify=decode, progress=progress)
            per_class = ", ".join(f"{c}:{len(ds.class_index[c])}" for c in ds.classes)
            table.add_row(split, str(fold), str(len(ds.items)), per_class, ds.list_checksum[:12], str(len(ds.report)))
            problems += len(ds.report)
            if ds.report:
                reports.append(f"{split} fold {fold}: {ds.report.summary()}")
    console.print(table)
    for text in reports:
        console.print(f"[yellow]{text}[/]", highlight=False)
    if problems:
        console.print(f"[bold red]check failed:[/] {problems} problem(s)")
        raise click.exceptions.Exit(1)
    console.print("[green]all listed files are present" + (" and readable" if decode else "") + "[/]")


@lists.command("episodes")
@dataset_options()
@list_root_option(help="The trainers' list folder [default: build the lists from the masks].")
@fold_option()
@split_option()
@shot_option()
@n_episodes_option()
@seed_option()
@on_error_option()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Episode file [default: episodes-DATASET-foldF-SPLIT-KSHOT-seedS.jsonl].")
@debug_option
@handle_errors
def episodes_cmd(dataset: str, data_root: Path, coco_split: str, list_root: Path | None, fold: int, split: str,
                 shot: int, n_episodes: int | None, seed: int, on_error: str, out: Path | None, debug: bool) -> None:
    r"""Sample episodes with the PFENet-family protocol and write them to an episode file.

    Queries follow the list in order, cycling; the class is drawn among the fold's classes present
    in the query; the supports are distinct entries of that class's list, never the query.

    \b
    Examples:
      clipprior lists episodes --dataset pascal5i --data-root ~/data/VOC2012 --list-root lists/pascal --folds 0
      clipprior lists episodes --dataset coco20i --data-root ~/data/MSCOCO2014 --fold 2 --shot 5 --episodes 1000
    """
    from clipprior.data import EpisodeMeta, default_episodes, open_dataset, sample_episodes, write_episodes

    count = n_episodes or default_episodes(dataset)
    out = out or Path(f"episodes-{dataset}-fold{fold}-{split}-{shot}shot-seed{seed}.jsonl")
    with progress_bar("masks") as progress:
        ds = open_dataset(dataset, data_root, fold, split, list_root=list_root, coco_split=coco_split,
                          on_error=on_error, progress=progress)
    episodes = sample_episodes(ds, count, shot=shot, seed=seed)
    write_episodes(out, episodes, EpisodeMeta.for_dataset(ds, shot=shot, seed=seed))
    if ds.report:
        console.print(f"[yellow]{ds.report.summary()}[/]", highlight=False)
    console.print(f"[green]wrote[/] {len(episodes)} {shot}-shot episodes of {dataset} fold {fold} {split} to {out}")


@command("coco-to-masks")
@click.option("--annotations", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="COCO instances file: instances_train2014.json or instances_val2014.json.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Mask folder: MSCOCO2014/annotations/train2014 or .../val2014.")
@click.option("--crowd", type=click.Choice(CROWD_MODES), default=CROWD_MODES[0], show_default=True,
              help="Crowd regions: painted with their class, as 255 (ignore), or left out.")
@click.option("--keep-empty", is_flag=True, help="Also write all-zero masks for images without annotations.")
@click.option("--overwrite/--no-overwrite", default=True, show_default=True,
              help="Replace existing masks (--no-overwrite resumes an interrupted run).")
@debug_option
@handle_errors
def coco_to_masks(annotations: Path, out: Path, crowd: str, keep_empty: bool, overwrite: bool, debug: bool) -> None:
    r"""Convert COCO instance annotations into the class-index PNG masks COCO-20i trainers read.

    Mask values: 0 background, 1..80 the classes by COCO category id (person=1 ... toothbrush=80).
    Needs pycocotools: pip install 'clipprior[coco]'.

    \b
    Examples:
      clipprior coco-to-masks --annotations annotations/instances_val2014.json --out MSCOCO2014/annotations/val2014
      clipprior coco-to-masks --annotations annotations/instances_train2014.json \
          --out MSCOCO2014/annotations/train2014 --no-overwrite
    """
    from clipprior.data import coco_to_masks as convert

    with progress_bar("images") as progress:
        stats = convert(annotations, out, crowd=crowd, keep_empty=keep_empty, overwrite=overwrite, progress=progress)
    console.print(f"[green]wrote[/] {stats.written} masks to {stats.out_dir} ({stats.images} images, "
                  f"{stats.empty} without annotations, {stats.existing} kept, {stats.annotations} annotations)")
