"""The precompute pipeline's own costs: host time outside CLIP passes, overlap, batch fill, batch-size numbers.

Sub-commands (each prints one JSON line; ``--record`` appends it to benchmarks/results.jsonl):

* ``host``: the engine's wall time outside CLIP passes per unique image (query + support passes),
  with a tiny CLIP whose passes cost almost nothing, on a synthetic fold at real image sizes. It
  imports only what every version of the engine has, so that the same command measures an older
  checkout (``PYTHONPATH=/path/to/old/checkout``) for a before/after comparison.
* ``overlap``: the same run with the loads and the writes slowed by injected sleeps (a dataset and
  a cache writer that sleep), serial (``--workers 0``) and with load workers: the pipeline's wall
  time should grow by much less than the sum of the sleeps.
* ``batchdiff``: the largest float32 difference between batch sizes, before the cache's float16
  storage (an in-memory writer keeps the float32 maps).
* ``coco``: a COCO-20i-shaped fold (``../shared/lists/coco``, COCO's mix of image sizes, only the
  images the sampled episodes use are written) through the engine: batch fill of the plan and wall
  time; ``--device cuda`` runs it on a GPU.

Examples:
    python benchmarks/bench_pipeline.py host --episodes 300
    PYTHONPATH=/tmp/old python benchmarks/bench_pipeline.py host --episodes 300 --data-root /tmp/fold
    python benchmarks/bench_pipeline.py overlap --delay 0.01
    python benchmarks/bench_pipeline.py batchdiff --model vit-b16 --episodes 12
    python benchmarks/bench_pipeline.py coco --episodes 5000 --model tiny --plan-only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"

# CLIPPRIOR_ROOT=/path/to/other/checkout measures that checkout's engine (a before/after comparison
# from one venv whose editable install would otherwise win over PYTHONPATH).
if os.environ.get("CLIPPRIOR_ROOT"):
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path.insert(0, os.environ["CLIPPRIOR_ROOT"])

sys.path.insert(0, str(HERE))
from _common import random_clip  # noqa: E402  (after the CLIPPRIOR_ROOT switch; it imports clipprior lazily)
from _report import append_result  # noqa: E402


def _git(path: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _machine(args: argparse.Namespace) -> dict[str, Any]:
    import clipprior

    engine_root = Path(clipprior.__file__).resolve().parent.parent
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "loadavg": os.getloadavg(), "engine_checkout": str(engine_root), "engine_git": _git(engine_root),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "device": args.device}


def _pascal(args: argparse.Namespace) -> Path:
    """The synthetic PASCAL-5i fold 0 val at real sizes (written once into ``--data-root``)."""
    root = args.data_root or Path(tempfile.mkdtemp(prefix="bench-pipe-")) / "VOC2012"
    if not (root / "JPEGImages").is_dir():
        from _synthetic_fold import write_synthetic_fold

        write_synthetic_fold(root, SHARED / "lists" / "pascal", 0, "val", seed=0, scale=args.image_scale)
    return root


def _fold(args: argparse.Namespace, model: str, dtype: str) -> tuple[Any, Any, list[Any], list[str]]:
    """CLIP, dataset, ``--episodes`` sampled episodes (seed 321) and class names of the synthetic PASCAL fold."""
    from clipprior.data import open_dataset, prompt_names, sample_episodes

    root = _pascal(args)
    clip = random_clip(model, args.device, dtype)
    dataset = open_dataset("pascal5i", root, 0, "val", list_root=SHARED / "lists" / "pascal")
    episodes = sample_episodes(dataset, args.episodes, shot=args.shot, seed=321)
    return clip, dataset, episodes, prompt_names("pascal5i")


class _Timer:
    """Wraps the engine's CLIP pass functions and sums the wall time spent inside them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.inside = 0.0
        self.inside_cpu = 0.0  # CPU time of the calling thread inside the passes
        self.calls = 0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*a: Any, **k: Any) -> Any:
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self.inside += time.perf_counter() - start
                self.inside_cpu += time.thread_time() - cpu
                self.calls += 1
        return timed


def _pass_modules() -> list[Any]:
    """The module(s) where the engine looks up its query pass (``_vtp_pass``, public ``vtp_pass`` since the
    priors API) and ``support_features``, in any version."""
    import clipprior.precompute as engine

    if hasattr(engine, "_vtp_pass"):  # the single-module engine (before the pipeline)
        return [engine]
    import clipprior.precompute.passes as passes

    return [passes]


def _run_engine(clip: Any, dataset: Any, episodes: list[Any], names: list[str], out: Path, timer: _Timer | None,
                writer_type: Any = None, **kwargs: Any) -> tuple[float, Any]:
    import clipprior.precompute as engine
    from clipprior.cache import CacheWriter

    modules = _pass_modules() if timer is not None else []
    saved = [(m, n, getattr(m, n)) for m in modules
             for n in ("_vtp_pass" if hasattr(m, "_vtp_pass") else "vtp_pass", "support_features")]
    for module, name, fn in saved:
        setattr(module, name, timer.wrap(fn))  # type: ignore[union-attr]
    try:
        start = time.perf_counter()
        _run_engine.cpu_start = time.process_time()  # type: ignore[attr-defined]
        with (writer_type or CacheWriter)(out, {"benchmark": "bench_pipeline"}) as writer:
            writer.set_episodes(engine.episode_records(episodes))
            stats = engine.run_precompute(clip, dataset, episodes, writer, class_names=names, **kwargs)
            writer.finalize()
        return time.perf_counter() - start, stats
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


def _engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    import inspect

    from clipprior.precompute import run_precompute

    kwargs: dict[str, Any] = {"batch_size": args.batch_size if args.batch_size == "auto" else int(args.batch_size)}
    if "workers" in inspect.signature(run_precompute).parameters and args.workers is not None:
        kwargs["workers"] = args.workers
    return kwargs


def cmd_host(args: argparse.Namespace) -> dict[str, Any]:
    """Host time outside CLIP passes per unique image, tiny CLIP, median of ``--repeats`` runs."""
    clip, dataset, episodes, names = _fold(args, "tiny", args.dtype)
    kwargs = _engine_kwargs(args)
    tmp = Path(tempfile.mkdtemp(prefix="bench-host-"))
    _run_engine(clip, dataset, episodes, names, tmp / "warm.h5", None, **kwargs)  # warm-up: file cache, kernels
    rows = []
    for r in range(args.repeats):
        timer = _Timer(clip.device)
        wall, stats = _run_engine(clip, dataset, episodes, names, tmp / f"run{r}.h5", timer, **kwargs)
        cpu = time.process_time() - _run_engine.cpu_start  # type: ignore[attr-defined]
        images = stats.query_passes + stats.support_passes
        rows.append({"wall_s": wall, "inside_passes_s": timer.inside, "outside_s": wall - timer.inside,
                     "images": images, "outside_per_image_ms": 1000 * (wall - timer.inside) / images,
                     "cpu_s": cpu, "inside_passes_cpu_s": timer.inside_cpu,
                     "outside_cpu_per_image_ms": 1000 * (cpu - timer.inside_cpu) / images})
    med = statistics.median(r["outside_per_image_ms"] for r in rows)
    return {"benchmark": "bench_pipeline", "kind": "host", "machine": _machine(args), "episodes": args.episodes,
            "shot": args.shot, "engine_kwargs": kwargs, "runs": rows, "outside_per_image_ms_median": med,
            "outside_cpu_per_image_ms_median": statistics.median(r["outside_cpu_per_image_ms"] for r in rows),
            "wall_s_median": statistics.median(r["wall_s"] for r in rows)}


def cmd_overlap(args: argparse.Namespace) -> dict[str, Any]:
    """Loads and writes slowed by sleeps: serial vs pipelined wall time against the sum of the sleeps."""
    from clipprior.cache import CacheWriter

    clip, dataset, episodes, names = _fold(args, "tiny", args.dtype)
    delay = args.delay
    counts = {"loads": 0, "writes": 0}

    class SlowData:
        def __init__(self) -> None:
            self.image_size = dataset.image_size
            self.load_label = dataset.load_label

        def load_image(self, path: str) -> np.ndarray:
            counts["loads"] += 1
            time.sleep(delay)
            return dataset.load_image(path)

    class SlowWriter(CacheWriter):
        def add_vtp(self, *a: Any, **k: Any) -> None:
            counts["writes"] += 1
            time.sleep(delay)
            super().add_vtp(*a, **k)

        def add_vvp(self, *a: Any, **k: Any) -> None:
            counts["writes"] += 1
            time.sleep(delay)
            super().add_vvp(*a, **k)

    tmp = Path(tempfile.mkdtemp(prefix="bench-overlap-"))
    batch = {"batch_size": 8}
    _run_engine(clip, dataset, episodes, names, tmp / "warm.h5", None, workers=2, **batch)
    rows: dict[str, list[float]] = {"plain": [], "slow_serial": [], "slow_pipelined": []}
    injected = []
    for r in range(args.repeats):  # interleaved, so that all three see the same load
        rows["plain"].append(_run_engine(clip, dataset, episodes, names, tmp / f"p{r}.h5", None, workers=0,
                                         **batch)[0])
        counts.update(loads=0, writes=0)
        rows["slow_serial"].append(_run_engine(clip, SlowData(), episodes, names, tmp / f"s{r}.h5", None,
                                               SlowWriter, workers=0, **batch)[0])
        injected.append(delay * (counts["loads"] + counts["writes"]))
        rows["slow_pipelined"].append(_run_engine(clip, SlowData(), episodes, names, tmp / f"q{r}.h5", None,
                                                  SlowWriter, workers=args.workers or 4, **batch)[0])
    med = {k: statistics.median(v) for k, v in rows.items()}
    sleep = statistics.median(injected)
    return {"benchmark": "bench_pipeline", "kind": "overlap", "machine": _machine(args), "episodes": args.episodes,
            "delay_s": delay, "loads": counts["loads"], "writes": counts["writes"], "injected_s": sleep,
            "walls": rows, "median_s": med, "growth_serial_s": med["slow_serial"] - med["plain"],
            "growth_pipelined_s": med["slow_pipelined"] - med["plain"],
            "growth_pipelined_fraction_of_injected": (med["slow_pipelined"] - med["plain"]) / sleep}


class _MemoryWriter:
    """An in-memory cache writer keeping the float32 maps (no float16 storage)."""

    def __init__(self) -> None:
        self.vtp: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        self.vvp: dict[int, np.ndarray] = {}
        self.images: set[str] = set()

    def has_vtp(self, image: str, c: int) -> bool:
        return (image, c) in self.vtp

    def has_vvp(self, i: int) -> bool:
        return i in self.vvp

    def has_image(self, image: str) -> bool:
        return image in self.images

    def add_image(self, image: str, height: int, width: int) -> None:
        self.images.add(image)

    def add_vtp(self, image: str, c: int, cam: Any, refined: Any) -> None:
        self.vtp[(image, c)] = (np.asarray(cam, np.float32).copy(), np.asarray(refined, np.float32).copy())

    def add_vvp(self, i: int, vvp: Any) -> None:
        self.vvp[i] = np.asarray(vvp, np.float32).copy()

    def commit(self) -> int:
        return 0

    def set_episodes(self, records: Any) -> None:  # the engine registers the episodes it computed
        pass


def cmd_batchdiff(args: argparse.Namespace) -> dict[str, Any]:
    """Largest float32 difference of each map kind between batch sizes (against batch 1)."""
    import clipprior.precompute as engine

    clip, dataset, episodes, names = _fold(args, args.model, "fp32")
    results: dict[str, _MemoryWriter] = {}
    for size in args.sizes:
        writer = _MemoryWriter()
        engine.run_precompute(clip, dataset, episodes, writer, class_names=names,
                              batch_size=size if size == "auto" else int(size), workers=1)
        results[size] = writer
    base = results[args.sizes[0]]
    diffs = {}
    for size in args.sizes[1:]:
        other = results[size]
        diffs[size] = {
            "vtp_cam": max(float(np.abs(other.vtp[k][0] - v[0]).max()) for k, v in base.vtp.items()),
            "vtp_refined": max(float(np.abs(other.vtp[k][1] - v[1]).max()) for k, v in base.vtp.items()),
            "vvp": max(float(np.abs(other.vvp[k] - v).max()) for k, v in base.vvp.items()),
        }
    return {"benchmark": "bench_pipeline", "kind": "batchdiff", "machine": _machine(args), "model": args.model,
            "episodes": args.episodes, "shot": args.shot, "against": args.sizes[0], "max_abs_diff": diffs,
            "pairs": len(base.vtp)}


class _Files:
    """The engine's dataset protocol over a folder of files (only the images the episodes use exist)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def load_image(self, path: str) -> np.ndarray:
        from PIL import Image

        with Image.open(self.root / path) as image:
            return np.asarray(image.convert("RGB"))

    def load_label(self, path: str) -> np.ndarray:
        from PIL import Image

        with Image.open(self.root / path) as image:
            return np.asarray(image)

    def image_size(self, path: str) -> tuple[int, int]:
        from PIL import Image

        with Image.open(self.root / path) as image:
            return image.height, image.width


def _list_episodes(class_index: dict[int, list[tuple[str, str]]], count: int, shot: int, seed: int) -> list[Any]:
    """Test episodes drawn from the fold lists alone, as the PFENet-family samplers draw them.

    A class uniformly, a query among its listed (image, label) pairs, ``shot`` other pairs of the
    class as supports. (``sample_episodes`` reads every mask it considers; the synthetic COCO fold
    writes only the images the episodes use, so the benchmark draws from the lists.)
    """
    from types import SimpleNamespace

    rng = np.random.default_rng(seed)
    classes = sorted(c for c, pairs in class_index.items() if len(pairs) > shot)
    episodes = []
    for _ in range(count):
        c = classes[int(rng.integers(len(classes)))]
        pairs = class_index[c]
        picks = rng.choice(len(pairs), size=shot + 1, replace=False)
        query, supports = pairs[int(picks[0])], [tuple(pairs[int(i)]) for i in picks[1:]]
        episodes.append(SimpleNamespace(query_image=query[0], query_label=query[1], class_id=c, supports=supports))
    return episodes


def cmd_coco(args: argparse.Namespace) -> dict[str, Any]:
    """A COCO-20i-shaped fold through the engine: batch fill of the plan, wall time, passes."""
    from _synthetic_fold import _rng, coco_size, write_synthetic_images

    from clipprior.data import num_classes, prompt_names, read_fss_lists
    from clipprior.precompute import plan_chunks, plan_work
    from clipprior.precompute.plan import plan_schedule, size_batches

    lists_root = SHARED / "lists" / "coco"
    root = args.data_root or Path(tempfile.mkdtemp(prefix="bench-coco-")) / "MSCOCO2014"
    lists = read_fss_lists(lists_root, "coco20i", args.fold, "val")
    listed: dict[tuple[str, str], list[int]] = {pair: [] for pair in lists.items}
    for c, pairs in (lists.class_index or {}).items():
        for pair in pairs:
            listed.setdefault(pair, []).append(c)
    dataset = _Files(root)
    episodes = _list_episodes(lists.class_index or {}, args.episodes, args.shot, seed=321)
    used = {(e.query_image, e.query_label) for e in episodes} | {s for e in episodes for s in e.supports}
    patch = 16  # ViT-B/16 and the tiny CLIP alike

    def planned(image_id: str) -> tuple[int, int]:  # the size write_synthetic_images gives this image
        height, width = coco_size(_rng(0, image_id))
        up = [patch * -(-round(side * args.image_scale) // patch) for side in (height, width)]
        return up[0], up[1]

    # Batch fill of the query batches at a fixed batch size: first-appearance chunks (the engine
    # before the pipeline) against the pipeline's size-ordered chunks.
    plan = plan_work(episodes)
    sizes = {image: planned(image) for image, _ in used}
    fixed = args.fill_batch

    class _Empty:
        def has_vtp(self, *a: Any) -> bool:
            return False

        def has_vvp(self, *a: Any) -> bool:
            return False

    old = [len(b) for chunk in plan_chunks(plan.queries, 64, 256)
           for b in size_batches(chunk, lambda q: sizes[q.image], fixed)]
    schedule = plan_schedule(episodes, plan, sizes, lambda s: fixed, _Empty(),  # type: ignore[arg-type]
                             chunk_images=64, chunk_episodes=256)
    new = [len(b) for step in schedule.chunks for b in step.query_batches]
    support = [len(b) for step in schedule.chunks for b, _ in step.support_batches]
    windows = {}
    for window in args.support_windows:  # supports first used in W consecutive chunks batched together
        step_batches = plan_schedule(episodes, plan, sizes, lambda s: fixed, _Empty(),  # type: ignore[arg-type]
                                     chunk_images=64, chunk_episodes=256, support_window=window).chunks
        fill = [len(b) for step in step_batches for b, _ in step.support_batches]
        windows[str(window)] = {"batches": len(fill), "mean_fill": float(np.mean(fill))}
    result: dict[str, Any] = {
        "benchmark": "bench_pipeline", "kind": "coco", "machine": _machine(args), "model": args.model,
        "fold": args.fold, "episodes": args.episodes, "shot": args.shot, "image_scale": args.image_scale,
        "unique_images": len(used), "distinct_resized_sizes": len(set(sizes.values())),
        f"query_batches_at_{fixed}": {
            "first_appearance_chunks": {"batches": len(old), "mean_fill": float(np.mean(old))},
            "size_ordered_chunks": {"batches": len(new), "mean_fill": float(np.mean(new))}},
        f"support_batches_at_{fixed}": {"batches": len(support), "mean_fill": float(np.mean(support))},
        f"support_batches_at_{fixed}_by_window": windows,
    }
    if args.plan_only:
        return result
    start = time.perf_counter()
    others = [c for c in range(1, num_classes("coco20i") + 1) if c not in lists.classes]
    marker = root / ".written"
    if not marker.exists():
        marker.write_text(json.dumps(write_synthetic_images(root, {p: listed[p] for p in sorted(used)}, others,
                                                            coco_size, seed=0, scale=args.image_scale)))
    result["images"] = json.loads(marker.read_text())
    result["write_images_s"] = time.perf_counter() - start
    clip = random_clip(args.model, args.device, args.dtype)
    timer = _Timer(clip.device)
    out = Path(tempfile.mkdtemp(prefix="bench-coco-out-")) / "priors.h5"
    wall, stats = _run_engine(clip, dataset, episodes, prompt_names("coco20i"), out, timer, **_engine_kwargs(args))
    result.update(wall_s=wall, inside_passes_s=timer.inside, query_passes=stats.query_passes,
                  support_passes=stats.support_passes, episodes_per_s=args.episodes / wall,
                  outside_per_image_ms=1000 * (wall - timer.inside) / (stats.query_passes + stats.support_passes))
    return result


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command; print (and with ``--record``, append) its JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["host", "overlap", "batchdiff", "coco"])
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--shot", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--model", default="tiny", choices=["tiny", "vit-b16"])
    parser.add_argument("--batch-size", default="8", help="engine batch size (a number or auto)")
    parser.add_argument("--workers", type=int, default=None, help="load workers (engines that have them)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--delay", type=float, default=0.01, help="overlap: seconds slept per load and per write")
    parser.add_argument("--sizes", nargs="+", default=["1", "4", "auto"], help="batchdiff: batch sizes")
    parser.add_argument("--fold", type=int, default=1, help="coco: fold (../shared/lists/coco has class lists for 1-3)")
    parser.add_argument("--image-scale", type=float, default=1.0)
    parser.add_argument("--plan-only", action="store_true", help="coco: batch fill of the plan only (no images)")
    parser.add_argument("--fill-batch", type=int, default=32, help="coco: batch size of the batch-fill statistic")
    parser.add_argument("--support-windows", type=int, nargs="+", default=[1, 4, 8, 16],
                        help="coco: support windows (chunks) whose support-batch fill is reported")
    parser.add_argument("--data-root", type=Path, default=None, help="reuse (or fill) this synthetic data root")
    parser.add_argument("--record", action="store_true", help="append to benchmarks/results.jsonl")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"host": cmd_host, "overlap": cmd_overlap, "batchdiff": cmd_batchdiff, "coco": cmd_coco}[args.what](args)
    print(json.dumps(result, sort_keys=True))
    if args.record:
        append_result(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
