"""The precompute engine and command: dedup, equality with direct calls, resume, shards, errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from clipprior import PriorConfig, compute_priors
from clipprior.cache import CacheWriter, PriorCache
from clipprior.cli.main import app
from clipprior.data import open_dataset, prompt_names, sample_episodes
from clipprior.precompute import QueryWork, build_provenance, episode_records, plan_chunks, plan_work, run_precompute
from tests._cache_job import assert_same_arrays, h5_arrays
from tests.conftest import precompute_args

FP16_TOL = 2e-3  # maps are stored as float16 in [0, 1]: half a unit in the last place is 2.4e-4 at 1.0


def _run_cli(args: list[str]) -> object:
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    return result


def test_plan_deduplicates_queries_and_supports(data_root):
    dataset = open_dataset("pascal5i", data_root, 0, "val")
    episodes = sample_episodes(dataset, 30, shot=2, seed=1)
    plan = plan_work(episodes)
    assert len(plan.queries) == len({e.query_image for e in episodes})
    assert sum(len(q.episodes) for q in plan.queries) == 30
    keys = {(s[0], s[1], e.class_id) for e in episodes for s in e.supports}
    assert set(plan.support_uses) == keys
    assert sum(plan.support_uses.values()) == 60
    shards = [plan_work(episodes, (i, 3)) for i in range(3)]
    images = [q.image for p in shards for q in p.queries]
    assert sorted(images) == sorted(q.image for q in plan.queries)


@settings(max_examples=200, deadline=None)
@given(counts=st.lists(st.integers(1, 12), max_size=40), chunk_images=st.integers(1, 9),
       chunk_episodes=st.integers(1, 30))
def test_chunks_keep_order_and_respect_both_limits(counts, chunk_images, chunk_episodes):
    queries = [QueryWork(f"q{i}", f"l{i}", {1}, list(range(n))) for i, n in enumerate(counts)]
    chunks = plan_chunks(queries, chunk_images, chunk_episodes)
    assert [q for c in chunks for q in c] == queries
    for chunk in chunks:
        assert 1 <= len(chunk) <= chunk_images
        # only the image that closes a chunk may carry it past the episode limit
        assert sum(len(q.episodes) for q in chunk[:-1]) < chunk_episodes
    for chunk in chunks[:-1]:  # a chunk is closed only by one of the limits
        assert len(chunk) == chunk_images or sum(len(q.episodes) for q in chunk) >= chunk_episodes


@pytest.mark.parametrize(("images", "episodes"), [(0, 5), (3, 0)])
def test_chunk_limits_must_be_positive(images, episodes):
    with pytest.raises(ValueError, match="must be >= 1"):
        plan_chunks([], images, episodes)


def _count_commits(writer: CacheWriter) -> list[int]:
    calls: list[int] = []
    commit = writer.commit

    def counted() -> int:
        calls.append(1)
        return commit()

    writer.commit = counted  # type: ignore[method-assign]
    return calls


def test_chunking_changes_commits_not_priors(tmp_path, data_root, clip):
    dataset = open_dataset("pascal5i", data_root, 0, "val")
    episodes = sample_episodes(dataset, 24, shot=1, seed=4)
    names = prompt_names("pascal5i")
    commits = []
    for chunk_episodes in (256, 2):
        out = tmp_path / f"p{chunk_episodes}.h5"
        with CacheWriter(out, {"test": "chunks"}) as writer:
            writer.set_episodes(episode_records(episodes))
            calls = _count_commits(writer)
            stats = run_precompute(clip, dataset, episodes, writer, class_names=names, batch_size=1,
                                   chunk_images=64, chunk_episodes=chunk_episodes)
            writer.finalize()
        commits.append(len(calls))
        assert stats.vvp_written == 24 and stats.query_passes == len(plan_work(episodes).queries)
    plan = plan_work(episodes)
    assert commits[1] >= len(plan_chunks(plan.queries, 64, 2)) > len(plan_chunks(plan.queries, 64, 256))
    assert commits[1] > commits[0]
    left, right = h5_arrays(tmp_path / "p256.h5"), h5_arrays(tmp_path / "p2.h5")
    assert sorted(left) == sorted(right)
    for key in left:  # batch_size=1: the same passes whatever the chunking, so the same numbers
        np.testing.assert_array_equal(left[key], right[key], err_msg=key)


class _DecodeOnly:
    """A dataset with only what the engine's protocol requires (no header-only ``image_size``)."""

    def __init__(self, dataset) -> None:
        self.load_image, self.load_label = dataset.load_image, dataset.load_label


def test_sizes_from_headers_or_decoding_plan_the_same_cache(tmp_path, data_root, clip):
    dataset = open_dataset("pascal5i", data_root, 0, "val")
    episodes = sample_episodes(dataset, 8, shot=1, seed=6)
    for image, _ in episodes[0].supports:
        assert dataset.image_size(image) == dataset.load_image(image).shape[:2]
    outs = []
    for name, source in (("header", dataset), ("decode", _DecodeOnly(dataset))):
        outs.append(tmp_path / f"{name}.h5")
        with CacheWriter(outs[-1], {"test": "sizes"}) as writer:
            writer.set_episodes(episode_records(episodes))
            run_precompute(clip, source, episodes, writer, class_names=prompt_names("pascal5i"), batch_size=2)
            writer.finalize()
    assert_same_arrays(*outs)


def test_engine_runs_each_unique_pass_once_and_matches_direct_calls(tmp_path, data_root, clip):
    dataset = open_dataset("pascal5i", data_root, 0, "val")
    episodes = sample_episodes(dataset, 10, shot=2, seed=3)
    names = prompt_names("pascal5i")
    config = PriorConfig()
    prov = build_provenance(clip, config, dataset="pascal5i", fold=0, split="val", shot=2, seed=3,
                            n_episodes=len(episodes), list_checksum=dataset.list_checksum, class_names=names,
                            batch_size=3)
    out = tmp_path / "p.h5"
    with CacheWriter(out, prov) as writer:
        writer.set_episodes(episode_records(episodes))
        stats = run_precompute(clip, dataset, episodes, writer, class_names=names, config=config, batch_size=3)
        writer.finalize()
    plan = plan_work(episodes)
    assert stats.query_passes == len(plan.queries)
    assert stats.support_passes == len(plan.support_uses)
    assert stats.vtp_written == plan.n_pairs
    assert stats.vvp_written == len(episodes)

    cache = PriorCache(out)
    for i, episode in enumerate(episodes):
        query = dataset.load_image(episode.query_image)
        supports, masks = [], []
        for image, label in episode.supports:
            supports.append(dataset.load_image(image))
            raw = dataset.load_label(label)
            masks.append(np.where(raw == episode.class_id, 1, np.where(raw == 255, 255, 0)))
        direct = compute_priors(clip, query, names[episode.class_id - 1], supports, masks, config=config)
        cam = cache.vtp(episode.query_image, episode.class_id, refined=False)
        refined = cache.vtp(episode.query_image, episode.class_id, refined=True)
        np.testing.assert_allclose(cam.numpy(), direct.cam.numpy(), atol=FP16_TOL)
        np.testing.assert_allclose(refined.numpy(), direct.refined.numpy(), atol=FP16_TOL)
        np.testing.assert_allclose(cache.vvp(i).numpy(), direct.vvp.numpy(), atol=FP16_TOL)
        assert cache.image_size(episode.query_image) == tuple(query.shape[:2])


def test_present_mode_changes_vtp_and_is_recorded(tmp_path, data_root, tiny_clip_dir):
    a, b = tmp_path / "target.h5", tmp_path / "present.h5"
    assert _run_cli(precompute_args(data_root, tiny_clip_dir, a)).exit_code == 0
    assert _run_cli(precompute_args(data_root, tiny_clip_dir, b, "--text-classes", "present")).exit_code == 0
    ca, cb = PriorCache(a), PriorCache(b)
    assert ca.provenance["text_classes"] == "target" and cb.provenance["text_classes"] == "present"
    assert cb.config.text_classes == "present"
    # Synthetic images showing two classes get a different softmax class set.
    diffs = [float((ca.vtp(k, c, refined=False) - cb.vtp(k, c, refined=False)).abs().max()) for k, c in ca.vtp_keys()]
    assert max(diffs) > 1e-3


def test_cli_resumes_and_refuses_other_settings(tmp_path, data_root, tiny_clip_dir):
    out = tmp_path / "p.h5"
    first = _run_cli(precompute_args(data_root, tiny_clip_dir, out))
    assert first.exit_code == 0, first.output
    again = _run_cli(precompute_args(data_root, tiny_clip_dir, out))
    assert again.exit_code == 0
    assert "0 VTP and 0 VVP written" in " ".join(again.output.split())
    other = CliRunner().invoke(app, precompute_args(data_root, tiny_clip_dir, out, "--shot", "2"))
    assert other.exit_code == 1
    assert "shot" in other.output and "cached=1" in other.output.replace(" ", "")
    fold = CliRunner().invoke(app, [*precompute_args(data_root, tiny_clip_dir, out)[:4], "1",
                                    *precompute_args(data_root, tiny_clip_dir, out)[5:]])
    assert fold.exit_code == 1 and "fold" in fold.output


def test_shards_merge_to_the_single_run(tmp_path, data_root, tiny_clip_dir):
    single = tmp_path / "single.h5"
    assert _run_cli(precompute_args(data_root, tiny_clip_dir, single)).exit_code == 0
    sharded = tmp_path / "sharded.h5"
    for i in range(3):
        res = _run_cli(precompute_args(data_root, tiny_clip_dir, sharded, "--shard", f"{i}/3"))
        assert res.exit_code == 0, res.output
    shards = sorted(tmp_path.glob("sharded.shard-*"))
    assert len(shards) == 3
    merged = tmp_path / "merged.h5"
    res = _run_cli(["merge", str(merged), *map(str, shards)])
    assert res.exit_code == 0, res.output
    assert_same_arrays(single, merged)


def test_torchrun_environment_selects_the_shard(tmp_path, data_root, tiny_clip_dir, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "p.h5"
    res = _run_cli(precompute_args(data_root, tiny_clip_dir, out))
    assert res.exit_code == 0, res.output
    assert [p.name for p in tmp_path.glob("p.shard-*")] and not out.exists()


def test_model_that_fails_to_load_leaves_no_cache(tmp_path, data_root):
    out = tmp_path / "p.h5"
    res = CliRunner().invoke(app, precompute_args(data_root, tmp_path / "no-such-weights.pt", out))
    assert res.exit_code == 1
    assert "not found" in res.output and "Traceback" not in res.output
    assert not out.exists() and not list(tmp_path.glob("p.h5*"))


def test_bad_shard_and_missing_root(tmp_path, data_root, tiny_clip_dir):
    res = CliRunner().invoke(app, precompute_args(data_root, tiny_clip_dir, tmp_path / "p.h5", "--shard", "3/2"))
    assert res.exit_code == 1 and "--shard" in res.output
    res = CliRunner().invoke(app, precompute_args(tmp_path / "nowhere", tiny_clip_dir, tmp_path / "p.h5"))
    assert res.exit_code != 0 and "nowhere" in res.output


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path, data_root, tiny_clip_dir):
    reference = tmp_path / "reference.h5"
    args = precompute_args(data_root, tiny_clip_dir, reference, "--episodes", "24", "--chunk-images", "3",
                      "--batch-size", "2")
    assert _run_cli(args).exit_code == 0

    out = tmp_path / "killed.h5"
    cmd = [sys.executable, "-m", "clipprior.cli.main",
           *precompute_args(data_root, tiny_clip_dir, out, "--episodes", "24", "--chunk-images", "3",
                            "--batch-size", "2")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    parts = tmp_path / "killed.h5.parts"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if len(list(parts.glob("seg-*.h5"))) >= 3:
            break
        if proc.poll() is not None:
            pytest.fail("precompute finished before it could be killed; make the run longer")
        time.sleep(0.02)
    else:
        proc.kill()
        pytest.fail("no segment appeared in time")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the final file must not exist before the run ends"
    resumed = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "episodes already cached" in " ".join(resumed.stdout.split())
    assert_same_arrays(reference, out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_run(tmp_path, data_root, tiny_clip_dir, dtype):
    name = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    out = tmp_path / f"{name}.h5"
    res = _run_cli(precompute_args(data_root, tiny_clip_dir, out, "--dtype", name, "--episodes", "4"))
    assert res.exit_code == 0, res.output
    cache = PriorCache(out)
    for key, cls in cache.vtp_keys():
        assert torch.isfinite(cache.vtp(key, cls)).all()


def test_verify_sample_recomputes_and_catches_tampering(tmp_path, data_root, tiny_clip_dir):
    out = tmp_path / "p.h5"
    assert _run_cli(precompute_args(data_root, tiny_clip_dir, out, "--text-classes", "present")).exit_code == 0
    ok = CliRunner().invoke(app, ["verify", str(out), "--sample", "4", "--data-root", str(data_root),
                                  "--device", "cpu"])
    assert ok.exit_code == 0, ok.output
    assert "4 episodes recomputed" in " ".join(ok.output.split())
    no_root = CliRunner().invoke(app, ["verify", str(out), "--sample", "1"])
    assert no_root.exit_code == 1 and "--data-root" in no_root.output
    with h5py.File(out, "r+") as handle:
        handle["vvp/maps"][...] = 0.5
    bad = CliRunner().invoke(app, ["verify", str(out), "--sample", "12", "--data-root", str(data_root),
                                   "--device", "cpu"])
    assert bad.exit_code == 1
    assert "VVP differs from a fresh computation" in " ".join(bad.output.split())


def test_check_recomputed_compares_every_prior_kind(tmp_path, data_root, tiny_clip_dir):
    """The library function behind verify --sample: recompute, compare per declared prior kind, note the weights."""
    import json

    from clipprior.cache import PRIORS
    from clipprior.precompute import check_recomputed

    out = tmp_path / "p.h5"
    assert _run_cli(precompute_args(data_root, tiny_clip_dir, out, "--episodes", "4")).exit_code == 0
    with PriorCache(out) as cache:
        report = check_recomputed(cache, cache.episodes[:3], data_root=data_root)
        assert report.ok and report.episodes == 3 and report.notes == []
        first = cache.episodes[0]
    with h5py.File(out, "r+") as handle:
        row = PriorCache(out).vtp_keys().index((first.query_image, first.class_id))
        handle["vtp/refined"][row] = handle["vtp/refined"][row] + np.float16(0.25)
        prov = json.loads(handle.attrs["provenance"])
        handle.attrs["provenance"] = json.dumps({**prov, "weights_sha256": "0" * 64}, sort_keys=True)
    with PriorCache(out) as cache:
        report = check_recomputed(cache, [first], data_root=data_root, atol=0.1)
        labels = {k.label for k in PRIORS}
        assert report.problems == [f"episode {first.index}: VTP refined differs from a fresh computation by 0.25 "
                                   "(> --atol 0.1)"] and "VTP refined" in labels
        assert report.notes == ["the weights' checksum differs from the cache's"]
        # an explicit model is the caller's choice: no note about the recorded weights
        assert check_recomputed(cache, [first], data_root=data_root, model=tiny_clip_dir, atol=0.3).notes == []
    result = CliRunner().invoke(app, ["verify", str(out), "--sample", "1", "--data-root", str(data_root)])
    assert "Note: the weights' checksum differs from the cache's" in result.output


def test_cli_records_the_data_root_that_evaluate_and_show_fall_back_to(tmp_path, data_root, tiny_clip_dir):
    out = tmp_path / "rooted.h5"
    assert _run_cli(precompute_args(data_root, tiny_clip_dir, out)).exit_code == 0
    with PriorCache(out) as cache:
        assert cache.provenance["data_root"] == str(Path(data_root).resolve())
    scores = tmp_path / "scores.json"
    result = CliRunner().invoke(app, ["evaluate", str(out), "--json", str(scores)])  # no --data-root
    assert result.exit_code == 0, result.output
    assert scores.exists()
    panels = tmp_path / "panels"
    result = CliRunner().invoke(app, ["show", str(out), "--episodes", "0", "--out", str(panels)])
    assert result.exit_code == 0, result.output
    assert list(panels.glob("*.png"))


def test_library_fold_cache_records_the_data_root(tmp_path, data_root, clip):
    # a cache written through the library (not the command) records the root evaluate and show fall back to
    from clipprior.precompute import fold_episodes, precompute_fold

    dataset = open_dataset("pascal5i", data_root, 0, "val")
    chosen = fold_episodes(dataset, n_episodes=6, shot=1, seed=2)
    planned: dict[str, int] = {}
    result = precompute_fold(clip, dataset, chosen, tmp_path / "lib.h5", batch_size=2,
                             on_plan=lambda kind, total: planned.update({kind: total}))
    assert result.stats.vvp_written == 6 and planned["episode"] == 6
    with PriorCache(result.path) as cache:
        assert cache.provenance["data_root"] == str(Path(data_root).resolve())
        assert cache.provenance["coco_split"] == "interleaved"
        assert "store" not in cache.provenance
        assert len(cache.episodes) == 6


def test_fold_episodes_refuses_a_pool_mixed_with_other_episode_sources(data_root, tmp_path):
    from clipprior.errors import InvalidInputError
    from clipprior.precompute import fold_episodes

    dataset = open_dataset("pascal5i", data_root, 0, "val")
    with pytest.raises(InvalidInputError, match="n_episodes"):
        fold_episodes(dataset, n_episodes=4, supports_per_query=2)
    with pytest.raises(InvalidInputError, match="supports_per_query=3"):
        fold_episodes(dataset, shot=3, supports_per_query=2)
    pool = fold_episodes(dataset, supports_per_query=2, seed=1)
    assert pool.pool and pool.shot == 1 and pool.supports_per_query == 2
