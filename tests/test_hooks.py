"""Hooks: the attention recorder equals eager attention under any attn_implementation, and no call leaves
hooks or gradients behind, whether it succeeds or fails half-way."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import CLIPModel, CLIPTokenizer

from clipprior import load_clip
from clipprior.hooks import ActivationRecorder, AttentionRecorder, count_hooks
from clipprior.model import ClipBundle
from clipprior.priors import compute_priors, encode_text, layer_features, pir, support_features, vtp, vvp


class Boom(Exception):
    """Raised on purpose inside the model."""


@pytest.fixture(scope="module")
def bundle(tiny_clip_dir: Path) -> ClipBundle:
    return load_clip(tiny_clip_dir, device="cpu")


@pytest.fixture(scope="module")
def eager_model(tiny_clip_dir: Path) -> CLIPModel:
    return load_clip(tiny_clip_dir, device="cpu", attn_implementation="eager").model


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(2, 3, 64, 64)


def assert_clean(model: nn.Module) -> None:
    assert count_hooks(model) == 0
    assert [name for name, p in model.named_parameters() if p.grad is not None] == []


# ----------------------------------------------------------------------------------------------
# count_hooks


def test_count_hooks_counts_every_kind() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    assert count_hooks(net) == 0
    handles = [
        net[0].register_forward_hook(lambda *a: None),
        net[0].register_forward_pre_hook(lambda *a: None),
        net[1].register_full_backward_hook(lambda *a: None),
        net[1].register_full_backward_pre_hook(lambda *a: None),
        net.register_forward_hook(lambda *a, **k: None, with_kwargs=True),
        net.register_forward_pre_hook(lambda *a, **k: None, with_kwargs=True),
    ]
    assert count_hooks(net) == 6
    for handle in handles:
        handle.remove()
    assert count_hooks(net) == 0


# ----------------------------------------------------------------------------------------------
# AttentionRecorder


def eager_mean_attention(model: CLIPModel, pixels: torch.Tensor, layers: slice) -> torch.Tensor:
    """Head- and layer-averaged attention probabilities from transformers' own eager path."""
    with torch.no_grad():
        out = model.vision_model(pixel_values=pixels, output_attentions=True)
    maps = torch.stack(out.attentions[layers], dim=0)  # (L, B, heads, T, T)
    return maps.mean(dim=2).mean(dim=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("last", [1, 3, 4])
def test_recorder_equals_eager_attention(tiny_clip_dir: Path, eager_model: CLIPModel, pixels: torch.Tensor,
                                         attn: str, last: int) -> None:
    model = load_clip(tiny_clip_dir, device="cpu", attn_implementation=attn).model
    layers = model.vision_model.encoder.layers
    with AttentionRecorder(layers[-last:], num_heads=model.config.vision_config.num_attention_heads) as rec, \
            torch.no_grad():
        model.vision_model(pixel_values=pixels)
    assert rec.count == last
    expected = eager_mean_attention(eager_model, pixels, slice(-last, None))
    got = rec.mean_attention()
    assert got.dtype == torch.float32 and got.shape == (2, 17, 17)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 17), atol=1e-5, rtol=0)
    assert_clean(model)


def test_recorder_is_per_row(bundle: ClipBundle, pixels: torch.Tensor) -> None:
    layers = bundle.model.vision_model.encoder.layers
    maps = []
    for batch in (pixels, pixels[:1], pixels[1:]):
        with AttentionRecorder(layers[-2:], num_heads=2) as rec, torch.no_grad():
            bundle.model.vision_model(pixel_values=batch)
        maps.append(rec.mean_attention())
    torch.testing.assert_close(maps[0], torch.cat(maps[1:]), atol=1e-6, rtol=0)


def test_recorder_in_float16_reads_the_model_projections(tiny_clip_dir: Path, eager_model: CLIPModel,
                                                          pixels: torch.Tensor) -> None:
    model = load_clip(tiny_clip_dir, device="cpu", dtype="fp16").model
    with AttentionRecorder(model.vision_model.encoder.layers, num_heads=2) as rec, torch.no_grad():
        model.vision_model(pixel_values=pixels.half())
    got = rec.mean_attention()
    assert got.dtype == torch.float32
    # float16 Q/K (3 significant digits) moved into float32 softmax: close to the float32 model's maps.
    torch.testing.assert_close(got, eager_mean_attention(eager_model, pixels, slice(None)), atol=5e-3, rtol=0)


def test_take_rows_reindexes_the_batch(bundle: ClipBundle, pixels: torch.Tensor) -> None:
    layers = bundle.model.vision_model.encoder.layers
    with AttentionRecorder(layers[-1:], num_heads=2) as rec, torch.no_grad():
        bundle.model.vision_model(pixel_values=pixels)
        full = rec.mean_attention().clone()
        rec.take_rows(torch.tensor([1, 1, 0]))
        torch.testing.assert_close(rec.mean_attention(), full[[1, 1, 0]])


def test_recorder_errors(bundle: ClipBundle, pixels: torch.Tensor) -> None:
    layers = bundle.model.vision_model.encoder.layers
    with AttentionRecorder(layers[-1:], num_heads=2) as rec:
        pass
    with pytest.raises(RuntimeError, match="no attention was recorded"):
        rec.mean_attention()
    with pytest.raises(RuntimeError, match="batches of 2 and 1 rows"), torch.no_grad(), \
            AttentionRecorder(layers[-1:], num_heads=2):
        bundle.model.vision_model(pixel_values=pixels)
        bundle.model.vision_model(pixel_values=pixels[:1])
    assert_clean(bundle.model)


def test_hooks_are_removed_when_the_block_raises(bundle: ClipBundle, pixels: torch.Tensor) -> None:
    layers = bundle.model.vision_model.encoder.layers
    with pytest.raises(Boom), AttentionRecorder(layers, num_heads=2), ActivationRecorder(layers[-1].layer_norm1):
        assert count_hooks(bundle.model) == 2 * len(layers) + 1
        raise Boom
    assert_clean(bundle.model)


def test_hooks_are_removed_when_registration_fails(bundle: ClipBundle) -> None:
    layers = [*bundle.model.vision_model.encoder.layers[:2], nn.Linear(2, 2)]  # no self_attn
    with pytest.raises(AttributeError), AttentionRecorder(layers, num_heads=2):
        pass  # pragma: no cover - never entered
    assert_clean(bundle.model)


def test_activation_recorder_captures_output_and_gradient() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    x = torch.randn(5, 3)
    with ActivationRecorder(net[1]) as rec:
        y = net(x).sum()
        assert rec.gradient is None
        y.backward(inputs=[rec.activation])
    expected_act = torch.tanh(net[0](x))
    torch.testing.assert_close(rec.activation, expected_act)
    torch.testing.assert_close(rec.gradient, net[2].weight.detach().expand(5, 4))
    assert count_hooks(net) == 0
    assert all(p.grad is None for p in net.parameters())


# ----------------------------------------------------------------------------------------------
# No hooks, no gradients after any library call


def _calls(bundle: ClipBundle, pixels: torch.Tensor) -> dict[str, Callable[[], object]]:
    labels = torch.zeros(2, 2, 64, 64, dtype=torch.long)
    labels[..., 8:40, 16:56] = 1
    image = (torch.rand(64, 80, 3) * 255).to(torch.uint8).numpy()
    label = labels[0, 0, :, :64].numpy()
    return {
        "vtp": lambda: vtp(bundle, pixels, ["cat", "dog", "cat"], image_index=[0, 0, 1], context=[["dog"], [], []],
                           return_attention=True, return_features=True),
        "vtp+pir": lambda: pir(*(lambda o: (o.cam, o.attention))(vtp(bundle, pixels, ["cat", "dog"],
                                                                      return_attention=True))),
        "vvp": lambda: vvp(bundle, pixels, pixels[:, None].expand(2, 2, 3, 64, 64), labels),
        "layer_features": lambda: layer_features(bundle, pixels, (-1, 0)),
        "support_features": lambda: support_features(bundle, pixels, labels[:, 0]),
        "encode_text": lambda: encode_text(bundle, ["cat", "dog"]),
        "compute_priors": lambda: compute_priors(bundle, image, "cat", [image[:, :64]], [label]),
    }


@pytest.mark.parametrize("name", ["vtp", "vtp+pir", "vvp", "layer_features", "support_features", "encode_text",
                                  "compute_priors"])
def test_successful_calls_leave_no_hooks_and_no_grad(bundle: ClipBundle, pixels: torch.Tensor, name: str) -> None:
    model = bundle.model
    flags = [p.requires_grad for p in model.parameters()]
    attn = model.config.text_config._attn_implementation
    _calls(bundle, pixels)[name]()
    assert_clean(model)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.config.text_config._attn_implementation == attn
    assert not model.training


def _raise(*args: object, **kwargs: object) -> None:
    raise Boom("forced failure")


class _BoomInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        raise Boom("forced failure in backward")


def _sabotage(model: CLIPModel, where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    layers = model.vision_model.encoder.layers
    if where == "first-layer":  # in the no-grad pass, before any recorded layer
        monkeypatch.setattr(layers[0].mlp, "forward", _raise)
    elif where == "recorded-q_proj":  # inside an attention hook's module
        monkeypatch.setattr(layers[-2].self_attn.q_proj, "forward", _raise)
    elif where == "last-layer-mlp":  # in the grad-enabled last layer, after the activation hook fired
        monkeypatch.setattr(layers[-1].mlp, "forward", _raise)
    elif where == "backward":
        original = model.visual_projection.forward
        monkeypatch.setattr(model.visual_projection, "forward", lambda x: _BoomInBackward.apply(original(x)))
    elif where == "text":
        monkeypatch.setattr(model.text_model, "forward", _raise)
    else:  # pragma: no cover - test typo
        raise ValueError(where)


@pytest.fixture(scope="module")
def before(bundle: ClipBundle, pixels: torch.Tensor):
    return vtp(bundle, pixels, ["cat", "dog"], return_attention=True, return_features=True)


@pytest.mark.parametrize("where", ["first-layer", "recorded-q_proj", "last-layer-mlp", "backward", "text"])
def test_failing_vtp_leaves_no_hooks_and_no_grad(bundle: ClipBundle, before, pixels: torch.Tensor,
                                                 monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    clip = bundle
    attn = clip.model.config.text_config._attn_implementation
    with monkeypatch.context() as patch:
        _sabotage(clip.model, where, patch)
        with pytest.raises(Boom):
            vtp(clip, pixels, ["cat", "dog"], return_attention=True, return_features=True)
        assert_clean(clip.model)
        assert clip.model.config.text_config._attn_implementation == attn
    after = vtp(clip, pixels, ["cat", "dog"], return_attention=True, return_features=True)
    for a, b in ((before.cam, after.cam), (before.attention, after.attention), (before.features, after.features)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert_clean(clip.model)


@pytest.mark.parametrize("where", ["first-layer", "last-layer-mlp"])
@pytest.mark.parametrize("call", ["vvp", "compute_priors"])
def test_failing_vvp_and_compute_priors_leave_no_hooks_and_no_grad(
    bundle: ClipBundle, pixels: torch.Tensor, monkeypatch: pytest.MonkeyPatch, where: str, call: str
) -> None:
    clip = bundle
    with monkeypatch.context() as patch:
        _sabotage(clip.model, where, patch)
        with pytest.raises(Boom):
            _calls(clip, pixels)[call]()
    assert_clean(clip.model)


def test_user_hooks_are_left_alone(tiny_clip_dir: Path, pixels: torch.Tensor) -> None:
    clip = load_clip(tiny_clip_dir, device="cpu")
    seen = []
    handle = clip.model.vision_model.encoder.layers[-1].register_forward_hook(lambda *a: seen.append(1))
    vtp(clip, pixels, ["cat", "dog"], return_attention=True)
    assert count_hooks(clip.model) == 1 and seen
    handle.remove()
    assert_clean(clip.model)


@pytest.mark.parametrize("context", ["inference_mode", "no_grad"])
def test_vtp_works_inside_callers_no_grad_contexts(bundle: ClipBundle, pixels: torch.Tensor, context: str) -> None:
    plain = vtp(bundle, pixels, ["cat", "dog"], return_attention=True)
    guard = torch.inference_mode() if context == "inference_mode" else torch.no_grad()
    with guard:
        inside = vtp(bundle, pixels.clone(), ["cat", "dog"], return_attention=True)
    torch.testing.assert_close(inside.cam, plain.cam, atol=0, rtol=0)
    torch.testing.assert_close(inside.attention, plain.attention, atol=0, rtol=0)
    assert_clean(bundle.model)


def test_vtp_on_a_frozen_model(tiny_clip_dir: Path, pixels: torch.Tensor) -> None:
    clip = load_clip(tiny_clip_dir, device="cpu")
    plain = vtp(clip, pixels, ["cat", "dog"])
    clip.model.requires_grad_(False)
    frozen = vtp(clip, pixels, ["cat", "dog"])
    torch.testing.assert_close(frozen.cam, plain.cam, atol=0, rtol=0)
    assert_clean(clip.model)
    assert not any(p.requires_grad for p in clip.model.parameters())


def test_tokenizer_fixture_matches_bundle(bundle: ClipBundle, tokenizer: CLIPTokenizer) -> None:
    # The bundle's tokenizer is the one saved beside the tiny model (the reference BPE).
    assert bundle.tokenizer("a photo of cat.")["input_ids"] == tokenizer("a photo of cat.")["input_ids"]
