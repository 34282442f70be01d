"""Golden tests against the official PI-CLIP outputs (../shared/reference/parity or $CLIPPRIOR_REFERENCE_DIR).

Every ``vtp_*.npz`` and ``vvp_*.npz`` in the directory is checked with the weights and ``text.npz``
found beside them, through clipprior's own OpenAI -> CLIPModel conversion.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from clipprior import get_preset, load_clip
from clipprior.preprocess import preprocess_query
from clipprior.priors import box_mask, encode_text, pir, vtp, vvp
from tests.conftest import reference_dir

REF = reference_dir()
TOL = 1e-4
TEXT_TOL = 1e-5
CONFIG = get_preset("official")



def _weights(ref: Path) -> Path:
    candidates = sorted(ref.glob("*.safetensors")) + sorted(ref.glob("*.pt"))
    if not candidates:
        raise FileNotFoundError(f"no OpenAI-layout weights in {ref}")
    return candidates[0]


def _cases(pattern: str) -> list[tuple[str, int]]:
    out = []
    for path in sorted(REF.glob(pattern)):
        with np.load(path) as data:
            out += [(path.name, k) for k in range(int(data["n"]))]
    return out


@pytest.fixture(scope="module")
def clip():
    return load_clip(_weights(REF), device="cpu")


@pytest.fixture(scope="module")
def text_ref():
    with np.load(REF / "text.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def names(text_ref):
    return [str(n) for n in text_ref["class_names"]]


@pytest.fixture(scope="module")
def text(clip, names):
    return encode_text(clip, names, CONFIG)


def test_reference_has_cases():
    assert _cases("vtp_*.npz"), f"no vtp cases in {REF}"
    assert _cases("vvp_*.npz"), f"no vvp cases in {REF}"


@pytest.mark.parametrize("side", ["fg", "bg"])
def test_text_features_from_token_ids(clip, text_ref, side):
    ids = torch.as_tensor(text_ref[f"{side}_input_ids"]).long()
    from clipprior.priors import _as_text_output, _eager_text_attention

    with torch.no_grad(), _eager_text_attention(clip.model):
        feats = _as_text_output(clip.model.get_text_features(input_ids=ids)).float()
    feats = feats / feats.norm(dim=-1, keepdim=True)
    np.testing.assert_allclose(feats.numpy(), text_ref[f"{side}_text_features"], atol=TEXT_TOL, rtol=0)


def test_tokenizer_gives_reference_ids(clip, text_ref, names):
    for side, template in (("fg", CONFIG.fg_template), ("bg", CONFIG.bg_template)):
        ids = clip.tokenizer([template.format(n) for n in names], padding="max_length", max_length=77)["input_ids"]
        ref = text_ref[f"{side}_input_ids"]
        for row, ref_row in zip(ids, ref, strict=True):
            n = int(np.argmax(ref_row == 49407)) + 1
            assert list(row[:n]) == list(ref_row[:n])


def test_encoded_text_features(text, text_ref):
    np.testing.assert_allclose(text.fg.numpy(), text_ref["fg_text_features"], atol=TEXT_TOL, rtol=0)
    np.testing.assert_allclose(text.bg.numpy(), text_ref["bg_text_features"], atol=TEXT_TOL, rtol=0)


@pytest.mark.parametrize(("file", "k"), _cases("vtp_*.npz"))
def test_vtp_pir_parity(clip, text, names, file, k):
    with np.load(REF / file) as data:
        case = {key.split("_", 1)[1]: data[key] for key in data.files if key.startswith(f"{k}_")}
    target = int(case["target"])
    context = [[names[int(i)] for i in case["present"] if int(i) != target]]
    pixels = preprocess_query(case["image"], clip.patch_size)[None]
    out = vtp(clip, pixels, [names[target]], context=context, text=text, config=CONFIG, return_attention=True)
    np.testing.assert_allclose(out.cam[0].numpy(), case["cam"], atol=TOL, rtol=0)

    expected_mask = np.zeros(case["cam"].shape, dtype=bool)
    for x0, y0, x1, y1 in case["boxes"]:
        expected_mask[y0:y1, x0:x1] = True
    mask = box_mask(out.cam, CONFIG.pir_box_threshold)[0].numpy()
    np.testing.assert_array_equal(mask, expected_mask)

    res = pir(out.cam, out.attention, config=CONFIG, output_size=case["refined"].shape)
    np.testing.assert_allclose(res.refined_grid[0].numpy(), case["refined_grid"], atol=TOL, rtol=0)
    np.testing.assert_allclose(res.refined[0].numpy(), case["refined"], atol=TOL, rtol=0)


@pytest.mark.parametrize(("file", "k"), _cases("vvp_*.npz"))
def test_vvp_parity(clip, file, k):
    with np.load(REF / file) as data:
        case = {key.split("_", 1)[1]: data[key] for key in data.files if key.startswith(f"{k}_")}
    query = torch.from_numpy(case["x"])
    supports = torch.from_numpy(case["s_x"])
    labels = torch.from_numpy(case["masks"]).long()[None]
    maps = vvp(clip, query, supports, labels, config=CONFIG)
    np.testing.assert_allclose(maps[0].numpy(), case["vvp"], atol=TOL, rtol=0)
