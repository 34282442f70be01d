"""The reliability suite: the hostile cases of issue 13, run quickly on the tiny CLIP.

Each test is one promise of ``docs/reliability.md``; the cases other modules already test are
referenced there rather than repeated here.
"""

from __future__ import annotations

import errno
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from clipprior import PriorConfig
from clipprior.cache import CacheWriter, PriorCache, _h5, check_cache, parts_dir, provenance_diff
from clipprior.cli.main import app
from clipprior.data import EpisodeMeta, open_dataset, sample_episodes, write_episodes
from clipprior.data.lists import write_fss_lists
from clipprior.data.synthetic import write_synthetic_pascal
from clipprior.errors import CacheWriteError, DatasetError, InvalidInputError
from clipprior.evaluate import load_episode
from tests._cache_job import assert_same_arrays
from tests.conftest import precompute_args

# ---------------------------------------------------------------------------------------- helpers


def _args(data_root: Path, model: Path | str, out: Path, *extra: str) -> list[str]:
    """A precompute of 12 episodes cut into several chunks (one segment each)."""
    return precompute_args(data_root, model, out, "--chunk-images", "3", "--batch-size", "2", *extra)


def _with(args: list[str], option: str, value: str) -> list[str]:
    """``args`` with ``option`` set to ``value`` (replaced where present, else appended)."""
    if option in args:
        at = args.index(option) + 1
        return [*args[:at], value, *args[at + 1:]]
    return [*args, option, value]


def _invoke(args: list[str]) -> Result:
    return CliRunner().invoke(app, args)


def _flat(result: Result) -> str:
    """The command's output as one line (rich wraps long lines)."""
    return " ".join(result.output.split())


@contextmanager
def _stop_after_commits(monkeypatch: pytest.MonkeyPatch, count: int) -> Iterator[None]:
    """Interrupt a run (as Ctrl-C would) right after its ``count``-th commit that wrote entries."""
    original = CacheWriter.commit
    state = {"commits": 0, "stopped": False}

    def commit(self: CacheWriter) -> int:
        written = original(self)
        if written and not state["stopped"]:
            state["commits"] += 1
            if state["commits"] >= count:
                state["stopped"] = True
                raise KeyboardInterrupt
        return written

    with monkeypatch.context() as patch:
        patch.setattr(CacheWriter, "commit", commit)
        yield
    assert state["stopped"], "the run ended before it could be stopped; make it longer"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, data_root: Path, tiny_clip_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("reference") / "reference.h5"
    result = _invoke(_args(data_root, tiny_clip_dir, out))
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture()
def stopped(tmp_path: Path, data_root: Path, tiny_clip_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An fp32 run stopped after two committed chunks: ``OUT.parts`` holds its segments, ``OUT`` is absent."""
    out = tmp_path / "p.h5"
    with _stop_after_commits(monkeypatch, 3):  # the episode table, then two chunks
        result = _invoke(_args(data_root, tiny_clip_dir, out))
    assert result.exit_code != 0 and "Aborted" in result.output  # click reports a Ctrl-C so
    assert not out.exists() and len(list(parts_dir(out).glob("seg-*.h5"))) >= 2
    return out


# ------------------------------------------------------ a disk filled by another process while finalizing


def test_a_disk_filled_while_finalizing_ends_in_one_line_and_the_rerun_is_correct(
        tmp_path, data_root, tiny_clip_dir, uninterrupted, monkeypatch, capfd):
    out = tmp_path / "p.h5"
    args = _args(data_root, tiny_clip_dir, out)
    budget = uninterrupted.stat().st_size // 2
    state = {"written": 0}

    def pwrite(fd: int, data: memoryview, offset: int) -> int:  # the disk fills half-way through the file
        room = budget - state["written"]
        if room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        done = _h5.os.pwrite(fd, data[:room], offset)
        state["written"] += done
        return done

    capfd.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(_h5, "_pwrite", pwrite)
        result = _invoke(args)
        assert result.exit_code == 1, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and "Traceback" not in result.output, result.output
        assert result.output.rstrip().endswith(errors[0])  # the error is the last line: nothing after it
        text = _flat(result)
        assert f"could not write cache file {out}: no space left on the device holding {tmp_path}" in text
        assert "free some space" in text and "--out" in text and str(parts_dir(out)) in text
        assert "HDF5" not in capfd.readouterr().err  # HDF5 printed no error stacks (fd-level stderr)
        # The half-written file is gone; the segments of the computed work are kept.
        assert not out.exists() and not out.with_name("p.h5.tmp").exists()
        segments = sorted(parts_dir(out).glob("seg-*.h5"))
        assert len(segments) >= 2
        debug = _invoke([*args, "--debug"])  # the traceback, on request
        assert isinstance(debug.exception, CacheWriteError) and debug.exception.errno == errno.ENOSPC
        assert sorted(parts_dir(out).glob("seg-*.h5")) == segments
    result = _invoke(args)  # space freed: the same command finishes, computing nothing again
    assert result.exit_code == 0, result.output
    assert "0 VTP and 0 VVP written" in _flat(result)
    assert_same_arrays(uninterrupted, out)
    assert not parts_dir(out).exists()


# ------------------------------------------------------------- a cache never mixes computations


@pytest.mark.parametrize(("option", "value", "field", "cached"), [
    ("--dtype", "bf16", "dtype", "fp32"),
    ("--batch-size", "3", "batch_size", 2),
    ("--chunk-images", "4", "chunk_images", 3),
    ("--chunk-episodes", "5", "chunk_episodes", 256),
])
def test_resume_with_another_computation_is_refused(stopped, data_root, tiny_clip_dir, option, value, field, cached):
    segments = sorted(parts_dir(stopped).glob("seg-*.h5"))
    result = _invoke(_with(_args(data_root, tiny_clip_dir, stopped), option, value))
    assert result.exit_code == 1, result.output
    text = _flat(result)
    assert f"{field}: cached={cached!r} requested=" in text
    assert "rerun with the cached settings" in text and "Traceback" not in result.output
    # Nothing was written: the stopped run's work is intact and resumes.
    assert sorted(parts_dir(stopped).glob("seg-*.h5")) == segments and not stopped.exists()


def test_resume_with_the_same_weights_elsewhere_equals_uninterrupted(stopped, data_root, tiny_clip_dir,
                                                                     uninterrupted, tmp_path, monkeypatch):
    # The same weights under another spelling of the path, then a copy of them: one computation.
    monkeypatch.chdir(tiny_clip_dir.parent)
    result = _invoke(_args(data_root, f"./{tiny_clip_dir.name}/", stopped))
    assert result.exit_code == 0, result.output
    assert "episodes already cached" in _flat(result)
    assert_same_arrays(uninterrupted, stopped)
    copy = shutil.copytree(tiny_clip_dir, tmp_path / "copy-of-clip")
    result = _invoke(_args(data_root, copy, stopped))  # appending to the finished cache: nothing to add
    assert result.exit_code == 0, result.output
    assert "0 VTP and 0 VVP written" in _flat(result)


def test_provenance_records_the_computation(uninterrupted, tiny_clip_dir):
    prov = PriorCache(uninterrupted).provenance
    assert {k: prov[k] for k in ("dtype", "device", "batch_size", "chunk_images", "chunk_episodes")} == {
        "dtype": "fp32", "device": "cpu", "batch_size": 2, "chunk_images": 3, "chunk_episodes": 256}
    assert prov["model"] == str(tiny_clip_dir)
    # Where the weights and the data were found is recorded, not compared; the weights' checksum is.
    assert provenance_diff(prov, {**prov, "model": "elsewhere", "data_root": "/else"}) == {}
    assert list(provenance_diff(prov, {**prov, "weights_sha256": "0" * 64})) == ["weights_sha256"]


def test_engine_refuses_a_provenance_that_does_not_describe_the_run(tmp_path, data_root, tiny_clip_dir):
    from clipprior import load_clip
    from clipprior.data import open_dataset, prompt_names, sample_episodes
    from clipprior.errors import InvalidInputError
    from clipprior.precompute import build_provenance, episode_records, run_precompute

    clip = load_clip(tiny_clip_dir, device="cpu")
    dataset = open_dataset("pascal5i", data_root, 0, "val")
    episodes = sample_episodes(dataset, 2, shot=1, seed=0)
    names = prompt_names("pascal5i")
    prov = build_provenance(clip, PriorConfig(), dataset="pascal5i", fold=0, split="val", shot=1, seed=0,
                            n_episodes=2, list_checksum=dataset.list_checksum, class_names=names, batch_size=8)
    with CacheWriter(tmp_path / "p.h5", prov) as writer:
        writer.set_episodes(episode_records(episodes))
        with pytest.raises(InvalidInputError, match=r"batch_size: recorded=8 running=3"):
            run_precompute(clip, dataset, episodes, writer, class_names=names, batch_size=3)


# ------------------------------------------------------------------ broken files met while computing


@pytest.fixture(scope="module")
def clean_job(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path) -> dict[str, Any]:
    """A data root, its trainers' lists, a fixed episode file, and the cache of a clean run."""
    base = tmp_path_factory.mktemp("clean-job")
    root = write_synthetic_pascal(base / "voc", per_class=3, size=(72, 100))
    write_fss_lists(open_dataset("pascal5i", root, 0, "val").lists, base / "lists")
    dataset = open_dataset("pascal5i", root, 0, "val", list_root=base / "lists")
    episodes = sample_episodes(dataset, 10, shot=1, seed=5)
    episode_file = write_episodes(base / "episodes.jsonl", episodes, EpisodeMeta.for_dataset(dataset, 1, 5))
    job = {"base": base, "root": root, "lists": base / "lists", "episode_file": episode_file, "episodes": episodes}
    result = _invoke(_job_args(job, root, tiny_clip_dir, base / "clean.h5"))
    assert result.exit_code == 0, result.output
    return {**job, "clean": base / "clean.h5"}


def _job_args(job: dict[str, Any], root: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return ["precompute", "--dataset", "pascal5i", "--fold", "0", "--data-root", str(root), "--model", str(model),
            "--device", "cpu", "--list-root", str(job["lists"]), "--episode-file", str(job["episode_file"]),
            "--batch-size", "2", "--chunk-images", "3", "--out", str(out), *extra]


def _rewrite(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path, format="PNG" if path.suffix == ".png" else "JPEG")


def _break(kind: str, image: Path, label: Path) -> Path:
    """Break one image/mask pair the way ``kind`` says; return the file at fault."""
    if kind == "zero-byte JPEG":
        image.write_bytes(b"")
        return image
    if kind == "truncated JPEG":
        data = image.read_bytes()
        image.write_bytes(data[: len(data) // 2])
        return image
    if kind == "zero-byte mask":
        label.write_bytes(b"")
        return label
    if kind == "mask without its class":
        _rewrite(label, np.zeros_like(np.asarray(Image.open(label))))
        return label
    if kind == "mask of another size":
        _rewrite(label, np.asarray(Image.open(label))[:40, :60])
        return label
    if kind == "image smaller than a patch":
        _rewrite(image, np.asarray(Image.open(image))[:8, :8])
        _rewrite(label, np.asarray(Image.open(label))[:8, :8])
        return image
    raise AssertionError(kind)


BROKEN_KINDS = ["zero-byte JPEG", "truncated JPEG", "zero-byte mask", "mask without its class",
                "mask of another size", "image smaller than a patch"]


def _broken_copy(job: dict[str, Any], tmp_path: Path, kind: str, role: str) -> tuple[Path, Path, set[int]]:
    """A copy of the data root with one file broken, used by the episodes as ``role``.

    Returns:
        The root, the broken file, and the episodes that need it.
    """
    root = Path(shutil.copytree(job["root"], tmp_path / "voc"))
    episodes = job["episodes"]
    if role == "support":
        image, label = episodes[0].supports[0]
    else:
        image, label = episodes[0].query_image, episodes[0].query_label
    queries = {i for i, e in enumerate(episodes) if e.query_image == image}
    supports = {i for i, e in enumerate(episodes) if (image, label) in e.supports}
    # A mask without its class is a valid query mask (VTP needs none); everything else breaks both uses.
    needing = supports | (set() if kind == "mask without its class" else queries)
    return root, _break(kind, root / image, root / label), needing


@pytest.mark.parametrize("role", ["support", "query"])
@pytest.mark.parametrize("kind", BROKEN_KINDS)
def test_skip_drops_exactly_the_episodes_that_need_a_broken_file(clean_job, tiny_clip_dir, tmp_path, kind, role):
    if kind == "mask without its class" and role == "query":
        pytest.skip("a query mask without the class is usable (VTP needs no mask)")
    root, bad, needing = _broken_copy(clean_job, tmp_path, kind, role)
    assert needing, "the broken file must be used by some episode"
    out = tmp_path / "p.h5"
    result = _invoke(_job_args(clean_job, root, tiny_clip_dir, out, "--on-error", "skip"))
    assert result.exit_code == 0, result.output
    text = _flat(result)
    assert f"dropped {len(needing)} episode(s)" in text and bad.name in text
    assert check_cache(out).ok  # complete for the episodes it lists
    cache, clean = PriorCache(out), PriorCache(clean_job["clean"])
    kept = {e.index for e in cache.episodes}
    assert kept == set(range(len(clean_job["episodes"]))) - needing
    for index in kept:  # everything else is computed, as in a clean run (up to batch partners)
        np.testing.assert_allclose(cache.vvp(index).numpy(), clean.vvp(index).numpy(), atol=2e-3)
    for key, class_id in cache.vtp_keys():
        np.testing.assert_allclose(cache.vtp(key, class_id).numpy(), clean.vtp(key, class_id).numpy(), atol=2e-3)


def test_a_stopped_skip_run_resumes_to_the_uninterrupted_one(clean_job, tiny_clip_dir, tmp_path, monkeypatch):
    root, bad, needing = _broken_copy(clean_job, tmp_path, "truncated JPEG", "support")
    whole = tmp_path / "whole.h5"
    assert _invoke(_job_args(clean_job, root, tiny_clip_dir, whole, "--on-error", "skip")).exit_code == 0
    out = tmp_path / "stopped.h5"
    with _stop_after_commits(monkeypatch, 2):
        assert _invoke(_job_args(clean_job, root, tiny_clip_dir, out, "--on-error", "skip")).exit_code != 0
    resumed = _invoke(_job_args(clean_job, root, tiny_clip_dir, out, "--on-error", "skip"))
    assert resumed.exit_code == 0, resumed.output
    assert f"dropped {len(needing)} episode(s)" in _flat(resumed) and bad.name in _flat(resumed)
    assert_same_arrays(whole, out)


@pytest.mark.parametrize("kind", BROKEN_KINDS)
def test_every_data_error_names_the_file_the_episodes_and_the_fix(clean_job, tiny_clip_dir, tmp_path, kind):
    root, bad, needing = _broken_copy(clean_job, tmp_path, kind, "support")
    out = tmp_path / "p.h5"
    result = _invoke(_job_args(clean_job, root, tiny_clip_dir, out))
    assert result.exit_code == 1, result.output
    text = _flat(result)
    assert "Traceback" not in result.output and str(bad) in text
    assert any(f"episode(s) {i}" in text for i in needing) and "--on-error skip" in text
    assert not out.exists()


def test_a_query_mask_of_another_size_is_refused_naming_both_files(clean_job, tiny_clip_dir, tmp_path):
    root, bad, _ = _broken_copy(clean_job, tmp_path, "mask of another size", "query")
    image = root / clean_job["episodes"][0].query_image
    result = _invoke(_job_args(clean_job, root, tiny_clip_dir, tmp_path / "p.h5"))
    assert result.exit_code == 1, result.output
    text = _flat(result)
    assert f"mask {bad} is 40x60 (HxW) but image {image} is 72x100" in text


def test_an_old_cache_with_a_query_mask_of_another_size_names_the_mask_not_the_data_root(clean_job, tmp_path):
    """A cache computed before precompute refused such queries: evaluate and show name the mask and its image."""
    root, bad, _ = _broken_copy(clean_job, tmp_path, "mask of another size", "query")
    cache = PriorCache(clean_job["clean"])
    record = cache.episodes[0]
    image = root / record.query_image
    assert root / record.query_label == bad
    expected = f"query mask {bad} of episode 0 is 40x60 (HxW) but its image {image} is 72x100"
    for images in (False, True):  # evaluate reads the masks only, show the pictures too
        with pytest.raises(DatasetError, match=re.escape(expected)) as info:
            load_episode(cache, record, root, images=images)
        assert "--data-root" not in str(info.value) and "replace it" in str(info.value)
    for args in (["evaluate", str(clean_job["clean"]), "--data-root", str(root)],
                 ["show", str(clean_job["clean"]), "--data-root", str(root), "--episodes", "0",
                  "--out", str(tmp_path / "panels")]):
        result = _invoke(args)
        assert result.exit_code == 1, result.output
        errors = _flat(result).split("Error: ")[1:]
        assert len(errors) == 1 and "Traceback" not in result.output, result.output
        assert expected in errors[0] and "--data-root" not in errors[0]


def test_show_names_a_support_mask_of_another_size_and_a_wrong_data_root_is_still_named(clean_job, tmp_path):
    root, bad, needing = _broken_copy(clean_job, tmp_path, "mask of another size", "support")
    cache = PriorCache(clean_job["clean"])
    record = cache.episodes[min(needing)]
    support = next(image for image, label in record.supports if root / label == bad)
    load_episode(cache, record, root, images=False)  # evaluate needs no support
    expected = f"mask {bad} is 40x60 (HxW) but image {root / support} is 72x100"
    with pytest.raises(DatasetError, match=re.escape(expected)):
        load_episode(cache, record, root, images=True)
    # Another data set under the same names: the image too has another size than the cache recorded.
    other = Path(shutil.copytree(clean_job["root"], tmp_path / "other"))
    query = cache.episodes[0]
    _break("image smaller than a patch", other / query.query_image, other / query.query_label)
    with pytest.raises(InvalidInputError, match=r"is --data-root the folder the cache was computed from"):
        load_episode(cache, query, other, images=False)


# ----------------------------------------------------------------- nothing executes from list files


def test_hostile_list_files_never_execute_code(clean_job, tiny_clip_dir, tmp_path):
    marker = tmp_path / "pwned"
    lists = Path(shutil.copytree(clean_job["lists"], tmp_path / "lists"))
    (sub,) = lists.rglob("sub_class_file_list_0.txt")
    sub.write_text(f"__import__('os').system('touch {marker}')")
    args = _job_args(clean_job, clean_job["root"], tiny_clip_dir, tmp_path / "p.h5")
    args = [a for a in _with(args, "--list-root", str(lists)) if a != "--episode-file"]
    args.remove(str(clean_job["episode_file"]))
    result = _invoke(args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "not a Python-literal dict" in _flat(result) and not marker.exists()
