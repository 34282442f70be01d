"""Hostile uses of caches: merging onto an input, a shard file that is not the shard, class names as ids,
a disk that fills up while the final file is written."""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from clipprior.cache import CacheWriter, PriorCache, _h5, merge_caches, parts_dir, shard_path
from clipprior.cli.main import app
from clipprior.errors import CacheError, CacheWriteError, ClipPriorError, InvalidInputError
from tests._cache_job import assert_same_datasets, provenance, run_job

JOB = Path(__file__).with_name("_cache_job.py")


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


# ------------------------------------------------------------ a disk that fills up while finalizing


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run (12 images, 10 episodes; committed in several segments)."""
    return run_job(tmp_path_factory.mktemp("ref") / "ref.h5")  # type: ignore[return-value]


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _fill_disk_at(monkeypatch: pytest.MonkeyPatch, where: str, after: int) -> dict[str, int]:
    """Make the finalize's ``where`` system call fail with ENOSPC, as when another process fills the disk.

    ``pwrite``: once ``after`` bytes are written (the call that crosses the mark writes up to it, as
    the kernel does, and the next one fails); ``ftruncate`` (HDF5 closing the file) and ``fsync``
    (a file system that finds out late, such as NFS): always.
    """
    state = {"written": 0, "failed": 0}
    full = OSError(errno.ENOSPC, "No space left on device")
    if where == "pwrite":
        def pwrite(fd: int, data: memoryview, offset: int) -> int:
            room = after - state["written"]
            if room <= 0:
                state["failed"] += 1
                raise full
            done = _h5.os.pwrite(fd, data[:room], offset)
            state["written"] += done
            return done

        monkeypatch.setattr(_h5, "_pwrite", pwrite)
    else:
        def fail(*args: object) -> None:
            state["failed"] += 1
            raise full

        monkeypatch.setattr(_h5, f"_{where}", fail)
    return state


@pytest.mark.parametrize(("where", "fraction"), [
    ("pwrite", 0.0),  # the very first write
    ("pwrite", 0.1),  # while the maps are copied: the writer stops after the block
    ("pwrite", 0.5),  # while HDF5 flushes its chunk cache, closing the file
    ("pwrite", 0.97),  # among the last writes: HDF5's metadata, while the file is closed
    ("ftruncate", 1.0),  # HDF5 sizing the file while closing it
    ("fsync", 1.0),  # the file system reports the full disk only when the file is flushed
])
def test_a_disk_filled_during_finalize_is_a_clean_error_and_the_rerun_is_correct(
        tmp_path: Path, reference: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
        where: str, fraction: float) -> None:
    out = tmp_path / "p.h5"
    run_job(out, finalize=False)
    committed = _listing(tmp_path)
    assert any(name.endswith(".h5") for name in committed)
    capfd.readouterr()
    with monkeypatch.context() as patch:
        state = _fill_disk_at(patch, where, int(fraction * reference.stat().st_size))
        with CacheWriter(out, provenance(episodes=10)) as writer, pytest.raises(CacheWriteError) as info:
            writer.finalize()
    assert state["failed"] >= 1
    err = info.value
    assert isinstance(err, CacheError) and err.errno == errno.ENOSPC and err.path == out
    message = str(err)
    assert "\n" not in message
    assert f"could not write cache file {out}: no space left on the device holding {tmp_path}" in message
    assert f"stay in {parts_dir(out)}" in message and "rerunning the same command" in message and "--out" in message
    # No half-written file anywhere (not at OUT, not as OUT.tmp); every committed segment kept.
    assert not out.exists() and _listing(tmp_path) == committed
    # HDF5 never saw the failure: it printed nothing (no HDF5-DIAG error stacks, no traceback).
    printed = capfd.readouterr()
    assert printed.err == "" and printed.out == ""
    run_job(out)  # space freed: the same command finishes the cache
    assert_same_datasets(out, reference)
    assert not parts_dir(out).exists()


def test_merge_onto_a_full_disk_is_a_clean_error(shards: list[Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "m.h5"
    with monkeypatch.context() as patch:
        _fill_disk_at(patch, "pwrite", 2000)
        with pytest.raises(CacheWriteError, match=f"could not write cache file {out}: no space left"):
            merge_caches(shards, out)
    assert not out.exists() and not out.with_name("m.h5.tmp").exists()
    assert PriorCache(merge_caches(shards, out)).vtp_keys()


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_real_failed_write_while_finalizing_ends_cleanly(tmp_path: Path, reference: Path) -> None:
    """No monkeypatch: the kernel refuses the writes (a file-size limit, EFBIG), as a full disk (ENOSPC) would.

    Before clipprior kept failed writes from HDF5, this process printed HDF5 error stacks and
    crashed at exit (SIGSEGV), whatever Python did with the error.
    """
    out = tmp_path / "p.h5"
    run_job(out, finalize=False)
    committed = _listing(tmp_path)
    limit = reference.stat().st_size // 2  # segments are committed already: only the final file is written
    done = subprocess.run([sys.executable, str(JOB), str(out), "--file-size-limit", str(limit)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, (done.returncode, done.stderr)  # not -11 (SIGSEGV) nor -7 (SIGBUS)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr  # one line: no HDF5-DIAG stacks, no traceback
    assert f"error: could not write cache file {out}: the file grew past the largest file allowed" in lines[0]
    assert f"stay in {parts_dir(out)}" in lines[0]
    assert not out.exists() and _listing(tmp_path) == committed
    run_job(out)
    assert_same_datasets(out, reference)


def test_a_finalize_in_another_thread_leaves_hdf5_quiet_everywhere(tmp_path: Path,
                                                                   capfd: pytest.CaptureFixture[str]) -> None:
    """HDF5 prints no error stacks for errors clipprior turns into clean ones, in any thread, before or after."""
    out = tmp_path / "p.h5"
    run_job(out, finalize=False)

    errors: list[BaseException] = []

    def finalize_and_fail() -> None:
        with CacheWriter(out, provenance(episodes=10)) as writer:
            writer.finalize()
        try:
            h5py.File(tmp_path / "missing" / "x.h5", "r")  # an HDF5 error in this thread
        except OSError as err:
            errors.append(err)

    thread = threading.Thread(target=finalize_and_fail)
    capfd.readouterr()
    thread.start()
    thread.join()
    assert len(errors) == 1
    with pytest.raises(OSError):
        h5py.File(tmp_path / "missing" / "x.h5", "r")  # and in the main thread, afterwards
    assert "HDF5-DIAG" not in capfd.readouterr().err and PriorCache(out).vtp_keys()
