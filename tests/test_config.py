"""PriorConfig: presets and how they differ, validation messages, (de)serialisation round trips."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipprior import PRESETS, ConfigError, PriorConfig, get_preset, list_presets


def test_presets_and_exactly_where_they_differ() -> None:
    assert list_presets() == ["default", "official", "paper"]
    assert get_preset("default") == PriorConfig()
    default, official, paper = (get_preset(n) for n in ("default", "official", "paper"))
    # 'official' = the code of the paper's authors: ground-truth context classes and the FSS
    # trainers' ImageNet-normalised tensors for VVP; everything else as 'default'.
    assert default.diff(official) == {"text_classes": ("target", "present"), "vvp_pixel_norm": ("clip", "imagenet")}
    # 'paper' = the equations: no extra squaring of R (Eq. 10) and min-max normalised VVP (Eq. 8).
    assert default.diff(paper) == {"pir_square": (True, False), "vvp_normalize": (False, True)}
    assert default.pir_layers == 8 and default.pir_box_threshold == 0.4 and default.pir_sinkhorn_iters == 1
    assert default.vvp_layers == (-1, -2) and default.text_classes == "target"
    assert default.fg_template == "a photo of {}." and default.bg_template == "a photo without {}."


def test_unknown_preset_lists_the_names() -> None:
    with pytest.raises(ConfigError, match=r"unknown preset 'fast'; choose one of \['default', 'official', 'paper'\]"):
        get_preset("fast")


def test_config_is_frozen_and_hashable() -> None:
    config = PriorConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.pir_layers = 3  # type: ignore[misc]
    assert hash(config) == hash(PriorConfig()) and len({config, get_preset("default"), get_preset("paper")}) == 2


@pytest.mark.parametrize(("field", "value", "choices"), [
    ("text_classes", "all", "['target', 'present']"),
    ("vtp_resample", "lanczos", "['bicubic', 'bilinear', 'nearest']"),
    ("pos_interpolation", "nearest", "['bilinear', 'bicubic']"),
    ("vvp_pixel_norm", "none", "['clip', 'imagenet']"),
    ("vvp_mask_resize", "bilinear", "['nearest', 'area']"),
])
def test_invalid_choices_list_the_valid_ones(field: str, value: str, choices: str) -> None:
    with pytest.raises(ConfigError) as info:
        PriorConfig(**{field: value})
    assert f"PriorConfig.{field}={value!r} is not valid; choose one of {choices}" in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(("changes", "pattern"), [
    ({"fg_template": "a photo."}, r"fg_template='a photo\.' must contain exactly one '\{\}'"),
    ({"bg_template": "{} and {}"}, r"bg_template=.* must contain exactly one"),
    ({"cam_norm_passes": -1}, r"cam_norm_passes=-1 must be >= 0"),
    ({"pir_layers": 0}, r"pir_layers=0 must be >= 1"),
    ({"pir_sinkhorn_iters": -2}, r"pir_sinkhorn_iters=-2 must be >= 0"),
    ({"pir_box_threshold": 1.0}, r"pir_box_threshold=1\.0 must be in \[0, 1\)"),
    ({"pir_box_threshold": float("nan")}, r"pir_box_threshold=nan must be in"),
    ({"vvp_layers": ()}, r"vvp_layers is empty"),
    ({"logit_scale": 0.0}, r"logit_scale=0\.0 must be positive"),
    ({"logit_scale": float("inf")}, r"logit_scale=inf must be positive and finite"),
    ({"cam_eps": -1e-7}, r"cam_eps=-1e-07 must be a finite number >= 0"),
    ({"vvp_eps": float("nan")}, r"vvp_eps=nan must be a finite number >= 0"),
    # Wrong types (e.g. from hand-edited JSON) are named, not accepted or crashed on.
    ({"pir_square": "false"}, r"pir_square='false' has type str; expected bool"),
    ({"vvp_normalize": 1}, r"vvp_normalize=1 has type int; expected bool"),
    ({"pir_layers": "8"}, r"pir_layers='8' has type str; expected int"),
    ({"pir_layers": 8.5}, r"pir_layers=8\.5 has type float; expected int"),
    ({"pir_layers": True}, r"pir_layers=True has type bool; expected int"),
    ({"pir_box_threshold": "0.4"}, r"has type str; expected number"),
    ({"fg_template": 3}, r"fg_template=3 has type int; expected str"),
    ({"vvp_layers": -1}, r"vvp_layers=-1 must be a list of int layer indices"),
    ({"vvp_layers": [1.5]}, r"vvp_layers=\[1\.5\] must be a list of int"),
    ({"vvp_layers": "-1"}, r"must be a list of int"),
])
def test_invalid_values_are_named(changes: dict[str, object], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        PriorConfig(**changes)
    with pytest.raises(ConfigError, match=pattern):
        PriorConfig().replace(**changes)


def test_replace() -> None:
    base = get_preset("official")
    changed = base.replace(pir_layers=4, vvp_layers=[-1])
    assert changed.pir_layers == 4 and changed.vvp_layers == (-1,) and base.pir_layers == 8
    assert changed.text_classes == "present"  # the rest is kept
    with pytest.raises(ConfigError, match=r"unknown PriorConfig field\(s\) \['pir_layer'\]; valid: \[.*'pir_layers'"):
        base.replace(pir_layer=4)


def test_numbers_are_stored_as_plain_python_numbers() -> None:
    config = PriorConfig(pir_layers=np.int64(4), cam_eps=0, logit_scale=100, vvp_layers=(np.int32(-1),))
    assert type(config.pir_layers) is int and type(config.cam_eps) is float and type(config.logit_scale) is float
    assert type(config.vvp_layers[0]) is int
    assert json.loads(config.to_json())["pir_layers"] == 4


@pytest.mark.parametrize("name", list(PRESETS))
def test_json_round_trip_of_presets(name: str) -> None:
    config = get_preset(name)
    text = config.to_json()
    assert json.loads(text) == config.to_dict()
    assert list(json.loads(text)) == sorted(json.loads(text))  # canonical: sorted keys
    assert PriorConfig.from_json(text) == config
    assert PriorConfig.from_dict(config.to_dict()) == config
    assert isinstance(config.to_dict()["vvp_layers"], list)


def test_from_dict_rejects_unknown_keys_and_bad_values() -> None:
    data = PriorConfig().to_dict()
    with pytest.raises(ConfigError, match=r"unknown PriorConfig field\(s\) \['colour'\]"):
        PriorConfig.from_dict({**data, "colour": "red"})
    with pytest.raises(ConfigError, match=r"pir_square='false' has type str"):
        PriorConfig.from_json(json.dumps({**data, "pir_square": "false"}))
    assert PriorConfig.from_dict({"pir_layers": 3}) == PriorConfig(pir_layers=3)  # missing keys: defaults


def test_diff() -> None:
    a = PriorConfig()
    assert a.diff(a) == {}
    assert a.diff(a.replace(vvp_layers=(0,))) == {"vvp_layers": ([-1, -2], [0])}


_configs = st.builds(
    PriorConfig,
    fg_template=st.sampled_from(["a photo of {}.", "{}", "there is a {} here"]),
    text_classes=st.sampled_from(["target", "present"]),
    logit_scale=st.none() | st.floats(0.1, 1000),
    vtp_resample=st.sampled_from(["bicubic", "bilinear", "nearest"]),
    cam_norm_passes=st.integers(0, 3),
    cam_eps=st.floats(0, 1e-3),
    pir_layers=st.integers(1, 24),
    pir_sinkhorn_iters=st.integers(0, 5),
    pir_square=st.booleans(),
    pir_box_threshold=st.floats(0, 0.99),
    vvp_layers=st.lists(st.integers(-24, 23), min_size=1, max_size=4).map(tuple),
    vvp_normalize=st.booleans(),
    vvp_mask_resize=st.sampled_from(["nearest", "area"]),
    vvp_pixel_norm=st.sampled_from(["clip", "imagenet"]),
)


@settings(max_examples=100, deadline=None)
@given(_configs)
def test_json_round_trip_of_any_valid_config(config: PriorConfig) -> None:
    again = PriorConfig.from_json(config.to_json())
    assert again == config and again.to_json() == config.to_json()
    assert PriorConfig().diff(config) == {k: (v, config.to_dict()[k]) for k, v in PriorConfig().to_dict().items()
                                          if v != config.to_dict()[k]}


def test_config_choices_are_the_values_the_config_accepts() -> None:
    from clipprior.config import config_choices

    for value in config_choices("geometry"):
        assert PriorConfig(geometry=value).geometry == value
    assert config_choices("text_classes")[0] == PriorConfig().text_classes
    with pytest.raises(ConfigError, match="no fixed set of choices"):
        config_choices("geometry_size")
