"""Loading CLIP: hub ids, local HuggingFace directories and OpenAI checkpoints.

:func:`load_clip` is the one entry point. It accepts

- a HuggingFace hub id (``"openai/clip-vit-base-patch16"``) or a local directory written by
  ``CLIPModel.save_pretrained`` (a tokenizer saved beside it is used, else the bundled CLIP BPE);
- an OpenAI-format checkpoint: the released TorchScript archives (``ViT-B-16.pt``, ...) that PI-CLIP
  users already have, or a plain state dict in that layout (``.pt`` / ``.pth`` / ``.safetensors``).
  These are converted to :class:`transformers.CLIPModel` in memory; every size (width, layers,
  heads, patch, grid, text context) is read off the tensors, so ViT-B/32, B/16, L/14 and L/14-336
  all load.

Example:
    >>> bundle = load_clip("openai/clip-vit-base-patch16", device="cpu")  # doctest: +SKIP
    >>> bundle.patch_size  # doctest: +SKIP
    16
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from clipprior._device import resolve_device, resolve_dtype
from clipprior.config import DEFAULT_MODEL
from clipprior.errors import ModelLoadError, WeightsNotFoundError

__all__ = [
    "DEFAULT_MODEL",
    "ClipBundle",
    "clip_config_from_openai",
    "convert_openai_state_dict",
    "default_tokenizer",
    "load_clip",
    "load_openai_state_dict",
]

_OPENAI_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
_HF_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


@dataclass
class ClipBundle:
    """A loaded CLIP and what travels with it.

    Attributes:
        model: The :class:`transformers.CLIPModel`, in eval mode.
        tokenizer: Its :class:`transformers.CLIPTokenizer`.
        source: What was loaded (hub id or path), recorded in cache provenance.
        checksum: SHA-256 of the weights (of the files on disk, or of the tensors when converted).
    """

    model: CLIPModel
    tokenizer: CLIPTokenizer
    source: str
    checksum: str

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the model's parameters."""
        return next(self.model.parameters()).dtype

    @property
    def patch_size(self) -> int:
        """Vision patch size in pixels (16 for ViT-B/16)."""
        return int(self.model.config.vision_config.patch_size)

    @property
    def num_layers(self) -> int:
        """Number of vision encoder layers."""
        return int(self.model.config.vision_config.num_hidden_layers)


def default_tokenizer() -> CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer, from the vocabulary bundled with clipprior (works offline).

    Example:
        >>> default_tokenizer()("a photo of cat.")["input_ids"][:2]
        [49406, 320]
    """
    root = resources.files("clipprior") / "assets" / "clip-tokenizer"
    with resources.as_file(root / "vocab.json") as vocab, resources.as_file(root / "merges.txt") as merges:
        return CLIPTokenizer(str(vocab), str(merges))


def load_clip(
    source: str | Path = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    local_files_only: bool | None = None,
) -> ClipBundle:
    """Load a CLIP from a hub id, a local HF directory or an OpenAI checkpoint.

    Args:
        source: Hub id, directory saved by ``save_pretrained``, or OpenAI checkpoint file.
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a device.
        dtype: ``"fp32"``/``"fp16"``/``"bf16"`` or a torch dtype; ``None`` keeps float32.
        attn_implementation: Passed to transformers (``"sdpa"``, ``"eager"``); the priors work with any.
        local_files_only: Do not try the hub (``None``: only when ``HF_HUB_OFFLINE`` is set).

    Returns:
        A :class:`ClipBundle` with the model in eval mode on ``device`` in ``dtype``.

    Raises:
        WeightsNotFoundError: if a path does not exist, or a hub id cannot be fetched (offline);
            the message says what to pass instead.
        ModelLoadError: if the weights exist but are not a CLIP.

    Example:
        >>> bundle = load_clip("~/weights/ViT-B-16.pt", device="cpu")  # doctest: +SKIP
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype) or torch.float32
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file():
        model, checksum = _load_openai_checkpoint(path, attn_implementation)
        tokenizer = default_tokenizer()
    elif path.is_dir():
        model, tokenizer, checksum = _load_hf_directory(path, attn_implementation)
    elif _looks_like_path(text):
        raise WeightsNotFoundError(
            f"CLIP weights not found at {text!r}: no such file or directory. Pass an existing OpenAI checkpoint "
            f"(e.g. ViT-B-16.pt), a directory saved with CLIPModel.save_pretrained, or a hub id such as "
            f"{DEFAULT_MODEL!r}."
        )
    else:
        model, tokenizer, checksum = _load_hub(text, attn_implementation, local_files_only)
    model = model.to(device=dev, dtype=dt).eval()
    return ClipBundle(model=model, tokenizer=tokenizer, source=text, checksum=checksum)


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith((".", "/", "~"))
        or text.endswith(_OPENAI_SUFFIXES)
        or text.count("/") > 1
        or "\\" in text
    )


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Hide transformers' own "Loading weights" bar for this load only (hub download bars stay)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _load_hf_directory(path: Path, attn_implementation: str | None) -> tuple[CLIPModel, CLIPTokenizer, str]:
    weights = [path / name for name in _HF_WEIGHT_FILES if (path / name).is_file()]
    if not weights:
        raise WeightsNotFoundError(
            f"{str(path)!r} is a directory but holds no CLIPModel weights (expected one of {list(_HF_WEIGHT_FILES)}); "
            f"save one with CLIPModel.save_pretrained, or pass an OpenAI checkpoint file."
        )
    config_file = path / "config.json"
    try:
        model_type = json.loads(config_file.read_text()).get("model_type") if config_file.is_file() else None
    except (OSError, ValueError, AttributeError) as err:
        raise ModelLoadError(f"{str(config_file)!r} is not a readable model config: {err}") from err
    if model_type != "clip":
        found = f"a {model_type!r} model" if model_type else "no config.json"
        raise ModelLoadError(
            f"{str(path)!r} holds {found}, not a CLIPModel; pass a directory saved with CLIPModel.save_pretrained"
        )
    try:
        with _quiet_loading():
            model, info = CLIPModel.from_pretrained(
                path, attn_implementation=attn_implementation, output_loading_info=True
            )
    except Exception as err:  # corrupt weight files raise torch, safetensors and pickle errors alike
        raise ModelLoadError(f"could not load a CLIPModel from {str(path)!r}: {err}") from err
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.endswith("position_ids"))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    if missing or mismatched:
        raise ModelLoadError(
            f"the weights in {str(path)!r} do not fill its CLIPModel: missing {missing[:5]}, "
            f"wrong shape {mismatched[:5]} ({len(missing)} + {len(mismatched)} in all); the checkpoint is "
            f"incomplete or its config.json belongs to another model"
        )
    # Without tokenizer files, CLIPTokenizer.from_pretrained builds an empty 2-token vocabulary
    # that maps every prompt to <unk>; only trust a tokenizer that was saved beside the model.
    tokenizer: CLIPTokenizer | None = None
    if any((path / name).is_file() for name in _HF_TOKENIZER_FILES):
        with contextlib.suppress(OSError, ValueError, TypeError):
            tokenizer = CLIPTokenizer.from_pretrained(path)
    if tokenizer is None:
        tokenizer = default_tokenizer()
    digest = hashlib.sha256()
    for file in weights:
        digest.update(_file_sha256(file).encode())
    return model, tokenizer, digest.hexdigest()


def _offline_env() -> bool:
    """Whether HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set to a true value right now."""
    return any(os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_unreachable() -> bool:
    """Whether the hub's host name does not even resolve (no network): then only the cache can serve.

    Without this check huggingface_hub retries each request for tens of seconds before failing.
    """
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants

        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    except (ImportError, AttributeError):
        host = "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return True
    return False


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Put huggingface_hub in offline mode for the block when ``offline``.

    ``local_files_only`` alone still lets huggingface_hub make side requests (its user-agent
    code fetches a registry from the hub); its own offline switch stops every request.
    """
    if not offline:
        yield
        return
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _load_hub(name: str, attn_implementation: str | None, local_files_only: bool | None) -> tuple[
    CLIPModel, CLIPTokenizer, str
]:
    kwargs: dict[str, object] = {"attn_implementation": attn_implementation}
    if local_files_only is None and (_offline_env() or _hub_unreachable()):
        # huggingface_hub reads HF_HUB_OFFLINE once, at import; honour a value set later too,
        # and do not spend retries on a hub whose name does not resolve.
        local_files_only = True
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    try:
        with _hub_offline(bool(local_files_only)):
            with _quiet_loading():
                model = CLIPModel.from_pretrained(name, **kwargs)
            tokenizer = CLIPTokenizer.from_pretrained(name, local_files_only=bool(local_files_only))
    except OSError as err:
        raise WeightsNotFoundError(
            f"could not load {name!r} from the HuggingFace hub or its local cache ({type(err).__name__}); "
            f"this machine may be offline. Download it elsewhere with "
            f"`hf download {name}` (`huggingface-cli download` before huggingface_hub 1.0) and copy the cache, "
            f"or pass --model with a local directory "
            f"(CLIPModel.save_pretrained) or an OpenAI checkpoint such as ViT-B-16.pt."
        ) from err
    except ValueError as err:
        raise ModelLoadError(f"{name!r} is not a loadable CLIPModel: {err}") from err
    revision = getattr(model.config, "_commit_hash", None) or ""
    checksum = hashlib.sha256(f"{name}@{revision}".encode()).hexdigest() if revision else _tensor_checksum(
        model.state_dict()
    )
    return model, tokenizer, checksum


# ----------------------------------------------------------------------------------------------
# OpenAI checkpoints


def load_openai_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an OpenAI-layout CLIP state dict from a TorchScript archive, ``.pt`` or ``.safetensors``.

    Args:
        path: The checkpoint file.

    Returns:
        The tensors on the CPU, in the checkpoint's dtype.

    Raises:
        WeightsNotFoundError: if the file does not exist.
        ModelLoadError: if the file is none of the supported formats.

    Example:
        >>> sd = load_openai_state_dict("ViT-B-16.pt")  # doctest: +SKIP
        >>> sd["visual.conv1.weight"].shape  # doctest: +SKIP
        torch.Size([768, 3, 16, 16])
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(f"OpenAI checkpoint {str(path)!r} does not exist; pass the path of ViT-B-16.pt or "
                                   f"a state dict in its layout")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as err:  # safetensors raises its own error types
            raise ModelLoadError(f"{str(path)!r} is not a readable safetensors file: {err}") from err
    try:
        archive = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError:
        archive = None
    if archive is not None:
        state = {k: v for k, v in archive.state_dict().items() if isinstance(v, torch.Tensor)}
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # pickle errors come in many types
            raise ModelLoadError(
                f"{str(path)!r} is neither a TorchScript CLIP archive nor a state dict torch can load safely: {err}"
            ) from err
        if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]
        if not isinstance(state, Mapping):
            raise ModelLoadError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict")
        state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return state


def _count_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    ids = {int(m.group(1)) for key in state if (m := pattern.match(key))}
    return max(ids) + 1 if ids else 0


def clip_config_from_openai(state: Mapping[str, torch.Tensor]) -> CLIPConfig:
    """Infer a :class:`~transformers.CLIPConfig` from an OpenAI-layout ViT CLIP state dict.

    Args:
        state: Tensors keyed as in OpenAI's ``ViT-B-16.pt``.

    Returns:
        The config (QuickGELU, LayerNorm eps 1e-5, heads = width // 64).

    Raises:
        ModelLoadError: if keys of a ViT CLIP are missing (e.g. a ResNet CLIP).

    Example:
        >>> cfg = clip_config_from_openai(load_openai_state_dict("ViT-B-16.pt"))  # doctest: +SKIP
        >>> cfg.vision_config.patch_size  # doctest: +SKIP
        16
    """
    required = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj", "text_projection",
                "token_embedding.weight", "positional_embedding", "ln_final.weight")
    missing = [k for k in required if k not in state]
    if missing:
        raise ModelLoadError(
            f"not an OpenAI ViT CLIP state dict: missing {missing} (ResNet CLIPs are not supported; use a ViT)"
        )
    conv = state["visual.conv1.weight"]
    vision_width, patch = int(conv.shape[0]), int(conv.shape[-1])
    n_pos = int(state["visual.positional_embedding"].shape[0]) - 1
    grid = round(n_pos**0.5)
    if grid * grid != n_pos:
        raise ModelLoadError(f"visual.positional_embedding has {n_pos} patch positions, not a square grid")
    vision_layers = _count_blocks(state, "visual.transformer.resblocks.")
    text_width = int(state["ln_final.weight"].shape[0])
    text_layers = _count_blocks(state, "transformer.resblocks.")
    mlp_keys = ("visual.transformer.resblocks.0.mlp.c_fc.weight", "transformer.resblocks.0.mlp.c_fc.weight")
    if not (vision_layers and text_layers) or any(k not in state for k in mlp_keys):
        raise ModelLoadError(
            f"OpenAI CLIP state dict has no complete residual blocks ({vision_layers} vision, {text_layers} text; "
            f"expected keys {list(mlp_keys)}); the checkpoint is truncated or not a CLIP"
        )
    vision_mlp = int(state[mlp_keys[0]].shape[0])
    text_mlp = int(state[mlp_keys[1]].shape[0])
    return CLIPConfig(
        text_config={
            "hidden_size": text_width,
            "intermediate_size": text_mlp,
            "num_hidden_layers": text_layers,
            "num_attention_heads": max(1, text_width // 64),
            "max_position_embeddings": int(state["positional_embedding"].shape[0]),
            "vocab_size": int(state["token_embedding.weight"].shape[0]),
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": vision_width,
            "intermediate_size": vision_mlp,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": max(1, vision_width // 64),
            "patch_size": patch,
            "image_size": patch * grid,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
        },
        projection_dim=int(state["text_projection"].shape[1]),
    )


def _block_map(src: str, dst: str, state: Mapping[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
    """Map one residual block from OpenAI names (``src``) to HF names (``dst``)."""
    q, k, v = state[f"{src}.attn.in_proj_weight"].chunk(3, dim=0)
    qb, kb, vb = state[f"{src}.attn.in_proj_bias"].chunk(3, dim=0)
    out.update({
        f"{dst}.self_attn.q_proj.weight": q, f"{dst}.self_attn.q_proj.bias": qb,
        f"{dst}.self_attn.k_proj.weight": k, f"{dst}.self_attn.k_proj.bias": kb,
        f"{dst}.self_attn.v_proj.weight": v, f"{dst}.self_attn.v_proj.bias": vb,
    })
    renames = {
        "attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
        "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
    }
    for old, new in renames.items():
        for kind in ("weight", "bias"):
            out[f"{dst}.{new}.{kind}"] = state[f"{src}.{old}.{kind}"]


def convert_openai_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename and reshape an OpenAI CLIP state dict into :class:`transformers.CLIPModel` keys.

    Args:
        state: Tensors keyed as in OpenAI's checkpoints.

    Returns:
        Tensors keyed as ``CLIPModel.state_dict()`` (float32).

    Raises:
        ModelLoadError: if a key is missing.

    Example:
        >>> hf = convert_openai_state_dict(load_openai_state_dict("ViT-B-16.pt"))  # doctest: +SKIP
    """
    state = {k: v.float() for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    try:
        v_pre, t_pre = "vision_model", "text_model"
        out[f"{v_pre}.embeddings.class_embedding"] = state["visual.class_embedding"]
        out[f"{v_pre}.embeddings.patch_embedding.weight"] = state["visual.conv1.weight"]
        out[f"{v_pre}.embeddings.position_embedding.weight"] = state["visual.positional_embedding"]
        for old, new in (("visual.ln_pre", "pre_layrnorm"), ("visual.ln_post", "post_layernorm")):
            out[f"{v_pre}.{new}.weight"] = state[f"{old}.weight"]
            out[f"{v_pre}.{new}.bias"] = state[f"{old}.bias"]
        for i in range(_count_blocks(state, "visual.transformer.resblocks.")):
            _block_map(f"visual.transformer.resblocks.{i}", f"{v_pre}.encoder.layers.{i}", state, out)
        out["visual_projection.weight"] = state["visual.proj"].t().contiguous()
        out[f"{t_pre}.embeddings.token_embedding.weight"] = state["token_embedding.weight"]
        out[f"{t_pre}.embeddings.position_embedding.weight"] = state["positional_embedding"]
        for i in range(_count_blocks(state, "transformer.resblocks.")):
            _block_map(f"transformer.resblocks.{i}", f"{t_pre}.encoder.layers.{i}", state, out)
        out[f"{t_pre}.final_layer_norm.weight"] = state["ln_final.weight"]
        out[f"{t_pre}.final_layer_norm.bias"] = state["ln_final.bias"]
        out["text_projection.weight"] = state["text_projection"].t().contiguous()
        out["logit_scale"] = state["logit_scale"].reshape(())
    except KeyError as err:
        raise ModelLoadError(f"OpenAI CLIP state dict is missing {err.args[0]!r}") from err
    return out


def _tensor_checksum(state: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _load_openai_checkpoint(path: Path, attn_implementation: str | None) -> tuple[CLIPModel, str]:
    state = load_openai_state_dict(path)
    config = clip_config_from_openai(state)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    hf_state = convert_openai_state_dict(state)
    model = CLIPModel(config)
    missing, unexpected = model.load_state_dict(hf_state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ModelLoadError(
            f"converting {str(path)!r} to CLIPModel left missing keys {missing[:5]} / unexpected keys {unexpected[:5]}"
        )
    return model, _file_sha256(path)
