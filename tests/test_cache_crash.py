"""Real writer processes killed with SIGKILL, rerun, and compared with an uninterrupted run; torchrun shards."""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from clipprior.cache import PriorCache, check_cache, merge_caches, parts_dir, shard_path
from clipprior.errors import CacheError
from tests._cache_job import assert_same_datasets, run_job

JOB = Path(__file__).with_name("_cache_job.py")
SIZE = ["--images", "16", "--episodes", "12"]

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_job(tmp_path_factory.mktemp("ref") / "ref.h5", n_images=16, n_episodes=12)  # type: ignore[return-value]


def _start(out: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, str(JOB), str(out), *SIZE, *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(condition: Callable[[], bool], proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"job ended early (rc {proc.returncode}): {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("job did not reach the expected state in time")
        time.sleep(0.02)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    assert proc.poll() is None, "the job finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL


def _finish(out: Path, *args: str) -> None:
    done = subprocess.run([sys.executable, str(JOB), str(out), *SIZE, *args], capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]


def _segments(out: Path) -> list[Path]:
    return sorted(parts_dir(out).glob("seg-*.h5"))


def _assert_interrupted_state_is_clean(out: Path) -> None:
    """After a kill: no final file, nothing half-written that a reader would take for data."""
    assert not out.exists()
    with pytest.raises(CacheError, match="not finished"):
        PriorCache(out)
    for segment in _segments(out):  # every committed segment is a complete cache-layout file
        assert check_cache(segment).vtp >= 0


def test_sigkill_while_computing_then_resume_equals_uninterrupted(tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "p.h5"
    proc = _start(out, "--delay", "0.05", "--commit-every", "2")
    _wait_for(lambda: len(_segments(out)) >= 3, proc)
    _kill(proc)
    _assert_interrupted_state_is_clean(out)
    committed = len(_segments(out))
    _finish(out)
    assert not parts_dir(out).exists()
    assert committed >= 3
    assert_same_datasets(out, reference)


def test_sigkill_while_finalizing_then_resume_equals_uninterrupted(tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "p.h5"
    tmp = out.with_name(out.name + ".tmp")
    proc = _start(out, "--finalize-delay", "0.1")
    _wait_for(lambda: tmp.exists() and tmp.stat().st_size > 0, proc)
    time.sleep(0.5)  # well inside the consolidation (one row per 0.1 s)
    _kill(proc)
    assert tmp.exists()  # the half-written final file is there, under its temporary name only
    _assert_interrupted_state_is_clean(out)
    _finish(out)
    assert not tmp.exists() and not parts_dir(out).exists()
    assert_same_datasets(out, reference)


def test_repeated_sigkill_at_random_moments(tmp_path: Path, reference: Path) -> None:
    """Forked writers (no re-import, so the kills land anywhere: manifest, segments, finalize)."""
    out = tmp_path / "p.h5"
    rng = random.Random(4)
    context = multiprocessing.get_context("fork")
    kills = 0
    for _ in range(8):
        proc = context.Process(target=run_job, args=(out,),
                               kwargs={"n_images": 16, "n_episodes": 12, "delay": 0.005, "commit_every": 2})
        proc.start()
        time.sleep(rng.uniform(0.0, 0.4))
        if not proc.is_alive():
            proc.join()
            assert proc.exitcode == 0
            break
        os.kill(proc.pid, signal.SIGKILL)  # type: ignore[arg-type]
        proc.join()
        kills += 1
        if not out.exists():
            _assert_interrupted_state_is_clean(out)
    run_job(out, n_images=16, n_episodes=12)
    assert kills >= 4
    assert not parts_dir(out).exists()
    assert_same_datasets(out, reference)


def test_torchrun_one_shard_per_rank_then_merge(tmp_path: Path, reference: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this interpreter")
    out = tmp_path / "p.h5"
    done = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", str(JOB), str(out), *SIZE,
                           "--shard", "env"], capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    shards = [shard_path(out, i, 2) for i in range(2)]
    assert all(s.exists() for s in shards) and not out.exists()
    merge_caches(shards, out)
    assert_same_datasets(out, reference)
