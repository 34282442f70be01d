"""VTP, PIR and VVP on tiny random CLIPs: shapes, dtypes, batching, invariants, knobs, math laws, bad input."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from scipy import ndimage

from clipprior import ConfigError, InvalidInputError, get_preset
from clipprior.config import PriorConfig
from clipprior.model import ClipBundle
from clipprior.preprocess import normalize, preprocess_query
from clipprior.priors import (
    EpisodePriors,
    box_mask,
    compute_priors,
    encode_text,
    layer_features,
    minmax_normalize,
    pir,
    sinkhorn,
    support_features,
    vtp,
    vvp,
    vvp_from_features,
)

NAMES = ["cat", "dog", "person with clothes,people,human", "bird avian"]
PATCH = 16
LAYERS = 4


@pytest.fixture(scope="module")
def text(clip: ClipBundle):
    return encode_text(clip, NAMES)


def rgb_images(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth random RGB images (a random blob pattern), (n, H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(s).resize((width, height), Image.Resampling.BILINEAR)) for s in small])


def pixels_of(images: np.ndarray) -> torch.Tensor:
    return torch.stack([preprocess_query(im, PATCH) for im in images])


def support_batch(batch: int, shots: int, size: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K, 3, S, S) normalised supports and (B, K, S, S) labels with a different box per shot."""
    imgs = rgb_images(batch * shots, size, size, seed)
    sup = torch.stack([normalize(im) for im in imgs]).reshape(batch, shots, 3, size, size)
    labels = torch.zeros(batch, shots, size, size, dtype=torch.long)
    for b in range(batch):
        for k in range(shots):
            y, x = 4 + 6 * k + 3 * b, 8 + 5 * k
            labels[b, k, y:y + size // 2, x:x + size // 2] = 1
    labels[:, :, :2] = 255  # an ignore band, never foreground
    return sup, labels


# ----------------------------------------------------------------------------------------------
# Shapes


@pytest.mark.parametrize("size", [(64, 64), (64, 96), (96, 64), (50, 70), (17, 33)])
def test_vtp_pir_shapes(clip: ClipBundle, text, size: tuple[int, int]) -> None:
    images = rgb_images(2, *size)
    pixels = pixels_of(images)
    gh, gw = math.ceil(size[0] / PATCH), math.ceil(size[1] / PATCH)
    assert pixels.shape == (2, 3, gh * PATCH, gw * PATCH)
    out = vtp(clip, pixels, ["cat", "dog", "bird avian"], image_index=[0, 1, 1], text=text,
              return_attention=True, return_features=True)
    n = gh * gw
    assert out.cam.shape == (3, gh, gw) and out.cam.dtype == torch.float32
    assert out.attention.shape == (3, n, n) and out.attention.dtype == torch.float32
    assert out.features.shape == (2, 2, n, 64)
    assert out.scores.shape == (3,) and out.image_index.tolist() == [0, 1, 1]
    res = pir(out.cam, out.attention, output_size=size)
    assert res.refined.shape == (3, *size) and res.refined.dtype == torch.float32
    assert res.refined_grid.shape == (3, gh, gw) and res.box_mask.shape == (3, gh, gw)
    assert res.box_mask.dtype == torch.bool
    assert pir(out.cam, out.attention).refined.shape == (3, gh, gw)


@pytest.mark.parametrize("shots", [1, 2, 3])
@pytest.mark.parametrize(("query_size", "support_size"), [((64, 64), 64), ((48, 96), 80)])
def test_vvp_shapes(clip: ClipBundle, shots: int, query_size: tuple[int, int], support_size: int) -> None:
    query = pixels_of(rgb_images(2, *query_size))
    sup, labels = support_batch(2, shots, support_size)
    maps = vvp(clip, query, sup, labels)
    assert maps.shape == (2, 2 * shots, query_size[0] // PATCH, query_size[1] // PATCH)
    assert maps.dtype == torch.float32
    three = vvp(clip, query, sup, labels, config=PriorConfig(vvp_layers=(0, -1, 2)))
    assert three.shape[1] == 3 * shots


@pytest.mark.parametrize("batch", [1, 4])
def test_batch_sizes(clip: ClipBundle, text, batch: int) -> None:
    pixels = pixels_of(rgb_images(batch, 48, 64, seed=20))
    classes = [NAMES[i % len(NAMES)] for i in range(batch)]
    out = vtp(clip, pixels, classes, text=text, return_attention=True)
    assert out.cam.shape == (batch, 3, 4) and out.attention.shape == (batch, 12, 12)
    assert out.image_index.tolist() == list(range(batch))
    sup, labels = support_batch(batch, 2, 48)
    assert vvp(clip, pixels, sup, labels).shape == (batch, 4, 3, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(clip: ClipBundle, text) -> None:
    from clipprior.hooks import count_hooks

    gpu = ClipBundle(copy.deepcopy(clip.model).to("cuda"), clip.tokenizer, clip.source, clip.checksum)
    pixels = pixels_of(rgb_images(2, 64, 96, seed=21))
    sup, labels = support_batch(2, 2)
    cpu_out = vtp(clip, pixels, NAMES[:2], text=text, return_attention=True)
    gpu_out = vtp(gpu, pixels.cuda(), NAMES[:2], return_attention=True)
    assert gpu_out.cam.device.type == "cuda" and gpu_out.cam.dtype == torch.float32
    # cuDNN convolutions use TF32 by default (10-bit mantissa, like float16): the float16 bounds apply.
    u = ULP[torch.float16]
    torch.testing.assert_close(gpu_out.cam.cpu(), cpu_out.cam, atol=BOUNDS_IN_U["cam"] * u, rtol=0)
    torch.testing.assert_close(gpu_out.attention.cpu(), cpu_out.attention, atol=BOUNDS_IN_U["attention"] * u, rtol=0)
    refined = pir(gpu_out.cam, gpu_out.attention, output_size=(64, 96)).refined
    assert refined.device.type == "cuda"
    torch.testing.assert_close(refined.cpu(), pir(cpu_out.cam, cpu_out.attention, output_size=(64, 96)).refined,
                               atol=BOUNDS_IN_U["refined"] * u, rtol=0)
    torch.testing.assert_close(vvp(gpu, pixels.cuda(), sup.cuda(), labels.cuda()).cpu(),
                               vvp(clip, pixels, sup, labels), atol=BOUNDS_IN_U["vvp"] * u, rtol=0)
    assert count_hooks(gpu.model) == 0 and all(p.grad is None for p in gpu.model.parameters())


# ----------------------------------------------------------------------------------------------
# dtypes

# Tolerances, in units of the dtype's unit roundoff u (fp16: 2^-11 = 4.9e-4, bf16: 2^-8 = 3.9e-3),
# for the tiny model here (seed 0, 3 images of 64x96, 2 shots). Measured over six random models
# (half with logit scale 100): worst CAM 28u (fp16) / 27u (bf16) - a Grad-CAM differentiates a
# softmax, so the model's rounding is amplified in the gradient; mean CAM error 3u / 4u; refined
# prior 4u / 3.3u; VVP 1u / 1.3u; attention (computed in float32 from low-precision Q/K) 0.014u.
# The bounds below leave a factor >= 2 over the worst case measured.
ULP = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
BOUNDS_IN_U = {"cam": 64, "cam_mean": 8, "refined": 10, "vvp": 3, "attention": 0.05}


@pytest.fixture(scope="module")
def float32_reference(clip: ClipBundle, text):
    pixels = pixels_of(rgb_images(3, 64, 96, seed=5))
    sup, labels = support_batch(3, 2)
    out = vtp(clip, pixels, NAMES[:3], text=text, return_attention=True)
    return pixels, sup, labels, out, pir(out.cam, out.attention).refined, vvp(clip, pixels, sup, labels)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_models_give_float32_close_to_float32(clip: ClipBundle, float32_reference,
                                                            dtype: torch.dtype) -> None:
    pixels, sup, labels, ref, ref_refined, ref_vvp = float32_reference
    low = ClipBundle(copy.deepcopy(clip.model).to(dtype), clip.tokenizer, clip.source, clip.checksum)
    out = vtp(low, pixels, NAMES[:3], return_attention=True)  # text encoded by the low-precision model too
    refined = pir(out.cam, out.attention).refined
    maps = vvp(low, pixels, sup, labels)
    u = ULP[dtype]
    for name, got, want in (("cam", out.cam, ref.cam), ("attention", out.attention, ref.attention),
                            ("refined", refined, ref_refined), ("vvp", maps, ref_vvp)):
        assert got.dtype == torch.float32, name
        assert torch.isfinite(got).all(), name
        err = (got - want).abs().max().item()
        assert err <= BOUNDS_IN_U[name] * u, f"{name}: max error {err:.3g} = {err / u:.1f}u"
    assert (out.cam - ref.cam).abs().mean().item() <= BOUNDS_IN_U["cam_mean"] * u
    assert out.cam.min() >= 0 and out.cam.max() <= 1


# ----------------------------------------------------------------------------------------------
# Batching equals one-by-one


def test_vtp_batched_equals_one_by_one(clip: ClipBundle, text) -> None:
    pixels = pixels_of(rgb_images(3, 64, 96, seed=2))
    classes = ["cat", "dog", "bird avian", "cat", "person with clothes,people,human"]
    index = [0, 0, 1, 2, 2]
    context = [["dog"], ["cat", "bird avian"], [], ["dog"], []]
    out = vtp(clip, pixels, classes, image_index=index, context=context, text=text, return_attention=True,
              return_features=True)
    for p, (i, c) in enumerate(zip(index, classes, strict=True)):
        one = vtp(clip, pixels[i:i + 1], [c], context=[context[p]], text=text, return_attention=True,
                  return_features=True)
        torch.testing.assert_close(out.cam[p], one.cam[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.attention[p], one.attention[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.scores[p], one.scores[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.features[i], one.features[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.features, layer_features(clip, pixels, (-1, -2)), atol=1e-5, rtol=0)


def test_vtp_features_for_images_without_pairs(clip: ClipBundle, text) -> None:
    # Regression: with attention and features, images that have no pair re-ran the last layer
    # inside the attention recorder (RuntimeError, or a foreign map added silently).
    pixels = pixels_of(rgb_images(3, 64, 64, seed=3))
    out = vtp(clip, pixels, ["cat"], image_index=[1], text=text, return_attention=True, return_features=True)
    torch.testing.assert_close(out.features, layer_features(clip, pixels, (-1, -2)), atol=1e-5, rtol=0)
    alone = vtp(clip, pixels[1:2], ["cat"], text=text, return_attention=True)
    torch.testing.assert_close(out.attention, alone.attention, atol=1e-5, rtol=0)


def test_vvp_and_pir_batched_equal_one_by_one(clip: ClipBundle, text) -> None:
    pixels = pixels_of(rgb_images(3, 64, 80, seed=4))
    sup, labels = support_batch(3, 2)
    maps = vvp(clip, pixels, sup, labels)
    out = vtp(clip, pixels, NAMES[:3], text=text, return_attention=True)
    res = pir(out.cam, out.attention, output_size=(60, 75))
    for b in range(3):
        torch.testing.assert_close(maps[b:b + 1], vvp(clip, pixels[b:b + 1], sup[b:b + 1], labels[b:b + 1]),
                                   atol=1e-5, rtol=0)
        one = pir(out.cam[b:b + 1], out.attention[b:b + 1], output_size=(60, 75))
        torch.testing.assert_close(res.refined[b:b + 1], one.refined, atol=1e-5, rtol=0)  # bmm blocking
        assert torch.equal(res.box_mask[b:b + 1], one.box_mask)


# ----------------------------------------------------------------------------------------------
# Ranges and invariants


@pytest.mark.parametrize("seed", range(3))
def test_cam_and_refined_are_normalised(clip: ClipBundle, text, seed: int) -> None:
    pixels = pixels_of(rgb_images(2, 64, 96, seed=10 + seed))
    out = vtp(clip, pixels, NAMES[:2], text=text, return_attention=True)
    assert out.cam.min() >= 0
    assert all(p == 0 or 1 - 1e-5 <= p <= 1 for p in out.cam.flatten(1).max(dim=1).values.tolist())
    res = pir(out.cam, out.attention)
    assert res.refined.min() >= 0 and res.refined.max() <= 1
    # One (x - min) / (1e-7 + max) pass: the peak is M / (1e-7 + M), M the spread of R @ cam, which
    # is small for a random model (~1e-3), so the peak sits visibly below 1, as in the official code.
    spread = (res.refined_grid.flatten(1).max(1).values - res.refined_grid.flatten(1).min(1).values).double()
    torch.testing.assert_close(res.refined.flatten(1).max(1).values.double(), spread / (1e-7 + spread),
                               atol=1e-6, rtol=0)
    assert ((out.scores > 0) & (out.scores < 1)).all()


def test_vvp_range_and_normalisation(clip: ClipBundle) -> None:
    pixels = pixels_of(rgb_images(2, 64, 64, seed=6))
    sup, labels = support_batch(2, 3)
    maps = vvp(clip, pixels, sup, labels)
    # Cosines clipped from below at 0 by the zeroed background cells (every support has some).
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-6
    normed = vvp(clip, pixels, sup, labels, config=PriorConfig(vvp_normalize=True)).flatten(2)
    assert torch.allclose(normed.min(dim=2).values, torch.zeros(2, 6))
    assert torch.allclose(normed.max(dim=2).values, torch.ones(2, 6), atol=1e-5)


def test_permuting_supports_permutes_vvp_channels(clip: ClipBundle) -> None:
    pixels = pixels_of(rgb_images(1, 64, 64, seed=7))
    sup, labels = support_batch(1, 3)
    perm = [2, 0, 1]
    maps = vvp(clip, pixels, sup, labels)
    permuted = vvp(clip, pixels, sup[:, perm], labels[:, perm])
    layer_major = maps.reshape(1, 2, 3, *maps.shape[-2:])
    torch.testing.assert_close(permuted, layer_major[:, :, perm].reshape(maps.shape), atol=1e-6, rtol=0)
    # Channels: layer -1 for shots 1..K, then layer -2 for shots 1..K.
    for layer, k in ((-1, 0), (-2, 2)):
        single = vvp(clip, pixels, sup[:, k:k + 1], labels[:, k:k + 1], config=PriorConfig(vvp_layers=(layer,)))
        torch.testing.assert_close(maps[:, (0 if layer == -1 else 3) + k], single[:, 0], atol=1e-6, rtol=0)


def test_context_classes_join_the_softmax(clip: ClipBundle, text) -> None:
    pixels = pixels_of(rgb_images(1, 64, 64, seed=8))
    alone = vtp(clip, pixels, ["cat"], text=text)
    with_ctx = vtp(clip, pixels, ["cat"], context=[["dog", "bird avian"]], text=text)
    assert not torch.allclose(alone.cam, with_ctx.cam, atol=1e-3)
    assert with_ctx.scores[0] < alone.scores[0]  # more classes share the probability mass
    reordered = vtp(clip, pixels, ["cat"], context=[["bird avian", "dog", "cat"]], text=text)
    torch.testing.assert_close(reordered.cam, with_ctx.cam, atol=1e-6, rtol=0)  # order and the target repeated
    # The score is the target's softmax probability over [fg(set); bg(set)] at temperature 1/logit_scale.
    scale = float(clip.model.logit_scale.exp())
    same = vtp(clip, pixels, ["cat"], text=text, config=PriorConfig(logit_scale=scale))
    torch.testing.assert_close(same.cam, alone.cam, atol=0, rtol=0)
    hotter = vtp(clip, pixels, ["cat"], text=text, config=PriorConfig(logit_scale=scale / 10))
    assert not torch.allclose(hotter.scores, alone.scores, atol=1e-4)


def test_prompt_templates(clip: ClipBundle) -> None:
    config = PriorConfig(fg_template="a rendering of a {}.", bg_template="an empty scene without {}.")
    text = encode_text(clip, ["cat"], config)
    ids = clip.tokenizer(["a rendering of a cat.", "an empty scene without cat."], padding="max_length",
                         max_length=77, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        feats = clip.model.get_text_features(input_ids=ids)
    feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
    feats = feats / feats.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(text.fg[0], feats[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(text.bg[0], feats[1], atol=1e-5, rtol=0)
    pixels = pixels_of(rgb_images(1, 64, 64, seed=9))
    default = vtp(clip, pixels, ["cat"])
    custom = vtp(clip, pixels, ["cat"], config=config)
    assert not torch.allclose(default.scores, custom.scores, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# PIR knobs, against an independent NumPy reference


def pir_reference(cam: np.ndarray, attention: np.ndarray, iters: int, square: bool, threshold: float
                  ) -> np.ndarray:
    """PIR of one map written from the description (Sinkhorn, max(D, DD^T), [R@R], box mask, R@cam)."""
    h, w = cam.shape
    d = attention.astype(np.float64)
    for _ in range(iters):
        d = d / d.sum(axis=0, keepdims=True)
        d = d / d.sum(axis=1, keepdims=True)
    r = np.maximum(d, d @ d.T)
    if square:
        r = r @ r
    u8 = (cam * 255).astype(np.uint8)
    fg = u8 > int(threshold * int(u8.max()))
    labels, _ = ndimage.label(fg, structure=np.ones((3, 3)))
    box = np.zeros((h, w), dtype=bool)
    for rows, cols in ndimage.find_objects(labels):
        box[rows.start:min(rows.stop, h - 1), cols.start:min(cols.stop, w - 1)] = True
    return (r * box.reshape(1, -1)) @ cam.reshape(-1)


@pytest.mark.parametrize(("iters", "square", "threshold"),
                         [(1, True, 0.4), (1, False, 0.4), (0, True, 0.4), (3, False, 0.2), (2, True, 0.7)])
def test_pir_matches_reference(iters: int, square: bool, threshold: float) -> None:
    rng = np.random.default_rng(iters * 10 + square)
    cam = rng.random((2, 5, 7)).astype(np.float32) ** 3
    cam /= cam.reshape(2, -1).max(axis=1)[:, None, None]
    logits = rng.normal(size=(2, 35, 35))
    attention = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    config = PriorConfig(pir_sinkhorn_iters=iters, pir_square=square, pir_box_threshold=threshold)
    res = pir(torch.from_numpy(cam), torch.from_numpy(attention).float(), config=config)
    for p in range(2):
        expected = pir_reference(cam[p], attention[p], iters, square, threshold).reshape(5, 7)
        np.testing.assert_allclose(res.refined_grid[p].numpy(), expected, rtol=1e-4, atol=1e-6)
        normed = (expected - expected.min()) / (1e-7 + (expected - expected.min()).max())
        np.testing.assert_allclose(res.refined[p].numpy(), normed, atol=1e-5)


def test_pir_knobs_change_the_result(clip: ClipBundle, text) -> None:
    pixels = pixels_of(rgb_images(1, 96, 96, seed=11))
    out = vtp(clip, pixels, ["cat"], text=text, return_attention=True)
    base = pir(out.cam, out.attention).refined_grid
    # (A random model's attention is nearly uniform, so Sinkhorn converges at once: the knobs move the
    # result only slightly here; their exact effect is checked against the reference above.)
    for change in ({"pir_square": False}, {"pir_sinkhorn_iters": 0}, {"pir_sinkhorn_iters": 4}):
        assert not torch.equal(pir(out.cam, out.attention, config=PriorConfig(**change)).refined_grid, base), change
    mask = torch.ones_like(out.cam, dtype=torch.bool)
    assert torch.equal(pir(out.cam, out.attention, mask=mask).box_mask, mask)
    # The default window (8) is capped at a smaller model's depth; any other value must fit the model
    # (issue 13: pir_layers=99 used to be accepted silently).
    capped = vtp(clip, pixels, ["cat"], text=text, return_attention=True, config=PriorConfig())
    every = vtp(clip, pixels, ["cat"], text=text, return_attention=True, config=PriorConfig(pir_layers=LAYERS))
    torch.testing.assert_close(capped.attention, every.attention, atol=0, rtol=0)
    with pytest.raises(ConfigError, match=r"pir_layers=99 exceeds the model's 4 vision layers"):
        vtp(clip, pixels, ["cat"], text=text, return_attention=True, config=PriorConfig(pir_layers=99))
    one = vtp(clip, pixels, ["cat"], text=text, return_attention=True, config=PriorConfig(pir_layers=1))
    assert not torch.allclose(one.attention, every.attention)


def test_vvp_knobs(clip: ClipBundle) -> None:
    pixels = pixels_of(rgb_images(1, 64, 64, seed=12))
    sup, labels = support_batch(1, 2)
    base = vvp(clip, pixels, sup, labels)
    swapped = vvp(clip, pixels, sup, labels, config=PriorConfig(vvp_layers=(-2, -1)))
    torch.testing.assert_close(swapped, torch.cat([base[:, 2:], base[:, :2]], dim=1), atol=0, rtol=0)
    area = vvp(clip, pixels, sup, labels, config=PriorConfig(vvp_mask_resize="area"))
    assert area.shape == base.shape and not torch.equal(area, base)
    feats, grid_mask = support_features(clip, sup[0], labels[0])
    assert feats.shape == (2, 2, 16, 64) and grid_mask.dtype == torch.bool and grid_mask.shape == (2, 16)


def test_cam_normalisation_passes(clip: ClipBundle, text) -> None:
    pixels = pixels_of(rgb_images(1, 64, 64, seed=13))
    raw = vtp(clip, pixels, ["dog"], text=text, config=PriorConfig(cam_norm_passes=0)).cam
    once = vtp(clip, pixels, ["dog"], text=text, config=PriorConfig(cam_norm_passes=1)).cam
    torch.testing.assert_close(once, minmax_normalize(raw), atol=1e-6, rtol=0)
    torch.testing.assert_close(vtp(clip, pixels, ["dog"], text=text).cam, minmax_normalize(raw, passes=2),
                               atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------
# Laws of the small math (hypothesis)

_maps = arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(2, 9), st.integers(2, 9)),
               elements=st.floats(0, 1, width=32))


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 3), st.integers(1, 8)).map(lambda s: (s[0], s[1], s[1])),
              elements=st.floats(1e-3, 1e3)), st.integers(1, 5))
def test_sinkhorn_rows_sum_to_one(matrix: np.ndarray, iterations: int) -> None:
    out = sinkhorn(torch.from_numpy(matrix), iterations)
    torch.testing.assert_close(out.sum(-1), torch.ones(matrix.shape[:2], dtype=torch.float64))
    assert (out >= 0).all()
    assert torch.equal(sinkhorn(torch.from_numpy(matrix), 0), torch.from_numpy(matrix))


@settings(max_examples=80, deadline=None)
@given(_maps, st.floats(0, 0.95))
def test_box_mask_laws(cam: np.ndarray, threshold: float) -> None:
    mask, boxes = box_mask(torch.from_numpy(cam), threshold, return_boxes=True)
    mask = mask.numpy()
    _, h, w = cam.shape
    assert not mask[:, h - 1, :].any() and not mask[:, :, w - 1].any()
    for i in range(cam.shape[0]):
        union = np.zeros((h, w), dtype=bool)
        for x0, y0, x1, y1 in boxes[i]:
            union[y0:y1, x0:x1] = True
        assert np.array_equal(mask[i], union)  # the mask is the union of the boxes, nothing else
        u8 = (cam[i] * 255).astype(np.uint8)
        fg = u8 > int(threshold * int(u8.max()))
        inner = fg.copy()
        inner[h - 1, :] = inner[:, w - 1] = False
        assert not (inner & ~mask[i]).any()  # every foreground cell off the last row/col is covered
    higher = box_mask(torch.from_numpy(cam), min(0.99, threshold + 0.2)).numpy()
    assert not (higher & ~mask).any()  # a higher threshold gives a subset


def test_box_mask_of_zero_cam_is_empty() -> None:
    assert not box_mask(torch.zeros(2, 5, 6)).any()
    full = box_mask(torch.ones(1, 5, 6))[0]
    assert full[:4, :5].all() and not full[4].any() and not full[:, 5].any()


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6)),
              elements=st.floats(-1e3, 1e3)), st.integers(1, 3))
def test_minmax_normalize_range(x: np.ndarray, passes: int) -> None:
    out = minmax_normalize(torch.from_numpy(x), passes=passes).numpy()
    assert out.shape == x.shape
    assert (out >= 0).all() and (out <= 1).all()
    for i in range(x.shape[0]):
        spread = x[i].max() - x[i].min()
        if spread == 0:
            assert (out[i] == 0).all()
        elif spread > 1e-3:
            # each pass divides by (eps + max): the top value is s / (s + eps), not 1, for a small spread s
            top = float(spread)
            for _ in range(passes):
                top = top / (top + 1e-7)
            assert out[i].max() == pytest.approx(top, abs=1e-6)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 3), st.integers(1, 2))
def test_vvp_from_features_matches_a_loop(seed: int, shots: int, layers: int) -> None:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, layers, 6, 5, generator=g)
    s = torch.randn(2, shots, layers, 4, 5, generator=g)
    m = torch.rand(2, shots, 4, generator=g) > 0.4
    m[..., 0] = True
    maps = vvp_from_features(q, s, m, (2, 3))
    assert maps.shape == (2, layers * shots, 2, 3)
    for b in range(2):
        for li in range(layers):
            for k in range(shots):
                best = torch.full((6,), -2.0)
                for i in range(4):
                    sv = s[b, k, li, i] * m[b, k, i]
                    cos = (q[b, li] @ sv) / (q[b, li].norm(dim=-1) * sv.norm() + 1e-7)
                    best = torch.maximum(best, cos)
                torch.testing.assert_close(maps[b, li * shots + k].reshape(-1), best, atol=1e-5, rtol=0)
    assert maps.max() <= 1 + 1e-6


# ----------------------------------------------------------------------------------------------
# compute_priors, EpisodePriors


def test_compute_priors_end_to_end(clip: ClipBundle) -> None:
    query = rgb_images(1, 50, 70, seed=14)[0]
    supports = [rgb_images(1, 64, 64, seed=15)[0], rgb_images(1, 40, 90, seed=16)[0]]
    masks = [np.zeros((64, 64), np.uint8), np.zeros((40, 90), np.uint8)]
    masks[0][10:50, 20:40] = 1
    masks[1][5:30, 30:80] = 1
    masks[1][0, :] = 255
    pri = compute_priors(clip, query, "cat", supports, masks, context=["dog"])
    assert pri.cam.shape == pri.refined.shape == (4, 5) and pri.vvp.shape == (4, 4, 5)
    assert pri.image_size == (50, 70)
    assert pri.vvp.min() >= 0 and pri.vvp.max() <= 1 + 1e-6
    # The same numbers as the building blocks.
    out = vtp(clip, preprocess_query(query, PATCH)[None], ["cat"], context=[["dog"]], return_attention=True)
    torch.testing.assert_close(pri.cam, out.cam[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(pri.refined, pir(out.cam, out.attention).refined[0], atol=1e-6, rtol=0)
    # Shots are independent and keep their order, each at its own size: layer-major channels.
    for k in range(2):
        alone = compute_priors(clip, query, "cat", [supports[k]], [masks[k]], context=["dog"])
        torch.testing.assert_close(pri.vvp[[k, 2 + k]], alone.vvp, atol=1e-6, rtol=0)
    big = pri.resized()
    assert big.cam.shape == big.refined.shape == (50, 70) and big.vvp.shape == (4, 50, 70)
    small = pri.resized((20, 30))
    assert small.vvp.shape == (4, 20, 30) and small.image_size == (50, 70)
    assert compute_priors(clip, query, "cat").vvp is None
    # each prior kind of the cache format names one of its maps
    from clipprior.cache import MAP_KINDS, PRIORS
    from clipprior.errors import InvalidInputError

    assert all(a is b for a, b in zip([pri.of(k) for k in PRIORS], [pri.cam, pri.refined, pri.vvp], strict=True))
    with pytest.raises(InvalidInputError, match="not a prior"):
        pri.of(next(k for k in MAP_KINDS if not k.prior))


def test_compute_priors_imagenet_norm_for_vvp(clip: ClipBundle) -> None:
    query = rgb_images(1, 64, 64, seed=17)[0]
    support, mask = rgb_images(1, 64, 64, seed=18)[0], np.zeros((64, 64), np.uint8)
    mask[8:40, 8:40] = 1
    official = compute_priors(clip, query, "cat", [support], [mask], config=get_preset("official"),
                              query_label=np.zeros((64, 64), np.uint8), class_names=["cat"])  # no other class
    expected = vvp(clip, normalize(query, "imagenet")[None], normalize(support, "imagenet")[None, None],
                   torch.from_numpy(mask).long()[None, None])
    torch.testing.assert_close(official.vvp, expected[0], atol=1e-6, rtol=0)
    default = compute_priors(clip, query, "cat", [support], [mask])
    torch.testing.assert_close(default.cam, official.cam, atol=0, rtol=0)
    assert not torch.allclose(default.vvp, official.vvp)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK"])
def test_compute_priors_converts_image_modes(clip: ClipBundle, mode: str) -> None:
    rgb = Image.fromarray(rgb_images(1, 64, 64, seed=19)[0])
    image = rgb.convert(mode)
    support_mask = np.zeros((64, 64), np.uint8)
    support_mask[16:48, 16:48] = 1
    got = compute_priors(clip, image, "cat", [image], [support_mask])
    want = compute_priors(clip, np.asarray(image.convert("RGB")), "cat", [np.asarray(image.convert("RGB"))],
                          [support_mask])
    torch.testing.assert_close(got.refined, want.refined, atol=0, rtol=0)
    torch.testing.assert_close(got.vvp, want.vvp, atol=0, rtol=0)


def test_episode_priors_resized() -> None:
    pri = EpisodePriors(cam=torch.rand(3, 4), refined=torch.rand(3, 4), vvp=torch.rand(6, 3, 4), image_size=(30, 41))
    big = pri.resized()
    assert big.cam.shape == (30, 41) and big.refined.shape == (30, 41) and big.vvp.shape == (6, 30, 41)
    assert torch.equal(pri.resized((3, 4)).cam, pri.cam)  # already that size: unchanged
    none = EpisodePriors(cam=torch.rand(3, 4), refined=torch.rand(3, 4), vvp=None, image_size=(8, 8)).resized()
    assert none.vvp is None and none.cam.shape == (8, 8)


# ----------------------------------------------------------------------------------------------
# Bad input: one clear InvalidInputError naming the problem


def _bad_cases(clip: ClipBundle) -> dict[str, tuple[Callable[[], object], str]]:
    x = torch.zeros(1, 3, 64, 64)
    sup, labels = support_batch(1, 2)
    empty = labels.clone()
    empty[0, 1] = 0
    nan = x.clone()
    nan[0, 0, 3, 3] = float("nan")
    inf = sup.clone()
    inf[0, 1, 2, 5, 5] = float("inf")
    cam = torch.rand(1, 4, 4)
    att = torch.rand(1, 16, 16)
    image = rgb_images(1, 64, 64)[0]
    mask = np.ones((64, 64), np.uint8)
    return {
        "empty-support-mask": (lambda: vvp(clip, x, sup, empty), r"no foreground pixel \(label == 1\)"),
        "empty-support-mask-images": (lambda: compute_priors(clip, image, "cat", [image], [0 * mask]),
                                      r"no foreground pixel"),
        "mask-size-mismatch": (lambda: vvp(clip, x, sup, labels[..., :60, :]),
                               r"support mask of size .*does not match"),
        "mask-size-mismatch-images": (lambda: compute_priors(clip, image, "cat", [image], [mask[:50]]),
                                      r"support mask of size \(50, 64\) does not match its image of size \(64, 64\)"),
        "support-count-mismatch": (lambda: compute_priors(clip, image, "cat", [image, image], [mask]),
                                   r"2 support images but 1 support masks"),
        "empty-class-list": (lambda: vtp(clip, x, []), r"empty class list"),
        "empty-class-list-text": (lambda: encode_text(clip, []), r"empty class list"),
        "blank-class-name": (lambda: encode_text(clip, ["cat", " "]), r"non-empty strings"),
        "image-smaller-than-patch": (lambda: vtp(clip, torch.zeros(1, 3, 8, 64), ["cat"]),
                                     r"8x64 pixels is smaller than one 16x16 patch"),
        "query-smaller-than-patch": (lambda: vvp(clip, torch.zeros(1, 3, 64, 10), sup, labels),
                                     r"smaller than one 16x16 patch"),
        "image-smaller-than-patch-images": (lambda: compute_priors(clip, image[:12, :12], "cat"),
                                            r"12x12 pixels is smaller than one 16x16 patch"),
        "nan-pixels": (lambda: vtp(clip, nan, ["cat"]), r"pixel_values contains NaN or Inf"),
        "inf-supports": (lambda: vvp(clip, x, inf, labels), r"supports contains NaN or Inf"),
        "nan-query-vvp": (lambda: vvp(clip, nan, sup, labels), r"contains NaN or Inf"),
        "nan-cam": (lambda: pir(cam.masked_fill(cam > 0.5, float("nan")), att), r"cam contains NaN or Inf"),
        "inf-attention": (lambda: pir(cam, att.masked_fill(att > 0.5, float("inf"))), r"attention contains NaN or Inf"),
        "nan-image-array": (lambda: compute_priors(clip, np.full((32, 32, 3), np.nan), "cat"), r"NaN or Inf"),
        "pir-shape": (lambda: pir(cam, torch.rand(1, 15, 15)), r"attention must be \(P, h\*w, h\*w\)"),
        "pir-cam-ndim": (lambda: pir(cam[0], att), r"cam must be \(P, h, w\)"),
        "grayscale-tensor": (lambda: vtp(clip, torch.zeros(1, 1, 64, 64), ["cat"]), r"must be a \(B, 3, H, W\)"),
        "empty-batch": (lambda: vtp(clip, torch.zeros(0, 3, 64, 64), ["cat"]), r"empty batch"),
        "classes-vs-images": (lambda: vtp(clip, torch.zeros(2, 3, 64, 64), ["cat"]),
                              r"1 classes for 2 images; pass image_index"),
        "bad-image-index": (lambda: vtp(clip, x, ["cat"], image_index=[1]), r"image_index \[1\] must hold"),
        "context-length": (lambda: vtp(clip, x, ["cat"], context=[[], []]), r"context has 2 entries"),
        "unknown-class-in-text": (lambda: vtp(clip, x, ["zebra"], text=encode_text(clip, ["cat"])),
                                  r"class 'zebra' is not among the encoded"),
        "layer-out-of-range": (lambda: layer_features(clip, x, (7,)), r"layer 7 does not exist in a 4-layer"),
        "vvp-shapes": (lambda: vvp(clip, x, sup[0], labels), r"supports must be \(B, K, 3, H, W\)"),
        "vvp-batch": (lambda: vvp(clip, torch.zeros(2, 3, 64, 64), sup, labels), r"batch/shot sizes disagree"),
        "image-array-shape": (lambda: compute_priors(clip, np.zeros((32, 32, 2), np.uint8), "cat"),
                              r"shape \(32, 32, 2\) is not an image"),
    }


BAD_CASES = [
    "empty-support-mask", "empty-support-mask-images", "mask-size-mismatch", "mask-size-mismatch-images",
    "support-count-mismatch", "empty-class-list", "empty-class-list-text", "blank-class-name",
    "image-smaller-than-patch", "query-smaller-than-patch", "image-smaller-than-patch-images", "nan-pixels",
    "inf-supports", "nan-query-vvp", "nan-cam", "inf-attention", "nan-image-array", "pir-shape", "pir-cam-ndim",
    "grayscale-tensor", "empty-batch", "classes-vs-images", "bad-image-index", "context-length",
    "unknown-class-in-text", "layer-out-of-range", "vvp-shapes", "vvp-batch", "image-array-shape",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_raises_a_clear_error(clip: ClipBundle, case: str) -> None:
    call, pattern = _bad_cases(clip)[case]
    with pytest.raises(InvalidInputError, match=pattern) as info:
        call()
    assert isinstance(info.value, ValueError)


def test_bad_case_list_is_complete(clip: ClipBundle) -> None:
    assert sorted(_bad_cases(clip)) == sorted(BAD_CASES)


@pytest.mark.parametrize("size", [(16, 16), (16, 100), (33, 17)])
def test_smallest_images(clip: ClipBundle, text, size: tuple[int, int]) -> None:
    # One patch is the smallest legal image: a 1-cell grid (the CAM is then all zero).
    pixels = preprocess_query(rgb_images(1, *size)[0], PATCH)[None]
    out = vtp(clip, pixels, ["cat"], text=text, return_attention=True)
    assert out.cam.shape == (1, math.ceil(size[0] / PATCH), math.ceil(size[1] / PATCH))
    assert torch.isfinite(pir(out.cam, out.attention, output_size=size).refined).all()
