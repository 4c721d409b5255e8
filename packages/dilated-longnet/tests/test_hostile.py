"""Hostile inputs to dilated-longnet: each is refused with a ValueError/TypeError naming the
argument, before any computation (or, for values, opt-in), never silently misread."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dilated.longnet import (
    DilatedTransformerDecoderLayer,
    DilatedTransformerEncoderLayer,
    LayerKVCache,
    LongNet,
    LongNetConfig,
    LongNetLM,
    TransformerLayerConfig,
    generate,
)

LAYER: dict[str, Any] = {
    "d_model": 16,
    "nhead": 4,
    "segment_lengths": (4, 8),
    "dilation_rates": (1, 2),
    "dim_feedforward": 32,
    "dropout": 0.0,
}
MODEL: dict[str, Any] = {
    **LAYER,
    "num_tokens": 10,
    "num_encoder_layers": 0,
    "num_decoder_layers": 1,
}

# field -> values it must refuse (each message names the field).
BAD_LAYER_FIELDS: dict[str, list[Any]] = {
    "segment_lengths": [{4, 8}, 8, None, "48", (w for w in (4, 8)), {4: 1, 8: 2}, (4, 0)],
    "dilation_rates": [{1, 2}, 1, None, "12", (1, -2)],
    "d_model": [0, -16, 16.0, "16", True],
    "nhead": [0, 2.5, None],
    "dim_feedforward": [0, "32", 1.5],
    "dropout": [1.0, -0.1, "0.1", True],
    "bias": ["no", 0, 1, None],
    "check_finite": ["no", 1],
    "layer_norm_eps": [0.0, "1e-5"],
    "gamma_init": [0.0, "1"],
    "activation": ["tanhh", 3],
    "num_kv_heads": [3, 0, "2"],
}
BAD_MODEL_FIELDS: dict[str, list[Any]] = {
    **{k: v for k, v in BAD_LAYER_FIELDS.items() if k not in ("nhead",)},
    "tie_weights": ["no", 1],
    "gradient_checkpointing": ["yes", 0],
    "num_tokens": [-1, 2.0, True],
    "rotary": ["alibi", 1],
}


def _bad_cases(table: dict[str, list[Any]]) -> list[tuple[str, Any]]:
    return [(name, value) for name, values in table.items() for value in values]


@pytest.mark.parametrize(("name", "value"), _bad_cases(BAD_LAYER_FIELDS))
def test_bad_layer_field_is_named(name: str, value: Any) -> None:
    if name == "segment_lengths" and hasattr(value, "__next__"):
        value = (w for w in (4, 8))  # a fresh generator: the first use exhausts it
    with pytest.raises((TypeError, ValueError), match=name):
        TransformerLayerConfig(**{**LAYER, name: value})
    if name == "segment_lengths" and hasattr(value, "__next__"):
        value = (w for w in (4, 8))
    with pytest.raises((TypeError, ValueError), match=name):
        DilatedTransformerEncoderLayer(**{**LAYER, name: value})


@pytest.mark.parametrize(("name", "value"), _bad_cases(BAD_MODEL_FIELDS))
def test_bad_model_field_is_named(name: str, value: Any) -> None:
    if name == "segment_lengths" and hasattr(value, "__next__"):
        value = (w for w in (4, 8))
    with pytest.raises((TypeError, ValueError), match=name):
        LongNetConfig(**{**MODEL, name: value})


@pytest.mark.parametrize("value", ["no", "False", 0])
def test_strings_and_ints_are_not_booleans(value: object) -> None:
    with pytest.raises(TypeError, match="bias must be a bool"):
        LongNetConfig(**{**MODEL, "bias": value})
    with pytest.raises(TypeError, match="cross_attention must be a bool"):
        DilatedTransformerDecoderLayer(**LAYER, cross_attention=value)  # type: ignore[arg-type]


def test_mask_in_the_is_causal_slot_is_named() -> None:
    layer = DilatedTransformerEncoderLayer(**LAYER)
    x = torch.randn(2, 8, 16)
    mask = torch.ones(2, 8, dtype=torch.bool)
    with pytest.raises(TypeError, match=r"is_causal must be a bool.*key_padding_mask"):
        layer(x, mask)  # type: ignore[arg-type]
    dec = DilatedTransformerDecoderLayer(**LAYER, cross_attention=False)
    with pytest.raises(TypeError, match="tgt_is_causal must be a bool"):
        dec(x, None, "true")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"src must be a torch\.Tensor"):
        layer(x.tolist())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"src must have shape \(batch, seq, d_model=16\)"):
        layer(x[..., :8])


def test_encoder_and_decoder_batches_must_agree() -> None:
    model = LongNet(**{k: v for k, v in MODEL.items() if k != "num_tokens"} | {
        "num_encoder_layers": 1})  # fmt: skip
    src, tgt = torch.randn(2, 8, 16), torch.randn(3, 8, 16)
    with pytest.raises(ValueError, match="tgt has batch 3 but src has batch 2"):
        model(src, tgt)
    dec = DilatedTransformerDecoderLayer(**LAYER)
    with pytest.raises(ValueError, match="memory has batch 2 but the decoder input has batch 3"):
        dec(tgt, src)
    assert model(src, torch.randn(2, 5, 16)).shape == (2, 5, 16)  # other lengths are fine


def test_token_ids_outside_the_vocabulary() -> None:
    model = LongNetLM(**MODEL)
    for bad in (10, -1, 99):
        ids = torch.tensor([[1, 2, bad]])
        with pytest.raises(
            ValueError, match=rf"input_ids must lie in \[0, num_tokens=10\), got id {bad}"
        ):
            model(ids)
        with pytest.raises(ValueError, match="num_tokens=10"):
            model.loss(ids)
        with pytest.raises(ValueError, match="num_tokens=10"):
            generate(model, ids, 2)
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(1, 3))
    with pytest.raises(TypeError, match=r"input_ids must be a torch\.Tensor"):
        model([[1, 2]])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="check_ids must be a bool"):
        model(torch.tensor([[1]]), check_ids="no")  # type: ignore[arg-type]


def test_kv_cache_of_another_batch_or_model() -> None:
    model = LongNetLM(**MODEL)
    cache = model.new_cache(2, 8)
    with pytest.raises(ValueError, match="cache was created for batch 2, got input_ids of batch 1"):
        model(torch.tensor([[1, 2]]), cache=cache)
    other = LongNetLM(**{**MODEL, "num_decoder_layers": 2}).new_cache(1, 8)
    with pytest.raises(ValueError, match="cache has 2 layer"):
        model(torch.tensor([[1, 2]]), cache=other)
    with pytest.raises(TypeError, match="cache must be a KVCache"):
        model(torch.tensor([[1, 2]]), cache={})  # type: ignore[arg-type]
    layer = LayerKVCache(2, 8, 4, 4, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="does not fit a KV cache of batch 2"):
        layer.write(0, torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4))  # would broadcast
    with pytest.raises(ValueError, match="does not fit a KV cache"):
        layer.write(0, torch.zeros(2, 3, 2, 4), torch.zeros(2, 3, 2, 4))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"top_k": True}, "top_k"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"temperature": "1"}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"use_cache": "yes"}, "use_cache"),
        ({"generator": 3}, "generator"),
    ],
)
def test_bad_sampling_arguments_are_named(kwargs: dict[str, Any], name: str) -> None:
    model = LongNetLM(**MODEL)
    with pytest.raises((TypeError, ValueError), match=name):
        generate(model, torch.tensor([[1, 2]]), 2, **{"temperature": 1.0, **kwargs})


def test_generate_refuses_what_is_not_a_model() -> None:
    with pytest.raises(TypeError, match="model must be a LongNetLM"):
        generate(object(), torch.tensor([[1]]), 1)  # type: ignore[arg-type]


def test_check_finite_is_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DILATED_CHECK_FINITE", raising=False)
    ids = torch.tensor([[1, 2, 3]])
    for check in (None, True):
        torch.manual_seed(0)
        model = LongNetLM(**{**MODEL, "check_finite": check})
        with torch.no_grad():
            model.embedding.weight[2] = float("nan")
        if check:
            with pytest.raises(ValueError, match="holds NaN or Inf"):
                model(ids)
        else:
            assert torch.isnan(model(ids)).any()  # propagates, as in dense attention


def test_meta_device_model_gives_logits_shape() -> None:
    model = LongNetLM(**MODEL, device="meta")
    ids = torch.zeros(2, 12, dtype=torch.long, device="meta")
    logits = model(ids)
    assert logits.shape == (2, 12, 10) and logits.device.type == "meta"
