"""Does ``torch.compile`` pay off for the engine's no-grad trunk? Eager vs compiled, same run, interleaved.

The candidate named in docs/precompute.md ("What was considered and not done"): the layers a
pass runs without gradient and without hooks -- every encoder layer but the last, at one fixed
shape per size bucket -- compiled with ``dynamic=False``. The hooked parts (PIR's attention
recording, the Grad-CAM gradient, the support pass's last layer on foreground rows) stay eager.

For one bucket shape (batch B of H x W images) the script times the trunk ``embed -> layers[:-1]``
eager and compiled (inductor), interleaved repeat by repeat after a warm-up, and reports the
compile time (first call), the steady medians, their ratio and the largest difference between the
two outputs. CUDA graphs (``mode="reduce-overhead"``) are measured too with ``--device cuda``.

Usage:
    .venv/bin/python benchmarks/bench_compile.py --model vit-b16 --batch 4 --size 320 480 --repeats 5
    .venv/bin/python benchmarks/bench_compile.py --model vit-b16 --device cuda --dtype bf16 --batch 64
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import DTYPES, MODELS, random_clip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def trunk_fn(clip: Any, mode: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``pixels (B, 3, H, W) -> hidden (B, 1 + h*w, D)`` after every layer but the last, no grad."""
    from clipprior._vision import embed, run_layer, vision_layers

    vm = clip.model.vision_model
    blocks = list(vision_layers(vm))[:-1]

    def trunk(pixels: torch.Tensor) -> torch.Tensor:
        hidden = embed(vm, pixels, mode)
        for block in blocks:
            hidden = run_layer(block, hidden)
        return hidden

    return trunk


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Time eager and compiled trunks on one bucket shape; see the module docstring."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    clip = random_clip(args.model, args.device, args.dtype)
    dtype = DTYPES[args.dtype]
    pixels = torch.randn(args.batch, 3, *args.size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    eager = trunk_fn(clip, "bilinear")
    variants: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"eager": eager}
    modes = ["default"] + (["reduce-overhead"] if device.type == "cuda" else [])
    compile_s: dict[str, float] = {}
    outputs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for mode in modes:
            compiled = torch.compile(eager, dynamic=False, mode=mode)
            seconds, _ = _timed(lambda c=compiled: c(pixels), device)  # first call compiles
            compile_s[mode] = seconds
            variants[f"compiled-{mode}"] = compiled
        if args.dynamic:
            # One graph for every bucket shape? Compile at another shape first, then time the first
            # call at the measured shape: a recompile shows up as a second compile time.
            dynamic = torch.compile(eager, dynamic=True)
            other = torch.randn(args.batch, 3, args.size[0] + 2 * clip.patch_size, args.size[1] - clip.patch_size,
                                generator=torch.Generator().manual_seed(1)).to(device, dtype)
            compile_s["dynamic"], _ = _timed(lambda: dynamic(other), device)
            compile_s["dynamic, 2nd shape"], _ = _timed(lambda: dynamic(pixels), device)
            variants["compiled-dynamic"] = dynamic
        for name, fn in variants.items():  # warm-up
            for _ in range(args.warmup):
                outputs[name] = fn(pixels)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):  # interleaved: the machine's load hits every variant alike
            for name, fn in variants.items():
                seconds, _ = _timed(lambda f=fn: f(pixels), device)
                times[name].append(seconds)
    medians = {name: statistics.median(t) for name, t in times.items()}
    reference = outputs["eager"].float()
    return {
        "benchmark": "compile",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.device}",
        "torch": torch.__version__,
        "command": "python " + " ".join(sys.argv),
        "model": args.model, "device": args.device, "dtype": args.dtype, "batch": args.batch,
        "size": list(args.size), "threads": args.threads, "repeats": args.repeats, "dynamic": args.dynamic,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "compile_s": {k: round(v, 2) for k, v in compile_s.items()},
        "median_ms": {k: round(1e3 * v, 2) for k, v in medians.items()},
        "speedup": {k: round(medians["eager"] / v, 3) for k, v in medians.items() if k != "eager"},
        "max_abs_diff": {k: float((v.float() - reference).abs().max()) for k, v in outputs.items() if k != "eager"},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="vit-b16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, nargs=2, default=(320, 480), metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dynamic", action="store_true", help="also time one dynamic-shape graph for all sizes")
    parser.add_argument("--out", type=Path, help="append the result as a JSON line to this file")
    args = parser.parse_args(argv)
    result = measure(args)
    line = json.dumps(result)
    print(line)
    if args.out:
        with args.out.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
