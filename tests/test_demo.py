"""``clipprior demo`` on a tiny random CLIP, and its offline message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from clipprior.cli.main import app
from clipprior.model import load_clip
from clipprior.photos import DEMO_EPISODES, demo_panel


def test_demo_writes_a_valid_panel_png_of_the_expected_size(tiny_clip_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "demo.png"
    result = CliRunner().invoke(app, ["demo", "--model", str(tiny_clip_dir), "--device", "cpu", "--out", str(out),
                                      "--tile-height", "128"])
    assert result.exit_code == 0, result.output
    assert "Wrote" in result.output and "VTP refined" in result.output
    with Image.open(out) as png:
        png.verify()
    with Image.open(out) as png:
        assert png.format == "PNG" and png.mode == "RGB"
        size = png.size
        pixels = np.asarray(png)
    # Same panel in-process: the PNG is exactly the rendered panel.
    panel, rows = demo_panel(load_clip(str(tiny_clip_dir), device="cpu"), tile_height=128)
    assert size == panel.size
    assert [r["class"] for r in rows] == ["person", "cat", "cup"]
    assert all(set(r["iou"]) == {"VVP", "VTP raw", "VTP refined"} for r in rows)
    assert all(0.0 <= v <= 1.0 for r in rows for v in r["iou"].values())
    # Three rows of 128-px pictures: taller than 3 * 128, and the heat maps bring saturated colour.
    assert size[1] > 3 * 128 and size[0] > 5 * 128
    saturated = (pixels.max(axis=2).astype(int) - pixels.min(axis=2)) > 120
    assert saturated.mean() > 0.05


def test_demo_panel_height_follows_tile_height(tiny_clip_dir: Path) -> None:
    bundle = load_clip(str(tiny_clip_dir), device="cpu")
    small, _ = demo_panel(bundle, DEMO_EPISODES[:1], tile_height=96)
    big, _ = demo_panel(bundle, DEMO_EPISODES[:1], tile_height=144)
    assert big.height - small.height == 48


def test_demo_offline_without_weights_says_what_to_do(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE", "TRANSFORMERS"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "clipprior.cli.main", "demo", "--out", str(tmp_path / "demo.png")],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )
    assert result.returncode == 1
    message = " ".join(result.stderr.split())  # rich wraps long lines
    assert "openai/clip-vit-base-patch16" in message
    assert "clipprior demo --model PATH" in message and "save_pretrained" in message
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "demo.png").exists()


@pytest.mark.parametrize("command", ["demo", "show", "evaluate"])
def test_help_shows_examples_one_per_line(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    start = lines.index("  Examples:")
    assert lines[start + 1].startswith(f"    clipprior {command}")
    assert lines[start + 2].startswith(f"    clipprior {command}")
