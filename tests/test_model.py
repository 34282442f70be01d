"""load_clip on every source it accepts (tiny random CLIPs, nothing downloaded) and its error messages."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPModel, CLIPTokenizer

from clipprior import DEFAULT_MODEL, ModelLoadError, WeightsNotFoundError, load_clip
from clipprior.errors import InvalidInputError
from clipprior.model import clip_config_from_openai, convert_openai_state_dict, load_openai_state_dict
from tests.conftest import make_tiny_clip, reference_dir

PROMPTS = ["a photo of cat.", "a photo without person with clothes,people,human."]

# ----------------------------------------------------------------------------------------------
# HF -> OpenAI layout (the inverse of clipprior's conversion, written independently here)

_BLOCK_RENAMES = {
    "self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
}


def hf_to_openai(model: CLIPModel) -> dict[str, torch.Tensor]:
    """A CLIPModel's weights in the layout of OpenAI's ViT-B-16.pt (in_proj concatenated, projections transposed)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    out: dict[str, torch.Tensor] = {}

    def block(src: str, dst: str) -> None:
        out[f"{dst}.attn.in_proj_weight"] = torch.cat([sd[f"{src}.self_attn.{p}_proj.weight"] for p in "qkv"])
        out[f"{dst}.attn.in_proj_bias"] = torch.cat([sd[f"{src}.self_attn.{p}_proj.bias"] for p in "qkv"])
        for old, new in _BLOCK_RENAMES.items():
            for kind in ("weight", "bias"):
                out[f"{dst}.{new}.{kind}"] = sd[f"{src}.{old}.{kind}"]

    v, t = "vision_model", "text_model"
    out["visual.class_embedding"] = sd[f"{v}.embeddings.class_embedding"]
    out["visual.conv1.weight"] = sd[f"{v}.embeddings.patch_embedding.weight"]
    out["visual.positional_embedding"] = sd[f"{v}.embeddings.position_embedding.weight"]
    for old, new in (("visual.ln_pre", "pre_layrnorm"), ("visual.ln_post", "post_layernorm")):
        for kind in ("weight", "bias"):
            out[f"{old}.{kind}"] = sd[f"{v}.{new}.{kind}"]
    for i in range(model.config.vision_config.num_hidden_layers):
        block(f"{v}.encoder.layers.{i}", f"visual.transformer.resblocks.{i}")
    out["visual.proj"] = sd["visual_projection.weight"].t().contiguous()
    out["token_embedding.weight"] = sd[f"{t}.embeddings.token_embedding.weight"]
    out["positional_embedding"] = sd[f"{t}.embeddings.position_embedding.weight"]
    for i in range(model.config.text_config.num_hidden_layers):
        block(f"{t}.encoder.layers.{i}", f"transformer.resblocks.{i}")
    out["ln_final.weight"] = sd[f"{t}.final_layer_norm.weight"]
    out["ln_final.bias"] = sd[f"{t}.final_layer_norm.bias"]
    out["text_projection"] = sd["text_projection.weight"].t().contiguous()
    out["logit_scale"] = sd["logit_scale"]
    return out


class _Node(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def torchscript_archive(state: dict[str, torch.Tensor]) -> torch.jit.ScriptModule:
    """A scripted module tree whose state_dict keys are exactly the OpenAI keys (like the released .pt files).

    The released archives also carry ``input_resolution`` / ``context_length`` / ``vocab_size`` tensors,
    which the loader must ignore.
    """
    root = _Node()
    for key, value in state.items():
        *path, leaf = key.split(".")
        module = root
        for name in path:
            if name not in module._modules:
                module.add_module(name, _Node())
            module = module._modules[name]
        module.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
    for name, value in (("input_resolution", 64), ("context_length", 77), ("vocab_size", 49408)):
        root.register_buffer(name, torch.tensor(value))
    return torch.jit.script(root)


def openai_clip(**kwargs: int) -> CLIPModel:
    """A tiny CLIP whose head counts follow OpenAI's rule (width // 64), so the round trip is exact."""
    width = kwargs.pop("vision_width", 64)
    return make_tiny_clip(seed=kwargs.pop("seed", 3), vision_width=width, heads=max(1, width // 64), **kwargs)


def assert_same_weights(loaded: CLIPModel, original: CLIPModel) -> None:
    ref = {k: v for k, v in original.state_dict().items() if not k.endswith("position_ids")}
    got = {k: v for k, v in loaded.state_dict().items() if not k.endswith("position_ids")}
    assert got.keys() == ref.keys()
    for key, value in ref.items():
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key


def assert_same_outputs(loaded: CLIPModel, original: CLIPModel, tokenizer: CLIPTokenizer, size: int = 64) -> None:
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, size, size)
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for a, b in (
            (loaded.get_image_features(pixel_values=pixels), original.get_image_features(pixel_values=pixels)),
            (loaded.get_text_features(input_ids=ids), original.get_text_features(input_ids=ids)),
        ):
            a = a if isinstance(a, torch.Tensor) else a.pooler_output
            b = b if isinstance(b, torch.Tensor) else b.pooler_output
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def save_checkpoint(state: dict[str, torch.Tensor], path: Path, fmt: str) -> Path:
    if fmt == "safetensors":
        save_file(state, str(path.with_suffix(".safetensors")))
        return path.with_suffix(".safetensors")
    if fmt == "safetensors-fp16":  # the layout of the parity file: float16, converted on load
        save_file({k: v.half() for k, v in state.items()}, str(path.with_suffix(".safetensors")))
        return path.with_suffix(".safetensors")
    if fmt == "pt":
        torch.save(state, path.with_suffix(".pt"))
    elif fmt == "pt-nested":  # {"state_dict": ...}, as training scripts save it
        torch.save({"state_dict": state, "epoch": 3}, path.with_suffix(".pt"))
    elif fmt == "pt-ddp":  # keys prefixed by DistributedDataParallel
        torch.save({f"module.{k}": v for k, v in state.items()}, path.with_suffix(".pth"))
        return path.with_suffix(".pth")
    elif fmt == "torchscript":
        torch.jit.save(torchscript_archive(state), str(path.with_suffix(".pt")))
    else:  # pragma: no cover - test typo
        raise ValueError(fmt)
    return path.with_suffix(".pt")


@pytest.fixture(scope="module")
def original() -> CLIPModel:
    return openai_clip()


@pytest.fixture(scope="module")
def openai_state(original: CLIPModel) -> dict[str, torch.Tensor]:
    return hf_to_openai(original)


# ----------------------------------------------------------------------------------------------
# (a) HF directories


def test_hf_directory_loads_model_and_its_tokenizer(tiny_clip_dir: Path, tiny_clip: CLIPModel,
                                                     tokenizer: CLIPTokenizer) -> None:
    bundle = load_clip(tiny_clip_dir, device="cpu")
    assert_same_weights(bundle.model, tiny_clip)
    assert not bundle.model.training
    assert bundle.source == str(tiny_clip_dir)
    assert bundle.device == torch.device("cpu") and bundle.dtype == torch.float32
    assert bundle.patch_size == 16 and bundle.num_layers == 4
    assert bundle.tokenizer(PROMPTS)["input_ids"] == tokenizer(PROMPTS)["input_ids"]
    assert_same_outputs(bundle.model, tiny_clip, tokenizer)
    # The checksum is of the files: stable across loads, and hex SHA-256.
    assert load_clip(tiny_clip_dir, device="cpu").checksum == bundle.checksum
    assert len(bundle.checksum) == 64 and int(bundle.checksum, 16) >= 0


def test_hf_directory_without_tokenizer_uses_the_bundled_bpe(tmp_path: Path, tiny_clip: CLIPModel,
                                                             tokenizer: CLIPTokenizer) -> None:
    tiny_clip.save_pretrained(tmp_path)  # weights and config only
    bundle = load_clip(tmp_path, device="cpu")
    assert bundle.tokenizer(PROMPTS)["input_ids"] == tokenizer(PROMPTS)["input_ids"]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attn_implementation_is_passed_through(tiny_clip_dir: Path, openai_state: dict[str, torch.Tensor],
                                               tmp_path: Path, attn: str) -> None:
    checkpoint = save_checkpoint(openai_state, tmp_path / "ckpt", "safetensors")
    for source in (tiny_clip_dir, checkpoint):
        model = load_clip(source, device="cpu", attn_implementation=attn).model
        assert model.config.vision_config._attn_implementation == attn
        assert model.config.text_config._attn_implementation == attn


# ----------------------------------------------------------------------------------------------
# (b) OpenAI checkpoints: safetensors, torch.save, TorchScript


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "pt-nested", "pt-ddp", "torchscript"])
def test_openai_checkpoint_round_trip(tmp_path: Path, original: CLIPModel, openai_state: dict[str, torch.Tensor],
                                      tokenizer: CLIPTokenizer, fmt: str) -> None:
    path = save_checkpoint(openai_state, tmp_path / "ViT-tiny", fmt)
    raw = load_openai_state_dict(path)
    assert set(openai_state) <= set(raw)
    if fmt == "torchscript":
        assert set(raw) - set(openai_state) == {"input_resolution", "context_length", "vocab_size"}
    bundle = load_clip(path, device="cpu")
    assert_same_weights(bundle.model, original)
    assert_same_outputs(bundle.model, original, tokenizer)
    assert bundle.tokenizer(PROMPTS)["input_ids"] == tokenizer(PROMPTS)["input_ids"]
    assert bundle.source == str(path) and not bundle.model.training
    assert float(bundle.model.logit_scale.exp()) == pytest.approx(float(original.logit_scale.exp()))


def test_float16_openai_checkpoint_loads_as_float32(tmp_path: Path, openai_state: dict[str, torch.Tensor]) -> None:
    path = save_checkpoint(openai_state, tmp_path / "half", "safetensors-fp16")
    bundle = load_clip(path, device="cpu")
    assert bundle.dtype == torch.float32
    stored = load_file(str(path))
    converted = convert_openai_state_dict(stored)
    assert all(v.dtype == torch.float32 for v in converted.values())
    torch.testing.assert_close(bundle.model.visual_projection.weight, stored["visual.proj"].float().t())


def test_convert_openai_state_dict_is_the_inverse_of_the_test_helper(original: CLIPModel,
                                                                       openai_state: dict[str, torch.Tensor]) -> None:
    converted = convert_openai_state_dict(openai_state)
    expected = {k: v for k, v in original.state_dict().items() if not k.endswith("position_ids")}
    assert converted.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(converted[key], value), key


# ----------------------------------------------------------------------------------------------
# (c) sizes come from the tensors


@pytest.mark.parametrize(
    ("name", "kwargs", "grid"),
    [
        ("B/32-like", {"patch": 32, "image_size": 64}, 2),
        ("B/16-like", {"patch": 16, "image_size": 64, "vision_layers": 3}, 4),
        ("L/14-like", {"patch": 14, "image_size": 56, "vision_width": 128, "vision_layers": 2}, 4),
        ("L/14-336-like", {"patch": 14, "image_size": 336, "vision_layers": 2}, 24),
    ],
)
def test_shapes_are_inferred_from_the_tensors(tmp_path: Path, tokenizer: CLIPTokenizer, name: str,
                                               kwargs: dict[str, int], grid: int) -> None:
    model = openai_clip(**kwargs)
    cfg = clip_config_from_openai(hf_to_openai(model))
    want_v, want_t = model.config.vision_config, model.config.text_config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size",
                "image_size", "hidden_act", "layer_norm_eps"):
        assert getattr(cfg.vision_config, key) == getattr(want_v, key), (name, key)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "vocab_size", "hidden_act", "layer_norm_eps"):
        assert getattr(cfg.text_config, key) == getattr(want_t, key), (name, key)
    assert cfg.projection_dim == model.config.projection_dim
    assert cfg.vision_config.image_size // cfg.vision_config.patch_size == grid
    path = save_checkpoint(hf_to_openai(model), tmp_path / "ckpt", "safetensors")
    bundle = load_clip(path, device="cpu")
    assert_same_weights(bundle.model, model)
    assert_same_outputs(bundle.model, model, tokenizer, size=kwargs["image_size"])


# ----------------------------------------------------------------------------------------------
# (d) the parity checkpoint


def test_parity_checkpoint_loads_with_its_documented_sizes() -> None:
    ref = reference_dir()
    sizes = json.loads((ref / "openai_config.json").read_text())
    bundle = load_clip(ref / "openai_state_dict.safetensors", device="cpu")
    vision, text = bundle.model.config.vision_config, bundle.model.config.text_config
    assert bundle.dtype == torch.float32
    assert vision.hidden_size == sizes["vision_width"] and vision.num_hidden_layers == sizes["vision_layers"]
    assert vision.patch_size == sizes["vision_patch_size"] and vision.image_size == sizes["image_resolution"]
    assert vision.num_attention_heads == sizes["vision_width"] // 64
    assert text.hidden_size == sizes["transformer_width"] and text.num_hidden_layers == sizes["transformer_layers"]
    assert text.num_attention_heads == sizes["transformer_heads"]
    assert text.max_position_embeddings == sizes["context_length"] and text.vocab_size == sizes["vocab_size"]
    assert bundle.model.config.projection_dim == sizes["embed_dim"]
    assert float(bundle.model.logit_scale.exp()) == pytest.approx(100.0, rel=1e-3)


# ----------------------------------------------------------------------------------------------
# (e) errors, device and dtype


@pytest.mark.parametrize("source", ["./no-such-dir", "/no/such/ViT-B-16.pt", "missing.safetensors", "~/nope/x.pt",
                                    "a/b/c"])
def test_missing_path_says_what_to_pass(source: str) -> None:
    with pytest.raises(WeightsNotFoundError) as info:
        load_clip(source, device="cpu")
    message = str(info.value)
    assert source in message and "ViT-B-16.pt" in message and "save_pretrained" in message
    assert DEFAULT_MODEL in message
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ModelLoadError)


def test_directory_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WeightsNotFoundError, match=r"holds no CLIPModel weights.*save_pretrained"):
        load_clip(tmp_path, device="cpu")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, ...]]:
    """Record (and refuse) every attempt to open a connection or resolve a host name."""
    attempts: list[tuple[object, ...]] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


@pytest.mark.parametrize("flag", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_hub_id_offline_gives_advice_without_touching_the_network(monkeypatch: pytest.MonkeyPatch,
                                                                   no_network: list[tuple[object, ...]],
                                                                   flag: str) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv(flag, "1")
    offline_before = huggingface_hub.constants.HF_HUB_OFFLINE
    name = "clipprior-tests/no-such-clip"
    with pytest.raises(WeightsNotFoundError) as info:
        load_clip(name, device="cpu")
    message = str(info.value)
    assert name in message and "offline" in message
    assert "hf download" in message and "ViT-B-16.pt" in message and "save_pretrained" in message
    assert no_network == []
    assert huggingface_hub.constants.HF_HUB_OFFLINE is offline_before  # switched back after the call


def test_local_files_only_never_touches_the_network(monkeypatch: pytest.MonkeyPatch,
                                                    no_network: list[tuple[object, ...]]) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(WeightsNotFoundError, match="hf download"):
        load_clip("clipprior-tests/no-such-clip", device="cpu", local_files_only=True)
    assert no_network == []


def test_unresolvable_hub_fails_at_once_without_retrying(monkeypatch: pytest.MonkeyPatch,
                                                         no_network: list[tuple[object, ...]]) -> None:
    # No env flag: the only sign of being offline is that the hub's name does not resolve. The one
    # allowed attempt is that name lookup; nothing connects or retries.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(WeightsNotFoundError, match="offline"):
        load_clip("clipprior-tests/no-such-clip", device="cpu")
    assert len(no_network) == 1 and "huggingface" in str(no_network[0][0])


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda d: (save_file({"foo.weight": torch.zeros(2)}, str(d / "x.safetensors")), d / "x.safetensors")[1],
         r"not an OpenAI ViT CLIP state dict: missing .*visual\.conv1\.weight"),
        (lambda d: (torch.save({"layer.weight": torch.zeros(2)}, d / "x.pt"), d / "x.pt")[1],
         r"not an OpenAI ViT CLIP state dict"),
        (lambda d: (torch.save([1, 2, 3], d / "x.pt"), d / "x.pt")[1], r"holds a list, not a state dict"),
        (lambda d: (torch.save(torch.zeros(3), d / "x.pt"), d / "x.pt")[1], r"holds a Tensor, not a state dict"),
        (lambda d: _write_bytes(d / "x.pt", b"not a checkpoint" * 8), r"neither a TorchScript CLIP archive"),
        (lambda d: _write_bytes(d / "x.safetensors", b"not a checkpoint" * 8), r"not a readable safetensors"),
    ],
    ids=["random-keys-safetensors", "random-keys-pt", "list", "tensor", "garbage-pt", "garbage-safetensors"],
)
def test_non_clip_files_raise_model_load_error(tmp_path: Path, make, pattern: str) -> None:
    path = make(tmp_path)
    with pytest.raises(ModelLoadError, match=pattern) as info:
        load_clip(path, device="cpu")
    assert not isinstance(info.value, WeightsNotFoundError)


@pytest.mark.parametrize(
    ("drop", "pattern"),
    [
        ("visual.transformer.resblocks.1.ln_2.bias", r"missing 'visual\.transformer\.resblocks\.1\.ln_2\.bias'"),
        ("logit_scale", r"missing 'logit_scale'"),
        ("visual.transformer.", r"no complete residual blocks \(0 vision"),
        ("visual.conv1.weight", r"missing \['visual\.conv1\.weight'\].*ResNet"),
    ],
)
def test_incomplete_openai_state_dict(tmp_path: Path, openai_state: dict[str, torch.Tensor], drop: str,
                                      pattern: str) -> None:
    state = {k: v for k, v in openai_state.items() if not k.startswith(drop)}
    path = save_checkpoint(state, tmp_path / "cut", "safetensors")
    with pytest.raises(ModelLoadError, match=pattern):
        load_clip(path, device="cpu")


def _corrupt_weights(d: Path) -> None:
    (d / "model.safetensors").write_bytes(b"\x00" * 64)


def _drop_a_key(d: Path) -> None:
    state = load_file(str(d / "model.safetensors"))
    del state["visual_projection.weight"]
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})


def _other_model_type(d: Path) -> None:
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))


@pytest.mark.parametrize(
    ("damage", "pattern"),
    [
        (_corrupt_weights, r"could not load a CLIPModel from"),
        (_drop_a_key, r"missing \['visual_projection\.weight'\]"),
        (_other_model_type, r"holds a 'bert' model, not a CLIPModel"),
        (lambda d: (d / "config.json").unlink(), r"holds no config\.json"),
    ],
    ids=["corrupt", "missing-key", "bert-config", "no-config"],
)
def test_broken_hf_directory_raises_model_load_error(tmp_path: Path, tiny_clip_dir: Path, damage, pattern: str) -> None:
    target = tmp_path / "model"
    shutil.copytree(tiny_clip_dir, target)
    damage(target)
    with pytest.raises(ModelLoadError, match=pattern):
        load_clip(target, device="cpu")


@pytest.mark.parametrize(("dtype", "expected"), [
    (None, torch.float32), ("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16),
    (torch.float16, torch.float16), ("bfloat16", torch.bfloat16),
])
def test_dtype_argument(tiny_clip_dir: Path, openai_state: dict[str, torch.Tensor], tmp_path: Path, dtype,
                        expected: torch.dtype) -> None:
    checkpoint = save_checkpoint(openai_state, tmp_path / "ckpt", "safetensors")
    for source in (tiny_clip_dir, checkpoint):
        bundle = load_clip(source, device="cpu", dtype=dtype)
        assert bundle.dtype == expected
        assert all(p.dtype == expected for p in bundle.model.parameters())


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"dtype": "int8"}, r"dtype 'int8' is not valid; choose one of"),
    ({"dtype": torch.float64}, r"not supported; use float32, float16 or bfloat16"),
    ({"device": "banana"}, r"device 'banana' is not valid"),
])
def test_bad_device_or_dtype(tiny_clip_dir: Path, kwargs: dict[str, object], pattern: str) -> None:
    with pytest.raises(InvalidInputError, match=pattern):
        load_clip(tiny_clip_dir, **kwargs)


def test_device_argument(tiny_clip_dir: Path) -> None:
    assert load_clip(tiny_clip_dir, device=torch.device("cpu")).device == torch.device("cpu")
    auto = load_clip(tiny_clip_dir, device="auto").device
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInputError, match="CUDA is not available"):
            load_clip(tiny_clip_dir, device="cuda")
