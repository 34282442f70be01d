"""Shared fixtures: tiny random CLIPs (no download anywhere), the reference directory, a synthetic VOC."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
TOKENIZER_DIR = SHARED / "reference" / "clip-tokenizer"


def reference_dir() -> Path:
    """Directory of the parity cases (``CLIPPRIOR_REFERENCE_DIR`` or ../shared/reference/parity)."""
    return Path(os.environ.get("CLIPPRIOR_REFERENCE_DIR", SHARED / "reference" / "parity"))


def tiny_clip_config(
    *, vision_width: int = 64, vision_layers: int = 4, heads: int = 2, patch: int = 16, image_size: int = 64,
    text_width: int = 32, text_layers: int = 2, projection: int = 32,
) -> CLIPConfig:
    """A CLIPConfig small enough to run in milliseconds on a CPU."""
    return CLIPConfig(
        text_config={
            "hidden_size": text_width, "intermediate_size": 4 * text_width, "num_hidden_layers": text_layers,
            "num_attention_heads": max(1, text_width // 32), "max_position_embeddings": 77,
            "vocab_size": 49408, "hidden_act": "quick_gelu", "bos_token_id": 49406, "eos_token_id": 49407,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": vision_width, "intermediate_size": 4 * vision_width,
            "num_hidden_layers": vision_layers, "num_attention_heads": heads, "patch_size": patch,
            "image_size": image_size, "hidden_act": "quick_gelu",
        },
        projection_dim=projection,
    )


def make_tiny_clip(seed: int = 0, **kwargs: int) -> CLIPModel:
    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(**kwargs)).eval()
    return model


@pytest.fixture(scope="session")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"))


@pytest.fixture(scope="session")
def tiny_clip() -> CLIPModel:
    return make_tiny_clip()


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory, tiny_clip: CLIPModel, tokenizer: CLIPTokenizer) -> Path:
    """A tiny random CLIP saved with ``save_pretrained`` (model + tokenizer), usable as ``--model``."""
    path = tmp_path_factory.mktemp("tiny-clip")
    tiny_clip.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip(tiny_clip_dir: Path):  # -> clipprior.ClipBundle
    """The tiny random CLIP loaded on the CPU, once per test module (modules may define their own)."""
    from clipprior import load_clip

    return load_clip(tiny_clip_dir, device="cpu")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic PASCAL-5i (3 images per class, 72x100), written once per test module (tests may damage it)."""
    from clipprior.data.synthetic import write_synthetic_pascal

    return write_synthetic_pascal(tmp_path_factory.mktemp("voc"), per_class=3, size=(72, 100))


def precompute_args(data_root: Path, model: Path | str, out: Path, *extra: str) -> list[str]:
    """``clipprior precompute`` of 12 PASCAL-5i fold-0 val episodes (seed 5) with ``model`` on the CPU, and ``extra``.

    Positions 0-4 are ``precompute --dataset pascal5i --fold 0`` (tests swap the fold by slicing).
    """
    return ["precompute", "--dataset", "pascal5i", "--fold", "0", "--data-root", str(data_root), "--model",
            str(model), "--device", "cpu", "--episodes", "12", "--seed", "5", "--out", str(out), *extra]
