"""Hostile uses of caches: merging onto an input, a shard file that is not the shard, class names as ids."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from clipprior.cache import CacheWriter, PriorCache, merge_caches, shard_path
from clipprior.cli.main import app
from clipprior.errors import CacheError, ClipPriorError, InvalidInputError
from tests._cache_job import provenance, run_job


@pytest.fixture()
def shards(tmp_path: Path) -> list[Path]:
    for i in range(2):
        run_job(tmp_path / "p.h5", n_images=6, n_episodes=4, shard=(i, 2))
    return [shard_path(tmp_path / "p.h5", i, 2) for i in range(2)]


@pytest.mark.parametrize("spelling", ["same", "dotted", "symlink"])
def test_merge_onto_an_input_is_refused_and_the_shard_kept(shards: list[Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch, spelling: str) -> None:
    before = shards[0].read_bytes()
    monkeypatch.chdir(tmp_path)
    dotted = Path(".") / "sub" / ".." / shards[0].name
    out = {"same": shards[0], "dotted": dotted, "symlink": tmp_path / "link.h5"}[spelling]
    (tmp_path / "sub").mkdir()
    if spelling == "symlink":
        out.symlink_to(shards[0])
    result = CliRunner().invoke(app, ["merge", str(out), *map(str, shards), "--overwrite"])
    assert result.exit_code != 0
    assert "is also an input" in result.output and "Traceback" not in result.output
    assert shards[0].read_bytes() == before
    with pytest.raises(CacheError, match="is also an input"):
        merge_caches(shards, out, overwrite=True)
    assert shards[0].read_bytes() == before


def test_a_shard_path_holding_another_file_is_never_done(shards: list[Path], tmp_path: Path) -> None:
    merged = merge_caches(shards, tmp_path / "m.h5")
    shutil.copyfile(merged, shards[0])  # what `merge shard-0 ... --overwrite` used to leave behind
    with pytest.raises(CacheError, match=r"should hold shard 0/2 but holds a cache file"):
        run_job(tmp_path / "p.h5", n_images=6, n_episodes=4, shard=(0, 2))
    shutil.copyfile(shards[1], shards[0])  # another shard's file under this shard's name
    with pytest.raises(CacheError, match=r"should hold shard 0/2 but holds shard 1/2"):
        CacheWriter(tmp_path / "p.h5", provenance(shot=1, episodes=4), shard=(0, 2))
    shards[0].unlink()  # the fix the message gives: the shard is computed again, and merges
    run_job(tmp_path / "p.h5", n_images=6, n_episodes=4, shard=(0, 2))
    again = merge_caches(shards, tmp_path / "m2.h5")
    assert PriorCache(again).vtp_keys() == PriorCache(merged).vtp_keys()


def test_a_finished_shard_of_this_job_is_still_resumed(shards: list[Path], tmp_path: Path) -> None:
    before = shards[0].read_bytes()
    run_job(tmp_path / "p.h5", n_images=6, n_episodes=4, shard=(0, 2))
    assert shards[0].read_bytes() == before  # nothing to add: left untouched


@pytest.mark.parametrize("bad", ["cat", 1.0, None, True])
def test_class_id_of_another_type_is_a_clipprior_error(tmp_path: Path, bad: object) -> None:
    out = run_job(tmp_path / "p.h5", n_images=2, n_episodes=1)
    with PriorCache(out) as cache:
        key, class_id = cache.vtp_keys()[0]
        with pytest.raises(InvalidInputError, match="class_id must be the dataset's integer class id") as info:
            cache.vtp(key, bad)  # type: ignore[arg-type]
        assert isinstance(info.value, ClipPriorError)
        if bad == "cat":
            assert "clipprior.data.class_names('pascal5i').index('cat') + 1" in str(info.value)
        with pytest.raises(InvalidInputError):
            cache.has_vtp(key, bad)  # type: ignore[arg-type]
        for same in (class_id, np.int64(class_id), torch.tensor(class_id)):
            assert torch.equal(cache.vtp(key, same), cache.vtp(key, class_id))  # type: ignore[arg-type]
