"""DilatedAttention and MultiheadDilatedAttention against the functional op and the dense judge."""

from __future__ import annotations

import math

import pytest
import torch

from dilated.core import (
    DilatedAttention,
    DilatedAttentionConfig,
    MultiheadConfig,
    MultiheadDilatedAttention,
    dilated_attention,
)
from dilated.core.testing import assert_close_to_reference, dense_dilated_attention, make_inputs


def test_dilated_attention_module_matches_functional_and_keeps_old_signature() -> None:
    attn = DilatedAttention([8, 16], [1, 2], softmax_scale=0.2, attention_dropout=0.0)
    inp = make_inputs(2, 40, 4, 8, kv_heads=2, seed=1)
    out = attn(inp.q, inp.k, inp.v, is_causal=True)
    want = dilated_attention(inp.q, inp.k, inp.v, [8, 16], [1, 2], scale=0.2, is_causal=True)
    assert torch.equal(out, want)
    assert torch.equal(
        DilatedAttention(DilatedAttentionConfig((8, 16), (1, 2), scale=0.2))(
            inp.q, inp.k, inp.v, True
        ),
        want,
    )
    assert "segment_lengths=[8, 16]" in repr(attn)


def test_config_causal_default_and_call_override() -> None:
    attn = DilatedAttention(DilatedAttentionConfig((8,), (1,), is_causal=True))
    inp = make_inputs(1, 16, 2, 4, seed=2)
    causal = dilated_attention(inp.q, inp.k, inp.v, [8], [1], is_causal=True)
    assert torch.equal(attn(inp.q, inp.k, inp.v), causal)
    assert not torch.equal(attn(inp.q, inp.k, inp.v, is_causal=False), causal)


def test_dropout_only_in_training() -> None:
    attn = DilatedAttention([8], [1], attention_dropout=0.5)
    inp = make_inputs(1, 16, 2, 4, seed=3)
    attn.eval()
    assert torch.equal(attn(inp.q, inp.k, inp.v), attn(inp.q, inp.k, inp.v))
    attn.train()
    torch.manual_seed(0)
    assert not torch.equal(attn(inp.q, inp.k, inp.v), attn(inp.q, inp.k, inp.v))


def test_op_argument_warns() -> None:
    with pytest.warns(DeprecationWarning, match="op= selected an xformers operator"):
        DilatedAttention([8], [1], op=object())


@pytest.mark.parametrize("num_kv_heads", [None, 2])
@pytest.mark.parametrize("layer_norm", [True, False])
def test_multihead_matches_manual_computation(num_kv_heads: int | None, layer_norm: bool) -> None:
    torch.manual_seed(0)
    e, h, n = 32, 4, 24
    mha = MultiheadDilatedAttention(
        e, h, [1, 2], [8, 24], layer_norm=layer_norm, num_kv_heads=num_kv_heads, dtype=torch.float64
    )
    x = torch.randn(2, n, e, dtype=torch.float64)
    out, weights = mha(x, x, x, is_causal=True)
    assert weights is None and out.shape == (2, n, e)
    hkv = num_kv_heads or h
    q = mha.q_proj(x).view(2, n, h, e // h)
    k = mha.k_proj(x).view(2, n, hkv, e // h)
    v = mha.v_proj(x).view(2, n, hkv, e // h)
    ref, _ = dense_dilated_attention(q, k, v, [8, 24], [1, 2], is_causal=True)
    ref = ref.reshape(2, n, e)
    if layer_norm:
        assert mha.norm is not None
        ref = mha.norm(ref)
    assert_close_to_reference(out, mha.out_proj(ref), torch.float64)


def test_multihead_from_configs_and_magneto_init() -> None:
    torch.manual_seed(0)
    mc = MultiheadConfig(embed_dim=256, num_heads=8, gamma_init=2.0, bias=True)
    mha = MultiheadDilatedAttention(mc, DilatedAttentionConfig((16,), (1,)))
    xavier_std = math.sqrt(2.0 / (256 + 256))
    assert mha.q_proj.weight.std().item() == pytest.approx(xavier_std, rel=0.05)
    assert mha.v_proj.weight.std().item() == pytest.approx(2.0 * xavier_std, rel=0.05)
    assert mha.out_proj.weight.std().item() == pytest.approx(2.0 * xavier_std, rel=0.05)
    assert mha.q_proj.bias is not None and torch.equal(mha.q_proj.bias, torch.zeros(256))
    assert mha.embed_dim == 256 and mha.num_heads == 8


def test_multihead_errors() -> None:
    mha = MultiheadDilatedAttention(32, 4, [1], [8])
    x = torch.randn(1, 8, 32)
    with pytest.raises(ValueError, match="need_weights=True is not supported"):
        mha(x, x, x, need_weights=True)
    with pytest.raises(ValueError, match="attn_mask is not supported"):
        mha(x, x, x, attn_mask=torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"query must have shape \(batch, seq, embed_dim=32\)"):
        mha(x[..., :16], x, x)
    with pytest.raises(ValueError, match=r"embed_dim .* divisible by num_heads"):
        MultiheadDilatedAttention(30, 4, [1], [8])
    with pytest.raises(ValueError, match="second argument must be a DilatedAttentionConfig"):
        MultiheadDilatedAttention(MultiheadConfig(32, 4), 4)


def test_key_padding_mask_through_multihead() -> None:
    torch.manual_seed(0)
    mha = MultiheadDilatedAttention(16, 2, [1, 2], [4, 8], dtype=torch.float64)
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, 6:] = True  # PyTorch's convention: True = padding
    out, _ = mha(x, x, x, key_padding_mask=mask)
    y = x.clone()
    y[:, 6:] += 100.0  # padded keys/values change; outputs of the other positions must not
    out2, _ = mha(x, y, y, key_padding_mask=mask)
    torch.testing.assert_close(out[:, :6], out2[:, :6])
