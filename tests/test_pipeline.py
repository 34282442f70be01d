"""The precompute pipeline: load workers, batch planning and halving, the writer thread, torchrun ranks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from clipprior.cache import CacheWriter
from clipprior.data import open_dataset, prompt_names, sample_episodes
from clipprior.errors import DatasetError, InvalidInputError
from clipprior.precompute import engine as engine_stage
from clipprior.precompute import episode_records, run_precompute
from clipprior.precompute import passes as passes_stage
from clipprior.precompute.load import Loader, LoadJob
from tests._cache_job import assert_same_arrays, h5_arrays

NAMES = prompt_names("pascal5i")


@pytest.fixture(scope="module")
def dataset(data_root):
    return open_dataset("pascal5i", data_root, 0, "val")


@pytest.fixture(scope="module")
def episodes(dataset):
    return sample_episodes(dataset, 16, shot=2, seed=3)


def _run(clip, dataset, episodes, out: Path, chunk_images: int = 3, **kwargs) -> object:
    with CacheWriter(out, {"test": "pipeline"}) as writer:
        writer.set_episodes(episode_records(episodes))
        stats = run_precompute(clip, dataset, episodes, writer, class_names=NAMES, chunk_images=chunk_images,
                               **kwargs)
        writer.finalize()
    return stats


def _pipeline_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("clipprior-load", "clipprior-write"))]


class _Flaky:
    """A dataset that fails (raises ``error``) when asked for ``path`` as an image, optionally after ``after`` loads."""

    def __init__(self, dataset, path: str | None, error: BaseException, after: int = 0, delay: float = 0.0) -> None:
        self.dataset, self.path, self.error, self.after, self.delay = dataset, path, error, after, delay
        self.loads = 0
        self.image_size = dataset.image_size
        self.load_label = dataset.load_label

    def load_image(self, path: str) -> np.ndarray:
        self.loads += 1
        if self.delay:
            time.sleep(self.delay)
        if (self.path is None or path == self.path) and self.loads > self.after:
            raise self.error
        return self.dataset.load_image(path)


# -- the loader ---------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_loader_keeps_order_and_bounds_prefetch(workers):
    started: list[int] = []
    lock = threading.Lock()

    def item(i: int):
        def run() -> int:
            with lock:
                started.append(i)
            time.sleep(0.002 * ((i * 7) % 5))
            return i
        return run

    jobs = (LoadJob([item(10 * b + k) for k in range(3)], [f"b{b}-{k}" for k in range(3)], list) for b in range(8))
    with Loader(workers, prefetch=2) as loader:
        got = []
        for batch in loader.stream(jobs):
            with lock:
                ahead = {s // 10 for s in started}
            assert max(ahead) <= len(got) + 2  # never more than `prefetch` batches ahead of the consumer
            got.append(batch)
    assert got == [[10 * b + k for k in range(3)] for b in range(8)]
    assert not _pipeline_threads()


def test_unexpected_worker_error_names_the_file_in_the_main_thread():
    def broken() -> int:
        raise OSError("truncated stream")

    jobs = [LoadJob([lambda: 1], ["a.jpg"], list), LoadJob([broken], ["JPEGImages/b.jpg"], list)]
    with Loader(2) as loader, pytest.raises(DatasetError, match=r"JPEGImages/b\.jpg.*truncated stream"):
        list(loader.stream(jobs))
    assert not _pipeline_threads()


# -- errors and interruptions in a run -------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_found_by_a_worker_gives_the_same_error(tmp_path, clip, dataset, episodes, workers):
    target = episodes[5].query_image
    flaky = _Flaky(dataset, target, DatasetError(f"cannot read image {target}: broken data"))
    with pytest.raises(DatasetError, match=r"cannot read image .*broken data") as info:
        _run(clip, flaky, episodes, tmp_path / "p.h5", workers=workers)
    assert target in str(info.value)
    assert not _pipeline_threads()


def test_interrupt_stops_the_workers_and_the_cache_resumes(tmp_path, clip, dataset, episodes):
    reference = tmp_path / "reference.h5"
    _run(clip, dataset, episodes, reference, workers=2)
    out = tmp_path / "p.h5"
    flaky = _Flaky(dataset, None, KeyboardInterrupt(), after=12)
    with pytest.raises(KeyboardInterrupt):
        _run(clip, flaky, episodes, out, workers=2)
    assert not _pipeline_threads()
    assert list((tmp_path / "p.h5.parts").glob("seg-*.h5")), "the chunks done before Ctrl-C are kept"
    stats = _run(clip, dataset, episodes, out, workers=2)
    assert stats.skipped_vvp > 0
    assert_same_arrays(reference, out)


def test_writer_thread_error_reaches_the_caller(tmp_path, clip, dataset, episodes):
    class FailingWriter(CacheWriter):
        def add_vvp(self, episode_index, vvp):
            raise OSError(28, "No space left on device")

    with FailingWriter(tmp_path / "p.h5", {"test": "pipeline"}) as writer:
        writer.set_episodes(episode_records(episodes))
        with pytest.raises(OSError, match="No space left"):
            run_precompute(clip, dataset, episodes, writer, class_names=NAMES, chunk_images=3, workers=1)
    assert not _pipeline_threads()


def test_workers_do_not_change_the_cache(tmp_path, clip, dataset, episodes):
    outs = []
    for workers in (0, 3):
        outs.append(tmp_path / f"w{workers}.h5")
        _run(clip, dataset, episodes, outs[-1], workers=workers, batch_size=4)
    assert_same_arrays(*outs)


def test_slow_loads_and_writes_overlap(tmp_path, clip, dataset, episodes):
    """Loads and writes slowed by sleeps: the run grows by much less than the sum of the sleeps."""
    delay = 0.1
    slow = _Flaky(dataset, "never", RuntimeError(), delay=delay)

    class SlowWriter(CacheWriter):
        def add_vtp(self, *args, **kwargs):
            time.sleep(delay)
            return super().add_vtp(*args, **kwargs)

    def timed(data, writer_type, out, workers):
        start = time.perf_counter()
        with writer_type(out, {"test": "pipeline"}) as writer:
            writer.set_episodes(episode_records(episodes))
            run_precompute(clip, data, episodes, writer, class_names=NAMES, chunk_images=3, workers=workers,
                           batch_size=4)
            writer.finalize()
        return time.perf_counter() - start

    timed(dataset, CacheWriter, tmp_path / "warm.h5", 2)
    plain = min(timed(dataset, CacheWriter, tmp_path / f"plain{r}.h5", 0) for r in range(2))
    slowed = timed(slow, SlowWriter, tmp_path / "slow.h5", 4)
    injected = slow.loads * delay + sum(len(q.classes) for q in _queries(episodes)) * delay
    assert slowed - plain < 0.75 * injected, (slowed, plain, injected)  # serial, it would grow by all of it
    assert_same_arrays(tmp_path / "plain0.h5", tmp_path / "slow.h5")


def _queries(episodes):
    from clipprior.precompute import plan_work

    return plan_work(episodes).queries


# -- batch sizes ------------------------------------------------------------------------------------


def test_out_of_memory_at_auto_halves_the_batch_and_loses_nothing(tmp_path, clip, dataset, episodes, monkeypatch):
    reference = tmp_path / "b2.h5"
    _run(clip, dataset, episodes, reference, batch_size=2, workers=1, chunk_images=8)
    real_pass, real_support = passes_stage.vtp_pass, passes_stage.support_features
    seen: list[int] = []

    def tight(fn):
        def run(clip, pixels, *args, **kwargs):
            seen.append(int(pixels.shape[0]))
            if pixels.shape[0] > 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
            return fn(clip, pixels, *args, **kwargs)
        return run

    monkeypatch.setattr(passes_stage, "vtp_pass", tight(real_pass))
    monkeypatch.setattr(passes_stage, "support_features", tight(real_support))
    monkeypatch.setattr(engine_stage, "auto_batch_size", lambda clip, size: 8)
    lines: list[str] = []
    out = tmp_path / "auto.h5"
    with CacheWriter(out, {"test": "pipeline"}) as writer:
        writer.set_episodes(episode_records(episodes))
        stats = run_precompute(clip, dataset, episodes, writer, class_names=NAMES, chunk_images=8, workers=1,
                               log=lines.append)
        writer.finalize()
    assert max(seen) > 2 and any("halved to" in line for line in lines)
    assert stats.vvp_written == len(episodes)
    assert_same_arrays(reference, out)  # the planned batches of 8, run in parts of 2, are the planned batches of 2

    with pytest.raises(InvalidInputError, match="--batch-size 4; use a smaller --batch-size or --batch-size auto"):
        _run(clip, dataset, episodes, tmp_path / "fixed.h5", batch_size=4, workers=0)


def test_auto_batch_size_follows_tokens_on_cpu(clip):
    small = passes_stage.auto_batch_size(clip, (96, 112))
    large = passes_stage.auto_batch_size(clip, (384, 512))
    assert small > large >= 1
    assert large == 1  # 768 tokens: batching is slower per image on a CPU (benchmarks/NOTES.md, D)


def test_batch_size_changes_numbers_only_by_reassociation(tmp_path, clip, dataset, episodes):
    outs = {}
    for size in (1, 3, "auto"):
        outs[size] = h5_arrays(_run_path(tmp_path, clip, dataset, episodes, size))
    for size in (3, "auto"):
        for key, values in outs[1].items():
            if values.dtype.kind == "f":
                np.testing.assert_allclose(outs[size][key], values, atol=2e-3, rtol=0, err_msg=key)  # float16 maps
            else:
                np.testing.assert_array_equal(outs[size][key], values, err_msg=key)


def _run_path(tmp_path, clip, dataset, episodes, size) -> Path:
    out = tmp_path / f"b{size}.h5"
    _run(clip, dataset, episodes, out, batch_size=size, workers=1)
    return out


# -- many devices: torchrun ----------------------------------------------------------------------------


def test_torchrun_two_cpu_ranks_merge_to_the_single_run(tmp_path, data_root, tiny_clip_dir):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        torchrun = Path(shutil.which("torchrun") or "torchrun")
    args = ["precompute", "--dataset", "pascal5i", "--fold", "0", "--data-root", str(data_root), "--model",
            str(tiny_clip_dir), "--device", "cpu", "--episodes", "10", "--seed", "5", "--workers", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single.h5"
    done = subprocess.run([sys.executable, "-m", "clipprior.cli.main", *args, "--out", str(single)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "ranks.h5"
    done = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", "0", "-m", "clipprior.cli.main",
                           *args, "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    shards = sorted(tmp_path.glob("ranks.shard-*-of-2.h5"))
    assert len(shards) == 2
    merged = tmp_path / "merged.h5"
    done = subprocess.run([sys.executable, "-m", "clipprior.cli.main", "merge", str(merged), *map(str, shards)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_same_arrays(single, merged)


# -- support windows ----------------------------------------------------------------------------------


class _NothingCached:
    def has_vtp(self, *key: object) -> bool:
        return False

    def has_vvp(self, index: int) -> bool:
        return False


def _mixed_sizes(dataset, episodes) -> dict[str, tuple[int, int]]:
    """Every image of the episodes at one of three sizes (as COCO's mix makes small per-chunk batches)."""
    images = sorted({e.query_image for e in episodes} | {s[0] for e in episodes for s in e.supports})
    return {image: [(32, 48), (48, 32), (48, 48)][i % 3] for i, image in enumerate(images)}


@pytest.mark.parametrize("window", [1, 2, 4, 100])
def test_support_window_runs_each_support_once_before_its_first_use(dataset, episodes, window):
    from clipprior.precompute import plan_work
    from clipprior.precompute.plan import plan_schedule

    plan = plan_work(episodes)
    sizes = _mixed_sizes(dataset, episodes)
    schedule = plan_schedule(episodes, plan, sizes, lambda size: 8, _NothingCached(), chunk_images=2,
                             chunk_episodes=256, support_window=window)
    first_run: dict[tuple, int] = {}
    for step in schedule.chunks:
        for batch, wanted in step.support_batches:
            assert len({sizes[k[0]] for k in batch}) == 1 and wanted <= set(batch)  # one size per batch
            for key in batch:
                assert key not in first_run, "a support runs once"
                first_run[key] = step.index
    for step in schedule.chunks:  # every support an episode of the chunk needs has run by then
        for i in step.todo:
            for image, label in episodes[i].supports:
                assert first_run[(image, label, int(episodes[i].class_id))] <= step.index
    assert set(first_run) == set(plan.support_uses)


def test_a_wider_support_window_fills_the_support_batches(dataset, episodes):
    from clipprior.precompute import plan_work
    from clipprior.precompute.plan import plan_schedule

    plan = plan_work(episodes)
    sizes = _mixed_sizes(dataset, episodes)
    counts = {}
    for window in (1, 4):
        schedule = plan_schedule(episodes, plan, sizes, lambda size: 8, _NothingCached(), chunk_images=2,
                                 chunk_episodes=256, support_window=window)
        counts[window] = sum(len(step.support_batches) for step in schedule.chunks)
    assert counts[4] < counts[1]
    with pytest.raises(InvalidInputError, match="support_window"):
        plan_schedule(episodes, plan, sizes, lambda size: 8, _NothingCached(), chunk_images=2, chunk_episodes=256,
                      support_window=0)


def test_support_window_changes_numbers_only_by_reassociation_and_resumes_exactly(tmp_path, clip, dataset,
                                                                                     episodes):
    one, four = tmp_path / "w1.h5", tmp_path / "w4.h5"
    _run(clip, dataset, episodes, one, chunk_images=2, batch_size=4, workers=1)
    _run(clip, dataset, episodes, four, chunk_images=2, batch_size=4, workers=1, support_window=4)
    a, b = h5_arrays(one), h5_arrays(four)
    assert sorted(a) == sorted(b)
    for key, values in a.items():
        if values.dtype.kind == "f":
            np.testing.assert_allclose(b[key], values, atol=2e-3, rtol=0, err_msg=key)  # float16 maps
        else:
            np.testing.assert_array_equal(b[key], values, err_msg=key)
    out = tmp_path / "resumed.h5"
    flaky = _Flaky(dataset, None, KeyboardInterrupt(), after=10)
    with pytest.raises(KeyboardInterrupt):
        _run(clip, flaky, episodes, out, chunk_images=2, batch_size=4, workers=1, support_window=4)
    _run(clip, dataset, episodes, out, chunk_images=2, batch_size=4, workers=1, support_window=4)
    assert_same_arrays(four, out)


def test_a_resume_with_another_support_window_is_refused(tmp_path, clip, dataset, episodes):
    from clipprior import PriorConfig
    from clipprior.precompute import build_provenance
    from clipprior.precompute.provenance import check_recorded_settings

    prov = build_provenance(clip, PriorConfig(), dataset="pascal5i", fold=0, split="val", shot=2, seed=3,
                            n_episodes=16, list_checksum="x", class_names=NAMES, batch_size=4, support_window=4)
    assert prov["support_window"] == 4

    class Recorded:
        provenance = prov

    check_recorded_settings(Recorded(), clip, batch_size=4, chunk_images=64, chunk_episodes=256, support_window=4)
    with pytest.raises(InvalidInputError, match="support_window: recorded=4 running=1"):
        check_recorded_settings(Recorded(), clip, batch_size=4, chunk_images=64, chunk_episodes=256, support_window=1)
    Recorded.provenance = {k: v for k, v in prov.items() if k != "support_window"}  # a cache from before windows
    check_recorded_settings(Recorded(), clip, batch_size=4, chunk_images=64, chunk_episodes=256, support_window=1)
    with pytest.raises(InvalidInputError, match="support_window: recorded=1 running=4"):
        check_recorded_settings(Recorded(), clip, batch_size=4, chunk_images=64, chunk_episodes=256, support_window=4)


def test_cli_records_the_support_window_and_refuses_a_resume_with_another(tmp_path, data_root, tiny_clip_dir):
    from click.testing import CliRunner

    from clipprior import PriorCache
    from clipprior.cli.main import app
    from tests.conftest import precompute_args

    out = tmp_path / "p.h5"
    result = CliRunner().invoke(app, precompute_args(data_root, tiny_clip_dir, out, "--support-window", "3",
                                                     "--chunk-images", "2"))
    assert result.exit_code == 0, result.output
    assert PriorCache(out).provenance["support_window"] == 3
    again = CliRunner().invoke(app, precompute_args(data_root, tiny_clip_dir, out, "--chunk-images", "2"))
    assert again.exit_code == 1 and "support_window" in again.output and "Traceback" not in again.output
