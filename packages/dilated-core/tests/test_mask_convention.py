"""key_padding_mask follows PyTorch's convention: True (or -inf in a float mask) = ignored key."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dilated.core import dilated_attention
from dilated.core.testing import dense_dilated_attention, make_inputs


def test_an_all_false_mask_gives_the_unmasked_result() -> None:
    # Regression (issue 24): a torch-style mask of an unpadded batch used to give all zeros.
    inp = make_inputs(2, 16, 4, 8, kv_heads=2, dtype=torch.float64, seed=0)
    nothing_padded = torch.zeros(2, 16, dtype=torch.bool)
    got = dilated_attention(inp.q, inp.k, inp.v, [4, 16], [1, 2], key_padding_mask=nothing_padded)
    want = dilated_attention(inp.q, inp.k, inp.v, [4, 16], [1, 2])
    torch.testing.assert_close(got, want)
    assert bool(got.abs().amax() > 0.1)


def test_float_mask_equals_the_bool_mask() -> None:
    inp = make_inputs(3, 12, 2, 8, dtype=torch.float64, padding=True, seed=2)
    assert inp.key_padding_mask is not None
    additive = torch.zeros(3, 12, dtype=torch.float64).masked_fill(
        inp.key_padding_mask, float("-inf")
    )
    args = (inp.q, inp.k, inp.v, [4, 12], [1, 3])
    torch.testing.assert_close(
        dilated_attention(*args, key_padding_mask=additive),
        dilated_attention(*args, key_padding_mask=inp.key_padding_mask),
    )


@pytest.mark.parametrize("bad", [0.5, -1.0, float("nan"), float("inf")])
def test_float_mask_other_than_zero_or_minus_inf_is_refused(bad: float) -> None:
    inp = make_inputs(1, 8, 2, 4, seed=1)
    mask = torch.zeros(1, 8)
    mask[0, 3] = bad
    with pytest.raises(ValueError, match=r"only -inf \(ignored key\) and 0 \(attended key\)"):
        dilated_attention(inp.q, inp.k, inp.v, [8], [1], key_padding_mask=mask)


def test_matches_nn_multihead_attention_on_a_dense_config() -> None:
    # Segment length = seq and rate 1 is dense attention: with identity projections
    # nn.MultiheadAttention computes the same function, masks read the same way.
    torch.manual_seed(0)
    b, n, h, d = 2, 10, 2, 4
    mha = nn.MultiheadAttention(h * d, h, bias=False, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.eye(h * d, dtype=torch.float64).repeat(3, 1))
        mha.out_proj.weight.copy_(torch.eye(h * d, dtype=torch.float64))
    q, k, v = (torch.randn(b, n, h * d, dtype=torch.float64) for _ in range(3))
    padding = torch.zeros(b, n, dtype=torch.bool)
    padding[0, 7:] = True
    padding[1, :3] = True
    want, _ = mha(q, k, v, key_padding_mask=padding, need_weights=False)
    got = dilated_attention(
        q.view(b, n, h, d), k.view(b, n, h, d), v.view(b, n, h, d), [n], [1],
        key_padding_mask=padding,
    )  # fmt: skip
    torch.testing.assert_close(got.reshape(b, n, h * d), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_a_row_whose_keys_are_all_masked(kind: str) -> None:
    # Documented (docs/errors.md): output 0, lse -inf, finite (zero) gradients, not NaN.
    inp = make_inputs(2, 12, 2, 8, dtype=torch.float64, requires_grad=True, seed=5)
    padding = torch.zeros(2, 12, dtype=torch.bool)
    padding[1] = True
    mask = padding if kind == "bool" else torch.zeros(2, 12).masked_fill(padding, -torch.inf)
    out, lse = dilated_attention(
        inp.q, inp.k, inp.v, [4, 12], [1, 2], key_padding_mask=mask, return_lse=True
    )
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert bool(torch.isneginf(lse[1]).all()) and bool(torch.isfinite(lse[0]).all())
    want, _ = dense_dilated_attention(inp.q, inp.k, inp.v, [4, 12], [1, 2], key_padding_mask=mask)
    torch.testing.assert_close(out, want)
    grads = torch.autograd.grad(out.square().sum(), (inp.q, inp.k, inp.v))
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    assert bool((grads[0][1] == 0).all()) and bool((grads[1][1] == 0).all())
