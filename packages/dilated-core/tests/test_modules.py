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


class _ScaledAttention(DilatedAttention):
    """An attention with a setting of its own: its output times ``factor``."""

    def __init__(
        self, *args: object, factor: float = 1.0, check_finite: bool | None = None, **kw: object
    ) -> None:
        super().__init__(*args, check_finite=check_finite, **kw)  # type: ignore[arg-type]
        self.factor = factor

    def _attention(self, q, k, v, **kw):  # type: ignore[no-untyped-def]
        return super()._attention(q, k, v, **kw) * self.factor


class _ScaledMultihead(MultiheadDilatedAttention):
    attention_class = _ScaledAttention


def test_attention_settings_lists_the_keyword_settings() -> None:
    from dilated.core.base import attention_settings

    assert attention_settings(DilatedAttention) == ("check_finite",)
    # Keyword-only parameters of the class, then those its **kw reaches; never is_causal.
    assert attention_settings(_ScaledAttention) == ("factor", "check_finite")


@pytest.mark.parametrize("from_configs", [False, True])
def test_multihead_hands_every_setting_to_its_attention_constructor(from_configs: bool) -> None:
    """A setting given to the multi-head constructor is the inner attention's from its own
    constructor on (not assigned after it), and changes the layer's output accordingly."""
    torch.manual_seed(0)
    if from_configs:
        args: tuple[object, ...] = (
            MultiheadConfig(embed_dim=16, num_heads=2),
            DilatedAttentionConfig((4, 8), (1, 2)),
        )
    else:
        args = (16, 2, [1, 2], [4, 8])
    plain = MultiheadDilatedAttention(*args)  # type: ignore[arg-type]
    scaled = _ScaledMultihead(*args, factor=3.0, check_finite=True)  # type: ignore[arg-type]
    assert isinstance(scaled.attention, _ScaledAttention)
    assert (scaled.attention.factor, scaled.attention.check_finite) == (3.0, True)
    assert plain.attention.check_finite is None
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(2, 16, 16, dtype=torch.float64)
    plain.double()
    scaled.double()
    q, k, v = plain.project_inputs(x, x, x)
    inner = plain.attention(q, k, v, is_causal=True)
    want = plain.project_output(inner * 3.0)
    assert_close_to_reference(scaled(x, x, x, is_causal=True)[0], want, torch.float64)


def test_multihead_refuses_a_keyword_its_attention_does_not_take() -> None:
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) fator; .* are factor"):
        _ScaledMultihead(16, 2, [1], [4], fator=3.0)
    # What the config holds is not a setting: it would be silently dropped by the inner module.
    with pytest.raises(TypeError, match="attention_dropout"):
        MultiheadDilatedAttention(16, 2, [1], [4], attention_dropout=0.5)
    with pytest.raises(TypeError, match=r"backend; the settings of its attention are check_finite"):
        MultiheadDilatedAttention(16, 2, [1], [4], backend="sdpa")


def test_a_subclass_written_for_the_old_hook_still_builds() -> None:
    """``_make_attention(config)`` without settings (dilated-attention-pytorch 0.2.0's hook)."""
    from dilated.core import BaseMultiheadDilatedAttention

    class Old(BaseMultiheadDilatedAttention):
        def _make_attention(self, config: DilatedAttentionConfig) -> DilatedAttention:  # type: ignore[override]
            return DilatedAttention(config)

    layer = Old(16, 2, [1], [4], check_finite=True)
    assert isinstance(layer.attention, DilatedAttention) and layer.attention.check_finite is True
    with pytest.raises(TypeError, match=r"factor; the settings of its attention are none"):
        Old(16, 2, [1], [4], factor=2.0)

    class Nothing(BaseMultiheadDilatedAttention):
        pass

    with pytest.raises(TypeError, match="Nothing sets no attention_class"):
        Nothing(16, 2, [1], [4])


@pytest.mark.parametrize("num_kv_heads", [None, 1])
def test_project_inputs_and_output_are_the_forward(num_kv_heads: int | None) -> None:
    """forward == project_output(attention(*project_inputs(...))), with key/value of another
    length than the query (the heads are split per tensor)."""
    torch.manual_seed(1)
    mha = MultiheadDilatedAttention(16, 2, [1], [4], num_kv_heads=num_kv_heads, dtype=torch.float64)
    x = torch.randn(3, 8, 16, dtype=torch.float64)
    q, k, v = mha.project_inputs(x, x[:, :5], x[:, :5])
    assert q.shape == (3, 8, 2, 8) and k.shape == v.shape == (3, 5, num_kv_heads or 2, 8)
    q, k, v = mha.project_inputs(x, x, x)
    manual = mha.project_output(mha.attention(q, k, v, is_causal=True))
    assert torch.equal(mha(x, x, x, is_causal=True)[0], manual)
    assert manual.shape == x.shape
