"""Machine facts, memory readings, and the results history that benchmarks/README.md's tables are made from.

Every full run appends one JSON object to ``benchmarks/results.jsonl``; :func:`update_readme`
re-renders the tables between the ``<!-- results:... -->`` markers of ``benchmarks/README.md``
from that file, so the README shows exactly what was measured, with machine, date and command.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "append_result",
    "current_rss_mb",
    "load_results",
    "machine_info",
    "peak_rss_mb",
    "render_tables",
    "reset_peak_rss",
    "update_readme",
]

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.jsonl"
README = HERE / "README.md"
_START, _END = "<!-- results:start -->", "<!-- results:end -->"


def _status_mb(field: str) -> float | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (VmHWM), in MiB."""
    value = _status_mb("VmHWM")
    if value is None:  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS)
        import resource

        raw = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        value = raw / 1024 / (1024 if sys.platform == "darwin" else 1)
    return value


def current_rss_mb() -> float | None:
    """Resident set size now (VmRSS), in MiB, or ``None`` where /proc is missing."""
    return _status_mb("VmRSS")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ``/proc/self/clear_refs``); whether it worked."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "clipprior"], cwd=HERE, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def machine_info(device: str) -> dict[str, Any]:
    """What ran the benchmark: CPU model, cores, threads, GPU, library versions, date, command."""
    import transformers

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git": _git_commit(),
        "gpu": None,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def append_result(result: dict[str, Any], path: Path = RESULTS) -> None:
    """Append one run's results as a JSON line."""
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(result, sort_keys=True) + "\n")


def load_results(path: Path = RESULTS) -> list[dict[str, Any]]:
    """Every recorded run, oldest first (an absent file is an empty history)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _s(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 600 else f"{seconds:.0f} s"


def render_tables(results: list[dict[str, Any]]) -> str:
    """Markdown tables (speed, per-pass cost against the floor, memory) of the recorded runs."""
    speed = ["| date | machine | device | shot | episodes | baseline (official, per episode) | ours (engine) "
             "| speedup | CLIP passes ours / baseline | peak RSS |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    floor = ["| date | shot | ours ÷ bare forward: whole run | query passes | support passes "
             "| bare forward per image (median) | load avg during run |",
             "|---|---|---|---|---|---|---|"]
    memory = ["| date | model | shot | episodes | peak RSS | RSS growth during the run | support store peak |",
              "|---|---|---|---|---|---|---|"]
    gpu = ["| date | device | shot | episodes | ours, episodes/s | baseline, episodes/s | speedup "
           "| forward FLOPs at | measured matmul rate | achieved fraction (bare forwards alone) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    commands = []
    for result in results:
        if result.get("benchmark", "bench_precompute") != "bench_precompute":
            continue  # bench_pipeline's records: reported in their own section of README.md
        m = result["machine"]
        s = result["settings"]
        machine = f"{m['cpu']}, {m['logical_cores']} cores, {m['torch_threads']} threads"
        device = f"{s['device']} {s['dtype']}" + (f" ({m['gpu']})" if m.get("gpu") else "")
        commands.append(f"- {m['date']}: `{m['command']}` (git {m.get('git')}, torch {m['torch']}, "
                        f"transformers {m['transformers']})")
        for run in result["runs"]:
            b, o, f = run["baseline"], run["ours"], run["floor"]
            speed.append(
                f"| {m['date']} | {machine} | {device} | {run['shot']} | {run['episodes']} "
                f"| {_s(b['extrapolated_s'])} = {run['episodes']} x {b['mean_s']:.2f} s "
                f"(sample of {b['sample']}: sd {b['sd_s']:.2f} s, 95% CI of mean ±{b['ci95_s']:.2f} s) "
                f"| {_s(o['wall_s'])} | **{run['speedup']:.1f}x** ({run['speedup_ci95'][0]:.1f}-"
                f"{run['speedup_ci95'][1]:.1f}) | {o['passes']} / {b['passes_extrapolated']} "
                f"| {run['peak_rss_mb']:.0f} MiB |")
            floor.append(
                f"| {m['date']} | {run['shot']} | **{f['ratio_total']:.3f}** | {f['ratio_query']:.3f} "
                f"| {f['ratio_support']:.3f} | {f['bare_per_image_median_s']:.3f} s "
                f"| {run['loadavg_start']:.1f} -> {run['loadavg_end']:.1f} |")
            t = run.get("throughput") or {}
            if "matmul" in t:
                bare = t.get("bare_fraction_of_matmul")
                gpu.append(
                    f"| {m['date']} | {device} | {run['shot']} | {run['episodes']} | {t['episodes_per_s']:.1f} "
                    f"| {t['baseline_episodes_per_s']:.1f} | **{run['speedup']:.1f}x** "
                    f"| {t['achieved_tflops']:.1f} TFLOP/s | {t['matmul']['tflops']:.0f} TFLOP/s "
                    f"({t['matmul']['n']}^3) | **{100 * t['fraction_of_matmul']:.1f}%** "
                    f"({'-' if bare is None else f'{100 * bare:.1f}%'}) |")
        for point in result.get("memory_curve", []):
            store = point.get("store_peak_mb")
            memory.append(
                f"| {m['date']} | {point['model']} | {point['shot']} | {point['episodes']} "
                f"| {point['peak_rss_mb']:.0f} MiB | {point['growth_mb']:+.0f} MiB "
                f"| {'-' if store is None else f'{store:.1f} MiB'} |")
    return "\n".join(["**Speed** (wall clock)", "", *speed, "", "**Cost per CLIP pass against the floor** "
                      "(bare `CLIPVisionModel` forward, sdpa, same batch and size, measured right after each "
                      "of our batches)", "", *floor, "", "**Memory** (separate processes, one per episode count)",
                      "", *memory,
                      *(["", "**GPU throughput** (forward FLOPs of our passes over our wall time, against "
                         "the device's own dense matmul rate in the same dtype, measured in the same run)", "",
                         *gpu] if len(gpu) > 2 else []),
                      "", "Commands:", "", *commands])


def update_readme(results: list[dict[str, Any]], readme: Path = README) -> bool:
    """Re-render the tables between the results markers of the README; whether the markers were found."""
    if not readme.is_file():
        return False
    text = readme.read_text(encoding="utf-8")
    if _START not in text or _END not in text:
        return False
    head, rest = text.split(_START, 1)
    _, tail = rest.split(_END, 1)
    readme.write_text(f"{head}{_START}\n{render_tables(results)}\n{_END}{tail}", encoding="utf-8")
    return True
