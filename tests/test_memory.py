"""Giving freed memory back between chunks (clipprior/_memory.py) and the engine's use of it."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import sys

import pytest

from clipprior import _memory
from clipprior._memory import release_freed_memory

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is a glibc function")
def test_trims_with_glibc():
    assert release_freed_memory() is True


def test_without_malloc_trim_it_does_nothing(monkeypatch):
    monkeypatch.setattr(_memory, "_malloc_trim", lambda: None)
    assert release_freed_memory() is False


def test_malloc_trim_lookup_matches_the_platform():
    trim = _memory._malloc_trim()
    if GLIBC:
        assert trim is not None
        assert trim(0) in (0, 1)  # 1 if memory was released
    elif not sys.platform.startswith("linux"):
        assert trim is None
    else:  # another Linux libc: present only if it exports malloc_trim
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        assert (trim is not None) == hasattr(libc, "malloc_trim")


def test_engine_releases_after_every_chunk(monkeypatch, tmp_path, tiny_clip_dir):
    from clipprior.cache import CacheWriter
    from clipprior.data import open_dataset, prompt_names, sample_episodes
    from clipprior.data.synthetic import write_synthetic_pascal
    from clipprior.model import load_clip
    from clipprior.precompute import engine, episode_records, plan_chunks, plan_work, run_precompute

    calls = []
    monkeypatch.setattr(engine, "release_freed_memory", lambda: calls.append(1) or True)
    root = write_synthetic_pascal(tmp_path / "voc", per_class=2, size=(72, 100))
    dataset = open_dataset("pascal5i", root, 0, "val")
    episodes = sample_episodes(dataset, 9, shot=1, seed=2)
    clip = load_clip(tiny_clip_dir, device="cpu")
    with CacheWriter(tmp_path / "p.h5", {"test": "memory"}) as writer:
        writer.set_episodes(episode_records(episodes))
        run_precompute(clip, dataset, episodes, writer, class_names=prompt_names("pascal5i"), batch_size=2,
                       chunk_images=2)
        writer.finalize()
    assert len(calls) == len(plan_chunks(plan_work(episodes).queries, 2, 256)) > 1
