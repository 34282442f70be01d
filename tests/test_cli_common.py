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


#: The options spelled identically in more than one command, per command that takes them.
SHARED_OPTIONS = {
    "precompute": ["--dataset", "--fold", "--data-root", "--split", "--shot", "--episodes", "--seed", "--model",
                   "--device", "--dtype", "--preset", "--list-root", "--coco-split", "--on-error"],
    "evaluate": ["--data-root", "--threshold", "--dataset", "--split", "--model", "--preset", "--device", "--dtype"],
    "show": ["--data-root", "--cmap", "--tile-height", "--threshold"],
    "demo": ["--model", "--device", "--dtype", "--preset", "--cmap", "--tile-height"],
    "verify": ["--seed", "--model", "--data-root", "--device", "--dtype"],
    "lists build": ["--dataset", "--data-root", "--coco-split", "--folds", "--split", "--on-error"],
    "lists check": ["--dataset", "--data-root", "--coco-split", "--list-root", "--folds", "--split"],
    "lists episodes": ["--dataset", "--data-root", "--coco-split", "--list-root", "--fold", "--split", "--shot",
                       "--episodes", "--seed", "--on-error"],
}


@pytest.mark.parametrize("name", sorted(SHARED_OPTIONS))
def test_help_lists_the_shared_options(name: str) -> None:
    result = CliRunner().invoke(app, [*name.split(), "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    listed = {word for line in result.output.splitlines() for word in line.split() if word.startswith("--")}
    assert set(SHARED_OPTIONS[name]) <= listed


def test_shared_options_take_their_choices_from_the_registries() -> None:
    import click

    from clipprior.cli import _common
    from clipprior.data.classes import SPLITS
    from clipprior.data.report import ON_ERROR_CHOICES
    from clipprior.viz import COLORMAPS

    def option(decorator: object) -> click.Option:
        return click.command()(decorator(lambda **_: None)).params[0]  # type: ignore[operator]

    assert option(_common.split_option()).type.choices == SPLITS  # type: ignore[attr-defined]
    assert option(_common.split_option(multiple=True, default=SPLITS)).name == "splits"
    assert option(_common.on_error_option()).type.choices == ON_ERROR_CHOICES == ("raise", "skip")  # type: ignore[attr-defined]
    assert set(option(_common.cmap_option()).type.choices) == set(COLORMAPS)  # type: ignore[attr-defined]
    assert option(_common.data_root_option(help="Where.")).help == "Where."
    assert [p.name for p in click.command()(_common.clip_options()(lambda **_: None)).params] == [
        "model", "device", "dtype"]
    assert [p.name for p in click.command()(_common.dataset_options()(lambda **_: None)).params] == [
        "dataset", "data_root", "coco_split"]


def test_commands_declare_shared_options_through_common() -> None:
    import re

    cli = Path(__file__).parents[1] / "clipprior" / "cli"
    shared = {opt for opts in SHARED_OPTIONS.values() for opt in opts}
    for path in sorted(set(cli.glob("*.py")) - {cli / "_common.py"}):
        spelled = set(re.findall(r'click\.option\(\s*"(--[a-z-]+)"', path.read_text(encoding="utf-8")))
        if path.name == "show.py":
            spelled.discard("--episodes")  # a selection ("0,5,10-20"), not the episode count of lists/precompute
        assert not spelled & shared, (path.name, spelled & shared)


def test_folds_default_to_every_fold_of_the_dataset(toy: None) -> None:
    from clipprior.cli._common import parse_folds
    from clipprior.errors import InvalidInputError

    assert parse_folds(None, "pascal5i") == [0, 1, 2, 3] and parse_folds(None, "toy") == [0, 1]
    assert parse_folds("1, 0,1", "coco20i") == [0, 1]
    with pytest.raises(InvalidInputError, match="folds are 0 and 1"):
        parse_folds("2", "toy3i")
    with pytest.raises(InvalidInputError, match=r"e\.g\. 0,1,2,3"):
        parse_folds("x", "pascal5i")


def test_help_texts_and_choices_come_from_the_registries(toy: None) -> None:
    from clipprior.cache import STORE_MODES
    from clipprior.cli import _common
    from clipprior.config import config_choices
    from clipprior.data import CROWD_MODES

    root_help = _common.data_root_option()(lambda **_: None).__click_params__[0].help  # type: ignore[attr-defined]
    assert "VOC2012 folder" in root_help and "MSCOCO2014 folder" in root_help
    episodes_help = _common.n_episodes_option()(lambda **_: None).__click_params__[0].help  # type: ignore[attr-defined]
    assert "PASCAL-5i 1000, COCO-20i 5000, Toy-3i 7" in episodes_help
    commands = {"precompute": ("--text-classes", "--geometry", "--store"), "coco-to-masks": ("--crowd",)}
    choices = {}
    for name, options in commands.items():
        params = {p.opts[0]: p for p in app.get_command(None, name).params}  # type: ignore[arg-type,union-attr]
        choices.update({opt: tuple(params[opt].type.choices) for opt in options})  # type: ignore[attr-defined]
    assert choices["--text-classes"] == config_choices("text_classes")
    assert choices["--geometry"] == config_choices("geometry")
    assert set(choices["--store"]) == set(STORE_MODES) - {"pool"}
    assert choices["--crowd"] == CROWD_MODES
