"""Issue 13, CLI items: option checks, clean output errors, words that match behaviour, progress without a TTY."""

from __future__ import annotations

import errno
import io
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image
from rich.console import Console

from clipprior.cli._common import ProgressDisplay
from clipprior.cli.main import app
from clipprior.data import open_dataset, sample_episodes
from clipprior.data.synthetic import write_synthetic, write_synthetic_pascal
from clipprior.errors import DataNotFoundError, DatasetError
from tests._synthetic_priors import make_synthetic_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_synthetic_cache(tmp_path_factory.mktemp("messages"), fold=0, n_episodes=3)


def invoke(*args: object, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    return result.exit_code, result.output


# ------------------------------------------------------------------------------------ 7: option checks


@pytest.mark.parametrize(("grid", "message"), [
    ("0:1:0", "STEP must be positive"),
    ("0:1:-0.1", "STEP must be positive"),
    ("1.5", "thresholds must lie in [0, 1]"),
    ("0.2,-0.1", "thresholds must lie in [0, 1]"),
    ("0:2:0.5", "thresholds must lie in [0, 1]"),
    ("a:b", "use 'START:STOP:STEP'"),
])
def test_bad_thresholds_are_usage_errors(cache: tuple[Path, Path], grid: str, message: str) -> None:
    path, root = cache
    code, output = invoke("evaluate", path, "--data-root", root, "--thresholds", grid)
    assert code == 2 and message in output and "Traceback" not in output


def test_thresholds_in_range_are_accepted(cache: tuple[Path, Path]) -> None:
    path, root = cache
    code, output = invoke("evaluate", path, "--data-root", root, "--thresholds", "0.25,0.75", "--threshold", "0.25")
    assert code == 0, output


# ---------------------------------------------------------------------------- 7: unwritable output


def test_show_into_a_file_names_the_path_and_the_option(cache: tuple[Path, Path], tmp_path: Path) -> None:
    path, root = cache
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    code, output = invoke("show", path, "--data-root", root, "--html", blocker / "report")
    assert code == 1 and "Errno" not in output and "Traceback" not in output
    assert f"cannot write {blocker / 'report'}" in output and "pass --html with a writable location" in output


def test_read_only_show_and_demo_print_one_clean_line(cache: tuple[Path, Path], tmp_path: Path,
                                                      tiny_clip_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def read_only(self: Image.Image, fp: object, *args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(fp))

    monkeypatch.setattr(Image.Image, "save", read_only)
    path, root = cache
    out = tmp_path / "panels"
    code, output = invoke("show", path, "--data-root", root, "--out", out)
    assert code == 1 and "[Errno 30]" not in output
    assert output.strip().splitlines()[-1] == (
        f"Error: cannot write {out / 'episode_00000.png'}: read-only file system; pass --out with a writable "
        "location")
    code, output = invoke("demo", "--model", tiny_clip_dir, "--device", "cpu", "--out", tmp_path / "demo.png")
    assert code == 1 and "[Errno 30]" not in output
    assert f"cannot write {tmp_path / 'demo.png'}: read-only file system; pass --out" in output


# ------------------------------------------------------------------------ 8: words that match behaviour


def test_help_only_promises_what_is_true() -> None:
    for command in ("evaluate", "verify"):
        code, output = invoke(command, "--help")
        assert code == 0 and "recorded in the cache" not in output.replace("\n", " ")
    code, output = invoke("precompute", "--help")
    assert "--base-list" in output


def test_missing_pascal_val_list_points_to_options_that_exist(tmp_path: Path) -> None:
    root = write_synthetic(tmp_path / "VOC2012", "pascal5i", {"val": {"a": [1]}}, size=(64, 64))
    (root / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(DataNotFoundError, match=r"precompute --base-list.*clipprior lists build"):
        open_dataset("pascal5i", root, fold=0)


def test_a_failed_sampling_prints_the_skip_report(tmp_path: Path) -> None:
    root = write_synthetic(tmp_path / "VOC2012", "pascal5i", {"val": {"a": [1], "b": [2]}}, size=(64, 64))
    dataset = open_dataset("pascal5i", root, fold=0, on_error="skip")
    with pytest.raises(DatasetError, match=r"2 problems skipped:\n  .*JPEGImages/a\.jpg") as err:
        sample_episodes(dataset, 4, shot=1)
    assert "see the dataset's report" not in str(err.value)


def test_precompute_base_list_skip_report_and_plain_progress(tmp_path: Path, tiny_clip_dir: Path) -> None:
    root = write_synthetic_pascal(tmp_path / "VOC2012", per_class=2, size=(64, 96))
    base = tmp_path / "val.txt"
    stems = [line for line in (root / "ImageSets/Segmentation/val.txt").read_text().split() if line]
    base.write_text("".join(f"JPEGImages/{s}.jpg SegmentationClassAug/{s}.png\n" for s in stems)
                    + "JPEGImages/gone.jpg SegmentationClassAug/gone.png\n")
    (root / "ImageSets/Segmentation/val.txt").unlink()  # only the base list can say what val is
    args = ["precompute", "--dataset", "pascal5i", "--fold", "0", "--data-root", root, "--base-list", base,
            "--model", tiny_clip_dir, "--device", "cpu", "--episodes", "3", "--on-error", "skip",
            "--out", tmp_path / "p.h5"]
    code, output = invoke(*args, env={"CLIPPRIOR_PROGRESS_INTERVAL": "0"})
    assert code == 0, output
    assert output.count("1 problem skipped:") == 1 and "broken entries" not in output
    assert "gone.jpg" in output
    assert re.search(r"^episodes: 3/3 \(100%\)", output, re.M), output  # plain lines, not a TTY
    assert "━" not in output
    code, again = invoke(*args, env={"CLIPPRIOR_PROGRESS_INTERVAL": "0"})  # a no-op resume
    assert code == 0, again
    assert "(3 episodes already cached)" in again
    rates = [float(r.replace(",", "")) for r in re.findall(r"([\d,.]+)/s", again)]
    assert all(r <= 3 for r in rates), again  # no rate before a second has passed: at most 3 items / 1 s
    assert "Loading weights" not in output + again


# ------------------------------------------------------------------------------------- 9: progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_progress_lines_at_a_steady_interval() -> None:
    out, clock = io.StringIO(), FakeClock()
    with ProgressDisplay(["images", "never"], console=Console(file=out, width=200), interval=5, clock=clock) as show:
        for step in range(1, 13):
            clock.now += 1
            show.update("images", step, 12)
    lines = out.getvalue().splitlines()
    assert lines == [
        "images: 5/12 (42%), 1.25/s, 0:00:04 elapsed, ETA 0:00:06",
        "images: 10/12 (83%), 1.11/s, 0:00:09 elapsed, ETA 0:00:02",
        "images: 12/12 (100%), 1.09/s, 0:00:11 elapsed, ETA 0:00:00",
    ]


def test_plain_progress_says_nothing_for_tasks_never_started_or_after_an_error() -> None:
    out, clock = io.StringIO(), FakeClock()
    with pytest.raises(RuntimeError), ProgressDisplay(["merging"], console=Console(file=out), clock=clock):
        raise RuntimeError("boom")
    with ProgressDisplay(["quiet"], console=Console(file=out), clock=clock, quiet=True) as show:
        show(1, 2)
    assert out.getvalue() == ""


def test_terminal_bars_appear_only_once_a_task_starts() -> None:
    out, clock = io.StringIO(), FakeClock()
    console = Console(file=out, force_terminal=True, width=120)
    with pytest.raises(RuntimeError), ProgressDisplay(["merging"], console=console, clock=clock):
        raise RuntimeError("boom")
    assert "0/?" not in out.getvalue()


@pytest.mark.parametrize("command", [["merge", "OUT", "MISSING1", "MISSING2"], ["inspect", "MISSING1"],
                                     ["verify", "MISSING1"]])
def test_no_empty_bars_before_an_error(tmp_path: Path, command: list[str]) -> None:
    args = [str(tmp_path / a) if a.isupper() else a for a in command]
    code, output = invoke(*args)
    assert code == 1 and "0/?" not in output and output.startswith("Error:"), output


def test_loading_weights_bar_is_silenced_for_our_load_only(tiny_clip_dir: Path, capfd: pytest.CaptureFixture[str]
                                                           ) -> None:
    from transformers.utils import logging as hf_logging

    from clipprior.model import load_clip

    load_clip(str(tiny_clip_dir), device="cpu")
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # not silenced globally
