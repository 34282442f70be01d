"""Micro-benchmark of the post-processing: pir() and VVP's cosine-max per batch, before vs after.

"Before" is the code of an earlier commit (``--before``, default the one before the device
post-processing), loaded from git into this process next to the current code, so both run on the
same machine, inputs and load, interleaved: for each repeat, before then after.

- ``pir``: ``pir(cam, attention, output_size=...)`` on P pairs at an (h, w) grid (the box mask
  included); the old one labelled the box mask with SciPy map by map after a host copy.
- ``box_mask``: the box mask alone (on CPU tensors both use SciPy's labelling);
  ``box_mask_tensor_path``: the old one against the batched tensor path that accelerators run.
- ``vvp``: the cosine-max of P (query, support) pairs with the supports' foreground cells, as the
  engine runs it: before, one ``best_match`` per pair in a Python loop; after, one
  ``best_cosine_match`` over the batch. Also ``vvp_from_features`` before/after (the full-grid einsum
  vs the foreground cells).

Usage:
    .venv/bin/python benchmarks/bench_post.py --pairs 64 --grid 30 --repeats 7 --threads 2
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from clipprior.priors import SupportCells, _box_mask_device, best_cosine_match, box_mask, pir, vvp_from_features

REPO = Path(__file__).resolve().parent.parent


def load_old(rev: str, path: str, name: str) -> ModuleType:
    """A module of the repository as it was at ``rev``, imported under ``name``."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{path}"], check=True, capture_output=True,
                            text=True).stdout
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def smooth_cams(pairs: int, grid: int, gen: torch.Generator) -> torch.Tensor:
    small = torch.rand(pairs, 1, max(2, grid // 5), max(2, grid // 5), generator=gen)
    cam = F.interpolate(small, size=(grid, grid), mode="bilinear", align_corners=False)[:, 0]
    cam = cam - cam.amin(dim=(1, 2), keepdim=True)
    return cam / cam.amax(dim=(1, 2), keepdim=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="c20cde1", help="git revision of the 'before' code")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--grid", type=int, default=30)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--foreground", type=float, default=0.2, help="fraction of support cells in the mask")
    parser.add_argument("--output-size", type=int, default=480)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", default="pir,box_mask,box_mask_tensor_path,cosine_max,vvp_from_features",
                        help="comma-separated subset")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    old_priors = load_old(args.before, "clipprior/priors.py", "clipprior_before_priors")
    old_post = load_old(args.before, "clipprior/precompute/post.py", "clipprior_before_post")

    gen = torch.Generator().manual_seed(0)
    p, g, n = args.pairs, args.grid, args.grid * args.grid
    cam = smooth_cams(p, g, gen)
    attention = torch.softmax(torch.randn(p, n, n, generator=gen) * 3, dim=-1)
    size = (args.output_size, args.output_size)
    query = torch.randn(p, args.layers, n, args.dim, generator=gen)
    support = torch.randn(p, args.layers, n, args.dim, generator=gen)
    mask = torch.rand(p, n, generator=gen) < args.foreground
    qn = query.norm(dim=-1)
    cells = SupportCells.from_grid(support, mask)
    old_cells = [old_post.Cells.from_grid(support[i], mask[i]) for i in range(p)]

    cases: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
        "pir": (lambda: old_priors.pir(cam, attention, output_size=size),
                lambda: pir(cam, attention, output_size=size)),
        "box_mask": (lambda: old_priors.box_mask(cam), lambda: box_mask(cam)),
        "box_mask_tensor_path": (lambda: old_priors.box_mask(cam), lambda: _box_mask_device(cam, 0.4, False)),
        "cosine_max": (lambda: [old_post.best_match(query[i], qn[i], old_cells[i], 1e-7) for i in range(p)],
                       lambda: best_cosine_match(query, qn, cells)),
        "vvp_from_features": (lambda: old_priors.vvp_from_features(query, support[:, None], mask[:, None], (g, g)),
                              lambda: vvp_from_features(query, support[:, None], mask[:, None], (g, g))),
    }
    wanted = args.cases.split(",")
    cases = {k: v for k, v in cases.items() if k in wanted}
    # Same numbers before and after (the benchmark checks what it times; the outputs double as warm-up).
    for name, (before, after) in cases.items():
        old, new = before(), after()
        if name.startswith("box_mask"):
            assert torch.equal(old, new)
        elif name == "pir":
            assert torch.equal(old.box_mask, new.box_mask)
            torch.testing.assert_close(old.refined, new.refined, atol=1e-6, rtol=0)
        else:
            torch.testing.assert_close(torch.stack(old) if isinstance(old, list) else old, new, atol=1e-6, rtol=0)

    load_before = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    results = {}
    for name, (before, after) in cases.items():
        times: dict[str, list[float]] = {"before": [], "after": []}
        for _ in range(args.repeats):
            times["before"].append(timed(before))
            times["after"].append(timed(after))
        med = {k: statistics.median(v) for k, v in times.items()}
        results[name] = {"before_median_s": med["before"], "after_median_s": med["after"],
                         "before_min_s": min(times["before"]), "after_min_s": min(times["after"]),
                         "speedup_median": med["before"] / med["after"]}
        print(f"{name:18s} before {med['before'] * 1e3:9.2f} ms  after {med['after'] * 1e3:9.2f} ms  "
              f"(median of {args.repeats}; min {min(times['before']) * 1e3:.2f} / {min(times['after']) * 1e3:.2f} ms)"
              f"  x{med['before'] / med['after']:.2f}")
    load_after = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    record = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "machine": platform.processor()
              or platform.machine(), "threads": args.threads, "torch": torch.__version__, "args": vars(args) | {
                  "out": str(args.out)}, "load_average": [load_before, load_after], "results": results}
    print(f"load average {load_before} -> {load_after}")
    if args.out:
        args.out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
