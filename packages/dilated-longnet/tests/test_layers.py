"""Layers: shapes, masks, causality, the dense reference, and every installed attention kind."""

from __future__ import annotations

import pytest
import torch

from dilated.core import available_implementations
from dilated.core.testing import assert_close_to_reference, dense_dilated_attention
from dilated.longnet import (
    DilatedTransformerDecoderLayer,
    DilatedTransformerEncoderLayer,
    RotaryEmbedding,
    create_decoder_layer,
    create_encoder_layer,
)
from dilated.longnet.layers import _dilated_self_attention

KW = {"d_model": 32, "nhead": 4, "dim_feedforward": 64, "dropout": 0.0}
BRANCHES = [((8,), (1,)), ((4, 8), (1, 2)), ((4, 8, 16), (1, 2, 4))]


def _layer(
    ws: tuple[int, ...], rs: tuple[int, ...], **kw: object
) -> DilatedTransformerEncoderLayer:
    torch.manual_seed(0)
    return DilatedTransformerEncoderLayer(
        segment_lengths=ws,
        dilation_rates=rs,
        **{**KW, **kw},  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(("ws", "rs"), BRANCHES)
@pytest.mark.parametrize("seq", [16, 13])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [None, 2])
def test_self_attention_matches_dense_reference(
    ws: tuple[int, ...], rs: tuple[int, ...], seq: int, causal: bool, kv_heads: int | None
) -> None:
    layer = _layer(ws, rs, num_kv_heads=kv_heads, dtype=torch.float64)
    mha = layer.self_attn
    x = torch.randn(2, seq, 32, dtype=torch.float64)
    rot = RotaryEmbedding(8)
    got = _dilated_self_attention(
        mha, x, is_causal=causal, key_padding_mask=None, rotary=rot, cache=None, offset=0
    )
    hk = kv_heads or 4
    q = mha.q_proj(x).view(2, seq, 4, 8)
    k = mha.k_proj(x).view(2, seq, hk, 8)
    v = mha.v_proj(x).view(2, seq, hk, 8)
    q, k = rot(q, k)
    ref, _ = dense_dilated_attention(q, k, v, ws, rs, is_causal=causal)
    expected = mha.out_proj(mha.norm(ref.reshape(2, seq, 32)))
    assert_close_to_reference(got, expected, torch.float32)


@pytest.mark.parametrize(("ws", "rs"), BRANCHES)
def test_shapes_and_causality(ws: tuple[int, ...], rs: tuple[int, ...]) -> None:
    layer = _layer(ws, rs).eval()
    x = torch.randn(2, 16, 32)
    y = layer(x, is_causal=True)
    assert y.shape == x.shape and y.dtype == x.dtype
    x2 = x.clone()
    x2[:, 10:] = torch.randn(2, 6, 32)
    y2 = layer(x2, is_causal=True)
    torch.testing.assert_close(y2[:, :10], y[:, :10])
    assert not torch.allclose(y2[:, 10:], y[:, 10:])
    # Bidirectional: the future does change the past.
    assert not torch.allclose(layer(x2)[:, :10], layer(x)[:, :10])


def test_key_padding_mask_hides_padded_tokens() -> None:
    layer = _layer((4, 8), (1, 2)).eval()
    x = torch.randn(2, 16, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[1, 12:] = True  # PyTorch's convention: True = padding
    x2 = x.clone()
    x2[1, 12:] = 100 * torch.randn(4, 32)
    y, y2 = layer(x, src_key_padding_mask=mask), layer(x2, src_key_padding_mask=mask)
    torch.testing.assert_close(y[:, :12], y2[:, :12])
    torch.testing.assert_close(y[0], y2[0])


def test_decoder_cross_attention_over_memory_of_another_length() -> None:
    torch.manual_seed(0)
    layer = create_decoder_layer(segment_lengths=(4, 8), dilation_rates=(1, 2), **KW).eval()
    tgt, mem = torch.randn(2, 8, 32), torch.randn(2, 20, 32)
    mmask = torch.zeros(2, 20, dtype=torch.bool)
    mmask[:, 15:] = True
    y = layer(tgt, mem, memory_key_padding_mask=mmask)
    assert y.shape == (2, 8, 32)
    mem2 = mem.clone()
    mem2[:, 15:] = torch.randn(2, 5, 32)
    torch.testing.assert_close(layer(tgt, mem2, memory_key_padding_mask=mmask), y)
    assert not torch.allclose(layer(tgt, mem2), layer(tgt, mem))
    with pytest.raises(ValueError, match="memory is required"):
        layer(tgt)
    with pytest.raises(ValueError, match="memory_key_padding_mask"):
        layer(tgt, mem, memory_key_padding_mask=mmask[:, :10])
    no_cross = DilatedTransformerDecoderLayer(
        segment_lengths=(4,), dilation_rates=(1,), cross_attention=False, **KW
    )
    with pytest.raises(ValueError, match="cross_attention=False"):
        no_cross(tgt, mem)


def test_magneto_structure_and_init() -> None:
    layer = _layer((4,), (1,), gamma_init=2.0)
    assert layer.self_attn.norm is not None  # Sub-LN before the attention output projection
    # Xavier-normal std is gain * sqrt(2 / (fan_in + fan_out)); gain 2 on the FFN and v/out.
    std = layer.linear1.weight.std().item()
    assert std == pytest.approx(2.0 * (2 / (32 + 64)) ** 0.5, rel=0.15)
    q_std = layer.self_attn.q_proj.weight.std().item()
    assert q_std == pytest.approx((2 / 64) ** 0.5, rel=0.15)


KINDS = sorted(name for name, impl in available_implementations().items() if not impl.distributed)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("causal", [False, True])
def test_every_kind_equals_standard(kind: str, causal: bool) -> None:
    ref = create_encoder_layer("standard", segment_lengths=(4, 8), dilation_rates=(1, 2), **KW)
    other = create_encoder_layer(kind, segment_lengths=(4, 8), dilation_rates=(1, 2), **KW)
    other.load_state_dict(ref.state_dict())
    x = torch.randn(2, 16, 32)
    assert_close_to_reference(
        other.eval()(x, is_causal=causal), ref.eval()(x, is_causal=causal).double(), torch.float32
    )
