"""CacheWriter, PriorCache, merge_caches and the resize helpers (in-process; see test_cache_crash for SIGKILL)."""

from __future__ import annotations

import dataclasses
import doctest
import errno
import json
import pickle
import re
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import clipprior
from clipprior import cache as cache_module
from clipprior.cache import (
    PRIORS,
    VTP_REFINED,
    VVP_MAPS,
    CacheWriter,
    PriorCache,
    _h5,
    check_cache,
    letterbox_prior,
    merge_caches,
    parts_dir,
    provenance_diff,
    resize_prior,
    shard_from_environment,
    shard_path,
)
from clipprior.cache import _format as fmt
from clipprior.cache import _read as _cache_read
from clipprior.cache import _report as _cache_report
from clipprior.cache import _union as _cache_union
from clipprior.cache import _write as _cache_write
from clipprior.config import PriorConfig
from clipprior.data import Episode
from clipprior.errors import CacheError, CacheKeyError, CacheMismatchError, InvalidInputError
from tests._cache_job import (
    assert_same_datasets,
    episodes,
    fake_vtp,
    fake_vvp,
    grid,
    image_key,
    image_size,
    provenance,
    run_job,
)

# ------------------------------------------------------------------------------------------ writer


@pytest.fixture
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted single run, committed once at the end."""
    return run_job(tmp_path_factory.mktemp("ref") / "ref.h5", commit_every=10**9)  # type: ignore[return-value]


def test_roundtrip_values_grids_sizes_and_episodes(reference: Path) -> None:
    cache = PriorCache(reference)
    eps = episodes(12, 10)
    assert cache.episodes == eps and len(cache) == 10 and list(cache) == eps and cache.shot == 1
    assert cache.images == sorted(image_key(i) for i in range(12))
    for i in (0, 5, 7):
        cam, refined = fake_vtp(i, 1)
        assert cache.image_size(image_key(i)) == image_size(i)
        got = cache.vtp(image_key(i), 1)
        assert got.dtype == torch.float32 and tuple(got.shape) == grid(i)
        np.testing.assert_array_equal(got.numpy(), refined.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(cache.vtp(image_key(i), 1, refined=False).numpy(),
                                      cam.astype(np.float16).astype(np.float32))
    for episode in eps:
        vvp = cache.vvp(episode.index)
        np.testing.assert_array_equal(vvp.numpy(), fake_vvp(episode, 1).astype(np.float16).astype(np.float32))
        by_key = cache.vvp(query=episode.query, class_id=episode.class_id, supports=episode.supports)
        first = cache.find_episode(episode.query, episode.class_id, episode.supports)
        assert torch.equal(by_key, cache.vvp(first))
        assert cache.episode(episode.index) == episode
    assert cache.provenance == json.loads(json.dumps(provenance(episodes=10)))
    assert cache.attrs["kind"] == "cache"


def test_file_facts_and_manifest_keys_come_from_the_format(tmp_path: Path) -> None:
    """What ``inspect`` prints about a file is read through PriorCache; the manifest uses the format's names."""
    whole = PriorCache(run_job(tmp_path / "p.h5"))
    assert whole.file_kind == fmt.FILE_CACHE and whole.shard is None
    assert list(whole.run) == list(fmt.RUN_ATTRS) and whole.run[fmt.ATTR_RUN_ID] == whole.attrs[fmt.ATTR_RUN_ID]
    shard = PriorCache(run_job(tmp_path / "q.h5", shard=(1, 2)))
    assert shard.file_kind == fmt.FILE_SHARD and shard.shard == (1, 2)
    run_job(tmp_path / "r.h5", shard=(0, 2), finalize=False)
    target = shard_path(tmp_path / "r.h5", 0, 2)
    manifest = json.loads((fmt.parts_dir(target) / fmt.MANIFEST_NAME).read_text())
    assert set(manifest) == {fmt.ATTR_FORMAT, fmt.ATTR_VERSION, fmt.ATTR_RUN_ID, fmt.ATTR_CREATED,
                             fmt.ATTR_PROVENANCE, fmt.MANIFEST_SHARD}
    assert manifest[fmt.MANIFEST_SHARD] == [0, 2] and manifest[fmt.ATTR_FORMAT] == fmt.FORMAT_NAME
    assert fmt.temp_path(target).name == target.name + ".tmp"


def test_priors_by_kind_and_check_counts_per_table(reference: Path) -> None:
    """PriorCache.prior reads each declared prior kind; check_cache counts entries per declared table."""
    cache = PriorCache(reference)
    episode = cache.episode(3)
    for kind in PRIORS:
        got = cache.prior(kind, episode, size=(9, 7))
        want = (cache.vvp(episode.index, size=(9, 7)) if kind is VVP_MAPS else
                cache.vtp(episode.query, episode.class_id, refined=kind is VTP_REFINED, size=(9, 7)))
        assert torch.equal(got, want), kind.name
    with pytest.raises(InvalidInputError, match="not a prior"):
        cache.prior(fmt.SFEAT_MASK, episode)
    report = check_cache(cache)
    assert list(report.entries) == list(fmt.TABLES)
    assert (report.vtp, report.vvp) == (len(cache.vtp_keys()), len(cache)) == (report.entries["vtp"],
                                                                              report.entries["vvp"])
    assert report.describe_entries() == f"{report.vtp:,} VTP and {report.vvp:,} VVP entries"


def test_coverage_gaps_have_one_wording_each() -> None:
    episode = Episode("a.jpg", "a.png", 3, (("b.jpg", "b.png"),), index=7)
    words = {what: (_cache_union.Gap(7, what, episode).entry, _cache_union.Gap(7, what, episode).problem)
             for what in ("image", "vtp", "vvp")}
    assert words == {
        "image": ("image size of 'a.jpg'", "episode 7: no image size for query 'a.jpg'"),
        "vtp": ("VTP ('a.jpg', class 3)", "episode 7: VTP ('a.jpg', class 3) is missing"),
        "vvp": ("VVP of episode 7", "episode 7: VVP is missing"),
    }


def test_sizes_original_and_requested(reference: Path) -> None:
    cache = PriorCache(reference)
    key = image_key(4)
    raw = cache.vtp(key, 1)
    original = cache.vtp(key, 1, size="original")
    assert tuple(original.shape) == image_size(4)
    torch.testing.assert_close(original, F.interpolate(raw[None, None], image_size(4), mode="bilinear",
                                                       align_corners=False)[0, 0])
    assert tuple(cache.vtp(key, 1, size=(60, 60)).shape) == (60, 60)
    assert tuple(cache.vvp(4, size=(473, 473)).shape) == (2, 473, 473)
    assert tuple(cache.vvp(4, size="original").shape) == (2, *image_size(4))
    with pytest.raises(InvalidInputError):
        cache.vtp(key, 1, size="stretched")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        cache.vtp(key, 1, size=(0, 5))


def test_plain_h5py_reading_as_documented(reference: Path) -> None:
    """The recipe of docs/cache-format.md works without clipprior."""
    with h5py.File(reference, "r") as f:
        keys = f["images/key"].asstr()[:]
        image = list(keys).index(image_key(3))
        rows = np.flatnonzero((f["vtp/image"][:] == image) & (f["vtp/class_id"][:] == 1))
        (row,) = rows
        h, w = f["vtp/grid"][row]
        refined = f["vtp/refined"][row, :h, :w]
        assert f["vtp/refined"].dtype == np.float16 and f["vtp/refined"].compression == "gzip"
        assert f["vtp/refined"].chunks == (1, *f["vtp/refined"].shape[1:])
        assert json.loads(f.attrs["provenance"])["dataset"] == "pascal5i"
        assert f.attrs["dataset"] == "pascal5i" and f.attrs["fold"] == 0
    np.testing.assert_array_equal(refined, fake_vtp(3, 1)[1].astype(np.float16))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order_seed=st.integers(0, 2**16), commit_every=st.integers(1, 7), max_buffer=st.sampled_from([1, 2048, 1 << 30]))
def test_final_file_independent_of_order_and_commits(tmp_path_factory: pytest.TempPathFactory, reference: Path,
                                                     order_seed: int, commit_every: int, max_buffer: int) -> None:
    out = tmp_path_factory.mktemp("order") / "p.h5"
    run_job(out, order_seed=order_seed, commit_every=commit_every, max_buffer_bytes=max_buffer)
    assert_same_datasets(out, reference)
    assert not parts_dir(out).exists()


def test_consolidation_through_a_small_lru_of_open_segments(tmp_path: Path, reference: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_h5, "MAX_OPEN_SOURCES", 2)
    monkeypatch.setattr(_h5, "BLOCK_BYTES", 4096)
    out = tmp_path / "p.h5"
    run_job(out, order_seed=7, commit_every=1, finalize=False)
    assert len(list(parts_dir(out).glob("seg-*.h5"))) > 20  # far more than the 2 files kept open
    run_job(out)
    assert_same_datasets(out, reference)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=50, deadline=None)
@given(a=st.dictionaries(st.text(min_size=1, max_size=4), _json, max_size=4),
       b=st.dictionaries(st.text(min_size=1, max_size=4), _json, max_size=4))
def test_provenance_diff_laws(a: dict, b: dict) -> None:
    assert provenance_diff(a, a) == {}
    forward, backward = provenance_diff(a, b), provenance_diff(b, a)
    assert {k: (y, x) for k, (x, y) in forward.items()} == backward
    assert (forward == {}) == (a == b)


def test_resume_after_abandoned_run_equals_reference(tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "p.h5"
    eps = episodes(12, 10)
    prov = provenance(episodes=10)
    with CacheWriter(out, prov) as writer:
        writer.set_episodes(eps)
        for i in range(5):
            writer.add_image(image_key(i), *image_size(i))
            writer.add_vtp(image_key(i), 1, *fake_vtp(i, 1))
        writer.commit()
        writer.add_image(image_key(5), *image_size(5))
        writer.add_vtp(image_key(5), 1, *fake_vtp(5, 1))
        writer.close()  # like a crash: the last entry was never committed
    assert not out.exists()
    with CacheWriter(out, prov) as writer:
        assert all(writer.has_vtp(image_key(i), 1) for i in range(5))
        assert not writer.has_vtp(image_key(5), 1) and not writer.has_image(image_key(5))
    run_job(out)  # same settings: continues
    assert_same_datasets(out, reference)


def test_stale_tmp_files_are_removed_and_ignored(tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "p.h5"
    run_job(out, finalize=False)
    parts = parts_dir(out)
    (parts / "seg-999999.h5.tmp").write_bytes(b"half a segment")
    out.with_name(out.name + ".tmp").write_bytes(b"half a final file")
    run_job(out)
    assert_same_datasets(out, reference)
    assert not parts.exists() and not out.with_name(out.name + ".tmp").exists()


def test_killed_between_final_rename_and_cleanup(tmp_path: Path, reference: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "p.h5"
    monkeypatch.setattr(CacheWriter, "_remove_parts", lambda self, segments: None)
    run_job(out)
    assert parts_dir(out).exists() and out.exists()
    monkeypatch.undo()
    before = out.stat().st_mtime_ns
    run_job(out)  # recognises the parts as consolidated already
    assert not parts_dir(out).exists()
    assert out.stat().st_mtime_ns == before
    assert_same_datasets(out, reference)


def test_run_that_committed_nothing_leaves_nothing_and_blocks_nothing(tmp_path: Path) -> None:
    out = tmp_path / "p.h5"
    with CacheWriter(out, provenance(fold=0)):
        pass  # e.g. the model failed to load after the writer was opened
    assert _listing(tmp_path) == []
    killed = CacheWriter(out, provenance(fold=0))
    killed._release()  # as if SIGKILLed: the manifest stays, the lock goes with the process
    assert (parts_dir(out) / "manifest.json").exists()
    with CacheWriter(out, provenance(fold=1)) as writer:  # no committed work: the new settings win
        writer.set_episodes(episodes(4, 2))
    with pytest.raises(CacheMismatchError, match="fold: cached=1 requested=0"):
        CacheWriter(out, provenance(fold=0))  # now there is work to protect


def test_append_to_finished_cache_with_same_settings(tmp_path: Path) -> None:
    out = tmp_path / "p.h5"
    run_job(out, n_images=6, n_episodes=4)
    full = tmp_path / "full.h5"
    run_job(full, n_images=6, n_episodes=4)
    with CacheWriter(out, provenance(episodes=4)) as writer:
        assert writer.has_vtp(image_key(2), 1) and writer.has_vvp(3)
        writer.add_vtp(image_key(2), 3, *fake_vtp(2, 3))
        writer.finalize()
    with CacheWriter(full, provenance(episodes=4)) as writer:
        writer.add_vtp(image_key(2), 3, *fake_vtp(2, 3))
        writer.finalize()
    assert PriorCache(out).has_vtp(image_key(2), 3)
    assert_same_datasets(out, full)


def test_rerun_of_finished_cache_leaves_it_untouched(tmp_path: Path) -> None:
    out = tmp_path / "p.h5"
    run_job(out)
    before = out.stat().st_mtime_ns
    run_job(out)
    assert out.stat().st_mtime_ns == before and not parts_dir(out).exists()


@pytest.mark.parametrize(("change", "expected"), [
    ({"fold": 1}, "fold: cached=0 requested=1"),
    ({"dataset": "coco20i"}, "dataset: cached='pascal5i' requested='coco20i'"),
    ({"config": '{"pir_layers": 4, "vvp_layers": [-1, -2]}'}, "config.pir_layers: cached=8 requested=4"),
    ({"extra": True}, "extra: cached='<missing>' requested=True"),
])
@pytest.mark.parametrize("finished", [True, False])
def test_different_settings_are_refused_with_the_differences(tmp_path: Path, change: dict, expected: str,
                                                             finished: bool) -> None:
    out = tmp_path / "p.h5"
    run_job(out, finalize=finished)
    listing = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(CacheMismatchError) as info:
        CacheWriter(out, provenance(episodes=10, **change))
    assert expected in str(info.value)
    assert isinstance(info.value, ValueError)
    assert sorted(p.name for p in tmp_path.rglob("*")) == listing  # nothing created or removed


def test_mismatch_lists_every_difference() -> None:
    diff = provenance_diff(provenance(), provenance(fold=2, split="train", config=PriorConfig().to_json()))
    assert set(diff) >= {"fold", "split"} and any(k.startswith("config.") for k in diff)


def test_existing_foreign_file_is_not_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "p.h5"
    out.write_text("my thesis")
    with pytest.raises(CacheError, match="not a readable HDF5"):
        CacheWriter(out, provenance())
    assert out.read_text() == "my thesis"
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(CacheError, match="not a clipprior prior cache"):
        CacheWriter(tmp_path / "other.h5", provenance())


_EXTRA = (3, image_key(1), "l.png", 1, [image_key(2)], ["s.png"])


@pytest.mark.parametrize(("call", "error", "match"), [
    (lambda w: w.add_vtp("nope.jpg", 1, np.zeros((2, 2)), np.zeros((2, 2))), InvalidInputError, "add_image"),
    (lambda w: w.add_vtp(image_key(0), 1, np.zeros((2, 2)), np.zeros((2, 2))), InvalidInputError, "cached already"),
    (lambda w: w.add_vtp(image_key(0), 3, np.zeros((2, 2)), np.zeros((2, 3))), InvalidInputError, "differ in shape"),
    (lambda w: w.add_vtp(image_key(0), 3, np.full((2, 2), np.nan), np.zeros((2, 2))), InvalidInputError, "NaN"),
    (lambda w: w.add_vtp(image_key(0), 3, np.full((2, 2), 1e6), np.zeros((2, 2))), InvalidInputError, "float16"),
    (lambda w: w.add_vtp(image_key(0), 3, np.zeros((2,)), np.zeros((2,))), InvalidInputError, "2 non-empty dims"),
    (lambda w: w.add_vtp(image_key(0), 3, np.zeros((0, 2)), np.zeros((0, 2))), InvalidInputError, "non-empty"),
    (lambda w: w.add_vtp(image_key(0), True, np.zeros((2, 2)), np.zeros((2, 2))), InvalidInputError, "integer"),
    (lambda w: w.add_vtp(image_key(0), 3, "abc", np.zeros((2, 2))), InvalidInputError, "numeric"),
    (lambda w: w.add_vvp(99, np.zeros((2, 2, 2))), InvalidInputError, "not in the episode table"),
    (lambda w: w.add_vvp(0, np.zeros((2, 2, 2))), InvalidInputError, "cached already"),
    (lambda w: (w.set_episodes([_EXTRA]), w.add_vvp(3, np.zeros((3, 2, 2)))), InvalidInputError, "3 channels"),
    (lambda w: w.add_image(image_key(0), 1, 1), InvalidInputError, "was recorded with size"),
    (lambda w: w.add_image("", 1, 1), InvalidInputError, "non-empty string"),
    (lambda w: w.add_image("a.jpg", 0, 1), InvalidInputError, "height must be >= 1"),
    (lambda w: w.set_episodes([(0, "other.jpg", "o.png", 1, ["s.jpg"], ["s.png"])]), CacheMismatchError,
     "episode 0.query: cached='JPEGImages/img_0000.jpg' requested='other.jpg'"),
    (lambda w: w.set_episodes([(50, "q.jpg", "q.png", 1, ["a.jpg", "b.jpg"], ["a.png", "b.png"])]),
     CacheMismatchError, "same shot"),
    (lambda w: w.set_episodes([(51, "q.jpg", "q.png", 1, "s.jpg", "s.png")]), InvalidInputError, "sequences"),
    (lambda w: w.set_episodes([(52, "q.jpg", "q.png", 1, ["s.jpg"], [])]), InvalidInputError, "K >= 1"),
    (lambda w: w.set_episodes([{"index": -1}]), InvalidInputError, "episode index must be >= 0"),
    (lambda w: w.set_episodes([object()]), InvalidInputError, "cannot read an episode"),
])
def test_bad_entries_are_refused(tmp_path: Path, call, error: type, match: str) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "p.h5"
    run_job(out, n_images=4, n_episodes=3, finalize=False)
    with CacheWriter(out, provenance(episodes=3)) as writer:
        with pytest.raises(error, match=re.escape(match)):
            call(writer)
        writer.add_vtp(image_key(0), 3, *fake_vtp(0, 3))  # the writer is still usable
        assert writer.has_vtp(image_key(0), 3)


def test_torch_inputs_are_accepted(tmp_path: Path) -> None:
    with CacheWriter(tmp_path / "p.h5", provenance()) as writer:
        writer.add_image("a.jpg", 10, 10)
        writer.add_vtp("a.jpg", np.int64(2), torch.rand(3, 3, dtype=torch.float64), torch.rand(3, 3))
        writer.finalize(require_complete=False)
    assert PriorCache(tmp_path / "p.h5").has_vtp("a.jpg", 2)


def test_finalize_refuses_missing_entries_and_keeps_work(tmp_path: Path) -> None:
    out = tmp_path / "p.h5"
    with CacheWriter(out, provenance()) as writer:
        writer.set_episodes(episodes(4, 3))
        writer.add_image(image_key(0), *image_size(0))
        writer.add_vtp(image_key(0), 1, *fake_vtp(0, 1))
        with pytest.raises(CacheError, match=r"expected entries are missing \(VVP of episode 0"):
            writer.finalize()
    assert not out.exists()
    with CacheWriter(out, provenance()) as writer:
        assert writer.has_vtp(image_key(0), 1)


def test_second_writer_on_same_path_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "p.h5"
    with CacheWriter(out, provenance()), pytest.raises(CacheError, match="another process is writing"):
        CacheWriter(out, provenance())


def test_closed_writer_refuses_work(tmp_path: Path) -> None:
    writer = CacheWriter(tmp_path / "p.h5", provenance())
    writer.finalize()
    with pytest.raises(CacheError, match="closed"):
        writer.add_image("a.jpg", 1, 1)


def test_empty_cache_is_valid(tmp_path: Path) -> None:
    path = CacheWriter(tmp_path / "p.h5", provenance()).finalize()
    cache = PriorCache(path)
    assert len(cache) == 0 and cache.images == [] and cache.vtp_keys() == [] and check_cache(path).ok


@pytest.mark.parametrize("bad", [{"": 1}, {"format": 2}, {"x": object()}, {"x": float("nan")}])
def test_bad_provenance(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(InvalidInputError):
        CacheWriter(tmp_path / "p.h5", bad)


# ---------------------------------------------------------------------------------------- failures


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_full_disk_during_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: Path) -> None:
    """Segments are built in memory and written with plain I/O: a full disk is a clean error."""
    out = tmp_path / "p.h5"
    run_job(out, finalize=False)
    committed = _listing(tmp_path)
    original = _h5._write_bytes

    def full_disk(path: Path, data: bytes) -> None:
        original(path, data[: len(data) // 2])  # the segment is really half-written when the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    with CacheWriter(out, provenance(episodes=10)) as writer:
        writer.add_vtp(image_key(0), 3, *fake_vtp(0, 3))
        monkeypatch.setattr(_h5, "_write_bytes", full_disk)
        with pytest.raises(CacheError, match=r"could not write segment .*no space left on the device") as info:
            writer.commit()
        assert not isinstance(info.value, OSError)
        assert _listing(tmp_path) == committed  # no .tmp left, no new segment
        monkeypatch.undo()
        assert writer.commit() == 1  # space freed: the same writer carries on
    assert check_cache(run_job(out)).ok  # type: ignore[arg-type]


def test_not_enough_space_to_finalize(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: Path) -> None:
    out = tmp_path / "p.h5"
    run_job(out, finalize=False)
    committed = _listing(tmp_path)
    monkeypatch.setattr(_h5, "disk_free", lambda directory: 10_000)
    with CacheWriter(out, provenance(episodes=10)) as writer, pytest.raises(CacheError, match="MiB are needed"):
        writer.finalize()
    assert _listing(tmp_path) == committed
    monkeypatch.undo()
    run_job(out)
    assert_same_datasets(out, reference)


def test_write_error_while_finalizing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: Path) -> None:
    out = tmp_path / "p.h5"
    run_job(out, finalize=False)
    committed = _listing(tmp_path)
    original = _h5._copy_maps

    def failing(group, names, *args, **kwargs):  # type: ignore[no-untyped-def]
        if group.name == "/vvp":  # the VTP maps are in the temporary file already
            raise OSError(errno.EIO, "Input/output error")
        return original(group, names, *args, **kwargs)

    monkeypatch.setattr(_h5, "_copy_maps", failing)
    with CacheWriter(out, provenance(episodes=10)) as writer, pytest.raises(CacheError, match="Input/output error"):
        writer.finalize()
    assert not out.exists() and _listing(tmp_path) == committed
    monkeypatch.undo()
    run_job(out)
    assert_same_datasets(out, reference)


def test_unwritable_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CacheError, match="cannot write the cache"):
        CacheWriter(blocker / "p.h5", provenance())

    def denied(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(CacheError, match="permission denied writing in"):
        CacheWriter(tmp_path / "ro" / "p.h5", provenance())
    monkeypatch.undo()
    assert _listing(tmp_path) == ["file"]
    with pytest.raises(CacheError, match="is a directory"):
        CacheWriter(tmp_path, provenance())


def test_commit_memory_stays_flat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writing streams: buffered bytes are capped and consolidation copies block by block."""
    monkeypatch.setattr(_h5, "BLOCK_BYTES", 64 << 10)
    cam = np.random.default_rng(0).random((40, 40), dtype=np.float32)
    entry = 2 * cam.astype(np.float16).nbytes

    def peak(n: int) -> int:
        out = tmp_path / f"p{n}.h5"
        with CacheWriter(out, provenance(), max_buffer_bytes=64 * entry) as writer:
            tracemalloc.start()
            for i in range(n):
                writer.add_image(f"{i}.jpg", 640, 640)
                writer.add_vtp(f"{i}.jpg", 1, cam, cam)
                assert writer._buf_bytes < 64 * entry
            writer.finalize()
            _, top = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        return top

    small, large = peak(200), peak(1600)
    assert large < small * 2 + (1 << 20), (small, large)  # 8x the entries, not 8x the memory


# ------------------------------------------------------------------------------------------ reader


def test_missing_keys_raise_cache_key_error_with_a_hint(reference: Path) -> None:
    cache = PriorCache(reference)
    with pytest.raises(CacheKeyError) as info:
        cache.vtp("img_0003.jpg", 1)
    message = str(info.value)
    assert "clipprior inspect" in message and "JPEGImages/img_0003.jpg" in message  # suggests the real key
    assert isinstance(info.value, KeyError)
    with pytest.raises(CacheKeyError, match=r"class 3 .*classes \[1\]"):
        cache.vtp(image_key(0), 3)
    with pytest.raises(CacheKeyError, match="episode 77"):
        cache.vvp(77)
    with pytest.raises(CacheKeyError, match="episode 77"):
        cache.episode(77)
    with pytest.raises(CacheKeyError, match="shot order"):
        cache.vvp(query=image_key(0), class_id=1, supports=["x.jpg"])
    with pytest.raises(InvalidInputError):
        cache.vvp(query=image_key(0))
    with pytest.raises(CacheKeyError):
        cache.image_size("nope")


def test_reader_errors_for_missing_unfinished_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="no prior cache"):
        PriorCache(tmp_path / "none.h5")
    run_job(tmp_path / "p.h5", finalize=False)
    with pytest.raises(CacheError, match="not finished"):
        PriorCache(tmp_path / "p.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(CacheError, match="not a readable HDF5"):
        PriorCache(tmp_path / "text.h5").images  # noqa: B018


def test_reader_pickles_as_its_path_and_reopens(reference: Path) -> None:
    cache = PriorCache(reference)
    expected = cache.vtp(image_key(1), 1)
    clone = pickle.loads(pickle.dumps(cache))
    assert clone._handle is None and clone._idx is None
    assert torch.equal(clone.vtp(image_key(1), 1), expected)
    assert len(pickle.dumps(cache)) < 500
    cache.close()
    assert torch.equal(cache.vtp(image_key(1), 1), expected)  # reopens


def test_reader_config(reference: Path, tmp_path: Path) -> None:
    with CacheWriter(tmp_path / "c.h5", {"config": PriorConfig(pir_layers=3).to_json()}) as writer:
        path = writer.finalize()
    assert PriorCache(path).config == PriorConfig(pir_layers=3)
    with pytest.raises(CacheError, match="no prior config"):
        PriorCache(CacheWriter(tmp_path / "n.h5", {"x": 1}).finalize()).config  # noqa: B018


def test_reader_opened_alongside_plain_h5py(reference: Path) -> None:
    cache = PriorCache(reference)
    cache.vtp(image_key(0), 1)
    with h5py.File(reference, "r") as f:  # HDF5 refuses mixed locking flags; we use the default
        assert f["vtp/cam"].shape[0] == len(cache.vtp_keys())


# ------------------------------------------------------------------------------------------- merge


@pytest.mark.parametrize("count", [2, 3])
def test_shards_merged_equal_a_single_run(tmp_path: Path, reference: Path, count: int) -> None:
    shards = [run_job(tmp_path / "p.h5", shard=(i, count)) for i in range(count)]
    assert [s.name for s in shards] == [f"p.shard-{i}-of-{count}.h5" for i in range(count)]  # type: ignore[union-attr]
    assert PriorCache(shards[0]).attrs["shard_count"] == count  # type: ignore[arg-type]
    merged = merge_caches(list(reversed(shards)), tmp_path / "merged.h5")  # type: ignore[arg-type]
    assert_same_datasets(merged, reference)
    assert PriorCache(merged).attrs["kind"] == "cache" and "shard_index" not in PriorCache(merged).attrs


def test_merge_refusals(tmp_path: Path) -> None:
    shards = [run_job(tmp_path / "p.h5", shard=(i, 3)) for i in range(3)]
    with pytest.raises(CacheError, match=r"missing shard\(s\) \[1\] of 3: expected .*p.shard-1-of-3.h5"):
        merge_caches([shards[0], shards[2]], tmp_path / "p.h5")  # type: ignore[list-item]
    with pytest.raises(CacheError, match="given twice"):
        merge_caches([shards[0], shards[0], shards[1]], tmp_path / "m.h5")  # type: ignore[list-item]
    single = run_job(tmp_path / "single.h5")
    with pytest.raises(CacheError, match="not a shard file"):
        merge_caches([single], tmp_path / "m.h5")  # type: ignore[list-item]
    other = run_job(tmp_path / "q.h5", shard=(1, 3), fold=3)
    with pytest.raises(CacheMismatchError, match="fold: cached=0 requested=3"):
        merge_caches([shards[0], other, shards[2]], tmp_path / "m.h5")  # type: ignore[list-item]
    with pytest.raises(CacheError, match="different shard counts"):
        merge_caches([shards[0], run_job(tmp_path / "r.h5", shard=(1, 2))], tmp_path / "m.h5")  # type: ignore[list-item]
    with pytest.raises(CacheError, match="no shard files"):
        merge_caches([], tmp_path / "m.h5")
    merge_caches(shards, tmp_path / "m.h5")  # type: ignore[arg-type]
    with pytest.raises(CacheError, match="exists"):
        merge_caches(shards, tmp_path / "m.h5")  # type: ignore[arg-type]
    merge_caches(shards, tmp_path / "m.h5", overwrite=True)  # type: ignore[arg-type]


def test_merge_refuses_incomplete_coverage(tmp_path: Path) -> None:
    eps = episodes(4, 4)
    for i in range(2):
        with CacheWriter(tmp_path / "p.h5", provenance(), shard=(i, 2)) as writer:
            writer.set_episodes(eps)
            writer.add_image(image_key(i), *image_size(i))
            writer.add_vtp(image_key(i), 1, *fake_vtp(i, 1))
            writer.finalize()
    with pytest.raises(CacheError, match="do not cover every episode"):
        merge_caches([shard_path(tmp_path / "p.h5", i, 2) for i in range(2)], tmp_path / "m.h5")
    assert not (tmp_path / "m.h5").exists()


def test_shard_paths_and_environment() -> None:
    assert shard_path("a/b.h5", 0, 1).as_posix() == "a/b.shard-0-of-1.h5"
    assert shard_path("b", 1, 2).name == "b.shard-1-of-2.h5"
    with pytest.raises(InvalidInputError):
        shard_path("b.h5", 2, 2)
    assert shard_from_environment({}) is None
    assert shard_from_environment({"WORLD_SIZE": "1", "RANK": "0"}) is None
    assert shard_from_environment({"WORLD_SIZE": "8", "RANK": "3", "LOCAL_RANK": "3"}) == (3, 8)
    with pytest.raises(InvalidInputError):
        shard_from_environment({"WORLD_SIZE": "x"})


# ------------------------------------------------------------------------------------------ resize


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 12), w=st.integers(1, 12), c=st.integers(1, 3))
def test_resize_to_own_size_is_identity(h: int, w: int, c: int) -> None:
    x = torch.rand(c, h, w)
    assert torch.equal(resize_prior(x, (h, w)), x)
    assert torch.equal(resize_prior(x[0], (h, w)), x[0])


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 8), w=st.integers(1, 8), ch=st.integers(1, 20), cw=st.integers(1, 20),
       pad_h=st.integers(0, 6), pad_w=st.integers(0, 6), top=st.integers(0, 6), left=st.integers(0, 6))
def test_letterbox_is_resize_then_pad(h: int, w: int, ch: int, cw: int, pad_h: int, pad_w: int, top: int,
                                      left: int) -> None:
    top, left = min(top, pad_h), min(left, pad_w)
    x = torch.rand(2, h, w)
    out = letterbox_prior(x, (ch, cw), (ch + pad_h, cw + pad_w), offset=(top, left), fill=-1.0)
    assert tuple(out.shape) == (2, ch + pad_h, cw + pad_w)
    inner = out[:, top:top + ch, left:left + cw]
    assert torch.equal(inner, resize_prior(x, (ch, cw)))
    mask = torch.ones_like(out, dtype=torch.bool)
    mask[:, top:top + ch, left:left + cw] = False
    assert (out[mask] == -1.0).all()


def test_resize_matches_interpolate_and_validates() -> None:
    x = torch.rand(1, 3, 5, 7, dtype=torch.float16)
    got = resize_prior(x, (60, 60), align_corners=True)
    want = F.interpolate(x.float(), (60, 60), mode="bilinear", align_corners=True)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    with pytest.raises(InvalidInputError):
        resize_prior(torch.rand(5), (2, 2))
    with pytest.raises(InvalidInputError):
        letterbox_prior(torch.rand(3, 3), (10, 10), (8, 10))


# ------------------------------------------------------------------------------------------ public


def test_public_names_and_doctests() -> None:
    for name in ("CacheWriter", "PriorCache", "merge_caches", "resize_prior", "letterbox_prior"):
        assert getattr(clipprior, name) is getattr(cache_module, name)
    for module in (cache_module, _cache_write, _cache_read, _cache_union, _cache_report, _h5):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__
    # the row form set_episodes takes besides a numbered Episode: keys and labels in two columns
    assert fmt.EPISODE_FIELDS == ("index", "query", "query_label", "class_id", "supports", "support_labels")


def test_one_episode_type(tmp_path: Path) -> None:
    """The cache stores and returns clipprior.data.Episode, numbered; the old row type is a warned alias."""
    eps = episodes(12, 4, shot=2)
    path = run_job(tmp_path / "p.h5", n_episodes=4, shot=2)
    cache = PriorCache(path)
    assert all(type(e) is Episode for e in cache) and [e.index for e in cache] == [0, 1, 2, 3]
    assert cache.episodes == eps and cache.episode(2).supports == eps[2].supports
    e = cache.episode(1)
    # pairs stand where keys are taken: episode.query and episode.supports pass as they are
    assert cache.find_episode(e.query, e.class_id, e.supports) == 1
    assert cache.find_episode(e.query_image, e.class_id, e.support_images) == 1
    assert torch.equal(cache.vtp(e.query, e.class_id), cache.vtp(e.query_image, e.class_id))
    with pytest.raises(InvalidInputError, match="no index"):
        CacheWriter(tmp_path / "q.h5", {"dataset": "demo"}).set_episodes([dataclasses.replace(e, index=None)])
    with pytest.warns(DeprecationWarning, match="EpisodeRecord is deprecated"):
        row = cache_module.EpisodeRecord(1, e.query_image, e.query_label, e.class_id, e.support_images,
                                         e.support_labels)
    assert row == e and row.index == 1
