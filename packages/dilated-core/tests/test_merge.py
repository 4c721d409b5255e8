"""merge_attention: partial results over disjoint key sets merge into attention over their union."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dilated.core import merge_attention
from dilated.core.reference import attention_with_lse


def _bnhd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)  # (b, h, n, d) <-> (b, n, h, d)


@given(st.integers(1, 4), st.integers(2, 30), st.integers(0, 2**16))
def test_union_of_key_splits(parts: int, n_keys: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, n_keys, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, n_keys, 8, generator=g, dtype=torch.float64, requires_grad=True)
    full, full_lse = attention_with_lse(q, k, v, 0.35)
    cuts = sorted(torch.randint(0, n_keys + 1, (parts - 1,), generator=g).tolist())
    bounds = [0, *cuts, n_keys]
    outs, lses = [], []
    for lo, hi in itertools.pairwise(bounds):
        o, lse = attention_with_lse(q, k[:, :, lo:hi], v[:, :, lo:hi], 0.35)
        outs.append(_bnhd(o))
        lses.append(lse)
    out, lse = merge_attention(outs, lses)
    torch.testing.assert_close(_bnhd(out), full)
    torch.testing.assert_close(lse, full_lse)
    grads = torch.autograd.grad((out * 1.7).sum() + lse.sum(), (q, k, v))
    want = torch.autograd.grad((_bnhd(full) * 1.7).sum() + full_lse.sum(), (q, k, v))
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b)


def test_empty_parts_give_zero_and_minus_inf_without_nan_grads() -> None:
    o1 = torch.randn(1, 4, 2, 3, requires_grad=True)
    l1 = torch.tensor([[[0.5, float("-inf"), 1.0, float("-inf")]] * 2], requires_grad=True)
    o2 = torch.randn(1, 4, 2, 3, requires_grad=True)
    l2 = torch.full((1, 2, 4), float("-inf"), requires_grad=True)
    out, lse = merge_attention([o1 * (l1.isfinite().transpose(1, 2)[..., None]), o2 * 0], [l1, l2])
    assert torch.isneginf(lse[0, :, 1]).all() and torch.isneginf(lse[0, :, 3]).all()
    assert torch.equal(out[0, 1], torch.zeros(2, 3)) and torch.equal(out[0, 3], torch.zeros(2, 3))
    torch.testing.assert_close(lse[0, :, 0], torch.tensor([0.5, 0.5]))
    (out.sum() + lse[lse.isfinite()].sum()).backward()
    for t in (o1, l1, o2, l2):
        assert t.grad is not None and torch.isfinite(t.grad).all()


def test_half_outputs_keep_dtype() -> None:
    o = [torch.randn(1, 3, 2, 4, dtype=torch.bfloat16) for _ in range(2)]
    lses = [torch.randn(1, 2, 3) for _ in range(2)]
    out, lse = merge_attention(o, lses)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32


@pytest.mark.parametrize(
    ("outputs", "lses", "match"),
    [
        ([], [], "at least one"),
        ([torch.zeros(1, 3, 2, 4)], [], "as many lses"),
        (
            [torch.zeros(1, 3, 2, 4), torch.zeros(1, 3, 2, 5)],
            [torch.zeros(1, 2, 3)] * 2,
            r"outputs\[1\]",
        ),
        ([torch.zeros(1, 3, 2, 4)] * 2, [torch.zeros(1, 2, 3), torch.zeros(1, 3, 2)], r"lses\[1\]"),
    ],
)
def test_bad_arguments(outputs: list[torch.Tensor], lses: list[torch.Tensor], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        merge_attention(outputs, lses)
