"""``clipprior inspect``, ``verify`` and ``merge`` through click's CliRunner."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from clipprior.cache import CacheWriter, PriorCache, shard_path
from clipprior.cli import cache_cmds
from clipprior.cli.main import app
from clipprior.errors import CacheError
from tests._cache_job import (
    assert_same_datasets,
    episodes,
    fake_vtp,
    fake_vvp,
    image_key,
    image_size,
    provenance,
    run_job,
)


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_job(tmp_path_factory.mktemp("cli") / "priors.h5")  # type: ignore[return-value]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copy(src, dst)
    return dst


@pytest.mark.parametrize("command", ["inspect", "verify", "merge"])
def test_help_has_examples_on_their_own_lines(runner: CliRunner, command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "Examples:\n" in result.output
    assert f"\n    clipprior {command} priors.h5" in result.output
    assert command in runner.invoke(app, ["--help"]).output


def test_inspect_tables(runner: CliRunner, cache_file: Path) -> None:
    result = runner.invoke(app, ["inspect", str(cache_file)])
    assert result.exit_code == 0, result.output
    cache = PriorCache(cache_file)
    for text in ("Provenance", "pascal5i", "Prior config", "pir_layers", "VTP entries", "vtp/refined", "float16",
                 "Values", "NaN/inf"):
        assert text in result.output, text
    assert f"{len(cache.vtp_keys())} (grids" in result.output
    assert f"{len(cache)} (1-shot)" in result.output
    assert "features entries" not in result.output  # a maps cache has no rows in the optional feature tables


def test_inspect_json(runner: CliRunner, cache_file: Path) -> None:
    result = runner.invoke(app, ["inspect", str(cache_file), "--json"])
    assert result.exit_code == 0
    summary = json.loads(result.stdout)
    cache = PriorCache(cache_file)
    assert summary["counts"]["vtp"] == len(cache.vtp_keys()) == summary["values"]["vtp/cam"]["entries"]
    assert summary["counts"]["episodes"] == len(cache) and summary["counts"]["images"] == len(cache.images)
    assert summary["counts"]["vvp_channels"] == 2 and summary["counts"]["shot"] == 1
    assert summary["provenance"]["dataset"] == "pascal5i" and summary["attrs"]["kind"] == "cache"
    assert summary["datasets"]["vtp/refined"]["dtype"] == "float16"
    assert summary["datasets"]["vtp/refined"]["compression"] == "gzip"
    stats = summary["values"]["vtp/cam"]
    assert 0.0 <= stats["min"] <= stats["mean"] <= stats["max"] <= 1.0 and stats["nonfinite"] == 0
    # statistics are taken inside each grid only: the count is the sum of grid areas
    with h5py.File(cache_file) as f:
        assert stats["values"] == int(np.prod(f["vtp/grid"][:], axis=1).sum())
    sample = json.loads(runner.invoke(app, ["inspect", str(cache_file), "--json", "--max-entries", "3"]).stdout)
    assert sample["values"]["vtp/cam"]["entries"] == 3


def test_inspect_errors_are_one_clean_line(runner: CliRunner, tmp_path: Path) -> None:
    run_job(tmp_path / "p.h5", finalize=False)
    result = runner.invoke(app, ["inspect", str(tmp_path / "p.h5")])
    assert result.exit_code == 1
    assert "not finished" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["inspect", str(tmp_path / "none.h5")])
    assert result.exit_code == 1 and "no prior cache" in result.output
    result = runner.invoke(app, ["inspect", str(tmp_path / "none.h5"), "--debug"])
    assert isinstance(result.exception, CacheError)


def test_verify_ok(runner: CliRunner, cache_file: Path) -> None:
    result = runner.invoke(app, ["verify", str(cache_file)])
    assert result.exit_code == 0, result.output
    assert "OK" in result.output and "10 episodes" in result.output


def test_verify_reports_missing_entries(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "p.h5"
    eps = episodes(4, 3)
    with CacheWriter(out, provenance()) as writer:
        writer.set_episodes(eps)
        for i in range(4):
            writer.add_image(image_key(i), *image_size(i))
        writer.add_vtp(eps[0].query_image, eps[0].class_id, *fake_vtp(0, eps[0].class_id))
        writer.add_vvp(0, fake_vvp(eps[0], 1))
        writer.add_vvp(1, fake_vvp(eps[1], 1))
        writer.finalize(require_complete=False)
    result = runner.invoke(app, ["verify", str(out)])
    assert result.exit_code == 1
    assert "episode 2: VVP is missing" in result.output
    assert f"episode 1: VTP ('{image_key(1)}', class {eps[1].class_id}) is missing" in result.output
    assert "episode 0" not in result.output
    assert "failed verification" in result.output


@pytest.mark.parametrize(("dataset", "inside", "problem"), [
    ("vtp/refined", True, "vtp/refined: 1 entries with NaN/inf"),
    ("vtp/cam", True, "vtp/cam: 1 entries with NaN/inf"),
    ("vvp/maps", True, "vvp/maps: 1 entries with NaN/inf"),
    ("vtp/refined", False, None),  # the zero padding outside a grid is not data
])
def test_verify_finds_nonfinite_values(runner: CliRunner, cache_file: Path, tmp_path: Path, dataset: str,
                                       inside: bool, problem: str | None) -> None:
    path = _copy(cache_file, tmp_path / "bad.h5")
    with h5py.File(path, "r+") as f:
        grids = f[dataset.split("/")[0] + "/grid"][:]
        data = f[dataset]
        row = int(np.argmin(grids[:, 0]))  # an entry with padding below its grid
        h = grids[row][0]
        assert h < data.shape[-2]
        index = (row, ..., 0, 0) if inside else (row, ..., h, 0)
        block = data[row]
        block[index[1:]] = np.nan
        data[row] = block
    result = runner.invoke(app, ["verify", str(path)])
    if problem is None:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code == 1 and problem in result.output


def test_verify_checks_vvp_channels_against_config(runner: CliRunner, tmp_path: Path) -> None:
    out = run_job(tmp_path / "p.h5", config='{"pir_layers": 8, "vvp_layers": [-1, -2, -3]}')
    result = runner.invoke(app, ["verify", str(out)])
    assert result.exit_code == 1
    assert "VVP has 2 channels; expected len(vvp_layers) x K = 3 x 1" in result.output


def test_verify_shard_checks_values_not_coverage(runner: CliRunner, tmp_path: Path) -> None:
    shard = run_job(tmp_path / "p.h5", shard=(0, 2))
    result = runner.invoke(app, ["verify", str(shard)])
    assert result.exit_code == 0, result.output
    assert "shard 0/2" in result.output and "coverage is checked by `clipprior merge`" in result.output


def test_verify_sample_calls_the_recompute_hook(runner: CliRunner, cache_file: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict] = []

    def fake(cache, sample, **kwargs):  # type: ignore[no-untyped-def]
        calls.append({"cache": cache, "sample": list(sample), **kwargs})
        return []

    monkeypatch.setattr(cache_cmds, "_recompute_sample", fake)
    result = runner.invoke(app, ["verify", str(cache_file), "--sample", "3", "--seed", "1", "--model", "m",
                                 "--device", "cpu", "--atol", "0.5"])
    assert result.exit_code == 0, result.output
    assert "3 episodes recomputed" in result.output
    (call,) = calls
    assert len(call["sample"]) == 3 and len({e.index for e in call["sample"]}) == 3
    assert call["model"] == "m" and call["device"] == "cpu" and call["atol"] == 0.5 and call["dtype"] == "fp32"
    assert isinstance(call["cache"], PriorCache)
    again = runner.invoke(app, ["verify", str(cache_file), "--sample", "3", "--seed", "1"])
    assert again.exit_code == 0 and [e.index for e in calls[1]["sample"]] == [e.index for e in call["sample"]]

    monkeypatch.setattr(cache_cmds, "_recompute_sample", lambda *a, **k: ["episode 4: VTP differs by 0.3"])
    result = runner.invoke(app, ["verify", str(cache_file), "--sample", "1"])
    assert result.exit_code == 1 and "VTP differs by 0.3" in result.output

    def never(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("--sample 0 must not recompute")

    monkeypatch.setattr(cache_cmds, "_recompute_sample", never)
    assert runner.invoke(app, ["verify", str(cache_file)]).exit_code == 0


def test_verify_sample_needs_the_data_root(runner: CliRunner, cache_file: Path) -> None:
    # Recomputation itself is tested end to end in tests/test_precompute.py.
    result = runner.invoke(app, ["verify", str(cache_file), "--sample", "2"])
    assert result.exit_code == 1
    assert "--data-root" in result.output and "Traceback" not in result.output


def test_merge_command(runner: CliRunner, tmp_path: Path, cache_file: Path) -> None:
    shards = [run_job(tmp_path / "p.h5", shard=(i, 2)) for i in range(2)]
    out = tmp_path / "merged.h5"
    result = runner.invoke(app, ["merge", str(out), *map(str, shards)])
    assert result.exit_code == 0, result.output
    assert "Merged 2 shards" in result.output
    assert_same_datasets(out, cache_file)
    result = runner.invoke(app, ["merge", str(out), *map(str, shards)])
    assert result.exit_code == 1 and "exists" in result.output
    assert runner.invoke(app, ["merge", str(out), *map(str, shards), "--overwrite"]).exit_code == 0
    result = runner.invoke(app, ["merge", str(tmp_path / "m2.h5"), str(shards[0])])
    assert result.exit_code == 1
    assert f"missing shard(s) [1] of 2: expected {shard_path(tmp_path / 'm2.h5', 1, 2)}" in result.output
    assert not (tmp_path / "m2.h5").exists()
    assert runner.invoke(app, ["merge", str(out)]).exit_code == 2  # usage error: no shards
