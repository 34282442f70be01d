"""``clipprior show`` on a synthetic cache: PNG panels and the HTML index (opened in headless Chromium)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from clipprior.cli.main import app
from clipprior.cli.show import parse_episode_spec
from clipprior.errors import InvalidInputError
from tests._browser import check_page_in_chromium
from tests._synthetic_priors import make_synthetic_cache


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_synthetic_cache(tmp_path_factory.mktemp("show"), fold=0, n_episodes=6)


def test_show_writes_one_valid_png_per_episode(synthetic: tuple[Path, Path], tmp_path: Path) -> None:
    cache, root = synthetic
    out = tmp_path / "panels"
    result = CliRunner().invoke(app, ["show", str(cache), "--data-root", str(root), "--episodes", "0,2-3",
                                      "--out", str(out), "--tile-height", "96"])
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in out.iterdir())
    assert files == ["episode_00000.png", "episode_00002.png", "episode_00003.png"]
    sizes = set()
    for name in files:
        with Image.open(out / name) as png:
            png.verify()
        with Image.open(out / name) as png:
            assert png.format == "PNG" and png.mode == "RGB"
            sizes.add(png.size)
            pixels = np.asarray(png)
    # Same-size synthetic images: every panel has the same size; 5 pictures of aspect 1.5 at 96 px.
    assert len(sizes) == 1
    width, height = sizes.pop()
    assert width > 5 * 144
    # Pictures are exactly --tile-height tall: 48 px more of it makes the panel 48 px taller.
    bigger = tmp_path / "bigger"
    CliRunner().invoke(app, ["show", str(cache), "--data-root", str(root), "--episodes", "0", "--out", str(bigger),
                             "--tile-height", "144"])
    with Image.open(bigger / "episode_00000.png") as png:
        assert png.height - height == 48 and abs(png.width - width - 5 * 72) <= 5
    assert ((pixels.max(axis=2).astype(int) - pixels.min(axis=2)) > 120).mean() > 0.05  # heat maps drawn


def test_show_html_index_opens_in_chromium_with_all_images(synthetic: tuple[Path, Path], tmp_path: Path) -> None:
    cache, root = synthetic
    site = tmp_path / "site"
    result = CliRunner().invoke(app, ["show", str(cache), "--data-root", str(root), "--episodes", "all",
                                      "--html", str(site), "--tile-height", "96"])
    assert result.exit_code == 0, result.output
    page = site / "index.html"
    text = page.read_text()
    assert re.findall(r'<img src="([^"]+)"', text) == [f"episodes/episode_{i:05d}.png" for i in range(6)]
    # The summary over the shown episodes: VTP raw is built to score IoU 50 %, refined 100 %, VVP 33.3 %.
    assert "<td>VTP raw</td><td>50.0</td>" in text
    assert "<td>VTP refined</td><td>100.0</td>" in text
    assert "<td>VVP</td><td>33.3</td>" in text
    loaded, shot = check_page_in_chromium(page, tmp_path / "browser")
    assert loaded == (6, 6)
    assert ((shot.max(axis=2).astype(int) - shot.min(axis=2)) > 120).mean() > 0.01


def test_show_needs_a_data_root(synthetic: tuple[Path, Path], tmp_path: Path) -> None:
    cache, _ = synthetic
    result = CliRunner().invoke(app, ["show", str(cache), "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "--data-root" in result.output and "Traceback" not in result.output


def test_show_rejects_unknown_episodes(synthetic: tuple[Path, Path], tmp_path: Path) -> None:
    cache, root = synthetic
    result = CliRunner().invoke(app, ["show", str(cache), "--data-root", str(root), "--episodes", "99",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 1 and "not in the cache" in result.output


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("0,2-3", [0, 2, 3]), (":2", [0, 1]), ("all", [0, 1, 2, 3, 4]), ("3, 1, 3", [3, 1]), ("4-4", [4])],
)
def test_parse_episode_spec(spec: str, expected: list[int]) -> None:
    assert parse_episode_spec(spec, [0, 1, 2, 3, 4]) == expected


@pytest.mark.parametrize(("spec", "match"), [("a", "indices and ranges"), ("7", "not in the cache"), (":x", "integer")])
def test_parse_episode_spec_errors(spec: str, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        parse_episode_spec(spec, [0, 1, 2, 3, 4])
