"""The one home of resizing and padding (clipprior._resize) and the modules that use it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clipprior._resize import pad, resize_bilinear, resize_nearest


@pytest.mark.parametrize("shape", [(5, 7), (3, 5, 7), (2, 3, 5, 7)])
@pytest.mark.parametrize("exact", [True, False])
def test_nearest_matches_interpolate_per_plane_and_keeps_values(shape: tuple[int, ...], exact: bool) -> None:
    x = torch.randint(0, 21, shape).float()
    out = resize_nearest(x, (11, 4), exact=exact)
    planes = x.reshape(-1, 1, *shape[-2:])
    mode = "nearest-exact" if exact else "nearest"
    expected = torch.cat([F.interpolate(p[None], size=(11, 4), mode=mode)[0] for p in planes])
    assert out.shape == (*shape[:-2], 11, 4) and torch.equal(out.reshape(-1, 11, 4), expected.reshape(-1, 11, 4))
    assert set(out.unique().tolist()) <= set(x.unique().tolist())


def test_nearest_floor_rule_and_integer_labels() -> None:
    label = torch.tensor([[1, 2, 255]], dtype=torch.int64)
    assert resize_nearest(label, (1, 4), exact=False).tolist() == [[1, 1, 2, 255]]  # floor(i * 3 / 4)
    assert resize_nearest(label, (1, 4), exact=False).dtype == torch.int64
    assert resize_nearest(label, (1, 3)) is label


def test_pad_scalar_and_per_channel_fill() -> None:
    x = torch.ones(2, 2, 3)
    out = pad(x, 1, 0, 0, 2, fill=[5.0, 7.0])
    assert out.shape == (2, 3, 5) and out[0, 0].tolist() == [5.0] * 5 and out[1, :, 3:].unique().tolist() == [7.0]
    assert torch.equal(out[:, 1:, :3], x)
    flat = pad(torch.zeros(2, 2, dtype=torch.uint8), 0, 1, 1, 0, fill=255)
    assert flat.dtype == torch.uint8 and flat.tolist() == [[255, 0, 0], [255, 0, 0], [255, 255, 255]]


def test_bilinear_is_per_plane_interpolate() -> None:
    x = torch.rand(3, 4, 6)
    expected = F.interpolate(x[None], size=(8, 9), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(resize_bilinear(x, (8, 9)), expected)


@pytest.mark.parametrize("size", [(40, 56), (7, 9), (5, 3), (13, 17)])
def test_support_grid_mask_is_the_floor_rule_it_was(size: tuple[int, int]) -> None:
    """priors._grid_mask's "nearest" (vvp_mask_resize) resizes with resize_nearest(exact=False), bit for bit."""
    from clipprior.priors import _grid_mask

    labels = torch.randint(0, 3, (4, 40, 56))
    labels[:, :2] = 255
    old = F.interpolate((labels == 1).float()[:, None], size=size, mode="nearest")[:, 0].reshape(4, -1) > 0
    assert torch.equal(_grid_mask(labels, size, "nearest"), old)


def test_no_other_module_resizes_maps_itself() -> None:
    """transforms, preprocess, viz, the priors and the cache reader resize through clipprior._resize."""
    root = Path(__file__).parents[1] / "clipprior"
    for name in ("transforms.py", "preprocess.py", "viz.py", "cache/_read.py", "priors.py"):
        tree = ast.parse((root / name).read_text(encoding="utf-8"))
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                 and n.func.attr == "interpolate"]
        assert not calls, name
