"""Hostile inputs to dilated-longnet: each is refused with a ValueError/TypeError naming the
argument, before any computation (or, for values, opt-in), never silently misread."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dilated.core.testing import assert_close_to_reference, dense_dilated_attention
from dilated.longnet import (
    DilatedTransformerDecoderLayer,
    DilatedTransformerEncoderLayer,
    LayerKVCache,
    LongNet,
    LongNetConfig,
    LongNetLM,
    RotaryEmbedding,
    TransformerLayerConfig,
    cached_dilated_attention,
    generate,
)
from dilated.longnet.kv_cache import dilated_attention_at

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
    "layer_norm_eps": [0.0, "1e-5", float("inf"), float("nan")],
    "gamma_init": [0.0, "1", float("inf")],
    "activation": ["tanhh", 3],
    "num_kv_heads": [3, 0, "2"],
}
BAD_MODEL_FIELDS: dict[str, list[Any]] = {
    **{k: v for k, v in BAD_LAYER_FIELDS.items() if k not in ("nhead",)},
    "tie_weights": ["no", 1],
    "gradient_checkpointing": ["yes", 0],
    "num_tokens": [-1, 2.0, True],
    "rotary": ["alibi", 1],
    "rotary_base": [float("inf"), float("nan"), 0, -1.0, "10000", True],
    "xpos_scale_base": [float("inf"), 0.0, "512", None],
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


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"base": float("inf")}, r"base must be a finite positive number, got inf"),
        ({"base": float("nan")}, r"base must be a finite positive number"),
        ({"base": 0}, r"base must be a finite positive number"),
        ({"base": "10000"}, r"base must be a finite positive number, got str '10000'"),
        ({"base": True}, r"base must be a finite positive number"),
        ({"xpos_scale_base": float("inf")}, r"xpos_scale_base must be a finite positive number"),
        ({"xpos_scale_base": -512.0}, r"xpos_scale_base must be a finite positive number"),
        ({"xpos_scale_base": "512"}, r"xpos_scale_base must be a finite positive number"),
    ],
)
def test_rotary_numbers_must_be_finite_and_positive(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RotaryEmbedding(8, **kwargs)


@pytest.mark.parametrize(
    ("field", "value"), [("rotary_base", float("inf")), ("xpos_scale_base", float("inf"))]
)
def test_models_refuse_a_degenerate_rotary(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"{field} must be a finite positive number, got inf"):
        LongNetLM(**MODEL, rotary="xpos", **{field: value})


def _cache_case() -> tuple[torch.Tensor, LayerKVCache]:
    g = torch.Generator().manual_seed(0)
    cache = LayerKVCache(1, 16, 4, 8, dtype=torch.float64, device="cpu")
    kv = torch.randn(2, 1, 16, 4, 8, generator=g, dtype=torch.float64)
    cache.write(0, kv[0], kv[1])
    return torch.randn(1, 1, 4, 8, generator=g, dtype=torch.float64), cache


@pytest.mark.parametrize(
    ("position", "ws", "rs", "heads", "error", "match"),
    [
        (16, (8,), (1,), 4, ValueError, r"position must be an integer in \[0, 16\) \(the KV cache holds 16 positions; create it with a larger max_length\), got 16"),
        (99, (8,), (1,), 4, ValueError, r"position must be an integer in \[0, 16\)"),
        (-1, (8,), (1,), 4, ValueError, r"position must be an integer in \[0, 16\)"),
        (3.0, (8,), (1,), 4, ValueError, r"position must be an integer"),
        (5, (8,), (3,), 4, ValueError, r"segment_lengths\[0\]=8 must be a multiple of dilation_rates\[0\]=3"),
        (5, {4, 8}, (1, 2), 4, TypeError, r"segment_lengths must be a sequence"),
        (5, (4, 8), {1, 2}, 4, TypeError, r"dilation_rates must be a sequence"),
        (5, (8,), (1,), 3, ValueError, r"query heads \(3\) must be a multiple of key/value heads \(4\)"),
        (5, (8,), (2**62,), 4, ValueError, r"dilation_rates\[0\]=\d+ must be at most 2\*\*40"),
    ],
)  # fmt: skip
def test_cached_attention_refuses_what_the_op_refuses(
    position: Any, ws: Any, rs: Any, heads: int, error: type[Exception], match: str
) -> None:
    q, cache = _cache_case()
    q = q[:, :, :heads]
    with pytest.raises(error, match=match):
        cached_dilated_attention(q, cache, position, ws, rs)
    if not (isinstance(position, int) and position >= 16):
        with pytest.raises(error, match=match.replace("the KV cache", "k")):
            dilated_attention_at(q, cache.k, cache.v, position, ws, rs)


def test_cached_attention_checks_its_tensors_and_scale() -> None:
    q, cache = _cache_case()
    with pytest.raises(ValueError, match=r"a decoding step takes q of shape \(batch, 1, heads"):
        cached_dilated_attention(q.expand(1, 2, 4, 8), cache, 3, (8,), (1,))
    with pytest.raises(ValueError, match="q, k and v must share one dtype"):
        cached_dilated_attention(q.float(), cache, 3, (8,), (1,))
    with pytest.raises(ValueError, match="scale must be a finite positive number"):
        cached_dilated_attention(q, cache, 3, (8,), (1,), scale=float("inf"))
    with pytest.raises(TypeError, match="cache must be a LayerKVCache"):
        cached_dilated_attention(q, {"k": cache.k}, 3, (8,), (1,))  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"key_padding_mask must have shape \(batch, seq\) = \(1, 16\)"
    ):
        dilated_attention_at(q, cache.k, cache.v, 3, (8,), (1,), key_padding_mask=torch.ones(1, 1, dtype=torch.bool))  # fmt: skip
    # The last position of the cache is valid, and equals the dense judge's row.
    ref, _ = dense_dilated_attention(q.expand(1, 16, 4, 8), cache.k, cache.v, (4, 8), (1, 2), is_causal=True)  # fmt: skip
    got = cached_dilated_attention(q, cache, 15, (4, 8), (1, 2))
    assert_close_to_reference(got.float(), ref[:, 15:], torch.float32)


@pytest.mark.parametrize(
    ("batch", "max_length", "match"),
    [
        (-1, 8, r"batch must be a positive integer, got -1"),
        (0, 8, r"batch must be a positive integer, got 0"),
        (1.0, 8, r"batch must be a positive integer, got 1.0"),
        (1, 2.5, r"max_length must be a positive integer, got 2.5"),
        (1, 0, r"max_length must be a positive integer, got 0"),
        (1, True, r"max_length must be a positive integer, got True"),
    ],
)
def test_new_cache_sizes_are_positive_ints(batch: Any, max_length: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LongNetLM(**MODEL).new_cache(batch, max_length)
    layer = LayerKVCache(1, 4, 2, 4, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match=r"offset must be an integer in \[0, 4\)"):
        layer.write(-1, torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4))


@pytest.mark.parametrize("temperature", [1e-45, 1e-300, 5e-324])
def test_a_tiny_temperature_is_greedy(temperature: float) -> None:
    torch.manual_seed(0)
    model = LongNetLM(**MODEL)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    sampled = generate(model, ids, 6, temperature=temperature, generator=torch.Generator())
    assert torch.equal(sampled, generate(model, ids, 6))  # temperature 0: argmax
