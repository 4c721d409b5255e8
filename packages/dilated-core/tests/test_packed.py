"""Packed batches (``cu_seqlens``): each sequence attended alone, its segments from its start."""

from __future__ import annotations

import itertools

import pytest
import torch

from dilated.core import DilatedAttention, MultiheadDilatedAttention, dilated_attention
from dilated.core.checks import ArgumentTypeError, check_cu_seqlens
from dilated.core.testing import assert_close_to_reference, dense_dilated_attention, make_inputs

WS, RS = (4, 8), (1, 2)
LENGTHS = (5, 0, 12, 1, 9)  # odd lengths, an empty sequence, one shorter than a segment


def _bounds(lengths: tuple[int, ...]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("form", ["list", "int32", "int64"])
def test_packed_equals_each_sequence_alone_forward_and_backward(causal: bool, form: str) -> None:
    bounds = _bounds(LENGTHS)
    x = make_inputs(1, bounds[-1], 4, 8, kv_heads=2, padding=True, requires_grad=True, seed=1)
    cu = bounds if form == "list" else torch.tensor(bounds, dtype=getattr(torch, form))
    out, lse = dilated_attention(
        x.q, x.k, x.v, WS, RS, is_causal=causal, key_padding_mask=x.key_padding_mask,
        cu_seqlens=cu, return_lse=True,
    )  # fmt: skip
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x.q, x.k, x.v), g)
    leaves = [t.detach().double().requires_grad_() for t in (x.q, x.k, x.v)]
    refs, ref_lses = [], []
    for a, b in itertools.pairwise(bounds):
        if b == a:
            continue
        ref, ref_lse = dense_dilated_attention(
            *(t[:, a:b] for t in leaves), WS, RS, is_causal=causal,
            key_padding_mask=x.key_padding_mask[:, a:b],
        )  # fmt: skip
        refs.append(ref)
        ref_lses.append(ref_lse)
    ref, ref_lse = torch.cat(refs, 1), torch.cat(ref_lses, 2)
    assert_close_to_reference(out, ref, torch.float32)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert_close_to_reference(lse[finite], ref_lse[finite], torch.float32, "lse")
    want = torch.autograd.grad(ref, leaves, g.double())
    for name, a, e in zip(("dq", "dk", "dv"), got, want):
        assert_close_to_reference(a, e, torch.float32, name)


def test_no_key_of_another_sequence_is_seen() -> None:
    # Changing the second sequence's keys leaves the first sequence's outputs as they were.
    x = make_inputs(1, 16, 2, 8, seed=2)
    first = dilated_attention(x.q, x.k, x.v, WS, RS, cu_seqlens=[0, 7, 16])
    k = x.k.clone()
    k[:, 7:] = 100.0
    again = dilated_attention(x.q, k, x.v, WS, RS, cu_seqlens=[0, 7, 16])
    torch.testing.assert_close(again[:, :7], first[:, :7], rtol=0, atol=0)
    assert not torch.allclose(again[:, 7:], first[:, 7:])


def test_modules_take_cu_seqlens() -> None:
    bounds = _bounds((6, 10))
    attention = DilatedAttention(WS, RS, is_causal=True)
    x = make_inputs(1, 16, 4, 8, seed=3)
    got = attention(x.q, x.k, x.v, cu_seqlens=bounds)
    want = torch.cat(
        [attention(x.q[:, a:b], x.k[:, a:b], x.v[:, a:b]) for a, b in ((0, 6), (6, 16))], 1
    )
    torch.testing.assert_close(got, want)
    mha = MultiheadDilatedAttention(32, 4, RS, WS)
    h = torch.randn(1, 16, 32)
    out, _ = mha(h, h, h, is_causal=True, cu_seqlens=torch.tensor(bounds))
    parts = [mha(h[:, a:b], h[:, a:b], h[:, a:b], is_causal=True)[0] for a, b in ((0, 6), (6, 16))]
    torch.testing.assert_close(out, torch.cat(parts, 1))


@pytest.mark.parametrize(
    ("cu", "error", "match"),
    [
        ([0, 4, 3, 8], ValueError, "non-decreasing"),
        ([1, 8], ValueError, "start at 0 and end at seq=8"),
        ([0, 7], ValueError, "end at seq=8"),
        ([0], ValueError, "start at 0"),
        (torch.tensor([0.0, 8.0]), ValueError, "1-D integer tensor"),
        (torch.tensor([[0, 8]]), ValueError, "1-D integer tensor"),
        ("0,8", ArgumentTypeError, "1-D integer tensor or a sequence of ints"),
        ([0, 8.0], ArgumentTypeError, "hold ints"),
        ([0, True], ArgumentTypeError, "hold ints"),
    ],
)
def test_bad_cu_seqlens_are_refused_naming_the_rule(cu: object, error: type, match: str) -> None:
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(error, match=match):
        check_cu_seqlens(cu, q)
    with pytest.raises(error, match=match):
        dilated_attention(q, q, q, WS, RS, cu_seqlens=cu)  # type: ignore[arg-type]


def test_a_packed_batch_is_a_batch_of_one() -> None:
    q = torch.randn(2, 8, 2, 4)
    with pytest.raises(ValueError, match=r"batch of one.*got batch 2"):
        dilated_attention(q, q, q, WS, RS, cu_seqlens=[0, 8])
