"""Bad configurations raise ValueError naming the argument and the rule."""

from __future__ import annotations

from typing import Any

import pytest

from dilated.longnet import (
    LONGNET_PRESETS,
    DilatedTransformerEncoderLayer,
    LongNet,
    LongNetConfig,
    LongNetLM,
    TransformerLayerConfig,
)

LAYER = {"d_model": 16, "nhead": 4, "segment_lengths": (4, 8), "dilation_rates": (1, 2)}
MODEL = {
    "num_tokens": 10,
    "d_model": 16,
    "nhead": 4,
    "num_encoder_layers": 0,
    "num_decoder_layers": 1,
    "segment_lengths": (4, 8),
    "dilation_rates": (1, 2),
    "dim_feedforward": 32,
}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"nhead": 3}, r"d_model \(16\) must be divisible by nhead \(3\)"),
        ({"d_model": 0}, "d_model"),
        ({"num_kv_heads": 3}, "num_kv_heads"),
        ({"segment_lengths": (4, 6), "dilation_rates": (1, 4)}, "segment"),
        ({"segment_lengths": (4,), "dilation_rates": (1, 2)}, "dilation_rates|segment_lengths"),
        ({"dropout": 1.0}, "dropout"),
        ({"activation": "tanhh"}, "activation"),
        ({"layer_norm_eps": 0.0}, "layer_norm_eps"),
        ({"gamma_init": -1.0}, "gamma_init"),
        ({"dim_feedforward": 0}, "dim_feedforward"),
    ],
)
def test_layer_config_errors(change: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TransformerLayerConfig(**{**LAYER, **change})
    with pytest.raises(ValueError, match=match):
        DilatedTransformerEncoderLayer(**{**LAYER, **change})


def test_layer_config_is_frozen_and_normalised() -> None:
    c = TransformerLayerConfig(**{**LAYER, "segment_lengths": [4, 8], "dilation_rates": [1, 2]})
    assert c.segment_lengths == (4, 8) and c.head_dim == 4
    with pytest.raises(AttributeError):
        c.d_model = 8  # type: ignore[misc]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"num_decoder_layers": 0}, "at least one layer"),
        ({"num_tokens": -1}, "num_tokens"),
        ({"rotary": "alibi"}, "rotary"),
        ({"d_model": 12, "nhead": 4}, "even head_dim"),
        ({"xpos_scale_base": 0}, "xpos_scale_base"),
    ],
)
def test_model_config_errors(change: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LongNetConfig(**{**MODEL, **change})


def test_model_kind_errors() -> None:
    with pytest.raises(ValueError, match="decoder-only"):
        LongNetLM(**{**MODEL, "num_encoder_layers": 1})
    with pytest.raises(ValueError, match="encoder-decoder"):
        LongNet(**{k: v for k, v in MODEL.items() if k != "num_tokens"})
    with pytest.raises(ValueError, match="unknown kind"):
        LongNetLM(**{**MODEL, "attention_type": "no_such_kind"})
    with pytest.raises(ValueError, match="unknown LongNet preset"):
        LongNetConfig.from_preset("longnet_2m")
    with pytest.raises(ValueError, match="unknown LongNetConfig field"):
        LongNetConfig.from_preset("longnet_tiny", width=3)


@pytest.mark.parametrize("name", sorted(LONGNET_PRESETS))
def test_presets_are_valid(name: str) -> None:
    c = LongNetConfig.from_preset(name)
    assert c.num_encoder_layers == 0 and max(c.segment_lengths) >= 128
