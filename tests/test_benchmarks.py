"""The precompute benchmark runs end to end in --quick mode (tiny CLIP); no timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "bench_precompute.py"
LISTS = REPO.parent / "shared" / "lists" / "pascal"

sys.path.insert(0, str(REPO / "benchmarks"))

from _report import render_tables, update_readme  # noqa: E402
from _synthetic_fold import write_synthetic_fold  # noqa: E402

from clipprior.data import MIN_PIXELS, open_dataset, read_fss_lists  # noqa: E402

needs_lists = pytest.mark.skipif(not LISTS.is_dir(), reason=f"the shared PASCAL list files are not at {LISTS}")


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return {"result": json.loads(out.read_text()), "stdout": done.stdout}


@needs_lists
def test_quick_mode_runs_both_sides_and_writes_its_json(quick):
    result = quick["result"]
    assert result["quick"] is True
    assert result["goals"] == {}  # quick mode makes no timing claims
    assert [run["shot"] for run in result["runs"]] == [1, 5]
    for run in result["runs"]:
        ours, base = run["ours"], run["baseline"]
        assert run["episodes"] == 12
        assert ours["vvp_written"] == 12
        assert ours["query_passes"] == 12  # the first 12 list items, each its own query image
        assert ours["passes"] == ours["query_passes"] + ours["support_passes"]
        assert ours["support_passes"] <= 12 * run["shot"]
        assert base["sample"] == 3 and len(base["sample_indices"]) == 3
        assert base["passes_per_episode"] == 2 + run["shot"]
        assert base["passes_extrapolated"] == 12 * (2 + run["shot"])
        kinds = {b["kind"] for b in run["floor"]["batches"]}
        assert kinds == {"query", "support"}
        assert all("bare_s" in b for b in run["floor"]["batches"])
        assert sum(b["batch"] for b in run["floor"]["batches"] if b["kind"] == "support") == ours["support_passes"]
    assert [p["episodes"] for p in result["memory_curve"]] == [6, 12]
    assert "EXTRAPOLATED" in quick["stdout"]


@needs_lists
def test_quick_mode_records_nothing(quick):
    assert "recorded in benchmarks/results.jsonl" not in quick["stdout"]


@needs_lists
def test_synthetic_fold_has_the_listed_structure(tmp_path):
    root = tmp_path / "VOC2012"
    counts = write_synthetic_fold(root, LISTS, fold=0, scale=0.4)
    lists = read_fss_lists(LISTS, "pascal5i", 0)
    assert counts["images"] == len(lists.items) == 364
    assert 0 < counts["portrait"] < counts["images"]
    dataset = open_dataset("pascal5i", root, 0, "val", list_root=LISTS)
    assert len(dataset.items) == 364
    for c, pairs in dataset.class_index.items():
        for image, label in pairs[:5]:
            mask = dataset.load_label(label)
            assert (mask == c).sum() >= MIN_PIXELS
            assert dataset.load_image(image).shape[:2] == mask.shape
            assert set(dataset.present_classes(label)) <= {c for c, ps in dataset.class_index.items()
                                                          if (image, label) in ps}


@needs_lists
def test_readme_tables_render_between_the_markers(tmp_path, quick):
    readme = tmp_path / "README.md"
    readme.write_text("# title\n<!-- results:start -->\nold\n<!-- results:end -->\ntail\n")
    assert update_readme([quick["result"]], readme)
    text = readme.read_text()
    assert "old" not in text and text.endswith("tail\n")
    assert render_tables([quick["result"]]) in text
    assert not update_readme([quick["result"]], tmp_path / "missing.md")


# ----------------------------------------------------------------------------------------------
# Engine shortcuts made for the benchmark's goals: each must give the numbers of the plain path.


@pytest.fixture(scope="module")
def bundle(tiny_clip, tokenizer):
    from clipprior.model import ClipBundle

    return ClipBundle(model=tiny_clip, tokenizer=tokenizer, source="tiny", checksum="tiny")


@pytest.mark.parametrize("seed", range(4))
def test_foreground_only_support_features_equal_the_full_pass_on_the_mask(bundle, seed):
    from clipprior.priors import support_features

    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(2, 3, 64, 80, generator=gen)
    labels = (torch.rand(2, 64, 80, generator=gen) < 0.3 * (seed + 1) / 4).long()
    labels[:, 8:24, 16:40] = 1  # at least one cell of foreground
    full, mask = support_features(bundle, pixels, labels)
    fast, fast_mask = support_features(bundle, pixels, labels, foreground_only=True)
    assert torch.equal(mask, fast_mask)
    on = mask[:, None, :, None].expand_as(full)
    torch.testing.assert_close(fast[on], full[on], atol=1e-6, rtol=0)
    assert torch.equal(fast[:, 0][~mask], torch.zeros_like(fast[:, 0][~mask]))  # deepest layer: zeros off the mask
    torch.testing.assert_close(fast[:, 1], full[:, 1], atol=0, rtol=0)  # shallower layer: complete


def test_compile_benchmark_times_the_engine_trunk(bundle):
    """bench_compile's trunk is the engine's no-grad computation: the hidden states before the last layer."""
    from bench_compile import trunk_fn

    from clipprior.priors import layer_features

    pixels = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = trunk_fn(bundle, "bilinear")(pixels)
    expected = layer_features(bundle, pixels, [-2])[:, 0]  # (B, h*w, D) after the second-to-last layer
    torch.testing.assert_close(hidden[:, 1:], expected, atol=0, rtol=0)


def test_layer_features_rejects_cells_of_the_wrong_shape(bundle):
    from clipprior.errors import InvalidInputError
    from clipprior.priors import layer_features

    with pytest.raises(InvalidInputError, match="cells must be"):
        layer_features(bundle, torch.zeros(1, 3, 64, 64), [-1], cells=torch.ones(1, 5, dtype=torch.bool))


@settings(max_examples=40, deadline=None)
@given(layers=st.integers(1, 3), n=st.integers(1, 12), m=st.integers(1, 12), dim=st.integers(1, 6),
       fraction=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_foreground_cell_matching_equals_vvp_from_features(layers, n, m, dim, fraction, seed):
    from clipprior.priors import SupportCells, best_cosine_match, vvp_from_features

    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(layers, n, dim, generator=gen)
    support = torch.randn(layers, m, dim, generator=gen)
    mask = torch.rand(m, generator=gen) < fraction
    expected = vvp_from_features(query[None], support[None, None], mask[None, None], (1, n))[0].reshape(layers, n)
    got = best_cosine_match(query[None], query.norm(dim=-1)[None], SupportCells.from_grid(support[None], mask[None]),
                            1e-7)[0]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("batch", "height", "width"), [(1, 64, 64), (2, 48, 96), (3, 80, 32)])
def test_forward_flops_match_torch_flop_counter(batch, height, width):
    from bench_precompute import bare_forward, forward_flops, random_clip
    from torch.utils.flop_counter import FlopCounterMode

    clip = random_clip("tiny", "cpu", "fp32")
    clip.model.set_attn_implementation("eager")  # torch's counter does not see the CPU sdpa kernel; same FLOPs
    counter = FlopCounterMode(display=False)
    with counter:
        bare_forward(clip, torch.zeros(batch, 3, height, width))
    assert forward_flops(clip, batch, height, width) == counter.get_total_flops()
