"""Computed (not measured) cache sizes per store mode, from the real list files and ViT-B/16's sizes.

Run: ``.venv/bin/python benchmarks/store_sizes.py [LISTS_DIR]`` (default ../shared/lists). Prints a
Markdown table: for each dataset, split and fold, the query images (list lines), the (support image,
class) pairs of the support lists, and the feature bytes a ``--store features`` cache holds:

* per query image, the patch features of the 2 VVP layers, float16: 2 x n x 768 x 2 bytes, with
  n = 29 x 29 = 841 cells in the official geometry (473x473); natively n depends on the image size
  (PASCAL's typical 500x375 -> 32 x 24 = 768 cells, COCO's 640x480 -> 40 x 30 = 1200);
* per (support image, class), the features of its foreground cells only: at most the same, and in
  proportion to the object's area (the upper bound is printed);

uncompressed (float16 features barely compress). A ``--supports-per-query M`` (pool) cache holds
one 2-channel VVP per (query, class, support): about M x 2 x 1.6 KiB per (query, class) pair, from
the ~1.6 KiB measured per stored map (``docs/cache-format.md``); the pairs are counted from the
support lists, whose (image, class) pairs are the (query, class) pairs a trainer draws. The VTP
of every mode is ~1.6 KiB per (image, class) and negligible.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

LAYERS, WIDTH, BYTES = 2, 768, 2
MAP_KIB = 1.6  # measured compressed size of one stored map (docs/cache-format.md)
POOL_M = 8
CELLS = {"official": 29 * 29, "pascal5i": 32 * 24, "coco20i": 40 * 30}


def _pairs(path: Path) -> int | None:
    if not path.exists():
        return None
    index = ast.literal_eval(path.read_text())
    return sum(len(v) for v in index.values())


def main(root: Path) -> None:
    print("| dataset | split | fold | query images | support pairs | query features (official / native) "
          f"| support features, upper bound (official) | pool, M = {POOL_M} |")
    print("|---|---|---|---|---|---|---|---|")
    for dataset, folder in (("pascal5i", "pascal"), ("coco20i", "coco")):
        for split in ("train", "val"):
            for fold in range(4):
                lines = root / folder / "fss_list" / split / f"data_list_{fold}.txt"
                if not lines.exists():
                    continue
                images = sum(1 for line in lines.read_text().splitlines() if line.strip())
                pairs = _pairs(root / folder / "fss_list" / split / f"sub_class_file_list_{fold}.txt")
                per = {k: LAYERS * n * WIDTH * BYTES for k, n in CELLS.items()}
                query = f"{images * per['official'] / 2**30:.2f} / {images * per[dataset] / 2**30:.2f} GiB"
                support = "list not shipped" if pairs is None else f"{pairs * per['official'] / 2**30:.2f} GiB"
                pool = "?" if pairs is None else f"{pairs * POOL_M * 2 * MAP_KIB / 2**10:.0f} MiB"
                print(f"| {dataset} | {split} | {fold} | {images:,} | {'?' if pairs is None else f'{pairs:,}'} "
                      f"| {query} | {support} | {pool} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared" / "lists")
