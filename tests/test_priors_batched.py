"""The batched pieces the precompute engine uses: vtp_pass, preprocess_support, the VVP cosine-max."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clipprior import InvalidInputError
from clipprior.preprocess import preprocess_query, preprocess_support
from clipprior.priors import (
    SupportCells,
    best_cosine_match,
    encode_text,
    vtp,
    vtp_pass,
    vvp_from_features,
)

NAMES = ["cat", "dog", "bird avian"]


def _official_vvp(query: torch.Tensor, support: torch.Tensor, mask: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """The official formula, written out: masked supports, cosine over every cell, max. (L, n, D), (L, m, D), (m,)."""
    s = support * mask[None, :, None].float()
    dots = torch.einsum("lnd,lmd->lnm", query, s)
    denom = query.norm(dim=-1)[:, :, None] * s.norm(dim=-1)[:, None, :] + eps
    return (dots / denom).amax(dim=-1)


# ----------------------------------------------------------------------------------------------
# VVP cosine-max


@settings(max_examples=60, deadline=None)
@given(layers=st.integers(1, 3), n=st.integers(1, 12), m=st.integers(1, 12), dim=st.integers(1, 6),
       fractions=st.lists(st.sampled_from([0.0, 0.2, 0.5, 1.0]), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_best_cosine_match_equals_the_official_formula(layers, n, m, dim, fractions, seed):
    gen = torch.Generator().manual_seed(seed)
    count = len(fractions)
    query = torch.randn(count, layers, n, dim, generator=gen)
    support = torch.randn(count, layers, m, dim, generator=gen)
    mask = torch.stack([torch.rand(m, generator=gen) < f for f in fractions])  # some empty, some full
    cells = SupportCells.from_grid(support, mask)
    assert cells.features.shape[2] == int(mask.sum(dim=1).max())
    got = best_cosine_match(query, query.norm(dim=-1), cells)
    for i in range(count):
        torch.testing.assert_close(got[i], _official_vvp(query[i], support[i], mask[i]), atol=1e-6, rtol=0)
    # Concatenating supports one by one (different foreground counts) gives the same maps.
    joined = SupportCells.cat([SupportCells.from_grid(support[i:i + 1], mask[i:i + 1]) for i in range(count)])
    torch.testing.assert_close(best_cosine_match(query, query.norm(dim=-1), joined), got, atol=1e-6, rtol=0)


def test_vvp_from_features_matches_the_official_formula_per_shot():
    gen = torch.Generator().manual_seed(3)
    query = torch.randn(2, 2, 6, 5, generator=gen)
    support = torch.randn(2, 3, 2, 8, 5, generator=gen)
    mask = torch.rand(2, 3, 8, generator=gen) < 0.5
    mask[0, 1] = True  # a support without background: its maps may go below 0
    mask[1, 2] = False  # a support whose object vanished on the grid: all zero
    maps = vvp_from_features(query, support, mask, (2, 3))
    assert maps.shape == (2, 6, 2, 3)
    for b in range(2):
        for k in range(3):
            ref = _official_vvp(query[b], support[b, k], mask[b, k]).reshape(2, 2, 3)
            torch.testing.assert_close(maps[b, k::3], ref, atol=1e-6, rtol=0)  # layer-major, shots inner
    assert torch.equal(maps[1, 2::3], torch.zeros(2, 2, 3))


def test_support_cells_keep_the_foreground_in_grid_order():
    feats = torch.arange(24, dtype=torch.float32).reshape(1, 2, 4, 3)
    cells = SupportCells.from_grid(feats, torch.tensor([[False, True, False, True]]))
    assert torch.equal(cells.features[0], feats[0][:, [1, 3]])
    assert cells.has_background.tolist() == [True] and cells.valid.tolist() == [[True, True]]


def test_cosine_match_rejects_mismatched_shapes():
    cells = SupportCells.from_grid(torch.randn(2, 1, 4, 3), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(InvalidInputError, match="do not match the support cells"):
        best_cosine_match(torch.randn(1, 1, 5, 3), torch.ones(1, 1, 5), cells)
    with pytest.raises(InvalidInputError, match="mask"):
        SupportCells.from_grid(torch.randn(2, 1, 4, 3), torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(InvalidInputError, match="no SupportCells"):
        SupportCells.cat([])


# ----------------------------------------------------------------------------------------------
# vtp_pass and preprocess_support


def test_vtp_pass_equals_vtp(clip):
    text = encode_text(clip, NAMES)
    rng = np.random.default_rng(0)
    pixels = torch.stack([preprocess_query(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8), clip.patch_size)
                          for _ in range(2)])
    ref = vtp(clip, pixels, ["cat", "dog", "cat"], image_index=[0, 0, 1], context=[["bird avian"], [], []],
              text=text, return_attention=True, return_features=True)
    out = vtp_pass(clip, pixels, torch.tensor([0, 0, 1]), [["cat", "bird avian"], ["dog"], ["cat"]], text,
                   return_attention=True, return_features=True)
    for name in ("cam", "scores", "attention", "features"):
        assert torch.equal(getattr(out, name), getattr(ref, name)), name
    assert out.cam.shape == (3, 3, 4) and out.attention.shape == (3, 12, 12)


def test_vtp_pass_rejects_mismatched_pairs(clip):
    text = encode_text(clip, NAMES)
    with pytest.raises(InvalidInputError, match="class sets"):
        vtp_pass(clip, torch.zeros(1, 3, 32, 32), torch.tensor([0, 0]), [["cat"]], text)
    with pytest.raises(InvalidInputError, match="class sets"):
        vtp_pass(clip, torch.zeros(1, 3, 32, 32), torch.tensor([0]), [[]], text)


def test_preprocess_support_resizes_image_and_label_together():
    image = np.zeros((20, 40, 3), np.uint8)
    label = np.zeros((20, 40), np.uint8)
    label[:10, :20] = 1
    label[15:, 30:] = 255
    pixels, labels = preprocess_support(image, label, 16)
    assert pixels.shape == (3, 32, 48) and labels.shape == (32, 48) and labels.dtype == torch.int64
    assert set(labels.unique().tolist()) == {0, 1, 255}
    same, kept = preprocess_support(np.zeros((32, 48, 3), np.uint8), np.ones((32, 48)), 16)
    assert same.shape == (3, 32, 48) and bool((kept == 1).all())
    with pytest.raises(InvalidInputError, match="does not match its image"):
        preprocess_support(image, label[:, :30], 16)


# ----------------------------------------------------------------------------------------------
# Config fields checked against the model; output sizes; text_classes="present" in compute_priors


@pytest.mark.parametrize(("changes", "field"), [({"pir_layers": 99}, "pir_layers"),
                                                ({"vvp_layers": (-1, 99)}, "vvp_layers"),
                                                ({"vvp_layers": (-9,)}, "vvp_layers")])
def test_layer_fields_are_checked_against_the_model(clip, changes, field):
    from clipprior import ConfigError, PriorConfig, vvp

    config = PriorConfig(**changes)
    layers = clip.num_layers
    pixels = torch.zeros(1, 3, 32, 32)
    match = rf"PriorConfig\.{field}=.*{layers} vision layers"
    with pytest.raises(ConfigError, match=match):
        vtp(clip, pixels, ["cat"], config=config, return_attention=True, return_features=True)
    if field == "vvp_layers":
        with pytest.raises(ConfigError, match=match):
            vvp(clip, pixels, pixels[:, None], torch.ones(1, 1, 32, 32, dtype=torch.long), config=config)
    else:  # a config whose PIR layers do not matter to the call is not refused
        vtp(clip, pixels, ["cat"], config=config)


@pytest.mark.parametrize("size", [(0, 5), (5, -1), (2.5, 3), (3,), "ab"])
def test_pir_rejects_a_bad_output_size(size):
    from clipprior.priors import pir

    cam = torch.rand(1, 2, 2)
    with pytest.raises(InvalidInputError, match=r"output_size=.* is not a size"):
        pir(cam, torch.rand(1, 4, 4), output_size=size)


def test_compute_priors_honours_text_classes_present(clip):
    from clipprior import compute_priors, get_preset
    from clipprior.priors import present_names

    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    label = np.zeros((40, 56), np.uint8)
    label[:20] = 1
    label[25:, :10] = 3
    label[30:, 40:] = 255
    official = get_preset("official")
    assert present_names(label, 1, NAMES) == ["bird avian"]
    got = compute_priors(clip, image, "cat", config=official, query_label=label, class_names=NAMES)
    ref = compute_priors(clip, image, "cat", config=official.replace(text_classes="target"), context=["bird avian"])
    alone = compute_priors(clip, image, "cat", config=official.replace(text_classes="target"))
    assert torch.equal(got.cam, ref.cam) and torch.equal(got.refined, ref.refined)
    assert not torch.equal(got.cam, alone.cam)
    with pytest.raises(InvalidInputError, match="pass query_label="):
        compute_priors(clip, image, "cat", config=official)
    with pytest.raises(InvalidInputError, match="both set the softmax classes"):
        compute_priors(clip, image, "cat", config=official, context=["dog"], query_label=label, class_names=NAMES)
    with pytest.raises(InvalidInputError, match="does not match the query image"):
        compute_priors(clip, image, "cat", config=official, query_label=label[:, :50], class_names=NAMES)
    with pytest.raises(InvalidInputError, match="not among class_names"):
        compute_priors(clip, image, "horse", config=official, query_label=label, class_names=NAMES)


@pytest.mark.parametrize("text_classes", ["target", "present"])
def test_softmax_classes_is_the_class_set_precompute_used(text_classes):
    """The one home of "target + present classes": the set the engine assembled itself before."""
    from clipprior import get_preset
    from clipprior.data import prompt_names
    from clipprior.priors import present_names, softmax_classes

    names = prompt_names("pascal5i")
    config = get_preset("official").replace(text_classes=text_classes)
    rng = np.random.default_rng(3)
    for _ in range(20):
        label = rng.choice([0, 255, *rng.integers(1, 21, 3).tolist()], size=(9, 7)).astype(np.uint8)
        for c in range(1, 21):
            before = [names[c - 1]]
            if text_classes == "present":
                before += [n for n in present_names(label, c, names) if n not in before]
            assert softmax_classes(names[c - 1], config, query_label=label, class_names=names, class_id=c) == before
            assert softmax_classes(names[c - 1], config, query_label=label, class_names=names) == before
    assert softmax_classes("cat", context=["dog", "cat", "dog"]) == ["cat", "dog"]
