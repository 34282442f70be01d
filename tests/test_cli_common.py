"""The CLI's shared pieces: options from the registries, unwrapped help examples."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from clipprior.cli.main import app
from clipprior.config import list_presets
from clipprior.data import register_dataset, unregister_dataset
from clipprior.data.synthetic import write_synthetic
from tests.test_data_specs import TOY

COMMANDS = ["precompute", "inspect", "verify", "merge", "demo", "show", "evaluate", "lists", "coco-to-masks",
            "lists build", "lists check", "lists episodes"]


@pytest.fixture
def toy() -> Iterator[None]:
    register_dataset(TOY)
    try:
        yield
    finally:
        unregister_dataset(TOY.name)


@pytest.mark.parametrize("name", COMMANDS)
def test_help_keeps_examples_on_their_own_lines(name: str) -> None:
    result = CliRunner().invoke(app, [*name.split(), "-h"], terminal_width=200)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "Examples:")
    examples = [line for line in lines[start + 1:] if line.strip().startswith("clipprior")]
    assert len(examples) >= 2  # one line each, not rewrapped into a paragraph
    assert "\\b" not in result.output and "\b" not in result.output


def test_dataset_choices_come_from_the_registry(toy: None) -> None:
    result = CliRunner().invoke(app, ["precompute", "-h"], terminal_width=200)
    assert "[pascal5i|coco20i|toy3i]" in result.output
    result = CliRunner().invoke(app, ["lists", "build", "--dataset", "lvis", "--data-root", ".", "--out", "x"])
    assert result.exit_code == 2
    assert "unknown dataset 'lvis'; use one of pascal5i, coco20i, toy3i" in result.output


def test_preset_choices_come_from_the_config() -> None:
    result = CliRunner().invoke(app, ["precompute", "-h"], terminal_width=200)
    assert "[" + "|".join(list_presets()) + "]" in result.output
    result = CliRunner().invoke(app, ["precompute", "--dataset", "voc", "--fold", "0", "--data-root", ".",
                                      "--preset", "nope"])
    assert result.exit_code == 2 and "'nope' is not one of" in result.output


def test_fold_outside_every_dataset_is_a_usage_error() -> None:
    result = CliRunner().invoke(app, ["lists", "episodes", "--dataset", "pascal5i", "--data-root", ".",
                                      "--fold", "4"])
    assert result.exit_code == 2 and "4 is not in the range 0<=x<=3" in result.output


def test_lists_build_runs_on_a_registered_toy_dataset(toy: None, tmp_path: Path) -> None:
    images = {"val": {f"v{c}_{r}": [c] for c in range(1, 9) for r in range(2)}, "train": {}}
    root = write_synthetic(tmp_path / "TOY", "toy3i", images, size=(64, 64))
    result = CliRunner().invoke(app, ["lists", "build", "--dataset", "toy", "--data-root", str(root),
                                      "--out", str(tmp_path / "lists"), "--split", "val", "--folds", "0,1"])
    assert result.exit_code == 0, result.output
    data_list = (tmp_path / "lists" / "fss_list" / "val" / "data_list_1.txt").read_text().split("\n")
    assert data_list[0] == f"{root.resolve()}/images/val/v5_0.jpg {root.resolve()}/masks/val/v5_0.png"
