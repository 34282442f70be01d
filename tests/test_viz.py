"""Rendering: colormaps, overlays, panels, bundled photos, and the HTML index in headless Chromium."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clipprior.photos as photos_module
import clipprior.viz as viz
from clipprior.errors import InvalidInputError
from clipprior.photos import flip_crop, list_photos, load_photo
from clipprior.viz import (
    COLORMAPS,
    HtmlEntry,
    Tile,
    colorbar,
    colorize,
    compose_panel,
    episode_panel,
    episode_row,
    heatmap_overlay,
    mask_contour,
    mask_overlay,
    resize_map,
    write_html_index,
)
from tests._browser import check_page_in_chromium

PHOTO_DIR = Path(photos_module.__file__).parent / "assets" / "photos"


@pytest.mark.parametrize("module", [viz, photos_module])
def test_doctests_pass(module: object) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)  # type: ignore[arg-type]
    assert result.attempted > 0 and result.failed == 0


# ----------------------------------------------------------------------------------------- colours


@pytest.mark.parametrize("name", sorted(COLORMAPS))
def test_colormaps_are_256_rgb_entries_and_ordered(name: str) -> None:
    lut = COLORMAPS[name]
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    assert len({tuple(c) for c in lut}) > 100  # a real ramp, not a handful of colours
    if name == "gray":
        assert (np.diff(lut[:, 0].astype(int)) >= 0).all()


def test_jet_endpoints_and_middle() -> None:
    out = colorize(np.array([[0.0, 0.5, 1.0]]), "jet")[0]
    assert out[0].tolist() == [0, 0, 128]  # dark blue
    assert out[2].tolist() == [128, 0, 0]  # dark red
    assert out[1][1] == 255  # green is full in the middle


def test_colorize_clips_and_handles_nan() -> None:
    out = colorize(np.array([[-3.0, np.nan, 7.0]]), "gray")[0]
    assert out.tolist() == [[0, 0, 0], [0, 0, 0], [255, 255, 255]]
    with pytest.raises(InvalidInputError, match="unknown colormap"):
        colorize(np.zeros((2, 2)), "viridis")
    with pytest.raises(InvalidInputError, match="vmax"):
        colorize(np.zeros((2, 2)), vmin=1, vmax=1)


def test_heatmap_overlay_resizes_the_map_and_blends() -> None:
    image = np.full((32, 48, 3), 200, np.uint8)
    prior = torch.zeros(2, 3)  # patch grid, torch input
    out = heatmap_overlay(image, prior, alpha=0.5, cmap="jet")
    assert out.shape == (32, 48, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [100, 100, 164]  # (200 + (0, 0, 128)) / 2
    assert heatmap_overlay(image, prior, alpha=0.0).tolist() == image.tolist()
    with pytest.raises(InvalidInputError, match="alpha"):
        heatmap_overlay(image, prior, alpha=2.0)


def test_resize_map_is_bilinear_and_keeps_constants() -> None:
    assert np.allclose(resize_map(np.full((3, 5), 0.25), (30, 50)), 0.25)
    up = resize_map(np.array([[0.0, 1.0]]), (1, 4))
    assert np.allclose(up, [[0.0, 0.25, 0.75, 1.0]])


def test_mask_overlay_and_contour() -> None:
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    band = mask_contour(mask, 2)
    assert band.sum() == 100 - 36 and not band[~mask].any()
    out = mask_overlay(np.zeros((20, 20, 3), np.uint8), mask, color=(0, 200, 255), alpha=0.5, contour_width=2)
    assert out[0, 0].tolist() == [0, 0, 0]  # outside untouched
    assert out[10, 10].tolist() == [0, 100, 128]  # tinted inside (rounded half)
    assert out[5, 5].tolist() == [0, 200, 255]  # contour
    with pytest.raises(InvalidInputError, match="resize it"):
        mask_overlay(np.zeros((10, 10, 3), np.uint8), mask)


def test_colorbar_has_the_strip_high_on_top() -> None:
    bar = np.asarray(colorbar(100, cmap="gray", label=None))
    column = bar[:, 5, 0].astype(int)
    strip = column[(column > 0) & (column < 255)]
    assert strip.size > 80 and strip[1] > 240 > 15 > strip[-2]  # bright (1.0) at the top, inside the outline


# ------------------------------------------------------------------------------------------ panels


def _rows(tile_height: int) -> Image.Image:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)
    prior = rng.random((4, 6))
    row1 = episode_row(image, {"VVP": prior, "VTP raw": prior, "VTP refined": prior},
                       query_mask=prior.repeat(15, 0).repeat(15, 1) > 0.5, supports=[image],
                       support_masks=[np.ones((60, 90), bool)], class_name="cat")
    row2 = episode_row(image[:, :60], {"VTP raw": prior}, class_name="dog")
    return compose_panel([row1, row2], title="t", row_labels=["cat", "dog"], caption="c", tile_height=tile_height)


def test_panel_geometry_scales_with_tile_height() -> None:
    small, big = _rows(100), _rows(150)
    assert small.mode == big.mode == "RGB"
    assert big.height - small.height == 2 * 50  # two rows of pictures, everything else fixed
    # the widest row has 5 pictures of aspect 1.5: widths grow by 5 * 1.5 * 50 (up to rounding)
    assert abs((big.width - small.width) - 5 * 75) <= 5


def test_episode_row_reports_iou_and_skips_missing_priors() -> None:
    image = np.zeros((32, 32, 3), np.uint8)
    label = np.zeros((32, 32), np.uint8)
    label[:16] = 3
    label[16:20] = 255
    prior = np.zeros((32, 32))
    prior[:16] = 1.0
    tiles = episode_row(image, {"VVP": None, "VTP": prior}, query_mask=label, class_id=3)
    assert [t.title for t in tiles] == ["Query", "VTP"]
    assert tiles[1].subtitle == "IoU@0.5 = 100.0"
    with pytest.raises(InvalidInputError, match="support masks"):
        episode_row(image, {}, supports=[image, image], support_masks=[label])


def test_compose_panel_rejects_empty_input() -> None:
    with pytest.raises(InvalidInputError, match="nothing to draw"):
        compose_panel([])
    with pytest.raises(InvalidInputError, match="row labels"):
        compose_panel([[Tile(np.zeros((4, 4, 3), np.uint8))]], row_labels=["a", "b"])


def test_episode_panel_png_round_trip(tmp_path: Path) -> None:
    photo = load_photo("chelsea")
    prior = resize_map(photo.mask.astype(np.float32), (17, 26))
    panel = episode_panel(photo.image, {"VTP raw": prior, "VTP refined": prior}, query_mask=photo.mask,
                          supports=[photo.image], support_masks=[photo.mask], class_name="cat", tile_height=120)
    path = tmp_path / "panel.png"
    panel.save(path)
    with Image.open(path) as png:
        png.verify()
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == panel.size and png.height > 120
        pixels = np.asarray(png.convert("RGB"))
    assert pixels.std() > 20  # not blank


# ----------------------------------------------------------------------------------------- photos


def test_bundled_photos_and_masks() -> None:
    names = list_photos()
    assert names == ["astronaut", "cameraman", "chelsea", "coffee"]
    total = sum(p.stat().st_size for p in PHOTO_DIR.iterdir())
    assert total < 300_000
    sources = (PHOTO_DIR / "SOURCES.md").read_text()
    for name in names:
        photo = load_photo(name)
        assert photo.image.dtype == np.uint8 and photo.image.ndim == 3 and photo.image.shape[2] == 3
        assert photo.mask.shape == photo.image.shape[:2] and photo.mask.dtype == bool
        assert 0.05 < photo.mask.mean() < 0.95  # a real object outline
        assert photo.license and photo.source
        assert f"`{name}.jpg`" in sources and ("CC0" in photo.license or "public domain" in photo.license.lower())
    with pytest.raises(InvalidInputError, match="no bundled photo"):
        load_photo("lena")


def test_flip_crop_transforms_image_and_mask_alike() -> None:
    photo = load_photo("coffee")
    view = flip_crop(photo, (0.0, 0.0, 0.5, 1.0))
    w = photo.image.shape[1]
    assert view.image.shape[1] == w // 2
    assert np.array_equal(view.image, photo.image[:, ::-1][:, : w // 2])
    assert np.array_equal(view.mask, photo.mask[:, ::-1][:, : w // 2])
    with pytest.raises(InvalidInputError, match="crop box"):
        flip_crop(photo, (0.5, 0.0, 0.4, 1.0))


# -------------------------------------------------------------------------------------------- HTML


def _write_index(tmp_path: Path, n: int = 3) -> Path:
    site = tmp_path / "site"
    (site / "episodes").mkdir(parents=True)
    entries = []
    photo = load_photo("astronaut")
    for i in range(n):
        prior = np.roll(resize_map(photo.mask.astype(np.float32), (24, 24)), i * 3, axis=1)
        panel = episode_panel(photo.image, {"VTP raw": prior}, query_mask=photo.mask, class_name="person",
                              tile_height=160, title=f"episode {i}")
        path = site / "episodes" / f"episode_{i:05d}.png"
        panel.save(path)
        entries.append(HtmlEntry(path, f"episode {i}: person", "person", {"IoU": f"{i}.0"}))
    return write_html_index(site, entries, title="test index", meta={"dataset": "synthetic"},
                            summary=[["prior", "mIoU"], ["VTP raw", "12.3"]])


def test_html_index_is_self_contained_with_relative_images(tmp_path: Path) -> None:
    page = _write_index(tmp_path)
    text = page.read_text()
    sources = re.findall(r'<img src="([^"]+)"', text)
    assert sources == [f"episodes/episode_{i:05d}.png" for i in range(3)]
    assert all((page.parent / s).is_file() for s in sources)
    assert "http://" not in text and "https://" not in text  # no external resources
    assert "<th>mIoU</th>" in text and "synthetic" in text


def test_html_index_escapes_text(tmp_path: Path) -> None:
    page = write_html_index(tmp_path, [HtmlEntry("a.png", "<script>x</script>", "g", {"k": "a&b"})])
    text = page.read_text()
    assert "<script>x</script>" not in text and "&lt;script&gt;" in text and "a&amp;b" in text


def test_html_index_opens_in_headless_chromium_and_shows_its_images(tmp_path: Path) -> None:
    page = _write_index(tmp_path)
    loaded, shot = check_page_in_chromium(page, tmp_path / "browser")
    assert loaded == (3, 3)
    assert shot.shape[:2] == (900, 1280)
    # the panels' jet heat maps put saturated colours on the page: a blank or broken page has none
    saturated = (shot.max(axis=2).astype(int) - shot.min(axis=2)) > 120
    assert saturated.mean() > 0.01


def test_cached_episode_panel_draws_the_episode_in_the_papers_order(tmp_path: Path) -> None:
    from clipprior.cache import PriorCache
    from clipprior.evaluate import load_episode
    from clipprior.viz import cached_episode_panel
    from tests._synthetic_priors import make_synthetic_cache

    path, root = make_synthetic_cache(tmp_path, fold=0, n_episodes=2)
    with PriorCache(path) as cache:
        record = cache.episodes[1]
        data = load_episode(cache, record, root)
        bare = load_episode(cache, record, root, images=False)
    panel = cached_episode_panel(data, "bird", tile_height=64, threshold=0.5)
    label = data.support_labels[0]
    mask = np.where(label == record.class_id, 1, 0)
    row = episode_row(data.query, {"VVP": data.priors["vvp"], "VTP raw": data.priors["vtp_raw"],
                                   "VTP refined": data.priors["vtp_refined"]},
                      query_mask=data.label, class_id=record.class_id, supports=data.supports,
                      support_masks=[mask], class_name="bird", threshold=0.5)
    caption = f"query {record.query_image}; supports {', '.join(record.support_images)}"
    expected = compose_panel([row], title=f"episode {record.index}: bird (class {record.class_id})",
                             caption=caption, tile_height=64)
    np.testing.assert_array_equal(np.asarray(panel), np.asarray(expected))
    with pytest.raises(InvalidInputError, match="images=True"):
        cached_episode_panel(bare, "bird")
